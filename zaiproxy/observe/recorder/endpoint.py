"""The recorder's query endpoint: history as JSON over loopback HTTP.

DuckDB lets no second process open a file that a writer holds (not even
read-only: "Could not set lock on file"), so while the proxy runs, the recorder answers the
queries itself. It listens on 127.0.0.1, port 0; the address goes to the
supervisor (the ready message, logged as ``recorder_ready``) and into
``<history_path>.endpoint`` (JSON: url, pid), where ``zaiproxy history`` finds it.
With an admin token configured, every request needs it (``Authorization: Bearer``).

Routes (GET; ``range`` like ``15m``/``24h``/``7d``; ``variant`` optional):

* ``/history/status`` — the recorder's counters and whether the file is open
* ``/history/summary?range=&variant=&group_by=key|model|status|variant|route``
* ``/history/series?range=&variant=&resolution=60``
* ``/history/export?range=&variant=`` — the raw rows as a Parquet file

and ``POST /history/sql`` with ``{"sql": "SELECT …", "timeout": 30, "max_rows": 1000}``
(both limits optional): one read-only query (recorder/sql.py), answered
``{columns, types, rows, truncated, elapsed_s}``; 400 for a statement that is not one plain
query or that DuckDB cannot run, 408 when it ran into its time limit (it is interrupted).

It serves an operator's CLI and the admin API, not traffic; the HTTP is
``http/responder.py``'s (keep-alive, bounds, errors as ``{"error": message}``), and
:func:`fetch` is ``http/client.py``'s, for the CLI.
"""

from __future__ import annotations

import hmac
import urllib.parse
from collections.abc import Callable
from typing import Any

import orjson
import trio

from zaiproxy.core import logs
from zaiproxy.core.errors import ProxyError
from zaiproxy.http import client
from zaiproxy.http.responder import Answer as HttpAnswer
from zaiproxy.http.responder import Limits, Request, Responder
from zaiproxy.observe.recorder.queries import export_parquet_bytes, history_series, history_summary
from zaiproxy.observe.recorder.ranges import QueryError, parse_duration
from zaiproxy.observe.recorder.service import QUERY_ERRORS, Recorder
from zaiproxy.observe.recorder.sql import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT, SqlError, limits
from zaiproxy.observe.recorder.store import HistoryStore

MAX_HEAD = 16 << 10
REQUEST_TIMEOUT = 30.0  # to send a request, and to take an answer
# What fetch() reads at most: an export is the range's rows as one Parquet file.
MAX_FETCH = 1 << 30
PARQUET = "application/vnd.apache.parquet"

Answer = tuple[int, str, bytes]


def _json(status: int, doc: Any) -> Answer:
    return status, "application/json", orjson.dumps(doc)


