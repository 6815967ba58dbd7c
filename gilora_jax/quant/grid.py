"""Uniform b-bit quantization grids: fit, quantize, dequantize.

A grid maps each weight to one of ``2**bits`` evenly spaced levels ``scale · (c − zero)``,
``c ∈ {0, …, maxq}``. One (scale, zero) pair serves an output column (per-channel) or a group of
``group_size`` consecutive input rows of one output column (group-wise). The fit follows the reference
GPTQ quantizer (IST-DASLab/gptq ``quant.py``), so the grid always contains 0; Paper A's shrink factor β
scales the step after the zero point is placed (ALGORITHMS.md §A.2).

Lingo:
  W (d_in, d_out)            weight in the Flax-kernel orientation: rows = input features
  g = group_size             consecutive input rows sharing one (scale, zero) per column; None = all d_in
  scales, zeros (G, d_out)   one pair per (group, output column); G = d_in // g (1 per-channel)
  codes (d_in, d_out) uint8  integer levels in [0, maxq], maxq = 2**bits − 1
  row_group (d_in,) int32    which group each row reads its grid from (contiguous: t // g)

References:
  Frantar et al., "GPTQ", arXiv:2210.17323; reference code github.com/IST-DASLab/gptq (quant.py).
  Zhang & Saab, "GPTQ-intrinsic LoRA", arXiv:2606.01412 (shrink factor β, fixed grid).
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# The reference quantizer's clip search: shrink candidates p = 1 − i/_MSE_GRID, i < _MSE_MAXSHRINK·_MSE_GRID,
# scored by Σ|q − w|^_MSE_NORM per column (IST-DASLab quant.py defaults). We visit them coarse to fine: every
# _MSE_STRIDE-th candidate, then the _MSE_STRIDE − 1 on each side of each column's best (fit_columns).
_MSE_GRID = 100
_MSE_MAXSHRINK = 0.8
_MSE_NORM = 2.4
_MSE_STRIDE = 5


class OptionError(ValueError):
  """An option no computation can use, with the fix. ``str(e)`` reads ``name=value <problem>``; the CLI shows
  ``e.render(cli=True)``, which reads ``--name value <problem>``. ``{name}`` in the problem names the option the
  same way (so a message can say "use {name} ≤ 64")."""

  def __init__(self, name: str, value, problem: str):
    self.name, self.value, self.problem = name, value, problem
    super().__init__(self.render())

  def render(self, cli: bool = False) -> str:
    if cli:
      spelled = "--" + self.name.replace("_", "-")
      return f"{spelled} {self.value} {self.problem.format(name=spelled)}"
    return f"{self.name}={self.value!r} {self.problem.format(name=self.name)}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridSpec:
  """Static, hashable description of a uniform grid (safe as a ``jax.jit`` static argument).

  Attributes:
    bits: bit width, 2..8.
    group_size: consecutive input rows (along d_in) sharing one scale/zero per output column; ``None`` means
      per output channel (one group spanning all of d_in). Must divide d_in.
    symmetric: symmetric grid (zero point fixed at (maxq + 1) / 2, scale from max |w|) instead of min–max.
    shrink: β, the factor applied to the min–max step (Paper A uses 0.9 at 3 bits for Qwen3, 0.6–0.7 for DeiT).
    mse: search the clip ratio per column minimising Σ|q − w|^2.4 (the reference's ``mse=True``); overrides
      ``shrink``.
  """
  bits: int
  group_size: int | None = None
  symmetric: bool = False
  shrink: float = 1.0
  mse: bool = False

  @property
  def maxq(self) -> int:
    return 2**self.bits - 1

  def num_groups(self, d_in: int) -> int:
    return 1 if self.group_size is None else d_in // self.group_size

  def validate(self, d_in: int | None = None, where: str = "") -> None:
    """Raises ``OptionError`` (a ValueError) naming the fix when this grid cannot quantize a weight with
    ``d_in`` rows (``d_in=None``: the options alone). ``where`` names the layer in the message."""
    if not isinstance(self.bits, int) or isinstance(self.bits, bool):
      raise OptionError("bits", self.bits, f"must be a Python int from 2 to 8 (got {type(self.bits).__name__}; "
                        f"convert NumPy integers with int()).")
    if not 2 <= self.bits <= 8:
      raise OptionError("bits", self.bits, "is outside 2..8; choose an integer bit width from 2 to 8.")
    if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)):
      raise OptionError("group_size", self.group_size, f"must be a Python int or None (got "
                        f"{type(self.group_size).__name__}).")
    if self.group_size is not None and self.group_size <= 0:
      raise OptionError("group_size", self.group_size, "must be a positive integer (rows per grid), or unset for "
                        "per-channel grids.")
    if not (isinstance(self.shrink, (int, float)) and 0.0 < self.shrink <= 1.0):
      raise OptionError("shrink", self.shrink, "must lie in (0, 1]; it scales the min–max step (β in Paper A).")
    if d_in is not None and self.group_size is not None and d_in % self.group_size:
      divisors = [g for g in (32, 64, 128, 256) if d_in % g == 0]
      at = f" of {where}" if where else ""
      raise OptionError(
          "group_size", self.group_size, f"does not divide d_in={d_in}{at}; use a divisor of {d_in}"
          + (f" such as {divisors}" if divisors else "") + ", or leave {name} unset for per-channel grids.")


class Grid(NamedTuple):
  """Fitted grid parameters. Dequantized value of code c in group k, column j: scales[k, j] · (c − zeros[k, j])."""
  scales: jax.Array  # (G, d_out) float32, > 0
  zeros: jax.Array   # (G, d_out) float32, integer-valued in [0, maxq] (asymmetric) or (maxq + 1) / 2


def _minmax_params(xmin, xmax, spec: GridSpec, shrink):
  """Scale and zero point for per-column ranges [xmin, xmax] (already widened to contain 0)."""
  maxq = spec.maxq
  if spec.symmetric:
    xmax = jnp.maximum(-xmin, xmax)
    xmin = -xmax
  degenerate = (xmin == 0) & (xmax == 0)
  xmin = jnp.where(degenerate, -1.0, xmin)
  xmax = jnp.where(degenerate, 1.0, xmax)
  scale0 = (xmax - xmin) / maxq
  if spec.symmetric:
    zero = jnp.full_like(scale0, (maxq + 1) / 2)
  else:
    zero = jnp.round(-xmin / scale0)
  return shrink * scale0, zero


def _clip_score(WgT, p, xmin, xmax, spec: GridSpec):
  """``Σ_t |Q_p(w_t) − w_t|^2.4`` per column for per-column clip ratios ``p``, with the grid it scored.

  ``WgT`` is the group transposed, (d_out, rows): each column's rows contiguous, so the sum is over the minor
  axis. XLA:CPU reduces the major axis of a (rows, d_out) array at a stride of d_out, which for a fit of every
  group at once (rows 128, d_out · G columns) measured 4.4–6.6× slower (0.54–0.77 s against 0.12 s for 3 M
  weights, 24 candidates); per-channel fits were the same either way.
  The power is ``e² · exp(0.2 · log e²)``: XLA's ``pow`` is several times slower than an exp and a log on CPU
  (measured 5.6 ms against 1.5 ms on 576 × 1536), and this form is as accurate (relative 6e-7); e = 0 gives 0.
  """
  scale, zero = _minmax_params(p * xmin, p * xmax, spec, 1.0)
  s, z = scale[:, None], zero[:, None]
  e2 = (dequantize_rows(quantize_rows(WgT, s, z, spec.maxq), s, z) - WgT) ** 2
  return jnp.sum(e2 * jnp.exp((_MSE_NORM / 2 - 1) * jnp.log(e2)), axis=1), scale, zero


def fit_columns(Wg: jax.Array, spec: GridSpec, *, exhaustive: bool = False) -> tuple[jax.Array, jax.Array]:
  """Fits one (scale, zero) per column of ``Wg`` (the rows of one group).

  Asymmetric: ``xmin = min(min_t w_t, 0)``, ``xmax = max(max_t w_t, 0)``, ``s = β (xmax − xmin) / maxq``,
  ``z = round(−xmin · maxq / (xmax − xmin))``. Symmetric: ``xmax = max|w|``, ``xmin = −xmax``,
  ``z = (maxq + 1) / 2``. (The reference keeps ``xmin = 0`` for a symmetric column with no negative entry and
  so loses half its levels; here such a column gets the symmetric range like every other.) An all-zero column
  gets the range [−1, 1].

  With ``spec.mse`` the clip ratio is searched per column among the reference's candidates
  p ∈ {1, 0.99, …, 0.21}, scored by ``Σ_t |Q(w_t) − w_t|^2.4``. By default the search is coarse to fine: the 16
  ratios 1, 0.95, …, 0.25, then the 4 on each side of each column's best, 24 scored candidates instead of 80.
  On SmolLM2-135M's linears (blocks 0, 10, 20, 29; 2–4 bits; per-channel and groups of 64 and 128) it picks the
  exhaustive search's ratio for 98.5–99.99 % of the columns, and each layer's summed score is within 0.05 % of
  the exhaustive one's (0.13 % on the built-in LM's; ``benchmarks/clip_search.py``, BENCHMARKS.md).
  ``exhaustive=True`` scores all 80, as the reference does. Neither ever scores worse than the min–max grid
  (p = 1 is a candidate).

  Args:
    Wg: (rows, d_out) weights of one group.
    spec: the grid description.
    exhaustive: with ``spec.mse``, score every candidate ratio.

  Returns:
    ``(scale, zero)``, each (d_out,) float32.

  Example:
    >>> s, z = fit_columns(jnp.array([[-1.0, 0.0], [3.0, 2.0]]), GridSpec(bits=2))
    >>> s.tolist(), z.tolist() == [1.0, 0.0]
    ([1.3333333730697632, 0.6666666865348816], True)
  """
  WgT = Wg.astype(jnp.promote_types(Wg.dtype, jnp.float32)).T  # (d_out, rows): reductions over the minor axis
  xmin = jnp.minimum(WgT.min(axis=1), 0.0)
  xmax = jnp.maximum(WgT.max(axis=1), 0.0)
  if not spec.mse:
    return _minmax_params(xmin, xmax, spec, spec.shrink)
  n = int(_MSE_MAXSHRINK * _MSE_GRID)  # candidates i = 0..n−1, p = 1 − i/_MSE_GRID

  def candidate(best, i):  # i: (d_out,) candidate index per column, as float; ties keep the earlier (larger) p
    err, scale, zero = _clip_score(WgT, 1.0 - i / _MSE_GRID, xmin, xmax, spec)
    better = err < best[0]
    return tuple(jnp.where(better, new, old) for new, old in zip((err, scale, zero, i), best)), None

  d_out, dtype = WgT.shape[0], WgT.dtype
  init = (jnp.full(d_out, jnp.inf, dtype),) + _minmax_params(xmin, xmax, spec, 1.0) + (jnp.zeros(d_out, dtype),)
  stride = 1 if exhaustive else _MSE_STRIDE
  coarse = jnp.arange(0, n, stride, dtype=dtype)
  best, _ = lax.scan(lambda c, i: candidate(c, jnp.full(d_out, i, dtype)), init, coarse)
  if stride > 1:  # the stride − 1 neighbours on each side of each column's coarse best (cover every candidate)
    center = best[3]

    def fine(c, o):
      i = center + o
      new, _ = candidate(c, jnp.clip(i, 0, n - 1))
      inside = (i >= 0) & (i <= n - 1)
      return tuple(jnp.where(inside, a, b) for a, b in zip(new, c)), None

    offsets = jnp.array([o for o in range(-(stride - 1), stride) if o], dtype)
    best, _ = lax.scan(fine, best, offsets)
  return best[1], best[2]


def quantize_rows(w: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
  """Nearest grid level, ``clip(round(w / s) + z, 0, maxq)``, as float (exact small integers).

  Round half to even and a true division, as the reference, so codes match it bit for bit. Because the grid
  is a clipped arithmetic progression, this is also the minimiser of ``(w − s (c − z))²`` over the codes c.
  """
  return jnp.clip(jnp.round(w / scale) + zero, 0.0, maxq)


def dequantize_rows(c: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """``s · (c − z)``, broadcasting (d_out,) parameters over leading row axes."""
  return scale * (c - zero)


def contiguous_row_group(d_in: int, spec: GridSpec) -> jax.Array:
  """The (d_in,) group index ``t // g`` (all zeros per-channel)."""
  g = d_in if spec.group_size is None else spec.group_size
  return jnp.arange(d_in, dtype=jnp.int32) // g


