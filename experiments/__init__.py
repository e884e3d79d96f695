"""Experiments of momentkit: data, models, Gaussian-robust training and evaluation.

``python -m experiments train|evaluate|demo|grid|report`` (see ``docs/experiments.md``
and ``docs/grids.md``). The modules: :mod:`experiments.data` (data sets, the data root,
cache, splits, batches), :mod:`experiments.models` (the paper's LeNet and AlexNet),
:mod:`experiments.augment` (counter-based noisy augmentation), :mod:`experiments.config`
(run configurations, Table 1 presets), :mod:`experiments.rundata` (a run's images),
:mod:`experiments.trainstate` (training state, early stopping),
:mod:`experiments.training` (one run), :mod:`experiments.checkpoints`,
:mod:`experiments.evaluation` (accuracy, robustness), :mod:`experiments.rundir` (a run
folder's files), :mod:`experiments.grids`, :mod:`experiments.locks`,
:mod:`experiments.executors` (grids and running them), :mod:`experiments.cli` (shared
command-line helpers) and one module per command (:mod:`experiments.commands`,
:mod:`experiments.demo`, :mod:`experiments.grid_cli`, the report).
"""
