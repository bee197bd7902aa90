"""The launched app, driven through gradio_client on a free loopback port."""

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

import launch
import medchat.app
import medchat.server
from medchat.app import Handlers, build_app, serve
from medchat.engine import Engine
from medchat.errors import UserError
from medchat.registry import Registry
from medchat.server import SpaceConfig, SpaceConfigError, load_space_config
from tests.support.chat_runs import QUESTIONS, build_runs, make_adapter, reference_answer
from tests.support.processes import free_port, stop, wait_for_line

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[1]
Q = QUESTIONS[0]
GREEDY = dict(system_prompt="", max_new_tokens=24, temperature=0.0, top_p=1.0,
              repetition_penalty=1.0, seed=-1)


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    shared = build_runs(tmp_path_factory.mktemp("app-src"), tiny_model_dir)
    runs = tmp_path_factory.mktemp("app") / "runs"
    shutil.copytree(shared["runs"], runs)
    reg = Registry(runs, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu")
    eng.load_base()
    assert eng.preload() == []
    demo = build_app(eng, reg)
    port = free_port()
    serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}/", engine=eng, registry=reg,
                                runs=runs, base=tiny_model_dir)
    demo.close()


def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def ask(c, model, message=Q, **settings):
    return c.predict(message, [], model, **{**GREEDY, **settings}, api_name="/chat")


def test_tokens_arrive_incrementally(app):
    c = client(app)
    job = c.submit(Q, [], "adapter:r0", **{**GREEDY, "max_new_tokens": 400}, api_name="/chat")
    seen_partial = False
    while not job.done():
        seen_partial = seen_partial or len(job.outputs()) > 0
        time.sleep(0.005)
    outs = job.outputs()
    assert seen_partial, "no output arrived before the generation finished"
    # the app sends what arrived every 50 ms (Stream.batched), so how many updates a visitor
    # sees depends on how fast the tiny model writes 400 tokens (~0.5 s on 2 cores)
    assert len(outs) >= 5
    assert all(b.startswith(a) for a, b in zip(outs, outs[1:]))  # growing text, in order
    assert len(set(outs)) >= 5 and outs[-1] == job.result()


def test_selecting_an_adapter_changes_the_answer_and_base_restores_it(app):
    c = client(app)
    base1 = ask(c, "base")
    r0 = ask(c, "adapter:r0")
    base2 = ask(c, "base")
    r1 = ask(c, "adapter:r1")
    merged = ask(c, "merged:r0")
    assert base1 == base2 and len({base1, r0, r1}) == 3 and merged == r0
    # and they are the real models' answers, not just different strings
    assert r0 == reference_answer(app.base, Q, app.runs / "r0" / "adapter", 24)
    assert base1.strip() == reference_answer(app.base, Q, None, 24).strip()


def test_two_concurrent_clients_on_different_models_get_what_one_alone_gets(app):
    settings = dict(max_new_tokens=150, temperature=0.8, top_p=0.95, seed=42)
    a, b = client(app), client(app)
    alone_a, alone_b = ask(a, "adapter:r0", **settings), ask(b, "adapter:r1", **settings)
    assert alone_a != alone_b
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], app.engine.active())
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()
    for _ in range(2):
        ja = a.submit(Q, [], "adapter:r0", **{**GREEDY, **settings}, api_name="/chat")
        jb = b.submit(Q, [], "adapter:r1", **{**GREEDY, **settings}, api_name="/chat")
        assert (ja.result(), jb.result()) == (alone_a, alone_b)
    stop.set()
    assert peak[0] >= 2, "the two requests never ran at the same time"


