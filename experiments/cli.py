"""Helpers shared by the ``python -m experiments`` sub-commands.

* :func:`add_runtime_args` / :func:`apply_runtime_args`: the options every command takes
  (``--threads``, ``--no-progress``) and those of the commands that train or evaluate
  (``--device``, ``--data-root``);
* :func:`check_device`: a usable torch device, or a :class:`UsageError` before anything
  is created;
* :class:`Progress` and :func:`progress`: a tqdm bar in a terminal, a few plain lines in
  a log file or CI (where every bar refresh would become a line of its own).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
UNKNOWN_TOTAL_EVERY_S = 30.0
"""Seconds between plain progress lines when the total is unknown."""


class UsageError(ValueError):
    """A command-line value the user can fix; ``main`` prints ``error: ...`` and exits 2."""


# --------------------------------------------------------------------------- options


def add_runtime_args(
    parser: argparse.ArgumentParser,
    *,
    device: bool = True,
    data_root: bool = True,
    device_default: str | None = "cpu",
) -> None:
    """Add ``--no-progress`` and ``--threads`` (every command), and unless turned off
    ``--device`` (default ``device_default``) and ``--data-root``."""
    if device:
        parser.add_argument(
            "--device", default=device_default, help="torch device, e.g. cpu or cuda"
        )
    if data_root:
        parser.add_argument(
            "--data-root",
            default=None,
            help="folder holding the data sets (default: $MOMENTKIT_DATA, else ./data)",
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 is often faster on a "
        "machine whose cores are busy with other work",
    )


def apply_runtime_args(args: argparse.Namespace) -> None:
    """Act on the runtime arguments that change process state (``--threads``).

    Raises:
        UsageError: ``--threads`` below 1.
    """
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads: must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def check_device(name: str, flag: str = "--device") -> Any:
    """``torch.device(name)`` after checking that a tensor can be made there.

    Call it before creating any file, so a bad device leaves nothing behind.

    Raises:
        UsageError: ``name`` is not a device string torch knows (``tpu9``) or the device
            is not usable on this machine (``cuda`` without CUDA); the message names
            ``flag``.
    """
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError, NotImplementedError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{flag} {name!r} is not usable here: {reason}") from None
    return device


def format_robustness(results: Mapping[str, Any]) -> str:
    """``auc [ci_low, ci_high]`` of a results dict's ``robustness`` entry, for printing."""
    rob = results["robustness"]
    return f"{rob['auc']:.4f} [{rob['ci'][0]:.4f}, {rob['ci'][1]:.4f}]"


# --------------------------------------------------------------------------- progress


class Progress:
    """Progress of ``total`` steps: a tqdm bar on a terminal, plain lines elsewhere.

    When ``stream`` (default ``sys.stderr``) is a terminal this is a tqdm bar. Otherwise
    (a log file, a pipe, CI) it prints ``desc: done/total unit (elapsed)`` only when the
    count crosses one of ``lines`` evenly spaced milestones (``lines=None``: at every
    update; unknown ``total``: at most every :data:`UNKNOWN_TOTAL_EVERY_S` seconds), so a
    log gets a few lines per epoch instead of one per refresh. With
    ``enabled=False`` it prints nothing at all (``write`` lines included).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        enabled: bool = True,
        initial: int = 0,
        unit: str = "it",
        lines: int | None = 4,
        leave: bool = False,
        stream: IO[str] | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.total, self.desc, self.unit, self.lines = total, desc, unit, lines
        self.done = initial
        self._start = self._last = time.perf_counter()
        self._postfix = ""
        tty = enabled and _isatty(self.stream)
        self._plain = enabled and not tty
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                         disable=not tty, file=self.stream)
        self._next = self._milestone_after(initial)

    def _milestone_after(self, done: int) -> int:
        if self.lines is None or not self.total:
            return done + 1
        step = self.total / self.lines
        k = int(done / step) + 1
        while round(k * step) <= done:
            k += 1
        return min(self.total, round(k * step))

    def update(self, n: int = 1, postfix: Mapping[str, Any] | None = None) -> None:
        """Advance by ``n`` steps; ``postfix`` (e.g. counts) is shown beside the count."""
        self.done += n
        if postfix is not None:
            self._postfix = " ".join(f"{k}={v}" for k, v in postfix.items())
            self._bar.set_postfix(dict(postfix), refresh=False)
        self._bar.update(n)
        if not self._plain or self.done < self._next:
            return
        now = time.perf_counter()
        if not self.total and self.lines is not None and now - self._last < UNKNOWN_TOTAL_EVERY_S:
            return  # no milestones without a total: at most one line per interval
        self._last = now
        total = f"/{self.total}" if self.total else ""
        extra = f", {self._postfix}" if self._postfix else ""
        elapsed = now - self._start
        self._print(f"{self.desc}: {self.done}{total} {self.unit} ({elapsed:.0f}s{extra})")
        self._next = self._milestone_after(self.done)

    def write(self, line: str) -> None:
        """Print ``line`` without breaking the bar (nothing when disabled)."""
        if not self.enabled:
            return
        if self._plain:
            self._print(line)
        else:
            self._bar.write(line, file=self.stream)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[T],
    desc: str,
    total: int | None = None,
    *,
    enabled: bool = True,
    unit: str = "it",
    lines: int | None = 4,
    stream: IO[str] | None = None,
) -> Iterator[T]:
    """Iterate ``iterable`` while showing a :class:`Progress` (bar or a few plain lines)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, enabled=enabled, unit=unit, lines=lines, stream=stream) as bar:
        for item in iterable:
            yield item
            bar.update()


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
