"""Merge a LoRA adapter into its unquantised base, tensor by tensor, into sharded safetensors.

    medchat merge RUN                       # the run's adapter -> the run's merged model
    medchat merge --base X --adapter Y --output Z
    options: --max-shard-size 2GB  --dtype auto|float32|bfloat16|float16  --overwrite
             --check-prompts 3 (0 skips the fidelity check)  --check-tokens 16

`merge_run(run)` is the run-level merge as a function (the command and the GPU benchmark use
it); `merge(base, adapter, output)` works on any three folders.

The base is read one tensor at a time (safetensors `pread` backend, so the file is not mapped
whole into memory); each LoRA delta, (B @ A) * scaling as peft computes it, is added in float32
and only one output shard is held in memory before it is written. Peak memory is therefore
about the largest output shard plus the adapter, not the whole model.

The output (config, generation config, tokenizer with the run's chat template, shards and
`model.safetensors.index.json`) loads with `AutoModelForCausalLM.from_pretrained` alone. It is
written to a temporary sibling folder and renamed at the end; a failure leaves nothing behind.

After writing, a fidelity check compares base+adapter (peft, unmerged) with the merged model
on a few test prompts: max |logit difference| and whether greedy outputs agree. The numbers are
printed and, for a run folder, stored in the manifest's `merge` section.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from medchat.adapter_support import BASE_CHANGING_INITS, UNSUPPORTED_OPTIONS, VARIANT_INITS
from medchat.base_model import resolve_base_model, resolve_ref
from medchat.chat_format import prompt_ids
from medchat.errors import UserError
from medchat.run_folder import ManifestError, Run, TrainingRecord, atomic_write_text, staged_dir

# torch, safetensors, transformers and peft are imported in functions: the command line imports
# this module for merge's parser, and the streaming merge itself needs no transformers model
# (importing peft alone costs ~175 MB resident, more than merging a small model).

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."
# Files of a model folder that are not copied: weights (rewritten) and other weight formats.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")
OUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
# safetensors dtype tags -> bytes per element (enough to plan shard sizes before reading data).
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
# LoRA options whose merge is not W + scaling * B @ A on the stored base, and initialisations
# that also rewrote the base weights: one list with chat (medchat.adapter_support).
FALLBACK_PROMPTS = [
    "What is aspirin used for?",
    "Can I take ibuprofen with food?",
    "What are the common side effects of metformin?",
]


class MergeError(UserError, ValueError):
    """Bad merge input (adapter, base, output): the message says what, where and what to do."""


# ---------------------------------------------------------------------------------------------
# Reading the adapter


@dataclass
class LoraDelta:
    """One LoRA pair on a base weight: delta = transpose?(B @ A) * scaling (peft's rule)."""

    module: str
    A: Any
    B: Any
    scaling: float
    embedding: bool = False  # peft stores embedding LoRA transposed: delta = (B @ A).T
    fan_in_fan_out: bool = False  # Conv1D-style weights stored (in, out): delta transposed
    bias: Any = None  # lora_bias=True: lora_B.bias * scaling is added to the base bias

    def weight_shape(self) -> tuple[int, int]:
        out_dim, in_dim = self.B.shape[0], self.A.shape[1]
        return (in_dim, out_dim) if (self.embedding or self.fan_in_fan_out) else (out_dim, in_dim)

    def delta(self):
        d = self.B.float() @ self.A.float()
        if self.embedding or self.fan_in_fan_out:
            d = d.T
        return d * self.scaling


@dataclass
class AdapterPlan:
    """What the adapter does to each base tensor (names as in the base's safetensors)."""

    folder: Path
    config: dict[str, Any]  # adapter_config.json
    deltas: dict[str, LoraDelta] = field(default_factory=dict)  # weight name -> LoRA pair
    bias_deltas: dict[str, LoraDelta] = field(default_factory=dict)  # bias name -> pair
    replace: dict[str, Any] = field(default_factory=dict)  # full tensors (modules_to_save...)
    token_rows: dict[str, tuple[list[int], Any]] = field(default_factory=dict)  # trainable tokens

    def touched(self) -> set[str]:
        return set(self.deltas) | set(self.bias_deltas) | set(self.replace) | set(self.token_rows)

    def describe(self) -> dict[str, int]:
        return {"lora_weights": len(self.deltas), "lora_biases": len(self.bias_deltas),
                "full_tensors": len(self.replace), "trainable_token_tensors": len(self.token_rows)}


def _pattern_value(patterns: dict | None, module: str, default):
    """rank_pattern/alpha_pattern lookup for one module name: the first key that matches the
    end of the module path, as peft.utils.other.get_pattern_key does (same regex)."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _check_supported(cfg: dict[str, Any], where: Path) -> None:
    peft_type = str(cfg.get("peft_type") or "").split(".")[-1].upper()
    if peft_type != "LORA":
        raise MergeError(f"{where}: peft_type is {peft_type or 'missing'}; only LoRA adapters can "
                         "be merged into base weights")
    for option, what in UNSUPPORTED_OPTIONS.items():
        if cfg.get(option):
            raise MergeError(f"{where}: {option} is set ({what}); the streaming merge supports "
                             "plain LoRA only. Merge this adapter with peft's merge_and_unload() "
                             "instead")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in VARIANT_INITS:
        raise MergeError(f"{where}: init_lora_weights={init!r} ({VARIANT_INITS[init.lower()]}); "
                         "the streaming merge supports plain LoRA only. Merge this adapter with "
                         "peft's merge_and_unload() instead")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise MergeError(f"{where}: init_lora_weights={init!r} also changed the base weights "
                         "during training, so this adapter does not apply to the original base. "
                         "Re-save it with peft's path_initial_model_for_weight_conversion, then "
                         "merge")


def load_adapter(adapter_dir: str | os.PathLike) -> AdapterPlan:
    """Read adapter_config.json + adapter_model.safetensors into per-base-tensor changes.

    The config is read as JSON rather than through peft: importing peft pulls in most of
    transformers (~175 MB resident), more than the merge itself needs for a small model."""
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not folder.is_dir():
        raise MergeError(f"{folder}: adapter folder not found; train a run first "
                         "(`medchat train`) or pass --adapter FOLDER")
    if not cfg_path.is_file():
        raise MergeError(f"{cfg_path}: missing; an adapter folder needs adapter_config.json "
                         "(written by peft's save_pretrained)")
    if not weights.is_file():
        alt = " (found adapter_model.bin: re-save it with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise MergeError(f"{weights}: missing{alt}; the adapter weights must be safetensors")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MergeError(f"{cfg_path}: line {e.lineno}: invalid JSON ({e.msg}); re-save the "
                         "adapter with peft") from e
    if not isinstance(cfg, dict) or "r" not in cfg or "lora_alpha" not in cfg:
        raise MergeError(f"{cfg_path}: not a LoRA adapter config (needs r and lora_alpha)")
    _check_supported(cfg, cfg_path)
    try:
        tensors = load_file(str(weights))  # adapters are small: read whole
    except Exception as e:
        raise MergeError(f"{weights}: not a readable safetensors file ({e}); "
                         "re-save the adapter") from e

    plan = AdapterPlan(folder=folder, config=cfg)
    pairs: dict[str, dict[str, Any]] = {}
    tokens: dict[str, Any] = {}
    for key, t in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                             (".lora_B.bias", "bias"), (".lora_embedding_A", "eA"),
                             (".lora_embedding_B", "eB")):
            if name.endswith(suffix):
                pairs.setdefault(name[:-len(suffix)], {})[part] = t
                break
        else:
            if name.endswith(".token_adapter.trainable_tokens_delta"):
                tokens[name[:-len(".token_adapter.trainable_tokens_delta")]] = t
            elif ".lora_" in name:
                raise MergeError(f"{weights}: tensor {key!r} is a LoRA part this merge does not "
                                 "know (DoRA magnitude or a newer variant); merge with peft "
                                 "instead")
            else:  # a full tensor: modules_to_save, bias="all", or a saved embedding base layer
                plan.replace[name.replace(".base_layer.", ".")] = t

    for module, parts in pairs.items():
        embedding = "eA" in parts or "eB" in parts
        A, B = (parts.get("eA"), parts.get("eB")) if embedding else (parts.get("A"), parts.get("B"))
        if A is None or B is None:
            raise MergeError(f"{weights}: {module} has only one of lora_A/lora_B; the adapter "
                             "file is incomplete, re-save it")
        if A.ndim != 2 or B.ndim != 2:
            raise MergeError(f"{weights}: {module} is a LoRA on a {A.ndim}-d (convolution) weight; "
                             "only linear and embedding layers are supported")
        r = A.shape[0]
        r_cfg = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        if r != r_cfg or B.shape[1] != r:
            raise MergeError(f"{weights}: {module} has rank {r} (B: {tuple(B.shape)}) but "
                             f"{cfg_path.name} says r={r_cfg}; adapter config and weights disagree")
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        d = LoraDelta(module, A, B, scaling, embedding=embedding,
                      fan_in_fan_out=bool(cfg.get("fan_in_fan_out")) and not embedding,
                      bias=parts.get("bias"))
        plan.deltas[f"{module}.weight"] = d
        if d.bias is not None:
            plan.bias_deltas[f"{module}.bias"] = d

    if tokens:
        indices_cfg = cfg.get("trainable_token_indices")
        for module, values in tokens.items():
            if isinstance(indices_cfg, dict):
                key = next((k for k in indices_cfg
                            if module == k or module.endswith("." + k)), None)
                indices = indices_cfg.get(key) if key else None
            else:
                indices = indices_cfg
            if not indices or len(indices) != values.shape[0]:
                raise MergeError(f"{cfg_path}: trainable_token_indices does not give the "
                                 f"{values.shape[0]} token rows stored for {module}")
            plan.token_rows[f"{module}.weight"] = (list(indices), values)
    if not plan.touched():
        raise MergeError(f"{weights}: holds no LoRA or trained tensors; nothing to merge")
    return plan


# ---------------------------------------------------------------------------------------------
# Reading the base


@dataclass
class TensorSpec:
    """One output tensor: where its base values come from and its output shape/dtype."""

    name: str
    file: Path
    stored_name: str  # differs from `name` for an untied lm_head read from the embeddings
    shape: tuple[int, ...]
    tag: str  # safetensors dtype tag of the output

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_ITEMSIZE[self.tag]


@dataclass
class BaseModel:
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorSpec]  # stored tensors in file order
    tied: dict[str, str]  # tied name (not stored) -> stored source, when the config ties them


INPUT_EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                         "tok_embeddings.weight", "embed_in.weight")


def _tied_keys(config: dict[str, Any], stored: set[str]) -> dict[str, str]:
    """Tied parameter -> stored source (e.g. lm_head.weight -> model.embed_tokens.weight).

    The usual names are matched first; only for other layouts is the model class imported for
    its `_tied_weights_keys` (that import costs ~120 MB resident, as much as a shard)."""
    if not config.get("tie_word_embeddings", False) or "lm_head.weight" in stored:
        return {}
    emb = [k for k in stored if k.endswith(INPUT_EMBEDDING_NAMES)]
    if len(emb) == 1:
        return {"lm_head.weight": emb[0]}
    try:
        import transformers

        for arch in config.get("architectures") or []:
            keys = getattr(getattr(transformers, arch, None), "_tied_weights_keys", None)
            if isinstance(keys, dict) and keys:
                return dict(keys)
    except Exception:  # unknown architecture: nothing is tied as far as we can tell
        pass
    return {}


def open_base(base_dir: str | os.PathLike) -> BaseModel:
    """Inventory the base's tensors (names, shapes, dtypes) without reading their data."""
    from safetensors import safe_open

    folder = Path(base_dir)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise MergeError(f"{cfg_path}: missing; the base must be a transformers model folder")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MergeError(f"{cfg_path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise MergeError(f"{cfg_path}: the base is quantised ({method}); merging into quantised "
                         "weights loses the adapter's precision. Point --base at the original "
                         "(unquantised) model, as QLoRA training loaded it")
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = list(dict.fromkeys(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise MergeError(f"{folder}: no *.safetensors weights; convert the base to safetensors "
                         "(load it and save_pretrained(..., safe_serialization=True))")
    tensors: dict[str, TensorSpec] = {}
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise MergeError(f"{path}: listed in {INDEX_NAME} but missing; re-download the base")
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                tensors[k] = TensorSpec(k, path, k, tuple(sl.get_shape()), sl.get_dtype())
    tied = {k: v for k, v in _tied_keys(config, set(tensors)).items()
            if k not in tensors and v in tensors}
    return BaseModel(folder, config, tensors, tied)


class TensorReader:
    """Reads single tensors; `pread` keeps untouched parts of the file out of resident memory
    (with mmap every page read stays mapped, so RSS would grow to the whole file)."""

    def __init__(self):
        self._open: dict[Path, Any] = {}

    def get(self, path: Path, name: str):
        from safetensors import safe_open

        f = self._open.get(path)
        if f is None:
            try:
                f = safe_open(str(path), framework="pt", backend="pread")
            except TypeError:  # safetensors without the pread backend: reopen per tensor
                with safe_open(str(path), framework="pt") as g:
                    return g.get_tensor(name)
            self._open[path] = f
        return f.get_tensor(name)

    def close(self) -> None:
        for f in self._open.values():
            exit_ = getattr(f, "__exit__", None)
            if exit_:
                exit_(None, None, None)
        self._open.clear()


# ---------------------------------------------------------------------------------------------
# Planning (everything is checked before a byte is written)


@dataclass
class MergePlan:
    base: BaseModel
    adapter: AdapterPlan
    outputs: list[TensorSpec]  # in write order
    untie: list[str]  # tied names written as their own tensors
    out_dtype: str

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.outputs)


_DTYPE_TAG = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def plan_merge(base: BaseModel, adapter: AdapterPlan, out_dtype: str = "auto") -> MergePlan:
    """Match every adapter tensor to a base tensor (name and shape) and list the outputs."""
    if out_dtype not in OUT_DTYPES:
        raise MergeError(f"--dtype {out_dtype!r}: use one of {', '.join(OUT_DTYPES)}")
    known = dict(base.tensors)
    for name, src in base.tied.items():
        s = base.tensors[src]
        known[name] = TensorSpec(name, s.file, src, s.shape, s.tag)

    problems = []
    hint = adapter.config.get("base_model_name_or_path")

    def check(name: str, shape: tuple[int, ...], what: str) -> None:
        spec = known.get(name)
        if spec is None:
            problems.append(f"{what} targets {name}, which the base does not have")
        elif tuple(spec.shape) != tuple(shape):
            problems.append(f"{what} for {name} has shape {tuple(shape)}, the base {spec.shape}")

    for name, d in adapter.deltas.items():
        check(name, d.weight_shape(), "LoRA")
    for name, d in adapter.bias_deltas.items():
        check(name, (d.B.shape[0],), "LoRA bias")
    for name, t in adapter.replace.items():
        check(name, tuple(t.shape), "full tensor")
    for name, (idx, values) in adapter.token_rows.items():
        spec = known.get(name)
        if spec is None or spec.shape[1:] != tuple(values.shape[1:]) or max(idx) >= spec.shape[0]:
            problems.append(f"trainable tokens for {name} do not fit the base "
                            f"({spec.shape if spec else 'missing'})")
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more"
                                               if len(problems) > 10 else "")
        raise MergeError(
            f"{adapter.folder} does not match the base {base.folder} "
            f"(the adapter was trained on {hint or 'an unrecorded base'}):\n  {shown}\n"
            "Pass the base model the adapter was trained on (--base)")

    touched = adapter.touched()
    untie = []
    for name, src in base.tied.items():
        # peft leaves a tied head on the *base* embedding unless the head itself is targeted, so
        # any change to either side (other than tied trainable tokens) means two tensors now.
        if (touched & {name, src}) - set(adapter.token_rows):
            untie.append(name)

    outputs = []
    for name, spec in list(base.tensors.items()) + [(n, known[n]) for n in untie]:
        tag = spec.tag
        if out_dtype != "auto" and tag in FLOAT_TAGS:
            tag = _DTYPE_TAG[out_dtype]
        outputs.append(TensorSpec(name, spec.file, spec.stored_name, spec.shape, tag))
    return MergePlan(base, adapter, outputs, untie, out_dtype)


def check_disk_space(target: Path, need: int) -> None:
    """Refuse before writing when the filesystem cannot hold the output (plus 1% slack)."""
    probe = target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(need * 1.01) + (16 << 20)
    if free < need:
        raise MergeError(f"{probe}: {free / 1e9:.2f} GB free but the merged model needs "
                         f"{need / 1e9:.2f} GB; free some space, write elsewhere (--output), or "
                         "use a smaller --dtype (bfloat16 halves a float32 model)")


# ---------------------------------------------------------------------------------------------
# Writing


def _torch_dtype(tag: str):
    import torch

    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
            "F64": torch.float64}.get(tag)


