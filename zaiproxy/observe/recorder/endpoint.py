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

One request per connection, answered and closed: this serves an operator's
CLI and the admin API, not traffic.
"""

from __future__ import annotations

import hmac
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import h11
import orjson
import trio

from zaiproxy.core import logs
from zaiproxy.observe.recorder.queries import export_parquet_bytes, history_series, history_summary
from zaiproxy.observe.recorder.ranges import QueryError, parse_duration
from zaiproxy.observe.recorder.service import QUERY_ERRORS, Recorder
from zaiproxy.observe.recorder.store import HistoryStore

MAX_HEAD = 16 << 10
REQUEST_TIMEOUT = 30.0
PARQUET = "application/vnd.apache.parquet"

Answer = tuple[int, str, bytes]


def _json(status: int, doc: Any) -> Answer:
    return status, "application/json", orjson.dumps(doc)


def _arg(params: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = params.get(name)
    return values[-1] if values else default


def build_query(path: str, params: dict[str, list[str]],
                now: float) -> tuple[Callable[[HistoryStore], Any], str]:
    """The store call for a query route and the answer's content type; raises QueryError."""
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
        return (lambda s: export_parquet_bytes(s, range_s, variant=variant, now=now)), PARQUET
    raise LookupError(path)


async def answer(recorder: Recorder, method: str, target: str, authorization: bytes | None,
                 token: str | None) -> Answer:
    if token is not None:
        presented = authorization or b""
        if not hmac.compare_digest(presented, b"Bearer " + token.encode()):
            return _json(401, {"error": "missing or wrong admin token "
                                        "(send it as `Authorization: Bearer <token>`)"})
    if method != "GET":
        return _json(405, {"error": "GET only"})
    parts = urllib.parse.urlsplit(target)
    params = urllib.parse.parse_qs(parts.query)
    if parts.path == "/history/status":
        return _json(200, recorder.status())
    try:
        fn, content_type = build_query(parts.path, params, recorder.wall())
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


async def _serve_connection(recorder: Recorder, token: str | None,
                            stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            request: h11.Request | None = None
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data and request is None:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if request is None:
                return
            auth = next((v for n, v in request.headers if n == b"authorization"), None)
            status, content_type, body = await answer(
                recorder, request.method.decode("ascii", "replace"),
                request.target.decode("ascii", "replace"), auth, token)
            headers = [("content-type", content_type), ("content-length", str(len(body))),
                       ("connection", "close")]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers))
                                  + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_endpoint(recorder: Recorder, token: str | None = None, host: str = "127.0.0.1",
                         port: int = 0,
                         task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the query endpoint; started value: its URL."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    async with trio.open_nursery() as nursery:

        async def handle(stream: trio.SocketStream) -> None:
            await _serve_connection(recorder, token, stream)

        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(f"http://{sockname[0]}:{sockname[1]}")


# ---- the client side (the CLI; blocking, no trio) ------------------------------------


class EndpointError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def fetch(url: str, path: str, params: dict[str, str | None], *, token: str | None = None,
          timeout: float = 60.0) -> bytes:
    """GET ``url + path`` (raises EndpointError for an error answer, OSError if unreachable)."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    req = urllib.request.Request(f"{url}{path}?{query}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body: bytes = resp.read()
            return body
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = str(json.loads(raw)["error"])
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace")
        raise EndpointError(exc.code, message) from None
