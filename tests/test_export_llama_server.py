"""A GGUF export served by llama.cpp's own server answers like medchat and stops where medchat
stops (slow: builds llama-server once into the medchat cache, 20-45 min on 2 cores, then reuses
it).

The run is SmolLM2-135M with a mild random LoRA, merged and exported to f32. llama-server is
started by the test with the exported GGUF and `--jinja` (the template embedded in the GGUF),
and stopped by it. It runs one thread: llama.cpp's threads wait for each other by spinning, so
on a busy 2-core machine two threads ran ten times slower than one. Through its
OpenAI-compatible endpoint (the official openai client), with the Modelfile's stop tokens and
every sampling setting explicit (llama.cpp's defaults differ: repeat penalty 1.1 over the last
64 tokens, top-k 40, min-p 0.05), its greedy answers are compared with medchat's: transformers
on the merged model with the settings medchat's engine uses (greedy, the run's repetition
penalty over the whole sequence, the run's stop tokens).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from contextlib import contextmanager

import pytest

from medchat.chat_format import prompt_ids, render
from tests.support.ollama_syntax import check_parameters, parse_modelfile
from tests.support.processes import free_port
from training.export import export_gguf, llama_server, read_fields

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
QUESTIONS = [1, 3, 2]  # of the run's held-out questions: two answers end by themselves, one not
MAX_TOKENS = 160


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


@contextmanager
def _llama_server(binary, gguf, log_dir, *args: str):
    """llama-server on `gguf` (one thread, one slot) until the block ends; yields its URL."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1",
                                 "--port", str(port), "-c", "2048", "-np", "1", "-t", "1", *args],
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t1 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-server exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t1 > 180:
                pytest.fail(f"llama-server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"\nllama-server ready {time.perf_counter() - t1:.1f} s after start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The export served with the template embedded in the GGUF (`--jinja`), named after the
    run (`--alias`, as the README tells users to start it)."""
    from tests.support.export_runs import make_smollm2_run
    from training.merge import merge_run

    t0 = time.perf_counter()
    binary = llama_server()  # built on first use
    print(f"\nllama-server: found/built in {time.perf_counter() - t0:.0f} s")
    run = make_smollm2_run(tmp_path_factory.mktemp("served") / "smol-served")
    merge_run(run, check_prompts=0, progress=False)
    result = export_gguf(run, "f32", progress=False)
    gguf = result.folder / result.files[0].name
    logs = tmp_path_factory.mktemp("llama-server")
    with _llama_server(binary, gguf, logs, "--jinja", "--alias", run.name) as url:
        yield run, result, url, (binary, gguf, logs)


def _medchat_answers(run, questions: list[str]) -> list[tuple[str, str, int]]:
    """(text, finish reason, new tokens) as medchat's engine generates: greedy, the run's
    repetition penalty (transformers applies it over the whole sequence), the run's stop
    tokens ending the answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = run.manifest()
    tok = AutoTokenizer.from_pretrained(run.merged_dir)
    model = AutoModelForCausalLM.from_pretrained(run.merged_dir, dtype=torch.float32).eval()
    stop = [tok.convert_tokens_to_ids(t) for t in manifest.chat.stop_tokens]
    out = []
    for q in questions:
        ids = prompt_ids(tok, [{"role": "system", "content": manifest.chat.system_prompt},
                               {"role": "user", "content": q}])
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 repetition_penalty=manifest.chat.generation.repetition_penalty,
                                 eos_token_id=stop, pad_token_id=stop[0])
        new = gen[0, len(ids):].tolist()
        ended = bool(new) and new[-1] in stop
        out.append((tok.decode(new, skip_special_tokens=True), "stop" if ended else "length",
                    len(new)))
    return out


def test_llama_server_renders_and_tokenizes_the_prompt_like_the_run(served):
    from transformers import AutoTokenizer

    run, _, url, _ = served
    manifest = run.manifest()
    tok = AutoTokenizer.from_pretrained(run.merged_dir)
    conv = [{"role": "system", "content": manifest.chat.system_prompt},
            {"role": "user", "content": "Can I take ibuprofen with food?"},
            {"role": "assistant", "content": "Yes, with food or milk."},
            {"role": "user", "content": 'And with "aspirin"?'}]
    prompt = _post(url + "/apply-template", {"messages": conv})["prompt"]
    assert prompt == render(tok, conv, True)
    tokens = _post(url + "/tokenize", {"content": prompt, "add_special": True})["tokens"]
    assert tokens == prompt_ids(tok, conv)  # and no BOS added by llama.cpp


