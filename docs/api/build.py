"""Build momentkit's API reference from its docstrings with pdoc, and fail on any warning.

    python docs/api/build.py [--out docs/api/_build] [MODULE ...]

writes one HTML page per module (``momentkit.html``, ``momentkit/relu.html``,
``momentkit/references/montecarlo.html``, ``experiments/rundir.html``, ...) and an
``index.html``. Docstrings are read in Google style (``Args:``, ``Returns:``,
``Raises:``, ``Attributes:``) with reStructuredText cross-reference roles
(:func:`relu_mean`, :mod:`momentkit.references`), which pdoc turns into links.
Constants documented Sphinx-style, by ``#:`` comment lines above the assignment, get
that text as their docstring (pdoc itself reads only a string literal below it).

The build fails (exit status 1, one line per problem on stderr) on

* any warning pdoc emits: a module that does not import, a type annotation it cannot
  parse, a name in ``__all__`` that does not resolve, an ``.. include::`` it cannot read;
* a cross-reference role whose target does not resolve: looked up as a dotted name in
  the namespace of the class that holds the docstring, then the module that defines
  the object, then the module that documents it, then as an importable absolute name
  (pdoc itself renders a broken reference silently as plain code);
* a role pdoc does not render (``:ref:``, ``:paramref:``, ...), which would appear in the
  page as literal markup.

``tox -e docs`` runs this script; ``tests/test_docs.py`` calls :func:`build`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import pkgutil
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pdoc
import pdoc.doc
import pdoc.extract
import pdoc.render

DOCFORMAT = "google"
PACKAGES = ("momentkit", "momentkit.references", "validation", "experiments")
"""Packages documented by default, with every public submodule."""

DEFAULT_OUT = Path(__file__).resolve().parent / "_build"

# Roles pdoc's reStructuredText conversion renders (pdoc.docstrings.rst); ``math``
# becomes MathJax, the others a code span that pdoc links when it can.
_LINK_ROLES = frozenset({"mod", "func", "data", "const", "class", "meth", "attr", "exc", "obj"})
_RENDERED_ROLES = _LINK_ROLES | {"math"}
_ROLE = re.compile(r"(?<![\w`]):(?:py:)?([a-z][a-z_-]*):`([^`]+)`")


def public_modules(packages: Sequence[str] = PACKAGES) -> list[str]:
    """``packages`` and their public submodules (no ``_private`` ones, no ``__main__``).

    pdoc alone skips the submodules of a package whose ``__all__`` does not name them
    (``momentkit`` re-exports its functions and lists no submodules), so they are
    listed here explicitly.
    """
    names: list[str] = []
    for package in packages:
        module = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{package}."):
            leaf = info.name.rsplit(".", 1)[-1]
            if leaf.startswith("_") or any(p.startswith("_") for p in info.name.split(".")):
                continue
            names.append(info.name)
    return list(dict.fromkeys(names))


def _shown(doc: pdoc.doc.Doc, module_all: Sequence[str]) -> bool:
    """Whether pdoc's default template shows ``doc`` (public, or ``__init__``)."""
    return not doc.name.startswith("_") or doc.name == "__init__" or doc.qualname in module_all


def _own_docstring(doc: pdoc.doc.Doc) -> bool:
    """False when the docstring is inherited from a base (``torch.nn.Module.forward``)."""
    if isinstance(doc, pdoc.doc.Function | pdoc.doc.Class):
        return getattr(doc.obj, "__doc__", None) is not None
    return True


def _inherited_from(doc: pdoc.doc.Doc) -> str | None:
    """The module of the base whose docstring pdoc shows for ``doc`` (``None``: its own)."""
    if _own_docstring(doc) or not doc.docstring:
        return None
    if isinstance(doc, pdoc.doc.Class):
        bases = [b for b in doc.obj.__mro__[1:] if b.__doc__]
        return bases[0].__module__ if bases else "?"
    holder = sys.modules.get(doc.modulename)
    for part in doc.qualname.split(".")[:-1]:
        holder = getattr(holder, part, None)
    for base in getattr(holder, "__mro__", ())[1:]:
        member = base.__dict__.get(doc.name)
        if member is not None and getattr(member, "__doc__", None):
            return base.__module__
    return "?"


def _walk(doc: pdoc.doc.Doc, module_all: Sequence[str]) -> Iterator[pdoc.doc.Doc]:
    """``doc`` and the members pdoc renders on its page, recursively."""
    yield doc
    if isinstance(doc, pdoc.doc.Class):
        for member in doc.own_members:
            if _shown(member, module_all):
                yield from _walk(member, module_all)


def _lookup(root: Any, dotted: str) -> bool:
    obj = root
    for part in dotted.split("."):
        try:
            obj = getattr(obj, part)
        except Exception:
            return False
    return True


