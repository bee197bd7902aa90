"""A loopback OpenAI-compatible chat completions server whose replies a test scripts: the judge
under test talks HTTP to it through the official openai client, exactly as to a real server.

    with JudgeStub(lambda request: '{"accuracy": 4, "completeness": 3, "clarity": 5}') as stub:
        judge = Judge(JudgeConfig(url=stub.url, model="stub-judge"))
        ...
    stub.requests      # every request body received (parsed JSON), in order
    stub.headers       # the headers of each request (names lower-cased)

`reply(request)` returns the assistant's text, or a (status, body) pair to send instead of a
completion (an HTTP error, or a body that is not a completion). Only POST
/v1/chat/completions exists; anything else is a 404.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Reply = Callable[[dict[str, Any]], "str | tuple[int, str]"]


class JudgeStub:
    def __init__(self, reply: Reply):
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, json.dumps({"error": {"message": "no such route"}}))
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with stub._lock:
                    stub.requests.append(body)
                    stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                out = stub.reply(body)
                if isinstance(out, tuple):
                    return self._send(*out)
                completion = {
                    "id": f"chatcmpl-{len(stub.requests)}", "object": "chat.completion",
                    "created": int(time.time()), "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": out}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                self._send(200, json.dumps(completion))

            def _send(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "JudgeStub":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


def prompt_of(request: dict[str, Any]) -> str:
    """The first user message of a request (the rubric or pairwise prompt)."""
    return next(m["content"] for m in request["messages"] if m["role"] == "user")


def is_retry(request: dict[str, Any]) -> bool:
    """Whether the request re-asks after an invalid reply."""
    return sum(m["role"] == "user" for m in request["messages"]) > 1
