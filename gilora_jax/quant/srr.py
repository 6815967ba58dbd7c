"""Structured Residual Reconstruction (SRR): preserve a top-k subspace, quantize the residual, spend r − k on
the error (Paper B).

Given an activation-derived scaling S (d_in, d_in) acting on the left, ``S W`` lives in the space where the
layer's error is measured (for ``S = H_λ^{1/2}``, ``‖S E‖²_F = tr(Eᵀ H_λ E)`` exactly). For a split
``k ∈ {0, …, r}`` of the rank budget:

1. Preserve: ``L₁ R₁ = S⁻¹ SVD_k(S W)``, the top-k scaled components mapped back.
2. Quantize the residual: ``Q = 𝒬(W − L₁ R₁)`` with any base quantizer (GPTQ or RTN here).
3. Reconstruct: ``L₂ R₂ = S⁻¹ SVD_{r−k}(S E_k)``, ``E_k = W − L₁R₁ − Q``.
4. ``L = [L₁ L₂]``, ``R = [R₁; R₂]``: the standard ``Q + L R`` form. k = 0 is plain QER (QERA/LQER).

Choosing k (the paper's theory-guided criterion). With the tail-energy fraction
``ρ_p(A) = Σ_{i>p} σ_i(A)² / Σ_i σ_i(A)²``, assume quantization keeps a constant fraction of what it is
applied to (so ``‖S E_k‖² ∝ ρ_k(S W)``) and that the normalised spectrum of ``S E_k`` looks like that of
``S E_rand`` for ``E_rand ~ U[−1, 1]``; then ``𝓛(k)² ∝ ρ_k(S W) · ρ_{r−k}(S E_rand)`` and
``k* = argmin_k ρ_k(S W) ρ_{r−k}(S E_rand)``, one seeded probe per matrix.

Scalings: ``identity``; ``diag`` = ``diag(sqrt(diag H))`` (QERA-approx; LQER-like); ``exact`` =
``H_λ^{1/2}`` (QERA-exact, damped so that S is invertible; then step 3 is exactly OLrC).

Lingo:
  S, S_inv (d_in, d_in)  scaling and its inverse
  k                      preserved rank; r − k reconstructs the error

References:
  Cho et al., "Preserve-Then-Quantize: Balancing Rank Budgets for Quantization Error Reconstruction in LLMs",
  arXiv:2602.02001 (ICML 2026); Zhang et al., "QERA", arXiv:2410.06040 (scalings).
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import jax
import jax.numpy as jnp

from gilora_jax.quant.lowrank import LowRank

HIGHEST = jax.lax.Precision.HIGHEST
SCALINGS = ("identity", "diag", "exact")


def _mm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def scaling(H: jax.Array, kind: str, lam: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(S, S⁻¹)`` for ``kind`` in ``identity``, ``diag``, ``exact`` (damped by λ so S is invertible)."""
  N = H.shape[0]
  eye = jnp.eye(N, dtype=H.dtype)
  if kind == "identity":
    return eye, eye
  if kind == "diag":
    s = jnp.sqrt(jnp.diagonal(H) + lam)
    return jnp.diag(s), jnp.diag(1.0 / s)
  if kind == "exact":
    e, V = jnp.linalg.eigh(0.5 * (H + H.T) + lam * eye)
    e = jnp.maximum(e, lam)
    return _mm(V * jnp.sqrt(e), V.T), _mm(V / jnp.sqrt(e), V.T)
  raise ValueError(f"SRR scaling {kind!r} is unknown; use one of {SCALINGS}.")


def truncated(A: jax.Array, S_inv: jax.Array, p: int) -> LowRank:
  """``S⁻¹ SVD_p(A)`` as factors: ``L = S⁻¹ U_p Σ_p``, ``R = V_pᵀ``."""
  U, s, Vt = jnp.linalg.svd(A, full_matrices=False)
  return LowRank(_mm(S_inv, U[:, :p] * s[:p]), Vt[:p])


def tail_fractions(s: jax.Array, r: int) -> jax.Array:
  """``ρ_p = Σ_{i>p} s_i² / Σ s_i²`` for p = 0..r, from singular values s (descending)."""
  e = s**2
  total = jnp.sum(e)
  head = jnp.concatenate([jnp.zeros((1,), e.dtype), jnp.cumsum(e[:r])])
  return (total - head) / jnp.maximum(total, jnp.finfo(e.dtype).tiny)


def choose_k(W: jax.Array, S: jax.Array, rank: int, key: jax.Array) -> jax.Array:
  """The criterion ``k* = argmin_{k=0..r} ρ_k(S W) · ρ_{r−k}(S E_rand)``, ``E_rand ~ U[−1, 1]`` (seeded).

  Returns:
    k* as an int32 scalar.
  """
  E_rand = jax.random.uniform(key, W.shape, W.dtype, -1.0, 1.0)
  rho_w = tail_fractions(jnp.linalg.svd(_mm(S, W), compute_uv=False), rank)      # (r+1,) indexed by k
  rho_e = tail_fractions(jnp.linalg.svd(_mm(S, E_rand), compute_uv=False), rank)  # (r+1,) indexed by r−k
  return jnp.argmin(rho_w * rho_e[::-1]).astype(jnp.int32)


def concat(a: LowRank, b: LowRank) -> LowRank:
  """``[L_a L_b]``, ``[R_a; R_b]``."""
  return LowRank(jnp.concatenate([a.L, b.L], axis=1), jnp.concatenate([a.R, b.R], axis=0))