def test_stop_ends_a_generation(app):
    c = client(app)
    job = c.submit(Q, [], "adapter:r0", **{**GREEDY, "max_new_tokens": 900}, api_name="/chat")
    while len(job.outputs()) < 3:
        assert not job.done(), "finished before it could be stopped"
        time.sleep(0.01)
    t0 = time.perf_counter()
    assert c.predict(api_name="/stop") == 1
    text = job.result()
    assert time.perf_counter() - t0 < 3
    assert app.engine.active() == 0
    full = ask(c, "adapter:r0", max_new_tokens=900)
    assert full.startswith(text) and len(text) < len(full)
    # a client that goes away (job.cancel) also frees the slot
    job = c.submit(Q, [], "adapter:r1", **{**GREEDY, "max_new_tokens": 900}, api_name="/chat")
    while len(job.outputs()) < 3:
        time.sleep(0.01)
    job.cancel()
    deadline = time.time() + 5
    while app.engine.active() and time.time() < deadline:
        time.sleep(0.02)
    assert app.engine.active() == 0


@pytest.mark.parametrize("name", ["/etc/passwd", "../runs/r0/adapter", "runs/r0/merged",
                                  "HuggingFaceTB/SmolLM2-135M-Instruct", "adapter:missing"])
def test_an_unregistered_model_name_is_refused(app, name):
    from gradio_client.exceptions import AppError

    before = app.engine.loaded()
    with pytest.raises(AppError, match="not registered"):
        ask(client(app), name)
    assert app.engine.loaded() == before


def test_models_and_refresh_endpoints(app):
    c = client(app)
    ids = [m["id"] for m in c.predict(api_name="/models")]
    assert ids == ["base", "adapter:r0", "adapter:r1", "merged:r0"]
    make_adapter(app.base, app.runs / "late", seed=21)
    try:
        ids = [m["id"] for m in c.predict(api_name="/refresh")]
        assert "adapter:late" in ids
        want = reference_answer(app.base, Q, app.runs / "late" / "adapter", 24)
        assert ask(c, "adapter:late") == want
    finally:
        shutil.rmtree(app.runs / "late")
        c.predict(api_name="/refresh")


def test_settings_errors_reach_the_client(app):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="temperature"):
        ask(client(app), "base", temperature=9.0)
    with pytest.raises(AppError, match="seed"):
        ask(client(app), "base", seed="abc")
    with pytest.raises(AppError, match="empty"):
        ask(client(app), "base", message="   ")


@pytest.mark.timeout(180)
def test_python_launch_py_serves_the_app(app, tmp_path):
    """`python launch.py` as a user runs it: prepares the base, serves, answers."""
    from gradio_client import Client

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("SPACE_ID", None)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "launch.py"), "--runs", str(app.runs), "--base",
         str(app.base), "--port", str(port), "--device", "cpu"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = wait_for_line(proc, f"127.0.0.1:{port}")
        assert f"127.0.0.1:{port}" in log, log
        assert "preparing base model" in log and "model(s) ready" in log
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        want = reference_answer(app.base, Q, app.runs / "r1" / "adapter", 24)
        assert ask(c, "adapter:r1") == want
    finally:
        stop(proc)


def test_space_mode_pulls_configured_models_and_binds_as_spaces_expect(app, tmp_path, monkeypatch):
    """SPACE_ID set: 0.0.0.0:$PORT, space_config.json models pulled, spaces.GPU wraps generation."""
    runs = tmp_path / "runs"
    cfg = tmp_path / "space_config.json"
    cfg.write_text(json.dumps({"base_model": str(app.base), "models": ["owner/medqa"]}))
    pulled, gpu_calls, served = [], [], {}

    def fake_pull(repo_id, revision=None, runs_dir=None):
        target = Path(runs_dir) / repo_id.replace("/", "--")
        shutil.copytree(app.runs / "r1", target, ignore=shutil.ignore_patterns("merged"))
        pulled.append((repo_id, revision, Path(runs_dir)))
        return target

    spaces_mod = types.ModuleType("spaces")

    def GPU(fn):  # noqa: N802 - like spaces.GPU: functools.wraps around a generator
        @functools.wraps(fn)
        def wrapped(*a, **k):
            gpu_calls.append(fn.__name__)
            yield from fn(*a, **k)
        return wrapped

    spaces_mod.GPU = GPU
    monkeypatch.setattr(medchat.server, "pull", fake_pull)
    monkeypatch.setitem(sys.modules, "spaces", spaces_mod)
    port = free_port()
    monkeypatch.setenv("SPACE_ID", "owner/medchat-space")
    monkeypatch.setenv("PORT", str(port))
    monkeypatch.setenv("MEDCHAT_SPACE_CONFIG", str(cfg))

    real_serve = medchat.app.serve

    def fake_serve(demo, host, port, share, **kw):  # record the binding, serve on loopback
        served.update(host=host, port=port, share=share, demo=demo)
        real_serve(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)

    monkeypatch.setattr(medchat.app, "serve", fake_serve)
    assert launch.main(["--runs", str(runs), "--device", "cpu"]) == 0
    try:
        assert served["host"] == "0.0.0.0" and served["port"] == port and not served["share"]
        assert pulled == [("owner/medqa", None, runs)]
        from gradio_client import Client

        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        ids = [m["id"] for m in c.predict(api_name="/models")]
        assert ids == ["base", "adapter:owner--medqa"]
        got = ask(c, "adapter:owner--medqa")
        assert got == reference_answer(app.base, Q, runs / "owner--medqa" / "adapter", 24)
        assert "chat" in gpu_calls
    finally:
        served["demo"].close()


