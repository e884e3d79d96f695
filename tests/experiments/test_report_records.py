"""Tests of experiments.report.records: which run folders become records, which are left out
(failed, diverged, non-finite results) and the flat results table."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from experiments import rundir
from experiments.report import TABLE_COLUMNS, collect_results, collect_runs, results_table
from experiments.report.records import write_csv
from tests.experiments.report_runs import (
    RUNS,
    cfg,
    r_by_hand,
    synthetic_runs,
    write_failed,
    write_nan_results,
    write_run,
)


def test_results_table_and_incomplete_runs(tmp_path: Path) -> None:
    synthetic_runs(tmp_path)
    broken = tmp_path / "runs" / "broken"
    broken.mkdir()
    (broken / "results.json").write_text('{"config": {}}')
    with pytest.warns(UserWarning, match="incomplete"):
        records = collect_results(tmp_path)
    rows = results_table(records)
    # sorted by experiments.config.METHODS, then by alpha or folds
    assert [r["method"] for r in rows] == ["baseline", "moment", "moment", "augment", "augment"]
    assert [r["folds"] for r in rows[3:]] == [2, 6]
    assert [r["alpha"] for r in rows[1:3]] == [1.0, 5.0]
    assert rows[0]["robustness_auc"] == r_by_hand(RUNS["baseline"][3])
    assert not any(r["degenerate_predictions"] for r in rows)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_results(tmp_path / "nope")


def test_failed_and_diverged_runs_are_left_out_with_their_reason(tmp_path: Path) -> None:
    synthetic_runs(tmp_path)
    diverged = cfg("moment", alpha=9.0, sigma=0.5)
    crashed = cfg("augment", folds=3, sigma=0.5)
    write_failed(tmp_path, diverged, "diverged", 2, "non-finite loss nan at epoch 2")
    write_failed(tmp_path, crashed, "exception", None, "RuntimeError: out of\nmemory")
    records, left_out = collect_runs(tmp_path)
    assert len(records) == len(RUNS)
    assert {r.run_id for r in records}.isdisjoint({diverged.run_id(), crashed.run_id()})
    by_id = {r.run_id: r for r in left_out}
    d, c = by_id[diverged.run_id()], by_id[crashed.run_id()]
    assert (d.kind, d.epoch, d.error) == ("diverged", 2, "non-finite loss nan at epoch 2")
    assert d.label == "moment alpha=9 sigma=0.5"
    assert (c.kind, c.epoch, c.error) == ("exception", None, "RuntimeError: out of memory")


def test_a_complete_run_wins_over_a_stale_error_record(tmp_path: Path) -> None:
    config = cfg("baseline")
    write_failed(tmp_path, config, "exception", 1, "killed")
    write_run(tmp_path, config, 300, [400] * 5)
    records, left_out = collect_runs(tmp_path)
    assert [r.run_id for r in records] == [config.run_id()] and left_out == []
    # a failed copy of the same run id in another folder is not listed either
    copy = tmp_path / "copy" / "other-name"
    rundir.write_json_atomic(
        copy / rundir.ERROR_FILE, {"error": "x", "kind": "exception", "run_id": config.run_id()}
    )
    assert collect_runs(tmp_path)[1] == []


def test_non_finite_results_are_left_out(tmp_path: Path) -> None:
    """results.json with a bare NaN (as a diverged run used to write it) parses in Python's
    lenient json, but its accuracy is no number: the run is left out, not compared."""
    write_run(tmp_path, cfg("baseline"), 360, [400] * 5)
    nan_run = cfg("moment", alpha=1.0, sigma=0.5)
    write_nan_results(tmp_path, nan_run)
    records, left_out = collect_runs(tmp_path)
    assert [r.method for r in records] == ["baseline"]
    assert [(r.run_id, r.kind) for r in left_out] == [(nan_run.run_id(), "invalid results")]
    assert "non-finite" in left_out[0].error


def test_flagged_runs_are_marked_in_the_table_and_csv(tmp_path: Path) -> None:
    write_run(tmp_path, cfg("baseline"), 360, [400] * 5)
    flat = cfg("moment", alpha=1.0, sigma=0.5)
    write_run(tmp_path, flat, 40, [400] * 5, degenerate=0.98)
    rows = results_table(collect_results(tmp_path))
    by_method = {r["method"]: r for r in rows}
    assert by_method["moment"]["degenerate_predictions"] is True
    assert by_method["moment"]["top_class_fraction"] == 0.98
    assert by_method["baseline"]["degenerate_predictions"] is False
    assert by_method["baseline"]["top_class_fraction"] is None
    path = tmp_path / "t.csv"
    write_csv(rows, path, ["line one", "line two"])
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# line one", "# line two"]
    parsed = list(csv.DictReader(lines[2:]))
    assert list(parsed[0]) == list(TABLE_COLUMNS)
    assert {r["method"]: r["degenerate_predictions"] for r in parsed} == {
        "baseline": "False",
        "moment": "True",
    }
    assert not list(tmp_path.glob(".t.csv.*"))  # no temporary file left behind


def test_record_files_are_read_through_rundir(tmp_path: Path) -> None:
    """A results.json without per_image.npz is not complete (rundir.read_results)."""
    rdir = write_run(tmp_path, cfg("baseline"), 360, [400] * 5)
    (rdir / rundir.PER_IMAGE_FILE).unlink()
    with pytest.warns(UserWarning, match="incomplete"):
        assert collect_runs(tmp_path) == ([], [])
