import json

import pytest

from slms.cli import main
from slms.config import ModelConfig, run_config_from_dict
from slms.model.info import ffn_matmul_params
from slms.study.plan import expert_width, moe_overrides
from slms.train.metrics import read_metrics
from slms.train.optim import Schedule

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "quick"
    assert main(["study", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "study.json").read_text())


@pytest.mark.slow
def test_quick_study_writes_the_report_and_both_plots(quick, capsys):
    out, report = quick
    names = [r["name"] for r in report["variants"]]
    assert names == ["dense", "moe-e4-k1", "moe-e4-k2", "moe-e8-k1", "moe-e8-k2", "moe-e16-k1",
                     "moe-e16-k2", "upcycled-e8-k2"]
    for png in ("study_flops.png", "study_time.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    assert "flops_per_token" in report["budget"]["convention"]
    for r in report["variants"]:
        assert r["curve"] and r["final_val_bpb"] == r["curve"][-1]["val_bpb"] > 0
        steps = [p["step"] for p in r["curve"]]
        assert steps == sorted(steps) and steps[-1] == r["steps"]


def test_every_variant_trains_the_budget_within_five_percent(quick):
    _, report = quick
    budget = report["budget"]["flops"]
    dense = report["variants"][0]
    assert report["budget"]["dense_steps"] == 30 and dense["steps"] == 30
    assert budget == 30 * dense["flops_per_token"] * report["tokens_per_step"]
    for r in report["variants"]:
        assert abs(r["flops"] / budget - 1) <= 0.05, r["name"]
        assert r["flops_vs_budget"] == pytest.approx(r["flops"] / budget)


def test_moe_variants_match_the_dense_active_flops(quick):
    _, report = quick
    dense, *moes, up = report["variants"]
    for r in moes:
        # the experts' matmuls equal the dense FFN's; only the router's small matmul is extra
        assert 1 <= r["flops_per_token"] / dense["flops_per_token"] < 1.05, r["name"]
        assert r["expert_hidden"] * r["top_k"] == 128  # the dense FFN: 4 x n_embd 32
        assert r["params_active"] < r["params_total"]
    assert up["expert_hidden"] == 128 and up["flops_per_token"] > dense["flops_per_token"]


def test_the_upcycled_run_starts_from_the_dense_run_halfway(quick):
    out, report = quick
    dense, up = report["variants"][0], report["variants"][-1]
    half = up["upcycled_at_step"]
    assert half == 15 and (out / "dense" / "checkpoints" / f"step-{half}").is_dir()
    before = [p for p in up["curve"] if p["step"] <= half]
    assert before == [p for p in dense["curve"] if p["step"] <= half]
    after = up["curve"][len(before):]
    assert after and after[0]["flops"] > before[-1]["flops"]
    dense_cfg, up_cfg = (json.loads((out / name / "run_config.json").read_text())["train"]
                         for name in ("dense", up["name"]))
    assert up_cfg["init_from"] == up["init"]
    # the dense run continued at step 15 of its 30: its batches and its schedule from there
    assert (up_cfg["init_step"], up_cfg["init_total"]) == (15, dense_cfg["max_steps"]) == (15, 30)
    lrs = {name: {r["step"]: r["lr"] for r in read_metrics(out / name) if "lr" in r}
           for name in ("dense", up["name"])}
    # its lr: the dense cosine, refitted at step 15 to the upcycled run's (fewer) steps
    schedule = Schedule(run_config_from_dict({"train": dense_cfg}).train)
    schedule.refit(half, up["steps"])
    assert min(lrs[up["name"]]) > half and up["steps"] < 30
    assert lrs[up["name"]] == {s: pytest.approx(dense_cfg["lr"] * schedule(s - 1))
                               for s in lrs[up["name"]]}


@pytest.mark.slow
def test_minutes_budget(tmp_path):
    out = tmp_path / "m"
    assert main(["study", "--quick", "--minutes", "0.01", "--experts", "4", "--top-k", "2",
                 "--eval-every", "4", "--out", str(out)]) == 0
    report = json.loads((out / "study.json").read_text())
    assert report["budget"]["minutes"] == 0.01 and report["budget"]["flops"] is None
    assert [r["name"] for r in report["variants"]] == ["dense", "moe-e4-k2", "upcycled-e8-k2"]
    assert all(r["flops_vs_budget"] is None for r in report["variants"])
    assert report["variants"][2]["upcycled_at_step"] % 4 == 0
    assert (out / "study_time.png").is_file()


@pytest.mark.parametrize("activation", ["relu", "relu2", "swiglu"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_expert_width_matches_the_dense_ffn(activation, top_k):
    cfg = ModelConfig(n_embd=48, activation=activation)
    h = expert_width(cfg, top_k)
    dense = ffn_matmul_params(activation, 48, 4 * 48)
    assert abs(top_k * ffn_matmul_params(activation, 48, h) - dense) / dense < 0.02


def test_top1_variants_use_the_unnormalised_gate():
    assert "model.moe.renormalize=false" in moe_overrides(8, 1, 64, "topk")
    assert "model.moe.renormalize=true" in moe_overrides(8, 2, 64, "bias")


@pytest.mark.parametrize("args,message", [
    (["--quick", "--flops", "1e9", "--dense-steps", "40"], "exactly one budget"),
    (["--quick", "--experts", "4", "--top-k", "8"], "more than the fewest experts"),
    (["--quick", "--upcycle", "8"], "--upcycle takes E,K"),
    (["--quick", "--experts", "four"], "comma-separated integers"),
    (["configs/tiny.toml", "--dense-steps", "40"], "model.moe=none"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    assert main(["study", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_budget_too_small_for_ten_steps_is_refused(tmp_path, capsys):
    assert main(["study", "--quick", "--dense-steps", "5", "--out", str(tmp_path / "o")]) == 2
    assert "fewer than 10" in capsys.readouterr().err


def test_out_must_be_new(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    assert main(["study", "--quick", "--out", str(tmp_path / "o")]) == 2
    assert "not empty" in capsys.readouterr().err