def test_llama_server_answers_and_stops_like_medchat(served):
    from openai import OpenAI

    run, result, url, _ = served
    manifest = run.manifest()
    stops = check_parameters(parse_modelfile((result.folder / "Modelfile").read_text()))["stop"]
    questions = [run.split_questions("test")[i] for i in QUESTIONS]
    fields, _ = read_fields(result.folder / result.files[0].name)
    window = fields["general.sampling.penalty_last_n"]  # the model's context: every token
    client = OpenAI(base_url=url + "/v1", api_key="none")
    served_answers = []
    for q in questions:
        for with_stop in (True, False):  # the GGUF's end-of-generation ids alone also stop it
            t0 = time.perf_counter()
            r = client.chat.completions.create(
                model="served", max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0, seed=0,
                stop=stops if with_stop else None,
                messages=[{"role": "system", "content": manifest.chat.system_prompt},
                          {"role": "user", "content": q}],
                extra_body={"top_k": 0, "min_p": 0.0, "repeat_last_n": window,
                            "repeat_penalty": manifest.chat.generation.repetition_penalty,
                            "presence_penalty": 0.0, "frequency_penalty": 0.0})
            choice = r.choices[0]
            served_answers.append((choice.message.content, choice.finish_reason,
                                   r.usage.completion_tokens))
            print(f"\nllama-server ({'with' if with_stop else 'without'} stop): "
                  f"{r.usage.completion_tokens} tokens in {time.perf_counter() - t0:.1f} s, "
                  f"{choice.finish_reason}: {choice.message.content[:80]!r}")
    want = _medchat_answers(run, questions)
    for i, (text, reason, n) in enumerate(want):
        for got in served_answers[2 * i:2 * i + 2]:
            assert (got[0], got[1]) == (text, reason), (questions[i], got, text)
    assert [w[1] for w in want].count("stop") >= 2  # answers that end by themselves, not cut


def test_the_llama_server_dialect_serves_the_run_through_medchat(served):
    """medchat's `--dialect llama-server` backend against the real server: it finds the run's
    model under its alias, checks the server's template rendering against the run's, answers
    greedy exactly as medchat's own engine does (the run's repetition penalty over the whole
    answer, every llama.cpp default overridden), streams, cancels, and leaves the models the
    server does not hold to the in-process engine or reports them. A server rendering another
    template is refused, with the reason."""
    from medchat.backend import GenerationSettings
    from medchat.base_model import DEFAULT_BASE_MODEL
    from medchat.engine import Engine
    from medchat.registry import Registry
    from medchat.remote_backend import RemoteBackend
    from tests.support.export_runs import smollm2_base

    run, _, url, (binary, gguf, logs) = served
    manifest = run.manifest()
    reg = Registry(run.path.parent, base_name=DEFAULT_BASE_MODEL, base_path=smollm2_base())
    local = Engine(reg, device="cpu")
    backend = RemoteBackend(reg, url, dialect="llama-server", local=local)
    adapter, merged = f"adapter:{run.name}", f"merged:{run.name}"
    try:
        problems = backend.connect()
        assert [p.split(":")[0] for p in problems] == ["base"], problems  # not on this server
        assert "does not serve 'base'" in problems[0]
        assert set(backend.unavailable()) == {"base"}
        questions = [run.split_questions("test")[i] for i in QUESTIONS[:2]]
        greedy = GenerationSettings(max_new_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0,
                                    repetition_penalty=manifest.chat.generation.repetition_penalty)
        want = _medchat_answers(run, questions)
        for q, (text, reason, n) in zip(questions, want):
            stream = backend.stream_turn(adapter, q, settings=greedy)
            pieces = list(stream)
            assert "".join(pieces) == stream.text == text, q
            assert len(pieces) > 1 and stream.finish_reason == reason and stream.new_tokens == n
        # the merged model stays in-process: the same answer from medchat's own engine
        assert backend.chat(merged, questions[0], settings=greedy) == want[0][0]
        # cancel: the stream ends at once, and the server answers the next request
        long = backend.stream_turn(adapter, questions[1], settings=GenerationSettings(
            max_new_tokens=1000, temperature=0.0, top_p=1.0, repetition_penalty=1.0),
            owner="long")
        next(iter(long))
        t0 = time.perf_counter()
        backend.cancel("long")
        long.result()
        assert long.finish_reason == "cancelled" and time.perf_counter() - t0 < 5
        assert backend.chat(adapter, questions[0], settings=greedy) == want[0][0]
    finally:
        backend.close()
    # the same GGUF with llama.cpp's built-in llama2 template: its prompts differ from the run's
    with _llama_server(binary, gguf, logs, "--chat-template", "llama2",
                       "--alias", run.name) as other:
        refusing = RemoteBackend(reg, other, dialect="llama-server")
        try:
            problems = refusing.connect()
            ours = [p for p in problems if p.startswith(adapter)]
            assert ours and "renders" in ours[0] and "chat template" in ours[0], problems
            assert adapter in refusing.unavailable()
        finally:
            refusing.close()