def test_space_config_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "space_config.json"
    bad.write_text('{"models": "owner/repo"}')
    with pytest.raises(SpaceConfigError, match="space_config.json: field models"):
        load_space_config(bad)
    bad.write_text("{oops")
    with pytest.raises(SpaceConfigError, match="line 1: invalid JSON"):
        load_space_config(bad)
    ok = tmp_path / "ok.json"
    ok.write_text('{"base_model": "o/b", "models": ["o/a"]}')
    assert load_space_config(ok) == SpaceConfig("o/b", ["o/a"])
    assert issubclass(SpaceConfigError, UserError)


def test_hub_panel_uses_the_pull_it_is_handed(app, tmp_path):
    """No pull: no "Add from Hub" panel. A pull: the panel calls it and selects what it added."""
    import gradio as gr

    def buttons(demo):
        return {b.value for b in demo.blocks.values() if isinstance(b, gr.Button)}

    pulled = []

    def fake_pull(repo_id, revision=None, runs_dir=None):
        target = Path(runs_dir) / repo_id.replace("/", "--")
        shutil.copytree(app.runs / "r1", target, ignore=shutil.ignore_patterns("merged"))
        pulled.append((repo_id, revision, Path(runs_dir)))
        return target

    assert "Add from Hub" not in buttons(build_app(app.engine, app.registry))
    assert "Add from Hub" in buttons(build_app(app.engine, app.registry, pull=fake_pull))
    h = Handlers(app.engine, app.registry, pull=fake_pull)
    with pytest.raises(gr.Error, match="not a Hub repo id"):
        h.add_from_hub("../etc", "", "base", "base", "base")
    assert pulled == []
    try:
        model, a, b, note = h.add_from_hub(" owner/extra ", " v1 ", "base", "base", "base")
        assert pulled == [("owner/extra", "v1", app.registry.runs_dir)]
        assert model["value"] == "adapter:owner--extra" and a["value"] == "base"
        assert "adapter:owner--extra" in app.registry.ids()
        assert note == "Added owner/extra as adapter:owner--extra."
    finally:
        shutil.rmtree(app.runs / "owner--extra", ignore_errors=True)
        app.registry.refresh()


