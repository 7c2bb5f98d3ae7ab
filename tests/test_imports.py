"""The house rules on imports (developers' guide): no cycle among atlas/'s modules, and no import
moved into a function to dodge one. Read from the source with `ast` (tests/support.py)."""

from __future__ import annotations

from pathlib import Path

from support import Import, cycles, import_graph, imports_closing_a_cycle

ATLAS = Path(__file__).resolve().parent.parent / "atlas"


def test_no_import_cycle_in_atlas():
    graph = import_graph(ATLAS)  # `if TYPE_CHECKING:` imports count too: a cycle of types is still a knot
    assert len(graph) > 100  # the walker reads the package (not an empty graph that passes anything)
    assert cycles([(i.source, i.target) for i in graph]) == []


def test_no_import_inside_a_function_closes_a_cycle():
    assert imports_closing_a_cycle(import_graph(ATLAS)) == []


def test_the_walker_finds_cycles_and_dodges(tmp_path):
    """The checks fail on what they are meant to catch: a two-module ring dodged in a function."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n")
    graph = import_graph(pkg)
    assert cycles([(i.source, i.target) for i in graph]) == [["pkg.a", "pkg.b"]]
    assert imports_closing_a_cycle(graph) == [Import("pkg.b", "pkg.a", 2, True, False)]
    assert [i for i in graph if i.source == "pkg.c"] == [Import("pkg.c", "pkg.a", 3, False, True)]
