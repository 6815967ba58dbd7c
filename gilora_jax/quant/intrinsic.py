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
becomes an N² one of the same size as plain GPTQ's.

The damping λ (``lam_from``). Paper A's intrinsic pass damps the augmented Hessian as GPTQ damps any:
``λ = damp · mean diag(H_aug) = damp · (tr H + Σσ²) / (N + r)`` (``"augmented"``). But the matrix the sweep factors
is S, whose undamped part is the Hessian of ``X − X_r``: its mean diagonal is ``Σ_{i>r} σ_i² / N``, 2.7–8.1× below
the augmented one on real layers, because the top-r directions that dominate ``tr H`` are taken out. So the paper's
λ damps the deflated problem several times harder than GPTQ's rule would. ``"deflated"`` applies GPTQ's rule to the
matrix actually factored, ``λ = damp · Σ_{i>r} σ_i² / N``, and lowers the final error on every measured layer
(BENCHMARKS.md, "The intrinsic pass's λ"; a multiple of it does not do better: 0.6–2× within 1 %). When H has no
energy outside V_r (rank H ≤ r, the tail at round-off) that λ would vanish; the augmented one is used then.

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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gilora_jax.quant import gptq as gptq_lib
from gilora_jax.quant import hessian, linalg
from gilora_jax.quant.grid import Grid, GridSpec
from gilora_jax.quant.linalg import HIGHEST
from gilora_jax.quant.lowrank import LowRank


class IntrinsicHessian(NamedTuple):
  """What the intrinsic pass needs from H (computed once per input site)."""
  S: jax.Array       # (N, N) deflated damped Hessian
  V: jax.Array       # (N, r) top-r eigenvectors of H: the L of the method
  shrink: jax.Array  # (r,) σ² / (σ² + λ)
  lam: jax.Array     # () the damping λ used


LAM_FROM = ("augmented", "deflated")


def intrinsic_lam(trace: jax.Array, e: jax.Array, rank: int, damp: float | jax.Array,
                  lam_from: str = "augmented") -> jax.Array:
  """The intrinsic pass's λ from ``tr H`` and H's eigenvalues ``e`` (descending, clipped at 0): ``damp`` times the
  mean diagonal of the augmented Hessian (Paper A) or of the deflated one (module docstring)."""
  N = e.shape[0]
  head, tail = jnp.sum(e[:rank]), jnp.sum(e[rank:])
  augmented = damp * (trace + head) / (N + rank)
  if lam_from == "augmented":
    return augmented
  if lam_from != "deflated":
    raise ValueError(f"lam_from={lam_from!r} is unknown; choose one of {LAM_FROM}.")
  roundoff = N * jnp.finfo(e.dtype).eps * (head + tail)
  return jnp.where(tail > roundoff, damp * tail / N, augmented)


def deflate(H: jax.Array, rank: int, damp: float | jax.Array,
            eig: tuple[jax.Array, jax.Array] | None = None, lam_from: str = "augmented") -> IntrinsicHessian:
  """The Schur-complement Hessian of the augmented problem, its L = V_r, and the ridge factors.

  Args:
    H: (N, N) Hessian XᵀX (undamped; dead features fixed).
    rank: r, static.
    damp: relative damping; ``λ = damp · (tr H + Σ_{i≤r} σ_i²) / (N + r)``, or with ``lam_from="deflated"``
      ``damp · Σ_{i>r} σ_i² / N`` (``intrinsic_lam``).
    eig: H's full eigendecomposition in descending order (``linalg.eigh_desc``) when already computed (a
      site's); S is assembled from it (``V diag(d) Vᵀ``, every ``d ≥ λ``), so it is positive definite even in
      float32 at small damping.

  Returns:
    ``IntrinsicHessian(S, V, shrink, lam)``.
  """
  e, V = linalg.eigh_desc(H) if eig is None else eig
  e = jnp.maximum(e, 0.0)
  sig2, Vr = e[:rank], V[:, :rank]
  lam = intrinsic_lam(jnp.trace(H), e, rank, damp, lam_from)
  # S from the eigenpairs, not as H + λI − V_r diag(σ⁴/(σ²+λ)) V_rᵀ: that difference cancels σ² ≈ σ⁴/(σ²+λ) to
  # round-off of the largest eigenvalue, which in float32 at small damping turns S indefinite (and forces
  # damping escalation); here every eigenvalue is ≥ λ by construction.
  d = jnp.concatenate([lam * sig2 / (sig2 + lam), e[rank:]]) + lam
  S = jnp.matmul(V * d[None, :], V.T, precision=HIGHEST)
  return IntrinsicHessian(0.5 * (S + S.T), Vr, sig2 / (sig2 + lam), lam)


