"""Fixtures of the experiments tests: a per-session data cache and small MNIST helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``MOMENTKIT_CACHE`` at a fresh folder, so tests never read a stale user cache."""
    cache = tmp_path_factory.mktemp("momentkit-cache")
    old = os.environ.get("MOMENTKIT_CACHE")
    os.environ["MOMENTKIT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("MOMENTKIT_CACHE", None)
    else:
        os.environ["MOMENTKIT_CACHE"] = old


@pytest.fixture(scope="session")
def mnist_root(data_root: Path) -> Path:
    """The data root, skipping when it holds no MNIST."""
    if not (data_root / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found under {data_root}/MNIST/raw (set MOMENTKIT_DATA)")
    return data_root
