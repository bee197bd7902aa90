"""The in-process engine's batched decoding and what must never make one request wait on
another: concurrent answers equal solo runs (greedy and seeded), a cancel ends its row within one
step, a model load or an adapter attach does not hold up requests for other models, adapters load
exactly as trained in bf16, unsupported adapters and untrusted remote code are refused, and
history trimming is linear."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from contextlib import contextmanager

import pytest

from medchat import model_cache
from medchat.backend import Limits
from medchat.engine import BackendError, Engine, GenerationSettings, fit_prompt
from medchat.registry import Registry
from medchat.run_folder import Run, SourceRecord
from tests.support.chat_runs import QUESTIONS, build_runs, make_adapter, reference_answer
from tests.support.tiny_model import build_tiny_model

# torch, transformers and peft are imported in the functions: collecting the suite stays quick.
pytestmark = pytest.mark.timeout(180)
MODELS = ["base", "adapter:r0", "adapter:r1", "merged:r0"]
LIMITS = Limits(max_active=24, max_waiting=32)


def greedy(n=24, **kw):
    return GenerationSettings(max_new_tokens=n, temperature=0.0, repetition_penalty=1.0, **kw)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    return build_runs(tmp_path_factory.mktemp("sched"), tiny_model_dir)


def new_engine(runs, tiny_model_dir, **kw) -> Engine:
    reg = Registry(runs["runs"], base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    return Engine(reg, device="cpu", limits=LIMITS, **kw)


@pytest.fixture(scope="module")
def engine(runs, tiny_model_dir):
    eng = new_engine(runs, tiny_model_dir)
    eng.load_base()
    assert eng.preload() == []
    return eng


def run_all(engine, asks):
    """Start every (model, question, settings, history) at once; return their answers."""
    streams = [engine.stream_turn(m, q, history=h, settings=s) for m, q, s, h in asks]
    return [s.result() for s in streams]


@contextmanager
def paused(engine, folder):
    """Hold the model's loop between two steps while the block queues requests, so they all
    join at once (however fast the tiny model decodes)."""
    loop = engine._cache.get(folder).loop
    entered, gate = threading.Event(), threading.Event()

    def hold():
        entered.set()
        gate.wait(30)

    holder = threading.Thread(target=loop.call, args=(hold,))
    holder.start()
    assert entered.wait(30)
    try:
        yield
    finally:
        gate.set()
        holder.join(30)


def test_concurrent_greedy_answers_equal_solo_runs_in_shared_steps(engine, runs, tiny_model_dir):
    history = [{"role": "user", "content": QUESTIONS[3]}, {"role": "assistant", "content": "Ok."}]
    asks = [(m, QUESTIONS[(i + j) % 4], greedy(8 + 13 * j), history if (i + j) % 3 == 0 else None)
            for j in range(3) for i, m in enumerate(MODELS)]  # lengths differ: rows join, leave
    solo = [engine.chat(m, q, history=h, settings=s) for m, q, s, h in asks]
    before = engine.scheduler_stats()[str(tiny_model_dir.resolve())]["steps"]
    with paused(engine, tiny_model_dir):
        streams = [engine.stream_turn(m, q, history=h, settings=s) for m, q, s, h in asks]
    assert [s.result() for s in streams] == solo
    stats = engine.scheduler_stats()[str(tiny_model_dir.resolve())]
    assert stats["max_rows"] == 9 and stats["steps"] - before <= 40  # one step serves every row
    assert engine.capabilities().batched_decoding
    # the solo runs are plain transformers/peft's answers; the base's never changes
    r = runs["runs"]
    want = {"base": reference_answer(tiny_model_dir, QUESTIONS[1], None, 21),
            "adapter:r1": reference_answer(tiny_model_dir, QUESTIONS[1], r / "r1" / "adapter", 21),
            "merged:r0": reference_answer(r / "r0" / "merged", QUESTIONS[1], None, 21)}
    together = run_all(engine, [(m, QUESTIONS[1], greedy(21), None) for m in want] * 2)
    assert together == list(want.values()) * 2


def _tiny_loop(tiny_model_dir, **config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medchat.backend import Stream
    from medchat.chat_format import prompt_ids
    from medchat.scheduler import Job, ModelLoop, SchedulerConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    loop = ModelLoop(model, "cpu", "tiny", SchedulerConfig(**config))

    def ask(question, n):
        settings = greedy(n)
        stream = Stream("tiny", settings)
        loop.submit(Job(stream, prompt_ids(tok, [{"role": "user", "content": question}]), None,
                        settings, frozenset(), (), tok))
        return stream

    return model, loop, ask


def test_a_request_joins_running_ones_between_steps(tiny_model_dir):
    """At the loop itself: a short request joins a long one, finishes first, and both answers
    equal their solo runs."""
    _, loop, ask = _tiny_loop(tiny_model_dir)  # no stop tokens: answers run to n tokens
    solo_long, solo_short = ask(QUESTIONS[0], 400).result(), ask(QUESTIONS[1], 5).result()
    long = ask(QUESTIONS[0], 400)
    next(iter(long))
    short = ask(QUESTIONS[1], 5)
    assert short.result() == solo_short and not long.done.is_set()  # it did not wait
    assert long.result() == solo_long and long.new_tokens == 400
    assert loop.stats["max_rows"] == 2 and loop.stats["steps"] < 3 * 400
    # the short one was prefilled by a prefill thread while the long one kept decoding
    assert loop.stats["helper_prefills"] == 1
    loop.retire()


def test_without_prefill_threads_the_loop_prefills_between_its_steps(tiny_model_dir):
    _, loop, ask = _tiny_loop(tiny_model_dir, prefill_threads=0)
    solo = [ask(QUESTIONS[i], 30 + 40 * i).result() for i in range(3)]
    long = ask(QUESTIONS[2], 110)
    next(iter(long))
    joined = [ask(QUESTIONS[i], 30 + 40 * i) for i in range(2)]
    assert [s.result() for s in joined] + [long.result()] == solo
    assert loop.stats["helper_prefills"] == 0 and loop.stats["max_rows"] >= 2
    loop.retire()


def test_a_change_runs_with_no_forward_pass_under_way(tiny_model_dir):
    """`call` (attaching, deleting adapters) waits for the decode step and the prefills under
    way, and none starts until it is done: whatever runs on the model, fn sees it at rest."""
    import time

    model, loop, ask = _tiny_loop(tiny_model_dir)
    inside, seen, real = [0], [], model.forward

    def counted(*args, **kwargs):
        inside[0] += 1
        try:
            time.sleep(0.002)  # long enough for a change to try to slip in
            return real(*args, **kwargs)
        finally:
            inside[0] -= 1

    model.forward = counted
    solo = [ask(QUESTIONS[i % 4], 20 + 7 * i).result() for i in range(8)]
    long = ask(QUESTIONS[0], 300)
    next(iter(long))
    streams = []
    for i in range(8):  # requests join while changes come in between their steps
        streams.append(ask(QUESTIONS[i % 4], 20 + 7 * i))
        seen.append(loop.call(lambda: inside[0]))
    assert [s.result() for s in streams] == solo and long.result()
    assert seen == [0] * 8 and loop.stats["helper_prefills"] >= 1
    loop.retire()


def test_a_sliding_window_model_runs_one_request_at_a_time(tmp_path, caplog):
    """A cache that cannot be merged row by row (sliding-window layers): requests queue, each
    answers as alone, and the log says why."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    from tests.support.tiny_model import build_tokenizer

    folder = tmp_path / "sliding"
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    runs = tmp_path / "runs"
    runs.mkdir()
    eng = Engine(Registry(runs, base_name=str(folder), base_path=folder), device="cpu",
                 limits=LIMITS)
    with caplog.at_level("WARNING", logger="medchat.scheduler"):
        eng.load_base()
    assert "DynamicSlidingWindowLayer" in caplog.text and "one at a time" in caplog.text
    asks = [("base", QUESTIONS[i], greedy(6 + 5 * i), None) for i in range(3)]
    assert run_all(eng, asks) == [reference_answer(folder, q, None, s.max_new_tokens)
                                  for _, q, s, _ in asks]
    assert eng.scheduler_stats()[str(folder.resolve())]["max_rows"] == 1