def merged_tensor(spec: TensorSpec, reader: TensorReader, adapter: AdapterPlan,
                  tied_src: str | None):
    """The output value of one tensor: base (or full replacement) + LoRA delta + token rows."""
    name = spec.name
    t = adapter.replace.get(name)
    owned = t is None  # a fresh read may be changed in place; the adapter's tensor may not
    if t is None:
        t = reader.get(spec.file, spec.stored_name)
    changes = [adapter.deltas.get(name), adapter.bias_deltas.get(name)]
    # tied trainable tokens: peft applies the same rows to the head as to the embeddings
    rows = adapter.token_rows.get(name) or (adapter.token_rows.get(tied_src) if tied_src else None)
    out = _torch_dtype(spec.tag)
    if any(changes) or rows is not None:
        # add in float32 whatever the storage dtype, as peft does on CPU
        t = t.float() if owned else t.to(dtype=_torch_dtype("F32"), copy=True)
        if changes[0] is not None:
            t += changes[0].delta()
        if changes[1] is not None:
            t += changes[1].bias.float() * changes[1].scaling
        if rows is not None:
            import torch

            t[torch.tensor(rows[0])] = rows[1].float()
    if out is not None and t.dtype != out:
        t = t.to(out)
    return t.contiguous()


def _shards(plan: MergePlan, max_shard_size: int | str):
    """huggingface_hub's sharding rule (file names, order, index) applied to planned sizes."""
    from huggingface_hub import split_state_dict_into_shards_factory

    specs = {s.name: s for s in plan.outputs}
    split = split_state_dict_into_shards_factory(
        specs, get_storage_size=lambda s: s.nbytes,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    return specs, split


def _copy_side_files(base_dir: Path, adapter_dir: Path, out: Path, plan: MergePlan,
                     chat_template: str | None, stop_tokens: list[str],
                     trust_remote_code: bool = False) -> None:
    """config (tie flag, dtype), generation config, tokenizer with the run's chat template."""
    from transformers import AutoTokenizer

    for p in sorted(base_dir.iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in WEIGHT_INDEXES:
            shutil.copy2(p, out / p.name)
    config = dict(plan.base.config)
    if plan.untie:
        config["tie_word_embeddings"] = False
    if plan.out_dtype != "auto":
        config["dtype"] = plan.out_dtype
        config.pop("torch_dtype", None)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    # The tokenizer: the adapter's own if training saved one (added tokens), else the base's.
    tok_src = adapter_dir if any(adapter_dir.glob("tokenizer*")) else base_dir
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_src), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise MergeError(f"{tok_src}: tokenizer cannot be loaded ({type(e).__name__}: {e})") from e
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out))
    gen = out / "generation_config.json"
    if stop_tokens and gen.is_file():  # so a plain generate() stops where chat stops
        g = json.loads(gen.read_text(encoding="utf-8"))
        eos = g.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        for t in stop_tokens:
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tok.unk_token_id and i not in eos:
                eos.append(i)
        g["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        atomic_write_text(gen, json.dumps(g, indent=2) + "\n")


@dataclass
class MergeResult:
    output: str
    shards: int
    total_bytes: int
    max_shard_size: str
    dtype: str
    untied: list[str]
    adapter: dict[str, int]
    seconds: float
    fidelity: dict[str, Any] = field(default_factory=dict)
    base: str = ""  # the base folder merged into (set by merge_run)
    note: str | None = None  # how a QLoRA run was merged (set by merge_run)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
          output_dir: str | os.PathLike, max_shard_size: str | int = "2GB", dtype: str = "auto",
          overwrite: bool = False, chat_template: str | None = None,
          stop_tokens: list[str] | None = None, progress: bool = True,
          trust_remote_code: bool = False) -> MergeResult:
    """Merge `adapter_dir` into `base_dir`, writing a loadable model folder at `output_dir`
    (`trust_remote_code`: the base's tokenizer runs code shipped with the base)."""
    from huggingface_hub.serialization._base import parse_size_to_int
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    base_dir, adapter_dir, output = Path(base_dir), Path(adapter_dir), Path(output_dir)
    shard_label = str(max_shard_size)
    if isinstance(max_shard_size, str):
        try:
            max_shard_size = parse_size_to_int(max_shard_size)
        except ValueError as e:
            raise MergeError(f"--max-shard-size: {e}") from e
    if output.exists() and not overwrite:
        raise MergeError(f"{output} already exists; pass --overwrite to replace it")
    adapter = load_adapter(adapter_dir)
    plan = plan_merge(open_base(base_dir), adapter, dtype)
    check_disk_space(output, plan.total_bytes)
    specs, split = _shards(plan, max_shard_size)
    tied_src = plan.base.tied
    reader = TensorReader()
    bar = tqdm(total=len(specs), desc="Merging", unit="tensor", disable=not progress)
    try:
        with staged_dir(output, overwrite=overwrite) as tmp:
            for fname, names in split.filename_to_tensors.items():
                shard = {n: merged_tensor(specs[n], reader, adapter, tied_src.get(n))
                         for n in names}
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                bar.update(len(names))
                del shard  # only one output shard is ever held
            index = {"metadata": {"total_size": plan.total_bytes},
                     "weight_map": dict(sorted(split.tensor_to_filename.items()))}
            atomic_write_text(tmp / INDEX_NAME, json.dumps(index, indent=2) + "\n")
            _copy_side_files(base_dir, adapter_dir, tmp, plan, chat_template, stop_tokens or [],
                             trust_remote_code)
            for p in tmp.iterdir():  # temp files are created private; the model is not secret
                p.chmod(0o644)
    finally:
        bar.close()
        reader.close()
    return MergeResult(str(output), len(split.filename_to_tensors), plan.total_bytes,
                       shard_label, dtype, plan.untie, adapter.describe(),
                       round(time.perf_counter() - t0, 2), base=str(base_dir))