def _resolves_absolute(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        return i == len(parts) or _lookup(module, ".".join(parts[i:]))
    return False


def _target(text: str) -> str:
    """The dotted name of a role's text: ``~a.b``, ``title <a.b>``, ``a.b()`` give ``a.b``."""
    match = re.search(r"<([^<>]+)>\s*$", text)
    name = match.group(1) if match else text
    return name.strip().lstrip("~!.").removesuffix("()")


def _namespaces(doc: pdoc.doc.Doc, documented_in: str) -> list[Any]:
    spaces: list[Any] = []
    if "." in doc.qualname:  # a member of a class: the class first
        holder = doc.qualname.rsplit(".", 1)[0]
        module = sys.modules.get(doc.modulename)
        if module is not None and _lookup(module, holder):
            obj = module
            for part in holder.split("."):
                obj = getattr(obj, part)
            spaces.append(obj)
    if isinstance(doc, pdoc.doc.Class):
        spaces.append(doc.obj)
    for name in (doc.taken_from[0], doc.modulename, documented_in):
        module = sys.modules.get(name)
        if module is not None:
            spaces.append(module)
    return spaces


def reference_problems(doc: pdoc.doc.Doc, documented_in: str) -> list[str]:
    """Broken or unrendered cross-reference roles in the docstring of ``doc``.

    A docstring inherited from a class outside the documented packages (the generic
    text of ``torch.nn.Module.forward``) is a problem of its own: the page would show it
    as if it described ``doc``.
    """
    origin = _inherited_from(doc)
    if origin is not None:
        if origin.split(".")[0] in {p.split(".")[0] for p in PACKAGES}:
            return []
        return [
            f"{documented_in}: {doc.fullname} has no docstring of its own; pdoc would show "
            f"the one it inherits from {origin}"
        ]
    problems = []
    for role, text in _ROLE.findall(doc.docstring or ""):
        where = f"{documented_in}: docstring of {doc.fullname}"
        if role not in _RENDERED_ROLES:
            problems.append(f"{where}: role :{role}: is not rendered by pdoc (:{role}:`{text}`)")
            continue
        if role not in _LINK_ROLES:
            continue
        name = _target(text)
        spaces = _namespaces(doc, documented_in)
        if not any(_lookup(s, name) for s in spaces) and not _resolves_absolute(name):
            problems.append(f"{where}: :{role}:`{text}` does not resolve")
    return problems


def _disjoint_specs(names: Sequence[str]) -> list[str]:
    """``names`` less those pdoc already reaches by walking an earlier one.

    pdoc walks a package's submodules itself (those ``__all__`` allows) and warns when
    two specifications yield the same module.
    """
    specs: list[str] = []
    covered: set[str] = set()
    for name in names:
        if name not in covered:
            specs.append(name)
            covered.update(pdoc.extract.walk_specs([name]))
    return specs


def _comment_docs(module_name: str) -> dict[str, str]:
    """``{qualname: text}`` of the assignments in a module preceded by ``#:`` comments.

    The project documents constants Sphinx-style (``#: text`` on the lines above the
    assignment); pdoc reads only a string literal below it, so :func:`build` supplies
    these. Module-level and class-level assignments to plain names are read.
    """
    module = sys.modules.get(module_name)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    docs: dict[str, str] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.")
                continue
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else []
            )
            comment: list[str] = []
            row = node.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#:"):
                comment.insert(0, lines[row].strip()[2:].strip())
                row -= 1
            for target in targets:
                if isinstance(target, ast.Name) and comment:
                    docs[prefix + target.id] = "\n".join(comment)

    visit(ast.parse(source).body, "")
    return docs


def _page_docs(module_doc: pdoc.doc.Module) -> Iterator[pdoc.doc.Doc]:
    """The module and every member its page shows, recursively."""
    yield module_doc
    module_all = getattr(module_doc.obj, "__all__", None) or []
    for member in module_doc.own_members:
        if _shown(member, module_all):
            yield from _walk(member, module_all)


def _write(all_modules: dict[str, pdoc.doc.Module], out_dir: Path) -> None:
    """Render every page, the index and the search index (as ``pdoc.pdoc`` does)."""
    for module_doc in all_modules.values():
        page = out_dir / f"{module_doc.fullname.replace('.', '/')}.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(pdoc.render.html_module(module_doc, all_modules), encoding="utf-8")
    for name, text in (
        ("index.html", pdoc.render.html_index(all_modules)),
        ("search.js", pdoc.render.search_index(all_modules)),
    ):
        if text:
            (out_dir / name).write_text(text, encoding="utf-8")


def build(out_dir: str | Path, modules: Sequence[str] | None = None) -> list[str]:
    """Write the HTML reference of ``modules`` to ``out_dir``; return the problems found.

    Constants documented by ``#:`` comments get that text as their docstring
    (:func:`_comment_docs`).

    Args:
        out_dir: output folder (created; existing pages are overwritten).
        modules: module names; by default :func:`public_modules` of :data:`PACKAGES`.

    Returns:
        One line per problem: pdoc's warnings, then broken or unrendered cross
        references (see the module docstring). An empty list means a clean build.
    """
    out_dir = Path(out_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = _disjoint_specs(list(modules) if modules is not None else public_modules())
        pdoc.render.configure(docformat=DOCFORMAT, show_source=True)
        all_modules = {
            name: pdoc.doc.Module.from_name(name) for name in pdoc.extract.walk_specs(specs)
        }
        problems = []
        for name, module_doc in all_modules.items():
            for doc in _page_docs(module_doc):
                if isinstance(doc, pdoc.doc.Variable) and not doc.docstring:
                    origin, qualname = doc.taken_from
                    doc.docstring = _comment_docs(origin).get(qualname, "")
                problems.extend(reference_problems(doc, name))
        _write(all_modules, out_dir)
    warned = [f"pdoc warning ({w.category.__name__}): {w.message}" for w in caught]
    # several pages document the same re-exported object: report each problem once
    return list(dict.fromkeys(warned + problems))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build into ``--out``; exit 1 when :func:`build` reports problems."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="modules to document (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    problems = build(args.out, args.modules or None)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} documentation problem(s); pages in {args.out}", file=sys.stderr)
        return 1
    print(f"API reference written to {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    # document the source tree this script lives in, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
