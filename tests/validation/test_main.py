"""The ``python -m validation`` command line."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from validation import __main__ as cli
from validation import suite_covariance


def test_unknown_suite_and_bad_seed_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])
    assert "unknown suite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["shallow", "--seed", "-1"])


def test_unusable_device_is_reported(tmp_path: Path, capsys):
    assert cli.main(["covariance", "--device", "nonsense", "--out", str(tmp_path)]) == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_a_suite_and_writes_its_files(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(
        suite_covariance, "grid", lambda quick: {"means": [0.0], "rhos": [0.5], "n_samples": 2000}
    )
    assert cli.main(["covariance", "--out", str(tmp_path), "--seed", "4", "--no-progress"]) == 0
    for ext in ("csv", "png", "md"):
        assert (tmp_path / f"covariance.{ext}").is_file()
    assert (tmp_path / "covariance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "covariance.csv").read_text().splitlines()
    assert "# seed: 4" in lines and "# quick: False" in lines


def test_quick_and_full_grids_have_the_same_entries():
    # a suite reads the same keys in both; a key missing from one grid fails only there
    for name in cli.SUITE_NAMES:
        module = importlib.import_module(f"validation.suite_{name}")
        assert sorted(module.grid(True)) == sorted(module.grid(False)), name
