"""The Gradio app over a backend and the registry: a streaming chat with a model selector
(base / adapter / merged, with base model and eval score), a side-by-side compare view, an
"add from Hub" control, and the OpenAI-compatible /v1 API (medchat.openai_api) on the same port.
Start it with `python launch.py` or `medchat app` (medchat.server).

API endpoints (for `gradio_client`, tests and benchmarks), all on the queue:

    /chat     (message, history, model, system_prompt, max_new_tokens, temperature, top_p,
               repetition_penalty, seed) -> streams the answer so far (str) as it grows
    /models   () -> [{"id", "kind", "label"}]   what `model` may be
    /stop     () -> int   cancels this client's running generations
    /refresh  () -> [{"id", "kind", "label"}]   rescan the runs folder

`model` must be a registered id (see /models); anything else is refused by the backend. The
UI, these endpoints and /v1 share the backend's limits and its one waiting line: a request
beyond the line is told "busy, retry" at once (Compare takes two generation slots, both or none).

The page is built by small functions, one per part: `chat_tab`, `compare_tab`,
`settings_panel` and `hub_panel` lay out components; `Handlers` holds what the events run;
`build_app` puts them together and wires the events and the API.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry / version check calls

import gradio as gr  # noqa: E402

from medchat.backend import (Backend, BackendError, ChatRequest,  # noqa: E402
                             GenerationSettings, SettingsError, Stream)
from medchat.base_model import looks_like_repo_id  # noqa: E402
from medchat.errors import without_local_paths  # noqa: E402
from medchat.openai_api import build_routes  # noqa: E402
from medchat.registry import BASE_ID, Registry, UnknownModelError  # noqa: E402
from medchat.run_folder import Run  # noqa: E402

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

# Errors a request can cause; shown to the user as they are, but for this machine's paths.
REQUEST_ERRORS = (UnknownModelError, BackendError, SettingsError)
EVAL_REPORT_CHARS = 200_000  # the most of a run's eval.md the Compare tab shows

log = logging.getLogger(__name__)

# pull(repo_id, revision=..., runs_dir=...) -> the run folder it wrote (hub.pull.pull with the
# operator's choices of token and size cap bound in by the server)
PullFunction = Callable[..., "str | os.PathLike"]


def _settings(max_new_tokens, temperature, top_p, repetition_penalty, seed,
              defaults: Any = None) -> GenerationSettings:
    try:
        seed = None if seed is None or seed == "" or int(seed) < 0 else int(seed)
    except (TypeError, ValueError):
        raise SettingsError(f"seed: {seed!r} is not a whole number (-1 = random)") from None
    return GenerationSettings.from_defaults(
        defaults, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed)


def _shown(e: BaseException | str) -> gr.Error:
    """An error as a visitor sees it: its message without this machine's paths. The server's
    log gets one line, not Gradio's traceback of this raise (which says nothing the message
    does not, and would let a visitor fill the log with refused requests); failures inside a
    generation are logged with their traceback where they happen."""
    message = without_local_paths(str(e))
    log.info("told a visitor: %s", message.splitlines()[0][:300] if message else "")
    return gr.Error(message, print_exception=False)


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


def _turn(history: list, message: str) -> list:
    return history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]


def _append(history: list, piece: str) -> None:
    history[-1] = {"role": "assistant", "content": history[-1]["content"] + piece}


# -- what the events run -------------------------------------------------------------------------

class Handlers:
    """The functions behind the chat and compare views and the API endpoints."""

    def __init__(self, backend: Backend, registry: Registry, stream_interval: float = 0.05,
                 pull: PullFunction | None = None):
        self.backend = backend
        self.registry = registry
        self.interval = stream_interval
        self.pull = pull

    def start(self, model, message, history, system, settings, request) -> Stream:
        """Start one generation for a client; request errors become messages in the UI."""
        return self.start_all([(model, history)], message, system, settings, request)[0]

    def start_all(self, sides: list[tuple[str, list]], message, system, settings,
                  request) -> list[Stream]:
        """Start one generation per (model, history), all at once or none (Compare)."""
        owner = getattr(request, "session_hash", None)
        try:
            requests = []
            for model, history in sides:
                entry = self.registry.get(model)
                requests.append(ChatRequest.from_turn(
                    model, message, history, system,
                    _settings(*settings, defaults=entry.generation), owner))
            return self.backend.stream_all(requests)
        except REQUEST_ERRORS as e:
            raise _shown(e) from None

    def placeholder(self, model_id: str) -> str:
        """The model's own system prompt, shown greyed in the system prompt box."""
        try:
            return self.registry.get(model_id).system_prompt
        except UnknownModelError:
            return ""

    def evaluation(self, model_id: str) -> str:
        """The held-out evaluation of the selected model's run (its eval.md: scores, changes
        from the base with 95% intervals, per question type, the safety slice, answers next to
        the gold ones), for the Compare tab."""
        try:
            entry = self.registry.get(model_id)
        except UnknownModelError:
            return ""
        if entry.run_dir is None:
            return ("*The base model has no evaluation of its own: pick a fine-tuned model as "
                    "B to see how its run's evaluation compares it with the base.*")
        report = Run(entry.run_dir).eval_report_path
        try:
            with open(report, encoding="utf-8", errors="replace") as f:
                text = f.read(EVAL_REPORT_CHARS + 1)
        except OSError:
            return (f"*Run `{entry.run}` has not been evaluated yet "
                    f"(`medchat evaluate {entry.run}` writes its report).*")
        if len(text) > EVAL_REPORT_CHARS:  # a report is far smaller; never send a huge file
            text = text[:EVAL_REPORT_CHARS] + "\n\n*(report cut here)*"
        return text

    def models(self) -> list[dict]:
        return [{"id": e.id, "kind": e.kind, "label": e.label} for e in self.registry.entries()]

    def stop(self, request: gr.Request = None) -> int:
        """Cancel this client's running generations; returns how many."""
        owner = getattr(request, "session_hash", None)
        return self.backend.cancel(owner) if owner else 0

    def stop_ui(self, request: gr.Request) -> None:
        """The Stop buttons (a name of their own: API names must be unique)."""
        self.stop(request)

    def respond_fn(self) -> Callable:
        """The chat tab: the answer streams into the conversation."""

        def respond(message, history, model, system, max_new, temp, top_p, rep, seed,
                    request: gr.Request):
            history = list(history or [])
            if not (message or "").strip():
                yield history, message, ""
                return
            stream = self.start(model, message, history, system,
                                (max_new, temp, top_p, rep, seed), request)
            try:
                for notice in stream.notices:
                    gr.Warning(notice)
                history = _turn(history, message)
                yield history, "", ""
                for piece in stream.batched(self.interval):
                    _append(history, piece)
                    yield history, "", ""
            except BackendError as e:
                raise _shown(e) from None
            finally:
                stream.cancel()  # no-op when finished; stops generation when the client went away
            yield history, "", _status(stream)

        return respond

    def compare_fn(self) -> Callable:
        """The compare tab: one question, two models, both answers streaming at once."""

        def compare(message, hist_a, hist_b, model_a, model_b, system, max_new, temp, top_p,
                    rep, seed, request: gr.Request):
            hist_a, hist_b = list(hist_a or []), list(hist_b or [])
            if not (message or "").strip():
                yield hist_a, hist_b, message, ""
                return
            settings = (max_new, temp, top_p, rep, seed)
            if temp and float(temp) > 0 and (seed is None or int(seed) < 0):
                # both sides draw with the same seed, so differences come from the models
                settings = settings[:4] + (int.from_bytes(os.urandom(3), "big"),)
            # both generations start together or neither does: Compare never holds one slot
            # while it waits for the other
            streams = self.start_all([(model_a, hist_a), (model_b, hist_b)], message, system,
                                     settings, request)
            try:
                for notice in dict.fromkeys(n for s in streams for n in s.notices):
                    gr.Warning(notice)
                hists = [_turn(hist_a, message), _turn(hist_b, message)]
                yield hists[0], hists[1], "", ""
                for i, piece in merge_streams(streams, self.interval):
                    _append(hists[i], piece)
                    yield hists[0], hists[1], "", ""
            except BackendError as e:
                raise _shown(e) from None
            finally:
                for s in streams:  # no-op when finished; stops both when the client went away
                    s.cancel()
            yield hists[0], hists[1], "", " | ".join(_status(s) for s in streams)

        return compare

    def chat_fn(self) -> Callable:
        """The /chat endpoint: streams the text so far."""

        def chat(message: str, history: list, model: str, system_prompt: str = "",
                 max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, request: gr.Request = None) -> Iterator[str]:
            """Stream the answer (the text so far) of `model` to `message` after `history`."""
            stream = self.start(model, message, history or [], system_prompt,
                                (max_new_tokens, temperature, top_p, repetition_penalty,
                                 -1 if seed is None else seed), request)
            try:
                for notice in stream.notices:
                    gr.Warning(notice)
                for _ in stream.batched(self.interval):
                    yield stream.text
            except BackendError as e:
                raise _shown(e) from None
            finally:
                stream.cancel()
            if not stream.text:
                yield ""

        return chat

    def refresh_api(self) -> list[dict]:
        self.registry.refresh()
        return self.models()

    def on_refresh(self, current, a, b):
        """The refresh button: rescan, keep the selections that still exist."""
        self.registry.refresh()
        # attach new adapters in the background so the first answer from them is quick (a
        # server backend checks the server again and loads new adapters into it)
        preload = getattr(self.backend, "preload", None)
        if preload is not None:
            threading.Thread(target=preload, daemon=True).start()
        choices, ids = self.registry.choices(), self.registry.ids()
        keep = [v if v in ids else BASE_ID for v in (current, a, b)]
        qs = self.registry.examples(limit=8, model_id=keep[0]) or FALLBACK_EXAMPLES
        note = "; ".join(self.registry.problems)
        if note:
            gr.Warning(without_local_paths(f"Some runs were skipped: {note}"))
        return (gr.update(choices=choices, value=keep[0]),
                gr.update(choices=choices, value=keep[1]),
                gr.update(choices=choices, value=keep[2]),
                gr.Dataset(samples=[[q] for q in qs]),
                f"{len(ids)} models: " + ", ".join(ids))

    def add_from_hub(self, repo_id, rev, current, a, b):
        """The hub panel: pull a repo into the runs folder and select what it added."""
        repo_id, rev = (repo_id or "").strip(), (rev or "").strip() or None
        if not looks_like_repo_id(repo_id):
            raise _shown(f"{repo_id!r} is not a Hub repo id; expected 'owner/name'")
        try:
            run_dir = self.pull(repo_id, revision=rev, runs_dir=self.registry.runs_dir)
        except Exception as e:  # network, missing repo, not a medchat repo: tell the user
            raise _shown(f"Could not add {repo_id}: {type(e).__name__}: {e}") from None
        self.registry.refresh()
        run_name = Path(run_dir).name
        new = [i for i in self.registry.ids() if i.split(":", 1)[-1] == run_name]
        choices = self.registry.choices()
        value = new[0] if new else current
        return (gr.update(choices=choices, value=value), gr.update(choices=choices, value=a),
                gr.update(choices=choices, value=b),
                f"Added {repo_id} as {', '.join(new) or 'nothing new'}.")


