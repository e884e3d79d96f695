"""Suite ``shallow`` on a tiny grid: Theorem 1 and the covariance pass their z-test."""

from __future__ import annotations

from pathlib import Path

from validation import suite_shallow
from validation.reporting import SuiteConfig, write_report


def test_tiny_grid_passes_and_writes_outputs(tmp_path: Path):
    cfg = SuiteConfig(out_dir=tmp_path, quick=True, seed=3, progress=False)
    tiny = {
        "n": [3],
        "p": [6],
        "sigma": [0.5, 5.0],
        "cov_kind": ["diag", "full"],
        "d": 2,
        "points": 2,
        "n_samples": 20_000,
    }
    report = write_report(cfg, suite_shallow.run(cfg, tiny))
    assert len(report.rows) == 4
    bound = report.config["bonferroni_bound"]
    assert all(r["max_abs_z_mean"] < bound and r["max_abs_z_cov"] < bound for r in report.rows)
    assert report.summary[0].startswith("**PASS**")
    text = (tmp_path / "shallow.csv").read_text().splitlines()
    assert "# seed: 3" in text and any(line.startswith("# momentkit_version: ") for line in text)
    assert (tmp_path / "shallow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in (tmp_path / "shallow.md").read_text()


def test_random_input_covariance_is_valid():
    import torch

    gen = torch.Generator().manual_seed(0)
    mean, cov = suite_shallow.random_input(3, 5, 2.0, "full", gen)
    assert mean.shape == (3, 5) and cov.shape == (3, 5, 5)
    assert torch.allclose(cov, cov.transpose(-1, -2))
    assert bool((torch.linalg.eigvalsh(cov) > 0).all())
