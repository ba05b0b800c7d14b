"""The pure parts of `bench compare`: medians, ratios and the table.

Run: .venv/bin/python -m pytest bench/test_compare.py (needs the bench extra, as bench/ does).
"""

from __future__ import annotations

from pathlib import Path

from .compare import _side_label, markdown, ratio, summarize
from .revision import Side


def _round(rate: float, cpu: float | None, enqueue_rate: float = 50_000.0, other_pct: float = 1.0) -> dict:
    return {"rate_per_s": rate, "cpu_us_per_request": cpu, "worker_process_cpu_us_per_request": cpu and cpu - 40,
            "worker_backend_cpu_us_per_request": cpu and 40.0, "enqueue_us_per_call": round(1e6 / enqueue_rate, 2),
            "other_processes_cpu_pct": other_pct}


def _result() -> dict:
    sides = {"base": {"label": "`main` = 0b7cb6f", "rounds": [_round(8000, 200), _round(9000, 180), _round(8500, 190)]},
             "head": {"label": "working tree at 0b7cb6f + uncommitted changes",
                      "rounds": [_round(9000, 150, 40_000), _round(10_000, None, 40_000, 12.4),
                                 _round(9500, 160, 40_000)]}}
    return {"settings": {"requests": 20_000, "rounds": 3, "workers": 2, "target": "nginx",
                         "serve_flags": {"write_batch_size": "1000"}, "postgres": "embedded PostgreSQL 18.6, fsync on",
                         "cores": 2},
            "started_at": "2026-12-04 20:00", "sides": sides, "ratio": summarize(sides)}


def test_ratio_is_head_over_base_and_none_without_both():
    assert ratio(9.0, 8.0) == 1.125
    assert ratio(None, 8.0) is None
    assert ratio(9.0, None) is None
    assert ratio(9.0, 0.0) is None


def test_summarize_takes_medians_and_skips_unreadable_rounds():
    result = _result()
    assert result["sides"]["base"]["median"]["rate_per_s"] == 8500
    # One head round could not read its CPU: the median is of the two others.
    assert result["sides"]["head"]["median"]["cpu_us_per_request"] == 155
    assert result["ratio"]["rate_per_s"] == round(9500 / 8500, 3)
    assert result["ratio"]["cpu_us_per_request"] == round(155 / 190, 3)
    assert result["ratio"]["enqueue_us_per_call"] == 1.25


def test_markdown_names_both_sides_the_settings_and_every_figure():
    text = markdown(_result())
    assert text.startswith("#### bench compare: head working tree at 0b7cb6f + uncommitted changes "
                           "/ base `main` = 0b7cb6f")
    assert "`serve --workers 2 --write-batch-size 1000`" in text
    assert "| req/s, median | 8,500 | 9,500 | 1.12 |" in text
    assert "| req/s, each round | 8,000 · 9,000 · 8,500 | 9,000 · 10,000 · 9,500 | |" in text
    assert "| CPU µs/request: workers + their database sessions, median | 190.0 | 155.0 | 0.82 |" in text
    assert "| enqueue µs per net.http_get call, median | 20.00 | 25.00 | 1.25 |" in text
    assert "| CPU of other processes, worst round | 1 % | 12 % | |" in text
    assert "Noisy" not in text  # 12 % at worst: under NOISY_PCT
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert all(line.count("|") == 5 for line in rows)


def test_side_labels_say_which_revision_and_whether_the_tree_is_dirty():
    def side(rev: str, dirty: bool = False) -> Side:
        return Side("head", rev, "0b7cb6f", dirty, "python", Path("."))

    assert _side_label(side("main")) == "`main` = 0b7cb6f"
    assert _side_label(side("0b7cb6f")) == "0b7cb6f"
    assert _side_label(side("working tree", dirty=True)) == "working tree at 0b7cb6f + uncommitted changes"


def test_markdown_warns_when_other_processes_took_much_of_the_machine():
    result = _result()
    result["sides"]["base"]["rounds"][1]["other_processes_cpu_pct"] = 47.2
    assert "**Noisy machine**: other processes took up to 47 % of its CPU in a round" in markdown(result)
