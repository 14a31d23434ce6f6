"""The sources of ``zaiproxy canary-check``: a fleet collector's admin API, the admin APIs
of the proxies themselves (one per ``--url``), or Prometheus, each reduced to one
:class:`Window` per variant (``zaiproxy/fleet/canary.py`` decides).

Pure adapters (:func:`from_collector`, :func:`from_proxies`, :func:`from_prometheus` and
the PromQL of :func:`prometheus_queries`, whose text and answer reading are
:mod:`zaiproxy.fleet.promql`'s, shared with the TUI) and the blocking HTTP that feeds them
(``http/client.py``'s ``request_sync``: a CLI with no event loop, one request after the
other, each bounded by ``--timeout`` from connect to last byte); every failure to reach or
read a source is a :class:`SourceError`, and :class:`Unreachable` when nothing answered.

Which variant is the canary: the one ``--canary`` names, or else the one variant besides
production that the source has (``canary``, ``test`` as the original service's runbook
called it, ``v2`` ...: :func:`variant_names`). A collector's ``/admin/status`` and the
proxies' own say which variants there are; Prometheus is asked (:func:`promql.present`).

Which ``--url`` is what: each one's ``/admin/status`` says (``"source"``: ``collector`` or
``proxy``). One URL must be a collector (a proxy serves one variant: there is nothing to
compare it with); several must all be proxies. A proxy serves the one variant its
``/admin/status`` names (``DEPLOYMENT_VARIANT``). A proxy URL that does not answer
(connection refused or reset, timeout) is a down target, but of which variant cannot be
asked: it is counted for the one variant that has no answering proxy; when both have one,
the dead URL could be either's and the reading is inconclusive (:func:`from_proxies`).
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from zaiproxy.fleet import promql

if TYPE_CHECKING:
    from zaiproxy.http import client

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Window:
    """One variant over the window: what each source is reduced to."""

    requests: float = 0.0  # proxied API requests answered (control routes excluded)
    ok: float = 0.0  # of them 2xx
    server_errors: float = 0.0  # 5xx
    rate_limited: float = 0.0  # 429
    usage_missing: float | None = 0.0  # 2xx without upstream usage; None = not reported
    latency_p95: float | None = None  # seconds; None = nothing observed
    ttft_p95: float | None = None
    targets: int = 0  # scrape targets (pods) of this variant
    targets_down: int = 0



# ---- sources: what they answered -> Window (pure) ----------------------------------------


class SourceError(Exception):
    """The source could not be reached or read, or answered something unexpected."""


class Unreachable(SourceError):
    """Nothing answered at the URL: connection refused or reset, or no answer in time."""


# The canary's name when it is not given and the source has no variant besides production
# (nothing deployed yet, or its only proxy URL is dead): what the verdict calls it.
DEFAULT_CANARY = "canary"


def _listed(names: Sequence[str]) -> str:
    return ", ".join(map(repr, names))


def variant_names(seen: Sequence[str] | set[str], production: str, canary: str | None, *,
                  complete: bool = True) -> tuple[str, str]:
    """(production, canary): the names given, the canary found among the variants the
    source has (``seen``) when it is not. ``complete``: False when part of the source did
    not answer (a dead proxy URL), so a name missing from ``seen`` may be that part's.

    A SourceError when the names cannot be right: no canary given and several variants
    besides production; or a name given that the source does not have while it has
    variants that are neither (a canary called ``test`` asked for as ``canary``)."""
    present = sorted(seen)
    others = [v for v in present if v != production]
    if canary is None:
        if len(others) > 1:
            hint = ("" if production in present else
                    f" (none is {production!r}: name production's with --production too)")
            raise SourceError(f"which is the canary? besides production {production!r} the "
                              f"source has the variants {_listed(others)}: name it with "
                              f"--canary{hint}")
        canary = others[0] if others else DEFAULT_CANARY
        if canary == production:  # --production canary, and nothing else there
            raise SourceError(f"the source has no variant besides production {production!r}"
                              ": name the canary with --canary")
    strangers = [v for v in present if v not in (production, canary)]
    if complete and strangers:
        for flag, name in (("--production", production), ("--canary", canary)):
            if name not in present:
                raise SourceError(f"the source has no variant {name!r} (it has "
                                  f"{_listed(present)}): name the {flag[2:]} variant with "
                                  f"{flag}")
    return production, canary


def from_collector(status: Mapping[str, Any], history: Mapping[str, Any], window_s: float,
                   names: Sequence[str]) -> dict[str, Window]:
    """A collector's ``/admin/status`` (targets) and ``/admin/history`` (per-step rates)."""
    if history.get("source") != "collector":
        raise SourceError(f"not a fleet collector's admin API (source "
                          f"{history.get('source')!r}): point --url at `zaiproxy collect`")
    step, end = float(history["step_s"]), float(history["to"])
    start = end - window_s
    out: dict[str, Window] = {}
    for name in names:
        entry = status["variants"].get(name) or {}
        counts = dict.fromkeys(("requests", "ok", "server_errors", "rate_limited"), 0.0)
        missing: float | None = 0.0
        p95s: dict[str, list[tuple[float, float]]] = {"latency_p95": [], "ttft_p95": []}
        for point in history["series"].get(name, ()):
            t = float(point["t"])
            covered = max(0.0, min(t + step, end) - max(t, start))
            if covered <= 0:
                continue
            requests = float(point["requests_per_s"]) * covered
            counts["requests"] += requests
            for key, field in (("ok", "ok_per_s"), ("server_errors", "errors_per_s"),
                               ("rate_limited", "rate_limited_per_s")):
                counts[key] += float(point.get(field) or 0.0) * covered
            if missing is not None:
                rate = point.get("usage_missing_per_s")
                missing = None if rate is None else missing + float(rate) * covered
            for key, field in (("latency_p95", "latency_p95_s"), ("ttft_p95", "ttft_p95_s")):
                if point.get(field) is not None and requests > 0:
                    p95s[key].append((float(point[field]), requests))
        out[name] = Window(**counts, usage_missing=missing,
                           latency_p95=_weighted(p95s["latency_p95"]),
                           ttft_p95=_weighted(p95s["ttft_p95"]),
                           targets=int(entry.get("targets", 0)),
                           targets_down=int(entry.get("stale_targets", 0)))
    return out