def fit_grid(W: jax.Array, spec: GridSpec, *, exhaustive: bool = False) -> Grid:
  """Fits every group of ``W`` at once (round-to-nearest, or the *static* grid of GPTQ's static groups).

  Args:
    W: (d_in, d_out) weights.
    spec: the grid description; ``spec.group_size`` must divide d_in.
    exhaustive: with ``spec.mse``, score every candidate clip ratio (``fit_columns``).

  Returns:
    A ``Grid`` with (G, d_out) scales and zeros.
  """
  d_in, d_out = W.shape
  G = spec.num_groups(d_in)
  # Each group's columns side by side, (g, G·d_out): fit_columns works column by column, so this is one call.
  # (A vmap over the G groups compiles the clip search's scan about 10× slower on CPU, even for G = 1.)
  Wg = W.reshape(G, d_in // G, d_out).transpose(1, 0, 2).reshape(d_in // G, G * d_out)
  scales, zeros = fit_columns(Wg, spec, exhaustive=exhaustive)
  return Grid(scales.reshape(G, d_out), zeros.reshape(G, d_out))


def quantize(W: jax.Array, grid: Grid, spec: GridSpec, row_group: jax.Array | None = None) -> jax.Array:
  """Round-to-nearest codes of ``W`` on a fitted grid: (d_in, d_out) uint8."""
  row_group = contiguous_row_group(W.shape[0], spec) if row_group is None else row_group
  c = quantize_rows(W, grid.scales[row_group], grid.zeros[row_group], spec.maxq)
  return c.astype(jnp.uint8)


def dequantize(codes: jax.Array, grid: Grid, spec: GridSpec, row_group: jax.Array | None = None) -> jax.Array:
  """Float weights ``s · (c − z)`` of the codes: (d_in, d_out) float32."""
  row_group = contiguous_row_group(codes.shape[0], spec) if row_group is None else row_group
  return dequantize_rows(codes.astype(grid.scales.dtype), grid.scales[row_group], grid.zeros[row_group])


def rtn(W: jax.Array, spec: GridSpec) -> tuple[jax.Array, Grid]:
  """Round-to-nearest baseline: fit each group's grid on W, round every weight to its nearest level."""
  grid = fit_grid(W, spec)
  return quantize(W, grid, spec), grid


def rtn_dequantized(W: jax.Array, spec: GridSpec) -> tuple[jax.Array, Grid, jax.Array]:
  """``rtn`` plus the dequantized weights: ``(codes, grid, Q)``, the shape every quantizer of the library returns."""
  codes, grid = rtn(W, spec)
  return codes, grid, dequantize(codes, grid, spec)
