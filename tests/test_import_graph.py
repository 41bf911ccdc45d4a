"""No import cycle among megavlm's application packages (issue 19): the graph of which package
imports which is built from every ``import`` statement in the sources (function-level ones too,
so a cycle cannot hide inside a function), and must be acyclic among eval, demo, experiment and
prepare. The layering it enforces: eval (the library) <- demo (its corpus and offline suites)
<- prepare <- experiment (sweep, demo run, scoring)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "megavlm"
CHECKED = ("eval", "demo", "experiment", "prepare")


def _unit(module: str) -> str | None:
    """megavlm.<x>[.…] -> x (a subpackage or a top-level module); None outside megavlm."""
    parts = module.split(".")
    return parts[1] if parts[0] == "megavlm" and len(parts) > 1 else None


def import_graph() -> dict[str, dict[str, list[str]]]:
    """{importer unit: {imported unit: ["file:line", …]}} over all of megavlm's sources."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        src = _unit(".".join(rel.parts))
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from megavlm import demo` imports the package demo
                names = [f"{node.module}.{a.name}" if node.module == "megavlm" else node.module for a in node.names]
            else:
                continue
            for name in names:
                dst = _unit(name)
                if src and dst and dst != src:
                    graph[src][dst].append(f"{f.relative_to(ROOT.parent)}:{node.lineno}")
    return graph


def cycles(graph: dict, nodes: tuple[str, ...]) -> list[list[str]]:
    """Every elementary cycle among ``nodes`` (small graph: a DFS from each node suffices)."""
    out = []

    def walk(path: list[str]) -> None:
        for nxt in graph.get(path[-1], {}):
            if nxt not in nodes:
                continue
            if nxt == path[0]:
                out.append(path + [nxt])
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest node
                walk(path + [nxt])

    for n in nodes:
        walk([n])
    return out


def test_cycle_finder_finds_a_planted_cycle():
    g = {"eval": {"demo": []}, "demo": {"experiment": []}, "experiment": {"eval": []}, "prepare": {"demo": []}}
    assert cycles(g, CHECKED) == [["demo", "experiment", "eval", "demo"]]


def test_no_cycle_among_eval_demo_experiment_prepare():
    g = import_graph()
    edges = {f"{a} -> {b}": g[a][b][0] for a in CHECKED for b in sorted(g[a]) if b in CHECKED}
    print("\n".join(f"{e}  (e.g. {where})" for e, where in edges.items()))
    found = cycles(g, CHECKED)
    assert not found, "import cycles: " + "; ".join(
        " -> ".join(c) + " via " + ", ".join(g[a][b][0] for a, b in zip(c, c[1:])) for c in found)
    assert "eval" not in {b for a in g for b in g[a] if a == "eval"}  # sanity: no self edges kept
    assert not any(b in CHECKED for b in g["eval"])  # evaluation, the library, imports none of them
