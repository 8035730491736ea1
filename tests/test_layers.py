"""The package's shape: the import contracts in pyproject.toml hold (lint-imports), no chatapp module
takes part in an import cycle (imports inside functions count: they run too), and no module is
over 400 lines.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

from support import ROOT

MAX_MODULE_LINES = 400


def test_the_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "0 broken" in output and "Layers:" in output, output  # the contracts were read and checked


def import_cycles(graph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & graph.modules) for m in modules}
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, next_edge = work.pop()
            if next_edge == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            for position in range(next_edge, len(edges[node])):
                target = edges[node][position]
                if target not in index:
                    work.append((node, position + 1))
                    work.append((target, 0))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                if work and work[-1][0] != node:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        cycles.append(sorted(group))
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for importer, imported in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.e", "p.d")]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_chatapp_module_is_part_of_an_import_cycle():
    graph = grimp.build_graph("chatapp", cache_dir=None)
    cycles = import_cycles(graph)
    chains = [" -> ".join(graph.find_shortest_chain(importer=group[0], imported=group[1]) or group)
              + " -> ... -> " + group[0] for group in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(f"{group}: e.g. {chain}" for group, chain in zip(cycles, chains))


def test_no_chatapp_module_is_over_400_lines():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
             for path in sorted((ROOT / "chatapp").rglob("*.py"))}
    too_long = {path: lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {too_long}"
