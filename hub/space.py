"""Bundle the chat app as a Hugging Face Space and push it, in one commit.

    medchat deploy-space OWNER/NAME --models owner/a,owner/b [--base HUB_ID]
                         [--hardware cpu-basic] [--private] [--dry-run] [--output DIR]

The bundle is what the Space runs, nothing more:

    README.md          Space front matter (sdk: gradio, sdk_version = the installed Gradio,
                       app_file: launch.py, python_version, models, short_description,
                       suggested_hardware) and a short description
    requirements.txt   the project's runtime dependencies without training-only packages
                       (Gradio itself comes from sdk_version)
    space_config.json  {"base_model": "<hub id>", "models": ["owner/repo", ...]}
    launch.py          the app entry; on start it pulls each model (hub.pull) and serves them
    medchat/ hub/ ...  the modules `python launch.py` imports, found by reading the imports
                       from launch.py on (at top level and inside functions); the training
                       stages and the command table are not among them

--base defaults to the base model named by the first adapter's manifest on the Hub.
--dry-run writes the bundle (to --output, else a temporary folder) and lists it, without
pushing. The token comes from HF_TOKEN or the stored login, as for `medchat push`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub loads SpaceCardData & co. (and its HTTP stack) on first attribute use, so
# importing this module stays cheap for the CLI.
import huggingface_hub

from hub.client import (HubError, PlannedFile, commit_files, connect, human_size, hub_endpoint,
                        require_repo_id)
from hub.local_paths import machine_paths, public_file
from medchat.base_model import DEFAULT_BASE_MODEL, looks_like_repo_id
from medchat.run_folder import MANIFEST_NAME, atomic_write_text, staged_dir

try:
    import tomllib  # Python >= 3.11
except ImportError:  # pragma: no cover - 3.10 reads the installed metadata instead
    tomllib = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
APP_FILE = "launch.py"
# The project's own top-level modules and packages: imports of these are followed into the
# bundle (only as far as launch.py's imports reach), everything else is a third-party import.
LOCAL_ROOTS = ("medchat", "hub", "training", "launch")
# Needed to train, not to chat; canonical (PEP 503) names.
TRAINING_ONLY = {"bitsandbytes", "deepspeed", "tensorboard", "datasets", "openpyxl", "sacrebleu",
                 "rouge-score", "gguf", "pytest", "pytest-timeout", "playwright"}
PROVIDED_BY_SDK = {"gradio", "gradio-client"}  # the Space installs gradio==sdk_version
SHORT_DESCRIPTION = "Chat with medication-QA fine-tuned models"  # the Hub allows 60 characters
DEFAULT_HARDWARE = "cpu-basic"


@dataclass
class Bundle:
    folder: Path
    files: list[Path]  # relative to folder
    base_model: str
    models: list[str]

    def describe(self) -> str:
        width = max(len(str(f)) for f in self.files)
        lines = [f"{str(f):<{width}}  {human_size((self.folder / f).stat().st_size):>9}"
                 for f in self.files]
        total = sum((self.folder / f).stat().st_size for f in self.files)
        return "\n".join(lines + [f"{len(self.files)} files, {human_size(total)} in total"])


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------
# Which code goes in


def _module_path(module: str, root: Path = ROOT) -> Path | None:
    parts = module.split(".")
    if parts[0] not in LOCAL_ROOTS:
        return None
    as_file = root.joinpath(*parts).with_suffix(".py")
    if as_file.is_file():
        return as_file
    as_pkg = root.joinpath(*parts) / "__init__.py"
    return as_pkg if as_pkg.is_file() else None


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, at top level or inside functions (lazy imports count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = list(path.relative_to(root).parts[:-1])  # for relative imports
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            for alias in node.names:  # `from medchat import app` imports a module
                if _module_path(f"{mod}.{alias.name}", root):
                    found.add(f"{mod}.{alias.name}")
    return {m for m in found if m}


def app_files(root: Path = ROOT) -> list[Path]:
    """launch.py and every first-party module it imports, transitively (with the packages above
    them), as paths relative to `root`: what `python launch.py` needs, and nothing else."""
    todo = [root / APP_FILE]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for mod in imported_modules(path, root):
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):  # the module and every package above it
                p = _module_path(".".join(parts[:i]), root)
                if p is not None and p not in seen:
                    todo.append(p)
    return sorted(p.relative_to(root) for p in seen)


def third_party_imports(files: list[Path], root: Path = ROOT) -> set[str]:
    """Top-level names of the non-local, non-stdlib modules the bundled code imports."""
    names = set()
    for f in files:
        if Path(f).suffix != ".py":
            continue
        for mod in imported_modules(root / f, root):
            top = mod.split(".")[0]
            if top not in LOCAL_ROOTS and top not in sys.stdlib_module_names:
                names.add(top)
    return names


# ---------------------------------------------------------------------------------------------
# Requirements and front matter


def declared_dependencies(root: Path = ROOT) -> list[str]:
    """The project's runtime requirements (pyproject.toml, else the installed metadata)."""
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and tomllib is not None:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        return list(data.get("project", {}).get("dependencies", []))
    from importlib import metadata

    try:
        reqs = metadata.requires("medchat") or []
    except metadata.PackageNotFoundError as e:
        raise HubError(f"cannot find the project's dependencies: no {pyproject} and medchat is "
                       "not installed; run deploy-space from the repository checkout") from e
    return [r for r in reqs if "extra ==" not in r]


