"""Bid-Up: fixed-grid coordinate refinement of Q with L R held fixed (Paper A, Alg. 4).

Objective, for fixed low-rank term and the grid fitted earlier (never re-fitted):

    f(Q) = tr((W̃ − Q)ᵀ H_λ (W̃ − Q)),   W̃ = W − L R,  H_λ = H + λI.

It separates over output columns, and as a function of the one entry ``q_ij`` it is a convex parabola with
curvature ``(H_λ)_ii`` and minimiser ``t_ij = q_ij + G_ij / (H_λ)_ii``, where ``G = H_λ (W̃ − Q)`` is the
current (negative half) gradient. The grid is a clipped arithmetic progression, so the grid point nearest
``t_ij`` — round-to-nearest with clipping — is the exact minimiser over the alphabet. Setting a whole row i
at once is therefore an exact block-coordinate step: f never increases. After the row changes by Δ,
``G ← G − H_λ[:, i] Δ``.

The sweep is blocked like GPTQ's: inside a block of B rows the gradient rows of the block get rank-1
updates; after the block one matmul updates every row's gradient. Visiting order is a free choice
(monotonicity holds for any): ``forward``, ``backward`` or ``both`` (forward then backward).

Deflated variant (ALGORITHMS.md §A.3 "practical caution", behind a flag): with L fixed, minimise over (Q, R)
jointly by running the same step on the Schur complement ``H_S = H_λ − H_λ L (Lᵀ H_λ L)⁻¹ Lᵀ H_λ`` with target
W, then ``R = (Lᵀ H_λ L)⁻¹ Lᵀ H_λ (W − Q)``. Since R is re-optimised implicitly, the step sees directions
that literal Bid-Up (which holds R fixed) cannot, and it is still monotone.

Lingo:
  Hd (d_in, d_in)   the Hessian of the objective being descended (H_λ, or H_S for the deflated variant)
  G (d_in, d_out)   Hd (W̃ − Q)
  row_group (d_in,) which group's (scale, zero) each row uses

References:
  Zhang & Saab, "GPTQ-intrinsic LoRA", arXiv:2606.01412, Alg. 4 (Bid-Up) and the refinement loops.
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant import linalg
from gilora_jax.quant.grid import Grid, GridSpec
from gilora_jax.quant.linalg import HIGHEST


def _forward_sweep(Wt, codes, Hd, grid: Grid, row_group, spec: GridSpec, block_size: int):
  """One forward pass over the rows; returns the new float codes."""
  d_in, d_out = Wt.shape
  B = max(1, min(block_size, d_in))
  n = -(-d_in // B) * B
  pad = n - d_in
  scales, zeros = grid.scales[row_group], grid.zeros[row_group]  # (d_in, d_out)
  Q = grid_lib.dequantize_rows(codes, scales, zeros)
  G = jnp.matmul(Hd, Wt - Q, precision=HIGHEST)
  h = jnp.diagonal(Hd)
  # A coordinate whose curvature vanishes (possible for the singular deflated Hessian) cannot lower f: keep it.
  active = h > 1e-7 * jnp.max(h)
  if pad:  # padding rows: inactive, no coupling
    codes, scales, zeros, G = (jnp.pad(a, ((0, pad), (0, 0))) for a in (codes, scales, zeros, G))
    Hd = jnp.pad(Hd, ((0, pad), (0, pad)))
    h, active = jnp.pad(h, (0, pad), constant_values=1.0), jnp.pad(active, (0, pad))

  def block(G, i1):
    Gb = lax.dynamic_slice_in_dim(G, i1, B)
    cb, sb, zb = (lax.dynamic_slice_in_dim(a, i1, B) for a in (codes, scales, zeros))
    Hb = lax.dynamic_slice(Hd, (i1, i1), (B, B))
    hb, ab = lax.dynamic_slice_in_dim(h, i1, B), lax.dynamic_slice_in_dim(active, i1, B)

    def row(Gb, j):
      q = grid_lib.dequantize_rows(cb[j], sb[j], zb[j])
      t = q + Gb[j] / hb[j]
      c = jnp.where(ab[j], grid_lib.quantize_rows(t, sb[j], zb[j], spec.maxq), cb[j])
      delta = grid_lib.dequantize_rows(c, sb[j], zb[j]) - q
      return Gb - Hb[:, j][:, None] * delta[None, :], (c, delta)

    _, (c, delta) = lax.scan(row, Gb, jnp.arange(B))
    H_cols = lax.dynamic_slice_in_dim(Hd, i1, B, axis=1)  # (n, B)
    return G - jnp.matmul(H_cols, delta, precision=HIGHEST), c

  _, c = lax.scan(block, G, jnp.arange(0, n, B))
  return c.reshape(n, d_out)[:d_in]


def bidup(
    W_target: jax.Array,
    codes: jax.Array,
    grid: Grid,
    Hd: jax.Array,
    spec: GridSpec,
    *,
    row_group: jax.Array | None = None,
    order: str = "forward",
    block_size: int = 128,
) -> jax.Array:
  """One Bid-Up sweep: every row of Q moved to the grid point minimising f with all other rows fixed.

  Args:
    W_target: (d_in, d_out) the target W̃ (``W − L R`` for literal Bid-Up, W for the deflated variant).
    codes: (d_in, d_out) current codes (uint8 or float).
    grid: the fixed grid of Q.
    Hd: (d_in, d_in) Hessian of the objective (damped H, or the deflated ``H_S``).
    spec: grid description.
    row_group: (d_in,) group of each row (default contiguous).
    order: ``"forward"``, ``"backward"`` or ``"both"``.
    block_size: rows per lazy gradient update (does not change the result).

  Returns:
    New (d_in, d_out) uint8 codes with ``f(new) ≤ f(old)``.
  """
  d_in = W_target.shape[0]
  dtype = jnp.promote_types(W_target.dtype, jnp.float32)
  row_group = grid_lib.contiguous_row_group(d_in, spec) if row_group is None else row_group
  c = codes.astype(dtype)
  Wt, Hd = W_target.astype(dtype), Hd.astype(dtype)
  if order not in ("forward", "backward", "both"):
    raise ValueError(f"order={order!r} is unknown; use 'forward', 'backward' or 'both'.")
  if order in ("forward", "both"):
    c = _forward_sweep(Wt, c, Hd, grid, row_group, spec, block_size)
  if order in ("backward", "both"):
    rev = slice(None, None, -1)
    c = _forward_sweep(Wt[rev], c[rev], Hd[rev, rev], grid, row_group[rev], spec, block_size)[rev]
  return c.astype(jnp.uint8)


def deflated_hessian(Hd: jax.Array, L: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``H_S = Hd − Hd L (Lᵀ Hd L)⁻¹ Lᵀ Hd`` and the ridge map ``P = (Lᵀ Hd L)⁻¹ Lᵀ Hd`` (so R = P (W − Q))."""
  HL = jnp.matmul(Hd, L, precision=HIGHEST)
  P = jnp.linalg.solve(linalg.tn(L, HL), HL.T)
  HS = Hd - jnp.matmul(HL, P, precision=HIGHEST)
  return 0.5 * (HS + HS.T), P
