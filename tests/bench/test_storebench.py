"""``imgpipe bench store``: the report's shape on a tiny run (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imgpipe.bench import storebench
from imgpipe.cli import main as imgpipe


def test_a_tiny_run_reports_every_operation_on_both_backends(
        tmp_path: Path, pg_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = pg_server.new_database("bench")
    out = tmp_path / "store.json"
    assert imgpipe(["bench", "store", "--ops", "3", "--threads", "1,2", "--store-url", url,
                    "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["backends"]) == {"sqlite", "postgres"} and doc["notes"] == []
    assert doc["ops"] == 3 and doc["threads"] == [1, 2]
    for rec in doc["backends"].values():
        assert set(rec["ops_per_s"]) == {"1", "2"}
        for figures in rec["ops_per_s"].values():
            assert list(figures) == list(storebench.OPS)
            assert all(v > 0 for v in figures.values())
    printed = capsys.readouterr().out
    assert "operations per second" in printed and "postgres, 2 threads" in printed
    assert "postgres: postgresql://postgres@/bench_" in printed


def test_sqlite_alone_needs_no_server(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    assert storebench.main(["--ops", "2", "--threads", "1", "--backends", "sqlite",
                            "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())["backends"]) == ["sqlite"]


@pytest.mark.parametrize("argv", [["--ops", "0"], ["--threads", "0"], ["--threads", "x"],
                                  ["--backends", "mysql"]])
def test_bad_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        storebench.parse_args(argv)
    assert exc.value.code == 2
