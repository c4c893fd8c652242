"""Epochs, metrics records (MFU, memory), plots, TensorBoard as an optional dependency."""

import json

import pytest

from slms.cli import main
from slms.model import flops_per_token
from slms.train.metrics import MetricsWriter, TensorBoardMissingError, read_metrics
from train_helpers import TINY


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("epochs") / "run"
    assert main(["train", "configs/tiny.toml", f"data.path={data_dir}", *TINY,
                 "train.epochs=0.005", "train.peak_flops=1e12", "--out", str(out)]) == 0
    return out


def test_epochs_set_the_total_steps(epoch_run, data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    expected = -(-0.005 * meta["splits"]["train"]["tokens"] // (4 * 32))  # ceil
    saved = json.loads((epoch_run / "run_config.json").read_text())
    assert saved["train"]["max_steps"] == expected == 5
    assert [r["step"] for r in read_metrics(epoch_run) if "loss" in r] == [1, 2, 3, 4, 5]


def test_records_have_throughput_mfu_and_memory(epoch_run):
    cfg = json.loads((epoch_run / "run_config.json").read_text())
    from slms.config import model_config_from_dict

    fpt = flops_per_token(model_config_from_dict(cfg["model"]))
    for r in (r for r in read_metrics(epoch_run) if "loss" in r):
        assert r["tokens_per_s"] > 0 and r["memory_gb"] > 0 and r["grad_norm"] > 0
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / 1e12)
        assert r["tokens"] == r["step"] * 4 * 32 and len(r["moe"]) == 2


def test_plot_writes_labelled_pngs(epoch_run, capsys):
    assert main(["plot", str(epoch_run)]) == 0
    out = capsys.readouterr().out
    for name in ("loss.png", "expert_load.png"):
        png = epoch_run / name
        assert f"wrote {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(epoch_run / "nothing")]) == 2


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(TensorBoardMissingError, match="pip install tensorboard"):
        MetricsWriter(tmp_path / "metrics.jsonl", tensorboard=True)
