"""Tests of experiments.report.stepcost: the benchmark's step costs, compute to convergence
in plain-step equivalents, and equal-compute pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.__main__ import main as report_main
from experiments.report import collect_results
from experiments.report.stepcost import (
    batch_size,
    bench_method,
    convergence_rows,
    equal_compute_pairs,
    read_step_costs,
)
from tests.experiments.report_runs import synthetic_runs

REPO = Path(__file__).resolve().parents[2]


def bench_json(path: Path, ratios: dict[str, float], batch: int = 100) -> Path:
    """A bench_train_step.py result holding only what the report reads."""
    res = {f"step_ratio_{m}_over_plain_median_of_rounds": v for m, v in ratios.items()}
    path.write_text(json.dumps({"config": {}, "results": {
        "results_by_batch_size": {str(batch): {"batch_size": batch, **res}}}}))
    return path


def png_width(path: Path) -> int:
    """Pixel width from a PNG's IHDR chunk (bytes 16 to 20, big-endian)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big")


def test_bench_method_names_each_kind_of_step() -> None:
    assert bench_method({"method": "baseline"}) == "plain"
    assert bench_method({"method": "moment"}) == "moment"
    assert bench_method({"method": "moment", "moments": "first_relu"}) == "moment"
    assert bench_method({"method": "moment", "moments": "network"}) == "moment_network"
    assert bench_method({"method": "augment", "folds": 6}) == "augment"


def test_read_step_costs(tmp_path: Path) -> None:
    path = bench_json(tmp_path / "b.json", {"moment": 2.5, "augment": 1.05}, batch=200)
    assert read_step_costs(path) == {200: {"plain": 1.0, "moment": 2.5, "augment": 1.05}}
    with pytest.raises(FileNotFoundError, match="read_step_costs: no benchmark JSON"):
        read_step_costs(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"results": {"median": 1}}))
    with pytest.raises(ValueError, match="not a benchmarks/bench_train_step.py result"):
        read_step_costs(tmp_path / "other.json")
    for bad in (0.0, -1.0, float("nan")):
        bench_json(tmp_path / "bad.json", {"moment": bad})
        with pytest.raises(ValueError, match="step_ratio_moment_over_plain"):
            read_step_costs(tmp_path / "bad.json")


def test_the_committed_benchmark_parses() -> None:
    costs = read_step_costs(REPO / "docs/results/converged-mnist/bench_train_step.json")
    assert set(costs[100]) == {"plain", "moment", "augment", "gaussian", "moment_network"}


def test_plain_step_equivalents_and_pairs(tmp_path: Path) -> None:
    # synthetic runs: 3 epochs of 100 steps per pass; augmentation N~ passes per epoch
    synthetic_runs(tmp_path)
    records = collect_results(tmp_path)
    costs = {3: {"plain": 1.0}}  # another batch size than the runs': nothing measured
    rows = convergence_rows(records, costs)
    assert all(d["plain_steps"] is None for d in rows)
    batch = batch_size(records[0].config)
    assert batch == 1000  # the Table 1 preset of LeNet
    costs = {batch: {"plain": 1.0, "moment": 2.0, "augment": 1.1}}
    rows = convergence_rows(records, costs)
    by_label = {d["record"].label(): d for d in rows}
    assert by_label["baseline"]["plain_steps"] == 300
    assert by_label["moment alpha=1 sigma=0.5"]["plain_steps"] == 600  # 300 steps x 2
    assert by_label["augment N~=2 sigma=0.25"]["plain_steps"] == pytest.approx(660)
    assert by_label["augment N~=6 sigma=0.5"]["plain_steps"] == pytest.approx(1980)
    assert [d["plain_steps"] for d in rows] == sorted(d["plain_steps"] for d in rows)
    pairs = equal_compute_pairs(rows, n_boot=50, level=0.95, seed=0)
    # both regularizer runs (600) pair with aug2 (660, within 1.25); aug6 is 3.3x away
    assert [(d["record"].label(), e["record"].label()) for d, e, _ in pairs] == [
        ("moment alpha=1 sigma=0.5", "augment N~=2 sigma=0.25"),
        ("moment alpha=5 sigma=2", "augment N~=2 sigma=0.25"),
    ]
    # mom1 has one more correct image of 400 than aug2
    assert pairs[0][2]["accuracy_diff"].estimate == pytest.approx(1 / 400)
    costs[batch]["augment"] = 1.6  # aug2 at 960 plain steps: 1.6x the regularizer's
    assert equal_compute_pairs(convergence_rows(records, costs), n_boot=50, level=0.95,
                               seed=0) == []


def test_the_report_command_with_step_costs(tmp_path: Path) -> None:
    synthetic_runs(tmp_path)
    batch = batch_size(collect_results(tmp_path)[0].config)
    bench = bench_json(tmp_path / "bench.json", {"moment": 2.0, "augment": 1.1}, batch)
    out = tmp_path / "out"
    argv = ["report", str(tmp_path), "--out", str(out), "--bootstrap", "50"]
    assert report_main(argv + ["--step-costs", str(bench)]) == 0
    text = (out / "report.md").read_text()
    assert "### Compute to convergence (plain-step equivalents)" in text
    assert "| moment alpha=1 sigma=0.5 | 3 (3) | 300 | 2.00 | 600 |" in text
    assert "| moment alpha=1 sigma=0.5 | augment N~=2 sigma=0.25 | 1.10 |" in text
    # the compute figure gains a third panel (R against plain-step equivalents): 5 inches
    # at 110 dpi a panel
    (fig,) = out.glob("compute_*.png")
    assert png_width(fig) == 3 * 5 * 110
    assert report_main(argv) == 0  # without step costs: no such section, two panels
    assert "Compute to convergence" not in (out / "report.md").read_text()
    assert png_width(fig) == 2 * 5 * 110
    assert report_main(argv + ["--step-costs", str(tmp_path / "none.json")]) != 0
