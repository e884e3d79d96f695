"""Experiment grids: named lists of :class:`~experiments.config.RunConfig` from presets or files.

A grid is the cartesian expansion of *groups* of run settings. A grid file (TOML or YAML) reads::

    name = "reduced-cpu"
    description = "free text"

    [defaults]                 # applied to every group; a list here is an axis too
    dataset = "mnist"
    model = "lenet"
    epochs = 4

    [[groups]]
    method = "baseline"

    [[groups]]
    method = "moment"
    alpha = [1.0, 5.0]         # every list-valued field is one axis of the product
    sigma = [0.5, 1.0, 2.0]

    [[groups]]                 # a matched-compute run: its epochs are computed
    method = "moment"
    alpha = 1.0
    sigma = 0.5
    matched = { method = "augment", folds = 6, epochs = 3, by = "wall_time", cost_ratio = 0.6 }

The keys of ``defaults`` and of each group are the fields of ``RunConfig``; anything else
raises :class:`GridError` naming the key. A group expands to ``prod(len(axis))`` configs;
configs that appear twice (same ``run_id()``) are kept once.

**Matched compute.** ``matched`` names a reference run (its fields override the group's
defaults; ``sigma`` defaults to the group's) that must itself be part of the grid. The group's
``epochs`` become ``max(1, round(E_ref * s_ref / (s * c)))`` where ``s`` is the number
of passes over the training set per epoch (``folds`` for augmentation: the clean set plus
``folds - 1`` noisy copies; 1 otherwise) and ``c`` the cost of one of the group's gradient
steps relative to one of the reference's steps. ``by = "gradient_steps"`` sets ``c = 1``
(equal gradient steps); ``by = "wall_time"`` takes ``c = cost_ratio`` (default 1), which must
be measured on the hardware at hand (``benchmarks/bench_train_step.py`` times plain,
regularized and augmented steps interleaved): on a CPU an augmented step costs more than a
plain one (its noise is generated per batch), a regularizer step costs an extra pass through
Omega. The pairs are stored in the grid manifest so the report can compare
them with paired confidence intervals.

**Presets** (``python -m experiments grid list``):

* ``paper-<model>-<dataset>``: the paper's grid for one model and data set (Section 4.3):
  augmentation ``N~`` in {2, 6, 11, 21} x sigma in {0.125, 0.25, 0.325, 0.5, 1.0} (20 runs),
  regularizer alpha in {0.5, 1, 1.5, 2, 5, 10, 20} x sigma in those plus {2, 5, 10, 20}
  (63 runs), plus the baseline: 84 runs, 100 epochs with early stopping (Table 1).
  The paper ran lenet on mnist, cifar10, cifar100 and alexnet on cifar10, cifar100.
* ``paper-all``: the five grids of the paper (420 runs).
* every ``experiments/grids/<name>.toml`` shipped with the package, by ``<name>``
  (``converged-mnist``, ``network-sweep-mnist``, ``reduced-cpu``, ``reduced-cpu-10ep``,
  ``reduced-cpu-cifar10``, ``tiny``).

The command line (``python -m experiments grid ...``) is :mod:`experiments.grid_cli`.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments import rundir
from experiments.config import RunConfig

__all__ = [
    "GridError",
    "Grid",
    "MatchedPair",
    "PAPER_AUGMENT_FOLDS",
    "PAPER_AUGMENT_SIGMAS",
    "PAPER_MOMENT_ALPHAS",
    "PAPER_MOMENT_SIGMAS",
    "PAPER_COMBOS",
    "paper_grid_spec",
    "expand_spec",
    "load_grid",
    "load_grid_file",
    "list_presets",
    "matched_epochs",
]

PAPER_AUGMENT_FOLDS: tuple[int, ...] = (2, 6, 11, 21)
PAPER_AUGMENT_SIGMAS: tuple[float, ...] = (0.125, 0.25, 0.325, 0.5, 1.0)
PAPER_MOMENT_ALPHAS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 5.0, 10.0, 20.0)
PAPER_MOMENT_SIGMAS: tuple[float, ...] = PAPER_AUGMENT_SIGMAS + (2.0, 5.0, 10.0, 20.0)
#: (model, dataset) pairs the paper trained (Figures 3 to 5).
PAPER_COMBOS: tuple[tuple[str, str], ...] = (
    ("lenet", "mnist"),
    ("lenet", "cifar10"),
    ("lenet", "cifar100"),
    ("alexnet", "cifar10"),
    ("alexnet", "cifar100"),
)
_MODELS = ("lenet", "alexnet")
_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100")
_MATCH_KEYS = {"by", "cost_ratio"}
_MATCH_BY = ("gradient_steps", "wall_time")


class GridError(ValueError):
    """A grid preset or file is unknown or malformed; the message names the key or file."""


@dataclass(frozen=True)
class MatchedPair:
    """A run whose epochs were computed to match the compute of a reference run."""

    run_id: str
    reference_run_id: str
    by: str
    cost_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Grid:
    """An expanded grid: a name, its configs in a stable order, and its matched-compute pairs."""

    name: str
    configs: tuple[RunConfig, ...]
    description: str = ""
    source: str = ""
    matched: tuple[MatchedPair, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.configs)

    def run_ids(self) -> list[str]:
        return [c.run_id() for c in self.configs]

    def count_by_method(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self.configs:
            counts[c.method] = counts.get(c.method, 0) + 1
        return counts

    def with_overrides(self, **overrides: Any) -> Grid:
        """The same grid with some RunConfig fields replaced in every run (e.g. ``seed``)."""
        if not overrides:
            return self
        _check_keys(overrides, "overrides")
        new_ids = {}
        configs = []
        for c in self.configs:
            nc = RunConfig.from_dict({**c.to_dict(), **overrides})
            new_ids[c.run_id()] = nc.run_id()
            configs.append(nc)
        pairs = tuple(
            dataclasses.replace(
                m, run_id=new_ids[m.run_id], reference_run_id=new_ids[m.reference_run_id]
            )
            for m in self.matched
        )
        return Grid(self.name, tuple(_dedupe(configs)), self.description, self.source, pairs)

    def manifest(self) -> dict[str, Any]:
        """JSON-ready description written to ``RESULTS_DIR/grids/<name>.json``."""
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "runs": [c.to_dict() for c in self.configs],
            "run_ids": self.run_ids(),
            "matched": [m.to_dict() for m in self.matched],
        }


def _config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RunConfig)}


def _check_keys(mapping: Mapping[str, Any], where: str) -> None:
    allowed = _config_fields()
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise GridError(
            f"{where}: unknown key(s) {unknown}; allowed are the RunConfig fields "
            f"{sorted(allowed)} (and 'matched' inside a group)"
        )


def _axes(settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product over the list-valued entries of ``settings`` (scalars stay fixed)."""
    keys = list(settings)
    values = [v if isinstance(v, list | tuple) else [v] for v in settings.values()]
    for key, v in zip(keys, values, strict=True):
        if len(v) == 0:
            raise GridError(f"axis {key!r} is an empty list")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def _dedupe(configs: Iterable[RunConfig]) -> list[RunConfig]:
    seen: set[str] = set()
    out = []
    for c in configs:
        rid = c.run_id()
        if rid not in seen:
            seen.add(rid)
            out.append(c)
    return out


