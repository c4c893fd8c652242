#!/usr/bin/env bash
# GPU readiness check: the test suite's CUDA-marked tests, a short seed-moe training benchmark
# in bf16 without and with torch.compile (tokens/s and MFU), then the MoE layer benchmark under
# bf16 autocast. About 6-10 minutes on one H100/H200. Usage: benchmarks/gpu_check.sh   (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-60}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: error: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no" \
         "CUDA device; run this script on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 1
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); \
print(f'device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"

echo "== CUDA-marked tests"
timeout 240 "$PY" -m pytest -q -m cuda tests
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then  # 5: no test collected
    echo "gpu_check: error: CUDA tests failed (exit $rc)" >&2
    exit $rc
fi

echo "== seed-moe training, bf16, batch 32 x 1080 tokens, $STEPS steps (embedded corpus)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for compile in false true; do
    timeout 300 "$PY" -m slms train configs/seed-moe.toml data.path=none \
        train.device=cuda train.precision=bf16 train.compile=$compile train.max_steps=$STEPS \
        train.grad_accum=1 train.log_every=10 train.eval_every=100000 \
        train.checkpoint_every=100000 --out "$work/compile-$compile" > "$work/log-$compile" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "gpu_check: error: training with compile=$compile failed (exit $rc):" >&2
        tail -n 20 "$work/log-$compile" >&2
        status=1
        continue
    fi
    "$PY" - "$work/compile-$compile" "$compile" <<'PYEOF'
import statistics
import sys

from slms.train.metrics import read_metrics

run, compile = sys.argv[1], sys.argv[2]
recs = [r for r in read_metrics(run) if "tokens_per_s" in r][2:]  # skip warm-up / compilation
tps = statistics.median(r["tokens_per_s"] for r in recs)
mfu = [r["mfu"] for r in recs if r["mfu"] is not None]
mfu_text = f"{statistics.median(mfu):.1%}" if mfu else "n/a (unknown GPU: set train.peak_flops)"
print(f"compile={compile}: {tps:,.0f} tokens/s, MFU {mfu_text}, peak memory "
      f"{recs[-1]['memory_gb']:.1f} GB, final loss {recs[-1]['loss']:.3f}")
PYEOF
done

echo "== MoE layer, bf16 autocast over fp32 weights on the GPU, as training runs (ours uses"
echo "   torch._grouped_mm on sm90+)"
if ! timeout 240 "$PY" benchmarks/moe_layer.py --device cuda --dtype autocast --repeats 15; then
    echo "gpu_check: error: benchmarks/moe_layer.py failed on the GPU" >&2
    status=1
fi
exit $status
