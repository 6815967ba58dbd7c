"""The fast GPTQ sweep: the recurrence of ``gptq.reference`` blocked for the hardware (private; ``gptq.sweep``).

Blocking. The rows are cut into a few static segments, each segment into blocks of B, each block into
micro-blocks of b. A segment's rows first receive every earlier segment's residuals in one long-K matmul
(*left-looking*: ``Mt[seg, :start] @ D[:start]``, the shape CPUs and GPUs run fastest, ≈ d_in² d_out flops in
all); a block receives the earlier blocks of its segment the same way (the segment's blocks are unrolled, so
K is exactly the block's offset); a micro-block receives the earlier micro-blocks of its block the same way
(one ``b × B`` matmul, the not-yet-swept rows of the block's ``D`` still zero), and a ``lax.scan`` then rounds
its b (cache-resident) rows one by one with rank-1 updates, one elementwise kernel per row. Every level is
left-looking, so each matmul writes only the rows about to be swept. The result does not depend on B, b or the
segments (tests check this in float64).

Execution. ``sweep`` is a driver over jitted stages rather than one traced graph: one compiled ``_segment``
serves every segment of the same size (its start is a traced argument), where a single graph would compile
each segment's sweep anew (the first ``quantize_layer`` call on a 4096² layer, 4-bit g128, took 4.9–5.8 s
that way and 3.3–4.6 s this way in this project's runs on a 2-core CPU). The residuals go into one
(d_in, d_out) buffer that each segment's sweep updates in place
(donated), so the left-looking products read a prefix of it with no concatenation. ``Mt`` is never formed: the
long products read ``Tᵀ`` and scale their rows by ``1/diag(T)`` afterwards, and each segment forms its own
diagonal block. Under an outer ``jit`` (``vmap``, ``grad``) the stages are inlined and nothing changes.

Group-wise grids are fitted *lazily*, when their first row a is reached, on the group's rows as the OBS
updates of rows < a leave them (what the reference sees when group_size divides block_size; its
block_size > group_size case, which fits later groups of a block on stale rows, is not reproduced: results
here never depend on the block size). The inverse-free recurrence carries different partial sums than the
reference's, so those rows are recovered exactly as ``w_g + T_ggᵀ⁻¹ diag(T_gg) (w̃_g − w_g)`` (one g×g
matmul per group, with the maps formed before the sweep; derivation in ``_obs_maps``). Per-channel grids and
act-order's static groups are fixed up front and passed in.

Lingo:
  W (d_in, d_out)   weights (rows = input features), already permuted for act-order
  T (d_in, d_in)    upper-triangular, T Tᵀ = H_λ (``hessian.factor``), in the same row order; the sweep reads
                    its transpose Tt = Tᵀ (``hessian.factor(..., transpose=True)`` returns it without a copy)
  Mt (d_in, d_in)   strict lower part of Tᵀ with rows scaled by 1 / diag(T): w̃ = w + Mt D (formed only in
                    diagonal blocks)
  D (d_in, d_out)   rounding residuals w − q of the original rows

References:
  Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
  arXiv:2210.17323, Alg. 1; github.com/IST-DASLab/gptq (gptq.py, fasterquant).
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant.grid import Grid, GridSpec

from gilora_jax.quant.linalg import HIGHEST


def effective_block_size(spec: GridSpec, block_size: int, lazy: bool) -> int:
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


def _obs_maps(Tt: jax.Array, g: int) -> jax.Array:
  """Per group k, ``P_k = T_ggᵀ⁻¹ diag(T_gg)`` (G, g, g): the map from carried to OBS-current group rows.

  With rows S = {< a} fixed at Q_S and residual D_S = W_S − Q_S, the optimal remaining rows R = {≥ a} are
  ``W_R + H_RR⁻¹ H_RS D_S``. For ``H = T Tᵀ`` (T upper) ``H_RR = T_RR T_RRᵀ`` and ``H_RS = T_RR T_SRᵀ``, so
  the update is ``T_RR⁻ᵀ T_SRᵀ D_S``; its first g rows need only the leading g×g block ``T_gg`` (a lower
  triangular ``T_RRᵀ`` has a lower-triangular inverse). The carried targets hold
  ``w̃_g = W_g + diag(T_gg)⁻¹ T_Sgᵀ D_S``, hence the group's OBS-current rows are
  ``W_g + T_ggᵀ⁻¹ diag(T_gg) (w̃_g − W_g) = W_g + P_k (w̃_g − W_g)``. All P_k are formed once, before the
  sweep (a batch of small triangular solves), so the sweep applies each with one matmul. Reads ``Tt = Tᵀ``.
  """
  n = Tt.shape[0] // g
  # (G, g, g) diagonal blocks of T = Ttᵀ, as one gather (a stack of G slices compiles G kernels)
  blocks = jnp.diagonal(Tt.reshape(n, g, n, g), axis1=0, axis2=2).transpose(2, 1, 0)
  rhs = jnp.diagonal(blocks, axis1=1, axis2=2)[:, :, None] * jnp.eye(g, dtype=Tt.dtype)[None]
  return jax.vmap(lambda Tk, Bk: jax.scipy.linalg.solve_triangular(Tk, Bk, trans="T", lower=False))(blocks, rhs)


def _fit_group(Wt_g, W0_g, P, spec: GridSpec):
  """Grid of a group from its OBS-current rows; returns (scale, zero, first row as fitted)."""
  rows = W0_g + jnp.matmul(P, Wt_g - W0_g, precision=HIGHEST)
  scale, zero = grid_lib.fit_columns(rows, spec)
  return scale, zero, rows[0]


def _plan(d_in: int, spec: GridSpec, block_size: int, micro_block: int, lazy: bool):
  """Static layout of a sweep: (B, b, unit, n) = block, micro-block, segment unit and padded row count."""
  B = effective_block_size(spec, block_size, lazy)
  g = spec.group_size
  unit = g if (lazy and g > B) else B
  n = -(-d_in // unit) * unit
  b = math.gcd(micro_block, B)
  if lazy and g <= B:
    b = math.gcd(b, g)  # groups start on micro-block boundaries
  return B, b, unit, n


def _working(W, T, n: int, transposed: bool):
  """W and Tᵀ in the working dtype, padded to n rows; the arrays as given when they already are (no copy)."""
  dtype = jnp.promote_types(W.dtype, jnp.float32)  # float32, or float64 under jax_enable_x64
  if W.dtype == dtype and T.dtype == dtype and transposed and n == W.shape[0]:
    return W, T
  return _convert(W, T, n, transposed)


@functools.partial(jax.jit, static_argnames=("n", "transposed"))
def _convert(W, T, n: int, transposed: bool):
  d_in = W.shape[0]
  dtype = jnp.promote_types(W.dtype, jnp.float32)
  W = W.astype(dtype)
  Tt = T.astype(dtype) if transposed else T.astype(dtype).T  # the sweep reads Tᵀ row by row
  pad = n - d_in
  # Padding rows: zero weights, identity Hessian block (no coupling), so they round to 0 and change nothing.
  if pad:
    W = jnp.pad(W, ((0, pad), (0, 0)))
    Tt = jnp.pad(Tt, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n) >= d_in).astype(Tt.dtype)
  return W, Tt


@functools.partial(jax.jit, static_argnames=("spec", "lazy"))
def _prelude(Tt, spec: GridSpec, lazy: bool):
  """``1 / diag(T)`` and the groups' OBS maps (lazy grids only).

  ``Mᵀ = strict_tril(Tᵀ) diag(1/T)`` (w̃ = w + Mᵀ D) is never formed: off the diagonal blocks a left-looking
  product reads Tᵀ and scales its rows afterwards, and each segment forms its own diagonal block.
  """
  P_all = _obs_maps(Tt, spec.group_size) if lazy else None
  return 1 / jnp.diagonal(Tt), P_all


@functools.partial(jax.jit, static_argnames=("spec", "n"))
def _fixed_grid(W, grid, row_group, spec: GridSpec, n: int):
  """The grid given (or per-channel grids fitted on W) and the row → group map, padded to n rows."""
  d_in = W.shape[0]
  if grid is None:
    grid = grid_lib.fit_grid(W.astype(jnp.promote_types(W.dtype, jnp.float32)), spec)
  row_group = grid_lib.contiguous_row_group(d_in, spec) if row_group is None else row_group
  return grid, jnp.pad(row_group, (0, n - d_in))  # group 0's grid contains 0, so zero padding rows round to 0


@functools.partial(jax.jit, static_argnames=("sa", "sb"))
def _left(W0, Tt, tinv, D_all, sa: int, sb: int):
  """Left-looking: rows sa..sb of W plus the residuals of every row before sa, in one long-K matmul."""
  return W0[sa:sb] + tinv[sa:sb, None] * jnp.matmul(Tt[sa:sb, :sa], D_all[:sa], precision=HIGHEST)


@functools.partial(jax.jit, static_argnames=("spec", "B", "b", "lazy", "one_group"), donate_argnames=("D_all",))
def _segment(Wt_seg, W0, Tt, tinv, P_all, grid, row_group, D_all, sa, spec: GridSpec, B: int, b: int,
             lazy: bool, one_group: bool):
  """Sweeps the segment of rows sa .. sa + len(Wt_seg) (``Wt_seg``: their targets with every earlier segment's
  residuals applied): ``D_all`` with the segment's residuals written in (in place: the driver donates it), its
  codes and (lazy) group grids. Indices below are local to the segment.

  ``sa`` is traced, so one compilation serves every segment of the same size (the driver `sweep` calls it once
  per segment). The segment's blocks are unrolled, so a block reads exactly the earlier blocks of the segment
  (K = its offset) instead of a K = segment product masked by zeros. ``one_group``: a fixed grid whose groups
  are contiguous and hold whole micro-blocks (per-channel, or groups without act-order), so a micro-block reads
  one grid row instead of gathering one per row.
  """
  S, d_out = Wt_seg.shape
  g = spec.group_size
  W0_seg = lax.dynamic_slice_in_dim(W0, sa, S)
  Mt_seg = jnp.tril(lax.dynamic_slice(Tt, (sa, sa), (S, S)), k=-1) * lax.dynamic_slice_in_dim(tinv, sa, S)[:, None]
  P_seg = lax.dynamic_slice_in_dim(P_all, sa // g, S // g) if lazy else None
  row_group_seg = None if lazy else lax.dynamic_slice_in_dim(row_group, sa, S)
  maxq = spec.maxq
  dtype = Wt_seg.dtype
  ones = jnp.ones((d_out,), dtype)
  D_seg = jnp.zeros_like(W0_seg)  # residuals of this segment's rows so far, zero from row i1 on
  cur = (ones, ones, ones)
  outs_all = []
  for i1 in range(0, Wt_seg.shape[0], B):

    def current(rows, i1=i1):  # targets of `rows` rows from i1 on, with the residuals of rows 0..i1 applied
      if i1 == 0:
        return Wt_seg[:rows]
      return Wt_seg[i1:i1 + rows] + jnp.matmul(Mt_seg[i1:i1 + rows, :i1], D_seg[:i1], precision=HIGHEST)

    Wb = current(B)
    W0b = W0_seg[i1:i1 + B]
    Mbt = Mt_seg[i1:i1 + B, i1:i1 + B]
    if lazy and g > B and i1 % g == 0:  # a group spanning several blocks is fitted when its first block starts
      cur = _fit_group(current(g), W0_seg[i1:i1 + g], P_seg[i1 // g], spec)

    def rows_now(Dblk, r0, r, Wb=Wb, Mbt=Mbt):  # rows r0..r0+r of the block with its earlier rows' residuals
      if r == B:  # r0 == 0: nothing of this block swept yet
        return Wb
      Mr = lax.dynamic_slice_in_dim(Mbt, r0, r)
      return lax.dynamic_slice_in_dim(Wb, r0, r) + jnp.matmul(Mr, Dblk, precision=HIGHEST)

    def micro(Dblk, m0, cur, starts, i1=i1, W0b=W0b, Mbt=Mbt, rows_now=rows_now):
      Wm = rows_now(Dblk, m0, b)
      W0m = lax.dynamic_slice_in_dim(W0b, m0, b)
      Mmt = lax.dynamic_slice(Mbt, (m0, m0), (b, b))

      if lazy:
        scale, zero, first = cur
        scale_m, zero_m = scale[None, :], zero[None, :]  # one grid for the b rows
      elif one_group:  # the grid row of the group holding these b rows
        k = (sa + i1 + m0) // (spec.group_size or W0.shape[0])
        scale_m, zero_m = grid.scales[k][None], grid.zeros[k][None]
      else:  # the (b, d_out) grid rows of these b rows
        k = lax.dynamic_slice_in_dim(row_group_seg, i1 + m0, b)
        scale_m, zero_m = grid.scales[k], grid.zeros[k]
      rows = jnp.arange(b)[:, None]

      def row(Wm, j):
        # One elementwise kernel per row (XLA:CPU pays a few µs per kernel launch, and a sweep has d_in rows):
        # round row j, pass its residual to the later rows, and keep its code in row j, which is not read again.
        w = Wm[j]
        if lazy:
          # A group's first row is rounded as the very values its grid was fitted on (equal to w̃ up to
          # round-off): a symmetric grid puts its extreme entry exactly on a rounding tie, which must not flip.
          w = jnp.where(starts & (j == 0), first, w)
          s, z = scale, zero
        else:
          s, z = (scale_m[0], zero_m[0]) if one_group else (scale_m[j], zero_m[j])
        c = grid_lib.quantize_rows(w, s, z, maxq)
        D = W0m[j] - grid_lib.dequantize_rows(c, s, z)
        return jnp.where(rows == j, c[None, :], Wm + Mmt[:, j][:, None] * D[None, :]), None  # Mmt[:j+1, j] = 0

      c, _ = lax.scan(row, Wm, jnp.arange(b))  # row j of the carry ends as row j's codes
      D = W0m - grid_lib.dequantize_rows(c, scale_m, zero_m)
      return lax.dynamic_update_slice_in_dim(Dblk, D, m0, 0), c

    if lazy and g <= B:
      def group(Dblk, k0, i1=i1, W0b=W0b, rows_now=rows_now, micro=micro):
        # groups inside the block: fit at the group's first row, then its micro-blocks
        cur = _fit_group(rows_now(Dblk, k0, g), lax.dynamic_slice_in_dim(W0b, k0, g), P_seg[(i1 + k0) // g], spec)
        Dblk, c = lax.scan(lambda Dblk, m: micro(Dblk, k0 + m, cur, m == 0), Dblk, jnp.arange(0, g, b))
        return Dblk, (c, cur[0], cur[1])

      Dblk, outs = lax.scan(group, jnp.zeros_like(Wb), jnp.arange(0, B, g))
    else:
      starts = (i1 % g == 0) if lazy else False
      Dblk, c = lax.scan(lambda Dblk, m0, cur=cur, starts=starts, micro=micro: micro(
          Dblk, m0, cur, starts & (m0 == 0)), jnp.zeros_like(Wb), jnp.arange(0, B, b))
      outs = (c,) + ((cur[0][None], cur[1][None]) if lazy else ())
    # Lazy batch: later blocks of the segment read this block's residuals (left-looking, in `current`).
    D_seg = D_seg.at[i1:i1 + B].set(Dblk)
    outs_all.append(outs)
  codes = jnp.concatenate([o[0].reshape(-1, d_out) for o in outs_all]).astype(jnp.uint8)
  D_all = lax.dynamic_update_slice_in_dim(D_all, D_seg, sa, 0)
  if not lazy:
    return D_all, codes, None, None
  # one (scale, zero) per group (g ≤ B) or per block (g > B: a group spans g / B blocks)
  return (D_all, codes, jnp.concatenate([o[1].reshape(-1, d_out) for o in outs_all]),
          jnp.concatenate([o[2].reshape(-1, d_out) for o in outs_all]))


@functools.partial(jax.jit, static_argnames=("spec", "d_in", "step", "lazy"))
def _epilogue(codes, scales, zeros, grid, row_group, spec: GridSpec, d_in: int, step: int, lazy: bool):
  """Codes in (d_in, d_out), the grid (G, d_out) and the dequantized Q."""
  codes = jnp.concatenate(codes)[:d_in]
  if lazy:
    G = d_in // spec.group_size
    grid = Grid(jnp.concatenate(scales)[::step][:G], jnp.concatenate(zeros)[::step][:G])
    row_group = grid_lib.contiguous_row_group(d_in, spec)
  Q = grid_lib.dequantize(codes, grid, spec, row_group[:d_in])
  return codes, grid, Q


def sweep(
    W: jax.Array,
    T: jax.Array,
    spec: GridSpec,
    *,
    grid: Grid | None = None,
    row_group: jax.Array | None = None,
    block_size: int = 128,
    micro_block: int = 16,
    num_segments: int = 8,
    transposed: bool = False,
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
    micro_block: rows per micro-block, swept with rank-1 updates (does not change the result).
    num_segments: static row segments of the left-looking lazy update (does not change the result).
    transposed: T is given as its transpose ``Tᵀ`` (lower-triangular; ``hessian.factor(..., transpose=True)``),
      which saves a d_in² transposition.

  Returns:
    ``(codes, grid, Q)``: (d_in, d_out) uint8 codes, the grid used (G, d_out), and the dequantized Q.

  """
  d_in, d_out = W.shape
  lazy = grid is None and spec.group_size is not None
  B, b, unit, n = _plan(d_in, spec, block_size, micro_block, lazy)
  W0, Tt = _working(W, T, n, transposed)
  tinv, P_all = _prelude(Tt, spec, lazy)
  # Contiguous fixed groups that hold whole micro-blocks (padding rows clamp to the last group, whose grid,
  # like every grid, contains 0): one grid row per micro-block.
  one_group = not lazy and row_group is None and (spec.group_size is None or spec.group_size % b == 0)
  if not lazy:
    grid, row_group = _fixed_grid(W, grid, row_group, spec, n)
  g = spec.group_size

  # A driver, not one traced graph: the segments' sweeps share one compiled `_segment` (inside an outer jit
  # they are inlined, with the same result). Each segment first receives every earlier segment's residuals,
  # read from D_all, which each segment's sweep fills in place (rows past the segments done are never read).
  D_all = jnp.zeros_like(W0)
  codes, scales, zeros = [], [], []
  for ua, ub in _segments(n // unit, num_segments):
    sa, sb = ua * unit, ub * unit
    Wt_seg = W0[:sb] if sa == 0 else _left(W0, Tt, tinv, D_all, sa, sb)
    D_all, c, s, z = _segment(Wt_seg, W0, Tt, tinv, P_all, grid, row_group, D_all, jnp.int32(sa), spec, B, b,
                              lazy, one_group)
    codes.append(c)
    scales.append(s)
    zeros.append(z)
  step = 1 if (not lazy or g <= B) else g // B
  return _epilogue(tuple(codes), tuple(scales) if lazy else None, tuple(zeros) if lazy else None, grid,
                   None if lazy else row_group, spec, d_in, step, lazy)
