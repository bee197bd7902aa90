"""A Hugging Face Hub-compatible HTTP server on loopback, for tests that run the real
`huggingface_hub` client without reaching the internet.

It implements what the client calls for push, pull and Spaces (huggingface_hub 2.x):

    GET  /api/whoami-v2                                   who the bearer token belongs to
    POST /api/repos/create                                model / dataset / space repos
    POST /api/validate-yaml                               README front matter check
    GET  /api/{type}s/{repo}[/revision/{rev}]             repo info (sha, siblings)
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]          tree listing (recursive)
    POST /api/{type}s/{repo}/paths-info/{rev}             file entries for given paths
    POST /api/{type}s/{repo}/preupload/{rev}              upload mode + current oid per file
    POST /api/{type}s/{repo}/commit/{rev}                 ndjson commit (regular + LFS files)
    POST /api/{type}s/{repo}/branch/{branch}              create a branch
    POST /[{type}s/]{repo}.git/info/lfs/objects/batch     LFS batch (basic transfer)
    PUT  /_lfs/upload/{oid}?repo=...&sig=...              pre-signed LFS upload (no bearer)
    POST /_lfs/verify                                     LFS verify
    HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}       download with X-Repo-Commit / ETag
    GET  /_fake/state                                     counters, errors and repo sizes as
                                                          JSON (not counted itself), for a
                                                          process that runs this server apart

Xet is never advertised, so clients must run with xet disabled for uploads (HF_HUB_DISABLE_XET=1).
Blobs are content-addressed files under `root/blobs`; repo state (commits, branches) lives in
memory. Faults can be injected per endpoint (`inject("preupload", 503, times=2)`), and counters
(`stats`, `lfs_uploads`, `blob_writes`, `commits`) let tests assert what actually happened.

    python -m tests.support.fake_hub [--port 8765] [--storage DIR] [--token hf_xxx:user]
                                                           # serve until Ctrl-C or SIGTERM
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from medchat.run_folder import (BaseModelRef, ChatSpec, DatasetRecord, GenerationDefaults,
                                Manifest, Metrics, ModelScores, Run, TrainingRecord)

DEFAULT_TOKEN = "hf_FakeHubTestToken0123456789abcdefXYZ"
DEFAULT_USER = "test-user"
# Same spirit as the Hub's default .gitattributes: weights and archives go through LFS.
LFS_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.onnx",
                "*.msgpack", "*.model", "*.zip", "*.tar.gz", "*.npy", "*.npz", "*.pkl"]
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
MAX_BODY = 2 * 1024 ** 3  # refuse anything larger: the server stays bounded
CONTROL = "_control"  # the endpoint name of /_fake/state, left out of every counter


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()


@dataclass
class FileEntry:
    sha256: str
    size: int
    lfs: bool
    git_oid: str  # git sha1 of the content (regular) or of the LFS pointer


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, FileEntry]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    sdk: str | None
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # LFS storage is per repo, as on the Hub


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class FakeHub:
    """A loopback Hub. Use as a context manager or call start()/stop()."""

    def __init__(self, root: str | Path | None = None, tokens: dict[str, str] | None = None,
                 orgs: dict[str, list[str]] | None = None, max_body: int = MAX_BODY,
                 port: int = 0):
        self.port = port
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="fake-hub-"))
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {DEFAULT_TOKEN: DEFAULT_USER})
        self.orgs = dict(orgs or {DEFAULT_USER: ["test-org"]})
        self.max_body = max_body
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self.stats: collections.Counter[str] = collections.Counter()  # endpoint -> requests
        self.bytes_in: collections.Counter[str] = collections.Counter()  # endpoint -> body bytes
        self.bytes_out: collections.Counter[str] = collections.Counter()  # endpoint -> body bytes
        self.lfs_uploads: list[str] = []  # oids received through PUT /_lfs/upload
        self.blob_writes = 0  # new blobs stored (LFS or regular)
        self.commits: list[tuple[str, str, str]] = []  # (repo_id, commit oid, title)
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status); never headers
        self.errors: list[str] = []  # tracebacks of unexpected server-side exceptions
        self.seen_auth: list[str] = []  # endpoints that received a bearer (values never kept)
        self.auth_paths: list[str] = []  # request paths that carried a bearer (values never kept)
        self._faults: dict[str, list[int]] = collections.defaultdict(list)
        self._secret = secrets.token_bytes(16)  # signs LFS upload URLs
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub",
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "call start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test controls ---------------------------------------------------------------------

    def inject(self, endpoint: str, status: int = 503, times: int = 1) -> None:
        """Answer the next `times` requests to `endpoint` (a name from `stats`) with `status`."""
        with self.lock:
            self._faults[endpoint].extend([status] * times)

    def pending_faults(self, endpoint: str) -> int:
        with self.lock:
            return len(self._faults.get(endpoint, []))

    def repo_files(self, repo_id: str, repo_type: str = "model",
                   revision: str = "main") -> dict[str, bytes]:
        """Every file of a repo at a revision, as bytes (what a clone would contain)."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            commit = repo.commits[self._resolve(repo, revision)]
            return {p: self.blob_path(e.sha256).read_bytes() for p, e in commit.files.items()}

    def head(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> str:
        with self.lock:
            return self._resolve(self.repos[(repo_type, repo_id)], revision)

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def state(self) -> dict[str, Any]:
        """Counters, errors and the number of files at main per repo, as plain JSON data."""
        with self.lock:
            return {"stats": dict(self.stats), "bytes_in": dict(self.bytes_in),
                    "bytes_out": dict(self.bytes_out), "errors": list(self.errors),
                    "lfs_uploads": len(self.lfs_uploads), "blob_writes": self.blob_writes,
                    "repo_files": {f"{t}:{r}": len(repo.commits[repo.refs["main"]].files)
                                   for (t, r), repo in self.repos.items()}}

    def add_user(self, token: str, user: str, orgs: list[str] | None = None) -> None:
        self.tokens[token] = user
        self.orgs[user] = list(orgs or [])

    # -- repo state ------------------------------------------------------------------------

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.commits:
            return revision
        matches = [oid for oid in repo.commits if len(revision) >= 7 and oid.startswith(revision)]
        if len(matches) == 1:
            return matches[0]
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _store_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.exists():
            tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            self.blob_writes += 1
        return sha

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, FileEntry], title: str) -> str:
        parent = repo.refs.get(branch)
        seed = f"{repo.repo_id}\0{parent}\0{title}\0{time.time_ns()}\0{secrets.token_hex(4)}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, title, files)
        repo.refs[branch] = oid
        self.commits.append((repo.repo_id, oid, title))
        return oid

    def _entry_for(self, data: bytes, lfs: bool) -> FileEntry:
        sha = self._store_blob(data)
        git_oid = git_blob_sha1(lfs_pointer(sha, len(data)) if lfs else data)
        return FileEntry(sha, len(data), lfs, git_oid)

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False,
                    sdk: str | None = None) -> Repo:
        with self.lock:
            repo = Repo(repo_type, repo_id, private, sdk)
            self.repos[(repo_type, repo_id)] = repo
            files = {".gitattributes": self._entry_for(GITATTRIBUTES, lfs=False)}
            self._new_commit(repo, "main", files, "initial commit")
            return repo

    def sign(self, repo_key: str, oid: str) -> str:
        return hmac.new(self._secret, f"{repo_key}\0{oid}".encode(), "sha256").hexdigest()


