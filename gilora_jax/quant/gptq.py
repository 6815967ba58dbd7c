"""The GPTQ rounding sweep over the input rows of W, as nested ``lax.scan``s with lazy batched updates.

Objective. For fixed damped Hessian ``H_λ`` GPTQ visits the input rows t = 0 … d_in − 1 once, rounds row t to
its grid, and re-optimises every later row to absorb the error (the Optimal Brain Surgeon step). With
``U`` the upper Cholesky factor of ``H_λ⁻¹`` the reference writes it as

    q_t = Quant(w̃_t),   err_t = (w̃_t − q_t) / U_tt,   w̃_s −= U_ts · err_t   (s > t).

Unrolling that recurrence (``W − Q = Uᵀ Err``) and writing ``T = U⁻¹`` (upper, ``T Tᵀ = H_λ``) gives the
equivalent, inverse-free form used here:

    w̃_t = w_t + Σ_{s<t} (T_st / T_tt) · (w_s − q_s),

i.e. every row is its original value plus a fixed linear combination of the *final* rounding residuals
``D_s = w_s − q_s`` of the rows before it. The codes are the reference's (same arithmetic up to round-off;
tests compare against a float64 NumPy port of IST-DASLab ``fasterquant``), but the factor is one Cholesky.

Blocking. Rows are processed in blocks of B: inside a block a ``lax.scan`` applies the rank-1 updates to the
block's own rows; after the block one matmul adds its residuals to every later row ("lazy batch"). The rows
are further cut into a few static segments so the lazy update touches only the rows after the block, not the
whole matrix (≈ d_in² d_out flops instead of 2×). The result does not depend on B.

Group-wise grids are fitted *lazily*, when their first row a is reached, on the group's rows as the OBS
updates of rows < a leave them (what the reference sees when group_size divides block_size; its
block_size > group_size case, which fits later groups of a block on stale rows, is not reproduced: results
here never depend on the block size). The inverse-free recurrence carries different partial sums than the
reference's, so those rows are recovered exactly as ``w_g + T_ggᵀ⁻¹ diag(T_gg) (w̃_g − w_g)`` (a g×g
triangular solve per group; derivation in ``_obs_rows``). Per-channel grids and act-order's static groups are
fixed up front and passed in.

Lingo:
  W (d_in, d_out)   weights (rows = input features), already permuted for act-order
  T (d_in, d_in)    upper-triangular, T Tᵀ = H_λ (``hessian.factor``), in the same row order
  M (d_in, d_in)    strict upper part of T with columns scaled by 1 / diag(T): w̃ = w + Mᵀ D
  D (d_in, d_out)   rounding residuals w − q of the original rows

References:
  Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
  arXiv:2210.17323, Alg. 1; github.com/IST-DASLab/gptq (gptq.py, fasterquant).
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant.grid import Grid, QuantGrid

HIGHEST = lax.Precision.HIGHEST


def effective_block_size(spec: QuantGrid, block_size: int, lazy: bool) -> int:
  """The block actually used: with lazily fitted groups it must nest with the group size."""
  if not lazy or spec.group_size is None:
    return max(1, block_size)
  g = spec.group_size
  if g <= block_size:
    return g * (block_size // g)
  return max(b for b in range(1, block_size + 1) if g % b == 0)


def _segments(n_units: int, num_segments: int) -> list[tuple[int, int]]:
  """Splits ``n_units`` into at most ``num_segments`` contiguous, nearly equal (start, stop) unit ranges."""
  k = max(1, min(num_segments, n_units))
  edges = [round(i * n_units / k) for i in range(k + 1)]
  return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _obs_rows(Wt_g: jax.Array, W0_g: jax.Array, T_gg: jax.Array) -> jax.Array:
  """Rows a..a+g as re-optimised by OBS after rows < a are fixed (the reference's in-sweep values).

  With rows S = {< a} fixed at Q_S and residual D_S = W_S − Q_S, the optimal remaining rows R = {≥ a} are
  ``W_R + H_RR⁻¹ H_RS D_S``. For ``H = T Tᵀ`` (T upper) ``H_RR = T_RR T_RRᵀ`` and ``H_RS = T_RR T_SRᵀ``, so
  the update is ``T_RR⁻ᵀ T_SRᵀ D_S``; its first g rows need only the leading g×g block ``T_gg`` (a lower
  triangular ``T_RRᵀ`` has a lower-triangular inverse). The carried targets hold
  ``w̃_g = W_g + diag(T_gg)⁻¹ T_Sgᵀ D_S``, hence ``T_Sgᵀ D_S = diag(T_gg)(w̃_g − W_g)``.
  """
  Y = jnp.diagonal(T_gg)[:, None] * (Wt_g - W0_g)
  return W0_g + jax.scipy.linalg.solve_triangular(T_gg, Y, trans="T", lower=False)


def gptq(
    W: jax.Array,
    T: jax.Array,
    spec: QuantGrid,
    *,
    grid: Grid | None = None,
    row_group: jax.Array | None = None,
    block_size: int = 128,
    num_segments: int = 4,
) -> tuple[jax.Array, Grid, jax.Array]:
  """GPTQ codes for W given the triangular factor T of its damped Hessian.

  Args:
    W: (d_in, d_out) weights, in sweep order.
    T: (d_in, d_in) upper-triangular with ``T Tᵀ = H_λ`` (``hessian.factor``), same order as W.
    spec: grid description.
    grid: a fixed grid (G, d_out), e.g. per-channel params fitted on the original W, or act-order's static
      groups; ``None`` fits per-channel grids on W up front, or group grids lazily during the sweep.
    row_group: (d_in,) int32, the group each row of W reads from ``grid`` (default ``t // group_size``).
    block_size: rows per lazy-batch block (does not change the result).
    num_segments: static row segments bounding the lazy update's wasted work (does not change the result).

  Returns:
    ``(codes, grid, Q)``: (d_in, d_out) uint8 codes, the grid used (G, d_out), and the dequantized Q.

  Example:
    >>> W = jnp.array([[0.3, -1.0], [0.7, 0.2], [-0.4, 0.9]])
    >>> from gilora_jax.quant import hessian
    >>> T = hessian.factor(jnp.eye(3))         # H = I: no error feedback, GPTQ reduces to RTN
    >>> codes, g, Q = gptq(W, T, QuantGrid(bits=2))
  """
  d_in, d_out = W.shape
  dtype = jnp.promote_types(W.dtype, jnp.float32)  # float32, or float64 under jax_enable_x64
  W = W.astype(dtype)
  T = T.astype(dtype)
  lazy = grid is None and spec.group_size is not None
  if grid is None and not lazy:
    grid = grid_lib.fit_grid(W, spec)
  if not lazy and row_group is None:
    row_group = grid_lib.contiguous_row_group(d_in, spec)
  B = effective_block_size(spec, block_size, lazy)
  g = spec.group_size
  unit = g if (lazy and g > B) else B
  n_units = -(-d_in // unit)
  n = n_units * unit
  pad = n - d_in
  maxq = spec.maxq

  # Padding rows: zero weights, identity Hessian block (no coupling), so they round to 0 and change nothing.
  if pad:
    W = jnp.pad(W, ((0, pad), (0, 0)))
    T = jnp.pad(T, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n) >= d_in).astype(T.dtype)
  M = jnp.triu(T, k=1) / jnp.diagonal(T)[None, :]
  if pad:
    if not lazy:
      row_group = jnp.pad(row_group, (0, pad))  # group 0's grid contains 0, so zero rows round to zero

  ones = jnp.ones((d_out,), dtype)
  W0 = W
  Wt = W  # current targets w̃ (original + residual feedback received so far)
  out_codes, out_scale, out_zero = [], [], []
  for ua, ub in _segments(n_units, num_segments):
    a, b = ua * unit, ub * unit
    M_seg, T_seg = M[a:b, a:b], T[a:b, a:b]
    W0_seg = W0[a:b]

    def block(carry, i1, M_seg=M_seg, T_seg=T_seg, W0_seg=W0_seg, a=a):
      Wt_seg, cur = carry
      Wb = lax.dynamic_slice_in_dim(Wt_seg, i1, B)
      W0b = lax.dynamic_slice_in_dim(W0_seg, i1, B)
      Mb = lax.dynamic_slice(M_seg, (i1, i1), (B, B))
      Tb = lax.dynamic_slice(T_seg, (i1, i1), (B, B))
      if lazy and g > B:  # a group spanning several blocks is fitted when its first block starts
        fit = lambda: grid_lib.fit_columns(_obs_rows(  # pylint: disable=g-long-lambda
            lax.dynamic_slice_in_dim(Wt_seg, i1, g), lax.dynamic_slice_in_dim(W0_seg, i1, g),
            lax.dynamic_slice(T_seg, (i1, i1), (g, g))), spec)
        cur = lax.cond((a + i1) % g == 0, fit, lambda: cur)

      def row(carry, j):
        Wb, cur = carry
        if lazy and g <= B:  # a group inside this block is fitted when its first row is reached
          fit = lambda: grid_lib.fit_columns(_obs_rows(  # pylint: disable=g-long-lambda
              lax.dynamic_slice_in_dim(Wb, j, g), lax.dynamic_slice_in_dim(W0b, j, g),
              lax.dynamic_slice(Tb, (j, j), (g, g))), spec)
          cur = lax.cond(j % g == 0, fit, lambda: cur)
        if lazy:
          scale, zero = cur
        else:
          k = row_group[a + i1 + j]
          scale, zero = grid.scales[k], grid.zeros[k]
        c = grid_lib.quantize_rows(Wb[j], scale, zero, maxq)
        D = W0b[j] - grid_lib.dequantize_rows(c, scale, zero)
        Wb = Wb + Mb[j][:, None] * D[None, :]  # Mb[j, :j+1] == 0: only later rows of the block move
        return (Wb, cur), (c, D, scale, zero)

      (_, cur), (c, D, scale, zero) = lax.scan(row, (Wb, cur), jnp.arange(B))
      # Lazy batch: rows after this block receive its residuals. M_seg rows i1..i1+B vanish left of column i1,
      # so only this block's (already final) rows and later rows change; the former are never read again.
      M_rows = lax.dynamic_slice_in_dim(M_seg, i1, B)
      Wt_seg = Wt_seg + jnp.matmul(M_rows.T, D, precision=HIGHEST)
      return (Wt_seg, cur), (c, D, scale, zero)

    (_, _), (c, D, scale, zero) = lax.scan(block, (Wt[a:b], (ones, ones)), jnp.arange(0, b - a, B))
    D = D.reshape(b - a, d_out)
    if b < n:  # rows after the segment receive its residuals in one matmul
      Wt = Wt.at[b:].add(jnp.matmul(M[a:b, b:].T, D, precision=HIGHEST))
    out_codes.append(c.reshape(b - a, d_out))
    out_scale.append(scale.reshape(b - a, d_out))
    out_zero.append(zero.reshape(b - a, d_out))

  codes = jnp.concatenate(out_codes)[:d_in]
  if lazy:
    grid = Grid(jnp.concatenate(out_scale)[:d_in:g], jnp.concatenate(out_zero)[:d_in:g])
    row_group = grid_lib.contiguous_row_group(d_in, spec)
  Q = grid_lib.dequantize(codes, grid, spec, row_group[:d_in])
  return codes.astype(jnp.uint8), grid, Q