# -- layout --------------------------------------------------------------------------------------

@dataclass
class ChatTab:
    model: gr.Dropdown
    refresh: gr.Button
    chatbot: gr.Chatbot
    box: gr.Textbox
    send: gr.Button
    stop: gr.Button
    status: gr.Markdown
    examples: gr.Examples
    clear: gr.Button


@dataclass
class CompareTab:
    model_a: gr.Dropdown
    model_b: gr.Dropdown
    chat_a: gr.Chatbot
    chat_b: gr.Chatbot
    box: gr.Textbox
    send: gr.Button
    stop: gr.Button
    status: gr.Markdown
    clear: gr.Button
    report: gr.Markdown


@dataclass
class SettingsPanel:
    system: gr.Textbox
    max_new: gr.Slider
    temp: gr.Slider
    top_p: gr.Slider
    rep: gr.Slider
    seed: gr.Number

    def inputs(self) -> list:
        """In the order the handlers take them."""
        return [self.system, self.max_new, self.temp, self.top_p, self.rep, self.seed]


@dataclass
class HubPanel:
    repo: gr.Textbox
    revision: gr.Textbox
    button: gr.Button
    status: gr.Markdown


def chat_tab(registry: Registry, first: str) -> ChatTab:
    """Model selector, conversation, message box with Send/Stop, examples from the test split."""
    held_out = registry.examples(limit=8, model_id=first)
    with gr.Tab("Chat", id="chat"):
        with gr.Row():
            model = gr.Dropdown(registry.choices(), value=first, label="Model", scale=8,
                                elem_id="model")
            with gr.Column(scale=1, min_width=110):
                refresh = gr.Button("↻ Refresh models", size="sm", elem_id="refresh")
        chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot",
                             buttons=["copy"])
        with gr.Row():
            box = gr.Textbox(placeholder="Ask about a medication…", show_label=False, scale=8,
                             autofocus=True, elem_id="message", lines=1)
            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
        status = gr.Markdown(elem_id="status")
        examples = gr.Examples([[q] for q in held_out or FALLBACK_EXAMPLES], inputs=[box],
                               label="Examples (held-out test questions)" if held_out
                               else "Examples")
        clear = gr.Button("Clear conversation", size="sm")
    return ChatTab(model, refresh, chatbot, box, send, stop, status, examples, clear)


