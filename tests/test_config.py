"""Typed presets: list, copy, load, override; invalid settings name the field."""

import pytest
import yaml

from medchat.command_line import call
from training.config import (ConfigError, build_config, config_from_dict, copy_preset,
                             copy_preset_command, describe, fields_command, list_presets,
                             list_presets_command, show_config_command)


def test_presets_listed_and_valid():
    presets = list_presets()
    for name in ("cpu-smollm2", "internlm2-7b-qlora", "qwen2.5-7b-qlora"):
        assert name in presets and presets[name]
    for name in presets:
        build_config(name)  # every shipped preset validates
    cpu = build_config("cpu-smollm2")
    assert cpu.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and cpu.train.epochs == 1
    intern = build_config("internlm2-7b-qlora")
    assert intern.model.quantization == "nf4" and intern.model.double_quant
    assert (intern.lora.r, intern.lora.alpha, intern.lora.target_modules) == (64, 16, "all-linear")
    assert intern.train.epochs == 3 and intern.train.deepspeed == "zero2"
    assert intern.model.trust_remote_code  # said so in the preset, with the reason
    assert not build_config("qwen2.5-7b-qlora").model.trust_remote_code


def test_overrides_are_typed():
    cfg = build_config("cpu-smollm2", ["lora.r=32", "train.learning_rate=1e-4", "data.pack=false",
                                       "lora.target_modules=[q_proj, v_proj]", "train.deepspeed=null",
                                       "data.columns.answer=Reply"])
    assert cfg.lora.r == 32 and cfg.train.learning_rate == 1e-4 and cfg.data.pack is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.train.deepspeed is None
    assert cfg.data.columns["answer"] == "Reply" and cfg.data.columns["question"] == "Question"


@pytest.mark.parametrize("override,field", [
    ("lora.r=0", "lora.r"),
    ("lora.rank=8", "lora.rank"),
    ("model.quantization=int3", "model.quantization"),
    ("data.test_size=1.5", "data.test_size"),
    ("train.epochs=abc", "train.epochs"),
    ("data.pack=maybe", "data.pack"),
    ("train.deepspeed=/no/such.json", "train.deepspeed"),
])
def test_invalid_settings_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        build_config("cpu-smollm2", [override])
    assert field in str(e.value)


def test_invalid_combination_rejected():
    with pytest.raises(ConfigError, match="model.dtype"):
        build_config("internlm2-7b-qlora", ["model.dtype=float16"])
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_dict({"lora": {"rank": 4}})


def test_copy_preset_then_run_it(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    copy_preset("cpu-smollm2", dest)
    data = yaml.safe_load(dest.read_text())
    assert data["lora"]["r"] == 16
    assert "# " in dest.read_text()  # trade-off comments travel with the copy
    with pytest.raises(ConfigError, match="already exists"):
        copy_preset("cpu-smollm2", dest)
    argv = ["--preset", str(dest), "--set", "lora.r=8"]
    assert call(show_config_command, argv, "show-config") == 0
    assert yaml.safe_load(capsys.readouterr().out)["lora"]["r"] == 8
    assert call(list_presets_command, [], "list-presets") == 0
    assert "qwen2.5-7b-qlora" in capsys.readouterr().out
    # the command refuses to clobber too, as an error the command line prints
    assert call(copy_preset_command, ["cpu-smollm2", str(dest)], "copy-preset") == 2
    assert "already exists" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    assert call(copy_preset_command, ["qwen2.5-7b-qlora", str(other)], "copy-preset") == 0
    assert f"run it with --preset {other}" in capsys.readouterr().out and other.is_file()


def test_cli_reports_bad_setting(capsys):
    assert call(show_config_command, ["--set", "lora.r=-1"], "show-config") == 2
    assert "lora.r" in capsys.readouterr().err


def test_every_field_has_help(capsys):
    lines = describe()
    assert len(lines) > 30 and all("#" in line and not line.endswith("# ") for line in lines)
    assert call(fields_command, [], "fields") == 0
    assert capsys.readouterr().out.splitlines() == lines
