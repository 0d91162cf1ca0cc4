"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for tests, with scripted faults."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional


def echo_inputs(request: dict) -> str:
    """Default reply: an 'instruction' naming the inputs shown in the prompt (deterministic)."""
    prompt = request["messages"][-1]["content"]
    inputs = [line.removeprefix("Input: ") for line in prompt.splitlines() if line.startswith("Input: ")]
    return "Solve tasks like: " + " | ".join(inputs)


class FakeOpenAI:
    """Serves POST /v1/chat/completions. `script` holds actions for the next requests, consumed in order:
    ("status", code), ("sleep", seconds), ("empty",), ("no_choices",), ("invalid_json",); afterwards, or for
    ("ok",), it answers with `reply(request)`. `max_in_flight` records the most requests it served at once; with
    `gather` = n, each request waits (up to 2 s) until n are in flight, so that a client sending n at once is seen
    doing so."""

    def __init__(self, reply: Callable[[dict], str] = echo_inputs) -> None:
        self.reply = reply
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.gather = 0
        self.changed = threading.Condition(self.lock)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    action = server.script.pop(0) if server.script else ("ok",)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.changed.notify_all()
                    server.changed.wait_for(lambda: server.in_flight >= server.gather, timeout=2)
                try:
                    self._answer(body, action)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body: dict, action: tuple) -> None:
                if action[0] == "status":
                    self._send(action[1], {"error": {"message": f"scripted {action[1]}", "type": "server_error"}})
                    return
                if action[0] == "sleep":
                    time.sleep(action[1])
                content: Optional[str] = server.reply(body)
                if action[0] == "empty":
                    content = ""
                payload: dict = {
                    "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                }
                if action[0] == "no_choices":
                    payload["choices"] = []
                if action[0] == "invalid_json":
                    self._send_raw(200, b"{not json")
                    return
                self._send(200, payload)

            def _send(self, status: int, payload: dict) -> None:
                self._send_raw(status, json.dumps(payload).encode())

            def _send_raw(self, status: int, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
