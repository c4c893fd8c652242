"""The lines that end a training run: how far it got, where its best checkpoint was, and, when
validation stopped improving, why the rest of the budget was not spent."""

from __future__ import annotations

from slms.data.loader import PackedData
from slms.train.adapt import passes_text
from slms.train.budget import PROVISIONAL_STEPS, ValidationWatch
from slms.train.state import Run


def passes(run: Run, data: PackedData) -> float:
    """Passes over the training tokens so far."""
    return run.state.tokens_seen / max(data.train_tokens, 1)


def final_summary(run: Run, data: PackedData) -> str:
    """The last line of a run that trained its whole budget: where its best was."""
    state, watch = run.state, run.watch
    line = (f"trained {state.step:,} steps ({passes_text(passes(run, data))} passes over "
            f"{data.train_tokens:,} training tokens)")
    if not state.best_step:
        return line
    line += f"; best validation loss {state.best_val:.4f} at step {state.best_step:,}, in best/"
    if state.best_step < state.step and watch.overfitting:
        line += ("; after it the model memorised its training text (validation rose while "
                 "training loss fell): train.early_stop, more text, or more dropout would "
                 "spend those steps better")
    return line


def early_stop_summary(run: Run, data: PackedData, watch: ValidationWatch) -> str:
    """Why the run stopped early, in the user's terms: where its best was, and what the
    steps after it were spent on."""
    state, tc = run.state, run.cfg.train
    tokens = data.train_tokens
    planned = (f"{tc.max_steps:,}" if tc.max_minutes <= 0 else
               f"{tc.max_steps:,} fitted to the time budget"
               if tc.max_steps != PROVISIONAL_STEPS else "a time budget not yet fitted")
    why = ("the model memorised its training text (validation loss rose while training loss "
           "fell)" if watch.overfitting else "validation stopped improving")
    return (f"early stop at step {state.step:,} of {planned}: best at step {state.best_step:,}, "
            f"then no better validation loss in {watch.since_best} evaluations "
            f"(train.early_stop={tc.patience}); {why} after {passes_text(passes(run, data))} "
            f"passes over "
            f"its {tokens:,} training tokens; best/ holds step {state.best_step:,} (more text, "
            "or a smaller model or more dropout, would use the rest of the budget)")
