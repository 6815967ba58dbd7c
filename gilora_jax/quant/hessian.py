"""Calibration Hessians: streaming ``XᵀX``, damping, dead features, triangular factors, top eigenvectors.

The layer-wise objective ``‖X W − X Ŵ‖²_F = tr((W − Ŵ)ᵀ XᵀX (W − Ŵ))`` depends on the calibration inputs only
through ``H = XᵀX``, so one (d_in, d_in) matrix per input site carries everything GPTQ, OLrC, Bid-Up and the
bounds need. H is not normalised by the token count: damping is relative (``λ = damp · mean diag H``), so the
codes do not change with the scale of H (ALGORITHMS.md §A.1).

Lingo:
  X (n, d_in)        calibration inputs of one linear layer (n tokens)
  H (d_in, d_in)     XᵀX, symmetric positive semi-definite
  λ                  damping, ``damp · mean(diag H)``; ``H_λ = H + λ I``
  T (d_in, d_in)     upper-triangular with ``T Tᵀ = H_λ`` (the "UL" Cholesky factor)
  U (d_in, d_in)     ``T⁻¹``: upper-triangular with ``Uᵀ U = H_λ⁻¹``; GPTQ's ``Hinv`` and Paper A's ``Ψ = Uᵀ``

Why T and not U: the reference GPTQ propagates errors with U, the upper Cholesky factor of the *inverse*
(``chol(chol_inverse(chol(H)))``), which costs a Cholesky plus a triangular inverse. Writing its recurrence
in terms of ``T = U⁻¹`` (see ``gptq.py``) gives the same codes from one Cholesky of ``J H_λ J`` (J reverses
the order), so the sweep never forms an inverse.

References:
  Frantar et al., "GPTQ", arXiv:2210.17323, §4 (Cholesky reformulation).
  Zhang & Saab, "GPTQ-intrinsic LoRA", arXiv:2606.01412, App. C ("GPTQ*": eigh + QR factor).
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


class HessianStats(NamedTuple):
  """Running ``Σ xᵀx`` over calibration tokens (optax-style state: ``init`` → ``update`` → ...)."""
  xtx: jax.Array    # (d_in, d_in) float32
  count: jax.Array  # () int32, tokens seen


def init(d_in: int) -> HessianStats:
  """Empty statistics for a layer with ``d_in`` input features."""
  return HessianStats(jnp.zeros((d_in, d_in), jnp.float32), jnp.zeros((), jnp.int32))


def update(stats: HessianStats, x: jax.Array, mask: jax.Array | None = None) -> HessianStats:
  """Adds a batch of inputs: ``xtx += xᵀx`` over every token of ``x``.

  Sums are kept in float32 with full-precision matmuls (bf16 activations have 8 bits of mantissa; TF32 on
  GPUs would lose more), whatever the activation dtype.

  Args:
    stats: running statistics.
    x: (..., d_in) activations; every leading axis is a token axis.
    mask: optional (...) boolean/0-1 array; tokens with mask 0 (padding) are left out.

  Returns:
    Updated statistics.
  """
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  n = jnp.asarray(x.shape[0], jnp.int32)
  if mask is not None:
    m = mask.reshape(-1).astype(jnp.float32)
    x = x * m[:, None]
    n = jnp.sum(m).astype(jnp.int32)
  return HessianStats(stats.xtx + jnp.matmul(x.T, x, precision=HIGHEST), stats.count + n)


def fix_dead(H: jax.Array, W: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Handles dead input features (``H_ii = 0``: the feature is zero on every calibration token).

  As the reference: ``H_ii ← 1`` and ``W_i ← 0``. The feature never contributes to ``X W``, so any value is
  optimal for the objective; zero keeps the quantized layer from carrying an arbitrary weight.

  Returns:
    ``(H, W, dead)`` with dead a (d_in,) boolean mask.
  """
  dead = jnp.diagonal(H) == 0
  H = H + jnp.diag(dead.astype(H.dtype))
  W = jnp.where(dead[:, None], 0.0, W)
  return H, W, dead


