"""The package's layers, read from its source with `ast`: model/ imports nothing above it,
data/ does not import model/, analysis/ does not import train/, and no slms modules import
each other in a cycle."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slms"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every slms module `path` imports, at the top or inside a function, and the names it
    takes from them (`slms.model.moe.MoE`); `from pkg import mod` imports mod, not pkg."""
    out = set()
    package = module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = {f"{base}.{a.name}" for a in node.names}
            out |= names | ({base} if not all(map(is_module, names)) else set())
    return {m for m in out if m == "slms" or m.startswith("slms.")}


GRAPH = {module_name(p): imports_of(p) for p in SRC.rglob("*.py")}

FORBIDDEN = [  # (importing package, imported package)
    ("slms.model", "slms.train"), ("slms.model", "slms.infer"), ("slms.model", "slms.analysis"),
    ("slms.model", "slms.serve"), ("slms.model", "slms.data"),
    ("slms.data", "slms.model"), ("slms.data", "slms.train"), ("slms.data", "slms.analysis"),
    ("slms.analysis", "slms.train"),
]


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("importer,imported", FORBIDDEN)
def test_no_forbidden_import_edge(importer, imported):
    edges = [(m, dep) for m, deps in GRAPH.items() if inside(m, importer)
             for dep in deps if inside(dep, imported)]
    assert edges == []


def test_the_graph_is_read():
    # the walk sees both kinds of import, so an empty edge list above means something
    assert "slms.model.gpt" in GRAPH["slms.model"] or "slms.model.gpt.GPT" in GRAPH["slms.model"]
    # imports inside functions (a command imports its work inside run())
    assert any(inside(d, "slms.train") for d in GRAPH["slms.commands.train"])


def module_of(name: str, graph: dict[str, set[str]]) -> str:
    """The module of `graph` an imported name belongs to: `slms.model.moe.MoE` ->
    `slms.model.moe`."""
    while name not in graph and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or not (the strongly connected
    components of more than one module, by Tarjan's algorithm), each sorted."""
    edges = {m: {module_of(d, graph) for d in deps} - {m} for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for d in edges[m]:
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            group = stack[stack.index(m):]
            del stack[stack.index(m):]
            if len(group) > 1:
                cycles.append(sorted(group))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return sorted(cycles)


def test_no_import_cycle():
    """A module that imports another (at the top, inside a function or for type checking only)
    is never imported back by it, directly or through others."""
    assert import_cycles(GRAPH) == []


def test_import_cycles_are_found():
    graph = {"slms.a": {"slms.b.f"}, "slms.b": {"slms.c"}, "slms.c": {"slms.a", "slms.d"},
             "slms.d": set(), "slms.e": {"slms.e.g"}}
    assert import_cycles(graph) == [["slms.a", "slms.b", "slms.c"]]


def test_no_function_longer_than_60_lines():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n})")
    assert long == []


MODEL_INSIDES = {"wte", "wpe", "blocks", "attn", "mlp", "ln_1", "ln_2", "ln_f", "lm_head",
                 "_logits", "rotary", "scaled_dot_product_attention", "layer_norm", "rms_norm",
                 "document_mask", "document_starts", "softmax"}


def test_the_server_has_no_model_arithmetic():
    """serve/ decodes through GPT.forward: it names none of the model's layers or maths."""
    used = {}
    for path in (SRC / "serve").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = (node.attr if isinstance(node, ast.Attribute)
                    else node.id if isinstance(node, ast.Name) else None)
            if name in MODEL_INSIDES:
                used.setdefault(f"{path.relative_to(SRC)}:{node.lineno}", name)
    assert used == {}


def test_no_module_longer_than_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
