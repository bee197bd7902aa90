"""The Gradio app over the engine and the registry: a streaming chat with a model selector
(base / adapter / merged, with base model and eval score), a side-by-side compare view, and an
"add from Hub" control. Start it with `python launch.py` (see there for the options).

API endpoints (for `gradio_client`, tests and benchmarks), all on the queue:

    /chat     (message, history, model, system_prompt, max_new_tokens, temperature, top_p,
               repetition_penalty, seed) -> streams the answer so far (str) as it grows
    /models   () -> [{"id", "kind", "label"}]   what `model` may be
    /stop     () -> int   cancels this client's running generations
    /refresh  () -> [{"id", "kind", "label"}]   rescan the runs folder

`model` must be a registered id (see /models); anything else is refused by the engine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import queue
import re
import threading
from typing import Any, Callable, Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry / version check calls

import gradio as gr  # noqa: E402

from medchat.engine import Engine, EngineError, GenerationSettings, SettingsError, Stream  # noqa: E402
from medchat.registry import BASE_ID, Registry, UnknownModelError  # noqa: E402

DISCLAIMER = ("**Not medical advice.** Answers come from a small language model fine-tuned on "
              "MedicationQA; they can be wrong or out of date. Ask a doctor or pharmacist before "
              "acting on them, and call your local emergency number in an emergency.")
FALLBACK_EXAMPLES = ["How should I take metformin?", "What is lisinopril used for?",
                     "Can I drink alcohol while taking ibuprofen?"]
CSS = """
#disclaimer {border-left: 4px solid #d97706; background: #fffbeb; padding: 6px 12px;
             border-radius: 6px; color: #78350f}
