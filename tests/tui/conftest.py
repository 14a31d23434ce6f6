"""The terminal UI never imports the proxy's HTTP stack (an import contract): `make test`'s
second run (ZAIPROXY_HTTP_IMPL=h11-mypyc, for every test that touches the proxy's HTTP/1.1)
has nothing new to find in its views, widgets, snapshots or sources, and skips them. The
end-to-end test, which drives a real proxy, runs in both."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent
BOTH_RUNS = frozenset({"test_e2e.py"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("ZAIPROXY_HTTP_IMPL") != "h11-mypyc":
        return
    skip = pytest.mark.skip(reason="the TUI is independent of the proxy's HTTP "
                                   "implementation: run once, with h11")
    for item in items:
        if item.path.parent == HERE and item.path.name not in BOTH_RUNS:
            item.add_marker(skip)