def requirement_name(req: str) -> str:
    return canonical(re.split(r"[\s\[<>=!~;@]", req.strip(), maxsplit=1)[0])


def space_requirements(root: Path = ROOT) -> list[str]:
    return [r for r in declared_dependencies(root)
            if requirement_name(r) not in TRAINING_ONLY | PROVIDED_BY_SDK]


def _gradio_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("gradio")
    except metadata.PackageNotFoundError as e:
        raise HubError("gradio is not installed here; the Space's sdk_version is the installed "
                       "Gradio (the one the app was tested with): pip install gradio") from e


def space_readme(repo_id: str, models: list[str], base_model: str, hardware: str) -> str:
    title = repo_id.split("/")[-1].replace("-", " ").replace("_", " ").strip() or "medchat"
    data = huggingface_hub.SpaceCardData(
        title=title, emoji="💊", colorFrom="blue", colorTo="green", sdk="gradio",
        sdk_version=_gradio_version(), app_file=APP_FILE,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        models=list(dict.fromkeys([base_model, *models])), short_description=SHORT_DESCRIPTION,
        suggested_hardware=hardware, pinned=False, tags=["medchat", "medical", "chat"])
    listing = "\n".join(f"- [{m}](https://huggingface.co/{m})" for m in models)
    body = f"""
# {title}

A streaming chat over a base model and its fine-tuned versions, built with medchat: pick a
model, ask a question about a medication, compare answers side by side.

Base model: [{base_model}](https://huggingface.co/{base_model})

Fine-tuned models served here (pulled from the Hub when the Space starts, see
`space_config.json`):

{listing}

**Not medical advice.** The answers come from small language models fine-tuned on consumer
medication questions; they can be wrong or out of date. Ask a doctor or pharmacist.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _check_hardware(hardware: str) -> str:
    known = [h.value for h in huggingface_hub.SpaceHardware]
    if hardware not in known:
        raise HubError(f"--hardware {hardware!r}: not a Space hardware; one of {', '.join(known)}")
    return hardware


def detect_base_model(models: list[str], token: str | None = None) -> str | None:
    """The base model named by the first adapter among `models` (its medchat.json or
    adapter_config.json on the Hub); None when none says or the Hub cannot be reached.

    One plain GET per file, no retries: this only picks a default, and an unreachable Hub
    should not cost minutes of backoff (the push itself retries)."""
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers(token=token)
    for repo in models:
        for name in (MANIFEST_NAME, "adapter_config.json"):
            try:
                r = huggingface_hub.get_session().get(
                    huggingface_hub.hf_hub_url(repo, name, endpoint=hub_endpoint()),
                                      headers=headers, timeout=10, follow_redirects=True)
            except Exception:  # noqa: BLE001 - offline, DNS, refused...: no default to find
                return None
            if r.status_code != 200:
                continue  # not there (or not visible): try the next file / model
            try:
                data = r.json()
            except ValueError:
                continue
            if name == MANIFEST_NAME:
                if data.get("kind") == "merged":
                    break  # a full model says nothing about the base to keep in memory
                base = data.get("base_model") or {}
                candidate = (base.get("hub_id") or base.get("name")) if isinstance(base, dict) \
                    else base
            else:
                candidate = data.get("base_model_name_or_path")
            if looks_like_repo_id(candidate):
                return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Build and push


def parse_models(models: str | list[str]) -> list[str]:
    items = models.split(",") if isinstance(models, str) else list(models)
    items = [m.strip() for m in items if m and m.strip()]
    bad = [m for m in items if not looks_like_repo_id(m)]
    if bad or not items:
        raise HubError(f"--models: expected comma-separated OWNER/NAME model repos, got "
                       f"{', '.join(bad) if bad else 'nothing'}")
    return list(dict.fromkeys(items))


def build_bundle(output: str | os.PathLike, repo_id: str, models: list[str], base_model: str,
                 hardware: str = DEFAULT_HARDWARE, root: Path = ROOT,
                 overwrite: bool = True) -> Bundle:
    """Write the Space bundle into `output` (temporary folder, renamed when complete)."""
    require_repo_id(repo_id, "Space id", "your-name/medchat-demo")
    if not looks_like_repo_id(base_model):
        raise HubError(f"--base {base_model!r}: a Space downloads its base model, so it must be "
                       "a Hub id (OWNER/NAME), not a local folder")
    hardware = _check_hardware(hardware)
    if not (root / APP_FILE).is_file():
        raise HubError(f"{root / APP_FILE}: missing; run deploy-space from the medchat checkout")
    code = app_files(root)
    with staged_dir(Path(output), overwrite=overwrite) as tmp:
        for rel in code:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, tmp / rel)
        reqs = space_requirements(root)
        atomic_write_text(tmp / "requirements.txt", (
            "# Runtime dependencies of the medchat app (written by `medchat deploy-space`).\n"
            "# Training-only packages are left out; gradio comes from sdk_version in README.md.\n"
            + "\n".join(reqs) + "\n"))
        atomic_write_text(tmp / "space_config.json", json.dumps(
            {"base_model": base_model, "models": models}, indent=2) + "\n")
        atomic_write_text(tmp / "README.md", space_readme(repo_id, models, base_model, hardware))
        files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
    return Bundle(Path(output), files, base_model, models)


def deploy_space(repo_id: str, models: str | list[str], base_model: str | None = None,
                 hardware: str = DEFAULT_HARDWARE, private: bool = False, dry_run: bool = False,
                 output: str | os.PathLike | None = None, token: str | None = None,
                 commit_message: str | None = None) -> tuple[Bundle, str | None]:
    """Build the bundle and (unless dry_run) push it to the Space; (bundle, commit url)."""
    model_list = parse_models(models)
    client = user = None
    if not dry_run:
        client, user = connect(token)
    base = base_model or detect_base_model(model_list, token)
    if base is None:
        base = DEFAULT_BASE_MODEL
        print(f"note: no adapter among {', '.join(model_list)} names its base model on the Hub "
              f"(or the Hub is unreachable); using {base}. Pass --base to choose",
              file=sys.stderr)
    keep = output is not None
    folder = Path(output) if keep else Path(tempfile.mkdtemp(prefix="medchat-space-")) / "bundle"
    try:
        bundle = build_bundle(folder, repo_id, model_list, base, hardware)
        if dry_run:
            return bundle, None
        files = [PlannedFile(f.as_posix(), (folder / f).stat().st_size, source=folder / f)
                 for f in bundle.files]
        # no local path goes up (in code, whose docstrings show example paths: this machine's)
        files = [public_file(f, machine_paths(), generic=not f.path_in_repo.endswith(".py"))
                 for f in files]
        url, _, _ = commit_files(client, repo_id, files, repo_type="space", private=private,
                                 space_sdk="gradio", user=user, commit_message=commit_message or
                                 f"medchat: Space serving {', '.join(model_list)}")
        return bundle, url
    finally:
        if not keep and not dry_run:
            shutil.rmtree(folder.parent, ignore_errors=True)


def deploy_space_command(repo: str, *, models: str, base: str | None = None,
                         hardware: str = DEFAULT_HARDWARE, private: bool = False,
                         dry_run: bool = False, output: str | None = None,
                         commit_message: str | None = None) -> int:
    """Bundle the chat app as a Hugging Face Space and push it, in one commit.

    The bundle holds launch.py and the modules it imports, requirements.txt (the runtime
    dependencies without training-only packages), space_config.json (the base model and the
    model repos the Space pulls at start) and a README.md with the Space front matter. The
    token comes from HF_TOKEN or the stored login, as for `medchat push`.

    Args:
        repo: Space repo, OWNER/NAME
        models: comma-separated model repos to serve
        base: base model Hub id (default: from the models)
        hardware: suggested_hardware in the front matter; request it in the Space settings
        private: create the Space as private
        dry_run: write and list the bundle; no push
        output: where to write the bundle (kept)
        commit_message: commit message (default: names the models)
    """
    bundle, url = deploy_space(repo, models, base, hardware, private, dry_run, output,
                               commit_message=commit_message)
    where = f"bundle in {bundle.folder}"
    if url is None:
        print(f"dry run: {where} (base {bundle.base_model}); not pushed\n{bundle.describe()}")
    else:
        kept = f"; {where}" if output else ""
        print(f"Space {repo} updated ({len(bundle.files)} files{kept})\n{url}")
    return 0
