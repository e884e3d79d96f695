"""Experiments of momentkit: data, models, Gaussian-robust training and evaluation.

``python -m experiments train|evaluate|demo`` (see ``docs/experiments.md``). The
modules: :mod:`experiments.data` (data sets, cache, splits, batches),
:mod:`experiments.models` (the paper's LeNet and AlexNet),
:mod:`experiments.augment` (counter-based noisy augmentation),
:mod:`experiments.config` (run configurations, Table 1 presets),
:mod:`experiments.training` (training, checkpoints, evaluation),
:mod:`experiments.demo` (the three-method comparison on MNIST).
"""