def test_app_modules_import_without_training_packages():
    """The app (and a Space) must not need bitsandbytes/deepspeed or the training entry points:
    importing its modules pulls in none of them (torch/transformers/peft load on first use)."""
    code = ("import sys, launch, medchat.app, medchat.engine, medchat.registry, medchat.terminal, "
            "medchat.server, medchat.lora_routing, medchat.model_cache; "
            "print(sorted(m for m in ('deepspeed', 'bitsandbytes', 'training.run', "
            "'training.merge', 'torch') if m in sys.modules), "
            "sorted(m for m in sys.modules if m.split('.')[0] == 'training'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"


def test_compare_takes_both_generation_slots_or_none(app):
    """Compare needs two slots: with one allowed it is refused at once; with two allowed and one
    busy it waits holding nothing, then gets both."""
    import gradio as gr

    from medchat.backend import Limits

    visitor = types.SimpleNamespace(session_hash="compare-visitor")
    settings = (24, 0.0, 1.0, 1.0, -1)
    one = Handlers(Engine(app.registry, device="cpu", limits=Limits(max_active=1)), app.registry)
    with pytest.raises(gr.Error, match="needs 2 generations at once"):
        one.start_all([("base", []), ("adapter:r0", [])], Q, "", settings, visitor)
    assert one.backend.admission.counts() == (0, 0)

    eng = Engine(app.registry, device="cpu", limits=Limits(max_active=2, max_waiting=4))
    h = Handlers(eng, app.registry)
    busy = h.start("adapter:r1", Q, [], "", (900, 0.0, 1.0, 1.0, -1), visitor)
    got = []
    waiter = threading.Thread(target=lambda: got.append(
        h.start_all([("base", []), ("adapter:r0", [])], Q, "", settings, visitor)))
    waiter.start()
    deadline = time.time() + 5
    while eng.admission.counts() != (1, 1) and time.time() < deadline:
        time.sleep(0.01)
    assert eng.admission.counts() == (1, 1)  # one running, Compare waiting with no slot held
    busy.cancel()
    waiter.join(30)
    streams = got[0]
    assert [s.result() for s in streams] == [ask(client(app), "base"), ask(client(app),
                                                                           "adapter:r0")]
    assert eng.admission.counts() == (0, 0)


@pytest.mark.parametrize("fn", ["respond", "compare"])
def test_a_client_gone_at_the_first_update_cancels_its_generation(app, fn):
    """The first update is already inside the try/finally: closing the handler there (what
    Gradio does when the client disconnects) stops the generation."""
    h = Handlers(app.engine, app.registry)
    visitor = types.SimpleNamespace(session_hash=f"gone-{fn}")
    settings = (900, 0.0, 1.0, 1.0, -1)
    if fn == "respond":
        gen = h.respond_fn()(Q, [], "adapter:r0", "", *settings, visitor)
    else:
        gen = h.compare_fn()(Q, [], [], "adapter:r0", "adapter:r1", "", *settings, visitor)
    next(gen)  # the first update: the conversation with the question
    assert app.engine.active() >= 1
    gen.close()
    deadline = time.time() + 5
    while app.engine.active() and time.time() < deadline:
        time.sleep(0.02)
    assert app.engine.active() == 0


def test_the_answer_length_slider_stops_at_the_servers_limit(app):
    import gradio as gr

    from medchat.backend import Limits

    eng = Engine(app.registry, device="cpu", limits=Limits(max_new_tokens=300, max_waiting=5))
    demo = build_app(eng, app.registry)
    slider = next(b for b in demo.blocks.values()
                  if isinstance(b, gr.Slider) and b.label == "Max new tokens")
    assert slider.maximum == 300 and slider.value <= 300
    assert demo._queue.max_size == 5


def test_add_from_hub_defaults_and_the_visitors_pull(monkeypatch, tmp_path):
    """Off beyond loopback, with a public link and on a Space unless asked for; a visitor's
    pull is anonymous unless the operator lends the token, and capped in size."""
    allowed = medchat.server.hub_pull_allowed
    assert allowed(None, "127.0.0.1", False, False) and allowed(None, "localhost", False, False)
    assert not allowed(None, "0.0.0.0", False, False)
    assert not allowed(None, "192.168.1.4", False, False)
    assert not allowed(None, "127.0.0.1", True, False)
    assert not allowed(None, "127.0.0.1", False, True) and not allowed(True, "::", False, True)
    assert allowed(True, "0.0.0.0", False, False) and not allowed(False, "127.0.0.1", False, False)
    calls = []
    monkeypatch.setattr(medchat.server, "pull", lambda *a, **k: calls.append((a, k)) or tmp_path)
    medchat.server.ui_pull(False, 2.5)("o/r", revision="v1", runs_dir=tmp_path)
    medchat.server.ui_pull(True, 1)("o/r", revision=None, runs_dir=tmp_path)
    assert calls == [(("o/r",), dict(anonymous=True, max_bytes=2_500_000_000, revision="v1",
                                     runs_dir=tmp_path)),
                     (("o/r",), dict(anonymous=False, max_bytes=1_000_000_000, revision=None,
                                     runs_dir=tmp_path))]


def test_limit_flags_and_keys_are_checked_before_anything_loads(monkeypatch, capsys):
    monkeypatch.delenv("MEDCHAT_TEST_KEY", raising=False)
    assert medchat.server.main(["--api-key-env", "MEDCHAT_TEST_KEY", "--base", "/nowhere"]) == 2
    assert "MEDCHAT_TEST_KEY: that environment variable is empty" in capsys.readouterr().err
    assert medchat.server.main(["--backend", "openai"]) == 2
    assert "--backend openai needs --backend-url" in capsys.readouterr().err
    assert medchat.server.main(["--concurrency", "0"]) == 2
    assert "max_active" in capsys.readouterr().err


def test_app_with_a_server_backend_serves_the_ui_and_v1_through_it(app, monkeypatch):
    """`medchat app --backend openai --backend-url URL --dialect medchat`: the UI and /v1 answer
    through the server at URL (here the fixture's app), as it answers itself."""
    from gradio_client import Client
    import openai

    served = {}
    real_serve = medchat.app.serve

    def fake_serve(demo, host, port, share, **kw):
        served["demo"] = demo
        real_serve(demo, host=host, port=port, prevent_thread_lock=True, quiet=True)

    monkeypatch.setattr(medchat.app, "serve", fake_serve)
    monkeypatch.delenv("SPACE_ID", raising=False)
    port = free_port()
    assert launch.main(["--runs", str(app.runs), "--base", str(app.base), "--port", str(port),
                        "--device", "cpu", "--backend", "openai", "--backend-url",
                        app.url.rstrip("/"), "--dialect", "medchat"]) == 0
    seen = []  # what the fixture's engine (the server) was asked
    real_start = app.engine._start
    monkeypatch.setattr(app.engine, "_start", lambda e, r: seen.append(e.id) or real_start(e, r))
    try:
        ui = ask(Client(f"http://127.0.0.1:{port}/", verbose=False), "adapter:r1")
        assert seen == ["adapter:r1"]
        assert ui == ask(client(app), "adapter:r1")
        v1 = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in v1.models.list().data] == ["base", "adapter:r0", "adapter:r1",
                                                          "merged:r0"]
        got = v1.chat.completions.create(model="merged:r0", messages=[
            {"role": "user", "content": Q}], max_tokens=24, temperature=0, top_p=1,
            extra_body={"repetition_penalty": 1.0})
        assert seen[-1] == "merged:r0"
        assert got.choices[0].message.content == ask(client(app), "merged:r0")
    finally:
        served["demo"].close()


def test_compare_tab_shows_the_evaluation_of_model_b_run(app):
    """The Compare tab's evaluation panel: a run's eval.md as written, a note for a run not yet
    evaluated and for the base; an unknown id gets nothing."""
    from medchat.run_folder import Run

    h = Handlers(app.engine, app.registry)
    run = Run(app.registry.get("adapter:r0").run_dir)
    report = "# Evaluation\n\n| score | base | adapter |\n|---|---:|---:|\n| ROUGE-L | 10.0 | 12.5 |\n"
    run.eval_report_path.write_text(report, encoding="utf-8")
    try:
        assert h.evaluation("adapter:r0") == report
        assert "has not been evaluated yet" in h.evaluation("adapter:r1")
        assert "medchat evaluate r1" in h.evaluation("adapter:r1")
        assert "no evaluation of its own" in h.evaluation("base")
        assert h.evaluation("../../etc/passwd") == ""
        run.eval_report_path.write_text("x" * 300_000, encoding="utf-8")
        shown = h.evaluation("adapter:r0")
        assert len(shown) < 201_000 and shown.endswith("*(report cut here)*")
        assert str(app.runs) not in h.evaluation("adapter:r1")
    finally:
        run.eval_report_path.unlink()
