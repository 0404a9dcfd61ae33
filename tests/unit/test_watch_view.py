"""The watch view's pure layout functions (the live watch: tests/live/test_watch.py)."""

from __future__ import annotations

from loader_client.stats_view import table
from loader_server.tools.watch import fit


def test_table_aligns_text_left_and_numbers_right():
    assert table(["NAME", "N", "BUSY"], [["a", 5, "7%"], ["long-name", 123, "100%"]]) == [
        "NAME         N  BUSY",
        "a            5    7%",
        "long-name  123  100%",
    ]
    assert table(["CLIENT", "DATASET"], []) == ["CLIENT  (none)"]


def test_fit_cuts_lines_to_the_width_and_says_how_many_lines_it_hid():
    lines = [f"line {i} " + "x" * 50 for i in range(10)]
    cut = fit(lines, columns=20, rows=6)
    assert len(cut) == 5 and all(len(line) <= 19 for line in cut)
    assert cut[:4] == [line[:19] for line in lines[:4]] and cut[4].startswith("... 6 more lines")
