"""Typed training configuration: dataclasses are the source of truth, presets are YAML files
that deserialize into them, and `--set section.field=value` overrides any field.

Every field carries a one-line help (`metadata["help"]`); `describe()` prints them all.
Invalid values and combinations are rejected in `TrainConfig.validate()` naming the field.

    medchat list-presets                  # shipped presets, one line each
    medchat copy-preset NAME FILE         # a preset to edit (its comments come along)
    medchat show-config [--preset P] [--set k=v]   # the resolved config as YAML
    medchat fields                        # every field with its default and help
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml

from medchat.command_line import Opt
from medchat.errors import UserError

PRESETS_DIR = Path(__file__).parent / "presets"
DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"
DEFAULT_PRESET = "cpu-smollm2"
DEFAULT_DATA = "../shared/data/MedInfo2019-QA-Medications.xlsx"
# MedicationQA's headers; any spreadsheet of questions and answers works with its own mapping.
DEFAULT_COLUMNS = {"question": "Question", "answer": "Answer", "focus": "Focus (Drug)",
                   "question_type": "Question Type", "section": "Section Title", "url": "URL"}


def f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help line (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


class ConfigError(UserError, ValueError):
    """A setting that is invalid; the message names the field and what to do."""


@dataclass
class ModelConfig:
    name: str = f("HuggingFaceTB/SmolLM2-135M-Instruct", "Hub id or local folder of the base model")
    revision: str | None = f(None, "Hub revision (branch, tag or commit) of the base model")
    trust_remote_code: bool = f(False, "run model code from the Hub repo; only for models that "
                                       "need it")
    dtype: str = f("auto", "weights/compute dtype: auto (bf16 on GPU, fp32 on CPU), float32, "
                           "bfloat16, float16")
    quantization: str = f("none", "none, or nf4 for QLoRA (bitsandbytes 4-bit base weights)")
    double_quant: bool = f(True, "QLoRA: also quantize the quantization constants "
                                 "(saves ~0.4 bit/param)")
    attn_implementation: str = f("sdpa", "attention kernel: sdpa, eager, flash_attention_2")
    gradient_checkpointing: bool = f(True, "recompute activations in backward: less memory, "
                                           "~30% slower")


@dataclass
class LoraSettings:
    r: int = f(16, "LoRA rank: capacity of the update; memory grows linearly")
    alpha: int = f(32, "LoRA scaling numerator (update is scaled by alpha/r)")
    dropout: float = f(0.05, "dropout on the LoRA input")
    target_modules: str | list[str] = f("all-linear",
                                        "'all-linear' or a list of module names to adapt")
    modules_to_save: list[str] | None = f(None, "extra modules trained in full and saved "
                                                "(e.g. embed_tokens)")


@dataclass
class DataConfig:
    path: str = f(DEFAULT_DATA, "spreadsheet (.xlsx), JSON/JSONL file, or Hub dataset id")
    format: str = f("auto", "auto, xlsx, xtuner, openai, alpaca")
    sheet: str = f("DrugQA", "spreadsheet sheet name")
    columns: dict[str, str] = f(
        dict(DEFAULT_COLUMNS),
        "spreadsheet column headers for question, answer and provenance fields")
    system_prompt: str | None = f(None, "system prompt for every sample (default: medchat's)")
    test_size: float = f(0.3, "share of questions held out for testing (the tutorial's 70/30)")
    val_size: float = f(0.0, "share of questions for a validation part (0 = none)")
    seed: int = f(42, "split seed: same seed, same split")
    stratify: str | None = f("question_type", "provenance field to stratify the split by (or null)")
    max_length: int = f(1024, "tokens per packed row / per sample")
    truncation: str = f("truncate", "over-long samples: truncate (cut the answer's end) or drop")
    pack: bool = f(True, "pack samples into rows of max_length (no cross-sample attention)")


@dataclass
class TrainingSettings:
    epochs: float = f(1.0, "passes over the training split")
    max_steps: int = f(-1, "stop after this many optimizer steps (-1 = run all epochs)")
    learning_rate: float = f(2e-4, "peak learning rate for the LoRA weights")
    lr_scheduler: str = f("cosine", "learning-rate schedule (transformers names)")
    warmup_ratio: float = f(0.03, "share of steps spent warming up the learning rate")
    weight_decay: float = f(0.0, "AdamW weight decay")
    max_grad_norm: float = f(1.0, "gradient clipping")
    batch_size: int = f(1, "rows per device per step (a packed row holds several samples)")
    grad_accum: int = f(4, "micro-batches accumulated per optimizer step")
    deepspeed: str | None = f("zero2", "DeepSpeed config: zero2 (shipped), a JSON path, or null "
                                       "for none")
    save_steps: int = f(50, "checkpoint every N optimizer steps (for --resume)")
    save_total_limit: int = f(2, "keep at most this many checkpoints")
    logging_steps: int = f(1, "log loss every N steps")
    seed: int = f(42, "training seed (LoRA init, shuffling)")
    eval_test_loss: bool = f(True, "measure held-out test loss of base and fine-tuned model at "
                                   "the end")
    eval_max_samples: int | None = f(None, "cap on test samples for that loss (null = all)")


@dataclass
class TrainConfig:
    name: str = f("smollm2-medqa", "run name: the folder under the runs root")
    runs_dir: str | None = f(None, "runs root (default $MEDCHAT_RUNS or ./runs)")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainingSettings = field(default_factory=TrainingSettings)

    def validate(self) -> "TrainConfig":
        def bad(fld: str, msg: str) -> None:
            raise ConfigError(f"{fld}: {msg}")

        if not self.name or "/" in self.name or self.name.startswith("."):
            bad("name", f"{self.name!r} must be a plain folder name")
        if self.model.quantization not in ("none", "nf4"):
            bad("model.quantization", f"{self.model.quantization!r}: use none or nf4")
        if self.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad("model.dtype", f"{self.model.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.model.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            bad("model.attn_implementation", "use sdpa, eager or flash_attention_2")
        if self.lora.r <= 0:
            bad("lora.r", "must be a positive integer")
        if self.lora.alpha <= 0:
            bad("lora.alpha", "must be positive")
        if not 0 <= self.lora.dropout < 1:
            bad("lora.dropout", "must be in [0, 1)")
        if self.data.format not in ("auto", "xlsx", "xtuner", "openai", "alpaca"):
            bad("data.format", f"{self.data.format!r}: use auto, xlsx, xtuner, openai or alpaca")
        for k in ("question", "answer"):
            if not self.data.columns.get(k):
                bad(f"data.columns.{k}", "is required (the header of that column)")
        if not 0 < self.data.test_size < 1:
            bad("data.test_size", "must be between 0 and 1 (exclusive)")
        if not 0 <= self.data.val_size < 1 or self.data.test_size + self.data.val_size >= 1:
            bad("data.val_size", "must be >= 0 and leave some data for training with test_size")
        if self.data.max_length < 32:
            bad("data.max_length", "must be at least 32 tokens")
        if self.data.truncation not in ("truncate", "drop"):
            bad("data.truncation", "use truncate or drop")
        t = self.train
        if t.epochs <= 0 and t.max_steps <= 0:
            bad("train.epochs", "must be > 0 (or set train.max_steps)")
        if t.learning_rate <= 0:
            bad("train.learning_rate", "must be positive")
        if t.batch_size < 1:
            bad("train.batch_size", "must be >= 1")
        if t.grad_accum < 1:
            bad("train.grad_accum", "must be >= 1")
        if not 0 <= t.warmup_ratio < 1:
            bad("train.warmup_ratio", "must be in [0, 1)")
        if t.deepspeed and t.deepspeed != "zero2" and not Path(t.deepspeed).is_file():
            bad("train.deepspeed", f"{t.deepspeed!r}: use zero2, an existing JSON file, or null")
        if self.model.quantization == "nf4" and self.model.dtype == "float16" and t.deepspeed:
            bad("model.dtype", "float16 with QLoRA + DeepSpeed is unstable; use bfloat16")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building configs from dicts, presets and --set overrides


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {fl.name for fl in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field; known: {', '.join(sorted(names))}")
    kwargs = {}
    fields = {fl.name: fl for fl in dataclasses.fields(cls)}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
            factory = fields[key].default_factory
            if typing.get_origin(hint) is dict and factory is not dataclasses.MISSING:
                kwargs[key] = {**factory(), **kwargs[key]}  # a partial mapping keeps the defaults
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a value against a (simple) type hint, converting int->float where harmless."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: may not be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return _from_dict(TrainConfig, data or {})


def list_presets() -> dict[str, str]:
    """Preset name -> its first comment line (the one-line description)."""
    out = {}
    for p in sorted(PRESETS_DIR.glob("*.yaml")):
        first = p.read_text(encoding="utf-8").splitlines()[0] if p.stat().st_size else ""
        out[p.stem] = first.lstrip("# ").strip()
    return out


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = PRESETS_DIR / f"{name}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"preset {name!r}: not found; available: {', '.join(list_presets())} "
                          "(or pass a path to a YAML file)")
    return candidate


def load_preset(name: str) -> dict[str, Any]:
    path = preset_path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.field=value` (value parsed as YAML: 16, 2e-4, true, null, [a, b])."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.field=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    # Validate the path against the dataclasses so typos fail here, naming the field.
    cls: Any = TrainConfig
    for i, part in enumerate(parts[:-1]):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"--set {key}: unknown field {'.'.join(parts[:i + 1])!r}; "
                              f"known: {', '.join(hints)}")
        cls = hints[part]
        if typing.get_origin(cls) is dict and i == len(parts) - 2:
            break  # a mapping field such as data.columns.<key>
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} has no sub-fields")
    else:
        hints = typing.get_type_hints(cls)
        if parts[-1] not in hints:
            raise ConfigError(f"--set {key}: unknown field {key!r}; known: {', '.join(hints)}")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def build_config(preset: str | None = DEFAULT_PRESET,
                 overrides: list[str] | None = None) -> TrainConfig:
    data = load_preset(preset) if preset else {}
    for o in overrides or []:
        apply_override(data, o)
    return config_from_dict(data).validate()


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def describe(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted name, default, help."""
    lines = []
    for fl in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[fl.name]
        if dataclasses.is_dataclass(hint):
            lines += describe(hint, f"{prefix}{fl.name}.")
            continue
        default = (fl.default if fl.default is not dataclasses.MISSING
                   else fl.default_factory())  # type: ignore[misc]
        lines.append(f"{prefix}{fl.name} = {default!r}  # {fl.metadata.get('help', '')}")
    return lines


