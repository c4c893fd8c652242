"""`import slms` has no side effects: it loads none of the heavy dependencies and leaves the
import machinery alone; the version is the installed package's; no module of src/slms imports
itself through others (an import cycle)."""

import ast
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_slms_installs_no_hook_and_imports_no_dependency():
    code = ("import sys\n"
            "before = list(sys.meta_path), list(sys.path_hooks)\n"
            "import slms\n"
            "assert (list(sys.meta_path), list(sys.path_hooks)) == before\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'tokenizers')\n"
            "             if m in sys.modules))\n")
    assert run_python(code) == "[]"


def test_the_version_is_the_package_metadata(capsys):
    import slms
    from slms.cli import main

    assert slms.__version__ == version("slms")
    assert run_python("from slms import __version__; print(__version__)") == version("slms")
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"slms {version('slms')}"


def test_a_checkpoint_records_the_package_version(tmp_path, tokenizer):
    from conftest import tiny_config
    from slms.checkpoint import read_config, save_checkpoint
    from slms.model import GPT

    save_checkpoint(tmp_path / "ck", GPT(tiny_config()), tokenizer)
    assert read_config(tmp_path / "ck")["slms_version"] == version("slms")


SRC = Path(__file__).resolve().parents[1] / "src" / "slms"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def runtime_imports(path: Path) -> set[str]:
    """The slms modules `path` imports when it runs (at the top or inside a function; not under
    `if TYPE_CHECKING:`). `from slms.x import y` is module slms.x.y when that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test).endswith("TYPE_CHECKING")
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(kept + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                    for a in node.names}
    return {m for m in out if m in MODULES and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = {m: runtime_imports(p) for m, p in MODULES.items()}
    assert "slms.rundir" in graph["slms"] and "slms.checkpoint" in graph["slms.rundir"]
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