def compare_tab(registry: Registry, first: str, h: Handlers) -> CompareTab:
    """Two selectors (base vs the selected fine-tuned model), two conversations, and the
    evaluation of model B's run."""
    with gr.Tab("Compare", id="compare"):
        with gr.Row():
            ids = registry.ids()
            second = first if first != BASE_ID else (ids[1] if len(ids) > 1 else BASE_ID)
            model_a = gr.Dropdown(registry.choices(), value=BASE_ID, label="Model A",
                                  elem_id="model_a")
            model_b = gr.Dropdown(registry.choices(), value=second, label="Model B",
                                  elem_id="model_b")
        with gr.Row():
            chat_a = gr.Chatbot(label="A", height=380, elem_id="chat_a")
            chat_b = gr.Chatbot(label="B", height=380, elem_id="chat_b")
        with gr.Row():
            box = gr.Textbox(placeholder="One question, two models…", show_label=False, scale=8,
                             elem_id="cmessage")
            send = gr.Button("Ask both", variant="primary", scale=1, min_width=80)
            stop = gr.Button("Stop", variant="stop", scale=1, min_width=80)
        status = gr.Markdown(elem_id="cstatus")
        clear = gr.Button("Clear", size="sm")
        with gr.Accordion("Evaluation of model B's run on its held-out questions", open=False):
            report = gr.Markdown(h.evaluation(second), elem_id="eval_report")
    return CompareTab(model_a, model_b, chat_a, chat_b, box, send, stop, status, clear, report)