def _passes_per_epoch(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("folds", 1)) if cfg.get("method") == "augment" else 1


def matched_epochs(
    reference: Mapping[str, Any], target: Mapping[str, Any], by: str, cost_ratio: float = 1.0
) -> int:
    """Epochs for ``target`` so that its compute equals ``reference``'s.

    ``E = max(1, round(E_ref * s_ref / (s * c)))`` with ``s`` the training-set passes per
    epoch (``folds`` for augmentation, else 1) and ``c`` the cost of one of the target's
    steps relative to one of the reference's (``cost_ratio`` for ``by="wall_time"``, 1 for
    ``by="gradient_steps"``).

    Raises:
        GridError: ``by`` unknown or ``cost_ratio`` not positive.
    """
    if by not in _MATCH_BY:
        raise GridError(f"matched.by must be one of {_MATCH_BY}, got {by!r}")
    if not cost_ratio > 0:
        raise GridError(f"matched.cost_ratio must be positive, got {cost_ratio!r}")
    c = cost_ratio if by == "wall_time" else 1.0
    ref_work = int(reference["epochs"]) * _passes_per_epoch(reference)
    return max(1, round(ref_work / (_passes_per_epoch(target) * c)))


def expand_spec(spec: Mapping[str, Any], *, source: str = "") -> Grid:
    """Expand a parsed grid file (see module docstring) into a :class:`Grid`.

    Raises:
        GridError: missing ``name`` or ``groups``, unknown keys, empty axes, a config that
            ``RunConfig`` rejects, or a matched reference that is not in the grid.
    """
    where = source or "grid spec"
    if not isinstance(spec, Mapping):
        raise GridError(f"{where}: a grid must be a mapping with 'name' and 'groups'")
    unknown = sorted(set(spec) - {"name", "description", "defaults", "groups"})
    if unknown:
        raise GridError(f"{where}: unknown top-level key(s) {unknown}")
    if "name" not in spec or not str(spec["name"]).strip():
        raise GridError(f"{where}: missing 'name'")
    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        raise GridError(f"{where}: 'groups' must be a non-empty list of tables")
    defaults = dict(spec.get("defaults") or {})
    _check_keys(defaults, f"{where}: [defaults]")

    configs: list[RunConfig] = []
    pending_matches: list[tuple[RunConfig, dict[str, Any], str, float]] = []
    for gi, group in enumerate(groups):
        gwhere = f"{where}: groups[{gi}]"
        if not isinstance(group, Mapping):
            raise GridError(f"{gwhere} must be a table")
        group = dict(group)
        matched = group.pop("matched", None)
        _check_keys(group, gwhere)
        for settings in _axes({**defaults, **group}):
            if matched is not None:
                if not isinstance(matched, Mapping):
                    raise GridError(f"{gwhere}: 'matched' must be a table")
                ref_fields = {k: v for k, v in matched.items() if k not in _MATCH_KEYS}
                _check_keys(ref_fields, f"{gwhere}.matched")
                reference = {**{k: v for k, v in settings.items() if k != "alpha"}, **ref_fields}
                if reference.get("method") != "moment":
                    reference.pop("alpha", None)
                if reference.get("method") != "augment":
                    reference.pop("folds", None)
                by = str(matched.get("by", "gradient_steps"))
                ratio = float(matched.get("cost_ratio", 1.0))
                if "epochs" not in reference:
                    raise GridError(f"{gwhere}.matched needs the reference's 'epochs'")
                settings = {**settings, "epochs": matched_epochs(reference, settings, by, ratio)}
            try:
                cfg = RunConfig.from_dict(settings)
            except (TypeError, ValueError) as exc:
                raise GridError(f"{gwhere}: invalid run {settings}: {exc}") from exc
            configs.append(cfg)
            if matched is not None:
                try:
                    ref_cfg = RunConfig.from_dict(reference)
                except (TypeError, ValueError) as exc:
                    raise GridError(
                        f"{gwhere}.matched: invalid reference {reference}: {exc}"
                    ) from exc
                pending_matches.append((cfg, ref_cfg.to_dict(), by, ratio))

    configs = _dedupe(configs)
    ids = {c.run_id() for c in configs}
    pairs = []
    for cfg, ref, by, ratio in pending_matches:
        ref_id = RunConfig.from_dict(ref).run_id()
        if ref_id not in ids:
            raise GridError(
                f"{where}: matched reference {ref} (run {ref_id}) is not part of the grid; "
                "add a group that trains it"
            )
        pairs.append(MatchedPair(cfg.run_id(), ref_id, by, ratio))
    return Grid(
        name=str(spec["name"]),
        configs=tuple(configs),
        description=str(spec.get("description", "")),
        source=source,
        matched=tuple(dict.fromkeys(pairs)),
    )