def damping(H: jax.Array, damp: float | jax.Array) -> jax.Array:
  """``λ = damp · mean(diag H)``."""
  return damp * jnp.mean(jnp.diagonal(H))


def factor(Hd: jax.Array, method: str = "cholesky", *, transpose: bool = False) -> jax.Array:
  """Upper-triangular T with ``T Tᵀ = Hd`` (Hd already damped, symmetric positive definite), or ``Tᵀ``.

  ``cholesky``: with J the order reversal, ``J Hd J = L Lᵀ`` (lower Cholesky) gives ``T = J L J``. One
  Cholesky, d³/3 flops. Only one triangle of Hd is read (Hd must be symmetric; ``XᵀX`` from ``update`` is, up
  to round-off). A matrix that is not positive definite yields NaNs (JAX raises nothing inside jit): check
  ``jnp.diagonal(T)`` (finite and positive) and escalate the damping (``gilora_jax.layer`` does).

  ``eigh``: Paper A's route for near-singular matrices (App. C, "GPTQ*"): ``Hd = V diag(e) Vᵀ``,
  ``M = Hd^{1/2}``, QR of ``J M J = Q̃ G`` with ``diag(G) > 0``, ``T = J Gᵀ J``. Eigenvalues are floored at
  ``1e-7 · max(e)`` (float32; 1e-14 in float64) so round-off negatives cannot produce NaNs. Costs an
  eigendecomposition and a QR.

  Both give the same T up to round-off (T is unique given positive diagonal).

  Args:
    Hd: (d, d) damped Hessian.
    method: ``"cholesky"`` or ``"eigh"``.
    transpose: return the lower-triangular ``Tᵀ`` instead (what the GPTQ sweep reads, ``gptq(...,
      transposed=True)``). On CPU, LAPACK works column-major, so ``Tᵀ`` comes out of the Cholesky without the
      d² transposition that ``T`` costs.

  Returns:
    (d, d) upper-triangular T, or its transpose.
  """
  if method == "cholesky":
    # The Cholesky of the reversed matrix, handed over transposed: LAPACK's column-major input and output are
    # then plain reinterpretations of the row-major arrays (Hd is symmetric), so XLA copies nothing extra.
    L = jax.lax.linalg.cholesky(Hd[::-1, ::-1].T, symmetrize_input=False)
    return L.T[::-1, ::-1] if transpose else L[::-1, ::-1]
  if method == "eigh":
    e, V = jnp.linalg.eigh(Hd)
    e = jnp.maximum(e, (1e-7 if Hd.dtype == jnp.float32 else 1e-14) * jnp.max(e))
    M = jnp.matmul(V * jnp.sqrt(e)[None, :], V.T, precision=HIGHEST)
    _, G = jnp.linalg.qr(M[::-1, ::-1])
    G = G * jnp.sign(jnp.diagonal(G))[:, None]  # positive diagonal makes the factor unique
    return G[::-1, ::-1] if transpose else G.T[::-1, ::-1]
  raise ValueError(f"factor method {method!r} is unknown; use 'cholesky' or 'eigh'.")


def inverse_factor(T: jax.Array) -> jax.Array:
  """``U = T⁻¹``: upper-triangular with ``Uᵀ U = Hd⁻¹`` (GPTQ's ``Hinv``; Paper A's ``Ψ = Uᵀ``)."""
  eye = jnp.eye(T.shape[0], dtype=T.dtype)
  return jax.scipy.linalg.solve_triangular(T, eye, lower=False)


def top_eigh(H: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
  """Top-r eigenpairs of a symmetric H: ``(σ² (r,) descending, V_r (d, r))``.

  With ``H = XᵀX`` these are the squared top singular values and the top-r right singular vectors of X.
  """
  e, V = jnp.linalg.eigh(0.5 * (H + H.T))
  return e[::-1][:r], V[:, ::-1][:, :r]
