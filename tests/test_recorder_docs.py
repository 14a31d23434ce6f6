"""The history file's schema as the recorder README documents it (issue 16).

``zaiproxy/observe/recorder/README.md`` has a ``### Schema`` section with one Markdown table
(column | type | unit | meaning) per user-facing table, under a ``#### `name``` heading. A
history file made by the real store (:meth:`HistoryStore.open`, every migration applied) must
have exactly the documented columns, in the documented order, of the documented DuckDB types
and nullability; and every table of the file must at least be named in the section. The SQL
examples of the same README are run by tests/test_history_cli.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from zaiproxy.observe.recorder.schema import SCHEMA_VERSION
from zaiproxy.observe.recorder.store import HistoryStore

README = Path(__file__).resolve().parent.parent / "zaiproxy" / "observe" / "recorder" / "README.md"
# The tables documented column by column; the bookkeeping ones are only named.
DOCUMENTED = ("requests", "requests_1m", "snapshots", "zai_quota")
HEADER = ["column", "type", "unit", "meaning"]

# Spellings of one DuckDB type, as DESCRIBE names it (the README uses the short ones).
TYPE_ALIASES = {
    "TIMESTAMPTZ": "TIMESTAMP WITH TIME ZONE",
    "INT": "INTEGER",
    "INT4": "INTEGER",
    "SIGNED": "INTEGER",
    "INT8": "BIGINT",
    "LONG": "BIGINT",
    "INT2": "SMALLINT",
    "SHORT": "SMALLINT",
    "BOOL": "BOOLEAN",
    "LOGICAL": "BOOLEAN",
    "FLOAT8": "DOUBLE",
    "TEXT": "VARCHAR",
    "STRING": "VARCHAR",
}


class Column(NamedTuple):
    name: str
    type: str  # as DESCRIBE names it
    nullable: bool


class DocRow(NamedTuple):
    column: Column
    unit: str
    meaning: str


def normalise_type(text: str) -> str:
    kind = " ".join(text.replace("`", " ").upper().split())
    return TYPE_ALIASES.get(kind, kind)


def documented_type(cell: str) -> tuple[str, bool]:
    """(type, nullable) of a type cell: ``TIMESTAMPTZ NOT NULL`` -> the type, False."""
    kind = " ".join(cell.replace("`", " ").upper().split())
    nullable = not kind.endswith(" NOT NULL")
    if not nullable:
        kind = kind.removesuffix(" NOT NULL")
    return normalise_type(kind), nullable


def cells(line: str) -> list[str]:
    """The cells of one Markdown table row (``\\|`` is a pipe inside a cell)."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def schema_section(text: str) -> str:
    found = re.search(r"^### Schema\n(.*?)(?=^#{1,3} |\Z)", text, re.M | re.S)
    assert found is not None, "the README has no '### Schema' section"
    return found[1]


def schema_tables(section: str) -> dict[str, list[DocRow]]:
    """Per ``#### `table``` heading of the section, the rows of the table under it."""
    tables: dict[str, list[DocRow]] = {}
    parts = re.split(r"^#### `([a-z0-9_]+)`[ \t]*\n", section, flags=re.M)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.splitlines() if line.startswith("|")]
        assert lines, f"no table under the heading of {name}"
        assert [c.lower() for c in cells(lines[0])] == HEADER, f"{name}: header {lines[0]!r}"
        assert set(lines[1]) <= set("|-: "), f"{name}: no delimiter row under the header"
        rows = []
        for line in lines[2:]:
            got = cells(line)
            assert len(got) == len(HEADER), f"{name}: {len(got)} cells in {line!r}"
            column = re.fullmatch(r"`([a-z0-9_]+)`", got[0])
            assert column is not None, f"{name}: column cell {got[0]!r} is not `a_name`"
            kind, nullable = documented_type(got[1])
            rows.append(DocRow(Column(column[1], kind, nullable), got[2], got[3]))
        tables[name] = rows
    return tables


@pytest.fixture(scope="module")
def readme_tables() -> dict[str, list[DocRow]]:
    return schema_tables(schema_section(README.read_text(encoding="utf-8")))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    s = HistoryStore.open(str(tmp_path / "h.duckdb"))
    yield s
    s.close()


def real_columns(store: HistoryStore, table: str) -> list[Column]:
    return [Column(name, normalise_type(kind), null == "YES")
            for name, kind, null, *_ in store.con.execute(f"DESCRIBE {table}").fetchall()]


def test_the_type_cells_read_as_describe_names_the_types() -> None:
    assert documented_type("`TIMESTAMPTZ NOT NULL`") == ("TIMESTAMP WITH TIME ZONE", False)
    assert documented_type("`BIGINT`") == ("BIGINT", True)
    assert documented_type("`int`") == ("INTEGER", True)
    assert cells("| `a` | `VARCHAR` | — | `x` \\| `y` |") == ["`a`", "`VARCHAR`", "—",
                                                            "`x` | `y`"]


def test_the_schema_section_covers_every_table_of_a_fresh_history_file(
        store: HistoryStore, readme_tables: dict[str, list[DocRow]]) -> None:
    assert store.version == SCHEMA_VERSION
    section = schema_section(README.read_text(encoding="utf-8"))
    tables = [row[0] for row in store.con.execute("SHOW TABLES").fetchall()]
    assert set(DOCUMENTED) <= set(tables)
    assert sorted(readme_tables) == sorted(DOCUMENTED)
    unnamed = [t for t in tables if f"`{t}`" not in section]
    assert not unnamed, f"tables of the history file the README's schema never names: {unnamed}"


@pytest.mark.parametrize("table", DOCUMENTED)
def test_the_readme_schema_table_is_the_columns_of_a_fresh_history_file(
        store: HistoryStore, readme_tables: dict[str, list[DocRow]], table: str) -> None:
    real = real_columns(store, table)
    documented = [row.column for row in readme_tables[table]]
    real_names = [c.name for c in real]
    doc_names = [c.name for c in documented]
    undocumented = [n for n in real_names if n not in doc_names]
    assert not undocumented, f"{table}: columns missing from the README: {undocumented}"
    unknown = [n for n in doc_names if n not in real_names]
    assert not unknown, f"{table}: README columns the file does not have: {unknown}"
    assert len(doc_names) == len(set(doc_names)), f"{table}: a column documented twice"
    assert doc_names == real_names, f"{table}: the README lists the columns in another order"
    wrong = [(doc, actual) for doc, actual in zip(documented, real, strict=True) if doc != actual]
    assert not wrong, f"{table}: documented (type, nullability) differs from DuckDB's: {wrong}"
    for row in readme_tables[table]:
        assert row.unit, f"{table}.{row.column.name}: no unit ('—' when it has none)"
        assert len(row.meaning) >= 10, f"{table}.{row.column.name}: no meaning"
