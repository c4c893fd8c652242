"""`import slms` has no side effects: it loads none of the heavy dependencies and leaves the
import machinery alone; the version is the installed package's (import cycles:
tests/test_layering.py)."""

import subprocess
import sys
from importlib.metadata import version

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
