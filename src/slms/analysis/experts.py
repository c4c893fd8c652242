"""`slms experts`: how an MoE model routes a dataset. Per layer and expert: token share and load
imbalance; specialisation (the tokens an expert receives most, relative to their frequency);
a PNG heatmap (layers x experts); an HTML page colouring a text by each token's top-1 expert,
one row per layer; CSV and JSON exports.

Shapes: L MoE layers, E experts, V vocab, N tokens scored, K experts per token.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slms.analysis.routing import capture_routing, route_tokens
from slms.model import GPT
from slms.tokenizer import Tokenizer

# 12 distinguishable light backgrounds (tab20's light half and friends), text stays black
PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69",
           "#fccde5", "#d9d9d9", "#bc80bd", "#ccebc5", "#ffed6f"]


@torch.no_grad()
def route_dataset(model: GPT, tokens: np.ndarray, max_tokens: int, batch_size: int = 8
                  ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(MoE layer indices, scored token ids (N,), expert ids (L, N, K)) over the first
    `max_tokens` tokens, in consecutive context windows, eval mode (no routing noise)."""
    model.eval()
    device = model.device
    T = model.cfg.block_size
    data = np.asarray(tokens[:max_tokens], dtype=np.int64)
    n = len(data) // T * T or len(data)
    chunks = torch.from_numpy(data[:n]).view(-1, min(T, n))
    with capture_routing(model) as cap:
        for s in range(0, len(chunks), batch_size):
            model(chunks[s:s + batch_size].to(device))
    experts = np.stack([cap.experts(j).numpy() for j in range(len(cap.layers))])
    return cap.layers, data[:n], experts


def expert_report(layers: list[int], ids_N: np.ndarray, experts_LNK: np.ndarray, n_experts: int,
                  tokenizer: Tokenizer, top: int = 10, min_count: int = 5) -> dict[str, Any]:
    V = max(tokenizer.vocab_size, int(ids_N.max()) + 1)
    freq_V = np.bincount(ids_N, minlength=V).astype(np.float64)
    p_V = freq_V / freq_V.sum()
    out: dict[str, Any] = {"tokens": int(len(ids_N)), "n_experts": n_experts, "layers": []}
    for j, layer in enumerate(layers):
        counts_E = np.bincount(experts_LNK[j].ravel(), minlength=n_experts)
        share_E = counts_E / counts_E.sum()
        top1_N = experts_LNK[j, :, 0]
        spec = []
        for e in range(n_experts):
            got_V = np.bincount(ids_N[top1_N == e], minlength=V).astype(np.float64)
            n_e = got_V.sum()
            # lift = P(token | routed to e) / P(token): > 1 means e sees it more than chance
            lift_V = np.where((freq_V >= min_count) & (n_e > 0),
                              got_V / max(n_e, 1) / np.maximum(p_V, 1e-12), 0.0)
            best = [int(v) for v in np.argsort(-lift_V)[:top] if lift_V[v] > 0]
            spec.append([{"token": tokenizer.decode([v]), "id": v, "count": int(got_V[v]),
                          "share_of_token": float(got_V[v] / freq_V[v]),
                          "lift": float(lift_V[v])} for v in best])
        out["layers"].append({
            "layer": layer, "tokens_per_expert": counts_E.tolist(), "share": share_E.tolist(),
            "max_over_mean": float(counts_E.max() / counts_E.mean()),
            "cv": float(counts_E.std() / counts_E.mean()),
            "top1_share": (np.bincount(top1_N, minlength=n_experts) / len(top1_N)).tolist(),
            "specialisation": spec})
    return out


