"""Tests of ``python -m experiments certify`` on a run folder built by hand.

The run folder holds a checkpoint of an untrained LeNet whose last bias makes it predict
one class ``c`` everywhere (a logit margin of 100 no pixel noise of sigma 0.25 can
overturn), so the known answer is: every image is certified as ``c`` with the radius
cap ``sigma * Phi^-1(alpha^(1/n))`` (all ``n`` copies agree), correct exactly where the
label is ``c``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from scipy import stats

from experiments import certify as command
from experiments.__main__ import main
from experiments.checkpoints import CHECKPOINT_FORMAT
from experiments.config import RunConfig
from experiments.models import make_model
from experiments.rundata import prepare_test_data

SIGMA, N, N0, ALPHA = 0.25, 40, 5, 0.001
ARGS = ["--sigma", str(SIGMA), "--n", str(N), "--n0", str(N0), "--alpha", str(ALPHA),
        "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    config = RunConfig(dataset="mnist", model="lenet", method="baseline", epochs=1,
                       train_subset=100, test_subset=30)
    target = int(prepare_test_data(config, mnist_root).labels[0])
    model = make_model(config)
    with torch.no_grad():
        model[-1].bias.zero_()
        model[-1].bias[target] = 100.0
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "training_key": "test",
             "epoch": 1, "model": weights, "optimizer": {}, "scheduler": {},
             "early_stopping": {"best_epoch": 1, "best_val_loss": 0.0, "bad_epochs": 0,
                                "stopped": False},
             "history": [], "best_state": weights}
    out = tmp_path_factory.mktemp("run")
    torch.save(state, out / "checkpoint.pt")
    return out, target


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_certify_writes_the_known_answer(run_dir, mnist_root: Path, tmp_path: Path) -> None:
    source, target = run_dir
    run = tmp_path / "run"
    shutil.copytree(source, run)
    assert main(["certify", "--run", str(run), "--test-subset", "6", "--data-root",
                 str(mnist_root), *ARGS]) == 0
    doc = _load(run / "certify-sigma0.25.json")
    assert {"sigma", "n0", "n", "alpha", "seed", "version", "images", "summary"} <= set(doc)
    assert (doc["sigma"], doc["n"], doc["n0"], doc["alpha"]) == (SIGMA, N, N0, ALPHA)
    cap = SIGMA * stats.norm.ppf(ALPHA ** (1 / N))
    labels = prepare_test_data(RunConfig(dataset="mnist", model="lenet", method="baseline",
                                         epochs=1, train_subset=100, test_subset=30),
                               mnist_root).labels[:6].tolist()
    assert [im["index"] for im in doc["images"]] == list(range(6))
    for im, label in zip(doc["images"], labels, strict=True):
        assert im["label"] == label and im["prediction"] == target
        assert im["radius"] == pytest.approx(cap, rel=1e-12)
        assert im["correct"] == (label == target)
    hits = sum(label == target for label in labels) / 6
    summary = doc["summary"]
    assert summary["n_images"] == 6 and summary["abstain_rate"] == 0.0
    assert summary["certified_accuracy"] == pytest.approx(
        {"0.0": hits, "0.25": hits, "0.5": 0.0, "0.75": 0.0, "1.0": 0.0})
    assert summary["acr"] == pytest.approx(hits * cap)


@pytest.mark.slow
def test_interrupted_certification_resumes_without_redoing(
    run_dir, mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = run_dir
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    shutil.copytree(source, whole)
    shutil.copytree(source, resumed)
    kw = dict(n0=N0, n=N, alpha=ALPHA, test_subset=7, batch_size=32, data_root=mnist_root,
              progress=False, chunk=3)
    reference = command.certify_run(whole, SIGMA, **kw)

    seen: list[list[int]] = []
    real = command.certify

    def crashing(*args, **kwargs):
        seen.append(kwargs["indices"].tolist())
        if len(seen) == 2:
            raise KeyboardInterrupt  # killed during the second chunk
        return real(*args, **kwargs)

    monkeypatch.setattr(command, "certify", crashing)
    with pytest.raises(KeyboardInterrupt):
        command.certify_run(resumed, SIGMA, **kw)
    partial = _load(command.certify_file(resumed, SIGMA))
    assert [im["index"] for im in partial["images"]] == [0, 1, 2]
    seen.clear()

    def recording(*args, **kwargs):
        seen.append(kwargs["indices"].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(command, "certify", recording)
    result = command.certify_run(resumed, SIGMA, **kw)
    assert seen == [[3, 4, 5], [6]]  # only the missing images
    for key in ("images", "summary"):
        assert result[key] == reference[key]
    # nothing left to do: no certification at all
    seen.clear()
    command.certify_run(resumed, SIGMA, **kw)
    assert seen == []


def test_other_settings_and_bad_arguments_are_refused(
    run_dir, mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(source, run)
    base = ["certify", "--run", str(run), "--data-root", str(mnist_root)]
    assert main([*base, "--test-subset", "1", *ARGS]) == 0
    before = (run / "certify-sigma0.25.json").read_bytes()
    assert main([*base, "--test-subset", "2", *ARGS, "--n", str(N + 1)]) == 2
    assert "other settings (n:" in capsys.readouterr().err
    assert (run / "certify-sigma0.25.json").read_bytes() == before
    for extra, word in ((["--test-subset", "31"], "--test-subset"),
                        (["--test-subset", "1", "--sigma", "-1"], "--sigma"),
                        (["--test-subset", "1", "--alpha", "2"], "--alpha"),
                        (["--test-subset", "1", "--n0", "0"], "--n0")):
        assert main([*base, *ARGS, *extra]) == 2
        assert word in capsys.readouterr().err
    assert main(["certify", "--run", str(tmp_path / "none"), *ARGS]) == 2
    assert "no checkpoint" in capsys.readouterr().err