def settings_panel(registry: Registry, first: str, placeholder: str,
                   max_new_tokens: int = 2048) -> SettingsPanel:
    """System prompt and sampling settings, starting from the first model's manifest; the
    answer-length slider stops at the server's limit."""
    with gr.Accordion("System prompt and generation settings", open=False):
        system = gr.Textbox(label="System prompt (empty: the model's own, shown greyed)",
                            placeholder=placeholder, lines=2, elem_id="system")
        defaults = GenerationSettings.from_defaults(
            registry.get(first).generation if first in registry.ids() else None)
        with gr.Row():
            max_new = gr.Slider(1, max_new_tokens,
                                value=min(defaults.max_new_tokens, max_new_tokens), step=1,
                                label="Max new tokens")
            temp = gr.Slider(0, 2, value=defaults.temperature, step=0.05,
                             label="Temperature (0 = greedy)")
        with gr.Row():
            top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p")
            rep = gr.Slider(0.8, 2, value=defaults.repetition_penalty, step=0.05,
                            label="Repetition penalty")
            seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
    return SettingsPanel(system, max_new, temp, top_p, rep, seed)


def hub_panel() -> HubPanel:
    """Repo id and revision to pull into the runs folder."""
    with gr.Accordion("Add a model from the Hugging Face Hub", open=False):
        with gr.Row():
            repo = gr.Textbox(label="Repo id", placeholder="owner/name", scale=4)
            revision = gr.Textbox(label="Revision (optional)", scale=2)
            button = gr.Button("Add from Hub", scale=1)
        status = gr.Markdown()
    return HubPanel(repo, revision, button, status)


# -- events ----------------------------------------------------------------------------------------

def wire_chat(tab: ChatTab, settings: SettingsPanel, respond: Callable, h: Handlers,
              limit: dict[str, Any]) -> None:
    inputs = [tab.box, tab.chatbot, tab.model] + settings.inputs()
    outputs = [tab.chatbot, tab.box, tab.status]
    runs = [tab.box.submit(respond, inputs, outputs, api_visibility="private", **limit),
            tab.send.click(respond, inputs, outputs, api_visibility="private", **limit)]
    tab.stop.click(h.stop_ui, None, None, cancels=runs, api_visibility="private", queue=False)
    tab.clear.click(lambda: ([], ""), None, [tab.chatbot, tab.status], api_visibility="private",
                    queue=False)
    tab.model.change(lambda m: gr.update(placeholder=h.placeholder(m)), tab.model,
                     settings.system, api_visibility="private", queue=False)


def wire_compare(tab: CompareTab, settings: SettingsPanel, compare: Callable, h: Handlers,
                 limit: dict[str, Any]) -> None:
    inputs = [tab.box, tab.chat_a, tab.chat_b, tab.model_a, tab.model_b] + settings.inputs()
    outputs = [tab.chat_a, tab.chat_b, tab.box, tab.status]
    runs = [tab.box.submit(compare, inputs, outputs, api_visibility="private", **limit),
            tab.send.click(compare, inputs, outputs, api_visibility="private", **limit)]
    tab.stop.click(h.stop_ui, None, None, cancels=runs, api_visibility="private", queue=False)
    tab.clear.click(lambda: ([], [], ""), None, [tab.chat_a, tab.chat_b, tab.status],
                    api_visibility="private", queue=False)
    tab.model_b.change(h.evaluation, tab.model_b, tab.report, api_visibility="private",
                       queue=False)