def _arg(params: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = params.get(name)
    return values[-1] if values else default


def build_query(path: str, params: dict[str, list[str]], now: float,
                export_dir: str | None = None) -> tuple[Callable[[HistoryStore], Any], str]:
    """The store call for a query route and the answer's content type; raises QueryError.
    ``export_dir``: where an export's temporary file goes (the recorder's own directory)."""
    range_s = parse_duration(_arg(params, "range", "24h") or "24h")
    variant = _arg(params, "variant") or None
    if path == "/history/summary":
        group_by = _arg(params, "group_by", "model") or "model"
        return (lambda s: history_summary(s, range_s, variant=variant, group_by=group_by,
                                          now=now)), "application/json"
    if path == "/history/series":
        resolution = parse_duration(_arg(params, "resolution", "60") or "60")
        return (lambda s: history_series(s, range_s, variant=variant, resolution_s=resolution,
                                         now=now)), "application/json"
    if path == "/history/export":
        fmt = _arg(params, "format", "parquet")
        if fmt != "parquet":
            raise QueryError("format must be parquet")
        return (lambda s: export_parquet_bytes(s, range_s, variant=variant, now=now,
                                               directory=export_dir)), PARQUET
    raise LookupError(path)


async def answer(recorder: Recorder, method: str, target: str, authorization: bytes | None,
                 token: str | None, body: bytes = b"") -> Answer:
    if token is not None:
        presented = authorization or b""
        if not hmac.compare_digest(presented, b"Bearer " + token.encode()):
            return _json(401, {"error": "missing or wrong admin token "
                                        "(send it as `Authorization: Bearer <token>`)"})
    parts = urllib.parse.urlsplit(target)
    if parts.path == SQL_ROUTE:
        if method != "POST":
            return _json(405, {"error": "POST only (a JSON body: {\"sql\": \"SELECT …\"})"})
        return await answer_sql(recorder, body)
    if method != "GET":
        return _json(405, {"error": "GET only"})
    params = urllib.parse.parse_qs(parts.query)
    if parts.path == "/history/status":
        return _json(200, recorder.status())
    try:
        fn, content_type = build_query(parts.path, params, recorder.wall(), recorder.export_dir)
    except LookupError:
        return _json(404, {"error": f"no such route {parts.path!r}"})
    except QueryError as exc:
        return _json(400, {"error": str(exc)})
    try:
        ok, result = await recorder.query(fn)
    except QueryError as exc:
        return _json(400, {"error": str(exc)})
    except QUERY_ERRORS as exc:
        logs.get_logger().error("history_query_failed", target=parts.path, error=str(exc))
        return _json(500, {"error": f"{type(exc).__name__}: {exc}"})
    if not ok:
        return _json(503, {"error": f"history unavailable: {recorder.last_error}"})
    if content_type == PARQUET:
        assert result is not None
        data, _count = result
        return 200, PARQUET, data
    return _json(200, result)


SQL_ROUTE = "/history/sql"
# What a refused, failed or stopped query is answered with (recorder/sql.py's kinds).
_SQL_STATUS = {"refused": 400, "invalid": 400, "timeout": 408, "cancelled": 503,
               "unavailable": 503}


async def answer_sql(recorder: Recorder, body: bytes) -> Answer:
    """``POST /history/sql``: one read-only query, bounded in time and rows."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("sql"), str):
        return _json(400, {"error": "the body must be JSON: {\"sql\": \"SELECT …\", "
                                    "\"timeout\": seconds, \"max_rows\": n}"})
    try:
        timeout, max_rows = limits(doc.get("timeout", DEFAULT_TIMEOUT),
                                   doc.get("max_rows", DEFAULT_MAX_ROWS))
        ok, result = await recorder.sql(doc["sql"], limit_s=timeout, max_rows=max_rows)
    except SqlError as exc:
        if exc.kind == "timeout":
            logs.get_logger().warning("history_sql_timeout", timeout_s=timeout,
                                      chars=len(doc["sql"]))
        return _json(_SQL_STATUS.get(exc.kind, 400), {"error": exc.message, "kind": exc.kind})
    if not ok or result is None:
        return _json(503, {"error": f"history unavailable: {recorder.last_error}",
                           "kind": "unavailable"})
    return 200, "application/json", result  # encoded in the query's thread


def _error_body(error: ProxyError) -> bytes:
    return orjson.dumps({"error": error.message})  # this endpoint's shape (see answer())


async def serve_endpoint(recorder: Recorder, token: str | None = None, host: str = "127.0.0.1",
                         port: int = 0,
                         task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the query endpoint; started value: its URL."""

    async def handle(request: Request) -> HttpAnswer:
        status, content_type, body = await answer(
            recorder, request.method, request.target, request.header(b"authorization"), token,
            request.body)
        return HttpAnswer(status, body, content_type)

    responder = Responder(handle, error_body=_error_body, name="recorder", limits=Limits(
        max_head=MAX_HEAD, idle_timeout=REQUEST_TIMEOUT, send_timeout=REQUEST_TIMEOUT))
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    async with trio.open_nursery() as nursery:
        await nursery.start(responder.serve, listeners)
        task_status.started(f"http://{sockname[0]}:{sockname[1]}")


# ---- the client side (the CLI; blocking, no trio loop of its own) -------------------


class EndpointError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.kind = kind  # POST /history/sql: recorder/sql.py's kind of error


def fetch(url: str, path: str, params: dict[str, str | None], *, token: str | None = None,
          timeout: float = 60.0, body: Any = None) -> bytes:
    """GET ``url + path`` (POST ``body`` as JSON when given), the whole answer within
    ``timeout``: EndpointError for an error answer, ``client.ClientError`` when none came
    (not running, not reachable)."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    headers = [] if token is None else [("authorization", f"Bearer {token}")]
    data = None
    if body is not None:
        headers.append(("content-type", "application/json"))
        data = orjson.dumps(body)
    response = client.request_sync("GET" if data is None else "POST",
                                   f"{url}{path}" + (f"?{query}" if query else ""),
                                   headers=headers, body=data, max_body=MAX_FETCH,
                                   timeout=timeout)
    if 200 <= response.status < 300:
        return response.body
    kind = None
    try:
        doc = orjson.loads(response.body)
        message = str(doc["error"])
        kind = doc.get("kind") if isinstance(doc.get("kind"), str) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        message = response.body.decode("utf-8", "replace")
    raise EndpointError(response.status, message, kind)
