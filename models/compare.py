"""Two models on the same images: accuracies, agreement, where they differ, and conv1's filters matched one-to-one.

The matching pairs each filter of the first model with one of the second's (an assignment that maximises the total
cosine similarity, scipy's `linear_sum_assignment`), because two networks trained from different seeds learn
similar filters in an arbitrary order.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from models.data import normalize
from models.errors import InvalidArgument

TOP_CLASSES = 5
MOSAIC_COLS = 8  # filter pairs per row of the figure


@torch.inference_mode()
def predict_labels(
    model: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    batch_size: int = 500,
    input_size: int | None = None,
) -> torch.Tensor:
    """The model's predicted class (int64, CPU) for each uint8 image (N, 3, H, W), in batches; a model trained
    on upsampled inputs (`input_size`) sees them as training and /predict made them: normalised, then resized."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start : start + batch_size].to(device), tuple(mean), tuple(std))
        if input_size and input_size != x.shape[-1]:
            x = F.interpolate(x, size=input_size, mode="bilinear", align_corners=False)
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _rate(flags: torch.Tensor) -> float:
    """The share of true values, from integer counts (exact: 4/6 is 4/6, not float32's nearest)."""
    return int(flags.sum()) / max(int(flags.numel()), 1)


def _per_class(correct: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[float | None]:
    """Accuracy per class (None for a class with no image)."""
    out: list[float | None] = []
    for c in range(len(classes)):
        mask = labels == c
        out.append(_rate(correct[mask]) if bool(mask.any()) else None)
    return out


def compare_predictions(
    labels: torch.Tensor, pred_a: torch.Tensor, pred_b: torch.Tensor, classes: list[str], top: int = TOP_CLASSES
) -> dict[str, Any]:
    """Accuracy and per-class accuracy of each, agreement, the 2x2 right/wrong table, and the classes where the
    two disagree most (by the share of that class's images they label differently)."""
    if not labels.shape == pred_a.shape == pred_b.shape or labels.ndim != 1 or labels.numel() == 0:
        raise InvalidArgument("labels and both predictions must be non-empty vectors of one length")
    ra, rb = pred_a == labels, pred_b == labels
    agree = pred_a == pred_b
    pa, pb = _per_class(ra, labels, classes), _per_class(rb, labels, classes)
    differ: list[dict[str, Any]] = []
    for c, name in enumerate(classes):
        mask = labels == c
        if bool(mask.any()):
            a, b = pa[c] or 0.0, pb[c] or 0.0
            rate = _rate(~agree[mask])
            differ.append({"class": name, "disagreement": rate, "acc_a": a, "acc_b": b, "delta": b - a})
    differ.sort(key=lambda d: (-float(d["disagreement"]), -abs(float(d["delta"]))))
    return {
        "n": int(labels.numel()),
        "accuracy": {"a": _rate(ra), "b": _rate(rb)},
        "per_class": [{"class": n, "a": pa[i], "b": pb[i]} for i, n in enumerate(classes)],
        "agreement": _rate(agree),
        "table": {
            "both_right": int((ra & rb).sum()),
            "a_right_b_wrong": int((ra & ~rb).sum()),
            "a_wrong_b_right": int((~ra & rb).sum()),
            "both_wrong": int((~ra & ~rb).sum()),
        },
        "differ_most": differ[:top],
    }


def cosine_matrix(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every filter of `wa` (out, ...) with every filter of `wb` (out, ...): (out_a, out_b)."""
    a = torch.nn.functional.normalize(wa.detach().float().flatten(1), dim=1)
    b = torch.nn.functional.normalize(wb.detach().float().flatten(1), dim=1)
    return a @ b.T


def match_filters(wa: torch.Tensor, wb: torch.Tensor) -> dict[str, Any]:
    """Pair each filter of `wa` with a distinct filter of `wb`, maximising the summed cosine similarity.

    `b_for_a[i]` is the filter of `wb` matched to filter i of `wa`; `similarity[i]` is their cosine similarity.
    """
    if wa.shape != wb.shape:
        raise InvalidArgument(f"conv1 filters of shapes {tuple(wa.shape)} and {tuple(wb.shape)} cannot be matched")
    sim = cosine_matrix(wa, wb).numpy().astype(np.float64)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    order = np.argsort(rows)
    b_for_a = [int(c) for c in cols[order]]
    pair_sims = [float(sim[i, j]) for i, j in enumerate(b_for_a)]
    return {
        "b_for_a": b_for_a,
        "similarity": pair_sims,
        "mean_similarity": float(np.mean(pair_sims)),
        "unmatched_mean_similarity": float(np.mean(np.diag(sim))),  # the same filters in their given order
    }


def _filter_rgb(w: torch.Tensor) -> np.ndarray:
    """(out, 3, kh, kw) -> (out, kh, kw, 3) in [0, 1], mid-grey = 0, one scale for the layer."""
    m = float(w.abs().max()) or 1.0
    return ((w.float() / m).clamp(-1, 1) * 0.5 + 0.5).permute(0, 2, 3, 1).numpy()


def mosaic_cell(kh: int, kw: int) -> tuple[int, int]:
    """(height, width) in pixels of one pair's cell in `pairs_mosaic`: room below each pair for a label."""
    return kh + max(3, kh // 2 + 1), 2 * kw + 3


def pairs_mosaic(wa: torch.Tensor, wb: torch.Tensor, b_for_a: list[int], cols: int = MOSAIC_COLS) -> np.ndarray:
    """An image of filter pairs: each cell holds filter i of `wa` left of its match in `wb` (RGB, white gaps)."""
    a, b = _filter_rgb(wa), _filter_rgb(wb[b_for_a])
    n, kh, kw, _ = a.shape
    cell_h, cell_w = mosaic_cell(kh, kw)
    out = np.ones((-(-n // cols) * cell_h, cols * cell_w, 3))
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * cell_h + 1, c * cell_w + 1
        out[y : y + kh, x : x + kw] = a[i]
        out[y : y + kh, x + kw : x + 2 * kw] = b[i]
    return out


def compare_png(report: dict[str, Any], wa: torch.Tensor | None, wb: torch.Tensor | None) -> bytes:
    """The comparison as one figure: per-class accuracy of both, the 2x2 table, conv1's matched filter pairs."""
    from matplotlib.figure import Figure  # a Figure, not pyplot: no global state, no display backend

    a_id, b_id = report["models"]["a"], report["models"]["b"]
    match = report.get("filters") or {}
    matched = "b_for_a" in match and wa is not None and wb is not None  # else a note: e.g. a 7x7 and a 3x3 stem
    fig = Figure(figsize=(12, 9 if matched else 5.5), dpi=100, layout="constrained")
    acc, agree = report["accuracy"], report["agreement"]
    fig.suptitle(f"a: {a_id}   b: {b_id}   on {report['split']} ({report['n']} images): agreement {agree:.3f}")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.3 if matched else 0.12])  # type: ignore[misc]
    ax1, ax2 = top.subplots(1, 2, width_ratios=[2.2, 1])
    names = [p["class"] for p in report["per_class"]]
    x = np.arange(len(names))
    for off, key, label in ((-0.2, "a", f"a: {a_id} {acc['a']:.3f}"), (0.2, "b", f"b: {b_id} {acc['b']:.3f}")):
        ax1.bar(x + off, [p[key] or 0.0 for p in report["per_class"]], width=0.4, label=label)
    ax1.set(title="accuracy per class", ylim=(0, 1.22))  # headroom: the legend sits above the bars
    ax1.set_yticks(np.linspace(0, 1, 6))
    ax1.set_xticks(x, names, rotation=45 if len(names) <= 20 else 90, fontsize=8 if len(names) <= 20 else 4)
    ax1.legend(fontsize=8, loc="upper center", ncols=2)
    t = report["table"]
    cells = [[t["both_right"], t["a_right_b_wrong"]], [t["a_wrong_b_right"], t["both_wrong"]]]
    ax2.imshow(np.array(cells), cmap="Blues")
    for (r, c), v in np.ndenumerate(np.array(cells)):
        ax2.text(c, r, str(v), ha="center", va="center", color="white" if r == c == 0 else "black", fontsize=12)
    ax2.set_xticks([0, 1], ["b right", "b wrong"], fontsize=9)
    ax2.set_yticks([0, 1], ["a right", "a wrong"], fontsize=9)
    ax2.set_title("right / wrong (images)")
    ax3 = bottom.subplots()
    if matched and wa is not None and wb is not None:
        ax3.imshow(pairs_mosaic(wa, wb, match["b_for_a"]), interpolation="nearest")
        cell_h, cell_w = mosaic_cell(wa.shape[2], wa.shape[3])
        for i, (j, s) in enumerate(zip(match["b_for_a"], match["similarity"], strict=True)):
            r, c = divmod(i, MOSAIC_COLS)
            ty, tx = r * cell_h + wa.shape[2] + 1, c * cell_w + cell_w / 2
            ax3.text(tx, ty, f"{i}~{j} {s:.2f}", ha="center", va="top", fontsize=5.5)
        ax3.set_title(
            f"conv1: each filter of a (left) beside its matched filter of b (right); "
            f"mean cosine {match['mean_similarity']:.3f} (unmatched {match['unmatched_mean_similarity']:.3f})",
            fontsize=9,
        )
    else:
        ax3.text(0.5, 0.5, match.get("note", "conv1 filters not comparable"), ha="center", va="center")
    ax3.axis("off")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
