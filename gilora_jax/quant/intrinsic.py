"""GPTQ-intrinsic LoRA: the low-rank term folded into the GPTQ sweep (Paper A, Alg. 3).

Paper A takes ``L = V_r``, the top-r right singular vectors of X (eigenvectors of H), augments the calibration
matrix to ``X_aug = [X, X V_r]`` and runs GPTQ on ``W_aug = [W; 0]`` for the first N rows only: the r trailing
rows are never quantized, receive the diffused error, and become R. The layer output is ``X Q + (X L) R``.

Equivalent, cheaper form (ALGORITHMS.md §A.3, derived and checked in float64 there and in our tests against the
literal augmented sweep). Sweeping a block problem whose trailing variables are never quantized is GPTQ on the
leading block with the Schur complement of the damped augmented Hessian, followed by the ridge solution of the
trailing block:

    S = (H + λI) − H V_r (V_rᵀ H V_r + λI)⁻¹ V_rᵀ H
      = H + λI − V_r diag(σ⁴ / (σ² + λ)) V_rᵀ        (H V_r = V_r diag(σ²))
    R = (V_rᵀ H V_r + λI)⁻¹ V_rᵀ H (W − Q) = diag(σ² / (σ² + λ)) V_rᵀ (W − Q).

So GPTQ-intrinsic LoRA is GPTQ on ``V_⊥ Σ_⊥² V_⊥ᵀ + V_r diag(λσ²/(σ²+λ)) V_rᵀ + λI`` — the Hessian of
``X − X_r`` plus damping — and a shrunk projection of the quantization error onto V_r. The (N+r)² factorisation
becomes an N² one of the same size as plain GPTQ's. λ follows Paper A's intrinsic pass:
``λ = damp · mean diag(H_aug) = damp · (tr H + Σσ²) / (N + r)``, larger than plain GPTQ's.

Lingo:
  H (N, N)           XᵀX, dead features already fixed (``hessian.fix_dead``)
  σ² (r,), V_r (N, r) top-r eigenpairs of H
  S (N, N)           the deflated, damped Hessian the sweep uses
  shrink (r,)        σ² / (σ² + λ), the ridge factors of R

References:
  Zhang & Saab, "GPTQ-intrinsic LoRA: A Near-optimal Algorithm for Low-precision Quantization with Low-rank
  Adaptation", arXiv:2606.01412, Alg. 3 and App. C.
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gilora_jax.quant import hessian

HIGHEST = jax.lax.Precision.HIGHEST


class IntrinsicHessian(NamedTuple):
  """What the intrinsic pass needs from H (computed once per input site)."""
  S: jax.Array       # (N, N) deflated damped Hessian
  V: jax.Array       # (N, r) top-r eigenvectors of H: the L of the method
  shrink: jax.Array  # (r,) σ² / (σ² + λ)
  lam: jax.Array     # () the damping λ used


def deflate(H: jax.Array, rank: int, damp: float | jax.Array) -> IntrinsicHessian:
  """The Schur-complement Hessian of the augmented problem, its L = V_r, and the ridge factors.

  Args:
    H: (N, N) Hessian XᵀX (undamped; dead features fixed).
    rank: r, static.
    damp: relative damping; ``λ = damp · (tr H + Σ_{i≤r} σ_i²) / (N + r)``.

  Returns:
    ``IntrinsicHessian(S, V, shrink, lam)``.
  """
  N = H.shape[0]
  sig2, V = hessian.top_eigh(H, rank)
  sig2 = jnp.maximum(sig2, 0.0)
  lam = damp * (jnp.trace(H) + jnp.sum(sig2)) / (N + rank)
  S = H + lam * jnp.eye(N, dtype=H.dtype) - jnp.matmul(V * (sig2**2 / (sig2 + lam)), V.T, precision=HIGHEST)
  return IntrinsicHessian(0.5 * (S + S.T), V, sig2 / (sig2 + lam), lam)


def ridge_r(ih: IntrinsicHessian, E: jax.Array) -> jax.Array:
  """``R = diag(σ²/(σ²+λ)) V_rᵀ (W − Q)``: the trailing rows the augmented sweep would leave, given E = W − Q."""
  return ih.shrink[:, None] * jnp.matmul(ih.V.T, E, precision=HIGHEST)
