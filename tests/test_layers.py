"""The shape of the package, checked: what a worker loads, and no import cycles at all.

import-linter (``make test``) keeps the wings in their floors; these two checks cover what a
layers contract cannot see: the modules a worker process actually imports (DuckDB belongs
to the recorder process, Textual to the TUI's), and cycles inside one wing, including
imports made only for type checking.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parent.parent


def test_a_worker_loads_neither_duckdb_nor_the_terminal_ui() -> None:
    # A fresh interpreter: this test process has imported everything already.
    code = ("import sys\n"
            "import zaiproxy.run.worker, zaiproxy.request.pipeline\n"
            "heavy = {'duckdb', 'textual', 'rich', 'zaiproxy_tui', 'httpx'}\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60).stdout.strip()
    assert out == "[]"


def test_no_import_cycles_not_even_for_type_checking() -> None:
    graph = grimp.build_graph("zaiproxy", include_external_packages=False)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            # A cycle through this edge: the imported module reaches back to the importer.
            if graph.find_shortest_chain(importer=imported, imported=module) is not None:
                cycles.append((module, imported))
    assert cycles == []
