"""Tests of experiments.grids (grid expansion, presets, manifests) and the ``grid`` command
line (experiments.grid_cli: status, list, show, export, dry runs, shared options)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import executors, grids, locks
from experiments.__main__ import build_parser, main
from experiments.config import RunConfig
from experiments.grids import (
    PAPER_AUGMENT_FOLDS,
    PAPER_AUGMENT_SIGMAS,
    PAPER_COMBOS,
    PAPER_MOMENT_ALPHAS,
    PAPER_MOMENT_SIGMAS,
    GridError,
    expand_spec,
    load_grid,
    load_grid_file,
    matched_epochs,
    write_manifest,
)
from experiments.report import collect_results
from tests.experiments.fakes import Recorder, fake_train, small_grid

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- expansion


@pytest.mark.parametrize(("model", "dataset"), PAPER_COMBOS)
def test_paper_presets_match_the_papers_grid(model: str, dataset: str) -> None:
    grid = load_grid(f"paper-{model}-{dataset}")
    assert grid.count_by_method() == {"baseline": 1, "augment": 20, "moment": 63}
    assert len(grid) == 84 == len(set(grid.run_ids()))
    aug = {(c.folds, c.sigma) for c in grid.configs if c.method == "augment"}
    assert aug == {(n, s) for n in PAPER_AUGMENT_FOLDS for s in PAPER_AUGMENT_SIGMAS}
    mom = {(c.alpha, c.sigma) for c in grid.configs if c.method == "moment"}
    assert mom == {(a, s) for a in PAPER_MOMENT_ALPHAS for s in PAPER_MOMENT_SIGMAS}
    assert PAPER_MOMENT_SIGMAS == (0.125, 0.25, 0.325, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
    assert {(c.model, c.dataset, c.epochs) for c in grid.configs} == {(model, dataset, 100)}


def test_paper_all_and_shipped_presets() -> None:
    assert len(load_grid("paper-all")) == 5 * 84
    assert len(load_grid("paper-lenet-cifar10", epochs=3).configs[0:1]) == 1
    assert {c.epochs for c in load_grid("paper-lenet-cifar10", epochs=3).configs} == {3}
    reduced = load_grid("reduced-cpu")
    assert reduced.count_by_method() == {"baseline": 1, "augment": 4, "moment": 8}
    assert len(load_grid("tiny")) == 3
    with pytest.raises(GridError, match="neither a preset"):
        load_grid("no-such-grid")


def test_toml_and_yaml_files_expand_to_the_same_runs(tmp_path: Path) -> None:
    toml = tmp_path / "g.toml"
    toml.write_text(
        'name = "g"\n[defaults]\ndataset = "mnist"\nmodel = "lenet"\nepochs = [1, 2]\n'
        '[[groups]]\nmethod = "baseline"\n'
        '[[groups]]\nmethod = "moment"\nalpha = [0.5, 1.0, 2.0]\nsigma = [0.25, 4.0]\n'
    )
    yml = tmp_path / "g.yaml"
    yml.write_text(
        "name: g\ndefaults: {dataset: mnist, model: lenet, epochs: [1, 2]}\ngroups:\n"
        "  - {method: baseline}\n  - {method: moment, alpha: [0.5, 1.0, 2.0], sigma: [0.25, 4.0]}\n"
    )
    g1, g2 = load_grid_file(toml), load_grid(str(yml))
    # every list is an axis: 2 epochs x (1 baseline + 3 alphas x 2 sigmas)
    assert len(g1) == 2 * (1 + 3 * 2)
    assert g1.run_ids() == g2.run_ids()


def test_duplicates_are_kept_once() -> None:
    spec = {
        "name": "d",
        "defaults": {"dataset": "mnist", "model": "lenet"},
        "groups": [{"method": "baseline"}, {"method": "baseline", "epochs": 100}],
    }
    assert len(expand_spec(spec)) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"groups": [{"method": "baseline"}]}, "missing 'name'"),
        ({"name": "x", "groups": []}, "'groups' must be a non-empty list"),
        ({"name": "x", "extra": 1, "groups": [{}]}, "unknown top-level key"),
        (
            {"name": "x", "groups": [{"method": "baseline", "sigmas": 1}]},
            r"unknown key\(s\) \['sigmas'\]",
        ),
        ({"name": "x", "defaults": {"modle": "lenet"}, "groups": [{}]}, r"\[defaults\]: unknown"),
        (
            {"name": "x", "groups": [{"method": "moment", "alpha": []}]},
            "axis 'alpha' is an empty list",
        ),
        (
            {"name": "x", "groups": [{"dataset": "mnist", "model": "lenet", "method": "moment"}]},
            "invalid run",
        ),
    ],
)
def test_malformed_specs_raise_grid_error(spec: dict, message: str) -> None:
    with pytest.raises(GridError, match=message):
        expand_spec(spec)


def test_bad_grid_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(GridError, match="not valid TOML"):
        load_grid_file(bad)
    other = tmp_path / "g.json"
    other.write_text("{}")
    with pytest.raises(GridError, match="must end in"):
        load_grid_file(other)


@pytest.mark.slow
def test_run_ids_are_stable_across_processes_and_key_order() -> None:
    grid = load_grid("reduced-cpu")
    code = (
        "from experiments.grids import load_grid; "
        "print(' '.join(load_grid('reduced-cpu').run_ids()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.split() == grid.run_ids()
    cfg = grid.configs[3]
    reordered = dict(reversed(list(cfg.to_dict().items())))
    assert RunConfig.from_dict(reordered).run_id() == cfg.run_id()
    # a different seed is a different run
    assert grid.with_overrides(seed=1).run_ids()[0] != grid.run_ids()[0]


def test_matched_compute_epochs_by_hand() -> None:
    ref = {"method": "augment", "folds": 6, "epochs": 3}
    moment = {"method": "moment"}
    # 3 epochs of 6-fold augmentation = 18 passes over the training set
    assert matched_epochs(ref, moment, "gradient_steps") == 18
    # a regularizer step costing 2.8 plain steps: round(18 / 2.8) = 6 epochs
    assert matched_epochs(ref, moment, "wall_time", 2.8) == 6
    # cost ratio is ignored when matching gradient steps
    assert matched_epochs(ref, moment, "gradient_steps", 2.8) == 18
    assert matched_epochs(ref, {"method": "augment", "folds": 2}, "gradient_steps") == 9
    assert matched_epochs({"method": "baseline", "epochs": 1}, moment, "wall_time", 5.0) == 1
    with pytest.raises(GridError, match="matched.by"):
        matched_epochs(ref, moment, "flops")
    with pytest.raises(GridError, match="cost_ratio"):
        matched_epochs(ref, moment, "wall_time", 0.0)


def test_matched_group_expands_and_records_its_pair(tmp_path: Path) -> None:
    spec = {
        "name": "m",
        "defaults": {"dataset": "mnist", "model": "lenet", "epochs": 3},
        "groups": [
            {"method": "augment", "folds": 6, "sigma": 0.5},
            {
                "method": "moment",
                "alpha": 1.0,
                "sigma": 0.5,
                "matched": {
                    "method": "augment",
                    "folds": 6,
                    "epochs": 3,
                    "by": "wall_time",
                    "cost_ratio": 2.0,
                },
            },
        ],
    }
    grid = expand_spec(spec)
    aug, mom = grid.configs
    assert mom.epochs == 9
    assert [(m.run_id, m.reference_run_id, m.by) for m in grid.matched] == [
        (mom.run_id(), aug.run_id(), "wall_time")
    ]
    manifest = json.loads(write_manifest(grid, tmp_path).read_text())
    assert manifest["matched"][0]["reference_run_id"] == aug.run_id()
    # the pair follows a seed override
    reseeded = grid.with_overrides(seed=4)
    assert reseeded.matched[0].reference_run_id == reseeded.configs[0].run_id()
    # a reference the grid does not train is an error
    spec["groups"] = spec["groups"][1:]
    with pytest.raises(GridError, match="not part of the grid"):
        expand_spec(spec)


# --------------------------------------------------------------------------- status and CLI


def test_status_command_counts_states(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid_file = tmp_path / "g.toml"
    grid_file.write_text(
        'name = "g"\n[defaults]\ndataset = "mnist"\nmodel = "lenet"\nepochs = 1\n'
        '[[groups]]\nmethod = "baseline"\n[[groups]]\nmethod = "augment"\nfolds = [2, 6]\n'
        "sigma = 0.5\n"
    )
    grid = load_grid_file(grid_file)
    results = tmp_path / "res"
    write_manifest(grid, results)
    fake_train(grid.configs[0], _mkdir(locks.run_dir(results, grid.configs[0])))
    executors.run_one(grid.configs[1], results, train_fn=Recorder(fail={grid.run_ids()[1]}))
    assert main(["grid", "status", str(results)]) == 0
    out = capsys.readouterr().out
    assert "done=1 running=0 failed=1 pending=1 total=3" in out
    assert "injected failure" in out
    assert main(["grid", "status", str(grid_file), "--results-dir", str(results)]) == 0
    assert "done=1 running=0 failed=1 pending=1 total=3" in capsys.readouterr().out
    assert main(["grid", "run", str(grid_file), "--dry-run", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert all(rid in out for rid in grid.run_ids())
    # --limit counts only runs still to do: the failed one, then the pending one
    ids = grid.run_ids()
    for limit, listed in ((1, [ids[1]]), (2, ids[1:]), (5, ids[1:])):
        assert main(["grid", "run", str(grid_file), "--dry-run", "--limit", str(limit),
                     "--results-dir", str(results)]) == 0
        out = capsys.readouterr().out
        assert [rid for rid in ids if rid in out] == listed
    for bad in ("0", "-1"):
        assert main(["grid", "run", str(grid_file), "--dry-run", "--limit", bad,
                     "--results-dir", str(results)]) == 2
        assert "--limit: must be at least 1" in capsys.readouterr().err
    assert main(["grid", "list"]) == 0
    assert "paper-lenet-mnist" in capsys.readouterr().out


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.filterwarnings("ignore:skipping certificates")
def test_export_copies_results_but_not_checkpoints(tmp_path: Path) -> None:
    configs = small_grid()
    results = tmp_path / "res"
    executors.run_local(configs, results, train_fn=Recorder(), progress=False)
    (locks.run_dir(results, configs[0]) / "checkpoint.pt").write_bytes(b"x" * 100)
    (locks.run_dir(results, configs[0]) / "certify-sigma0.25.json").write_text("{}")
    write_manifest(load_grid("tiny"), results)
    dest = tmp_path / "docs"
    assert main(["grid", "export", str(results), str(dest)]) == 0
    names = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    expected = [
        f"run_results/{c.run_id()}/{f}"
        for c in configs
        for f in ("config.json", "per_image.npz", "results.json")
    ]
    expected.append(f"run_results/{configs[0].run_id()}/certify-sigma0.25.json")
    assert names == sorted(expected + ["grids/tiny.json"])
    assert sorted(r.run_id for r in collect_results(dest)) == sorted(c.run_id() for c in configs)


def test_module_docstring_names_only_shipped_presets() -> None:
    shipped = {p.stem for p in (Path(grids.__file__).parent / "grids").glob("*.toml")}
    paragraph = grids.__doc__.split("shipped with the package")[1].split("\n\n")[0]
    named = set(re.findall(r"``([a-z0-9-]+)``", paragraph))
    assert named == shipped


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _leaf_commands() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its name (``train``, ``grid run``, ...)."""
    out = {}
    for name, sub in _subparsers(build_parser()).items():
        nested = _subparsers(sub)
        out.update({f"{name} {k}": v for k, v in nested.items()} if nested else {name: sub})
    return out


def test_every_command_takes_threads_and_no_progress() -> None:
    commands = _leaf_commands()
    assert {"train", "evaluate", "demo", "grid run", "grid status", "grid list",
            "grid show", "grid export", "report"} <= set(commands)
    for name, sub in commands.items():
        options = {o for a in sub._actions for o in a.option_strings}
        assert {"--threads", "--no-progress"} <= options, name
    # and they parse: grid run took neither before
    args = build_parser().parse_args(["grid", "run", "tiny", "--threads", "1", "--no-progress"])
    assert args.threads == 1 and args.no_progress


def test_grid_run_with_an_unusable_device_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["grid", "run", "tiny", "--device", "tpu9", "--results-dir", str(tmp_path / "r")])
    assert code == 2 and capsys.readouterr().err.startswith("error: --device 'tpu9'")
    assert not (tmp_path / "r").exists()