def _is_lfs_path(path: str, size: int, sample: bytes) -> bool:
    name = path.rsplit("/", 1)[-1]
    return (size > LFS_SIZE_THRESHOLD or b"\0" in sample
            or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS))


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    timeout = 60  # a stuck client cannot hold a thread forever

    # routes: (method, regex, endpoint name, handler)
    ROUTES: list[tuple[str, re.Pattern, str, str]] = []

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # requests are recorded in hub.requests (method, path, status) only

    # -- plumbing --------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        self._status = 0
        self._consumed = False  # one handler serves every request of a keep-alive connection
        self._endpoint = "unrouted"
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        if method == "GET" and path == "/_fake/state":
            self._endpoint = CONTROL
            self._json(200, self.hub.state())
            return
        try:
            for m, rx, name, fn in self.ROUTES:
                if m != method and not (m == "GET" and method == "HEAD"):
                    continue
                match = rx.fullmatch(path)
                if not match:
                    continue
                self._endpoint = name
                with self.hub.lock:
                    self.hub.stats[name] += 1
                    if self.headers.get("authorization"):
                        self.hub.seen_auth.append(name)
                        self.hub.auth_paths.append(path)
                    faults = self.hub._faults.get(name)
                    fault = faults.pop(0) if faults else None
                if fault is not None:
                    self._drain()
                    raise HubHTTPError(fault, f"injected {fault} on {name}")
                getattr(self, fn)(**{k: None if v is None else unquote(v)
                                    for k, v in match.groupdict().items()})
                return
            raise HubHTTPError(404, f"no route for {method} {path}")
        except HubHTTPError as e:
            self._drain()
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message, **e.extra}, headers)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug in the fake: answer 500 and keep the traceback for tests
            import traceback

            with self.hub.lock:
                self.hub.errors.append(traceback.format_exc())
            self.close_connection = True
            self._json(500, {"error": f"fake hub bug: {type(e).__name__}: {e}"})
        finally:
            with self.hub.lock:
                self.hub.requests.append((method, path, self._status))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _body_chunks(self):
        """Yield the request body (Content-Length or chunked), bounded by hub.max_body."""
        if getattr(self, "_consumed", False):
            return
        self._consumed = True
        for block in self._read_body():
            with self.hub.lock:
                self.hub.bytes_in[self._endpoint] += len(block)
            yield block

    def _read_body(self):
        total = 0
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                total += size
                if total > self.hub.max_body:
                    raise HubHTTPError(413, "request body too large")
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            left = int(self.headers.get("content-length") or 0)
            if left > self.hub.max_body:
                raise HubHTTPError(413, "request body too large")
            while left > 0:
                block = self.rfile.read(min(left, 1 << 20))
                if not block:
                    return
                left -= len(block)
                yield block

    def _body(self) -> bytes:
        return b"".join(self._body_chunks())

    def _drain(self) -> None:
        try:
            for _ in self._body_chunks():
                pass
        except HubHTTPError:
            self.close_connection = True

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"null")
        except json.JSONDecodeError as e:
            raise HubHTTPError(400, f"invalid JSON body: {e}") from e

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            if self._endpoint != CONTROL:
                with self.hub.lock:
                    self.hub.bytes_out[self._endpoint] += len(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    # -- auth ------------------------------------------------------------------------------

    def _user(self, required: bool = False) -> str | None:
        auth = self.headers.get("authorization")
        if not auth:
            if required:
                raise HubHTTPError(401, "Invalid username or password.")
            return None
        token = auth.split(" ", 1)[1].strip() if " " in auth else ""
        user = self.hub.tokens.get(token)
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.hub.orgs.get(user, []))

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.hub.repos.get((repo_type, repo_id))
        owner = repo_id.split("/")[0]
        visible = repo is not None and (not repo.private or self._can_write(user, owner))
        if not visible:
            raise HubHTTPError(404 if user else 401, "Repository not found", "RepoNotFound")
        if write and not self._can_write(user, repo_id.split("/")[0]):
            raise HubHTTPError(403, f"You don't have write access to {repo_id}")
        return repo

    # -- endpoints -------------------------------------------------------------------------

    def whoami(self) -> None:
        user = self._user(required=True)
        orgs = [{"name": o, "type": "org"} for o in self.hub.orgs.get(user, [])]
        self._json(200, {"type": "user", "id": hashlib.md5(user.encode()).hexdigest()[:24],
                         "name": user, "fullname": user, "orgs": orgs,
                         "auth": {"type": "access_token",
                                  "accessToken": {"displayName": "test", "role": "write"}}})

    def create_repo(self) -> None:
        user = self._user(required=True)
        body = self._json_body() or {}
        name, namespace = body.get("name"), body.get("organization") or user
        repo_type = body.get("type") or "model"
        if not name or repo_type not in REPO_TYPES.values():
            raise HubHTTPError(400, "invalid repo name or type")
        if not self._can_write(user, namespace):
            raise HubHTTPError(403, f"You don't have the rights to create a {repo_type} under the "
                                    f"namespace \"{namespace}\"")
        repo_id = f"{namespace}/{name}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self._base()}/{prefix}{repo_id}"
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:
                # like the Hub: the conflict still says where the repo is
                raise HubHTTPError(409, f"You already created this {repo_type} repo",
                                   extra={"url": url})
            self.hub.create_repo(repo_id, repo_type, body.get("visibility") == "private"
                                 or bool(body.get("private")), body.get("sdk"))
        self._json(200, {"url": url, "name": repo_id,
                         "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})

    def validate_yaml(self) -> None:
        import yaml

        body = self._json_body() or {}
        content = body.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                return
            if meta is not None and not isinstance(meta, dict):
                self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
                return
        self._json(200, {"errors": [], "warnings": []})

    def _base(self) -> str:
        host = self.headers.get("host") or "127.0.0.1"
        return f"http://{host}"

    def repo_info(self, type: str, repo: str, rev: str | None = None) -> None:  # noqa: A002
        r = self._repo(REPO_TYPES[type], repo)
        oid = self.hub._resolve(r, rev or "main")
        commit = r.commits[oid]
        info: dict[str, Any] = {
            "id": r.repo_id, "_id": hashlib.md5(r.repo_id.encode()).hexdigest()[:24],
            "author": r.repo_id.split("/")[0], "sha": oid, "private": r.private,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date)),
            "createdAt": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }
        if r.repo_type == "space":
            info.update(sdk=r.sdk, runtime={"stage": "BUILDING", "hardware": {"current": None}})
        if self.query.get("blobs") in ("True", "true", "1"):
            info["siblings"] = [self._sibling(p, e) for p, e in sorted(commit.files.items())]
        self._json(200, info)

    @staticmethod
    def _sibling(path: str, e: FileEntry) -> dict[str, Any]:
        s: dict[str, Any] = {"rfilename": path, "size": e.size, "blobId": e.git_oid}
        if e.lfs:
            s["lfs"] = {"sha256": e.sha256, "size": e.size,
                        "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        return s

    @staticmethod
    def _tree_entry(path: str, e: FileEntry) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "file", "path": path, "size": e.size, "oid": e.git_oid}
        if e.lfs:
            d["lfs"] = {"oid": e.sha256, "size": e.size,
                        "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        return d

    def tree(self, type: str, repo: str, rev: str, path: str | None = None) -> None:  # noqa: A002
        r = self._repo(REPO_TYPES[type], repo)
        commit = r.commits[self.hub._resolve(r, rev)]
        prefix = (path.strip("/") + "/") if path else ""
        recursive = self.query.get("recursive", "false").lower() in ("true", "1")
        out, folders = [], set()
        for p, e in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                folder = prefix + "/".join(parts[:i])
                if (recursive or i == 1) and folder not in folders:
                    folders.add(folder)
                    out.append({"type": "directory", "path": folder,
                                "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                out.append(self._tree_entry(p, e))
        if path and not out:
            raise HubHTTPError(404, f"{path} does not exist", "EntryNotFound")
        self._json(200, out)

    def paths_info(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        r = self._repo(REPO_TYPES[type], repo)
        commit = r.commits[self.hub._resolve(r, rev)]
        raw = self._body().decode()
        ctype = self.headers.get("content-type", "")
        if "json" in ctype:
            paths = (json.loads(raw or "{}").get("paths") or [])
        else:
            paths = parse_qs(raw).get("paths", [])
        out = [self._tree_entry(p, commit.files[p]) for p in paths if p in commit.files]
        self._json(200, out)

    def preupload(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        r = self._repo(REPO_TYPES[type], repo, write=True)
        body = self._json_body() or {}
        try:
            current = r.commits[self.hub._resolve(r, rev)].files
        except HubHTTPError:
            current = {}
        files = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = _is_lfs_path(f["path"], int(f.get("size", 0)), sample)
            e = current.get(f["path"])
            # The client compares this oid with its own (sha256 for LFS, git sha1 for regular)
            # to drop unchanged files from the commit.
            oid = None if e is None else (e.sha256 if e.lfs else e.git_oid)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": r.refs.get(rev)})

    def commit(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        r = self._repo(REPO_TYPES[type], repo, write=True)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "commit payload must start with a header line")
        title = lines[0]["value"].get("summary") or ""
        if not title:
            raise HubHTTPError(400, "commit summary is required")
        with self.hub.lock:
            if rev not in r.refs:
                raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            files = dict(r.commits[r.refs[rev]].files)
            for item in lines[1:]:
                key, value = item["key"], item["value"]
                path = value["path"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[path] = self.hub._entry_for(data, lfs=False)
                elif key == "lfsFile":
                    blob = self.hub.blob_path(value["oid"])
                    if (value["oid"] not in r.lfs_objects
                            or blob.stat().st_size != int(value["size"])):
                        raise HubHTTPError(422, f"LFS object {value['oid']} for {path} was not "
                                                "uploaded")
                    files[path] = FileEntry(value["oid"], int(value["size"]), True, git_blob_sha1(
                        lfs_pointer(value["oid"], int(value["size"]))))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubHTTPError(404, "A file with this name doesn't exist",
                                           "EntryNotFound")
                elif key == "deletedFolder":
                    folder = path.rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(folder)}
                else:
                    raise HubHTTPError(400, f"unsupported commit operation {key!r}")
            oid = self.hub._new_commit(r, rev, files, title)
        prefix = "" if r.repo_type == "model" else f"{r.repo_type}s/"
        self._json(200, {"commitUrl": f"{self._base()}/{prefix}{r.repo_id}/commit/{oid}",
                         "commitOid": oid, "success": True, "pullRequestUrl": None})

    def branch(self, type: str, repo: str, branch: str) -> None:  # noqa: A002
        r = self._repo(REPO_TYPES[type], repo, write=True)
        body = self._json_body() or {}
        with self.hub.lock:
            if branch in r.refs:
                raise HubHTTPError(409, f"Branch {branch} already exists")
            r.refs[branch] = self.hub._resolve(r, body.get("startingPoint") or "main")
        self._json(200, {})

    def lfs_batch(self, type: str | None, repo: str) -> None:  # noqa: A002
        r = self._repo(REPO_TYPES.get(type or "models", "model"), repo, write=True)
        body = self._json_body() or {}
        if body.get("operation") != "upload":
            raise HubHTTPError(400, "only the upload operation is supported")
        objects = []
        key = f"{r.repo_type}:{r.repo_id}"
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if oid in r.lfs_objects:
                objects.append({"oid": oid, "size": size})  # no actions: this repo has it
                continue
            query = urlencode({"repo": key, "sig": self.hub.sign(key, oid)})
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{self._base()}/_lfs/upload/{oid}?{query}"},
                "verify": {"href": f"{self._base()}/_lfs/verify"},
            }})
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, oid: str) -> None:
        key = self.query.get("repo", "")
        if not hmac.compare_digest(self.query.get("sig", ""), self.hub.sign(key, oid)):
            raise HubHTTPError(403, "invalid upload signature")
        h = hashlib.sha256()
        tmp = self.hub.blob_path(oid).with_suffix(f".{secrets.token_hex(4)}.part")
        try:
            with open(tmp, "wb") as f:
                for block in self._body_chunks():
                    h.update(block)
                    f.write(block)
            if h.hexdigest() != oid:
                raise HubHTTPError(400, "uploaded content does not match its sha256")
            with self.hub.lock:
                if not self.hub.blob_path(oid).exists():
                    tmp.replace(self.hub.blob_path(oid))
                    self.hub.blob_writes += 1
                self.hub.lfs_uploads.append(oid)
                repo = self.hub.repos.get(tuple(key.split(":", 1)))  # type: ignore[arg-type]
                if repo is not None:
                    repo.lfs_objects.add(oid)
        finally:
            tmp.unlink(missing_ok=True)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self) -> None:
        self._user(required=True)
        body = self._json_body() or {}
        blob = self.hub.blob_path(str(body.get("oid")))
        if not blob.exists() or blob.stat().st_size != int(body.get("size", -1)):
            raise HubHTTPError(404, "object not found")
        self._json(200, {"success": True})

    def resolve(self, type: str | None, repo: str, rev: str, path: str) -> None:  # noqa: A002
        r = self._repo(REPO_TYPES.get(type or "models", "model"), repo)
        oid = self.hub._resolve(r, rev)
        e = r.commits[oid].files.get(path)
        if e is None:
            self._drain()
            self._json(404, {"error": "Entry not found"},
                       {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": oid})
            return
        etag = e.sha256 if e.lfs else e.git_oid
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if e.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(e.size)})
        data = self.hub.blob_path(e.sha256).read_bytes()
        rng = self.headers.get("range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and self.command == "GET":
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start:end + 1], headers, "application/octet-stream")
            return
        self._send(200, data, headers, "application/octet-stream")