def ridge_r(ih: IntrinsicHessian, E: jax.Array) -> jax.Array:
  """``R = diag(σ²/(σ²+λ)) V_rᵀ (W − Q)``: the trailing rows the augmented sweep would leave, given E = W − Q."""
  return ih.shrink[:, None] * linalg.tn(ih.V, E)


class GiloraResult(NamedTuple):
  """``gilora``'s result: ``W ≈ Q + L R`` with ``L = V_r`` and R the trailing rows of the augmented sweep."""
  codes: jax.Array          # (d_in, d_out) uint8
  grid: Grid                # (G, d_out)
  Q: jax.Array              # (d_in, d_out) dequantized codes
  lr: LowRank               # L = V_r (d_in, r), R (r, d_out)
  ih: IntrinsicHessian      # the deflated Hessian, V_r, the ridge factors and the augmented pass's λ
  factor: hessian.Factor    # the factor of S the sweep used (``factor.damp``: damping after any escalation)


@functools.partial(jax.jit, static_argnames=("rank", "act_order", "method", "lam_from"))
def _deflated_factor(H, e, V, damp, rank: int, act_order: bool, method: str, lam_from: str):
  """gilora's parts, the deflated Hessian S in sweep order, its transposed factor, and whether it is finite."""
  ih = deflate(H, rank, damp, eig=(e, V), lam_from=lam_from)
  perm = jnp.argsort(-jnp.diagonal(ih.S), stable=True) if act_order else None
  Tt = hessian.factor(ih.S if perm is None else ih.S[perm][:, perm], method, transpose=True)
  return ih, Tt, perm, hessian.factor_ok(Tt)


_ridge = jax.jit(lambda ih, W, Q: ridge_r(ih, W - Q))


def gilora(W: jax.Array, H: jax.Array | hessian.Site, spec: GridSpec, rank: int, *, damp: float = 0.01,
           act_order: bool = False, static_groups: bool = False, block_size: int = 128,
           factor: str = "cholesky", lam_from: str = "augmented") -> GiloraResult:
  """GPTQ-intrinsic LoRA (Paper A, Alg. 3): GPTQ on the deflated Hessian S, then the ridge R (module docstring).

  Args:
    W: (d_in, d_out) weights.
    H: (d_in, d_in) ``XᵀX``, or a ``hessian.Site`` (its eigendecomposition is shared with SRR and the bounds).
    spec: the grid.
    rank: r, the number of top eigenvectors of H taken as L.
    damp, act_order, static_groups, block_size, factor: as ``gptq.gptq``; λ is the augmented pass's.
    lam_from: ``"augmented"`` (Paper A's λ, this function's default) or ``"deflated"`` (GPTQ's rule applied to S,
      the library's default through ``quantize_layer``): module docstring.

  Returns:
    ``GiloraResult(codes, grid, Q, lr, ih, factor)``. Paper A follows it with one OLrC of Q
    (``lowrank.olrc``, or ``refine.refine`` with ``loops=0``).
  """
  if lam_from not in LAM_FROM:
    raise ValueError(f"lam_from={lam_from!r} is unknown; choose one of {LAM_FROM}.")
  site = hessian.prepare(H, damp, method=factor)
  W = jnp.asarray(W, site.Hf.dtype)
  Wz = site.zero_dead(W)

  def make():
    e, V = site.eigh()
    used, (ih, Tt, perm) = site.escalate(
        lambda d: _deflated_factor(site.Hf, e, V, d, rank, act_order, factor, lam_from), damp, factor)
    return ih, hessian.Factor(Tt, perm, used)
  ih, f = site.memo(("gilora", rank, damp, act_order, factor, lam_from), make)
  codes, grid, Q = gptq_lib.quantize_with_factor(Wz, f, spec, W_grid=W, static_groups=static_groups,
                                                 block_size=block_size)
  return GiloraResult(codes, grid, Q, LowRank(ih.V, _ridge(ih, Wz, Q)), ih, f)
