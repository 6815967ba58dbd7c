"""Closed-form low-rank compensation of a fixed quantized weight: OLrC (weighted) and LoRC (unweighted).

OLrC (Paper A, Alg. 2) solves, for fixed Q and residual ``E = W − Q``,

    min_{rank(LR) ≤ r}  ‖X (E − L R)‖²_F + λ ‖E − L R‖²_F  =  tr((E − LR)ᵀ H_λ (E − LR)),   H_λ = H + λ I.

Derivation. Write ``H_λ = A Aᵀ`` for any square root A (here the triangular factor T of ``hessian.factor``).
Then the objective is ``‖Aᵀ E − Aᵀ L R‖²_F`` and ``Aᵀ`` is invertible, so by Eckart–Young the optimum is
``Aᵀ L R = P_r(Aᵀ E)``, the rank-r truncated SVD, with optimal value ``Σ_{i>r} s_i²`` over the singular values
s of ``Aᵀ E`` (the same as those of ``H_λ^{1/2} E``: the whitened / generalised SVD of QERA-exact and CLoQ).
Two equivalent ways to get it, chosen by the smaller side:

* output side (d_out ≤ d_in): ``(AᵀE)ᵀ(AᵀE) = Eᵀ H_λ E``; with its top-r eigenvectors V_r,
  ``L R = E V_r V_rᵀ`` (``L = E V_r``, ``R = V_rᵀ``). No factorisation of H at all, only a PSD Gram matrix.
* input side (d_in < d_out): with the top-r left singular vectors U_r of ``Z = Tᵀ E``,
  ``L = T⁻ᵀ U_r`` (a triangular solve) and ``R = U_rᵀ Z``.

The top-r eigenpairs of the Gram matrix come from the dense eigh below n = 1024 and from a randomized block
Krylov iteration from there on (``linalg.top_eigh_auto``; n is the Gram matrix's side, the smaller of d_in and
d_out): at n = 4096 the dense eigh was about 40 % of gilora's whole call. The factors are built from an orthonormal V_r (or U_r) and the optimum
is ``tr − Σ e_r`` with its Ritz values, so the returned objective is always the returned factors' own.

On column shards (E's output columns split over devices, ``gilora_jax.sharding``) both sides run as written,
partitioned by XLA: on the input side ``Z = Tᵀ E`` stays column-local, the Gram ``Z Zᵀ`` is one all-reduce of
the shards' d_in × d_in partial products, its eigh is computed replicated, and ``R = U_rᵀ Z`` is column-local
again; on the output side the d_out × d_out Gram ``Eᵀ H_λ E`` pairs every two column shards, so the residual is
all-gathered once, the eigh is replicated and ``L = E V_r`` is reduced across shards. Either way the codes are
untouched and the result equals the single-device one to float32 round-off.

LoRC (ZeroQuant-V2) is the unweighted baseline: the truncated SVD of E itself.

Lingo:
  E (d_in, d_out)   quantization residual W − Q
  Hd (d_in, d_in)   damped Hessian H_λ;  T its upper factor, T Tᵀ = H_λ
  L (d_in, r), R (r, d_out)   low-rank factors; the layer computes X (Q + L R)

References:
  Zhang & Saab, "GPTQ-intrinsic LoRA", arXiv:2606.01412, Alg. 2 (OLrC).
  Zhang et al., "QERA", arXiv:2410.06040 (closed form); Yao et al., "ZeroQuant-V2", arXiv:2303.08302 (LoRC).
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gilora_jax.quant import linalg
from gilora_jax.quant.linalg import mm as _mm


class LowRank(NamedTuple):
  """Low-rank factors; ``L @ R`` is the (d_in, d_out) correction."""
  L: jax.Array  # (d_in, r)
  R: jax.Array  # (r, d_out)


def _top_eigh(M: jax.Array, r: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-r eigenpairs of a PSD Gram matrix, plus its trace: ``(e_r (r,), V_r (n, r), tr M)``; from
  n = 1024 on by block Krylov (``linalg.top_eigh_auto``)."""
  e, V = linalg.top_eigh_auto(M, r)
  return e, V, jnp.trace(M)


def olrc(E: jax.Array, Hd: jax.Array, rank: int, *, T: jax.Array | None = None) -> tuple[LowRank, jax.Array]:
  """Optimal low-rank compensation (OLrC) of the residual E under the damped Hessian.

  Args:
    E: (d_in, d_out) residual ``W − Q`` (or ``W − Q − L₀R₀`` for a further term).
    Hd: (d_in, d_in) damped Hessian ``H + λI``.
    rank: r, static, ``0 ≤ r ≤ min(d_in, d_out)``.
    T: optional upper factor of Hd (``hessian.factor``), used on the input side; computed when missing.

  Returns:
    ``(LowRank(L, R), optimum)``: factors with ``L R`` minimising ``tr((E − LR)ᵀ Hd (E − LR))``, and that
    minimum, ``Σ_{i>r} s_i²`` (evaluated as the trace minus the top-r squared singular values).

  Example:
    >>> E = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> (L, R), opt = olrc(E, jnp.eye(2), 1)   # best rank-1 keeps the larger direction
    >>> float(opt)
    1.0
  """
  d_in, d_out = E.shape
  if d_out <= d_in:
    e, V, tr = _top_eigh(linalg.tn(E, _mm(Hd, E)), rank)
    return LowRank(_mm(E, V), V.T), _left_over(tr, e, d_out)
  if T is None:
    from gilora_jax.quant import hessian  # pylint: disable=import-outside-toplevel
    T = hessian.factor(Hd)
  Z = linalg.tn(T, E)
  e, U, tr = _top_eigh(_mm(Z, Z.T), rank)
  L = jax.scipy.linalg.solve_triangular(T, U, trans="T", lower=False)
  return LowRank(L, linalg.tn(U, Z)), _left_over(tr, e, d_in)


def _left_over(tr: jax.Array, e: jax.Array, n: int) -> jax.Array:
  """OLrC's optimum ``tr − Σ e`` (the trace of an n × n Gram matrix minus its top-r eigenvalues), ≥ 0 in exact
  arithmetic. When E has rank ≤ r (a rank-1 W whose columns all get the same grid, say) the true value is 0 and
  the subtraction leaves round-off of either sign, about eps · tr; a negative within 8 · n · eps · tr is that, and
  reads 0. A larger negative is kept, so the caller's check still refuses a Hessian that is not PSD."""
  opt = tr - jnp.sum(e)
  tol = 8 * n * jnp.finfo(opt.dtype).eps * jnp.abs(tr)
  return jnp.where((opt < 0) & (opt >= -tol), jnp.zeros_like(opt), opt)


def lorc(E: jax.Array, rank: int) -> LowRank:
  """Unweighted low-rank compensation (ZeroQuant-V2 LoRC): the rank-r truncated SVD of E."""
  return LowRank(*linalg.truncated_svd(E, rank))


def objective(E: jax.Array, Hd: jax.Array) -> jax.Array:
  """``tr(Eᵀ Hd E)``: the (damped) layer-wise output error of a residual E.

  Summed per column first, as a batched dot (``einsum("ij,ij->j")``), then over the columns. Written as
  ``sum(E * (Hd @ E))`` the scalar reduction fuses with the product on XLA:CPU (jax 0.10) into a kernel 2.6×
  slower than the product alone (2.1–2.6 s against 0.81 s at 4096²; an optimization barrier does not stop it);
  the per-column form runs at the product's speed (``benchmarks/objective.py``).
  """
  return jnp.sum(jnp.einsum("ij,ij->j", E, _mm(Hd, E), precision=linalg.HIGHEST))
