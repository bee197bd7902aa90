"""A hostile visitor against the app started in its own process (`python launch.py` on loopback,
where "Add from Hub" is on by default), with a small waiting line, a /v1 key and the operator's
Hub token in its environment. The visitor uses gradio_client, the Gradio queue's own HTTP routes
(as the page does: "Add from Hub" has no public API name), plain HTTP and the `openai` client.
The loopback Hub (tests/support/fake_hub.py) holds the visitor's repos:

    test-user/local-path       manifest and adapter config name a local folder as the base
    test-user/local-path-hub   manifest names a local folder (and a Hub id) for the base
    test-user/remote-code      a full model whose classes are code in the repo
    test-user/evil-base        the same as a base model; test-user/on-evil-base an adapter on it
    test-user/shard-escape     a full model whose safetensors index names files outside it
    test-user/dora             an adapter the server cannot serve (DoRA)
    test-user/bad-template     an adapter whose manifest's chat template does not compile
    test-user/bomb-template    an adapter whose chat template writes 2 GB
    test-user/loop-template    an adapter whose chat template never ends
    test-user/bad-tokenizer    a full model whose tokenizer.json transformers cannot read
    test-user/bad-config       a full model whose config.json describes an impossible model
    test-user/huge-config      a full model whose config.json describes one of 12 GB
    test-user/too-big          an adapter larger than the app's pull cap

A "secret" tiny model with other weights sits outside the runs folder (if the server ever loaded
it, the answers would be its answers), and the repos' code writes a sentinel file when run.
Whatever the visitor tries, the server loads nothing outside its base and the runs folder, runs
no code from a repo, refuses clearly (OpenAI-shaped errors on /v1), never shows the Hub token,
the /v1 key or a local path, stays up, and then answers a normal request as it did before.

The base on the loopback Hub is the tiny test model with a long context (RoPE: the weights and
answers are the same), so that one generation can outlast what a test does meanwhile: a
cancelled generation is told from a finished one by how soon its slot is free again.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from hub.client import HubError
from hub.pull import pull
from medchat.run_folder import Run
from tests.support.chat_runs import QUESTIONS, make_adapter, reference_answer
from tests.support.fake_hub import DEFAULT_USER, FakeHub, hub_env, use_fake_hub
from tests.support.processes import free_port, stop, wait_until_up
from tests.support.tiny_model import build_tiny_model, remote_code_model

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
Q = QUESTIONS[0]
N = 24  # tokens of a normal answer
TOKEN = "hf_secretSentinel" + secrets.token_hex(12)  # the operator's Hub token
API_KEY = "sk-sentinel-" + secrets.token_hex(12)  # the key /v1 clients must send
KEY_ENV = "MEDCHAT_SECURITY_TEST_KEY"
BASE = f"{DEFAULT_USER}/tiny-base"
CONTEXT = 65536  # the base's max_position_embeddings on the loopback Hub
MAX_MESSAGE, MAX_HISTORY, MAX_TOKENS = 2000, 4000, 30000  # the app's flags below
UI_GREEDY = dict(system_prompt="", max_new_tokens=N, temperature=0.0, top_p=1.0,
                 repetition_penalty=1.0, seed=-1)
V1_GREEDY = {"max_tokens": N, "temperature": 0, "top_p": 1, "repetition_penalty": 1.0}
PATH_LIKE_REPOS = ["../x", "/etc", "/etc/passwd", "a/../../b", "%2e%2e/x", "..%2F..%2Fx",
                   "test-user/..", "test-user/.hidden", "test-user/%2e%2e", "..\\..\\x", "~/x",
                   "test-user/x/../../../etc", "test-user//x", ".", "..", "test-user/x y",
                   "file:///etc/passwd", "test-user/x--..--y"]


# -- the world: a loopback Hub with hostile repos, the app in its own process --------------------

@dataclass
class World:
    url: str
    proc: subprocess.Popen
    log: Path
    root: Path  # the app's working folder
    runs: Path
    hf_home: Path
    secret: Path  # a model folder outside the runs folder, never to be loaded
    sentinel: Path  # written by the repos' code if it ever runs
    hub: FakeHub
    refs: dict[str, str]  # greedy answers from transformers/peft, for what must (not) come back
    before: dict[str, str] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)  # every response the visitor got
    rate: float | None = None  # tokens a second of one generation
    test_began: int = 0  # len(seen) when the current test began

    def saw(self, text: object, sent: tuple[str, ...] = ()) -> str:
        """Keep what the visitor was answered, its own input echoed back taken out (a name it
        sent is no leak); returns what was kept."""
        text = str(text)
        for s in sent:
            if s:
                text = text.replace(s, "<sent>").replace(json.dumps(s)[1:-1], "<sent>")
        self.seen.append(text)
        return str(text)

    def markers(self) -> list[str]:
        """What must never reach a visitor: the secrets and this machine's folders."""
        home = str(Path.home()).rstrip("/") + "/"
        return [TOKEN, API_KEY, str(self.root), str(self.root.resolve()),
                str(self.runs.resolve()), str(self.hf_home), home]

    def leaks(self, since: int | None = None) -> list[str]:
        """What reached the visitor that must not have: since the current test began, or since
        the `since`-th response."""
        start = self.test_began if since is None else since
        return [f"{m!r} in {t[:400]!r}" for t in self.seen[start:] for m in self.markers()
                if m in t]

    def server_log(self) -> str:
        return self.log.read_text(errors="replace")

    def loaded(self) -> list[str]:
        """The model folders the server loaded (its 'loaded FOLDER in S s' log lines)."""
        return re.findall(r"loaded (\S.*?) in [\d.]+ s \(", self.server_log())