def paper_grid_spec(model: str, dataset: str, *, epochs: int = 100) -> dict[str, Any]:
    """The paper's grid for one model and data set as a grid spec (84 runs, Section 4.3)."""
    if model not in _MODELS:
        raise GridError(f"model must be one of {_MODELS}, got {model!r}")
    if dataset not in _DATASETS:
        raise GridError(f"dataset must be one of {_DATASETS}, got {dataset!r}")
    return {
        "name": f"paper-{model}-{dataset}",
        "description": (
            f"The paper's grid for {model} on {dataset}: baseline, noisy augmentation "
            "N~ x sigma (4 x 5), analytic regularizer alpha x sigma (7 x 9)."
        ),
        "defaults": {"dataset": dataset, "model": model, "epochs": epochs},
        "groups": [
            {"method": "baseline"},
            {
                "method": "augment",
                "folds": list(PAPER_AUGMENT_FOLDS),
                "sigma": list(PAPER_AUGMENT_SIGMAS),
            },
            {
                "method": "moment",
                "alpha": list(PAPER_MOMENT_ALPHAS),
                "sigma": list(PAPER_MOMENT_SIGMAS),
            },
        ],
    }


def _preset_dir() -> Path:
    # beside this module (package data ``experiments/grids/*.toml``)
    return Path(__file__).resolve().parent / "grids"


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    out = {}
    for model, dataset in PAPER_COMBOS:
        out[f"paper-{model}-{dataset}"] = f"the paper's 84-run grid for {model} on {dataset}"
    out["paper-lenet-fashion-mnist"] = "the paper's 84-run grid for lenet on fashion-mnist"
    out["paper-all"] = "the five grids of the paper (420 runs)"
    for entry in sorted(_preset_dir().glob("*.toml")):
        spec = tomllib.loads(entry.read_text())
        out[entry.stem] = str(spec.get("description", "")).strip().split("\n")[0]
    return out


