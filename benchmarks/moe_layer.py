"""Speed of the MoE layer against a seed-style layer and the ideal, side by side in one run.

Candidates, timed interleaved within each repeat so that machine noise hits them alike:
  ours        slms.model.moe.MoE (sorted dispatch; decode shapes: the C++ decode kernel)
  seed_style  a dense (B,T,E) gate tensor from top-k logits, then a Python loop over experts
              with boolean masks, each expert an nn.Sequential Linear-ReLU-Linear
  ideal       the cheapest way to run the experts the tokens need with no routing at all: the
              better of k dense FFNs of one expert's size through BLAS (`ideal_blas`, the old
              ideal) and, for decode shapes, the same through a matrix-vector kernel per row
              (`ideal_mv`, torch.addmv: some BLAS builds are slow on 1-8 rows), so that the
              ratio measures routing overhead, not a weak baseline

Decode shapes come twice: the same token again and again (`decode1`, `decode8`), and a stream
of STREAM different tokens (`decode1_stream`, `decode8_stream`), one step's tokens per call, so
that different experts are read from memory as in generation. The streams' ideal runs, for each
step, exactly the experts our router chose for its tokens (taken beforehand, not timed), each on
its rows, from the same stacked weights.

Routing noise is off in both routed layers by default (ours: router=topk; seed-style: its noisy
gate without the noise term); --noisy turns it on in both (ours: router=noisy_topk), training
shapes only. Training shapes run forward+backward in train mode (ours includes its balancing and
z-losses, as in training); decode shapes run forward only in eval mode under no_grad, ours as in
the decode steps of `GPT.generate` (no expert statistics).

On the CPU the process keeps freed memory for reuse, as `slms train` does there
(slms.memory; --malloc default leaves glibc's defaults: our layer then pays ~10 ms of
page faults per `fine` step for its 16 MB tensors, the ideal's 2 MB ones none).

--dtype autocast (the default on CUDA) keeps fp32 weights and inputs and runs each call under
bf16 autocast: the path `slms train train.precision=bf16` takes; --dtype bf16 casts the modules.

    python benchmarks/moe_layer.py [--json] [--device cpu|cuda] [--dtype fp32|bf16|autocast]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slms.config import MoEConfig
from slms.memory import keep_freed_memory
from slms.model.moe import MoE

N_EMBD = 256
STREAM = 64  # distinct decode steps in a stream shape


@dataclass(frozen=True)
class Shape:
    name: str
    n_experts: int
    top_k: int
    hidden: int
    batch: int
    seq: int
    train: bool  # forward+backward in train mode, else forward under no_grad in eval mode
    inner: int  # calls per timed sample, so that short calls rise above timer noise
    stream: bool = False  # decode: each call takes the next of STREAM different steps


SHAPES = [
    Shape("train", 8, 2, 1024, 8, 256, True, 1),
    Shape("fine", 64, 8, 256, 8, 256, True, 1),
    Shape("decode1", 8, 2, 1024, 1, 1, False, 200),
    Shape("decode8", 8, 2, 1024, 8, 1, False, 100),
    Shape("decode1_stream", 8, 2, 1024, 1, 1, False, STREAM * 3, stream=True),
    Shape("decode8_stream", 8, 2, 1024, 8, 1, False, STREAM, stream=True),
]


class SeedStyleMoE(nn.Module):
    """The seed's layer as described: dense gates, then a boolean-mask loop over experts."""

    def __init__(self, n_embd: int, n_experts: int, top_k: int, hidden: int, noisy: bool):
        super().__init__()
        self.top_k, self.noisy = top_k, noisy
        self.gate = nn.Linear(n_embd, n_experts)
        self.noise = nn.Linear(n_embd, n_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(n_embd, hidden), nn.ReLU(), nn.Linear(hidden, n_embd))
            for _ in range(n_experts))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        logits_BTE = self.gate(x_BTD)
        if self.noisy and self.training:
            logits_BTE = logits_BTE + torch.randn_like(logits_BTE) * F.softplus(self.noise(x_BTD))
        top_BTK, idx_BTK = logits_BTE.topk(self.top_k, dim=-1)
        sparse_BTE = torch.full_like(logits_BTE, float("-inf")).scatter(-1, idx_BTK, top_BTK)
        gates_BTE = sparse_BTE.softmax(-1)
        out_BTD = torch.zeros_like(x_BTD)
        flat_x, flat_gates = x_BTD.view(-1, x_BTD.size(-1)), gates_BTE.view(-1, gates_BTE.size(-1))
        for e, expert in enumerate(self.experts):
            mask_BT = (idx_BTK == e).any(dim=-1)
            flat_mask = mask_BT.view(-1)
            if flat_mask.any():
                out = expert(flat_x[flat_mask]) * flat_gates[flat_mask, e].unsqueeze(1)
                out_BTD[mask_BT] += out
        return out_BTD