#disclaimer p {margin: 0}
#status {min-height: 1.5em; font-size: 0.85em; color: #6b7280}
"""
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")

UserError = (UnknownModelError, EngineError, SettingsError)


def hub_pull_available() -> bool:
    """The "Add from Hub" control needs hub.pull (written by the hub issue); hidden without it."""
    try:
        return importlib.util.find_spec("hub.pull") is not None
    except (ImportError, ValueError):
        return False


def _settings(max_new_tokens, temperature, top_p, repetition_penalty, seed,
              defaults: dict[str, Any] | None = None) -> GenerationSettings:
    try:
        seed = None if seed is None or seed == "" or int(seed) < 0 else int(seed)
    except (TypeError, ValueError):
        raise SettingsError(f"seed: {seed!r} is not a whole number (-1 = random)") from None
    return GenerationSettings.from_defaults(
        defaults, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed)


def _status(stream: Stream) -> str:
    if stream.finish_reason is None:
        return ""
    parts = [f"{stream.model}", f"{stream.new_tokens} tokens", f"finish: {stream.finish_reason}"]
    if stream.seed is not None:
        parts.append(f"seed {stream.seed}")
    return " · ".join(parts)


def merge_streams(streams: list[Stream], interval: float = 0.05) -> Iterator[tuple[int, str]]:
    """(index, piece) from several streams as each piece arrives (for the compare view)."""
    q: queue.Queue = queue.Queue()

    def pump(i: int, s: Stream) -> None:
        try:
            for piece in s.batched(interval):
                q.put((i, piece))
        except BaseException as e:  # surfaced to the reader below
            q.put((i, e))
        finally:
            q.put((i, None))

    for i, s in enumerate(streams):
        threading.Thread(target=pump, args=(i, s), daemon=True).start()
    open_ = len(streams)
    try:
        while open_:
            i, item = q.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for s in streams:  # closed early (Stop, page left): stop the rest too
            s.cancel()


def build_app(engine: Engine, registry: Registry, *, allow_pull: bool = True,
              gpu: Callable | None = None, default_model: str | None = None,
              concurrency: int | None = 4, title: str = "medchat",
              stream_interval: float = 0.05) -> gr.Blocks:
    """The Blocks app. `gpu` wraps the generating functions (spaces.GPU on a ZeroGPU Space);
    `stream_interval`: pieces arriving closer together than this are sent as one update."""
    wrap = gpu or (lambda f: f)
    pull_ok = allow_pull and hub_pull_available()

    def default_id() -> str:
        ids = registry.ids()
        if default_model in ids:
            return default_model
        tuned = [i for i in ids if i != BASE_ID]
        return tuned[0] if tuned else BASE_ID

    def placeholder(model_id: str) -> str:
        try:
            return registry.get(model_id).system_prompt
        except UnknownModelError:
            return ""

    def start(model, message, history, system, settings, request) -> Stream:
        owner = getattr(request, "session_hash", None)
        try:
            entry = registry.get(model)
            settings = _settings(*settings, defaults=entry.generation)
            return engine.stream(model, message, history, system, settings, owner=owner)
        except UserError as e:
            raise gr.Error(str(e)) from None

    # -- chat tab --------------------------------------------------------------------------------

    @wrap
    def respond(message, history, model, system, max_new, temp, top_p, rep, seed,
                request: gr.Request):
        history = list(history or [])
        if not (message or "").strip():
            yield history, message, ""
            return
        stream = start(model, message, history, system, (max_new, temp, top_p, rep, seed), request)
        for notice in stream.notices:
            gr.Warning(notice)
        history = history + [{"role": "user", "content": message},
                             {"role": "assistant", "content": ""}]
        yield history, "", ""
        try:
            for piece in stream.batched(stream_interval):
                history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}
                yield history, "", ""
        except EngineError as e:
            raise gr.Error(str(e)) from None
        finally:
            stream.cancel()  # no-op when finished; stops generation when the client went away
        yield history, "", _status(stream)

    # -- compare tab -----------------------------------------------------------------------------

    @wrap
    def compare(message, hist_a, hist_b, model_a, model_b, system, max_new, temp, top_p, rep,
                seed, request: gr.Request):
        hist_a, hist_b = list(hist_a or []), list(hist_b or [])
        if not (message or "").strip():
            yield hist_a, hist_b, message, ""
            return
        settings = (max_new, temp, top_p, rep, seed)
        if temp and float(temp) > 0 and (seed is None or int(seed) < 0):
            # both sides draw with the same seed, so differences come from the models
            settings = settings[:4] + (int.from_bytes(os.urandom(3), "big"),)
        streams = [start(model_a, message, hist_a, system, settings, request)]
        try:
            streams.append(start(model_b, message, hist_b, system, settings, request))
        except gr.Error:
            streams[0].cancel()
            raise
        for notice in dict.fromkeys(n for s in streams for n in s.notices):
            gr.Warning(notice)
        hists = [h + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
                 for h in (hist_a, hist_b)]
        yield hists[0], hists[1], "", ""
        try:
            for i, piece in merge_streams(streams, stream_interval):
                hists[i][-1] = {"role": "assistant", "content": hists[i][-1]["content"] + piece}
                yield hists[0], hists[1], "", ""
        except EngineError as e:
            raise gr.Error(str(e)) from None
        yield hists[0], hists[1], "", " | ".join(_status(s) for s in streams)

    # -- API -------------------------------------------------------------------------------------

    def models() -> list[dict]:
        return [{"id": e.id, "kind": e.kind, "label": e.label} for e in registry.entries()]

    @wrap
    def chat(message: str, history: list, model: str, system_prompt: str = "",
             max_new_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, request: gr.Request = None) -> Iterator[str]:
        """Stream the answer (the text so far) of `model` to `message` after `history`."""
        stream = start(model, message, history or [], system_prompt,
                       (max_new_tokens, temperature, top_p, repetition_penalty,
                        -1 if seed is None else seed), request)
        for notice in stream.notices:
            gr.Warning(notice)
        try:
            for _ in stream.batched(stream_interval):
                yield stream.text
        except EngineError as e:
            raise gr.Error(str(e)) from None
        finally:
            stream.cancel()
        if not stream.text:
            yield ""

    def stop(request: gr.Request = None) -> int:
        """Cancel this client's running generations; returns how many."""
        owner = getattr(request, "session_hash", None)
        return engine.cancel(owner) if owner else 0

    def stop_ui(request: gr.Request):  # the Stop buttons (own name: api names must be unique)
        stop(request)

    def refresh_api() -> list[dict]:
        registry.refresh()
        return models()

    # -- layout ----------------------------------------------------------------------------------

    first = default_id()
    held_out = registry.examples(limit=8, model_id=first)
    examples = held_out or FALLBACK_EXAMPLES
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nChat with the base model and its fine-tuned versions; "
                    "compare two side by side.")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    model = gr.Dropdown(registry.choices(), value=first, label="Model",
                                        scale=8, elem_id="model")
                    with gr.Column(scale=1, min_width=110):
                        refresh = gr.Button("↻ Refresh models", size="sm", elem_id="refresh")
                chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot",
                                     buttons=["copy"])
                with gr.Row():
                    box = gr.Textbox(placeholder="Ask about a medication…", show_label=False,
                                     scale=8, autofocus=True, elem_id="message", lines=1)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=80,
                                     elem_id="send")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80,
                                         elem_id="stop")
                status = gr.Markdown(elem_id="status")
                ex = gr.Examples([[q] for q in examples], inputs=[box],
                                 label="Examples (held-out test questions)" if held_out
                                 else "Examples")
                clear = gr.Button("Clear conversation", size="sm")
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    ids = registry.ids()
                    model_a = gr.Dropdown(registry.choices(), value=BASE_ID, label="Model A",
                                          elem_id="model_a")
                    model_b = gr.Dropdown(registry.choices(), value=first if first != BASE_ID
                                          else (ids[1] if len(ids) > 1 else BASE_ID),
                                          label="Model B", elem_id="model_b")
                with gr.Row():
                    chat_a = gr.Chatbot(label="A", height=380, elem_id="chat_a")
                    chat_b = gr.Chatbot(label="B", height=380, elem_id="chat_b")
                with gr.Row():
                    cbox = gr.Textbox(placeholder="One question, two models…", show_label=False,
                                      scale=8, elem_id="cmessage")
                    csend = gr.Button("Ask both", variant="primary", scale=1, min_width=80)
                    cstop = gr.Button("Stop", variant="stop", scale=1, min_width=80)
                cstatus = gr.Markdown(elem_id="cstatus")
                cclear = gr.Button("Clear", size="sm")
        with gr.Accordion("System prompt and generation settings", open=False):
            system = gr.Textbox(label="System prompt (empty: the model's own, shown greyed)",
                                placeholder=placeholder(first), lines=2, elem_id="system")
            defaults = GenerationSettings.from_defaults(
                registry.get(first).generation if first in registry.ids() else None)
            with gr.Row():
                max_new = gr.Slider(1, 2048, value=defaults.max_new_tokens, step=1,
                                    label="Max new tokens")
                temp = gr.Slider(0, 2, value=defaults.temperature, step=0.05,
                                 label="Temperature (0 = greedy)")
            with gr.Row():
                top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p")
                rep = gr.Slider(0.8, 2, value=defaults.repetition_penalty, step=0.05,
                                label="Repetition penalty")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
        with gr.Accordion("Add a model from the Hugging Face Hub", open=False, visible=pull_ok):
            with gr.Row():
                repo = gr.Textbox(label="Repo id", placeholder="owner/name", scale=4)
                revision = gr.Textbox(label="Revision (optional)", scale=2)
                pull_btn = gr.Button("Add from Hub", scale=1)
            pull_status = gr.Markdown()

        settings_in = [system, max_new, temp, top_p, rep, seed]
        limit = {"concurrency_limit": concurrency, "concurrency_id": "generate"}
        ev1 = box.submit(respond, [box, chatbot, model] + settings_in, [chatbot, box, status],
                         api_visibility="private", **limit)
        ev2 = send.click(respond, [box, chatbot, model] + settings_in, [chatbot, box, status],
                         api_visibility="private", **limit)
        stop_btn.click(stop_ui, None, None, cancels=[ev1, ev2], api_visibility="private",
                       queue=False)
        clear.click(lambda: ([], ""), None, [chatbot, status], api_visibility="private",
                    queue=False)
        model.change(lambda m: gr.update(placeholder=placeholder(m)), model, system,
                     api_visibility="private", queue=False)
        c_in = [cbox, chat_a, chat_b, model_a, model_b] + settings_in
        ev3 = cbox.submit(compare, c_in, [chat_a, chat_b, cbox, cstatus],
                          api_visibility="private", **limit)
        ev4 = csend.click(compare, c_in, [chat_a, chat_b, cbox, cstatus],
                          api_visibility="private", **limit)
        cstop.click(stop_ui, None, None, cancels=[ev3, ev4], api_visibility="private",
                    queue=False)
        cclear.click(lambda: ([], [], ""), None, [chat_a, chat_b, cstatus],
                     api_visibility="private", queue=False)

        def on_refresh(current, a, b):
            registry.refresh()
            # attach new adapters in the background so the first answer from them is quick
            threading.Thread(target=engine.preload, daemon=True).start()
            choices, ids = registry.choices(), registry.ids()
            keep = [v if v in ids else BASE_ID for v in (current, a, b)]
            qs = registry.examples(limit=8, model_id=keep[0]) or FALLBACK_EXAMPLES
            note = "; ".join(registry.problems)
            if note:
                gr.Warning(f"Some runs were skipped: {note}")
            return (gr.update(choices=choices, value=keep[0]),
                    gr.update(choices=choices, value=keep[1]),
                    gr.update(choices=choices, value=keep[2]),
                    gr.Dataset(samples=[[q] for q in qs]),
                    f"{len(ids)} models: " + ", ".join(ids))

        refresh.click(on_refresh, [model, model_a, model_b],
                      [model, model_a, model_b, ex.dataset, status], api_visibility="private")

        def add_from_hub(repo_id, rev, current, a, b):
            repo_id, rev = (repo_id or "").strip(), (rev or "").strip() or None
            if not REPO_ID.match(repo_id):
                raise gr.Error(f"{repo_id!r} is not a Hub repo id; expected 'owner/name'")
            pull = importlib.import_module("hub.pull").pull
            try:
                run_dir = pull(repo_id, revision=rev, runs_dir=registry.runs_dir)
            except Exception as e:  # network, missing repo, not a medchat repo: tell the user
                raise gr.Error(f"Could not add {repo_id}: {type(e).__name__}: {e}") from None
            registry.refresh()
            new = [i for i in registry.ids() if i.split(":", 1)[-1] == os.path.basename(run_dir)]
            choices = registry.choices()
            value = new[0] if new else current
            return (gr.update(choices=choices, value=value), gr.update(choices=choices, value=a),
                    gr.update(choices=choices, value=b),
                    f"Added {repo_id} as {', '.join(new) or 'nothing new'}.")

        pull_btn.click(add_from_hub, [repo, revision, model, model_a, model_b],
                       [model, model_a, model_b, pull_status], api_visibility="private")

        gr.api(chat, api_name="chat", **limit)
        gr.api(models, api_name="models", queue=False)
        gr.api(stop, api_name="stop", queue=False)
        gr.api(refresh_api, api_name="refresh")
    demo.queue(default_concurrency_limit=concurrency)
    return demo


def theme() -> gr.Theme:
    return gr.themes.Soft(primary_hue="teal", font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])  # system fonts: no downloads


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          **kwargs: Any):
    """Launch with the app's theme and CSS (Gradio 6 takes both at launch)."""
    return demo.launch(server_name=host, server_port=port, share=share, theme=theme(), css=CSS,
                       show_error=True, **kwargs)