def write_heatmap(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = np.array([la["share"] for la in report["layers"]])
    # constrained layout keeps the (two-line) title inside the figure however few experts
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 + 0.6 * share.shape[1]),
                                    1.3 + 0.45 * share.shape[0]), layout="constrained")
    im = ax.imshow(share, cmap="viridis", aspect="auto")
    ax.set_xticks(range(share.shape[1]))
    ax.set_yticks(range(share.shape[0]), [f"layer {la['layer']}" for la in report["layers"]])
    ax.set_xlabel("expert")
    for (i, e), v in np.ndenumerate(share):
        ax.text(e, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v < share.mean() else "black")
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.suptitle(f"expert load over {report['tokens']:,} tokens\n"
                 f"(perfect balance = {1 / share.shape[1]:.3f})", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(report: dict[str, Any], out: Path) -> None:
    with (out / "expert_load.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "expert", "tokens", "share", "top1_share"])
        for la in report["layers"]:
            for e, (n, s, s1) in enumerate(zip(la["tokens_per_expert"], la["share"],
                                               la["top1_share"], strict=True)):
                w.writerow([la["layer"], e, n, f"{s:.6f}", f"{s1:.6f}"])
    with (out / "specialisation.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "expert", "rank", "token", "id", "count", "share_of_token", "lift"])
        for la in report["layers"]:
            for e, rows in enumerate(la["specialisation"]):
                for rank, r in enumerate(rows):
                    w.writerow([la["layer"], e, rank + 1, r["token"], r["id"], r["count"],
                                f"{r['share_of_token']:.4f}", f"{r['lift']:.3f}"])


def render_html(tokenizer: Tokenizer, ids: list[int], layers: list[int],
                experts_LTK: torch.Tensor, n_experts: int, title: str) -> str:
    """A page with the text once per MoE layer, each token on its top-1 expert's colour."""
    legend = " ".join(f'<span class="t" style="background:{PALETTE[e % len(PALETTE)]}">'
                      f"expert {e}</span>" for e in range(n_experts))
    rows = []
    for j, layer in enumerate(layers):
        spans = []
        for t, tid in enumerate(ids):
            e = int(experts_LTK[j, t, 0])
            rest = ",".join(str(int(x)) for x in experts_LTK[j, t, 1:])
            piece = html.escape(tokenizer.decode([tid])).replace("\n", "&#8629;<br>")
            spans.append(f'<span class="t" style="background:{PALETTE[e % len(PALETTE)]}" '
                         f'title="expert {e} (then {rest})">{piece}</span>')
        rows.append(f'<div class="row"><div class="lab">layer {layer}</div>'
                    f'<div class="txt">{"".join(spans)}</div></div>')
    style = ("body{font-family:sans-serif;margin:16px;max-width:1100px}"
             ".t{white-space:pre-wrap;border-radius:3px;padding:1px 0;font-family:monospace;"
             "font-size:14px}.row{display:flex;gap:12px;margin:8px 0;border-top:1px solid #ddd;"
             "padding-top:6px}.lab{width:70px;flex:none;font-weight:bold}.txt{line-height:1.7}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body><h2>{html.escape(title)}</h2>"
            f"<p>Each token is coloured by the expert its router ranked first; hover for the "
            f"others. {legend}</p>{''.join(rows)}</body></html>\n")


def analyse(model: GPT, tokenizer: Tokenizer, tokens: np.ndarray, out_dir: str | Path,
            sample_text: str, max_tokens: int = 50_000, title: str = "experts") -> dict[str, Any]:
    """Write experts.json, expert_load.csv, specialisation.csv, heatmap.png, experts.html."""
    if not model.moe_layers():
        raise ValueError("the model is dense: it has no experts to analyse")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers, ids_N, experts_LNK = route_dataset(model, tokens, max_tokens)
    E = model.cfg.moe.n_experts
    report = expert_report(layers, ids_N, experts_LNK, E, tokenizer)
    (out / "experts.json").write_text(json.dumps(report, indent=1) + "\n")
    write_csv(report, out)
    write_heatmap(report, out / "heatmap.png")
    ids = tokenizer.encode_prompt(sample_text)[:model.cfg.block_size]
    layers, experts_LTK = route_tokens(model, ids)
    p = len(tokenizer.prompt_prefix)  # the page shows the text, not the start token
    (out / "experts.html").write_text(render_html(tokenizer, ids[p:], layers, experts_LTK[:, p:],
                                                  E, title))
    return report


def first_story(tokens: np.ndarray, tokenizer: Tokenizer, min_tokens: int = 20) -> str:
    """The first story of a packed split with at least `min_tokens` tokens (else the first)."""
    data = np.asarray(tokens[:200_000], dtype=np.int64)
    ends = np.flatnonzero(data == tokenizer.eos_id)
    starts = np.concatenate([[0], ends + 1])
    stories = [data[s:e] for s, e in zip(starts, [*ends, len(data)], strict=False)]
    best = next((s for s in stories if len(s) >= min_tokens), stories[0])
    return tokenizer.decode(best.tolist())


def describe(report: dict[str, Any]) -> str:
    lines = [f"{report['tokens']:,} tokens routed; share of routed tokens per expert:"]
    for la in report["layers"]:
        shares = " ".join(f"{s:.2f}" for s in la["share"])
        spec = "; ".join(f"e{e}: " + " ".join(repr(r["token"]) for r in rows[:3])
                         for e, rows in enumerate(la["specialisation"]))
        lines.append(f"layer {la['layer']:>2}: {shares}  max/mean {la['max_over_mean']:.2f}")
        lines.append(f"          most specialised: {spec}")
    return "\n".join(lines)
