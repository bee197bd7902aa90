"""The app's OpenAI-compatible API (/v1 on the app's own port), driven by the official `openai`
client: every model kind, streaming and not, the same text as the UI's /chat, OpenAI-shaped
errors, the key, the shared waiting line, and disconnects."""

from __future__ import annotations

import shutil
import threading
import time
import types

import httpx
import pytest

from medchat.app import build_app, serve
from medchat.backend import Limits
from medchat.engine import Engine
from medchat.registry import Registry
from tests.support.chat_runs import QUESTIONS, build_runs, reference_answer
from tests.support.processes import free_port

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(240)
Q = QUESTIONS[0]
GREEDY = dict(max_tokens=24, temperature=0.0, top_p=1.0, extra_body={"repetition_penalty": 1.0})
KEY = "test-key-not-secret"


def launch(engine, registry, **kw):
    demo = build_app(engine, registry, **kw)
    port = free_port()
    serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    shared = build_runs(tmp_path_factory.mktemp("api-src"), tiny_model_dir)
    runs = tmp_path_factory.mktemp("api") / "runs"
    shutil.copytree(shared["runs"], runs)
    reg = Registry(runs, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu", limits=Limits(max_new_tokens=1000))
    eng.load_base()
    demo, url = launch(eng, reg)
    yield types.SimpleNamespace(url=url, engine=eng, registry=reg, runs=runs,
                                base=tiny_model_dir,
                                client=openai.OpenAI(base_url=url + "/v1", api_key="unused",
                                                     max_retries=0))
    demo.close()


def chat(client, model, message=Q, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": message}], **{**GREEDY, **kw})


def test_models_lists_every_kind_with_parent_for_adapters(app):
    models = {m.id: m for m in app.client.models.list().data}
    assert list(models) == ["base", "adapter:r0", "adapter:r1", "merged:r0"]
    assert all(m.owned_by == "medchat" and m.object == "model" for m in models.values())
    assert [models[i].model_extra["parent"] for i in models] == [None, "base", "base", None]
    assert app.client.models.retrieve("adapter:r1").id == "adapter:r1"
    with pytest.raises(openai.NotFoundError):
        app.client.models.retrieve("adapter:nope")


@pytest.mark.parametrize("model,adapter", [("base", None), ("adapter:r0", "r0"),
                                           ("adapter:r1", "r1"), ("merged:r0", "r0")])
def test_every_model_kind_answers_as_transformers_does_streamed_or_not(app, model, adapter):
    want = reference_answer(app.base, Q, app.runs / adapter / "adapter" if adapter else None, 24)
    whole = chat(app.client, model)
    assert whole.choices[0].message.content == want
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.model == model
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(chat(app.client, model, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] \
        == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_same_seed_and_settings_same_text_through_the_ui_api_and_v1(app):
    from gradio_client import Client

    settings = dict(max_new_tokens=60, temperature=0.9, top_p=0.95, repetition_penalty=1.1,
                    seed=1234)
    ui = Client(app.url + "/", verbose=False).predict(
        Q, [], "adapter:r1", "", *settings.values(), api_name="/chat")
    v1 = chat(app.client, "adapter:r1", max_tokens=60, temperature=0.9, top_p=0.95,
              seed=1234, extra_body={"repetition_penalty": 1.1}).choices[0].message.content
    assert v1 == ui and len(v1) > 20
    other = chat(app.client, "adapter:r1", max_tokens=60, temperature=0.9, top_p=0.95,
                 seed=99, extra_body={"repetition_penalty": 1.1}).choices[0].message.content
    assert other != v1


def test_stop_strings_and_max_completion_tokens(app):
    full = chat(app.client, "adapter:r0", max_tokens=40).choices[0].message.content
    cut = full.split()[3]
    stopped = chat(app.client, "adapter:r0", max_tokens=40, stop=[cut])
    assert full.startswith(stopped.choices[0].message.content)
    assert len(stopped.choices[0].message.content) < len(full)
    short = app.client.chat.completions.create(
        model="adapter:r0", messages=[{"role": "user", "content": Q}], temperature=0,
        max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def post(app, body, timeout=60):
    return httpx.post(app.url + "/v1/chat/completions", json=body, timeout=timeout)


def msgs(text=Q):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("body,status,param", [
    ({"model": "adapter:nope", "messages": msgs()}, 404, "model"),
    ({"model": "/etc/passwd", "messages": msgs()}, 404, "model"),
    ({"messages": msgs()}, 400, "model"),
    ({"model": "base"}, 400, "messages"),
    ({"model": "base", "messages": "hi"}, 400, "messages"),
    ({"model": "base", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages"),
    ({"model": "base", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ({"model": "base", "messages": msgs(), "temperature": "hot"}, 400, "temperature"),
    ({"model": "base", "messages": msgs(), "temperature": 9}, 400, "temperature"),
    ({"model": "base", "messages": msgs(), "top_p": 0}, 400, "top_p"),
    ({"model": "base", "messages": msgs(), "max_tokens": 1.5}, 400, "max_tokens"),
    ({"model": "base", "messages": msgs(), "max_tokens": True}, 400, "max_tokens"),
    ({"model": "base", "messages": msgs(), "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": "base", "messages": msgs(), "seed": "x"}, 400, "seed"),
    ({"model": "base", "messages": msgs(), "stop": [1]}, 400, "stop"),
    ({"model": "base", "messages": msgs(), "stop": ["a"] * 20}, 400, "stop"),
    ({"model": "base", "messages": msgs(), "n": 2}, 400, "n"),
    ({"model": "base", "messages": msgs(), "stream": "yes"}, 400, "stream"),
    ({"model": "base", "messages": msgs(), "logprobs": True}, 400, "logprobs"),
    ({"model": "base", "messages": msgs("x" * 9000)}, 400, "messages"),
])
def test_bad_requests_get_openai_shaped_errors_naming_the_field(app, body, status, param):
    r = post(app, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param or err["param"].startswith(param + "[")
    assert err["message"] and str(app.runs) not in err["message"]


def test_unknown_fields_are_ignored_and_the_client_maps_errors(app):
    r = post(app, {"model": "base", "messages": msgs(), "max_tokens": 2, "temperature": 0,
                   "user": "someone", "some_future_field": {"x": 1}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    with pytest.raises(openai.NotFoundError, match="not registered"):
        chat(app.client, "adapter:missing")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(app.client, "base", temperature=7)
    r = httpx.post(app.url + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(app.url + "/v1/chat/completions", content=b"x" * 1_200_000, timeout=10)
    assert r.status_code == 413


def test_a_full_waiting_line_is_told_429_and_the_ui_busy(app):
    """One slot, no waiting line, shared by the UI and /v1: the second request is refused at
    once (429 with Retry-After on /v1, "busy, retry" in the UI), and served once the first ends;
    Compare needs two slots and is refused without holding one."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    eng = Engine(app.registry, device="cpu", limits=Limits(max_active=1, max_waiting=0))
    demo, url = launch(eng, app.registry)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        long = chat(client, "adapter:r0", max_tokens=900, stream=True)
        next(iter(long))  # the slot is taken
        r = httpx.post(url + "/v1/chat/completions", timeout=10,
                       json={"model": "base", "messages": msgs(), "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "busy" in r.json()["error"]["message"]
        with pytest.raises(AppError, match="busy"):
            Client(url + "/", verbose=False).predict(Q, [], "base", "", 2, 0.0, 1.0, 1.0, -1,
                                                     api_name="/chat")
        long.close()  # the client leaves: its generation is cancelled, the slot freed
        deadline = time.time() + 5
        while eng.active() and time.time() < deadline:
            time.sleep(0.02)
        assert eng.active() == 0 and eng.admission.counts() == (0, 0)
        assert chat(client, "base", max_tokens=2).usage.completion_tokens == 2
    finally:
        demo.close()


def test_the_key_is_required_when_configured(app):
    demo, url = launch(app.engine, app.registry, api_key=KEY)
    try:
        r = httpx.get(url + "/v1/models", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in r.text
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            chat(wrong, "base", max_tokens=2)
        right = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert chat(right, "base", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(url + "/", timeout=10).status_code == 200  # the UI stays the UI's
    finally:
        demo.close()


def test_a_client_that_disconnects_cancels_its_generation(app):
    body = {"model": "adapter:r1", "messages": msgs(), "max_tokens": 900, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", app.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert app.engine.active() == 1
    deadline = time.time() + 5
    while app.engine.active() and time.time() < deadline:
        time.sleep(0.02)
    assert app.engine.active() == 0
    # non-streaming: the generation stops when the client gives up waiting
    t = threading.Thread(target=lambda: pytest.raises(
        httpx.ReadTimeout, post, app, {**body, "stream": False}, timeout=1.0))
    t.start()
    t.join()
    deadline = time.time() + 5
    while app.engine.active() and time.time() < deadline:
        time.sleep(0.05)
    assert app.engine.active() == 0
