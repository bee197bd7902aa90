"""One end-to-end check in headless Chromium (Debian's /usr/bin/chromium, Playwright's Python
API): type a question, watch the answer stream in, switch the model, see the answer change.
All requests that are not to the app on loopback are blocked (tests never reach the internet).
Set MEDCHAT_SCREENSHOT=path.png to keep a screenshot of the app."""

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from medchat.app import build_app, serve
from medchat.engine import Engine
from medchat.registry import Registry
from tests.support.chat_runs import QUESTIONS, make_adapter

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed"),
]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("browser") / "runs"
    long_greedy = {"max_new_tokens": 200, "temperature": 0.0, "top_p": 1.0,
                   "repetition_penalty": 1.0}
    make_adapter(tiny_model_dir, runs / "r0", seed=100, generation=long_greedy)
    make_adapter(tiny_model_dir, runs / "r1", seed=101, generation=long_greedy)
    reg = Registry(runs, base_name=str(tiny_model_dir), base_path=tiny_model_dir)
    eng = Engine(reg, device="cpu")
    eng.load_base()
    eng.preload()
    demo = build_app(eng, reg, default_model="adapter:r0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", reg
    demo.close()
    shutil.rmtree(runs, ignore_errors=True)


def test_type_question_see_stream_switch_model_see_change(served):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, reg = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            outside = []

            def only_loopback(route):
                if route.request.url.startswith((url, "data:", "blob:")):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_loopback)
            page.goto(url)
            page.wait_for_selector("#message textarea", timeout=60_000)
            bot = page.locator('#chatbot [data-testid="bot"]')
            status = page.locator("#status")

            def ask() -> tuple[str, set[str]]:
                """Send the question; return the final answer and the partial texts seen."""
                page.fill("#message textarea", QUESTIONS[0])
                page.keyboard.press("Enter")
                seen: set[str] = set()
                deadline = time.time() + 120
                while "finish:" not in status.inner_text() and time.time() < deadline:
                    if bot.count():
                        seen.add(bot.last.inner_text())
                    time.sleep(0.02)
                assert "finish:" in status.inner_text(), "the answer never finished"
                return bot.last.inner_text(), seen

            def choose(model_id: str) -> None:
                label = dict((v, k) for k, v in reg.choices())[model_id]
                page.locator("#model input").click()
                page.get_by_role("option", name=label).click()
                page.wait_for_function(
                    "l => document.querySelector('#model input').value === l", arg=label)
                page.get_by_role("button", name="Clear conversation").click()
                page.wait_for_function("!document.querySelector('#chatbot [data-testid=\"bot\"]')")

            first, seen = ask()
            partial = [t for t in seen if t and t != first]
            assert first.strip(), "no answer text"
            assert len(partial) >= 2 and all(first.startswith(t.rstrip()[:20]) for t in partial), \
                "the answer did not stream in"
            if os.environ.get("MEDCHAT_SCREENSHOT"):
                page.screenshot(path=os.environ["MEDCHAT_SCREENSHOT"], full_page=True)

            choose("adapter:r1")
            other, _ = ask()
            assert other.strip() and other != first
            choose("adapter:r0")
            again, _ = ask()
            assert again == first
            assert outside == []
        finally:
            browser.close()


def test_compare_tab_streams_two_models_side_by_side(served):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, reg = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(
                (url, "data:", "blob:")) else r.abort())
            page.goto(url)
            page.get_by_role("tab", name="Compare").click()
            labels = dict((v, k) for k, v in reg.choices())
            for elem, model in (("#model_a", "adapter:r0"), ("#model_b", "adapter:r1")):
                page.locator(f"{elem} input").click()
                page.locator(elem).get_by_role("option", name=labels[model]).click()
            page.fill("#cmessage textarea", QUESTIONS[0])
            page.keyboard.press("Enter")
            a = page.locator('#chat_a [data-testid="bot"]')
            b = page.locator('#chat_b [data-testid="bot"]')
            snapshots = []
            deadline = time.time() + 120
            while "finish:" not in page.locator("#cstatus").inner_text() and time.time() < deadline:
                if a.count() and b.count():
                    snapshots.append((a.last.inner_text(), b.last.inner_text()))
                time.sleep(0.02)
            status = page.locator("#cstatus").inner_text()
            assert status.count("finish:") == 2, status
            ta, tb = a.last.inner_text(), b.last.inner_text()
            assert ta.strip() and tb.strip() and ta != tb
            # at some moment both had text and neither was complete: streamed at once
            assert any(x.strip() and y.strip() and x != ta and y != tb for x, y in snapshots), \
                "the two answers did not stream at the same time"
            if os.environ.get("MEDCHAT_SCREENSHOT"):
                shot = os.environ["MEDCHAT_SCREENSHOT"].replace(".png", "-compare.png")
                page.screenshot(path=shot)
        finally:
            browser.close()
