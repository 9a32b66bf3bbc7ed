"""The package's layers point one way: inference never imports training, and no import cycle exists,
whether its imports sit at the top of a module or inside a function."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mmfusion"
INFERENCE = (
    "mmfusion.model",
    "mmfusion.diffusion",
    "mmfusion.generation",
    "mmfusion.tokenizers",
    "mmfusion.image_io",
    "mmfusion.devices",
    "mmfusion.pipeline",
    "mmfusion.hub",
)
ABOVE_INFERENCE = ("mmfusion.training", "mmfusion.cli")
DEFERRED = "# Deferred imports:"  # a module that imports mmfusion inside functions says why, once


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(modules: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(every import edge between mmfusion modules, the edges made inside functions or classes)."""

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges, inner = defaultdict(set), defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmfusion"):
                targets = {resolve(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                targets = {resolve(a.name) for a in node.names if a.name.startswith("mmfusion")}
            else:
                continue
            for target in targets - {name, ""}:
                edges[name].add(target)
                if id(node) not in top:
                    inner[name].add(target)
    return edges, inner


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_inference_never_imports_training_or_the_cli():
    edges, _ = import_graph(_modules())
    upward = {m: sorted(t for t in targets if t.startswith(ABOVE_INFERENCE)) for m, targets in edges.items()}
    assert not {m: t for m, t in upward.items() if t and m.startswith(INFERENCE)}


def test_no_import_cycle_hidden_or_not():
    edges, _ = import_graph(_modules())
    assert cycles(edges) == []


def test_imports_inside_functions_are_only_where_a_module_says_why():
    modules = _modules()
    _, inner = import_graph(modules)
    unexplained = sorted(m for m in inner if DEFERRED not in modules[m].read_text())
    assert unexplained == []


def test_the_checks_catch_what_they_look_for():
    """The graph sees an upward edge, a cycle through a function-level import, and a hidden import."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    modules = _modules()
    edges, inner = import_graph(modules)
    assert "mmfusion.training.run" in edges["mmfusion.cli.train"]  # found inside the command function
    assert "mmfusion.training.run" in inner["mmfusion.cli.train"]
    assert "mmfusion.model.config" in edges["mmfusion.config"]


def test_reading_a_config_loads_no_model_code():
    """`mmfusion.config` (YAML files, overrides, every settings dataclass) imports neither torch nor any
    model, sampler or tokenizer code."""
    import subprocess
    import sys

    code = (
        "import sys, mmfusion.config as c; c.load_config(None, ['train.lr=1e-3']); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('mmfusion.model.multimodal', "
        "'mmfusion.generation.diffusion', 'mmfusion.generation.tokens', 'mmfusion.generation.caption', "
        "'mmfusion.tokenizers.image'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_function_is_over_sixty_lines():
    """Long functions are where a reader gets lost: every function of the package fits on a screen."""
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []
