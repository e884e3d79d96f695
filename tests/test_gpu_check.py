"""``benchmarks/gpu_check.py`` runs end to end (``--quick`` on the CPU) and writes its JSON."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.gpu_check import OUT_NAME, STEPS, run_checks


@pytest.mark.slow
def test_quick_check_on_cpu_writes_every_step(tmp_path, data_root) -> None:
    steps = ["train_plain", "train_moment", "certify", "network_moments"]
    report = run_checks(torch.device("cpu"), tmp_path, quick=True, data_root=str(data_root),
                        steps=steps)
    saved = json.loads((tmp_path / OUT_NAME).read_text())
    assert list(saved["steps"]) == steps
    for name in steps:
        assert saved["steps"][name]["ok"], saved["steps"][name].get("traceback")
    plain, moment = report["steps"]["train_plain"], report["steps"]["train_moment"]
    assert plain["gradient_steps"] == moment["gradient_steps"] == 9  # 900 images, batch 100
    assert 0.0 <= plain["test_accuracy"] <= 1.0 and len(plain["epoch_s"]) == 1
    cert = report["steps"]["certify"]
    assert cert["n_images"] == cert["images"] == 10 and 0.0 <= cert["acr"]
    assert set(cert["certified_accuracy"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    nm = report["steps"]["network_moments"]
    assert nm["diagonal_over_forward"] > 0 and nm["network_step_over_plain"] > 0


def test_a_failing_step_is_recorded_and_later_steps_still_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(STEPS, "network_moments", lambda **_: {"seconds": {"x": 1.0}})
    report = run_checks(torch.device("cpu"), tmp_path, quick=True,
                        steps=["certify", "network_moments"])
    assert not report["steps"]["certify"]["ok"]
    assert "train_moment" in report["steps"]["certify"]["error"]
    assert report["steps"]["network_moments"]["ok"]
