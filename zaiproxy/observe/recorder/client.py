"""A worker's way to the recorder's endpoint: what ``GET /admin/history`` answers with.

The worker has no DuckDB (the recorder owns the file); it asks the recorder over
loopback HTTP, at the URL the recorder wrote to ``<history_path>.endpoint`` (read
per query: a restarted recorder has a new port). No DuckDB import here.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import orjson
import trio

from zaiproxy.core.errors import ServiceUnavailable
from zaiproxy.http import client
from zaiproxy.observe.recorder.ranges import QueryError, parse_duration

QUERY_TIMEOUT = 10.0
MAX_ANSWER = 16 << 20
POINTS = 60  # per series: the resolution is the range / POINTS (5m -> 5 s, 24h -> 24 min)


class HistoryClient:
    """``await client(range_, variant)`` -> {"series": ..., "summary": ...} (JSON-able)."""

    def __init__(self, history_path: str, token: str | None) -> None:
        self.endpoint_file = os.path.abspath(history_path) + ".endpoint"
        self.token = token

    def __repr__(self) -> str:
        return f"<HistoryClient {self.endpoint_file!r}>"

    async def __call__(self, range_: str, variant: str) -> dict[str, Any]:
        try:
            seconds = parse_duration(range_)
        except QueryError as exc:
            raise ServiceUnavailable(str(exc)) from None  # admin.py validated it already
        url = await trio.to_thread.run_sync(self._url)
        params = {"range": range_, "variant": None if variant == "all" else variant}
        resolution = max(1, round(seconds / POINTS))
        series = await self._get(url, "/history/series", {**params, "resolution": str(resolution)})
        summary = await self._get(url, "/history/summary", {**params, "group_by": "variant"})
        return {"range": range_, "variant": variant, "series": series, "summary": summary}

    def _url(self) -> str:
        try:
            with open(self.endpoint_file, "rb") as fh:
                url = orjson.loads(fh.read())["url"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ServiceUnavailable("the history recorder is not running (no endpoint)") from None
        if not isinstance(url, str):
            raise ServiceUnavailable("the history recorder's endpoint file is unreadable")
        return url

    async def _get(self, url: str, path: str, params: dict[str, str | None]) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        headers = [] if self.token is None else [("authorization", f"Bearer {self.token}")]
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                response = await client.get(f"{url}{path}?{query}", headers=headers,
                                            max_body=MAX_ANSWER)
            doc = orjson.loads(response.body) if response.body else {}
        except trio.TooSlowError:
            raise ServiceUnavailable(f"the history recorder did not answer within "
                                     f"{QUERY_TIMEOUT:g}s") from None
        except (client.ClientError, orjson.JSONDecodeError) as exc:
            raise ServiceUnavailable(f"the history recorder did not answer: {exc}") from None
        if response.status != 200:
            raise ServiceUnavailable(f"the history recorder answered {response.status}: "
                                     f"{doc.get('error', '') if isinstance(doc, dict) else ''}")
        return doc