def wire_refresh(chat: ChatTab, compare: CompareTab, h: Handlers) -> None:
    selectors = [chat.model, compare.model_a, compare.model_b]
    chat.refresh.click(h.on_refresh, selectors,
                       selectors + [chat.examples.dataset, chat.status], api_visibility="private")


def wire_hub(panel: HubPanel, chat: ChatTab, compare: CompareTab, h: Handlers) -> None:
    selectors = [chat.model, compare.model_a, compare.model_b]
    panel.button.click(h.add_from_hub, [panel.repo, panel.revision] + selectors,
                       selectors + [panel.status], api_visibility="private")


def add_api(h: Handlers, wrap: Callable, limit: dict[str, Any]) -> None:
    """The endpoints of the module docstring."""
    gr.api(wrap(h.chat_fn()), api_name="chat", **limit)
    gr.api(h.models, api_name="models", queue=False)
    gr.api(h.stop, api_name="stop", queue=False)
    gr.api(h.refresh_api, api_name="refresh")


def initial_model(registry: Registry, preferred: str | None = None) -> str:
    """The model selected at start: `preferred` if registered, else the first fine-tuned one."""
    ids = registry.ids()
    if preferred in ids:
        return preferred
    tuned = [i for i in ids if i != BASE_ID]
    return tuned[0] if tuned else BASE_ID


def build_app(backend: Backend, registry: Registry, *, pull: PullFunction | None = None,
              gpu: Callable | None = None, default_model: str | None = None,
              title: str = "medchat", stream_interval: float = 0.05,
              openai_api: bool = True, api_key: str | None = None) -> gr.Blocks:
    """The Blocks app. `pull` (hub.pull.pull) backs the "Add from Hub" panel, hidden when None;
    `gpu` wraps the generating functions (spaces.GPU on a ZeroGPU Space); `stream_interval`:
    pieces arriving closer together than this are sent as one update; `openai_api`: serve /v1
    on the same port (`serve` mounts it), with `api_key` as its bearer key when given.

    The backend's limits set the queue: as many handlers run at once as can hold or wait for a
    generation slot (so the backend's one waiting line, shared with /v1, does the waiting), and
    Gradio's own queue is bounded by the same waiting-line size."""
    wrap = gpu or (lambda f: f)
    h = Handlers(backend, registry, stream_interval, pull)
    first = initial_model(registry, default_model)
    limits = backend.limits
    concurrency = limits.max_active + limits.max_waiting
    limit = {"concurrency_limit": concurrency, "concurrency_id": "generate"}
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nChat with the base model and its fine-tuned versions; "
                    "compare two side by side.")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        with gr.Tabs():
            chat = chat_tab(registry, first)
            compare = compare_tab(registry, first, h)
        settings = settings_panel(registry, first, h.placeholder(first),
                                  limits.max_new_tokens)
        wire_chat(chat, settings, wrap(h.respond_fn()), h, limit)
        wire_compare(compare, settings, wrap(h.compare_fn()), h, limit)
        wire_refresh(chat, compare, h)
        if pull is not None:
            wire_hub(hub_panel(), chat, compare, h)
        add_api(h, wrap, limit)
    demo.queue(default_concurrency_limit=concurrency, max_size=max(1, limits.max_waiting))
    demo.medchat_routes = build_routes(backend, api_key) if openai_api else []  # see serve()
    return demo


def theme() -> gr.Theme:
    return gr.themes.Soft(primary_hue="teal", font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])  # system fonts: no downloads


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          **kwargs: Any):
    """Launch with the app's theme and CSS (Gradio 6 takes both at launch) and the /v1 routes
    `build_app` made, served by Gradio's own FastAPI app on the same port (its routes are
    matched before Gradio's). show_error is off: a visitor sees gr.Error messages, never the
    raw text of another exception."""
    app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
    app_kwargs["routes"] = list(app_kwargs.get("routes", [])) + getattr(demo, "medchat_routes",
                                                                        [])
    return demo.launch(server_name=host, server_port=port, share=share, theme=theme(), css=CSS,
                       show_error=False, app_kwargs=app_kwargs, **kwargs)
