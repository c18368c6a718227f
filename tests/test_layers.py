"""The layers hold: every project import, at any depth, is checked against one table.

A module may import its own layer or a lower one, never a higher one; no two modules import each
other, directly or round a circle (the import graph is acyclic); every module is in the table; and
project imports sit at the top of their module, unless the line says why not (``# lazy: ...``).
`docs/ARCHITECTURE.md` draws the same table; change both together.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pretrain", "megatron_patches", "data_prep", "tools")

# The longest matching prefix decides a module's layer (lower number = lower layer).
LAYERS: dict[str, int] = {
    # 0: beside the training package; import nothing of pretrain/
    "megatron_patches": 0,
    "data_prep": 0,
    # 1: the one error base
    "pretrain.errors": 1,
    # 2: facts and pure helpers: flags and configs, processes, output files, reports
    "pretrain.config": 2,
    "pretrain.distributed": 2,
    "pretrain.outputs": 2,
    "pretrain.report": 2,
    # the parameter count of a shape: ModelConfig.num_parameters asks it (imports nothing of the project)
    "pretrain.model.shape": 2,
    # 3: the model (shape, layout, build, init, FLOPs, memory) and what the model carries: masks
    "pretrain.model": 3,
    "pretrain.pruning.masks": 3,
    "pretrain.pruning.state": 3,
    "pretrain.pruning.solver": 3,
    "pretrain.pruning.schedule": 3,
    "pretrain.nodes": 3,
    "pretrain.data": 3,
    # 4: what differs between megatron-core and DeepSpeed
    "pretrain.engines": 4,
    # 5: the checkpoint folder: its files, atomic publication, reading one back
    "pretrain.checkpoint": 5,
    # 6: the loop and its features; operations on checkpoints
    "pretrain.trainer": 6,
    "pretrain.callbacks": 6,
    "pretrain.pruning": 6,  # saliency, compensation, the pruning callback
    "pretrain.engines.convert": 6,
    "pretrain.interop": 6,
    "pretrain.resume": 6,
    "pretrain.shrink": 6,
    "pretrain.distill": 6,
    "pretrain.evaluate": 6,
    "pretrain.benchmarks": 6,
    # 7: runs: the command line, the run and its segments; whole comparisons
    "pretrain.run": 7,
    "pretrain.compare": 7,
    # 8: entry points
    "pretrain.__main__": 8,
    "tools": 8,
}
# The package files that only name their package (`pretrain/__init__.py`).
UNLAYERED = {"pretrain"}


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    top_level: bool
    reason_given: bool


def _modules() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[module.removesuffix(".__init__")] = path
    return found


def _project_module(name: str, modules: dict) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: str, modules: dict) -> list[Import]:
    text = open(path).read()
    lines = text.splitlines()
    tree = ast.parse(text)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    top |= {id(n) for node in tree.body if isinstance(node, (ast.If, ast.Try)) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from a import b` names module a.b when b is one, else something defined in a
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        reason = "# lazy:" in " ".join(lines[node.lineno - 1: node.end_lineno])
        for name in names:
            target = _project_module(name, modules)
            if target and target != module and target not in UNLAYERED:
                found.append(Import(module, target, node.lineno, id(node) in top, reason))
    return found


def _layer(module: str) -> int | None:
    name = module
    while name:
        if name in LAYERS:
            return LAYERS[name]
        name = name.rpartition(".")[0]
    return None


def _all_imports() -> tuple[dict, list[Import]]:
    modules = _modules()
    imports = [imp for module, path in sorted(modules.items()) for imp in _imports(module, path, modules)]
    return modules, list(dict.fromkeys(imports))  # one per (module, target, line)


def _cycles(modules, imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    edges: dict[str, set] = {m: set() for m in modules}
    for imp in imports:
        edges[imp.source].add(imp.target)
    index, low, on_stack, stack, result, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1
        stack.append(start); on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop(); on_stack.discard(member); component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        result.append(sorted(component))
    return result


def test_every_module_is_in_the_table():
    modules, _ = _all_imports()
    missing = sorted(m for m in modules if m not in UNLAYERED and _layer(m) is None)
    assert not missing, f"modules missing from LAYERS in tests/test_layers.py: {missing}"


def test_no_module_imports_a_higher_layer():
    _, imports = _all_imports()
    upward = [f"{i.source} (layer {_layer(i.source)}) line {i.line} imports {i.target} (layer {_layer(i.target)})"
              for i in imports if _layer(i.source) is not None and _layer(i.target) is not None
              and _layer(i.target) > _layer(i.source)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    modules, imports = _all_imports()
    cycles = _cycles(modules, imports)
    assert not cycles, "modules that import each other (directly or round a circle):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_project_imports_sit_at_the_top():
    _, imports = _all_imports()
    hidden = [f"{i.source} line {i.line}: {i.target}" for i in imports if not i.top_level and not i.reason_given]
    assert not hidden, ("project imports inside functions (move them to the top, or say why on the line "
                        "with '# lazy: ...'):\n" + "\n".join(hidden))


def test_the_checker_sees_what_it_must():
    """The checks above cannot pass vacuously: the walker finds imports at every depth."""
    modules, imports = _all_imports()
    assert len(modules) > 80 and len(imports) > 300
    assert _cycles({"a": 1, "b": 1, "c": 1}, [Import("a", "b", 1, True, False), Import("b", "c", 1, True, False),
                                              Import("c", "a", 1, True, False)]) == [["a", "b", "c"]]
    assert _layer("pretrain.engines.convert") == 6 and _layer("pretrain.engines.deepspeed") == 4
