"""Paper A's error bounds, to report how close to optimal a layer got.

Upper bound (Paper A, Cor. 3.9 form; derivation in ALGORITHMS.md §A.5). In the infinite-alphabet regime
(no clipping) the damped error of GPTQ-intrinsic LoRA with ``L = V_r`` satisfies, per output column j with
grid step δ_j,

    ‖X(w_j − q_j − V_r r_j)‖² + λ‖w_j − q_j‖² + λ‖r_j‖²  ≤  (δ_j² / 4) (‖X − X_r‖²_F + (N + r) λ),

with ``‖X − X_r‖²_F = Σ_{i>r} σ_i(X)²``. Summed over j: ``D(b, r) ≤ ¼ Σ_j δ_j² (Σ_{i>r} σ_i² + (N + r)λ)``.
r = 0 is the plain GPTQ analogue ``¼ Σ_j δ_j² (‖X‖²_F + Nλ)``. For group-wise grids the largest step of the
column is used (the bound holds with any step at least as large as every step used).

Lower-bound estimate (information-theoretic; ALGORITHMS.md §A.5). With an alphabet of 2B+1 levels and a
rank-r term of about ``r(N + N′ + 1) + 2`` real degrees of freedom, a covering argument gives a per-entry
resolution no better than ``range · (2B+1)^{−J/(J−1)}``, ``J = N N′ / (r(N + N′ + 1) + 2)``, transferred to the
output through the smallest eigenvalue of H. The constants of the paper are not known; this module uses the
uniform-cell variance ``ε²/12``, so the figure is an *estimate* of the scale of the best achievable error, not
a certified bound. It is a worst case over a class of W, not a figure for a given W (a W on the grid has error
~1e-32 against an estimate of 3.9e-6; on real layers it sits 30–30,000× below the achieved error), so
``quantize_layer`` does not report it; the upper bound bounds GPTQ-intrinsic LoRA only and is reported for gilora
only:

    D_low ≈ λ_min(H) · Σ_j N · (range_j · (2B+1)^{−J/(J−1)})² / 12,   2B + 1 = 2^bits.

Lingo:
  N = d_in, N′ = d_out, σ_i² eigenvalues of H (descending), δ_j grid step of column j

References:
  Zhang & Saab, "GPTQ-intrinsic LoRA", arXiv:2606.01412, §3 (Cor. 3.9) and §4 (lower bound).
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import jax
import jax.numpy as jnp


def upper_bound(eigs: jax.Array, steps: jax.Array, rank: int, lam: float | jax.Array) -> jax.Array:
  """``¼ Σ_j δ_j² (Σ_{i>r} σ_i² + (N + r) λ)``.

  Args:
    eigs: (N,) eigenvalues of H, any order (clipped at 0).
    steps: (G, d_out) grid scales; the largest per column is used.
    rank: r.
    lam: the damping λ of the objective the bound is compared with.
  """
  e = jnp.sort(jnp.maximum(eigs, 0.0))[::-1]
  N = e.shape[0]
  delta = jnp.max(steps, axis=0)
  return 0.25 * jnp.sum(delta**2) * (jnp.sum(e[rank:]) + (N + rank) * lam)


def lower_estimate(eigs: jax.Array, W: jax.Array, bits: int, rank: int) -> jax.Array:
  """``λ_min(H) · Σ_j N (range_j (2B+1)^{−J/(J−1)})² / 12`` (an estimate; constants unknown, see module doc)."""
  N, Np = W.shape
  J = N * Np / (rank * (N + Np + 1) + 2)
  if J <= 1:  # the low-rank term alone can represent any W: no positive lower bound
    return jnp.zeros((), W.dtype)
  levels = 2.0**bits
  rng = jnp.max(W, axis=0) - jnp.min(W, axis=0)
  eps = rng * levels ** (-J / (J - 1))
  return jnp.maximum(jnp.min(eigs), 0.0) * jnp.sum(N * eps**2 / 12.0)