def _weighted(values: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in values)
    return sum(v * w for v, w in values) / total if total > 0 else None


@dataclass(frozen=True, slots=True)
class ProxyAnswer:
    """What one proxy ``--url`` gave: the variant it serves and its ``/admin/history``, or
    nothing (``variant`` and ``history`` None) when it did not answer."""

    url: str
    variant: str | None = None
    history: Mapping[str, Any] | None = None
    why: str = ""  # why it did not answer


def proxy_variant(url: str, status: Mapping[str, Any]) -> str:
    """The one variant a proxy's ``/admin/status`` names (its metrics carry only its own)."""
    variants = sorted(status.get("variants") or {})
    if len(variants) != 1:
        raise SourceError(f"{url}: cannot tell which variant this proxy serves (its "
                          f"/admin/status names {', '.join(map(repr, variants)) or 'none'})")
    return str(variants[0])


def from_proxies(answers: Sequence[ProxyAnswer], window_s: float,
                 names: Sequence[str]) -> dict[str, Window]:
    """Each variant's Window: the sum over its proxies of their history points inside the
    window; a proxy that did not answer is a down target (of which variant: see below)."""
    for a in answers:
        if a.variant is not None and a.variant not in names:
            raise SourceError(f"{a.url} serves variant {a.variant!r}, neither production "
                              f"{names[0]!r} nor canary {names[1]!r} (--production, --canary)")
    served = {a.variant for a in answers if a.variant is not None}
    if not served:
        raise SourceError("no --url answered: " + "; ".join(a.why for a in answers))
    orphans = [n for n in names if n not in served]
    down = [a for a in answers if a.variant is None]
    if down and len(orphans) != 1:
        # Both variants have a proxy that answered: the dead URL could be either's.
        raise SourceError(f"{down[0].url} did not answer ({down[0].why}) and both variants "
                          "have a proxy that did: cannot tell whose target it is (check it, "
                          "or leave it out)")
    out: dict[str, Window] = {}
    for name in names:
        mine = [a for a in answers if a.variant == name]
        down_here = len(down) if orphans == [name] else 0
        counts = dict.fromkeys(("requests", "ok", "server_errors", "rate_limited"), 0.0)
        missing: float | None = 0.0
        p95s: dict[str, list[tuple[float, float]]] = {"latency_p95": [], "ttft_p95": []}
        for a in mine:
            assert a.history is not None
            series = a.history["series"]
            end = dt.datetime.fromisoformat(series["range"]["end"]).timestamp()
            half = float(series["resolution_s"]) / 2
            for point in series["series"].get(name, ()):
                # A bucket counts when most of it lies inside the window: off by at most
                # half a bucket (a bucket is 1/60 of the history's range: client.POINTS).
                if float(point["t"]) + half < end - window_s:
                    continue
                requests = float(point["requests"])
                counts["requests"] += requests
                for key, field in (("ok", "responses_2xx"), ("server_errors", "responses_5xx"),
                                   ("rate_limited", "responses_429")):
                    counts[key] += float(point[field])
                if missing is not None:
                    value = point.get("usage_missing")  # null from rollups, absent if older
                    missing = None if value is None else missing + float(value)
                for key, field in (("latency_p95", "latency_ms_p95"),
                                   ("ttft_p95", "ttft_ms_p95")):
                    if point.get(field) is not None and requests > 0:
                        p95s[key].append((float(point[field]) / 1000, requests))
        out[name] = Window(**counts, usage_missing=missing,
                           latency_p95=_weighted(p95s["latency_p95"]),
                           ttft_p95=_weighted(p95s["ttft_p95"]),
                           targets=len(mine) + down_here, targets_down=down_here)
    return out


