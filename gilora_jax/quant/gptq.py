"""GPTQ (Frantar et al., Alg. 1): round the input rows of W one by one, each time re-optimising the later rows.

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

Three faces, from the paper to the hardware:

* ``reference(W, T, spec)``: the recurrence above as one ``lax.scan`` over the rows (about 30 lines). Slow on
  wide layers; it documents the algorithm, and the fast sweep is tested to give its codes in float64.
* ``sweep(W, T, spec)``: the same codes from a blocked, left-looking driver (``_gptq_blocked``): long matmuls
  at the machine's matmul rate plus a short per-row kernel. Jittable and vmappable.
* ``gptq(W, H, spec, damp=...)``: from W and the calibration Hessian (an array or a prepared ``hessian.Site``):
  dead features, damping (escalated if the factor fails), act-order, the grids, then ``sweep``.

Group-wise grids are fitted *lazily* by default, when a group's first row is reached, on the group's rows as the
OBS updates of the earlier rows leave them; the inverse-free recurrence carries other partial sums than the
reference's, so those rows are recovered as ``w_g + T_ggᵀ⁻¹ diag(T_gg) (w̃_g − w_g)`` (``_gptq_blocked._obs_maps``).
Per-channel grids are fitted on W up front; ``static_groups`` (and act-order with groups) fit every group on W
up front too (the reference's ``static_groups``, llm-compressor's protocol).

Lingo:
  W (d_in, d_out)   weights (rows = input features)
  T (d_in, d_in)    upper-triangular, T Tᵀ = H_λ (``hessian.factor``); ``Tt`` its transpose
  D (d_in, d_out)   rounding residuals w − q of the original rows

References:
  Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
  arXiv:2210.17323, Alg. 1; github.com/IST-DASLab/gptq (gptq.py, fasterquant).
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant import hessian
from gilora_jax.quant._gptq_blocked import _obs_maps, effective_block_size, sweep
from gilora_jax.quant.grid import Grid, GridSpec

__all__ = ["GPTQResult", "effective_block_size", "gptq", "quantize_with_factor", "reference", "sweep"]


def reference(W: jax.Array, T: jax.Array, spec: GridSpec, *, grid: Grid | None = None,
              row_group: jax.Array | None = None) -> tuple[jax.Array, Grid, jax.Array]:
  """GPTQ's recurrence, one row per ``lax.scan`` step: ``(codes, grid, Q)`` as ``sweep`` returns them.

  Carries ``w̃`` for every row. Step t rounds row t (a group's first row: fit its grid first, on the OBS-current
  rows of the group), takes the residual ``D_t = w_t − q_t`` of the original row and adds ``(T_ts / T_tt) D_t``
  to each later row s — the rank-1 form of ``w̃_s = w_s + Σ_{t<s} (T_ts / T_ss) D_t`` (module docstring).

  Example:
    >>> W = jnp.array([[0.3, -1.0], [0.7, 0.2], [-0.4, 0.9]])
    >>> codes, g, Q = reference(W, hessian.factor(jnp.eye(3)), GridSpec(bits=2))  # H = I: RTN
    >>> codes.tolist()
    [[2, 0], [3, 2], [0, 3]]
  """
  d_in, d_out = W.shape
  g = spec.group_size
  lazy = grid is None and g is not None
  Mt = jnp.tril(T.T, k=-1) / jnp.diagonal(T)[:, None]  # Mt[s, t] = T_ts / T_ss: row s receives Mt[s, t] D_t
  if not lazy:
    grid = grid_lib.fit_grid(W, spec) if grid is None else grid
    row_group = grid_lib.contiguous_row_group(d_in, spec) if row_group is None else row_group
  P = _obs_maps(T.T, g) if lazy else None

  def step(carry, t):
    Wt, scale, zero = carry
    w = Wt[t]
    if lazy:  # a group's first row: its grid from the group's OBS-current rows, and the row rounded as fitted
      rows = lax.dynamic_slice_in_dim(W, t, g) + P[t // g] @ (lax.dynamic_slice_in_dim(Wt, t, g)
                                                              - lax.dynamic_slice_in_dim(W, t, g))
      start = t % g == 0
      fit = grid_lib.fit_columns(rows, spec)
      scale, zero = jnp.where(start, fit[0], scale), jnp.where(start, fit[1], zero)
      w = jnp.where(start, rows[0], w)
    else:
      scale, zero = grid.scales[row_group[t]], grid.zeros[row_group[t]]
    c = grid_lib.quantize_rows(w, scale, zero, spec.maxq)
    D = W[t] - grid_lib.dequantize_rows(c, scale, zero)
    return (Wt + Mt[:, t][:, None] * D[None, :], scale, zero), (c, scale, zero)

  ones = jnp.ones((d_out,), W.dtype)
  _, (codes, scales, zeros) = lax.scan(step, (W, ones, ones), jnp.arange(d_in))
  if lazy:
    grid, row_group = Grid(scales[::g], zeros[::g]), grid_lib.contiguous_row_group(d_in, spec)
  codes = codes.astype(jnp.uint8)
  return codes, grid, grid_lib.dequantize(codes, grid, spec, row_group)


class GPTQResult(NamedTuple):
  """``gptq``'s result: the layer's quantized part and the factor it was swept with."""
  codes: jax.Array         # (d_in, d_out) uint8, original row order
  grid: Grid               # (G, d_out) scales and zeros
  Q: jax.Array             # (d_in, d_out) dequantized codes
  factor: hessian.Factor   # the damped factor used (``factor.damp``: the damping after any escalation)


def gptq(W: jax.Array, H: jax.Array | hessian.Site, spec: GridSpec, *, damp: float = 0.01, act_order: bool = False,
         static_groups: bool = False, block_size: int = 128, factor: str = "cholesky") -> GPTQResult:
  """GPTQ of W under the calibration Hessian H (an array, or a ``hessian.prepare``-d site shared by its linears).

  Args:
    W: (d_in, d_out) weights.
    H: (d_in, d_in) ``XᵀX``, or a ``hessian.Site``.
    spec: the grid.
    damp: relative damping, ``λ = damp · mean diag H``; escalated ×10 (logged) while the factor fails.
    act_order: visit rows by decreasing ``H_ii`` (with groups, static groups fitted on W up front).
    static_groups: fit group grids on W up front instead of lazily.
    block_size: rows per lazy-batch block (never changes the result).
    factor: ``"cholesky"`` or ``"eigh"`` (``hessian.factor``).

  Returns:
    ``GPTQResult(codes, grid, Q, factor)``.
  """
  site = hessian.prepare(H, damp, method=factor)
  W = jnp.asarray(W, site.Hf.dtype)
  f = site.factor(damp, act_order=act_order, method=factor)
  codes, grid, Q = quantize_with_factor(site.zero_dead(W), f, spec, W_grid=W, static_groups=static_groups,
                                        block_size=block_size)
  return GPTQResult(codes, grid, Q, f)


def quantize_with_factor(W: jax.Array, f: hessian.Factor, spec: GridSpec, *, W_grid: jax.Array | None = None,
                         static_groups: bool = False, block_size: int = 128) -> tuple[jax.Array, Grid, jax.Array]:
  """The sweep of W (dead rows already zeroed) with a prepared factor, grids chosen as the reference does:
  lazily fitted groups, or grids fixed up front (per-channel ones on ``W_grid``, the weight as given; static
  groups on W); act-order's permutation undone on the way out. Returns ``(codes, grid, Q)``.

  Not jitted as a whole: ``sweep`` is a driver whose segments share one compiled kernel (a single traced graph
  would compile every segment separately); the steps around it are jitted on their own.
  """
  W_grid = W if W_grid is None else W_grid
  run = functools.partial(sweep, block_size=block_size, transposed=True)
  if spec.group_size is not None and not (f.perm is not None or static_groups):
    return run(W, f.Tt, spec)
  if f.perm is None:  # contiguous groups: the sweep reads one grid row per micro-block
    grid = _fixed_grid(W, W_grid, spec)
    codes, _, Q = run(W, f.Tt, spec, grid=grid)
    return codes, grid, Q
  grid, W_sweep, row_group = _fixed_grid_in_order(W, W_grid, f.perm, spec)
  codes, _, Q = run(W_sweep, f.Tt, spec, grid=grid, row_group=row_group)
  codes, Q = _unpermute(codes, Q, f.perm)
  return codes, grid, Q


@functools.partial(jax.jit, static_argnames=("spec",))
def _fixed_grid(W, W_grid, spec: GridSpec):
  """Grids fixed up front. As the reference: per-channel grids come from W as given, static group grids from W
  with dead rows zeroed."""
  return grid_lib.fit_grid(W_grid if spec.group_size is None else W, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _fixed_grid_in_order(W, W_grid, perm, spec: GridSpec):
  """Act-order's static grids (``_fixed_grid``), the rows in sweep order and the group each reads."""
  return _fixed_grid(W, W_grid, spec), W[perm], grid_lib.contiguous_row_group(W.shape[0], spec)[perm]


@jax.jit
def _unpermute(codes_p, Q_p, perm):
  return jnp.zeros_like(codes_p).at[perm].set(codes_p), jnp.zeros_like(Q_p).at[perm].set(Q_p)