def copy_preset(name: str, dest: str | os.PathLike) -> Path:
    src = preset_path(name)
    dest = Path(dest)
    if dest.exists():
        raise ConfigError(f"{dest}: already exists; choose another file name")
    dest.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return dest


# ---------------------------------------------------------------------------------------------
# Commands


def list_presets_command() -> int:
    """List the shipped training presets, one line each."""
    for name, desc in list_presets().items():
        print(f"{name:24s} {desc}")
    return 0


def copy_preset_command(name: str, file: str) -> int:
    """Copy a shipped preset to a YAML file you can edit and train with.

    Args:
        name: preset to copy (see `medchat list-presets`)
        file: YAML file to write (must not exist yet)
    """
    print(f"wrote {copy_preset(name, file)}; run it with --preset {file}")
    return 0


def show_config_command(*, preset: Annotated[str, Opt("--preset", "--config")] = DEFAULT_PRESET,
                        overrides: Annotated[list[str], Opt("--set", metavar="FIELD=VALUE")] = (),
                        ) -> int:
    """Print the resolved training config (preset + overrides) as YAML.

    Args:
        preset: preset name (see `medchat list-presets`) or a YAML file
        overrides: override a config field, e.g. --set lora.r=16 (repeatable)
    """
    print(dump_yaml(build_config(preset, list(overrides))), end="")
    return 0


def fields_command() -> int:
    """Show every training config field with its default and help."""
    print("\n".join(describe()))
    return 0
