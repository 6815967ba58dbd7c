"""The linear-algebra helpers every algorithm shares: full-precision products, eigendecompositions, truncated SVDs.

One place for each, so the algorithms cannot drift apart in how they symmetrise, order or truncate.

* ``HIGHEST``: the matmul precision of the math layer. float32 products on GPUs and TPUs default to reduced
  precision (TF32/bf16 passes); every product that forms or applies a Hessian asks for full precision.
* ``eigh_desc``: eigenpairs of a symmetric matrix in *descending* order (the papers' σ₁² ≥ σ₂² ≥ …), computed on
  ``(M + Mᵀ)/2`` so that round-off asymmetry of a Gram matrix cannot leak into the result.
* ``truncated_svd``: the rank-p truncated SVD as factors.
* ``tn``: ``aᵀ b`` whose float32 result does not depend on the machine's thread count. On XLA:CPU (jax 0.10) a
  product whose left operand is a transposed view (contracting its rows) runs through Eigen's contraction, which
  splits a long inner sum over threads and blocks it by the L1 size, so ``x.T @ x`` (the Hessian!) changes with
  the core count; every other layout runs as a YNNPACK dot, identical for 1–16 threads. ``tn`` materialises
  ``aᵀ`` first (a copy of a, small next to the product), so ``aᵀ b`` takes the YNNPACK path. Every ``aᵀ b`` of the
  math layer goes through it.
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` at full precision."""
  return jnp.matmul(a, b, precision=HIGHEST)


def tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """``aᵀ b`` at full precision, with ``aᵀ`` materialised row-major first (module docstring).

  Example:
    >>> tn(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.eye(2)).tolist()
    [[1.0, 3.0], [2.0, 4.0]]
  """
  return jnp.matmul(jax.lax.optimization_barrier(a.T), b, precision=HIGHEST)


def eigh_desc(M: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eigenpairs of the symmetric part of M, eigenvalues descending: ``(e (n,), V (n, n))``, ``M ≈ V diag(e) Vᵀ``.

  Example:
    >>> e, V = eigh_desc(jnp.diag(jnp.array([1.0, 3.0, 2.0])))
    >>> e.tolist()
    [3.0, 2.0, 1.0]
  """
  e, V = jnp.linalg.eigh(0.5 * (M + M.T))
  return e[::-1], V[:, ::-1]


def top_eigh(M: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
  """The r largest eigenpairs of a symmetric M: ``(e_r (r,) descending, V_r (n, r))``.

  With ``M = XᵀX`` these are the squared top singular values and the top-r right singular vectors of X.
  """
  e, V = eigh_desc(M)
  return e[:r], V[:, :r]


def truncated_svd(A: jax.Array, p: int) -> tuple[jax.Array, jax.Array]:
  """Factors of the rank-p truncated SVD: ``(U_p Σ_p (m, p), V_pᵀ (p, n))`` with ``U_p Σ_p V_pᵀ = SVD_p(A)``.

  Example:
    >>> L, R = truncated_svd(jnp.array([[3.0, 0.0], [0.0, 1.0]]), 1)
    >>> (L @ R).tolist()
    [[3.0, 0.0], [0.0, 0.0]]
  """
  U, s, Vt = jnp.linalg.svd(A, full_matrices=False)
  return U[:, :p] * s[None, :p], Vt[:p]
