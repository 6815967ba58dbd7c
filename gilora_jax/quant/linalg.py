"""The linear-algebra helpers every algorithm shares: full-precision products, eigendecompositions, truncated SVDs.

One place for each, so the algorithms cannot drift apart in how they symmetrise, order or truncate.

* ``HIGHEST``: the matmul precision of the math layer. float32 products on GPUs and TPUs default to reduced
  precision (TF32/bf16 passes); every product that forms or applies a Hessian asks for full precision.
* ``eigh_desc``: eigenpairs of a symmetric matrix in *descending* order (the papers' σ₁² ≥ σ₂² ≥ …), computed on
  ``(M + Mᵀ)/2`` so that round-off asymmetry of a Gram matrix cannot leak into the result.
* ``top_eigh`` / ``top_eigh_iterative``: the r largest eigenpairs, from the dense ``eigh`` or, for a large matrix
  and a small r, from a randomized block Krylov iteration (a few thin products with M instead of a dense
  eigendecomposition; ``benchmarks/olrc_solver.py`` measures both).
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


# The block Krylov solver's shape: blocks of r + KRYLOV_OVERSAMPLE columns, KRYLOV_STEPS products with M. It
# pays from about ITERATIVE_MIN_N on (below, the dense eigh is cheap and the tests' small layers keep it), and
# only while the Krylov basis stays under half of n.
ITERATIVE_MIN_N = 1024
KRYLOV_OVERSAMPLE = 32
KRYLOV_STEPS = 6


def _krylov_width(r: int) -> int:
  return (KRYLOV_STEPS + 1) * (r + KRYLOV_OVERSAMPLE)


def top_eigh_iterative(M: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
  """``top_eigh`` of a symmetric PSD M by randomized block Krylov iteration: ``(e_r (r,) descending, V_r (n, r))``.

  The basis ``K = orth[Y, MY, …, M^q Y]`` (Y a fixed Gaussian n × (r + p) block, each block re-orthonormalised,
  q = ``KRYLOV_STEPS``, p = ``KRYLOV_OVERSAMPLE``) followed by Rayleigh–Ritz: the eigh of ``Kᵀ M K``. Musco & Musco
  (NeurIPS 2015) bound its captured energy by the gap-free ``(1 + ε)`` of the best rank r; on OLrC's residual Grams
  the optimum ``tr M − Σ e_r`` came within 1.3e-5 of the dense one (``benchmarks/olrc_solver.py``). V_r is
  orthonormal and e_r are its Ritz values, so ``Σ e_r = tr(V_rᵀ M V_r)``: the optimum a caller computes from them
  is the returned subspace's own value. Every product goes through ``mm``/``tn`` and the rest is LAPACK (pinned to
  one thread by ``runtime.pin_lapack``), so the result does not depend on the thread count; the start is fixed,
  so it is reproducible. A zero or low-rank M is fine (the QR of a zero block is still orthonormal).
  """
  n = M.shape[0]
  if not 0 < _krylov_width(r) <= n:
    raise ValueError(f"top_eigh_iterative needs a Krylov basis of {_krylov_width(r)} ≤ n columns; got r={r}, "
                     f"n={n} (use top_eigh).")
  M = 0.5 * (M + M.T)
  Y, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(0), (n, r + KRYLOV_OVERSAMPLE), M.dtype))
  blocks = [Y]
  for _ in range(KRYLOV_STEPS):
    Y, _ = jnp.linalg.qr(mm(M, Y))
    blocks.append(Y)
  K, _ = jnp.linalg.qr(jnp.concatenate(blocks, axis=1))
  e, U = eigh_desc(tn(K, mm(M, K)))
  return e[:r], mm(K, U[:, :r])


def top_eigh_auto(M: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
  """``top_eigh_iterative`` where it pays (n ≥ ``ITERATIVE_MIN_N`` and its basis under n / 2), else the dense
  ``top_eigh``."""
  n = M.shape[0]
  return top_eigh_iterative(M, r) if n >= ITERATIVE_MIN_N and 0 < 2 * _krylov_width(r) <= n else top_eigh(M, r)


def truncated_svd(A: jax.Array, p: int) -> tuple[jax.Array, jax.Array]:
  """Factors of the rank-p truncated SVD: ``(U_p Σ_p (m, p), V_pᵀ (p, n))`` with ``U_p Σ_p V_pᵀ = SVD_p(A)``.

  Example:
    >>> L, R = truncated_svd(jnp.array([[3.0, 0.0], [0.0, 1.0]]), 1)
    >>> (L @ R).tolist()
    [[3.0, 0.0], [0.0, 0.0]]
  """
  U, s, Vt = jnp.linalg.svd(A, full_matrices=False)
  return U[:, :p] * s[None, :p], Vt[:p]
