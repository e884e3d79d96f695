"""The layout of one run folder, and the only code that writes or reads it.

A run folder (``RESULTS_DIR/runs/<run_id>`` in a grid, or any ``--out`` folder) holds:

* ``config.json``: the run's configuration (written when the run starts);
* ``checkpoint.pt``: the training state after the last finished epoch;
* ``results.json``: configuration, run id, version, history, test accuracy,
  robustness, timings; written last, so its presence (with ``per_image.npz``) means
  the run is complete;
* ``per_image.npz``: ``correct`` ``(n_test,)`` and ``robust`` ``(n_sigmas, n_test)``;
* ``error.json`` and ``traceback.txt``: why the last attempt failed (a diverged run,
  an exception), kept until the run succeeds;
* ``lock.json``: which process is running it (grids only);
* ``certify-sigma<S>.json``: randomized-smoothing certificates of the run's model at noise
  ``S`` (``python -m experiments certify``; one file per sigma, :func:`certify_file`).

Every file is written atomically (a temporary file in the same folder, then
``os.replace``), so a reader never sees half a file, whatever kills the writer. JSON
is strict (``NaN`` and ``inf`` are refused when writing), so any JSON reader can load it.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = "results.json"
PER_IMAGE_FILE = "per_image.npz"
ERROR_FILE = "error.json"
TRACEBACK_FILE = "traceback.txt"
LOCK_FILE = "lock.json"
CERTIFY_PATTERN = "certify-sigma*.json"
"""Glob of the certificate files of a run folder (one per certification sigma)."""


def certify_file(sigma: float) -> str:
    """File name of the certificates at noise ``sigma``: ``certify-sigma{sigma:g}.json``."""
    return f"certify-sigma{float(sigma):g}.json"

ERROR_KINDS = ("diverged", "exception")
"""Values of ``error.json``'s ``kind``: a diverged run or any other exception."""

COMPLETE_KEYS = ("config", "test_accuracy", "robustness")
"""Keys a ``results.json`` must hold for the run to count as complete."""


def package_version() -> str:
    """momentkit's version string (``momentkit.__version__``)."""
    from momentkit import __version__

    return str(__version__)


def write_atomic(
    path: str | os.PathLike[str], write: Callable[[Any], None], mode: str = "wb"
) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda h: h.write(text), mode="w")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON to ``path`` atomically.

    Raises:
        ValueError: ``obj`` holds a NaN or an infinity (strict JSON has neither);
            nothing is written then.
    """
    text = json.dumps(obj, indent=2, allow_nan=False)
    write_text_atomic(path, text)


def write_npz_atomic(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """Write ``arrays`` as a compressed ``.npz`` to ``path`` atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_atomic(path, lambda h: h.write(buffer.getvalue()))


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_results(rdir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``results.json`` of a complete run, or ``None`` when the run is not complete."""
    rdir = Path(rdir)
    res = read_json(rdir / RESULTS_FILE)
    if res is None or not all(k in res for k in COMPLETE_KEYS):
        return None
    if not (rdir / PER_IMAGE_FILE).is_file():
        return None
    return res


def is_complete(rdir: str | os.PathLike[str]) -> bool:
    """True when ``results.json`` parses with its result keys and ``per_image.npz`` exists."""
    return read_results(rdir) is not None


def read_error(rdir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``error.json`` of a failed run (``None`` when there is none)."""
    return read_json(Path(rdir) / ERROR_FILE)


def record_error(
    rdir: str | os.PathLike[str],
    error: str,
    kind: str,
    epoch: int | None = None,
    traceback_text: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``error.json`` (and ``traceback.txt`` when given) for a failed attempt.

    ``error.json`` holds ``{"error", "kind", "epoch", "attempts", "time", **extra}``:
    ``kind`` is ``"diverged"`` (a non-finite loss or parameters) or ``"exception"``;
    ``attempts`` counts the failed attempts recorded in this folder so far (1 for the
    first). Returns the written dict.

    Raises:
        ValueError: ``kind`` is not one of :data:`ERROR_KINDS`, or ``extra`` holds a NaN
            or an infinity (strict JSON); nothing is written then.
    """
    if kind not in ERROR_KINDS:
        raise ValueError(f"kind: expected one of {ERROR_KINDS}, got {kind!r}")
    rdir = Path(rdir)
    previous = read_error(rdir) or {}
    attempts = previous.get("attempts")
    record = {
        "error": str(error),
        "kind": kind,
        "epoch": None if epoch is None else int(epoch),
        "attempts": (attempts + 1) if isinstance(attempts, int) else 1,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }
    write_json_atomic(rdir / ERROR_FILE, record)  # first: a NaN in extra writes nothing
    if traceback_text is not None:
        write_text_atomic(rdir / TRACEBACK_FILE, traceback_text)
    return record


def clear_error(rdir: str | os.PathLike[str]) -> None:
    """Remove ``error.json`` and ``traceback.txt`` (after a successful attempt)."""
    for name in (ERROR_FILE, TRACEBACK_FILE):
        (Path(rdir) / name).unlink(missing_ok=True)