# ---------------------------------------------------------------------------------------------
# Fidelity: base+adapter (peft, unmerged) vs merged


def check_prompts(tokenizer, system_prompt: str | None, run: Run | None,
                  n: int) -> list[list[int]]:
    """Token ids of `n` prompts: first questions of the run's test split, else fixed ones."""
    questions: list[str] = []
    if run is not None and run.has_split("test"):
        try:
            questions = [c.question for c in run.test_split()[:n]]
        except ManifestError:  # a broken split should not block merging: use the fixed prompts
            questions = []
    questions = (questions or FALLBACK_PROMPTS)[:n]
    sys_msg = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [prompt_ids(tokenizer, sys_msg + [{"role": "user", "content": q}]) for q in questions]


def _logits_and_greedy(model, prompts: list[list[int]], new_tokens: int, pad_id: int):
    import torch

    logits, greedy = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            logits.append(model(input_ids=x).logits[0].float())
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad_id)
            greedy.append(out[0, len(ids):].tolist())
    return logits, greedy


def fidelity_check(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                   merged_dir: str | os.PathLike, prompts: list[list[int]],
                   new_tokens: int = 16, pad_id: int = 0,
                   trust_remote_code: bool = False) -> dict[str, Any]:
    """Max |logit diff| and greedy agreement between base+adapter (peft) and the merged model.

    The two models are loaded one after the other, so the check needs one model's memory."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trust = {"trust_remote_code": trust_remote_code}  # the run's base model ships its code
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **trust)
    ref = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ref_logits, ref_greedy = _logits_and_greedy(ref, prompts, new_tokens, pad_id)
    del ref, base
    gc.collect()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32,
                                                  **trust).eval()
    m_logits, m_greedy = _logits_and_greedy(merged, prompts, new_tokens, pad_id)
    del merged
    diffs = [(a - b).abs().max().item() for a, b in zip(ref_logits, m_logits)]
    agree = [a == b for a, b in zip(ref_greedy, m_greedy)]
    return {"prompts": len(prompts), "max_abs_logit_diff": max(diffs) if diffs else 0.0,
            "greedy_tokens": new_tokens, "greedy_agree": all(agree),
            "greedy_agree_count": sum(agree),
            "reference": "base + adapter with peft, unmerged, float32"}


def run_fidelity_check(result: MergeResult, base_dir: str | os.PathLike,
                       adapter_dir: str | os.PathLike, system_prompt: str | None = None,
                       run: Run | None = None, prompts: int = 3,
                       new_tokens: int = 16, trust_remote_code: bool = False) -> dict[str, Any]:
    """`fidelity_check` on the prompts `check_prompts` picks, tokenized by the merged model's
    tokenizer; stored in `result.fidelity` and returned."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result.output, trust_remote_code=trust_remote_code)
    ids = check_prompts(tok, system_prompt, run, prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0
    result.fidelity = fidelity_check(base_dir, adapter_dir, result.output, ids, new_tokens, pad,
                                     trust_remote_code)
    return result.fidelity


# ---------------------------------------------------------------------------------------------
# A run's merge


def qlora_note(training: TrainingRecord) -> str | None:
    """What merging a QLoRA run's adapter into the unquantised base means (None for LoRA)."""
    quant = training.quantization
    if quant and quant != "none":
        return (f"trained with a {quant} (4-bit) base; merged into the unquantised base, i.e. "
                "W + BA instead of dequant(Q(W)) + BA. The check compares with base+adapter in "
                "full precision; against the 4-bit model used in training, outputs also differ by "
                "the base's quantisation error (this is the usual, intended way to merge QLoRA)")
    return None


def merge_run(run: Run | str, *, max_shard_size: str | int = "2GB", dtype: str = "auto",
              overwrite: bool = False, check_prompts: int = 3, check_tokens: int = 16,
              progress: bool = True, output: str | os.PathLike | None = None,
              allow_remote_code: bool = False) -> MergeResult:
    """Merge a run's adapter into the base it was trained on, into the run's merged model.

    The base comes from the manifest (its training-time folder if still there, else its Hub
    id), the chat template and stop tokens from the manifest's chat section; the fidelity check
    (`check_prompts` prompts from the run's test split, 0 skips it) and what was done are
    recorded in the manifest's `merge` section. `output` writes elsewhere than the run's
    merged folder (still recorded). A run pulled from the Hub whose manifest asks for the base
    model's own code (trust_remote_code) is refused unless `allow_remote_code`: the repo, not
    this machine's operator, chose that base."""
    run = run if isinstance(run, Run) else Run.open(run)
    manifest = run.manifest()
    if manifest.base_model.trust_remote_code and manifest.source.hub_repo \
            and not allow_remote_code:
        raise MergeError(f"run '{run.name}' was pulled from '{manifest.source.hub_repo}' and asks "
                         f"to run the code of its base model '{manifest.base_model.name}' "
                         "(trust_remote_code); pass --trust-remote-code if you trust that repo")
    base_dir = resolve_ref(manifest.base_model, progress=progress).path
    target = Path(output) if output else run.merged_dir
    trust = manifest.base_model.trust_remote_code  # as training loaded the base
    result = merge(base_dir, run.adapter_dir, target, max_shard_size, dtype, overwrite,
                   chat_template=manifest.chat.template, stop_tokens=manifest.chat.stop_tokens,
                   progress=progress, trust_remote_code=trust)
    result.note = qlora_note(manifest.training)
    if check_prompts > 0:
        run_fidelity_check(result, base_dir, run.adapter_dir, manifest.chat.system_prompt, run,
                           check_prompts, check_tokens, trust_remote_code=trust)
    record = {k: v for k, v in result.to_dict().items() if k != "note" or v}
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run.update_manifest(merge=record)
    return result


# ---------------------------------------------------------------------------------------------
# Command


def merge_command(run: str | None = None, *, base: str | None = None, adapter: str | None = None,
                  output: str | None = None, max_shard_size: str = "2GB",
                  dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
                  overwrite: bool = False, check_prompts: int = 3, check_tokens: int = 16,
                  quiet: bool = False, trust_remote_code: bool = False) -> int:
    """Merge a LoRA adapter into its unquantised base as a standalone model.

    Give a run (its adapter into its base, written to the run's merged model and recorded in
    its manifest), or all three of --base, --adapter and --output for folders of your own. The
    merge streams tensor by tensor (peak memory about one output shard), then a fidelity check
    compares the merged model with base + adapter on a few prompts.

    Args:
        run: run name or folder
        base: base model folder or Hub id (instead of a run)
        adapter: adapter folder (instead of a run)
        output: output folder (default: the run's merged model)
        max_shard_size: largest shard, e.g. 2GB, 500MB
        dtype: output dtype of floating tensors (auto: as stored in the base)
        overwrite: replace an existing output folder
        check_prompts: prompts for the fidelity check (0 skips it)
        check_tokens: greedy tokens compared per prompt
        quiet: no progress bar
        trust_remote_code: run the base model's own code: for a --base that ships it, or a
            pulled run whose manifest asks for it (a run trained here follows its manifest)
    """
    try:
        if run:
            if base or adapter:
                raise MergeError("give either RUN or --base/--adapter, not both")
            the_run = Run.open(run)
            result = merge_run(the_run, max_shard_size=max_shard_size, dtype=dtype,
                               overwrite=overwrite, check_prompts=check_prompts,
                               check_tokens=check_tokens, progress=not quiet, output=output,
                               allow_remote_code=trust_remote_code)
            adapter_dir = the_run.adapter_dir
        elif base and adapter and output:
            base_dir = resolve_base_model(base).path
            adapter_dir = Path(adapter)
            result = merge(base_dir, adapter_dir, output, max_shard_size, dtype, overwrite,
                           progress=not quiet, trust_remote_code=trust_remote_code)
            if check_prompts > 0:
                run_fidelity_check(result, base_dir, adapter_dir, None, None, check_prompts,
                                   check_tokens, trust_remote_code=trust_remote_code)
        else:
            raise MergeError("nothing to merge: pass RUN, or all of --base, --adapter and --output")
    except FileExistsError as e:  # another merge created the output meanwhile
        raise MergeError(str(e)) from e

    print(f"merged {adapter_dir} into {result.base}\n  -> {result.output}: "
          f"{result.shards} shard(s), {result.total_bytes / 1e6:.1f} MB, dtype {result.dtype}, "
          f"{result.seconds:.1f} s"
          + (f"; untied {', '.join(result.untied)}" if result.untied else ""))
    if result.note:
        print(f"  note: {result.note}")
    f = result.fidelity
    if f:
        print(f"  fidelity on {f['prompts']} prompt(s): max |logit diff| "
              f"{f['max_abs_logit_diff']:.3g} vs {f['reference']}; greedy outputs "
              f"({f['greedy_tokens']} tokens) agree on {f['greedy_agree_count']}/{f['prompts']}")
    return 0
