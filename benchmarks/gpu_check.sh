#!/usr/bin/env bash
# GPU check, one script and one JSON: the test suite's CUDA-marked tests, seed-moe training in
# bf16 for MINUTES minutes (default 3) without and with torch.compile (tokens/s, MFU, memory,
# loss), `slms bench` of seed-moe on the GPU, and the MoE layer benchmark in the path training
# takes (bf16 autocast over fp32 weights). About 10-12 minutes on one H100/H200.
#
#   benchmarks/gpu_check.sh [OUT_DIR]     (default: .; PYTHON=... picks the interpreter)
#
# Writes OUT_DIR/gpu_check.json: {"device", "cuda_tests", "train": [...], "bench", "moe_layer"}
# (a failed part holds {"error": ...}); the exit status is non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MINUTES=${MINUTES:-3}
OUT=${1:-.}
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: error: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no" \
         "CUDA device; run this script on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 1
fi
"$PY" -c "import json, torch; p = torch.cuda.get_device_properties(0); \
print(json.dumps({'name': p.name, 'memory_gib': round(p.total_memory / 2**30), \
'torch': torch.__version__}))" > "$work/device.json"
status=0

echo "== CUDA-marked tests"
timeout 300 "$PY" -m pytest -q -m cuda tests > "$work/tests.log" 2>&1
rc=$?
tail -n 3 "$work/tests.log"
[ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1  # 5: no test collected
echo "{\"exit\": $rc, \"summary\": $("$PY" -c 'import json, sys; print(json.dumps(open(sys.argv[1]).read().strip().splitlines()[-1:]))' "$work/tests.log")}" > "$work/tests.json"

echo "== seed-moe training, bf16, $MINUTES minutes each, without and with torch.compile"
for compile in false true; do
    timeout $((MINUTES * 60 + 240)) "$PY" -m slms train configs/seed-moe.toml data.path=none \
        train.device=cuda train.precision=bf16 train.compile=$compile \
        train.max_minutes=$MINUTES train.log_every=10 train.eval_every=100000 \
        train.checkpoint_every=100000 --out "$work/compile-$compile" > "$work/log-$compile" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1 && tail -n 20 "$work/log-$compile" >&2
    "$PY" - "$work/compile-$compile" "$compile" "$rc" > "$work/train-$compile.json" <<'PYEOF'
import json
import statistics
import sys

from slms.train.metrics import read_metrics

run, compile, rc = sys.argv[1], sys.argv[2] == "true", int(sys.argv[3])
out = {"compile": compile}
try:
    recs = [r for r in read_metrics(run) if "tokens_per_s" in r][2:]  # skip warm-up, compiling
    mfu = [r["mfu"] for r in recs if r.get("mfu") is not None]
    out |= {"steps": recs[-1]["step"], "tokens_per_s": statistics.median(r["tokens_per_s"]
                                                                          for r in recs),
            "mfu": statistics.median(mfu) if mfu else None,
            "memory_gb": recs[-1]["memory_gb"], "final_loss": recs[-1]["loss"]}
except Exception as e:  # noqa: BLE001  the run failed: say so in the JSON
    out["error"] = f"training exited {rc}: {e}"
print(json.dumps(out))
PYEOF
    cat "$work/train-$compile.json"
done

echo "== slms bench configs/seed-moe.toml on the GPU, bf16"
if ! timeout 300 "$PY" -m slms bench configs/seed-moe.toml --device cuda --precision bf16 \
        --json > "$work/bench.json" 2> "$work/bench.log"; then
    status=1
    echo "{\"error\": $("$PY" -c 'import json, sys; print(json.dumps(open(sys.argv[1]).read()[-500:]))' "$work/bench.log")}" > "$work/bench.json"
fi

echo "== MoE layer, bf16 autocast over fp32 weights, as training runs"
if ! timeout 240 "$PY" benchmarks/moe_layer.py --device cuda --dtype autocast --repeats 15 \
        --json > "$work/moe_layer.json" 2> "$work/moe_layer.log"; then
    status=1
    echo '{"error": "benchmarks/moe_layer.py failed on the GPU"}' > "$work/moe_layer.json"
fi

"$PY" - "$work" "$OUT/gpu_check.json" <<'PYEOF'
import json
import sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
read = lambda name: json.loads((work / name).read_text())  # noqa: E731
report = {"device": read("device.json"), "cuda_tests": read("tests.json"),
          "train": [read(f"train-{c}.json") for c in ("false", "true")],
          "bench": read("bench.json"), "moe_layer": read("moe_layer.json")}
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"wrote {out}")
PYEOF
exit $status
