"""The per-layer error figure of a quantization run (matplotlib, no GUI backend and no global pyplot state).

`error_plot(records)` draws, against the layers in quantization order, on a log y axis:
  grey   rel_err of Q alone (before any compensation)
  blue   final rel_err (after the method's low-rank term and refinement)
  red    Paper A's upper bound (where the records carry one)
with the layers' names under the x axis (thinned to stay legible) and block boundaries as light vertical lines.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

COLORS = {"quantized": "#969696", "final": "#1f5ac8", "bound": "#d22828"}
LABELS = {"quantized": "Q alone", "final": "final (Q + LR)", "bound": "upper bound (Cor. 3.9)"}
_KEYS = {"quantized": "rel_err_quantized", "final": "rel_err", "bound": "upper_bound"}


def error_plot(records: Sequence[dict], *, title: str | None = None, dpi: int = 110) -> bytes:
  """PNG bytes of the per-layer errors of `records` (dicts of `apply.LayerRecord` fields)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  n = len(records)
  fig = Figure(figsize=(max(6.4, min(24.0, 0.12 * n + 4)), 4.2), dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  x = np.arange(n)
  for name, key in _KEYS.items():
    y = np.array([np.nan if r.get(key) is None else r[key] for r in records], float)
    y[~(y > 0)] = np.nan  # a log axis shows positive values only
    if np.isfinite(y).any():
      ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, color=COLORS[name], label=LABELS[name])
  blocks = [r.get("block") for r in records]
  for i in range(1, n):
    if blocks[i] != blocks[i - 1]:
      ax.axvline(i - 0.5, color="#e6e6e6", linewidth=0.8, zorder=0)
  ax.set_yscale("log")
  ax.set_xlabel("layer (quantization order)")
  ax.set_ylabel("relative output error  tr(EᵀHE) / tr(WᵀHW)")
  step = max(1, int(np.ceil(n / 40)))
  ax.set_xticks(x[::step], [str(r.get("path", i)) for i, r in enumerate(records)][::step], rotation=90, fontsize=6)
  ax.grid(True, which="major", axis="y", color="#eeeeee")
  return _finish(fig, ax, title)


def curves_plot(curves: Sequence[dict], *, title: str | None = None, dpi: int = 110) -> bytes:
  """PNG bytes of a fine-tune's curves (`finetune.train`'s rows): the training loss and the held-apart loss
  against the step (left), and the learning rate (right)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(9.6, 3.8), dpi=dpi)
  FigureCanvasAgg(fig)
  ax, ax_lr = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
  train = [(c["step"], c["loss"]) for c in curves if "loss" in c]
  held = [(c["step"], c["eval_loss"]) for c in curves if "eval_loss" in c]
  if train:
    ax.plot(*zip(*train), color=COLORS["final"], linewidth=1.0, label="train loss")
  if held:
    ax.plot(*zip(*held), color=COLORS["bound"], marker="o", markersize=3, linewidth=1.2, label="held-apart loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(True, color="#eeeeee")
  lr = [(c["step"], c["lr"]) for c in curves if "lr" in c]
  if lr:
    ax_lr.plot(*zip(*lr), color=COLORS["quantized"])
  ax_lr.set_xlabel("step")
  ax_lr.set_ylabel("learning rate")
  return _finish(fig, ax, title)


def _finish(fig, ax, title: str | None) -> bytes:
  """The legend (when anything is labelled) and title on `ax`, the layout, and the figure as PNG bytes."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc="best", fontsize=8)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()