def upload(repo: str, files: dict[str, bytes | Path]) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.create_commit(repo, commit_message="hostile", operations=[
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=data if isinstance(data, bytes)
                           else str(data)) for name, data in files.items()])


def hostile_repos(staging: Path, base_src: Path, secret: Path, sentinel: Path,
                  runs: Path) -> Path:
    """Upload the repos of the module docstring; returns the adapter folder they carry."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base = {f.name: f for f in base_src.iterdir() if f.is_file()}
    config = json.loads((base_src / "config.json").read_text())
    base["config.json"] = json.dumps({**config, "max_position_embeddings": CONTEXT}).encode()
    upload(BASE, base)
    run = Run(make_adapter(base_src, staging / "adapter-run", seed=100, base_name=BASE))
    template = json.loads(run.manifest_path.read_text())
    lora = json.loads((run.adapter_dir / "adapter_config.json").read_text())

    def adapter_repo(repo: str, base_in_config: str, extra: dict | None = None,
                     chat: dict | None = None, **base_model):
        manifest = {**template, "base_model": {**template["base_model"], **base_model},
                    "chat": {**template["chat"], **(chat or {})}}
        files = {"adapter_config.json": json.dumps({**lora, "base_model_name_or_path":
                                                    base_in_config, **(extra or {})}).encode(),
                 "adapter_model.safetensors": run.adapter_dir / "adapter_model.safetensors",
                 "medchat.json": json.dumps(manifest).encode()}
        return repo, files

    code = f"\nimport pathlib\npathlib.Path({str(sentinel)!r}).write_text('remote code ran')\n"
    evil = remote_code_model(base_src, staging / "evil")
    for py in evil.glob("*.py"):
        py.write_text(py.read_text() + code)
    evil_files = {f.name: f for f in evil.iterdir() if f.is_file()}

    shard = {f.name: f for f in base_src.iterdir()
             if f.is_file() and not f.name.endswith(".safetensors")}
    save_file({"unused": torch.zeros(1)}, str(staging / "dummy.safetensors"))
    shard["dummy.safetensors"] = staging / "dummy.safetensors"
    with safe_open(str(secret / "model.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    merged_here = runs.resolve() / "test-user--shard-escape" / "merged"  # where it will land
    outside = [str(secret.resolve() / "model.safetensors"),
               os.path.relpath(secret.resolve() / "model.safetensors", merged_here)]
    shard["model.safetensors.index.json"] = json.dumps({
        "metadata": {}, "weight_map": {k: outside[i % 2] for i, k in enumerate(keys)}}).encode()

    bad_tokenizer = {**{f.name: f for f in base_src.iterdir() if f.is_file()},
                     "tokenizer.json": b'{"added_tokens": 5}'}
    bad_config = {**{f.name: f for f in base_src.iterdir() if f.is_file()},
                  "config.json": json.dumps({**config, "hidden_size": -64}).encode()}
    # the tiny model's weights under the config of a model of ~3 billion parameters (12 GB)
    huge_config = {**{f.name: f for f in base_src.iterdir() if f.is_file()},
                   "config.json": json.dumps({**config, "num_hidden_layers": 400,
                                              "intermediate_size": 40_000}).encode()}

    big = staging / "extra.safetensors"
    big.write_bytes(os.urandom(3_000_000))  # the app pulls at most 2 MB (--hub-pull-max-gb)
    repos = [
        adapter_repo(f"{DEFAULT_USER}/local-path", str(secret), name=str(secret), hub_id=None,
                     local_path=str(secret)),
        adapter_repo(f"{DEFAULT_USER}/local-path-hub", str(secret), name=str(secret),
                     hub_id=BASE, local_path=str(secret)),
        (f"{DEFAULT_USER}/remote-code", evil_files),
        (f"{DEFAULT_USER}/evil-base", evil_files),
        adapter_repo(f"{DEFAULT_USER}/on-evil-base", f"{DEFAULT_USER}/evil-base",
                     name=f"{DEFAULT_USER}/evil-base", hub_id=f"{DEFAULT_USER}/evil-base",
                     local_path=str(secret), trust_remote_code=False),
        (f"{DEFAULT_USER}/shard-escape", shard),
        adapter_repo(f"{DEFAULT_USER}/dora", BASE, extra={"use_dora": True}, name=BASE,
                     hub_id=BASE),
        adapter_repo(f"{DEFAULT_USER}/bad-template", BASE, name=BASE, hub_id=BASE,
                     chat={"template": "{% for m in messages %}{{ m.content }"}),
        adapter_repo(f"{DEFAULT_USER}/bomb-template", BASE, name=BASE, hub_id=BASE,
                     chat={"template": "{{ 'a' * 2000000000 }}"}),
        adapter_repo(f"{DEFAULT_USER}/loop-template", BASE, name=BASE, hub_id=BASE,
                     chat={"template": "{% for i in range(100000) %}{% for j in range(100000) %}"
                                       "{% endfor %}{% endfor %}"}),
        (f"{DEFAULT_USER}/bad-tokenizer", bad_tokenizer),
        (f"{DEFAULT_USER}/bad-config", bad_config),
        (f"{DEFAULT_USER}/huge-config", huge_config),
    ]
    repo, files = adapter_repo(f"{DEFAULT_USER}/too-big", BASE, name=BASE, hub_id=BASE)
    repos.append((repo, {**files, "extra.safetensors": big}))
    for repo, files in repos:
        upload(repo, files)
    return run.adapter_dir


def start_app(root: Path, runs: Path, hf_home: Path, hub: FakeHub, port: int,
              log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE", "MEDCHAT_")) and k != "SPACE_ID"}
    env.update(hub_env(hub, token=TOKEN))  # the operator's token: visitors must never see it
    env.update({"HF_HOME": str(hf_home), "MEDCHAT_CACHE": str(root / "medchat-cache"),
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                KEY_ENV: API_KEY})
    argv = [sys.executable, str(ROOT / "launch.py"), "--runs", str(runs), "--base", BASE,
            "--port", str(port), "--device", "cpu", "--concurrency", "1", "--queue-size", "1",
            "--max-message-chars", str(MAX_MESSAGE), "--max-history-chars", str(MAX_HISTORY),
            "--max-new-tokens", str(MAX_TOKENS), "--api-key-env", KEY_ENV,
            "--hub-pull-max-gb", "0.002"]
    return subprocess.Popen(argv, cwd=root, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sec-app")
    runs, hf_home, log = root / "runs", root / "hf-home", root / "server.log"
    secret = build_tiny_model(tmp_path_factory.mktemp("secret") / "model", seed=7,
                              init_std=0.1)  # other weights, other answers
    sentinel = tmp_path_factory.mktemp("sentinel") / "remote-code-ran"
    mp = pytest.MonkeyPatch()
    hub = FakeHub(tmp_path_factory.mktemp("hub-storage")).start()
    proc = None
    try:
        hub.add_user(TOKEN, "operator")  # a valid token: whoever sends it is seen by the Hub
        use_fake_hub(mp, hub, home=tmp_path_factory.mktemp("uploader-hf-home"))
        adapter_dir = hostile_repos(tmp_path_factory.mktemp("staging"), tiny_model_dir, secret,
                                    sentinel, runs)
        port = free_port()
        proc = start_app(root, runs, hf_home, hub, port, log)
        refs = {"base": reference_answer(tiny_model_dir, Q, None, N),
                "adapter": reference_answer(tiny_model_dir, Q, adapter_dir, N),
                "adapter on secret": reference_answer(secret, Q, adapter_dir, N),
                "secret": reference_answer(secret, Q, None, N)}
        w = World(f"http://127.0.0.1:{port}", proc, log, root, runs, hf_home, secret, sentinel,
                  hub, refs)
        wait_until_up(w.url + "/", proc, log, interval=0.3)
        w.before = {"ui": ui_chat(w, "base")[0], "v1": v1_chat(w, "base")[0]}
        yield w
    finally:
        if proc is not None:
            stop(proc)
        hub.stop()
        mp.undo()


@pytest.fixture(autouse=True)
def each_test_checks_its_own_responses(world):
    world.test_began = len(world.seen)


# -- what the visitor does -----------------------------------------------------------------------

def msgs(text: str = Q) -> list[dict]:
    return [{"role": "user", "content": text}]


def v1(w: World, body=None, *, content=None, key: str | None = API_KEY,
       path: str = "/v1/chat/completions", method: str = "POST", timeout: float = 60,
       sent: tuple[str, ...] = ()) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    r = httpx.request(method, w.url + path, json=body, content=content, headers=headers,
                      timeout=timeout)
    w.saw(f"{r.status_code} {dict(r.headers)} {r.text}", sent)
    return r


def v1_chat(w: World, model: str, message: str = Q,
            **fields) -> tuple[str | None, httpx.Response]:
    r = v1(w, {"model": model, "messages": msgs(message), **V1_GREEDY, **fields},
           sent=(model,))
    return (r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None), r


def ui_client(w: World):
    from gradio_client import Client

    return Client(w.url + "/", verbose=False)


def ui_chat(w: World, model: str, message: str = Q, history=(), client=None,
            **settings) -> tuple[str | None, str | None]:
    """(answer, None) or (None, the error the visitor was shown)."""
    try:
        out = (client or ui_client(w)).predict(message, list(history), model,
                                               **{**UI_GREEDY, **settings}, api_name="/chat")
    except Exception as e:  # noqa: BLE001 - what the visitor sees, whatever it is
        return None, w.saw(f"{type(e).__name__}: {e}", (model,))
    return w.saw(out), None


def openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def gradio_config(w: World) -> dict:
    r = httpx.get(w.url + "/config", timeout=10)
    w.saw(r.text)
    return r.json()


def add_from_hub(w: World, repo: str, revision: str = "") -> dict:
    """The "Add from Hub" button, driven as the page drives it (the Gradio queue's join and
    data routes): the final message, {"success": bool, "output": {...}}."""
    config = gradio_config(w)
    button = next(c["id"] for c in config["components"]
                  if c.get("props", {}).get("value") == "Add from Hub")
    dep = next(d for d in config["dependencies"] if any(t[0] == button for t in d["targets"]))
    session, auth = secrets.token_hex(8), len(w.hub.seen_auth)
    r = httpx.post(w.url + "/gradio_api/queue/join", timeout=10, json={
        "data": [repo, revision, "base", "base", "base"], "fn_index": dep["id"],
        "trigger_id": button, "session_hash": session, "event_data": None})
    w.saw(r.text, (repo,))
    assert r.status_code == 200, r.text
    event = r.json()["event_id"]
    with httpx.stream("GET", w.url + "/gradio_api/queue/data", params={"session_hash": session},
                      timeout=120) as s:
        for line in s.iter_lines():
            w.saw(line, (repo,))
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_completed" and msg.get("event_id") == event:
                assert w.hub.seen_auth[auth:] == [], "a visitor's pull sent the operator's token"
                return msg
    raise AssertionError(f"no answer to Add from Hub {repo!r}")


def added(w: World, repo: str) -> str:
    """Add a repo that must be accepted; the status line it shows."""
    msg = add_from_hub(w, repo)
    assert msg["success"], msg
    status = msg["output"]["data"][-1]
    assert status.startswith(f"Added {repo} as "), status
    return status


def refused(w: World, repo: str, revision: str = "") -> str:
    """Add a repo that must be refused; the error the visitor is shown."""
    msg = add_from_hub(w, repo, revision)
    assert not msg["success"], msg
    return str(msg["output"].get("error"))


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def hub_requests(w: World, needle: str) -> list:
    with w.hub.lock:
        return [r for r in w.hub.requests if needle in r[1]]


def measure_rate(w: World) -> float:
    """Tokens a second of one generation (to tell a cancelled generation from a finished one)."""
    if w.rate is None:
        body = {"model": "base", "messages": msgs(), "max_tokens": 200, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", w.url + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            stamps = [time.monotonic() for line in r.iter_lines() if '"content": "' in line]
        w.rate = (len(stamps) - 2) / (stamps[-1] - stamps[1])  # stamps[0]: the role chunk
    return w.rate


# -- the tests -----------------------------------------------------------------------------------

def test_before_the_attack_the_base_answers_as_transformers_does(world):
    assert world.before["ui"].strip() == world.refs["base"].strip()
    assert world.before["v1"] == world.before["ui"]
    assert world.refs["adapter on secret"] != world.refs["adapter"]  # the checks below can tell
    assert world.refs["secret"] != world.refs["base"]


def test_v1_without_the_key_is_refused_and_the_key_is_never_echoed(world):
    for key in (None, "wrong", API_KEY[:-1], API_KEY + "x", f"{API_KEY} {API_KEY}"):
        for path, method in (("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                             ("/tokenize", "POST")):
            r = v1(world, {"model": "base", "messages": msgs()}, key=key, path=path,
                   method=method)
            assert openai_error(r, 401)["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=world.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="base", messages=msgs(), max_tokens=2)
    world.saw(str(e.value))
    assert not world.leaks()


def test_path_like_repo_ids_are_refused_before_anything_is_fetched_or_written(world, tmp_path):
    before_all, before_requests = tree(world.root.parent), len(world.hub.requests)
    for repo in PATH_LIKE_REPOS:
        assert "is not a Hub repo id" in refused(world, repo), repo
        with pytest.raises(HubError, match="expected OWNER/NAME"):
            pull(repo, runs_dir=tmp_path / "runs", anonymous=True)
    for revision in ("../../main", "/etc", "main/../..", "-x", "a" * 300):
        err = refused(world, f"{DEFAULT_USER}/local-path-hub", revision)
        assert "expected a branch, tag or commit id" in err, (revision, err)
    # nothing asked of the Hub, nothing written beside or inside the runs folder
    assert len(world.hub.requests) == before_requests
    assert tree(world.root.parent) == before_all
    assert not (tmp_path / "runs").exists()
    assert not world.leaks()


def test_a_pulled_manifest_never_points_the_server_at_a_local_folder(world):
    err = refused(world, f"{DEFAULT_USER}/local-path")
    assert "is not a Hub id" in err
    assert not (world.runs / "test-user--local-path").exists()
    status = added(world, f"{DEFAULT_USER}/local-path-hub")
    assert "adapter:test-user--local-path-hub" in status
    m = Run(world.runs / "test-user--local-path-hub").manifest()
    assert m.base_model.local_path is None and m.base_model.hub_id == BASE
    assert m.source.hub_repo == f"{DEFAULT_USER}/local-path-hub"
    ui, _ = ui_chat(world, "adapter:test-user--local-path-hub")
    v1_text, _ = v1_chat(world, "adapter:test-user--local-path-hub")
    # answered on the server's own base, never on the folder the manifest named
    assert ui == v1_text == world.refs["adapter"] != world.refs["adapter on secret"]
    assert not [f for f in world.loaded() if str(world.secret) in f]
    assert not world.leaks()


def test_code_from_a_pulled_repo_never_runs(world):
    seen_auth = len(world.hub.auth_paths)  # what came before: the test's own uploads
    added(world, f"{DEFAULT_USER}/remote-code")
    added(world, f"{DEFAULT_USER}/on-evil-base")
    assert not list(world.runs.rglob("*.py"))  # code is never even downloaded into a run
    for model in ("merged:test-user--remote-code", "adapter:test-user--on-evil-base"):
        text, err = ui_chat(world, model)
        assert text is None and re.search("remote.code|custom code", err), err
        text, r = v1_chat(world, model)
        assert text is None and r.status_code in (400, 503), r.text
        assert re.search("remote.code|custom code", openai_error(r, r.status_code)["message"])
    assert not world.sentinel.exists(), "a repo's code ran on the server"
    # the pulled adapter's own base was looked up on the Hub without the operator's token
    assert hub_requests(world, f"{DEFAULT_USER}/evil-base")
    assert not [p for p in world.hub.auth_paths[seen_auth:] if f"{DEFAULT_USER}/evil-base" in p]
    assert "remote code ran" not in world.server_log()
    assert not world.leaks()


def test_a_pulled_checkpoint_index_cannot_reach_files_outside_its_folder(world):
    """The repo's model.safetensors.index.json maps its weights to the secret model's file,
    by absolute path and by '../..': refused at the pull or when asked for, never loaded."""
    msg = add_from_hub(world, f"{DEFAULT_USER}/shard-escape")
    if msg["success"]:
        text, err = ui_chat(world, "merged:test-user--shard-escape")
        assert text is None and err, f"answered with weights from outside: {text!r}"
        text, r = v1_chat(world, "merged:test-user--shard-escape")
        assert text is None and r.status_code in (400, 503), r.text
        assert "own folder" in openai_error(r, r.status_code)["message"] or r.status_code == 503
    assert world.refs["secret"] not in world.seen
    assert not [f for f in world.loaded() if "shard-escape" in f or str(world.secret) in f]
    assert not world.leaks()


def test_an_adapter_the_server_cannot_serve_is_refused_without_naming_its_folders(world):
    added(world, f"{DEFAULT_USER}/dora")
    text, err = ui_chat(world, "adapter:test-user--dora")
    assert text is None and "use_dora" in err, err
    text, r = v1_chat(world, "adapter:test-user--dora")
    assert text is None and "use_dora" in openai_error(r, 400)["message"]
    assert not world.leaks()


def test_a_pulled_model_with_broken_files_is_refused_clearly(world):
    for model, what in (("merged:test-user--bad-tokenizer", "cannot load the tokenizer"),
                        ("merged:test-user--bad-config", "cannot load the model"),
                        ("merged:test-user--huge-config", "weight files hold")):
        added(world, f"{DEFAULT_USER}/{model.split('--')[1]}")
        text, err = ui_chat(world, model)
        assert text is None and what in err, err
        text, r = v1_chat(world, model)
        assert text is None and what in openai_error(r, 400)["message"]
        r = v1(world, {"model": model, "messages": msgs()}, path="/tokenize")
        assert r.status_code == 200 or what in openai_error(r, 400)["message"]
    # a chat template that does not compile: the UI shows the error, /v1 an OpenAI-shaped one
    # (500: the engine does not tell a broken template from a failure of its own)
    added(world, f"{DEFAULT_USER}/bad-template")
    text, err = ui_chat(world, "adapter:test-user--bad-template")
    assert text is None and err
    text, r = v1_chat(world, "adapter:test-user--bad-template")
    assert text is None and r.status_code in (400, 500), r.text
    openai_error(r, r.status_code)
    r = v1(world, {"model": "adapter:test-user--bad-template", "messages": msgs()},
           path="/tokenize")
    openai_error(r, r.status_code)
    assert r.status_code in (400, 500)
    assert world.proc.poll() is None
    assert not world.leaks()


def test_a_pulled_template_cannot_exhaust_the_server(world):
    """A pulled run's chat template is someone else's program: one that writes 2 GB or loops
    for ever renders in a worker process with a memory cap and a deadline, so the request is
    refused clearly while the server's memory stays put and other requests are answered."""
    import psutil

    server = psutil.Process(world.proc.pid)
    rss = server.memory_info().rss
    for repo, says in (("bomb-template", "memory"), ("loop-template", "took more than")):
        added(world, f"{DEFAULT_USER}/{repo}")
        model = f"adapter:test-user--{repo}"
        t0 = time.monotonic()
        text, err = ui_chat(world, model)
        assert text is None and says in err, err
        text, r = v1_chat(world, model)
        assert text is None and says in openai_error(r, r.status_code)["message"]
        assert time.monotonic() - t0 < 60
    assert server.memory_info().rss < rss + 500 * 2**20  # never the 2 GB
    assert ui_chat(world, "base")[0] == world.before["ui"]
    assert world.proc.poll() is None
    assert not world.leaks()


