"""The files of a finished gate run: gates.json (gates, summary, config) and loss.png.

full_attention_heads.tsv (DuoAttention's format) is written by rhead_jax.rankings.write_gates_tsv;
loss.jsonl (one record per step) by the training loop.
"""
from __future__ import annotations

import io as _io

import numpy as np

from rhead_jax import io


def gate_summary(gates) -> dict:
    """Distribution of the gates [L, K]: mean, quantiles, how many are full (> 0.5) / near 0 or 1."""
    g = np.asarray(gates, np.float64)
    q = np.quantile(g, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    return {"mean": float(g.mean()),
            "quantiles": dict(zip(("min", "p10", "p25", "median", "p75", "p90", "max"), map(float, q))),
            "above_0.5": int((g > 0.5).sum()), "below_0.05": int((g < 0.05).sum()),
            "above_0.95": int((g > 0.95).sum()), "count": int(g.size),
            "per_layer_mean": [float(x) for x in g.mean(1)]}


def loss_summary(log: list[dict], window: int = 10) -> dict:
    """First / last distillation losses, each also averaged over `window` steps (one prompt a step)."""
    d = [r["distill"] for r in log]
    if not d:
        return {}
    return {"first": d[0], "last": d[-1], f"first_{window}_mean": float(np.mean(d[:window])),
            f"last_{window}_mean": float(np.mean(d[-window:]))}


def loss_png(log: list[dict]) -> bytes:
    """The loss and its distillation term (log scale; per step and a running mean) and the mean gate
    over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in log])
    distill = np.array([r["distill"] for r in log])
    total = np.array([r["loss"] for r in log])
    alpha = np.array([r["mean_alpha"] for r in log])
    floor = 1e-4 * max(float(total.max()), 1e-12)   # gates at 1: distill ~ 0, kept off the log axis
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    a1.semilogy(steps, total, "-", color="k", label="loss = distill + l1 x mean|alpha|")
    a1.semilogy(steps, np.maximum(distill, floor), ".", ms=3, alpha=0.5, label="distill (one prompt a step)")
    w = min(10, len(distill))
    if w > 1:
        run = np.convolve(distill, np.ones(w) / w, mode="valid")
        a1.semilogy(steps[w - 1:], np.maximum(run, floor), "-", label=f"distill, running mean of {w}")
    a1.set_ylabel("loss (distill: MSE of final hidden)")
    a1.legend(fontsize=8)
    a2.plot(steps, alpha, "-")
    a2.set_ylabel("mean gate alpha")
    a2.set_xlabel("step")
    a2.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(root, result: dict, log: list[dict]) -> None:
    """gates.json (`result`: gates, summaries, config) and loss.png, atomically."""
    io.atomic_write_json(root / "gates.json", result, indent=1, end="\n")
    if log:
        io.atomic_write_bytes(root / "loss.png", loss_png(log))