_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_TYPE = r"(?P<type>models|datasets|spaces)"
_Handler.ROUTES = [(m, re.compile(rx), name, fn) for m, rx, name, fn in [
    ("GET", r"/api/whoami-v2", "whoami", "whoami"),
    ("POST", r"/api/repos/create", "create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate-yaml", "validate_yaml"),
    ("GET", rf"/api/{_TYPE}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree", "tree"),
    ("POST", rf"/api/{_TYPE}/{_REPO}/paths-info/(?P<rev>[^/]+)", "paths-info", "paths_info"),
    ("POST", rf"/api/{_TYPE}/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload", "preupload"),
    ("POST", rf"/api/{_TYPE}/{_REPO}/commit/(?P<rev>[^/]+)", "commit", "commit"),
    ("POST", rf"/api/{_TYPE}/{_REPO}/branch/(?P<branch>[^/]+)", "branch", "branch"),
    ("GET", rf"/api/{_TYPE}/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "info", "repo_info"),
    ("POST", rf"/(?:(?P<type>datasets|spaces)/)?{_REPO}\.git/info/lfs/objects/batch",
     "lfs-batch", "lfs_batch"),
    ("PUT", r"/_lfs/upload/(?P<oid>[0-9a-f]{64})", "lfs-upload", "lfs_upload"),
    ("POST", r"/_lfs/verify", "lfs-verify", "lfs_verify"),
    ("GET", rf"/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
     "resolve", "resolve"),
]]


def hub_env(hub: FakeHub, token: str | None = DEFAULT_TOKEN) -> dict[str, str]:
    """Environment for a subprocess that should talk to `hub` (and nothing else)."""
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    if token:
        env["HF_TOKEN"] = token
    return env


def use_fake_hub(monkeypatch, hub: FakeHub, token: str | None = DEFAULT_TOKEN,
                 home: str | Path | None = None) -> None:
    """Point the already-imported huggingface_hub at `hub` for one test.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET and the token path
    when it is imported, so setting the environment alone is not enough in-process.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    for k, v in hub_env(hub, token).items():
        monkeypatch.setenv(k, v)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    if home is not None:  # a private HF home: no stored login leaks in or out
        home = Path(home)
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    _http.close_session()  # a fresh client: no connection kept from another test's server


# ---------------------------------------------------------------------------------------------
# Run folders for hub tests (a tiny model + a LoRA adapter with non-zero weights)


def make_adapter_run(runs_dir: str | Path, model_dir: str | Path, name: str = "tiny-run",
                     base_hub_id: str | None = "test-user/tiny-base", seed: int = 0,
                     with_eval: bool = True, with_junk: bool = True) -> Path:
    """runs_dir/name with an adapter (PEFT, safetensors, tokenizer) and a schema-2 manifest
    holding the test losses training records; with `with_eval`, the evaluation's scores in the
    manifest and its eval file; with `with_junk`, things that must never be pushed
    (checkpoints, optimizer state, .env)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Run(Path(runs_dir) / name)
    run.adapter_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=64, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(run.adapter_dir, safe_serialization=True)
    tok.save_pretrained(run.adapter_dir)
    scores = {"base": ModelScores(loss=3.1), "adapter": ModelScores(loss=2.4)}  # from training
    evaluated = {"base": ModelScores(loss=3.1, perplexity=22.2, rougeL=0.11, bleu=1.5),
                 "adapter": ModelScores(loss=2.4, perplexity=11.0, rougeL=0.19, bleu=4.2)}
    run.save_manifest(Manifest(
        name=name,
        base_model=BaseModelRef(name=str(model_dir), local_path=str(model_dir),
                                content_hash="0" * 64, hub_id=base_hub_id),
        chat=ChatSpec(template=tok.chat_template, stop_tokens=[tok.eos_token],
                      generation=GenerationDefaults(max_new_tokens=8, temperature=0.0, top_p=1.0,
                                                    repetition_penalty=1.0)),
        dataset=DatasetRecord(source="/work/shared/data/MedInfo2019-QA-Medications.xlsx",
                              sha256="ab" * 32, seed=42, sizes={"train": 483, "test": 207}),
        training=TrainingRecord(
            config={"name": name, "runs_dir": str(runs_dir),
                    "model": {"name": str(model_dir), "quantization": "nf4"},
                    "lora": {"r": 8, "alpha": 64, "dropout": 0.0, "target_modules": "all-linear"},
                    "train": {"epochs": 1.0, "learning_rate": 2e-4, "batch_size": 1,
                              "grad_accum": 4, "deepspeed": "zero2"}},
            stats={"train_runtime": 12.5, "train_loss": 2.5}),
        metrics=Metrics(models=evaluated if with_eval else scores, test_samples=207),
        kind="adapter"))
    if with_eval:  # the shape `medchat evaluate` writes (training/evaluate.py)
        base_label = f"{base_hub_id or Path(model_dir).name} (unquantised)"
        run.eval_path.write_text(json.dumps({
            "run": name, "created": "2026-01-01T00:00:00+0000",
            "command": f"medchat evaluate {name}", "test_file": "data/test.jsonl",
            "questions": 1, "limit": None,
            "generation": {"mode": "greedy", "max_new_tokens": 8, "batch_size": 16,
                           "eos_token_ids": [tok.eos_token_id], "seed": 0},
            "test_loss_max_length": 512,
            "test_loss_max_length_source": "the run's data.max_length",
            "sources": {"base": base_label,
                        "adapter": f"{base_label} + adapter/ of run {name} via peft"},
            "metrics": {"rougeL": "rouge_score ROUGE-L F1 (stemmed), mean x100",
                        "bleu": "sacrebleu corpus BLEU",
                        "token_f1": "SQuAD token F1, mean x100"},
            "models": {kind: dataclasses.asdict(s) for kind, s in evaluated.items()},
            "seconds": {"base": 1.5, "adapter": 1.7},
            "items": [{"index": 0, "question": "How should I take metformin?",
                       "meta": {"source": "MedInfo2019-QA-Medications.xlsx", "row": 2,
                                "question_type": "Usage",
                                "url": "https://medlineplus.gov/druginfo/meds/a696005.html"},
                       "reference": "Take it with meals (5 mg/kg/day at most).",
                       "answers": {"base": "a", "adapter": "b"},
                       "scores": {"base": {"rougeL": 0.0}, "adapter": {"rougeL": 10.0}}}],
        }, indent=2))
    if with_junk:
        checkpoint = run.checkpoints_dir / "checkpoint-1"
        checkpoint.mkdir(parents=True, exist_ok=True)
        (checkpoint / "optimizer.pt").write_bytes(b"\0" * 64)
        run.loss_log_path.parent.mkdir(exist_ok=True)
        run.loss_log_path.write_text('{"step": 1, "loss": 2.5}\n')
        (run.adapter_dir / "optimizer.pt").write_bytes(b"\0" * 64)
        (run.adapter_dir / "training_args.bin").write_bytes(b"\0" * 16)
        (run.adapter_dir / ".env").write_text("SOME_SECRET=1\n")
    return run.path


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tests.support.fake_hub", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", "--root", dest="storage",
                    help="folder for the blobs (default: a temporary one, removed at exit)")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free)")
    ap.add_argument("--token", action="append", default=[], metavar="TOKEN:USER",
                    help=f"accepted token and its user; repeatable (default: {DEFAULT_USER})")
    args = ap.parse_args(argv)
    tokens = dict(t.split(":", 1) for t in args.token) or None
    # SIGTERM (how a parent process stops the server) exits through the with-block's cleanup
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with FakeHub(args.storage, tokens=tokens, port=args.port) as hub:
        print(f"fake hub at {hub.url} (HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