def test_seeded_sampling_is_the_same_alone_and_beside_others(engine):
    def sampled(seed, **kw):
        return GenerationSettings(**{"max_new_tokens": 30, "temperature": 0.9, "top_p": 0.9,
                                     "repetition_penalty": 1.2, "seed": seed, **kw})

    asks = [(m, QUESTIONS[k % 4], sampled(100 + k, max_new_tokens=10 + 7 * k), None)
            for k, m in enumerate(MODELS * 2)]
    asks += [("adapter:r1", QUESTIONS[2], greedy(12, stop=("e",)), None)]
    alone = [engine.chat(m, q, settings=s) for m, q, s, _ in asks]
    assert len(set(alone)) > 5 and "e" not in alone[-1]
    assert run_all(engine, asks) == alone


def test_cancel_ends_the_row_within_one_step_and_others_go_on(engine):
    other = engine.stream_turn("adapter:r1", QUESTIONS[2], settings=greedy(120))
    stream = engine.stream_turn("adapter:r0", QUESTIONS[0], owner="me", settings=greedy(900))
    it = iter(stream)
    next(it)
    next(it)
    assert engine.cancel("me") == 1
    at_cancel = stream.new_tokens
    list(it)
    assert stream.done.wait(5) and stream.finish_reason == "cancelled"
    assert stream.new_tokens <= at_cancel + 1  # the step under way, then no more
    assert other.result() == engine.chat("adapter:r1", QUESTIONS[2], settings=greedy(120))