def test_a_repo_over_the_size_cap_is_refused_before_any_download(world):
    err = refused(world, f"{DEFAULT_USER}/too-big")
    assert "over the limit of 2.0 MB" in err, err
    assert not hub_requests(world, "too-big/resolve")
    assert not (world.runs / "test-user--too-big").exists()
    assert not world.leaks()


def test_oversized_inputs_are_refused_clearly_and_load_nothing(world):
    loaded = world.loaded()
    history = [{"role": "user", "content": "x" * 3000},
               {"role": "assistant", "content": "y" * 1500}]
    many = [m for _ in range(101) for m in ({"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a"})]
    cases = [  # (body, status, param)
        ({"model": "base", "messages": msgs("x" * (MAX_MESSAGE + 1))}, 400, "messages"),
        ({"model": "base", "messages": history + msgs()}, 400, "messages"),
        ({"model": "base", "messages": many + msgs()}, 400, "messages"),
        ({"model": "base", "messages": [{"role": "system", "content": "s" * 4001}] + msgs()},
         400, "messages"),
        ({"model": "base", "messages": msgs(), "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens"),
        ({"model": "base", "messages": msgs(), "max_tokens": 10 ** 12}, 400, "max_tokens"),
        ({"model": "base", "messages": msgs(), "max_completion_tokens": -5}, 400, "max_tokens"),
        ({"model": "base", "messages": msgs(), "stop": ["s"] * 10_000}, 400, "stop"),
        ({"model": "base", "messages": msgs(), "stop": ["s" * 1000]}, 400, "stop"),
        ({"model": "base", "messages": msgs(), "temperature": float("inf")}, 400,
         "temperature"),
        ({"model": "base", "messages": [{"role": "user", "content": [{"type": "text",
                                                                     "text": "x"}] * 3000}]},
         400, "messages"),
    ]
    for body, status, param in cases:
        r = v1(world, content=json.dumps(body).encode())  # json.dumps writes inf as Infinity
        err = openai_error(r, status, param)
        assert err["code"] in ("limit_exceeded", "invalid_value", "invalid_type"), err
    r = v1(world, content=json.dumps({"model": "base", "messages": msgs("x" * 5_000_000)}))
    assert openai_error(r, 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(100):
            yield b" " * 100_000

    r = httpx.post(world.url + "/v1/chat/completions", content=chunks(), timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    world.saw(r.text)
    assert openai_error(r, 413)["code"] == "request_too_large"
    for raw in (b"[" * 50_000 + b"]" * 50_000, b"{\"model\": " * 10_000, b"\xff\xfe{}",
                b"[]", b"null", b"{\"model\": \"base\", \"messages\": NaN}"):
        openai_error(v1(world, content=raw), 400)

    c = ui_client(world)
    log_before = len(world.server_log())
    for kwargs, field_name in (
            (dict(message="x" * (MAX_MESSAGE + 1)), "message"),
            (dict(message="x" * 1_000_000), "message"),
            (dict(history=history), "history"),
            (dict(history=many), "history"),
            (dict(system_prompt="s" * 4001), "system prompt"),
            (dict(max_new_tokens=MAX_TOKENS + 1), "max_new_tokens"),
            (dict(max_new_tokens=10 ** 12), "max_new_tokens")):
        text, err = ui_chat(world, "base", client=c, **kwargs)
        assert text is None and field_name in err, (kwargs.keys(), err)
    # the server's log: one line per refusal, no traceback a visitor could multiply
    refusals = world.server_log()[log_before:]
    assert "Traceback" not in refusals, refusals[:2000]
    assert refusals.count("told a visitor:") >= 7, refusals[:2000]
    assert max(map(len, refusals.splitlines())) < 600  # the million-character message: cut
    assert world.loaded() == loaded
    assert world.proc.poll() is None
    assert not world.leaks()


def test_unknown_and_path_like_model_names_are_refused_and_load_nothing(world):
    loaded = world.loaded()
    names = ["../../etc/passwd", "/etc/passwd", str(world.secret), str(world.secret) + "/",
             str(world.runs / "test-user--local-path-hub" / "adapter"),
             str(world.runs / "test-user--local-path-hub"), "runs/test-user--local-path-hub",
             "adapter:../test-user--local-path-hub", "adapter:test-user--local-path-hub/..",
             "merged:/etc", "merged:" + str(world.secret), "adapter:%2e%2e%2fx",
             "file:///etc/passwd", BASE, "base/../base", " base", "BASE", "adapter:",
             "adapter:test-user--too-big", "merged:test-user--local-path-hub", "\u0000base"]
    for name in names:
        text, r = v1_chat(world, name)
        assert text is None and openai_error(r, 404, "model")["code"] == "model_not_found"
        r = v1(world, method="GET", path="/v1/models/" + quote(name, safe=""), sent=(name,))
        assert r.status_code == 404, (name, r.text)
        r = v1(world, {"model": name, "messages": msgs()}, path="/tokenize", sent=(name,))
        assert r.status_code == 404, (name, r.text)
        text, err = ui_chat(world, name)
        assert text is None and "not registered" in err, (name, err)
    assert world.loaded() == loaded
    assert not world.leaks()


def test_gradio_file_routes_serve_nothing_of_the_server(world):
    targets = [world.runs / "test-user--local-path-hub" / "medchat.json",
               world.secret / "config.json", world.log, Path("/etc/passwd")]
    paths = [str(t) for t in targets] + [
        "runs/test-user--local-path-hub/medchat.json", "server.log", "../../../../etc/passwd",
        "..%2F..%2F..%2Fetc%2Fpasswd"]
    for p in paths:
        for route in (f"/gradio_api/file={p}", f"/file={p}"):
            r = httpx.get(world.url + route, timeout=10)
            world.saw(f"{r.status_code} {r.text}", (p,))
            assert r.status_code in (403, 404, 400, 405), (route, r.status_code, r.text[:200])
    assert not world.leaks()


def _refusal(result) -> bool:
    kind, status, text = result
    return (status == 429 and "busy" in text) if kind == "v1" else (
        status is None and ("busy" in text.lower() or "full" in text.lower()))


def test_a_flood_is_told_busy_at_once_and_a_client_that_leaves_frees_its_slot(world):
    """One generation at a time and one waiting: of a flood beside a long streamed answer, one
    request waits and every other one is refused at once (429 on /v1, "busy" in the UI). The
    streaming client then disconnects after a few chunks: its generation is cancelled, so the
    waiting request is answered long before that generation would have ended."""
    rate, total = measure_rate(world), MAX_TOKENS
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "base", "messages": msgs(), "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True}

    def post(i: int):
        t0 = time.monotonic()
        r = httpx.post(world.url + "/v1/chat/completions", headers=headers, timeout=120,
                       json={"model": "base", "messages": msgs(), "max_tokens": 2,
                             "temperature": 0})
        world.saw(f"{r.status_code} {dict(r.headers)} {r.text}")
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            openai_error(r, 429)
        return "v1", r.status_code, r.text, time.monotonic() - t0

    def ui(i: int):
        t0 = time.monotonic()
        text, err = ui_chat(world, "base", max_new_tokens=2)
        return "ui", None if err else 200, err or text, time.monotonic() - t0

    pool = ThreadPoolExecutor(16)
    try:
        with httpx.stream("POST", world.url + "/v1/chat/completions", json=body,
                          headers=headers, timeout=120) as holder:
            assert holder.status_code == 200
            got, lines = 0, holder.iter_lines()  # kept: a dropped iterator closes the stream
            for line in lines:
                world.saw(line)
                if '"content": "' in line:
                    got += 1
                    if got == 1:
                        t_first = time.monotonic()
                    if got >= 5:
                        break
            futures = [pool.submit(post, i) for i in range(10)] + \
                      [pool.submit(ui, i) for i in range(4)]
            deadline = time.monotonic() + 20
            while sum(f.done() for f in futures) < len(futures) - 1 \
                    and time.monotonic() < deadline:
                wait(futures, timeout=0.1, return_when=FIRST_EXCEPTION)
            done = [f.result() for f in futures if f.done()]
            pending = [f for f in futures if not f.done()]
            summary = [(d[0], d[1], d[2][:150], round(d[3], 2)) for d in done]
            assert len(done) == len(futures) - 1 and len(pending) == 1, summary
            assert all(_refusal(d[:3]) for d in done), summary
            assert max(d[3] for d in done if d[0] == "v1") < 10  # told at once, not queued
            t_close = time.monotonic()
        # the stream is closed: the client is gone
        left = total / rate - (t_close - t_first)  # what the holder had left, not cancelled
        assert left > 2.0, f"the generation is too fast to tell ({rate:.0f} tokens/s)"
        kind, status, text, _ = pending[0].result(timeout=left / 2)
        waited = time.monotonic() - t_close
        assert status == 200, text
        assert waited < left / 2, (waited, left)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    assert world.proc.poll() is None
    assert not world.leaks()


def test_a_cancelled_ui_job_stops_its_generation_and_nobody_else_can_stop_it(world):
    rate, total = measure_rate(world), MAX_TOKENS
    a, b = ui_client(world), ui_client(world)
    job = a.submit(Q, [], "base", **{**UI_GREEDY, "max_new_tokens": MAX_TOKENS},
                   api_name="/chat")
    while len(job.outputs()) < 3:
        assert not job.done(), job.result()
        time.sleep(0.01)
    t_first = time.monotonic()
    assert b.predict(api_name="/stop") == 0  # another visitor's Stop stops only its own
    n = len(job.outputs())
    time.sleep(0.3)
    assert len(job.outputs()) > n and not job.done()
    job.cancel()
    t_cancel = time.monotonic()
    left = total / rate - (t_cancel - t_first)  # what the job had left, were it not cancelled
    assert left > 2.0, f"the generation is too fast to tell ({rate:.0f} tokens/s)"
    r = v1(world, {"model": "base", "messages": msgs(), "max_tokens": 2, "temperature": 0},
           timeout=left / 2)  # needs the one generation slot
    waited = time.monotonic() - t_cancel
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert waited < left / 2, (waited, left)
    world.saw(job.outputs()[-1] if job.outputs() else "")
    assert not world.leaks()


def test_after_the_attack_the_server_is_up_answers_as_before_and_leaked_nothing(world):
    assert world.proc.poll() is None, world.server_log()[-3000:]
    assert ui_chat(world, "base")[0] == world.before["ui"]
    assert v1_chat(world, "base")[0] == world.before["v1"]
    client = openai.OpenAI(base_url=world.url + "/v1", api_key=API_KEY, max_retries=0)
    got = client.chat.completions.create(model="base", messages=msgs(), max_tokens=N,
                                         temperature=0, top_p=1,
                                         extra_body={"repetition_penalty": 1.0})
    assert world.saw(got.choices[0].message.content) == world.before["v1"]
    if (world.runs / "test-user--local-path-hub").is_dir():  # pulled by a test above
        assert v1_chat(world, "adapter:test-user--local-path-hub")[0] == world.refs["adapter"]
    ids = [m.id for m in client.models.list().data]
    world.saw(ids)
    assert ids[0] == "base"
    assert not world.sentinel.exists()
    for folder in world.loaded():  # only the base (from the Hub cache) and runs folders
        assert Path(folder).is_relative_to(world.hf_home) or \
            Path(folder).is_relative_to(world.runs.resolve()), folder
        assert str(world.secret) not in folder
    log = world.server_log()
    assert TOKEN not in log and API_KEY not in log
    # every response the visitor saw, from every test
    leaks = world.leaks(since=0)
    assert not leaks, "\n".join(leaks[:20])
