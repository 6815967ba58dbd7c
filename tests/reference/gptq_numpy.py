"""Float64 NumPy reference for GPTQ, with the semantics of the IST-DASLab reference (`quant.py` + `gptq.py`).

Written from the math (shared/PEERS.md §4.1, shared/ALGORITHMS.md §A.2-A.3), in the paper's orientation:

  W  (d_in, d_out)   = torch ``weight.T``; row i is input feature i, column j is output channel j.
  H  (d_in, d_in)    = XᵀX (any positive multiple: damping is relative, so the codes do not change).

The sweep visits the ROWS of W (input features). There is one grid per output column ("per-channel"), or one per
(group of ``group_size`` consecutive input rows, output column). Scales and zeros are laid out (n_groups, d_out),
with n_groups = 1 per-channel.

This module is a test oracle: slow, explicit, float64 throughout. Every IST quirk is kept on purpose and
documented where it happens:

* grid: 0 is always in the range; symmetric grids keep ``xmin = 0`` for an all-non-negative column
  (see `fit_grid`);
* the per-channel grid is fitted on W *before* dead features are zeroed (IST calls ``find_params`` before the
  dead-column fix); static-group grids are fitted *after* it;
* act-order uses a stable descending sort here. torch's ``argsort`` is not stable, so IST's order is only
  reproducible when diag(H) has distinct entries;
* non-static group grids are fitted on the *global* W at the start of each group. The global W lags behind
  the block copy by the in-block updates, so a group that starts inside a block is fitted on stale weights
  (see `gptq_reference`).
"""
import numpy as np


def fit_grid(W, bits, symmetric, shrink=1.0):
  """Min-max grid per column of ``W`` (rows = the values the grid must cover), IST `Quantizer.find_params`.

  Args:
    W: (rows, d_out) values; one grid per column.
    bits: bit width; codes lie in [0, 2**bits - 1].
    symmetric: symmetric grid with the zero point in the middle.
    shrink: β; multiplies the scale *after* the zero point is computed on the unshrunk range
      (zero = round(-xmin / scale0), scale = β · scale0), as in ALGORITHMS.md §A.2.

  Returns:
    (scale, zero), each (d_out,) float64. ``zero`` holds integers (as floats).

  Semantics (PEERS.md §4.1 items 1-3):
    xmin = min(colmin, 0), xmax = max(colmax, 0).
    asymmetric: scale = (xmax - xmin) / maxq, zero = round(-xmin / scale), half to even.
    symmetric:  xmax = max(|xmin|, xmax); only if xmin < 0 set xmin = -xmax; scale = (xmax - xmin) / maxq,
                zero = (maxq + 1) / 2.
                Quirk kept: a column with no negative entry keeps xmin = 0, so scale = xmax / maxq, and with
                zero = (maxq+1)/2 its largest values clip to code maxq, i.e. to (maxq-1)/2 · scale (7/15 · xmax
                at 4 bits).
                Even with negative entries, +xmax sits 7.5 steps up (4-bit) and clamps to 7 steps.
    a column that is all zeros gets xmin, xmax = -1, +1.
  """
  W = np.asarray(W, dtype=np.float64)
  if W.ndim == 1:
    W = W[:, None]
  maxq = 2**bits - 1
  xmin = np.minimum(W.min(axis=0), 0.0)
  xmax = np.maximum(W.max(axis=0), 0.0)
  if symmetric:
    xmax = np.maximum(np.abs(xmin), xmax)
    xmin = np.where(xmin < 0, -xmax, xmin)
  both_zero = (xmin == 0) & (xmax == 0)
  xmin = np.where(both_zero, -1.0, xmin)
  xmax = np.where(both_zero, 1.0, xmax)
  scale = (xmax - xmin) / maxq
  if symmetric:
    zero = np.full_like(scale, (maxq + 1) / 2)
  else:
    zero = np.round(-xmin / scale)  # np.round is half to even, as torch.round
  return shrink * scale, zero


