"""A dependency-free PNG line/scatter plot (NumPy + zlib), for the per-layer error figure of a quantization run.

`error_plot(records)` draws, against the layer index (in quantization order), on a log10 y axis:
  grey   rel_err of Q alone (before any compensation)
  blue   final rel_err (after the method's low-rank term and refinement)
  red    Paper A's upper bound
with tick labels on both axes and a legend, in a 3×5 pixel font scaled ×2. matplotlib is deliberately not a
dependency.
"""
from __future__ import annotations

import struct
import zlib
from typing import Sequence

import numpy as np

# 3×5 glyphs, rows top to bottom separated by "|", '#' = ink.
_FONT = {
    "0": "###|# #|# #|# #|###", "1": " # |## | # | # |###", "2": "###|  #|###|#  |###", "3": "###|  #|###|  #|###",
    "4": "# #|# #|###|  #|  #", "5": "###|#  |###|  #|###", "6": "###|#  |###|# #|###", "7": "###|  #|  #|  #|  #",
    "8": "###|# #|###|# #|###", "9": "###|# #|###|  #|###", ".": "   |   |   |   | # ", "-": "   |   |###|   |   ",
    "A": " # |# #|###|# #|# #", "B": "## |# #|## |# #|## ", "D": "## |# #|# #|# #|## ", "E": "###|#  |## |#  |###",
    "F": "###|#  |## |#  |#  ", "G": "###|#  |# #|# #|###", "I": "###| # | # | # |###", "L": "#  |#  |#  |#  |###",
    "N": "# #|###|###|# #|# #", "O": " # |# #|# #|# #| # ", "P": "## |# #|## |#  |#  ", "Q": " # |# #|# #|## | ##",
    "R": "## |# #|## |# #|# #", "S": " ##|#  | # |  #|## ", "T": "###| # | # | # | # ", "U": "# #|# #|# #|# #|###",
    "X": "# #|# #| # |# #|# #", "Y": "# #|# #| # | # | # ", "Z": "###|  #| # |#  |###", " ": "   |   |   |   |   ",
}
_SCALE = 2
COLORS = {"quantized": (150, 150, 150), "final": (31, 90, 200), "bound": (210, 40, 40)}


def _glyph(ch: str) -> np.ndarray:
  g = np.array([[c == "#" for c in row] for row in _FONT.get(ch.upper(), _FONT[" "]).split("|")])
  return np.kron(g, np.ones((_SCALE, _SCALE), bool))


def _text(img: np.ndarray, x: int, y: int, s: str, color=(0, 0, 0), anchor: str = "left") -> None:
  w = len(s) * 4 * _SCALE
  x = x - w if anchor == "right" else x - w // 2 if anchor == "center" else x
  for i, ch in enumerate(s):
    g = _glyph(ch)
    x0, y0 = x + i * 4 * _SCALE, y
    sub = img[y0:y0 + g.shape[0], x0:x0 + g.shape[1]]
    sub[g[:sub.shape[0], :sub.shape[1]]] = color


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
  n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
  xs = np.rint(np.linspace(x0, x1, n)).astype(int)
  ys = np.rint(np.linspace(y0, y1, n)).astype(int)
  ok = (xs >= 0) & (xs < img.shape[1]) & (ys >= 0) & (ys < img.shape[0])
  img[ys[ok], xs[ok]] = color


def _dot(img: np.ndarray, x: float, y: float, color, r: int = 2) -> None:
  xi, yi = int(round(x)), int(round(y))
  img[max(yi - r, 0):yi + r + 1, max(xi - r, 0):xi + r + 1] = color


def encode_png(img: np.ndarray) -> bytes:
  """(H, W, 3) uint8 -> PNG bytes (8-bit RGB, filter 0 on every row)."""
  h, w, _ = img.shape
  raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def line_plot(series: dict[str, Sequence[float]], colors: dict[str, tuple[int, int, int]], *, xlabel: str,
              ylabel: str, width: int = 720, height: int = 420) -> np.ndarray:
  """Log-y line plot of equally long series against their index; returns an (H, W, 3) uint8 image."""
  img = np.full((height, width, 3), 255, np.uint8)
  left, right, top, bottom = 90, 20, 50, 50
  pw, ph = width - left - right, height - top - bottom
  vals = np.concatenate([np.asarray(v, float) for v in series.values()])
  vals = vals[np.isfinite(vals) & (vals > 0)]
  lo, hi = (np.floor(np.log10(vals.min())), np.ceil(np.log10(vals.max()))) if vals.size else (-3.0, 0.0)
  hi = max(hi, lo + 1)
  n = max(len(next(iter(series.values()))), 2)

  def px(i):
    return left + pw * i / (n - 1)

  def py(v):
    return top + ph * (hi - np.log10(v)) / (hi - lo)
  for e in np.arange(lo, hi + 1):  # y ticks at every decade, grid lines in light grey
    y = py(10.0 ** e)
    _line(img, left, y, left + pw, y, (225, 225, 225))
    _line(img, left - 5, y, left, y, (0, 0, 0))
    _text(img, left - 8, int(y) - 5, f"1E{int(e)}", anchor="right")
  step = max(1, int(np.ceil((n - 1) / 10)))
  for i in range(0, n, step):  # x ticks
    _line(img, px(i), top + ph, px(i), top + ph + 5, (0, 0, 0))
    _text(img, int(px(i)), top + ph + 9, str(i), anchor="center")
  _line(img, left, top, left, top + ph, (0, 0, 0))
  _line(img, left, top + ph, left + pw, top + ph, (0, 0, 0))
  _text(img, left + pw // 2, height - 18, xlabel, anchor="center")
  _text(img, 6, 12, ylabel)
  for name, v in series.items():
    v = np.asarray(v, float)
    pts = [(px(i), py(x)) for i, x in enumerate(v) if np.isfinite(x) and x > 0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
      _line(img, x0, y0, x1, y1, colors[name])
    for x, y in pts:
      _dot(img, x, y, colors[name])
  lx = left + pw - 150  # legend, top right
  for k, name in enumerate(series):
    _dot(img, lx, 10 + 13 * k, colors[name], r=4)
    _text(img, lx + 10, 5 + 13 * k, name, colors[name])
  return img


def error_plot(records: Sequence[dict]) -> bytes:
  """PNG bytes of per-layer rel_err (Q alone, final) and the upper bound (records from `apply.LayerRecord`)."""
  def col(key):
    return [np.nan if r.get(key) is None else r[key] for r in records]
  series = {"quantized": col("rel_err_quantized"), "final": col("rel_err"), "bound": col("upper_bound")}
  return encode_png(line_plot(series, COLORS, xlabel="LAYER", ylabel="REL ERR"))
