"""The request history: one recorder process writes every finished request to DuckDB.

::

    worker 1..N ──RecordSink──► AF_UNIX datagram channel ──► recorder ──► history.duckdb
                 (never blocks: drops + counts)    (bounded)   (batches,     (requests,
                                                                rollups,      snapshots,
                                                                retention)    requests_1m)
    zaiproxy history ──► recorder's loopback endpoint, or the file read-only if none runs

Modules, each one job:

* ``wire``      the datagram format (pure)
* ``sequence``  sequence numbers: what is in the file, dropped, lost (pure)
* ``sink``      the worker side: :class:`~zaiproxy.observe.recorder.sink.RecordSink` (no DuckDB import)
* ``channel``   the recorder's end: peek, hold until written, release
* ``schema``    tables, versions, migrations
* ``store``     batched inserts, snapshots, rollups, retention (synchronous, clock passed in)
* ``queries``   ``history_summary`` / ``history_series`` / Parquet export (JSON-able answers)
* ``ranges``    "15m" / "24h" / "7d" durations (no DuckDB import)
* ``service``   the recorder's trio tasks and its DuckDB failure handling
* ``endpoint``  the loopback HTTP query endpoint and its blocking client (the CLI)
* ``client``    the workers' async client of it (``GET /admin/history``)
* ``process``   the recorder process's entry point
* ``supervise`` the supervisor's side: channel, spawn, restart, stop
* ``cli``       ``zaiproxy history``

Nothing is imported here: workers import ``sink`` without loading DuckDB.
"""