def test_a_slow_load_blocks_only_requests_for_that_folder(runs, tiny_model_dir, monkeypatch):
    eng = new_engine(runs, tiny_model_dir)
    eng.load_base()
    merged = str((runs["runs"] / "r0" / "merged").resolve())
    entered, gate, loads = threading.Event(), threading.Event(), []
    real_load = model_cache.ModelCache._load

    def slow_load(self, folder, trust_remote_code=False):
        loads.append(folder)
        if folder == merged:
            entered.set()
            assert gate.wait(60)
        return real_load(self, folder, trust_remote_code)

    monkeypatch.setattr(model_cache.ModelCache, "_load", slow_load)
    results: dict = {}

    def ask(key, model):
        results[key] = eng.chat(model, QUESTIONS[0], settings=greedy(6))

    loading = [threading.Thread(target=ask, args=(k, "merged:r0")) for k in ("m1", "m2")]
    for t in loading:
        t.start()
    assert entered.wait(30)
    base = threading.Thread(target=ask, args=("base", "base"))
    base.start()
    base.join(30)
    adapter = threading.Thread(target=ask, args=("r1", "adapter:r1"))  # attach + answer
    adapter.start()
    adapter.join(30)
    try:
        assert "base" in results and "r1" in results  # answered while the merged model loads
        assert not any(k in results for k in ("m1", "m2"))
    finally:
        gate.set()
    for t in loading:
        t.join(30)
    assert results["m1"] == results["m2"] == reference_answer(
        runs["runs"] / "r0" / "merged", QUESTIONS[0], None, 6)
    assert loads.count(merged) == 1  # the second request waited for the first one's load


def test_attaching_an_adapter_does_not_stop_running_generations(runs, tiny_model_dir,
                                                                monkeypatch):
    adapters = runs["runs"] / "r0" / "adapter", runs["runs"] / "r1" / "adapter"
    want = [reference_answer(tiny_model_dir, QUESTIONS[2], a, n)
            for a, n in ((None, 2), (adapters[0], 12), (adapters[1], 12))]
    eng = new_engine(runs, tiny_model_dir)
    eng.load_base()
    base_solo = eng.chat("base", QUESTIONS[1], settings=greedy(300))
    long = eng.stream_turn("base", QUESTIONS[1], settings=greedy(300))
    next(iter(long))
    eng.prepare("adapter:r0")  # the first adapter changes modules: between two decode steps
    entered, gate = threading.Event(), threading.Event()
    real = model_cache._add_lora_weights

    def slow_add(*args, **kwargs):  # the second adapter only adds weights to LoRA layers
        entered.set()
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_cache, "_add_lora_weights", slow_add)
    attach = threading.Thread(target=eng.prepare, args=("adapter:r1",))
    attach.start()
    try:
        assert entered.wait(30)
        # while r1 is being attached, the base and r0 answer in full
        assert eng.chat("base", QUESTIONS[2], settings=greedy(2)) == want[0]
        assert eng.chat("adapter:r0", QUESTIONS[2], settings=greedy(12)) == want[1]
        assert attach.is_alive()
    finally:
        gate.set()
    attach.join(30)
    assert long.result() == base_solo  # the structural attach happened between steps
    assert eng.chat("adapter:r1", QUESTIONS[2], settings=greedy(12)) == want[2]