def prometheus_queries(window_s: float, names: Sequence[str]) -> dict[str, str]:
    """PromQL over the proxy's metric names, one instant vector by ``variant`` each (the
    text lives in :mod:`zaiproxy.fleet.promql`, shared with ``zaiproxy tui --prometheus``)."""
    return promql.canary_queries(window_s, names)


def from_prometheus(answers: Mapping[str, Sequence[Mapping[str, Any]]],
                    names: Sequence[str]) -> dict[str, Window]:
    """The ``data.result`` vectors of :func:`prometheus_queries`, by query name."""
    fields: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key in ("requests", "ok", "server_errors", "rate_limited", "usage_missing",
                "latency_p95", "ttft_p95"):
        for variant, values in promql.by_variant(answers[key]).items():
            if variant in fields:
                fields[variant][key] = values[""]
    for variant, found in promql.count_targets(answers["up"], answers["targets"]).items():
        if variant in fields:
            fields[variant].update(targets=found.total, targets_down=len(found.down))
    return {name: Window(**f) for name, f in fields.items()}


# ---- sources: blocking HTTP ----------------------------------------------------------------


# The largest answer read: Prometheus' vectors for two variants' pods are far smaller.
MAX_ANSWER = 64 << 20


def get_json(url: str, *, token: str | None, timeout: float) -> Any:
    """GET ``url`` as JSON; every way it can fail is a SourceError that says which.

    Nothing answered (refused, reset or closed without an answer, or nothing in time) is
    :class:`Unreachable`. A name that does not resolve is a mistake in the command, not a
    dead proxy: it stays a plain SourceError, as does an answer that is not HTTP."""
    # Imported here: building the CLI's parser imports this module, and must not load trio
    # and h11 (nor fail on a bad ZAIPROXY_HTTP_IMPL, which `config check` reports).
    from zaiproxy.http import client

    headers = [("accept", "application/json")]
    if token:
        headers.append(("authorization", f"Bearer {token}"))
    try:
        response = client.request_sync("GET", url, headers=headers, max_body=MAX_ANSWER,
                                       timeout=timeout)
    except client.NoAnswer as exc:
        raise Unreachable(f"cannot reach {url}: {exc}") from None
    except client.ConnectFailed as exc:
        raise SourceError(f"cannot reach {url}: {exc}") from None
    except client.ClientError as exc:
        raise SourceError(f"cannot read {url}: {exc}") from None
    if not 200 <= response.status < 300:
        raise SourceError(f"{url}: HTTP {response.status}: {_error_message(response)}"
                          + (" (pass --token or set ZAIPROXY_ADMIN_TOKEN)"
                             if response.status == 401 else ""))
    try:
        return json.loads(response.body)
    except ValueError:
        raise SourceError(f"{url}: the answer is not JSON: {response.body[:80]!r}") from None


def _error_message(response: client.Response) -> str:
    raw = response.body[:2000]
    try:
        doc = json.loads(raw)
        error = doc["error"]  # the admin API's {"error": {"message"}}; Prometheus' "error"
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace").strip()[:200] or response.reason


@dataclass(frozen=True, slots=True)
class Reading:
    """What the source gave: the windows, the names compared, and where they came from."""

    windows: dict[str, Window]
    kind: str  # "collector", "proxies" or "prometheus"
    where: str  # for the verdict's header line
    source: dict[str, Any]  # for --json
    names: tuple[str, str] = ("production", DEFAULT_CANARY)  # (production, canary)


