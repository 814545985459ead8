"""The package's layers: every import points down, none goes around in a circle.

Read from the source with `ast` (imports inside functions count too), so a cycle broken
by a function-local import still fails here.  The layers, bottom up:

    kernels (_online -> cross_entropy, linear_cross_entropy -> tuning)
    _rows                     per-row math and argument checks, plain torch
    _torch_path, _triton_path the two back ends
    _launch                   which back end runs a call
    _ops                      custom ops
    _autograd                 autograd Functions
    distributed               vocabulary parallelism, on the layers below
    functional, linear        the public functions
    modules                   the nn.Modules
    integrations.*            Hugging Face
    testing                   comparator and multi-process harness; imports nothing of ours
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module -> the package modules it may import (directly)
ALLOWED = {
    "kernels._online": set(),
    "kernels.cross_entropy": {"kernels._online"},
    "kernels.linear_cross_entropy": {"kernels._online"},
    "kernels.tuning": {"kernels.linear_cross_entropy"},
    "kernels": set(),
    "_rows": set(),
    "_torch_path": {"_rows"},
    "_triton_path": {"kernels", "kernels.cross_entropy", "kernels.linear_cross_entropy",
                     "kernels.tuning"},
    "_launch": {"_torch_path", "_triton_path", "_rows", "kernels", "kernels.cross_entropy"},
    "_ops": {"_launch"},
    "_autograd": {"_ops"},
    "_extended": {"_launch", "_rows"},  # temperature, token statistics, teacher logits
    "distributed": {"_ops", "_autograd", "_extended", "_rows"},
    "functional": {"_rows", "_autograd", "_extended", "distributed"},
    "linear": {"_rows", "_autograd", "_extended", "distributed"},
    "modules": {"functional", "linear"},
    "integrations": set(),
    "integrations.transformers": {"linear", "functional", "_rows"},
    "testing": set(),  # comparator and spawn harness for tests and perf: torch only
    "": {"_autograd", "_extended", "_rows", "functional", "linear", "modules"},  # softmax_ce/__init__.py
}


def _modules():
    """name (relative to softmax_ce) -> file"""
    out = {}
    for path in sorted((ROOT / "softmax_ce").rglob("*.py")):
        rel = path.relative_to(ROOT / "softmax_ce").with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "kernels" if path.stem == "__init__" else f"kernels.{path.stem}"
        out[name] = path
    return out


def _imports(name, path, known):
    """The package modules `name` imports, anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                mod = package[:len(package) - node.level + 1]
                mod = mod + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("softmax_ce"):
                mod = node.module.split(".")[1:]
            else:
                continue
            # each imported name is a submodule (from . import _ops) or a name of `mod`
            targets = [".".join(mod + [a.name]) if ".".join(mod + [a.name]) in known
                       else ".".join(mod) for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".", 1)[1] if "." in a.name else ""
                       for a in node.names if a.name.startswith("softmax_ce")]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    assert set(GRAPH) == set(ALLOWED), (sorted(set(GRAPH) - set(ALLOWED)),
                                        sorted(set(ALLOWED) - set(GRAPH)))


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_point_down(name):
    extra = GRAPH[name] - ALLOWED[name]
    assert not extra, f"softmax_ce.{name} imports {sorted(extra)}: against the layering"


def test_no_import_cycle():
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for m in GRAPH[n]:
            if state.get(m) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, m]))
            if m not in state:
                visit(m, stack + [n])
        state[n] = "done"

    for n in GRAPH:
        if n not in state:
            visit(n, [])


def test_the_check_sees_a_cycle():
    """The control: a function-local import of functional inside distributed, the cycle
    this package once had, is found."""
    src = "def f():\n    from .functional import cross_entropy\n"
    tmp = ROOT / "tests" / "_cycle_probe.py"
    tmp.write_text(src)
    try:
        found = _imports("distributed", ROOT / "softmax_ce" / "distributed.py", _modules())
        probe = _imports("distributed", tmp, _modules())
    finally:
        tmp.unlink()
    assert "functional" not in found and "functional" in probe
