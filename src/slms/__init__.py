"""slms: train, run and analyse small GPT language models, dense and Mixture-of-Experts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from slms.model import GPT
    from slms.tokenizer import Tokenizer


def load(path: str | Path, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from a run directory (its best/, else its latest checkpoint) or a
    checkpoint directory. The model is in eval mode."""
    from slms.checkpoint import load_checkpoint
    from slms.rundir import resolve

    model, tokenizer, _ = load_checkpoint(resolve(path), device)
    return model, tokenizer


def _register_hf() -> None:
    hf = sys.modules.get("slms.hf")
    if hf is not None and not hasattr(hf, "register"):
        return  # slms.hf itself is importing transformers; it registers when it is done
    try:
        from slms.hf import register

        register()
    except Exception as e:  # a broken transformers install must not break `import transformers`
        import warnings

        warnings.warn(f"slms could not register its model with transformers ({e}); "
                      "call slms.hf.register() to see why", stacklevel=2)


class _HFAutoHook:
    """A one-shot import hook: registers model_type `slms` with AutoConfig and
    AutoModelForCausalLM right after `transformers.models.auto` is first imported.

    Importing transformers here would cost seconds on every `import slms`; with the hook only
    programs that use transformers' Auto classes pay, and they pay it anyway."""

    TARGET = "transformers.models.auto"

    def find_spec(self, name: str, path: object, target: object = None) -> object:
        if name != self.TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; the lookup below must not find us again
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target)  # type: ignore[attr-defined]
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_register(module: object) -> None:
            exec_module(module)
            _register_hf()

        spec.loader.exec_module = exec_and_register
        return spec


def _install_hf_hook() -> None:
    if _HFAutoHook.TARGET in sys.modules:  # transformers' Auto classes are already in use
        _register_hf()
    elif not any(isinstance(f, _HFAutoHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _HFAutoHook())


_install_hf_hook()
