"""The seed's figures 1-4 for one run, drawn from its metrics.jsonl as one PNG (matplotlib, Agg)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here; set before anything imports pyplot
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _empty(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="grey")


def render_curves(run_id: str, records: list[dict[str, Any]], status: str) -> bytes:
    """Train loss per step; eval accuracy per epoch; train vs eval accuracy; train vs eval loss."""
    steps = [r for r in records if r.get("kind") == "step" and "loss" in r]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    final = next((r for r in reversed(records) if r.get("kind") == "final"), None)
    ev = "val" if any("val_acc" in r for r in epochs) else "test"
    ep = [r["epoch"] for r in epochs]

    # Figure, not pyplot: no global state, so concurrent requests in the thread pool do not share a figure.
    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    fig.suptitle(f"run {run_id} ({status})")
    (a1, a2), (a3, a4) = fig.subplots(2, 2)

    a1.set(title="1. Train loss per step", xlabel="step", ylabel="cross-entropy")
    if steps:
        xs, ys = [r["step"] for r in steps], [float(r["loss"]) for r in steps]
        a1.plot(xs, ys, lw=0.6, alpha=0.4, color="tab:blue", label="loss")
        a1.plot(xs, _ema(ys), lw=1.5, color="tab:blue", label="smoothed")
        a1.legend()
    else:
        _empty(a1)

    a2.set(title=f"2. {ev.capitalize()} accuracy per epoch", xlabel="epoch", ylabel="accuracy")
    if epochs:
        a2.plot(ep, [r.get(f"{ev}_acc") for r in epochs], marker="o", color="tab:orange", label=ev)
        if final and final.get("test_acc") is not None:
            a2.axhline(final["test_acc"], ls="--", color="tab:green", label=f"test (best) {final['test_acc']:.3f}")
        a2.legend()
    else:
        _empty(a2)

    for ax, key, title in ((a3, "acc", "3. Train vs {ev} accuracy"), (a4, "loss", "4. Train vs {ev} loss")):
        ax.set(title=title.format(ev=ev), xlabel="epoch", ylabel=key)
        if epochs:
            ax.plot(ep, [r.get(f"train_{key}") for r in epochs], marker="o", label="train")
            ax.plot(ep, [r.get(f"{ev}_{key}") for r in epochs], marker="o", label=ev)
            ax.legend()
        else:
            _empty(ax)

    for ax in (a2, a3, a4):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