class Ideal(nn.Module):
    """k dense FFNs of one expert's size over all tokens: the work a perfect router would do;
    `mv`: each row through torch.addmv instead of one BLAS matmul for all rows."""

    def __init__(self, n_embd: int, top_k: int, hidden: int, mv: bool = False):
        super().__init__()
        self.mv = mv
        self.ffns = nn.ModuleList(
            nn.Sequential(nn.Linear(n_embd, hidden), nn.ReLU(), nn.Linear(hidden, n_embd))
            for _ in range(top_k))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.mv:
            return self._mv(x_BTD)
        out = self.ffns[0](x_BTD)
        for ffn in self.ffns[1:]:
            out = out + ffn(x_BTD)
        return out

    def _mv(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.size(-1))
        out_TD = torch.zeros_like(x_TD)
        for t in range(x_TD.size(0)):
            for up, _, down in self.ffns:
                h = torch.addmv(up.bias, up.weight, x_TD[t]).relu_()
                out_TD[t] += torch.addmv(down.bias, down.weight, h)
        return out_TD.view_as(x_BTD)


class RoutedIdeal(nn.Module):
    """The experts our router chose for each step of a stream (routes, taken beforehand), each
    on its rows, from our layer's stacked weights, gate-weighted: routing without its cost.
    `mv`: each (row, expert) through torch.addmv; else one BLAS matmul per expert."""

    def __init__(self, moe: MoE, routes: list[tuple[torch.Tensor, torch.Tensor]], mv: bool):
        super().__init__()
        ex = moe.experts
        self.w1, self.b1, self.w2, self.b2 = ex.w1_EDH, ex.b1_EH, ex.w2_EHD, ex.b2_ED
        self.mv = mv
        # per step: [(expert, rows, gate weights of those rows)]
        self.groups = [[(e, (ids_TK == e).any(-1).nonzero()[:, 0],
                         (w_TK * (ids_TK == e)).sum(-1)[(ids_TK == e).any(-1)])
                        for e in ids_TK.unique().tolist()] for ids_TK, w_TK in routes]
        self.step = 0

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.size(-1))
        out_TD = torch.zeros_like(x_TD)
        for e, rows, g in self.groups[self.step % len(self.groups)]:
            if self.mv:
                for r, w in zip(rows.tolist(), g.tolist(), strict=True):
                    h = torch.addmv(self.b1[e], self.w1[e].t(), x_TD[r]).relu_()
                    out_TD[r].add_(torch.addmv(self.b2[e], self.w2[e].t(), h), alpha=w)
            else:
                h = torch.addmm(self.b1[e], x_TD[rows], self.w1[e]).relu_()
                out_TD.index_add_(0, rows, torch.addmm(self.b2[e], h, self.w2[e]) * g[:, None])
        self.step += 1
        return out_TD.view_as(x_BTD)


def make_step(module: nn.Module, shape: Shape, device: torch.device, dtype: torch.dtype,
              routed_ours: bool, autocast: bool = False) -> Callable[[], None]:
    """A closure running one timed call of `module` (forward, or forward+backward), under bf16
    autocast with `autocast`."""
    step = _make_step(module, shape, device, dtype, routed_ours)
    if not autocast:
        return step

    def autocast_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            step()
    return autocast_step


def inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """The input of each call: one (the same token again) or STREAM different ones."""
    g = torch.Generator().manual_seed(0)
    n = STREAM if shape.stream else 1
    return [torch.randn(shape.batch, shape.seq, N_EMBD, generator=g).to(device, dtype)
            for _ in range(n)]


def _make_step(module: nn.Module, shape: Shape, device: torch.device, dtype: torch.dtype,
               routed_ours: bool) -> Callable[[], None]:
    xs = inputs(shape, device, dtype)
    if not shape.train:
        module.eval()
        # generation turns our statistics off
        pause = module.paused_stats if routed_ours else contextlib.nullcontext

        def fwd() -> None:
            with torch.no_grad(), pause():
                for i in range(shape.inner):
                    module(xs[i % len(xs)])
        return fwd
    x = xs[0]
    module.train()
    x.requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def fwd_bwd() -> None:
        for _ in range(shape.inner):
            module.zero_grad(set_to_none=True)
            x.grad = None
            out = module(x)
            if routed_ours:
                y, aux = out
                loss = (y * grad_out).sum() + aux
            else:
                loss = (out * grad_out).sum()
            loss.backward()
    return fwd_bwd