def quantize(x, scale, zero, maxq):
  """Integer codes clip(round(x / scale) + zero, 0, maxq); a true division, as IST (not a reciprocal multiply)."""
  return np.clip(np.round(np.asarray(x, np.float64) / scale) + zero, 0, maxq)


def dequantize(codes, scale, zero):
  """scale · (codes - zero)."""
  return scale * (np.asarray(codes, np.float64) - zero)


def inverse_cholesky_upper(H):
  """Upper U with UᵀU = H⁻¹, the IST way: L = chol(H); H⁻¹ = L⁻ᵀL⁻¹ (cholesky_inverse); U = chol(H⁻¹)ᵀ."""
  L = np.linalg.cholesky(H)
  Linv = np.linalg.solve(L, np.eye(H.shape[0]))
  Hinv = Linv.T @ Linv
  Hinv = (Hinv + Hinv.T) / 2  # cholesky_inverse returns a symmetric matrix; gemm may not, to the last ulp
  return np.linalg.cholesky(Hinv).T


def gptq_reference(W, H, bits, *, group_size=None, symmetric=False, damp=0.01, block_size=128, act_order=False,
                   static_groups=False, shrink=1.0):
  """GPTQ (IST `GPTQ.fasterquant`) in float64, paper orientation.

  Args:
    W: (d_in, d_out) weights (torch ``weight.T``).
    H: (d_in, d_in) XᵀX, any positive scaling.
    bits: bit width.
    group_size: rows per group (None = one grid per output column, fitted once before the sweep).
    symmetric: symmetric grid (see `fit_grid`).
    damp: λ = damp · mean(diag H), added to the diagonal after the dead-feature fix.
    block_size: rows per lazy-batch block.
    act_order: visit rows by decreasing diag(H) (stable sort; torch's is not stable).
    static_groups: fit all group grids on the original W (after the dead fix) in natural order before the
      sweep; with act_order, row perm[k] uses group perm[k] // group_size.
    shrink: β of `fit_grid`.

  Returns:
    dict with
      codes  (d_in, d_out) int64 in [0, 2**bits - 1], natural row order;
      scales, zeros (n_groups, d_out) float64; n_groups = 1 per-channel, else ceil(d_in / group_size);
      g_idx  (d_in,) int64: the group (row of scales/zeros) used by each natural row. Without static groups
             and with act_order, groups are consecutive in *visiting* order, so g_idx[perm[k]] = k // group_size;
      Q      (d_in, d_out) float64 = scales[g_idx] · (codes - zeros[g_idx]);
      perm   (d_in,) visiting order (identity without act_order);
      W_swept (d_in, d_out): each row's value at the moment it was quantized (after the updates from the rows
             visited before it), natural order; GPTQ's "OBS target";
      losses (d_in, d_out): IST's Losses, (w - q)² / d² / 2 with d = U[k, k]; natural order;
      loss   float: losses.sum(), the "error" IST prints.

  Block-size dependence (exactly as IST): the lazy batch update is exact algebra, so the result does not depend
  on block_size (up to float rounding) EXCEPT for non-static groups: the grid of a group starting at visiting
  position s is fitted on the global W, which holds the updates of all *completed* blocks only. If s is not a
  multiple of block_size, the rows already visited in the current block have not been applied yet: the grid is
  fitted on stale weights. The result equals the block_size = 1 ("fresh") result iff every group start is a
  block start, i.e. group_size % block_size == 0 or there is a single group. In particular group 64 with block
  128 differs from group 64 with block 64 (IST's stale-group quirk, PEERS.md §4.1 item 10).
  """
  W = np.array(W, dtype=np.float64)  # copies
  H = np.array(H, dtype=np.float64)
  d_in, d_out = W.shape
  if H.shape != (d_in, d_in):
    raise ValueError(f"H must be ({d_in}, {d_in}), got {H.shape}")
  maxq = 2**bits - 1
  grouped = group_size is not None
  n_groups = -(-d_in // group_size) if grouped else 1
  scales = np.zeros((n_groups, d_out))
  zeros = np.zeros((n_groups, d_out))
  g_idx = np.zeros(d_in, dtype=np.int64)

  if not grouped:
    # IST fits the per-channel grid before the dead-feature fix: dead rows still count in the min/max.
    scales[0], zeros[0] = fit_grid(W, bits, symmetric, shrink)

  dead = np.diag(H) == 0
  H[dead, dead] = 1.0
  W[dead, :] = 0.0

  if grouped and static_groups:
    for k in range(n_groups):
      scales[k], zeros[k] = fit_grid(W[k * group_size:(k + 1) * group_size], bits, symmetric, shrink)
    g_idx = np.arange(d_in) // group_size

  if act_order:
    perm = np.argsort(-np.diag(H), kind="stable")
    W = W[perm]
    H = H[perm][:, perm]
  else:
    perm = np.arange(d_in)

  H[np.diag_indices(d_in)] += damp * np.mean(np.diag(H))
  U = inverse_cholesky_upper(H)

  codes = np.zeros((d_in, d_out), dtype=np.int64)  # visiting order until the end
  Q = np.zeros((d_in, d_out))
  W_swept = np.zeros((d_in, d_out))
  losses = np.zeros((d_in, d_out))
  scale, zero = scales[0], zeros[0]
  for i1 in range(0, d_in, block_size):
    i2 = min(i1 + block_size, d_in)
    W1 = W[i1:i2].copy()  # in-block updates go here; the global W only sees them at the end of the block
    Err1 = np.zeros_like(W1)
    U1 = U[i1:i2, i1:i2]
    for i in range(i2 - i1):
      k = i1 + i
      if grouped:
        if static_groups:
          scale, zero = scales[g_idx[perm[k]]], zeros[g_idx[perm[k]]]
        elif k % group_size == 0:
          # Fitted on the *global* W: stale by the in-block updates of rows i1..k-1 when k is not a block start.
          g = k // group_size
          scales[g], zeros[g] = fit_grid(W[k:k + group_size], bits, symmetric, shrink)
          scale, zero = scales[g], zeros[g]
          g_idx[perm[k:k + group_size]] = g
      w = W1[i].copy()
      d = U1[i, i]
      c = quantize(w, scale, zero, maxq)
      q = dequantize(c, scale, zero)
      codes[k], Q[k], W_swept[k] = c, q, w
      losses[k] = (w - q)**2 / d**2 / 2
      err = (w - q) / d
      W1[i:] -= np.outer(U1[i, i:], err)
      Err1[i] = err
    W[i2:] -= U[i1:i2, i2:].T @ Err1

  out = {}
  for name, a in (("codes", codes), ("Q", Q), ("W_swept", W_swept), ("losses", losses)):
    nat = np.empty_like(a)
    nat[perm] = a
    out[name] = nat
  out.update(scales=scales, zeros=zeros, g_idx=g_idx, perm=perm, loss=float(losses.sum()))
  return out


def rtn_reference(W, bits, *, group_size=None, symmetric=False, shrink=1.0):
  """Round-to-nearest on the same grids GPTQ would fit without error feedback (natural order, from W)."""
  W = np.asarray(W, dtype=np.float64)
  d_in, d_out = W.shape
  maxq = 2**bits - 1
  g = d_in if group_size is None else group_size
  codes = np.zeros((d_in, d_out), dtype=np.int64)
  Q = np.zeros((d_in, d_out))
  for s in range(0, d_in, g):
    scale, zero = fit_grid(W[s:s + g], bits, symmetric, shrink)
    codes[s:s + g] = quantize(W[s:s + g], scale, zero, maxq)
    Q[s:s + g] = dequantize(codes[s:s + g], scale, zero)
  return {"codes": codes, "Q": Q}


def output_error(W, Q, H):
  """tr(EᵀHE) with E = W - Q: ‖X(W - Q)‖²_F when H = XᵀX."""
  E = np.asarray(W, np.float64) - np.asarray(Q, np.float64)
  return float(np.sum(E * (np.asarray(H, np.float64) @ E)))