def load_grid_file(path: str | Path) -> Grid:
    """Read and expand a TOML (``.toml``) or YAML (``.yaml``/``.yml``) grid file.

    Raises:
        GridError: unreadable or malformed file (the message names it).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise GridError(f"cannot read grid file {path}: {exc}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            spec = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            spec = yaml.safe_load(text)
        else:
            raise GridError(f"grid file {path} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise GridError(f"grid file {path} is not valid {suffix[1:].upper()}: {exc}") from exc
    return expand_spec(spec, source=str(path))


def load_grid(name_or_path: str, *, epochs: int | None = None) -> Grid:
    """A grid from a preset name (see :func:`list_presets`) or a TOML/YAML file path.

    ``epochs`` overrides the epochs of the ``paper-*`` presets (default 100, the paper's cap).

    Raises:
        GridError: neither a preset nor an existing file.
    """
    if name_or_path == "paper-all":
        configs: list[RunConfig] = []
        for model, dataset in PAPER_COMBOS:
            configs += load_grid(f"paper-{model}-{dataset}", epochs=epochs).configs
        return Grid("paper-all", tuple(configs), list_presets()["paper-all"], "preset")
    if name_or_path.startswith("paper-"):
        rest = name_or_path[len("paper-") :]
        model, _, dataset = rest.partition("-")
        if model in _MODELS and dataset in _DATASETS:
            spec = paper_grid_spec(model, dataset, epochs=100 if epochs is None else epochs)
            return expand_spec(spec, source="preset")
    preset = _preset_dir() / f"{name_or_path}.toml"
    if preset.is_file():
        return expand_spec(tomllib.loads(preset.read_text()), source=f"preset {name_or_path}")
    path = Path(name_or_path)
    if path.is_file():
        return load_grid_file(path)
    raise GridError(
        f"{name_or_path!r} is neither a preset ({', '.join(list_presets())}) nor a grid file"
    )


def write_manifest(grid: Grid, results_dir: str | Path) -> Path:
    """Write (atomically) ``RESULTS_DIR/grids/<name>.json`` so status and report know the grid."""
    path = Path(results_dir) / "grids" / f"{grid.name}.json"
    rundir.write_json_atomic(path, grid.manifest())
    return path
