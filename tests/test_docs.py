"""The API reference (``docs/api/build.py``, pdoc) builds without problems, and its
checker catches the problems it is there to catch."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("pdoc")

BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "api" / "build.py"


def _load_builder():
    spec = importlib.util.spec_from_file_location("momentkit_docs_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()


@pytest.mark.slow
def test_reference_builds_cleanly_with_the_key_pages(tmp_path):
    problems = builder.build(tmp_path)
    assert problems == [], "\n".join(problems)
    top = (tmp_path / "momentkit.html").read_text()
    for name in ("relu_mean", "affine_relu_affine_covariance", "expected_prediction"):
        assert f'id="{name}"' in top, f"momentkit.html documents no {name}"
    # a cross-reference role became a link (pdoc renders a broken one as plain code)
    assert '<a href="#relu_mean">relu_mean()</a>' in top
    for page in (
        "momentkit/relu.html",
        "momentkit/references.html",
        "momentkit/references/linearization.html",
        "validation.html",
        "experiments/rundir.html",
    ):
        assert (tmp_path / page).is_file(), f"no page {page}"
    assert 'id="read_results"' in (tmp_path / "experiments/rundir.html").read_text()


BROKEN_MODULE = '''
"""A module whose docstrings have one problem of each kind; see :func:`good`."""

import torch

#: Documented Sphinx-style, by a comment
#: of two lines.
LIMIT = 3


def good(x: int) -> int:
    """Refers to :func:`torch.relu`, :class:`Holder` and :meth:`Holder.fine`."""
    return x


def dangling() -> None:
    """Refers to :func:`no_such_function`, renamed long ago."""


def sphinx_only() -> None:
    """Uses :ref:`a-sphinx-label`, which pdoc prints as it is."""


def bad_annotation(x: "list[int") -> None:
    """Its annotation does not parse."""


class Holder(torch.nn.Module):
    """A module with a method that keeps torch's docstring."""

    def fine(self) -> None:
        """Refers to its sibling :meth:`forward` by its short name."""

    def forward(self, x):
        return x
'''


def test_checker_reports_each_broken_docstring_and_nothing_else(tmp_path, monkeypatch):
    package = tmp_path / "src"
    package.mkdir()
    (package / "brokendoc.py").write_text(textwrap.dedent(BROKEN_MODULE))
    monkeypatch.syspath_prepend(str(package))
    try:
        problems = builder.build(tmp_path / "out", ["brokendoc"])
    finally:
        sys.modules.pop("brokendoc", None)
    text = "\n".join(problems)
    expected = [
        "brokendoc.dangling: :func:`no_such_function` does not resolve",
        "brokendoc.sphinx_only: role :ref: is not rendered by pdoc",
        "Error parsing type annotation list[int for brokendoc.bad_annotation",
        "brokendoc.Holder.forward has no docstring of its own; pdoc would show the one "
        "it inherits from torch.nn.modules.module",
    ]
    for line in expected:
        assert sum(line in p for p in problems) == 1, f"missing {line!r} in:\n{text}"
    # the valid references (absolute, module-level, class-qualified, sibling) pass
    assert len(problems) == len(expected), text
    page = (tmp_path / "out" / "brokendoc.html").read_text()
    assert "Documented Sphinx-style, by a comment\nof two lines." in page


def test_command_line_fails_on_problems(tmp_path, monkeypatch, capsys):
    package = tmp_path / "src"
    package.mkdir()
    (package / "onebad.py").write_text('"""See :func:`missing`."""\n')
    monkeypatch.syspath_prepend(str(package))
    try:
        status = builder.main(["--out", str(tmp_path / "out"), "onebad"])
    finally:
        sys.modules.pop("onebad", None)
    assert status == 1
    assert "error: onebad: docstring of onebad: :func:`missing` does not resolve" in (
        capsys.readouterr().err
    )
