"""Engine: per-request routing equals plain transformers/peft, concurrency isolation, seeded
sampling, cancellation, stop tokens, history trimming, merged models and other bases."""

import dataclasses
import io
import json
import shutil
import threading
import time

import pytest

from medchat import terminal
from medchat.engine import Engine, BackendError, GenerationSettings, SettingsError
from medchat.registry import Registry, UnknownModelError
from medchat.run_folder import Run
from tests.support.chat_runs import QUESTIONS, build_runs, make_adapter, reference_answer
from tests.support.tiny_model import build_tiny_model

pytestmark = pytest.mark.timeout(180)
GREEDY = dict(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)


def greedy(**kw):
    return GenerationSettings(**{**GREEDY, **kw})


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    return build_runs(tmp_path_factory.mktemp("eng"), tiny_model_dir)


@pytest.fixture(scope="module")
def engine(runs, tiny_model_dir):
    reg = Registry(runs["runs"], base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu")
    eng.load_base()
    assert eng.preload() == []
    return eng


def test_each_model_answers_like_plain_transformers_and_peft(engine, runs, tiny_model_dir):
    q = QUESTIONS[0]
    r = runs["runs"]
    want = {
        "base": reference_answer(tiny_model_dir, q, max_new_tokens=24),
        "adapter:r0": reference_answer(tiny_model_dir, q, r / "r0" / "adapter", 24),
        "adapter:r1": reference_answer(tiny_model_dir, q, r / "r1" / "adapter", 24),
        "merged:r0": reference_answer(r / "r0" / "merged", q, max_new_tokens=24),
    }
    assert len({want["base"], want["adapter:r0"], want["adapter:r1"]}) == 3  # adapters matter
    for model in ["adapter:r0", "base", "adapter:r1", "merged:r0", "base", "adapter:r0"]:
        assert engine.chat(model, q, settings=greedy()) == want[model], model
    # one base in memory with both adapters attached, plus the merged model in the cache
    loaded = engine.loaded()
    assert loaded[str(tiny_model_dir.resolve())] == ["adapter:r0", "adapter:r1"]
    assert str((r / "r0" / "merged").resolve()) in loaded


def test_concurrent_requests_on_different_models_are_isolated(engine):
    models = ["base", "adapter:r0", "adapter:r1", "merged:r0"]
    settings = dict(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=1234)
    alone = {m: engine.chat(m, QUESTIONS[1], settings=GenerationSettings(**settings))
             for m in models}
    assert len(set(alone.values())) == 3 and alone["merged:r0"] == alone["adapter:r0"]
    got: dict = {}

    def ask(m, k):
        got[(m, k)] = engine.chat(m, QUESTIONS[1], settings=GenerationSettings(**settings))

    threads = [threading.Thread(target=ask, args=(m, k)) for k in range(3) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {k: v == alone[k[0]] for k, v in got.items()} == {k: True for k in got}
    assert engine.active() == 0


def test_seed_makes_sampling_reproducible(engine):
    def s(seed=None):
        return GenerationSettings(max_new_tokens=30, temperature=1.0, top_p=1.0, seed=seed)

    a, b, c = (engine.chat("adapter:r1", QUESTIONS[2], settings=s(x)) for x in (7, 7, 8))
    assert a == b and a != c
    stream = engine.stream_turn("adapter:r1", QUESTIONS[2], settings=s())
    stream.result()
    assert isinstance(stream.seed, int)  # a random seed is chosen and reported back
    assert engine.chat("adapter:r1", QUESTIONS[2], settings=s(stream.seed)) == stream.text


def test_streams_pieces_in_order(engine):
    stream = engine.stream_turn("adapter:r0", QUESTIONS[0], settings=greedy(max_new_tokens=60))
    pieces = list(stream)
    assert len(pieces) > 5 and "".join(pieces) == stream.text
    assert stream.finish_reason in ("length", "stop") and stream.new_tokens > 0
    assert stream.first_token_s is not None and stream.prompt_tokens > 10


def test_cancel_stops_promptly_and_frees_the_slot(engine):
    stream = engine.stream_turn("adapter:r0", QUESTIONS[0], owner="me",
                           settings=greedy(max_new_tokens=900))
    it = iter(stream)
    next(it)
    assert engine.active() == 1
    assert engine.cancel("someone-else") == 0
    t0 = time.perf_counter()
    assert engine.cancel("me") == 1
    rest = list(it)
    assert time.perf_counter() - t0 < 2.0
    assert stream.finish_reason == "cancelled" and stream.new_tokens < 900
    assert stream.done.wait(2) and engine.active() == 0
    assert isinstance(rest, list)


def test_stop_tokens_come_from_the_manifest(engine, runs, tiny_model_dir, tmp_path):
    """A run whose manifest lists an extra stop token stops there (and says 'stop')."""
    from transformers import AutoTokenizer

    full = engine.stream_turn("adapter:r0", QUESTIONS[0], settings=greedy(max_new_tokens=30))
    full.result()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(full.text, add_special_tokens=False)["input_ids"]
    stop = tok.convert_ids_to_tokens(ids[6])
    root = tmp_path / "runs"
    shutil.copytree(runs["runs"] / "r0", root / "stopper", ignore=shutil.ignore_patterns("merged"))
    stopper = Run(root / "stopper")
    chat = stopper.manifest().chat
    stopper.update_manifest(chat=dataclasses.replace(chat, stop_tokens=["<|im_end|>", stop]))
    reg = Registry(root, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu")
    s = eng.stream_turn("adapter:stopper", QUESTIONS[0], settings=greedy(max_new_tokens=30))
    text = s.result()
    assert s.finish_reason == "stop" and s.new_tokens <= 7
    assert full.text.startswith(text) and len(text) < len(full.text)


def test_history_is_trimmed_oldest_first_with_a_notice(runs, tiny_model_dir):
    reg = Registry(runs["runs"], base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu", max_context=300)
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"old question {i} " + "aspirin dose " * 4},
                    {"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]}]
    s = eng.stream_turn("adapter:r0", "What is aspirin used for?", history=history,
                   settings=greedy(max_new_tokens=40))
    s.result()
    assert len(s.notices) == 1 and "oldest exchange" in s.notices[0]
    dropped = int(s.notices[0].split("the ")[1].split(" oldest")[0])
    assert 0 < dropped < 6 and s.prompt_tokens + 40 <= 300
    # what was kept is exactly the newest exchanges: the same prompt as sending only those
    kept = eng.stream_turn("adapter:r0", "What is aspirin used for?", history=history[2 * dropped:],
                      settings=greedy(max_new_tokens=40))
    assert kept.result() == s.text and kept.notices == [] and kept.prompt_tokens == s.prompt_tokens
    with pytest.raises(BackendError, match="too long"):
        eng.stream_turn("adapter:r0", "aspirin " * 400, settings=greedy())
    capped = eng.stream_turn("adapter:r0", "aspirin " * 40, settings=greedy(max_new_tokens=250))
    capped.result()
    assert any("limited to" in n for n in capped.notices)
    assert capped.prompt_tokens + capped.new_tokens <= 300


def test_bad_requests_are_refused_clearly(engine):
    with pytest.raises(UnknownModelError):
        engine.stream_turn("/tmp/some/model", "hi")
    with pytest.raises(BackendError, match="empty"):
        engine.stream_turn("base", "   ")
    with pytest.raises(SettingsError, match="temperature"):
        engine.stream_turn("base", "hi", settings=GenerationSettings(temperature=-1))
    with pytest.raises(SettingsError, match="top_p"):
        GenerationSettings(top_p=0).checked()
    with pytest.raises(SettingsError, match="max_new_tokens"):
        GenerationSettings.from_defaults({"max_new_tokens": "many"})
    s = GenerationSettings.from_defaults({"temperature": 0.2, "unknown": 1}, top_p=None, seed=3)
    assert (s.temperature, s.top_p, s.seed) == (0.2, 0.9, 3)


def test_adapter_on_another_base_loads_that_base_into_the_cache(runs, tiny_model_dir, tmp_path,
                                                                monkeypatch):
    import medchat.engine

    lookups = []
    real_resolve = medchat.engine.resolve_ref
    monkeypatch.setattr(medchat.engine, "resolve_ref",
                        lambda ref, **kw: lookups.append(ref.name) or real_resolve(ref, **kw))
    other = build_tiny_model(tmp_path / "other-base", seed=1)
    root = tmp_path / "runs"
    shutil.copytree(runs["runs"], root)
    make_adapter(other, root / "elsewhere", seed=5)
    reg = Registry(root, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu", max_cached_models=1)
    eng.load_base()
    assert not reg.same_base(reg.get("adapter:elsewhere").base)
    want = reference_answer(other, QUESTIONS[3], root / "elsewhere" / "adapter", 24)
    assert eng.chat("adapter:elsewhere", QUESTIONS[3], settings=greedy()) == want
    assert str(other.resolve()) in eng.loaded()
    eng.chat("merged:r0", QUESTIONS[3], settings=greedy())  # cache holds one: evicts the other base
    assert str(other.resolve()) not in eng.loaded()
    assert str(tiny_model_dir.resolve()) in eng.loaded()  # the main base is never evicted
    assert eng.chat("adapter:elsewhere", QUESTIONS[3], settings=greedy()) == want
    assert lookups == [str(other)]  # the other base's folder was looked up once, not per request


def test_lora_on_embeddings_is_routed_through_peft_mixed_batch(runs, tiny_model_dir, tmp_path):
    """Layers other than lora.Linear take peft's own mixed-batch path; still per request."""
    root = tmp_path / "runs"
    make_adapter(tiny_model_dir, root / "emb", seed=31, target_modules=["embed_tokens", "q_proj"])
    reg = Registry(root, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu")
    want = reference_answer(tiny_model_dir, QUESTIONS[2], root / "emb" / "adapter", 24)
    base = reference_answer(tiny_model_dir, QUESTIONS[2], None, 24)
    assert want != base
    got = {}

    def ask(m):
        got[m] = eng.chat(m, QUESTIONS[2], settings=greedy())

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("adapter:emb", "base")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {"adapter:emb": want, "base": base}


def test_retrained_adapter_is_reloaded_and_dora_is_refused(runs, tiny_model_dir, tmp_path):
    root = tmp_path / "runs"
    make_adapter(tiny_model_dir, root / "x", seed=11)
    make_adapter(tiny_model_dir, root / "dora", seed=12, use_dora=True)
    reg = Registry(root, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu")
    first = eng.chat("adapter:x", QUESTIONS[0], settings=greedy())
    shutil.rmtree(root / "x")
    make_adapter(tiny_model_dir, root / "x", seed=13)
    reg.refresh()
    second = eng.chat("adapter:x", QUESTIONS[0], settings=greedy())
    assert second != first
    assert second == reference_answer(tiny_model_dir, QUESTIONS[0], root / "x" / "adapter", 24)
    with pytest.raises(BackendError, match="DoRA"):
        eng.stream_turn("adapter:dora", QUESTIONS[0])


def test_terminal_chat_streams_answers_and_resets(runs, tiny_model_dir, monkeypatch, capsys):
    args = ["--runs", str(runs["runs"]), "--base", str(tiny_model_dir), "--device", "cpu",
            "--model", "adapter:r0", "--temperature", "0", "--max-new-tokens", "24",
            "--repetition-penalty", "1.0"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTIONS[0]}\n{QUESTIONS[0]}\n/reset\n"
                                                 f"{QUESTIONS[0]}\n/exit\nnot read\n"))
    assert terminal.main(args) == 0
    out = capsys.readouterr().out
    first = reference_answer(tiny_model_dir, QUESTIONS[0], runs["runs"] / "r0" / "adapter", 24)
    assert out.startswith(first + "\n") and out.endswith("\n" + first + "\n")
    second = out[len(first) + 1:-len(first) - 1]
    assert second.endswith("\n") and second[:-1] != first  # asked again with history: differs
    listing = ["--runs", str(runs["runs"]), "--base", str(tiny_model_dir), "--list"]
    assert terminal.main(listing) == 0
    listed = capsys.readouterr().out
    assert "adapter:r1" in listed and "merged:r0" in listed
    assert terminal.main(["--runs", str(runs["runs"]), "--base", str(tiny_model_dir),
                          "--model", "/etc/passwd"]) == 2
    assert "not registered" in capsys.readouterr().err


def test_batched_joins_pieces_but_passes_the_first_at_once(engine):
    plain = engine.stream_turn("adapter:r0", QUESTIONS[0], settings=greedy(max_new_tokens=120))
    pieces = list(plain)
    assert len(pieces) > 3
    joined = engine.stream_turn("adapter:r0", QUESTIONS[0], settings=greedy(max_new_tokens=120))
    got = list(joined.batched(interval=30.0))  # longer than the generation: first + the rest
    assert got == [pieces[0], "".join(pieces[1:])] and joined.text == plain.text
    fine = engine.stream_turn("adapter:r0", QUESTIONS[0], settings=greedy(max_new_tokens=120))
    assert "".join(fine.batched(interval=0.0)) == plain.text


def test_one_tokenizer_load_serves_every_chat_template_on_the_same_files(tiny_model_dir,
                                                                          tmp_path, monkeypatch):
    """A merged model's folder with its base's tokenizer files, and runs with their own chat
    templates, share one parse of the tokenizer (it holds the interpreter while it runs); each
    gets its own template, and the first one loaded keeps its own."""
    import shutil

    import transformers

    from medchat import model_cache

    copy_dir = tmp_path / "merged"
    copy_dir.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, copy_dir / f.name)
    loads, real = [], transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    cache = model_cache.ModelCache("cpu", "float32")
    own = cache.tokenizer(tiny_model_dir, None)
    mine = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    other = cache.tokenizer(copy_dir, mine)
    assert len(loads) == 1 and cache.tokenizer(copy_dir, mine) is other
    messages = [{"role": "user", "content": "hi"}]
    assert other.apply_chat_template(messages, tokenize=False) == "<hi>"
    assert own.apply_chat_template(messages, tokenize=False) != "<hi>"
    assert own("hello there")["input_ids"] == other("hello there")["input_ids"]


def test_a_model_is_sized_before_anything_is_allocated(tiny_model_dir, tmp_path, monkeypatch):
    """check_model_size counts the config's parameters on the meta device: a config that
    describes more than the weight files hold, or more than the device has free, is refused
    with both numbers; the real model passes with its own count."""
    import torch

    from medchat import model_cache

    params = model_cache.check_model_size(tiny_model_dir, torch.float32)
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert params == sum(p.numel() for p in real.parameters())
    inflated = tmp_path / "inflated"
    shutil.copytree(tiny_model_dir, inflated)
    config = json.loads((inflated / "config.json").read_text())
    config["num_hidden_layers"] = 400
    (inflated / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError, match=rf"describes [\d,]+ parameters but its weight files "
                                           rf"hold {params:,}"):
        model_cache.check_model_size(inflated, torch.float32)
    monkeypatch.setattr(model_cache, "_free_memory", lambda device: params * 3)
    with pytest.raises(BackendError, match=r"needs 0\.\d GiB and cpu has 0\.\d GiB free"):
        model_cache.check_model_size(tiny_model_dir, torch.float32)
    assert model_cache.check_model_size(tiny_model_dir, torch.bfloat16) == params  # 2 bytes each
