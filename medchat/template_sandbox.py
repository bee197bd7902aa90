"""Chat templates of pulled runs rendered in a child process with a memory cap and a deadline.

A chat template is a Jinja program, and a pulled run's (its manifest's, or its tokenizer's own)
is someone else's. Jinja's sandbox stops it from reaching Python, not from using resources:
`{{ 'a' * 2000000000 }}` renders a 2 GB string in 0.1 s in this server's process, a string
doubled once per message grows past any memory, and two nested loops over `range(100000)` never
end while holding the interpreter that every decode loop needs. So for a run pulled from the Hub
the template is rendered by a worker process:

    sandbox = TemplateSandbox()                       # the worker starts on first use
    text = sandbox.render(folder, template, messages, generation_prompt=True)

The worker loads the tokenizer of `folder` (cached) with `template` as its chat template and
calls transformers' own `apply_chat_template`, so the text is the same as in-process; its
address space is capped (`memory_mb` above what it holds after start-up), each render has a
deadline (`timeout_s`; past it the worker is killed and the next render starts a new one) and
an output cap (`max_chars`). Any of these refuses the request with a clear `BackendError`; the
server goes on. Runs trained here render in-process (their templates are the operator's own).

The worker speaks JSON lines on its stdin/stdout (`python -m medchat.template_sandbox`).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from medchat.backend import BackendError
from medchat.chat_format import ensure_chat_template

__all__ = ["TemplateSandbox", "shared"]

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MEMORY_MB = 512
DEFAULT_MAX_CHARS = 2_000_000  # far beyond any prompt the request limits let through


class TemplateSandbox:
    """A worker process rendering untrusted chat templates (see the module docstring).
    Thread-safe: renders take turns (one took 0.16 ms for an 11-message SmolLM2 conversation,
    0.07 ms in-process; a worker's start ~3 s)."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                 max_chars: int = DEFAULT_MAX_CHARS):
        self.timeout_s, self.memory_mb, self.max_chars = timeout_s, memory_mb, max_chars
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._buffer = b""
        self._fresh = False  # the worker was just started: its first answer waits for imports

    def render(self, folder: str | os.PathLike, template: str | None,
               messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        """`messages` rendered by the chat template `template` (None: the tokenizer's own) with
        the tokenizer of `folder`, in the worker."""
        request = json.dumps({"folder": str(folder), "template": template,
                              "messages": messages, "generation_prompt": bool(generation_prompt),
                              "max_chars": self.max_chars}) + "\n"
        with self._lock:
            proc = self._worker()
            try:
                proc.stdin.write(request.encode())
                proc.stdin.flush()
                line = self._read_line(proc, time.monotonic() + self.timeout_s
                                       + (_START_S if self._fresh else 0.0))
            except (BrokenPipeError, OSError, TimeoutError) as e:
                self._stop()
                if isinstance(e, TimeoutError):
                    raise BackendError(
                        f"this model's chat template took more than {self.timeout_s:g} s to "
                        "render the conversation and was stopped; the run's template is "
                        "refused (it comes from the Hub, not from a run trained here)") from None
                raise BackendError("this model's chat template stopped the process rendering "
                                   "it (out of memory?); the run's template is refused") from None
            self._fresh = False
        answer = json.loads(line)
        if "error" in answer:
            raise BackendError(f"this model's chat template cannot render the conversation: "
                               f"{answer['error']}")
        return answer["text"]

    def warm(self) -> None:
        """Start the worker now (it imports transformers in its own process, ~3 s), so that the
        first render does not wait for it."""
        with self._lock:
            self._worker()

    def close(self) -> None:
        with self._lock:
            self._stop()

    # -- the worker ------------------------------------------------------------------------------

    def _worker(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            env = dict(os.environ, MEDCHAT_SANDBOX_MEMORY_MB=str(self.memory_mb),
                       TOKENIZERS_PARALLELISM="false")
            root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "medchat.template_sandbox"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
            self._buffer, self._fresh = b"", True
        return self._proc

    def _read_line(self, proc: subprocess.Popen, deadline: float) -> str:
        fd = proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise OSError("the worker exited")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None


_START_S = 30.0  # a new worker imports transformers and loads the tokenizer first
_SHARED: TemplateSandbox | None = None
_SHARED_LOCK = threading.Lock()


def shared() -> TemplateSandbox:
    """The process's sandbox (one worker for every pulled run)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = TemplateSandbox()
        return _SHARED


# -- the worker process ------------------------------------------------------------------------------

def _serve() -> None:
    import resource

    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained  # noqa: B018 - the lazy import happens before the cap
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    cap = pages * os.sysconf("SC_PAGE_SIZE") + int(os.environ["MEDCHAT_SANDBOX_MEMORY_MB"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    tokenizers: dict[tuple[str, str | None], Any] = {}
    for line in sys.stdin:
        try:
            req = json.loads(line)
            key = (req["folder"], req["template"])
            tok = tokenizers.get(key)
            if tok is None:
                tok = AutoTokenizer.from_pretrained(req["folder"], trust_remote_code=False)
                ensure_chat_template(tok, req["template"])
                tokenizers[key] = tok
            text = tok.apply_chat_template(req["messages"], tokenize=False,
                                           add_generation_prompt=req["generation_prompt"])
            if len(text) > req["max_chars"]:
                answer = {"error": f"it wrote {len(text):,} characters (at most "
                                   f"{req['max_chars']:,})"}
            else:
                answer = {"text": text}
        except MemoryError:
            answer = {"error": "it needed more memory than a template may use"}
        except Exception as e:  # noqa: BLE001 - the template's own errors go back as text
            answer = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