def ideals(shape: Shape, ours: MoE, device: torch.device, dtype: torch.dtype
           ) -> dict[str, nn.Module]:
    """The ideal's candidates for `shape`: BLAS always; a matrix-vector kernel per row for
    decode shapes; for streams, the experts our router picks for each step."""
    if shape.stream:
        with torch.no_grad():
            routes = [(r.experts_TK, r.weights_TK) for r in
                      (ours.eval().router(x.reshape(-1, N_EMBD)) for x in inputs(shape, device,
                                                                                  dtype))]
        return {"ideal_blas": RoutedIdeal(ours, routes, mv=False),
                "ideal_mv": RoutedIdeal(ours, routes, mv=True)}
    blas = Ideal(N_EMBD, shape.top_k, shape.hidden).to(device, dtype)
    if shape.train:
        return {"ideal_blas": blas}
    mv = Ideal(N_EMBD, shape.top_k, shape.hidden, mv=True).to(device, dtype)
    mv.load_state_dict(blas.state_dict())
    return {"ideal_blas": blas, "ideal_mv": mv}


def build(shape: Shape, device: torch.device, dtype: torch.dtype, noisy: bool,
          autocast: bool = False) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    router = "noisy_topk" if noisy else "topk"
    cfg = MoEConfig(n_experts=shape.n_experts, top_k=shape.top_k, router=router)
    ours = MoE(N_EMBD, cfg, shape.hidden, "relu").to(device, dtype)
    seed = SeedStyleMoE(N_EMBD, shape.n_experts, shape.top_k, shape.hidden, noisy).to(device,
                                                                                      dtype)
    steps = {"ours": make_step(ours, shape, device, dtype, True, autocast),
             "seed_style": make_step(seed, shape, device, dtype, False, autocast)}
    for name, ideal in ideals(shape, ours, device, dtype).items():
        steps[name] = make_step(ideal, shape, device, dtype, False, autocast)
    return steps


def measure(shape: Shape, device: torch.device, dtype: torch.dtype, noisy: bool, warmup: int,
            repeats: int, autocast: bool = False) -> dict[str, float | str]:
    steps = build(shape, device, dtype, noisy, autocast)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():  # interleaved: noise hits them all alike
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) / shape.inner)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ideal = min(t for name, t in med.items() if name.startswith("ideal"))
    return {"name": shape.name, "ours_s": med["ours"], "seed_style_s": med["seed_style"],
            "ideal_s": ideal, "ideal_blas_s": med["ideal_blas"],
            "ideal_mv_s": med.get("ideal_mv"), "ratio_to_ideal": med["ours"] / ideal,
            "ratio_to_blas_ideal": med["ours"] / med["ideal_blas"],
            "speedup_vs_seed_style": med["seed_style"] / med["ours"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "autocast"], default=None,
                   help="default: autocast on CUDA (as training in bf16), fp32 elsewhere")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--noisy", action="store_true", help="routing noise on in both routed layers")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep: freed memory kept for reuse, as slms train on CPU; default: glibc's")
    p.add_argument("--shapes", default=",".join(s.name for s in SHAPES),
                   help="comma-separated subset of " + ",".join(s.name for s in SHAPES))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kept = args.malloc == "keep" and device.type == "cpu" and keep_freed_memory()
    args.dtype = args.dtype or ("autocast" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = args.dtype == "autocast"
    wanted = args.shapes.split(",")
    rows = [measure(s, device, dtype, args.noisy, args.warmup, args.repeats, autocast)
            for s in SHAPES if s.name in wanted]
    routing = ("noisy (ours noisy_topk, seed-style noisy gate)" if args.noisy
               else "no noise (ours topk, seed-style gate without noise)")
    meta = {"device": args.device, "dtype": args.dtype, "threads": args.threads,
            "repeats": args.repeats, "routing": routing, "torch": torch.__version__,
            "malloc": "keep freed memory" if kept else "default"}
    if args.json:
        print(json.dumps({"shapes": rows, "meta": meta}))
        return
    print(f"MoE layer, n_embd {N_EMBD}, {args.dtype} on {args.device}, {args.threads} threads, "
          f"median of {args.repeats}; routing: {routing}; malloc: {meta['malloc']}")
    print(f"{'shape':<15} {'ours ms':>9} {'seed ms':>9} {'blas ms':>9} {'mv ms':>9} "
          f"{'ours/ideal':>11} {'ours/blas':>10} {'seed/ours':>10}")
    for r in rows:
        mv = f"{r['ideal_mv_s'] * 1e3:>9.3f}" if r["ideal_mv_s"] is not None else f"{'-':>9}"
        print(f"{r['name']:<15} {r['ours_s'] * 1e3:>9.3f} {r['seed_style_s'] * 1e3:>9.3f} "
              f"{r['ideal_blas_s'] * 1e3:>9.3f} {mv} {r['ratio_to_ideal']:>11.2f} "
              f"{r['ratio_to_blas_ideal']:>10.2f} {r['speedup_vs_seed_style']:>10.2f}")


if __name__ == "__main__":
    main()
