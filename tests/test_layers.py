"""The layers import only downward, and no two modules import each other (docs/DESIGN.md,
"The parts and what each owns"; README "Layout").

    partitioner        pure planning: block vocabulary, typed contracts, ILP (no torch)
    adaptlink.model    the model in blocks: config, graph, blocks, KV, micro-batches
    runtime            ranks: transport, messages, stage, coordinator, engine, launcher
    adaptlink.*        the commands: cli, one module per command, launch, demo

Read from the source with `ast` (nothing imported), imports inside functions included, so
an import hidden in a function body cannot climb a layer either.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("partitioner", "adaptlink", "runtime")
LAYERS = ("partitioner", "adaptlink.model", "runtime", "commands")


def layer(module: str) -> int:
    for i, prefix in enumerate(LAYERS[:-1]):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return len(LAYERS) - 1  # the rest of adaptlink: the commands


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = f
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (the longest known prefix of each name)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
                break
    return out


def import_graph() -> nx.DiGraph:
    mods = modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        for target in imports(path, set(mods)) - {name}:
            # a package's __init__ re-exporting its own modules is not a dependency
            if not target.startswith(name + "."):
                g.add_edge(name, target)
    return g


def test_every_package_module_is_found():
    mods = modules()
    assert {"partitioner.vocab", "adaptlink.model.blocks", "runtime.stage", "adaptlink.launch"} <= set(mods)


def test_no_module_imports_a_layer_above_its_own():
    g = import_graph()
    upward = sorted(f"{a} ({LAYERS[layer(a)]}) -> {b} ({LAYERS[layer(b)]})"
                    for a, b in g.edges if layer(b) > layer(a))
    assert not upward, "imports that climb a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles = [c for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert not cycles, f"modules that import each other: {cycles}"


@pytest.mark.parametrize("module,expected", [("partitioner.ilp", 0), ("adaptlink.model.kv", 1),
                                             ("runtime.engine", 2), ("adaptlink.cli", 3),
                                             ("adaptlink", 3)])
def test_layer_of(module, expected):
    assert layer(module) == expected


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule is not vacuous: a planted upward import, inside a function, is found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from runtime.engine import Engine\n    import adaptlink.model.blocks as b\n")
    assert imports(f, {"runtime.engine", "adaptlink.model.blocks", "adaptlink.model"}) == {
        "runtime.engine", "adaptlink.model.blocks"}


def test_the_command_line_starts_without_torch():
    """`adaptlink --help` and parsing any command import no torch (~1.9 s with transformers):
    command modules load the model layer inside the function that runs the command."""
    code = ("import sys, adaptlink.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
