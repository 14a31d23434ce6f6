"""What metrics cost: prometheus-client (plain and multiprocess mode) vs the ledger cells.

Run it from the repository root::

    .venv/bin/python -m bench.micro.metrics_cost [--iterations 200000] [--repeat 5]

It prints, best of ``--repeat`` timed loops (the loop's own overhead included):

1. ns per observation: ``Counter.inc`` and ``Histogram.observe`` on a bound child in
   prometheus-client's default mode and in its multiprocess mode
   (``PROMETHEUS_MULTIPROC_DIR``: one mmap'd file per process and metric type; measured in
   a child process, because the mode is chosen when prometheus_client is imported), against
   ``shm_metrics`` cells on the native ledger and on the pure-Python twin;
2. µs per finished request: ``WorkerMetrics.observe(record)`` (every family a proxied
   chat completion touches: requests, duration, request and response size, time to first
   token, overhead, queue wait, two token directions, cost) against the same families
   kept with prometheus-client;
3. ms per scrape (``render()``: reading every series of 4 workers and formatting the
   exposition) for a realistic host (~300 rows: 11 route templates x 10 statuses, 5
   models, errors, limits) and a large one (+ per-key series for 200 aliases, ~1,300
   rows), against ``generate_latest`` of one prometheus-client registry holding the same
   series and of ``MultiProcessCollector`` over 4 workers' files.

4. ms per ``GET /metrics`` (HTTP, keep-alive, best of 20) of a real ``zaiproxy serve
   --demo --workers 2`` whose segment holds the same series (``--no-http`` skips it).

One process, no contention. Segments are files in /dev/shm, removed at the end.

Results (2026-11-27 21:41 UTC, the 2-vCPU VM of bench/README.md, load ~2 from other work,
best of 5)::

                               prometheus-client   prom multiprocess   shm native   shm twin
    Counter.inc                           343 ns              910 ns        84 ns    1754 ns
    Histogram.observe                     780 ns             2044 ns       318 ns    3941 ns
    observe(record), 10 families         9985 ns            20790 ns      5101 ns   32659 ns
    scrape, realistic (~800 samples)     5.71 ms            16.91 ms      5.42 ms   13.42 ms
    scrape, large (~1,800 samples)      12.89 ms            38.97 ms     14.18 ms   24.38 ms
    GET /metrics, realistic (83 KB)            -                   -      6.78 ms          -
    GET /metrics, large (167 KB)               -                   -     24.03 ms          -

(realistic = 261 ledger rows of series, large = 1,271.) A finished request costs ~5 µs of
metrics against ~10 µs with plain prometheus-client (which would count one worker only)
and ~21 µs in multiprocess mode. Of a scrape, reading every worker's series from the
segment is ~0.8 ms (realistic); the rest is prometheus-client formatting the exposition
(``generate_latest``: label validation and escaping), the same work its own registries
pay. The shm per-call numbers include the Python method call around the ledger's atomic
add (~36 ns by itself, bench.micro.ledger_cost).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

MODELS = ("glm-4.6", "glm-4.5", "glm-4.5-air", "glm-4.5-flash", "glm-4.5v")
TEMPLATES = ("/v1/chat/completions", "/v1/messages", "/v1/completions", "/v1/embeddings",
             "/v1/models", "/v1/messages/count_tokens", "/api/paas/v4/*", "/api/anthropic/*",
             "other", "/health", "/metrics")
STATUSES = (200, 400, 401, 404, 429, 499, 500, 502, 503, 504)
WORKERS = 4


def best_ns(fn: Callable[[int], None], iterations: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn(iterations)
        best = min(best, (time.perf_counter_ns() - t0) / iterations)
    return best


def api_of(template: str) -> str | None:
    """The API of a route template, as the request path sets it on the record."""
    if template in ("/health", "/ready", "/metrics") or template.startswith("/admin/"):
        return None
    return "anthropic" if template.startswith(("/v1/messages", "/api/anthropic")) else "openai"


def records(aliases: int) -> list[Any]:
    """One record per series combination of a busy host (and per alias x status)."""
    from zaiproxy.core.record import RequestRecord, Usage

    out = []
    for i, template in enumerate(TEMPLATES):
        for status in STATUSES:
            model = MODELS[i % len(MODELS)]
            out.append(RequestRecord(
                request_id="r", method="POST" if template != "/v1/models" else "GET",
                route=template, api=api_of(template), status=status,
                duration_s=0.3 + status / 1000, bytes_in=2000,
                client="10.0.0.1", model=model, bytes_out=5000, ttft_s=0.2,
                upstream_s=0.29, queue_wait_s=0.0, token_count_s=0.0001,
                usage=Usage(500, 200), key_alias=f"alias-{status}"))
    for model in MODELS:
        for status in (200, 429):
            out.append(RequestRecord(
                request_id="r", method="POST", route="/v1/chat/completions", api="openai",
                status=status, duration_s=1.0, bytes_in=100, client="c", model=model,
                usage=Usage(1, 1),
                ttft_s=0.1))
    for a in range(aliases):
        for status in (200, 400, 401, 429, 500):
            out.append(RequestRecord(request_id="r", method="POST", route="/v1/messages",
                                     api="anthropic", status=status, duration_s=0.1, bytes_in=10, client="c",
                                     key_alias=f"key-{a:04d}"))
    return out


def extras(m: Any) -> None:
    """The families a record does not touch: errors, refusals, Z.AI codes, retries."""
    for e in ("upstream_error", "upstream_timeout", "pool_exhausted", "stream_cut",
              "upstream_connect", "protocol"):
        m.upstream_error(e)
    for limit in ("requests", "tokens", "concurrency", "quota"):
        for scope in ("global", "key"):
            m.rejection(limit, scope, "10.0.0.1")
    for cls, code in (("frequency", "1302"), ("quota", "1308"), ("balance", "1113"),
                      ("unknown", None), ("overload", "1305"), ("frequency", "1303")):
        m.zai_error(cls, code)
    for reason in ("frequency", "overload", "unknown"):
        m.retry(reason)


class PromMetrics:
    """The same families and labels kept with prometheus-client (what the issue compared)."""

    def __init__(self, alias_metrics: bool) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        from zaiproxy.observe import metrics as zm

        self.bucket = zm._client_label  # the client label, computed as WorkerMetrics does

        self.registry = CollectorRegistry()
        r = self.registry

        def hist(f: Any) -> Any:
            return Histogram(f.name, f.doc, [*f.labels, "variant"], buckets=f.buckets,
                             registry=r)

        def counter(f: Any) -> Any:
            return Counter(f.name, f.doc, [*f.labels, "variant"], registry=r)

        self.requests = counter(zm.REQUESTS)
        self.duration = hist(zm.DURATION)
        self.req_size = hist(zm.REQUEST_SIZE)
        self.resp_size = hist(zm.RESPONSE_SIZE)
        self.ttft = hist(zm.TTFT)
        self.overhead = hist(zm.OVERHEAD)
        self.wait = hist(zm.WAIT)
        self.token_count = hist(zm.TOKEN_COUNT)
        self.tokens = counter(zm.TOKENS)
        self.cost = counter(zm.COST)
        self.errors = counter(zm.UPSTREAM_ERRORS)
        self.rejections = counter(zm.REJECTIONS)
        self.zai = counter(zm.ZAI_ERRORS)
        self.retries = counter(zm.RETRIES)
        self.keys = counter(zm.KEY_REQUESTS) if alias_metrics else None
        self.children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Any, *labels: object) -> Any:
        key = (id(metric), *labels)
        c = self.children.get(key)
        if c is None:
            c = self.children[key] = metric.labels(*map(str, labels), "bench")
        return c

    def observe(self, r: Any) -> None:
        ch = self.child
        ch(self.requests, r.method, r.route, r.status).inc()
        ch(self.duration, r.method, r.route, r.status).observe(r.duration_s)
        ch(self.req_size, r.method, r.route).observe(r.bytes_in)
        if r.bytes_out is not None:
            ch(self.resp_size, r.method, r.route, r.status).observe(r.bytes_out)
        if r.ttft_s is not None:
            ch(self.ttft, r.model).observe(r.ttft_s)
        if r.upstream_s is not None:
            ch(self.overhead, r.route).observe(r.duration_s - r.upstream_s)
        if r.queue_wait_s is not None:
            ch(self.wait, self.bucket(r.client)).observe(r.queue_wait_s)
        if r.token_count_s is not None:
            ch(self.token_count).observe(r.token_count_s)
        if r.usage is not None:
            ch(self.tokens, "input", r.model, "standard").inc(r.usage.input_tokens)
            ch(self.tokens, "output", r.model, "standard").inc(r.usage.output_tokens)
            ch(self.cost, r.model).inc(r.usage.input_tokens * 6e-7 + r.usage.output_tokens * 2.2e-6)
        if self.keys is not None and r.key_alias is not None:
            ch(self.keys, r.key_alias, r.status).inc()

    def upstream_error(self, e: str) -> None:
        self.child(self.errors, e).inc()

    def rejection(self, limit: str, scope: str, peer: str) -> None:
        self.child(self.rejections, limit, scope, self.bucket(peer)).inc()

    def zai_error(self, cls: str, code: str | None) -> None:
        self.child(self.zai, cls, code or "other").inc()

    def retry(self, reason: str) -> None:
        self.child(self.retries, reason).inc()


def chat_record() -> Any:
    from zaiproxy.core.record import RequestRecord, Usage

    return RequestRecord(request_id="r", method="POST", route="/v1/chat/completions",
                         api="openai", status=200, duration_s=0.8, bytes_in=2000, client="c", model="glm-4.6",
                         bytes_out=5000, ttft_s=0.2, upstream_s=0.79, queue_wait_s=0.0,
                         usage=Usage(500, 200))


def measure_prom(iterations: int, repeat: int, multiprocess: bool) -> dict[str, float]:
    """prometheus-client, in this process's mode (multiprocess if the env var is set)."""
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Histogram,
        disable_created_metrics,
        generate_latest,
    )

    disable_created_metrics()  # type: ignore[no-untyped-call]  # the same samples as ours

    r = CollectorRegistry()
    counter = Counter("bench_c", "c", ["a"], registry=r).labels("x")
    histogram = Histogram("bench_h", "h", ["a"], registry=r,
                          buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60,
                                   120, 300)).labels("x")

    def inc(n: int) -> None:
        for _ in range(n):
            counter.inc()

    def observe(n: int) -> None:
        for _ in range(n):
            histogram.observe(0.3)

    out = {"Counter.inc (ns)": best_ns(inc, iterations, repeat),
           "Histogram.observe (ns)": best_ns(observe, iterations, repeat)}
    rec = chat_record()
    pm = PromMetrics(alias_metrics=False)

    def observe_record(n: int) -> None:
        for _ in range(n):
            pm.observe(rec)

    out["observe(record) (ns)"] = best_ns(observe_record, iterations // 10, repeat)
    for name, aliases in (("realistic", 0), ("large", 200)):
        recs = records(aliases)
        if multiprocess:
            from prometheus_client import multiprocess as mp
            from prometheus_client import values

            for worker in range(WORKERS):  # four workers' files, as after real traffic
                values.ValueClass = values.MultiProcessValue(lambda w=worker: 90_000 + w)
                w = PromMetrics(alias_metrics=aliases > 0)
                for x in recs:
                    w.observe(x)
                extras(w)
            scrape_registry = CollectorRegistry()
            mp.MultiProcessCollector(scrape_registry)
        else:
            one = PromMetrics(alias_metrics=aliases > 0)
            for x in recs:
                one.observe(x)
            extras(one)
            scrape_registry = one.registry
        text = generate_latest(scrape_registry)

        def scrape(n: int, reg: Any = scrape_registry) -> None:
            for _ in range(n):
                generate_latest(reg)

        out[f"scrape {name} (ns)"] = best_ns(scrape, 20, repeat)
        out[f"scrape {name} samples"] = float(text.count(b"\n") - text.count(b"\n#"))
    return out


def measure_shm(impl: str, iterations: int, repeat: int, directory: str) -> dict[str, float]:
    from zaiproxy.limits.ledger import load
    from zaiproxy.observe.metrics import DURATION, REQUESTS, WorkerMetrics

    mod = load(impl)
    path = os.path.join(directory, impl)
    seg = mod.Ledger(path, create=True, rows=4096, windows=256, workers=WORKERS)
    attached = [mod.Ledger(path, create=False) for _ in range(WORKERS)]
    try:
        def worker(i: int, alias: bool = False) -> WorkerMetrics:
            return WorkerMetrics(variant="bench", ledger=impl, workers=WORKERS,
                                 segment=attached[i], worker_index=i, alias_metrics=alias,
                                 known_models=frozenset(MODELS))

        w = worker(0)
        counter = w.store.bind(REQUESTS, ("POST", "/v1/chat/completions", "200"))
        histogram = w.store.bind(DURATION, ("POST", "/v1/chat/completions", "200"))

        def inc(n: int) -> None:
            for _ in range(n):
                counter.inc()

        def observe(n: int) -> None:
            for _ in range(n):
                histogram.observe(0.3)

        rec = chat_record()

        def observe_record(n: int) -> None:
            for _ in range(n):
                w.observe(rec)

        out = {"Counter.inc (ns)": best_ns(inc, iterations, repeat),
               "Histogram.observe (ns)": best_ns(observe, iterations, repeat),
               "observe(record) (ns)": best_ns(observe_record, iterations // 10, repeat)}
        for name, aliases in (("realistic", 0), ("large", 200)):
            workers = [worker(i, alias=aliases > 0) for i in range(WORKERS)]
            for wm in workers:
                for x in records(aliases):
                    wm.observe(x)
                extras(wm)
            scraper = workers[0]
            text, _ = scraper.render()

            def scrape(n: int, s: WorkerMetrics = scraper) -> None:
                for _ in range(n):
                    s.render()

            out[f"scrape {name} (ns)"] = best_ns(scrape, 20 if impl == "native" else 3, repeat)
            out[f"scrape {name} samples"] = float(text.count(b"\n") - text.count(b"\n#"))
            out[f"scrape {name} rows"] = float(scraper.store.reserved())
        return out
    finally:
        for led in attached:
            led.close()
        seg.close()
        seg.unlink()


def measure_http(repeat: int, aliases: int, directory: str) -> dict[str, float]:
    """``GET /metrics`` of a real ``zaiproxy serve --workers 2`` whose segment holds the
    series of 4 workers' traffic (written by WorkerMetrics objects attached to it)."""
    import http.client
    import re
    import select
    from dataclasses import fields

    from zaiproxy.core.config import Config
    from zaiproxy.limits.ledger import load
    from zaiproxy.observe.metrics import WorkerMetrics

    env = {k: v for k, v in os.environ.items() if not k.startswith("ZAIPROXY_")}
    env.update(ZAIPROXY_ACCESS_LOG="false", ZAIPROXY_ALIAS_METRICS="true" if aliases else "false")
    if "history" in {f.name for f in fields(Config)}:
        env["ZAIPROXY_HISTORY"] = "false"  # no DuckDB file for this
    env["PYTHONPATH"] = os.getcwd()
    proc = subprocess.Popen([sys.executable, "-m", "zaiproxy", "serve", "--demo", "--port", "0",
                             "--workers", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=directory)
    try:
        assert proc.stdout is not None
        line = ""
        deadline = time.monotonic() + 60
        while "listening on" not in line and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1)[0]:
                line = proc.stdout.readline()
        match = re.search(r"listening on http://[^:]+:(\d+)", line)
        assert match, line
        port = int(match[1])
        segment = load().Ledger(f"/dev/shm/zaiproxy-{port}", create=False)
        for index in range(2, 2 + WORKERS):  # four more "workers" of traffic
            m = WorkerMetrics(variant="production", ledger=segment.implementation, workers=2,
                              segment=segment, worker_index=index,
                              alias_metrics=aliases > 0, known_models=frozenset(MODELS))
            for x in records(aliases):
                m.observe(x)
            extras(m)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        best = float("inf")
        size = 0
        for _ in range(repeat * 4):
            t0 = time.perf_counter_ns()
            conn.request("GET", "/metrics")
            body = conn.getresponse().read()
            best = min(best, time.perf_counter_ns() - t0)
            size = len(body)
        conn.close()
        segment.close()
        return {"ns": best, "bytes": size}
    finally:
        proc.terminate()
        proc.wait(30)


def child_multiprocess(iterations: int, repeat: int) -> None:
    print(json.dumps(measure_prom(iterations, repeat, multiprocess=True)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200_000, help="per loop, native")
    parser.add_argument("--twin-iterations", type=int, default=20_000,
                        help="per loop, pure-Python twin")
    parser.add_argument("--repeat", type=int, default=5, help="timed loops; the best is shown")
    parser.add_argument("--no-http", action="store_true",
                        help="skip GET /metrics of a real proxy (zaiproxy serve --demo)")
    parser.add_argument("--multiprocess-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.multiprocess_child:
        child_multiprocess(args.iterations, args.repeat)
        return
    directory = tempfile.mkdtemp(prefix="zaiproxy-bench-", dir="/dev/shm")
    try:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": os.path.join(directory, "mp")}
        os.mkdir(env["PROMETHEUS_MULTIPROC_DIR"])
        child = subprocess.run(
            [sys.executable, "-m", "bench.micro.metrics_cost", "--multiprocess-child",
             "--iterations", str(args.iterations), "--repeat", str(args.repeat)],
            env=env, capture_output=True, text=True, check=True)
        results = {
            "prometheus-client": measure_prom(args.iterations, args.repeat, multiprocess=False),
            "prom multiprocess": json.loads(child.stdout),
            "shm native": measure_shm("native", args.iterations, args.repeat, directory),
            "shm python twin": measure_shm("python", args.twin_iterations, args.repeat,
                                           directory),
        }
        if not args.no_http:
            for name, aliases in (("realistic", 0), ("large", 200)):
                got = measure_http(args.repeat, aliases, directory)
                results["shm native"][f"GET /metrics {name} (ns)"] = got["ns"]
                results["shm native"][f"GET /metrics {name} bytes"] = got["bytes"]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    columns = list(results)
    rows = list(dict.fromkeys(k for r in results.values() for k in r))
    width = max(map(len, rows))
    print(f"{'(best of ' + str(args.repeat) + ')':<{width}}  "
          + "  ".join(f"{c:>18}" for c in columns))
    for row in rows:
        cells = []
        for c in columns:
            v = results[c].get(row)
            if v is None:
                cells.append(f"{'-':>18}")
            elif row.endswith("(ns)") and row.startswith(("scrape", "GET")):
                cells.append(f"{v / 1e6:>15.2f} ms")
            elif row.endswith("(ns)"):
                cells.append(f"{v:>15.0f} ns")
            else:
                cells.append(f"{v:>18.0f}")
        print(f"{row:<{width}}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