def read_admin(urls: Sequence[str], window_s: float, production: str, canary: str | None, *,
               token: str | None, timeout: float) -> Reading:
    """One fleet collector, or one proxy per URL (see the module's docstring); ``canary``
    None: the one variant besides production that they have (:func:`variant_names`)."""
    range_ = _history_range(window_s)
    statuses: dict[str, Any] = {}
    answers: list[ProxyAnswer] = []
    for url in urls:
        try:
            statuses[url] = get_json(f"{url}/admin/status", token=token, timeout=timeout)
        except Unreachable as exc:
            if len(urls) == 1:
                raise  # a dead collector, or a dead proxy: inconclusive either way
            answers.append(ProxyAnswer(url, why=str(exc)))
    kinds = {url: _admin_kind(url, doc) for url, doc in statuses.items()}
    if "collector" in kinds.values():
        if len(urls) > 1:
            what = ", ".join(f"{u} is a {k}" for u, k in kinds.items())
            raise SourceError(f"{what}: give one fleet collector, or one --url per proxy "
                              "(never both, never several collectors)")
        (url,) = urls
        history = get_json(f"{url}/admin/history?range={range_}&variant=all", token=token,
                           timeout=timeout)
        seen = _reading(url, _collector_variants, statuses[url], history)
        names = variant_names(seen, production, canary)
        windows = _reading(url, from_collector, statuses[url], history, window_s, names)
        return Reading(windows, "collector", url, {"kind": "collector", "url": url}, names)
    if len(urls) == 1:
        (url,) = urls
        served = _reading(url, proxy_variant, url, statuses[url])
        raise SourceError(f"{url} is a proxy, and a proxy serves one variant (this one "
                          f"{served!r}): give both proxies (--url PRODUCTION --url CANARY) "
                          "or a fleet collector (zaiproxy collect) that scrapes both")
    for url, status in statuses.items():
        variant = _reading(url, proxy_variant, url, status)
        history = get_json(f"{url}/admin/history?range={range_}&variant={variant}",
                           token=token, timeout=timeout)
        answers.append(ProxyAnswer(url, variant, history))
    answers.sort(key=lambda a: list(urls).index(a.url))
    names = variant_names({a.variant for a in answers if a.variant is not None}, production,
                          canary, complete=all(a.variant is not None for a in answers))
    windows = _reading(", ".join(urls), from_proxies, answers, window_s, names)
    # A URL that did not answer was counted as a down target of this variant (the only one).
    orphan = next((n for n in names if windows[n].targets_down), None)
    proxies = [{"url": a.url, "variant": a.variant or orphan, "answered": a.variant is not None}
               | ({} if a.variant else {"error": a.why}) for a in answers]
    where = ", ".join(f"{p['url']} ({p['variant']}{'' if p['answered'] else ': did not answer'})"
                      for p in proxies)
    return Reading(windows, "proxies", where, {"kind": "proxies", "proxies": proxies}, names)


def _collector_variants(status: Mapping[str, Any], history: Mapping[str, Any]) -> set[str]:
    """The variants a collector knows: its targets' (fresh or stale) and its history's."""
    return {str(v) for v in status["variants"]} | {str(v) for v in history["series"]}


def _admin_kind(url: str, status: Any) -> str:
    kind = status.get("source") if isinstance(status, dict) else None
    if kind not in ("collector", "proxy"):
        raise SourceError(f"{url}/admin/status: not a zaiproxy admin API (\"source\" is "
                          f"{kind!r}, not \"collector\" or \"proxy\")")
    return str(kind)


def _history_range(window_s: float) -> str:
    """The admin API's shortest history range that covers the window."""
    from zaiproxy.request.admin import RANGES  # the admin API's ranges (imported late: trio)

    fitting = [r for r, seconds in sorted(RANGES.items(), key=lambda i: i[1])
               if seconds >= window_s]
    if not fitting:
        raise SourceError(f"the admin API keeps at most {max(RANGES.values()) // 86400} days "
                          "of history: use a shorter --window")
    return fitting[0]


def read_prometheus(url: str, window_s: float, production: str, canary: str | None, *,
                    token: str | None, timeout: float) -> Reading:
    """Which variants Prometheus has (``canary`` None: the one besides production), then
    their windows."""
    def ask(key: str, query: str) -> list[Mapping[str, Any]]:
        doc = get_json(f"{url}{promql.QUERY_PATH}?"
                       + urllib.parse.urlencode(promql.instant_params(query)),
                       token=token, timeout=timeout)
        try:
            return promql.result(doc, "vector")
        except promql.AnswerError as exc:
            raise SourceError(f"{url}: Prometheus did not answer the {key} query: "
                              f"{exc}") from None

    seen = _reading(url, promql.by_variant, ask("variants", promql.present(window_s)))
    names = variant_names(set(seen), production, canary)
    answers = {key: ask(key, query) for key, query in prometheus_queries(window_s, names).items()}
    windows = _reading(url, from_prometheus, answers, names)
    return Reading(windows, "prometheus", url, {"kind": "prometheus", "url": url}, names)


def _reading(url: str, reduce: Callable[..., _T], *args: Any) -> _T:
    """``reduce(*args)``, an answer of the wrong shape reported as such."""
    try:
        return reduce(*args)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise SourceError(f"{url}: unexpected answer ({type(exc).__name__}: {exc})") from None
