"""A scripted Prometheus for the TUI's ``--prometheus`` tests: the HTTP API on port 0 in a
thread, each request answered by the subclass's :meth:`ScriptedPrometheus.answer`, the
queries asked kept in ``queries`` (one list per server)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from zaiproxy.fleet import promql

H = TypeVar("H", bound="ScriptedPrometheus")


class ScriptedPrometheus(BaseHTTPRequestHandler):
    queries: list[str] = []

    def answer(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """The JSON document for one request (``path``: the API path; ``params``: its query)."""
        raise NotImplementedError

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != promql.TARGETS_PATH and "query" in params:
            self.queries.append(params["query"])
        body = json.dumps(self.answer(url.path, params)).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[H]) -> Iterator[tuple[str, type[H]]]:
    """(the base URL, the handler class whose ``queries`` this server fills)."""
    own = type("Handler", (handler,), {"queries": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), own)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", own
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