def test_adapters_load_exactly_as_trained_in_bf16(runs, tiny_model_dir):
    """peft's default loading: fp32 LoRA weights stay fp32 beside a bf16 base (low_cpu_mem_usage
    would round them through bf16)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medchat import lora_routing

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tok(QUESTIONS[1])["input_ids"]])

    def logits(model):
        with torch.inference_mode():
            return model(input_ids=ids).logits

    cache = model_cache.ModelCache("cpu", torch.bfloat16)
    loaded = cache.get(tiny_model_dir)
    for run in ("r0", "r1"):  # the first attach wraps the base, the second adds to it
        path = runs["runs"] / run / "adapter"
        name = cache.attach(loaded, f"adapter:{run}", path, label=run, trained_on="tiny")
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        want = logits(PeftModel.from_pretrained(base, path).eval())
        with lora_routing.use_adapter(name):
            assert torch.equal(logits(loaded.model), want), run


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_second_adapter_is_added_layer_by_layer_exactly_as_peft_loads_it(
        runs, tiny_model_dir, tmp_path, monkeypatch, dtype):
    """Adapters after the first are added to the LoRA layers without peft's whole-model
    load_adapter: the same parameters (values, dtypes), the same logits, deletable; an adapter
    this cannot take (a rank pattern) still goes through peft's loader."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medchat import lora_routing

    torch_dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tok(QUESTIONS[2])["input_ids"]])
    patterned = make_adapter(tiny_model_dir, tmp_path / "patterned", seed=5, r=4)
    config_file = patterned / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["rank_pattern"] = {"q_proj": 4}
    config_file.write_text(json.dumps(config))

    cache = model_cache.ModelCache("cpu", torch_dtype)
    loaded = cache.get(tiny_model_dir)
    first = cache.attach(loaded, "adapter:r0", runs["runs"] / "r0" / "adapter", label="r0",
                         trained_on="tiny")
    peft_loads = []
    real = PeftModel.load_adapter
    monkeypatch.setattr(PeftModel, "load_adapter",
                        lambda self, *a, **k: peft_loads.append(a) or real(self, *a, **k))
    path = runs["runs"] / "r1" / "adapter"
    name = cache.attach(loaded, "adapter:r1", path, label="r1", trained_on="tiny")
    assert peft_loads == []  # added layer by layer

    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype),
        runs["runs"] / "r0" / "adapter", adapter_name=first)
    real(reference, str(path), adapter_name=name, is_trainable=False)
    reference.eval()
    ours = {k: v for k, v in loaded.peft.state_dict().items() if f".{name}." in k}
    theirs = {k: v for k, v in reference.state_dict().items() if f".{name}." in k}
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k])
               for k in ours)
    reference.set_adapter(name)
    with torch.inference_mode(), lora_routing.use_adapter(name):
        assert torch.equal(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert loaded.peft.peft_config[name].r == 8

    before = len(peft_loads)
    other = cache.attach(loaded, "adapter:patterned", patterned / "adapter", label="p",
                         trained_on="tiny")
    assert len(peft_loads) == before + 1  # a rank pattern: peft's own loader
    assert model_cache._delete_adapter(loaded, name)
    assert not any(f".{name}." in k for k in loaded.peft.state_dict())
    with torch.inference_mode(), lora_routing.use_adapter(other):
        loaded.model(input_ids=ids)  # the others still serve


def test_unsupported_adapters_are_refused_by_chat_and_merge_alike(runs, tiny_model_dir,
                                                                 tmp_path):
    from medchat import adapter_support
    from training import merge

    assert merge.UNSUPPORTED_OPTIONS is adapter_support.UNSUPPORTED_OPTIONS
    root = tmp_path / "runs"
    make_adapter(tiny_model_dir, root / "dora", seed=12, use_dora=True, target_modules=["q_proj"])
    for name, change in [("alora", {"alora_invocation_tokens": [5, 6]}),
                         ("mica", {"init_lora_weights": "mica"}),
                         ("pissa", {"init_lora_weights": "pissa_niter_4"}),
                         ("ia3", {"peft_type": "IA3"})]:
        shutil.copytree(runs["runs"] / "r1", root / name, ignore=shutil.ignore_patterns("merged"))
        cfg_file = Run(root / name).adapter_dir / "adapter_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **change}))
    reg = Registry(root, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu")
    for name, says in [("dora", "use_dora.*DoRA"), ("alora", "alora_invocation_tokens.*aLoRA"),
                       ("mica", "mica"), ("pissa", "changed the base weights"),
                       ("ia3", "peft_type IA3")]:
        with pytest.raises(BackendError, match=says):
            eng.stream_turn(f"adapter:{name}", QUESTIONS[0])
        if name != "ia3":  # merge words the peft type its own way
            with pytest.raises(merge.MergeError, match=says.split(".*")[0]):
                merge.load_adapter(Run(root / name).adapter_dir)
    assert eng.loaded().get(str(tiny_model_dir.resolve()), []) == []  # nothing was attached


def _old_fit_prompt(tok, context, system, history, message, settings):
    """The previous trimming (re-renders the history once per dropped exchange), as the
    behaviour to keep."""
    from medchat.backend import exchanges
    from medchat.chat_format import prompt_ids

    head = [{"role": "system", "content": system}] if system else []
    turns, tail = exchanges(history), [{"role": "user", "content": message}]
    dropped = 0
    while True:
        ids = prompt_ids(tok, head + [m for ex in turns[dropped:] for m in ex] + tail)
        if len(ids) <= context - settings.max_new_tokens or dropped >= len(turns):
            return ids, dropped
        dropped += 1


class CountingTokenizer:
    """A tokenizer that counts the characters it is asked to tokenize."""

    def __init__(self, tok):
        self._tok, self.calls, self.chars = tok, 0, 0

    def __call__(self, text, *args, **kwargs):
        self.calls += 1
        self.chars += len(text)
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_history_trimming_is_linear_and_keeps_its_behaviour(tiny_model_dir):
    from transformers import AutoTokenizer

    from medchat.chat_format import render

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def history(n):
        out = []
        for i in range(n):
            out += [{"role": "user", "content": f"question {i} about aspirin dose " * (1 + i % 3)},
                    {"role": "assistant", "content": f"answer {i}"}]
        return out

    for n in (0, 1, 5, 12):  # same prompt, same number dropped as before
        for context in (120, 260, 700):
            settings = greedy(40)
            ids, notices, _ = fit_prompt(tok, context, "Be brief.", history(n), "Why?", settings)
            old_ids, old_dropped = _old_fit_prompt(tok, context, "Be brief.", history(n), "Why?",
                                                   settings)
            assert ids == old_ids
            assert (f"the {old_dropped} oldest" in " ".join(notices)) == (old_dropped > 0)
    work = {}
    for n in (100, 200, 400):
        counting = CountingTokenizer(tok)
        ids, notices, _ = fit_prompt(counting, 300, "Be brief.", history(n), "Why?", greedy(40))
        assert "oldest exchange" in notices[0] and len(ids) <= 260
        full = len(render(tok, history(n)))
        assert counting.chars < 4 * full and counting.calls < n + 10, (n, counting.chars, full)
        work[n] = counting.chars
    assert work[400] < 2.5 * work[200] < 6.25 * work[100]  # linear, not quadratic


def _pulled_copy(runs, root, name, *, trust, hub_repo="owner/pulled", base=None):
    """A copy of run r0 whose manifest says it was pulled from the Hub (or not)."""
    shutil.copytree(runs["runs"] / "r0", root / name)
    run = Run(root / name)
    m = run.manifest()
    ref = base or m.base_model
    run.update_manifest(base_model=dataclasses.replace(ref, trust_remote_code=trust),
                        source=SourceRecord(hub_repo=hub_repo))
    return run


def test_remote_code_only_when_the_run_says_so_and_pulled_runs_only_when_allowed(
        runs, tiny_model_dir, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    _pulled_copy(runs, root, "pulled", trust=True)
    _pulled_copy(runs, root, "local", trust=True, hub_repo=None)
    _pulled_copy(runs, root, "plain", trust=False)
    elsewhere = build_tiny_model(tmp_path / "elsewhere", seed=3)
    from medchat.run_folder import BaseModelRef

    _pulled_copy(runs, root, "localbase", trust=False,
                 base=BaseModelRef(name=str(elsewhere), local_path=str(elsewhere)))
    loads = []
    real_load = model_cache.ModelCache._load

    def spy(self, folder, trust_remote_code=False):
        loads.append((folder, trust_remote_code))
        return real_load(self, folder, trust_remote_code)

    monkeypatch.setattr(model_cache.ModelCache, "_load", spy)
    reg = Registry(root, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    strict = Engine(reg, device="cpu")
    with pytest.raises(BackendError, match="pulled from owner/pulled.*--allow-remote-code"):
        strict.prepare("merged:pulled")
    strict.prepare("merged:local")  # the operator's own run: as its manifest says
    strict.prepare("merged:plain")
    assert [(f.split("/")[-2], t) for f, t in loads] == [("local", True), ("plain", False)]
    # a pulled run's base is a Hub id or the operator's base, never a folder its manifest names
    with pytest.raises(BackendError, match="neither a Hub id"):
        strict.prepare("adapter:localbase")
    assert not any(str(elsewhere) in f for f, _ in loads)
    allowed = Engine(reg, device="cpu", allow_remote_code=True)
    allowed.prepare("merged:pulled")
    assert loads[-1][0].endswith("pulled/merged") and loads[-1][1] is True
    assert allowed.chat("merged:pulled", QUESTIONS[0], settings=greedy(6)) == reference_answer(
        runs["runs"] / "r0" / "merged", QUESTIONS[0], None, 6)


def test_old_weights_of_a_retrained_adapter_go_once_unused_without_holding_up_steps(
        tiny_model_dir, tmp_path, monkeypatch):
    """A retrained run's adapter is re-attached while an answer with its old weights runs: that
    answer finishes with the old weights, the decode steps meanwhile never wait for the
    deletion (it takes the model exclusively only when it can run), then the old weights go."""
    import time

    # the attach goes ahead at once (it would wait up to 0.5 s for the answer's passes to
    # pause: on a fast machine the whole answer could end meanwhile)
    from medchat.scheduler import GiveWay

    monkeypatch.setattr(model_cache, "GiveWay", lambda device: GiveWay(device, at_most_s=0.0))
    root = tmp_path / "runs"
    make_adapter(tiny_model_dir, root / "x", seed=11)
    reg = Registry(root, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu", limits=LIMITS)
    solo_old = eng.chat("adapter:x", QUESTIONS[0], settings=greedy(900))
    loaded = eng._cache.get(tiny_model_dir)
    old = loaded.adapters["adapter:x"].name
    long = eng.stream_turn("adapter:x", QUESTIONS[0], settings=greedy(900))
    next(iter(long))
    shutil.rmtree(root / "x")
    make_adapter(tiny_model_dir, root / "x", seed=13)
    reg.refresh()
    gate, exclusive = loaded.loop._gate, []
    real = gate.acquire_exclusive
    gate.acquire_exclusive = lambda *a, **k: exclusive.append(1) or real(*a, **k)
    eng.prepare("adapter:x")  # the new weights, beside the old ones
    assert not long.done.is_set() and old in loaded.peft.peft_config  # still in use
    steps = eng.scheduler_stats()[str(tiny_model_dir.resolve())]["steps"]
    assert long.result() == solo_old
    steps = eng.scheduler_stats()[str(tiny_model_dir.resolve())]["steps"] - steps
    deadline = time.monotonic() + 10
    while old in loaded.peft.peft_config and time.monotonic() < deadline:
        time.sleep(0.01)
    assert old not in loaded.peft.peft_config  # gone once unused
    assert steps > 50 and len(exclusive) <= 3  # not once per step while it waited
    assert eng.chat("adapter:x", QUESTIONS[0], settings=greedy(24)) == reference_answer(
        tiny_model_dir, QUESTIONS[0], root / "x" / "adapter", 24)


def test_background_work_waits_for_a_quiet_moment_but_not_forever():
    """Loads and attaches start their interpreter-heavy part once no forward pass has run for a
    moment (a short request goes first), and after `at_most_s` whatever runs."""
    import time

    from medchat.scheduler import _turns, wait_for_a_quiet_moment

    turns = _turns("test-quiet")
    turns.slots()  # decided once (it imports torch): not inside the first timed pass
    assert wait_for_a_quiet_moment("test-quiet", at_most_s=1.0) < 0.05  # nothing ran yet

    def passes(seconds, started):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with turns:
                started.set()
                time.sleep(0.01)  # back-to-back passes, like a request being answered

    for answer_s, at_most_s, low, high in ((0.3, 2.0, 0.25, 1.0), (1.5, 0.4, 0.39, 0.8)):
        started = threading.Event()
        worker = threading.Thread(target=passes, args=(answer_s, started))
        worker.start()
        assert started.wait(30)
        waited = wait_for_a_quiet_moment("test-quiet", quiet_s=0.02, at_most_s=at_most_s)
        # a short answer: until its passes stopped; a long one: no longer than at_most_s
        assert low <= waited < high, (answer_s, waited)
        worker.join()


def _hold_a_pass(turns, seconds: float) -> threading.Event:
    """A forward pass of `seconds` on `turns`' device in another thread; returns once it runs."""
    import time

    entered = threading.Event()

    def run():
        with turns:
            entered.set()
            time.sleep(seconds)

    threading.Thread(target=run, daemon=True).start()
    assert entered.wait(30)
    return entered


def test_background_work_gives_way_to_passes_between_its_pieces_within_its_budget():
    """GiveWay.between() waits while a forward pass runs (a request that arrived during the
    work goes first), returns at once when none does, and never waits past the budget."""
    import time

    from medchat.scheduler import GiveWay, _turns

    turns = _turns("test-give-way")
    turns.slots()
    way = GiveWay("test-give-way", at_most_s=5.0)
    t = time.monotonic()
    way.between()
    assert time.monotonic() - t < 0.05  # nothing runs: no wait
    _hold_a_pass(turns, 0.3)
    t = time.monotonic()
    way.between()
    assert 0.2 <= time.monotonic() - t < 2.0  # waited for the pass to end
    short = GiveWay("test-give-way", at_most_s=0.2)
    _hold_a_pass(turns, 1.0)
    t = time.monotonic()
    short.between()
    assert time.monotonic() - t < 0.5  # a long pass: no longer than the budget
    time.sleep(0.9)


def test_an_attach_gives_way_to_a_pass_that_starts_between_its_layers(runs, tiny_model_dir,
                                                                     monkeypatch):
    """Adding an adapter layer by layer asks to give way before every layer; a pass that
    starts in the middle runs before the next layer is added, and the adapter ends complete."""
    import time

    import torch

    from medchat import lora_routing
    from medchat.scheduler import GiveWay, _turns

    calls, waits, during = [], [], []

    class Recording(GiveWay):
        def between(self):
            calls.append(1)
            if len(calls) == 3:  # a request arrives after two layers
                _hold_a_pass(_turns(self.device), 0.3)
                during.append(sum(len(layer.lora_A) == 2 for layer in layers()))
            t = time.monotonic()
            super().between()
            waits.append(time.monotonic() - t)

    monkeypatch.setattr(model_cache, "GiveWay", Recording)
    cache = model_cache.ModelCache("cpu", torch.float32)
    loaded = cache.get(tiny_model_dir)
    cache.attach(loaded, "adapter:r0", runs["runs"] / "r0" / "adapter", label="r0",
                 trained_on="tiny")
    def layers():
        from peft.tuners.lora import Linear

        return [m for m in loaded.model.modules() if type(m) is Linear]

    name = cache.attach(loaded, "adapter:r1", runs["runs"] / "r1" / "adapter", label="r1",
                        trained_on="tiny")
    assert len(calls) == len(layers()) > 3  # before every layer
    assert during == [2]  # two layers had it when the pass started
    assert waits[2] >= 0.2 and max(waits[:2] + waits[3:]) < 0.1  # waited for that pass only
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode(), lora_routing.use_adapter(name):
        loaded.model(input_ids=ids)  # complete: every layer serves it
