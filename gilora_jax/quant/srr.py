"""Structured Residual Reconstruction (SRR): preserve a top-k subspace, quantize the residual, spend r − k on
the error (Paper B).

Given an activation-derived scaling S (d_in, d_in) acting on the left, ``S W`` lives in the space where the
layer's error is measured (for ``S = H_λ^{1/2}``, ``‖S E‖²_F = tr(Eᵀ H_λ E)`` exactly). For a split
``k ∈ {0, …, r}`` of the rank budget:

1. Preserve: ``L₁ R₁ = S⁻¹ SVD_k(S W)``, the top-k scaled components mapped back.
2. Quantize the residual: ``Q = 𝒬(W − L₁ R₁)`` with any base quantizer (GPTQ or RTN here).
3. Reconstruct: ``L₂ R₂ = S⁻¹ SVD_{r−k}(S E_k)``, ``E_k = W − L₁R₁ − Q``.
4. ``L = [L₁ L₂]``, ``R = [R₁; R₂]``: the standard ``Q + L R`` form. k = 0 is plain QER (QERA/LQER).

Choosing k. With the tail-energy fraction ``ρ_p(A) = Σ_{i>p} σ_i(A)² / Σ_i σ_i(A)²``, Paper B's criterion
(``paper_k``) assumes quantization keeps a constant fraction of what it is applied to (``‖S E_k‖² ∝ ρ_k(S W)``)
and that ``S E_k`` is spectrally like ``S E_rand``; on real layers the first assumption fails (it picks k far
above the brute-force best and flips with the probe's seed). ``choose_k`` keeps the factorisation but takes
the exposed energy from the residual's grid steps and the spectrum from its expectation
(``k_scores``). Measured against the brute-force best k, neither criterion wins every regime: on 12 real
layers held apart (best k 0–8 of 32) the paper's picks 12–26 (up to 1.48×) and the step-aware one is within
1.04×; on the built-in LM's 28 layers (d = 128, r = 32: best k 27–32) the step-aware one picks 0–24 (1.09–2.94×)
and the paper's (expected probe) stays closer (seeded probe: median 1.06×, worst 1.37×). So with k unset
``srr`` runs the residual quantization for both candidates (at most twice the base quantizer) and keeps the
lower damped objective: never worse than either criterion, and free of the seed. After step 4 one rank-r
OLrC of the final Q (``refine.refine`` with loops = 0, the ``final_olrc`` option) can only lower the damped
objective: for fixed Q it is the optimum over all rank-r terms, and ``[L₁ L₂][R₁; R₂]`` is one of them.

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

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gilora_jax.quant import gptq as gptq_lib
from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant import hessian, linalg, lowrank
from gilora_jax.quant.grid import Grid, GridSpec
from gilora_jax.quant.linalg import mm as _mm
from gilora_jax.quant.lowrank import LowRank

SCALINGS = ("identity", "diag", "exact")


def scaling(H: jax.Array, kind: str, lam: float | jax.Array,
            eig: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
  """``(S, S⁻¹)`` for ``kind`` in ``identity``, ``diag``, ``exact`` (damped by λ so S is invertible).

  ``exact`` is ``H_λ^{1/2}`` from H's eigenpairs (``eig``, a site's ``eigh()``, or computed here): the
  eigenvalues ``e + λ``, floored at λ against round-off negatives.
  """
  N = H.shape[0]
  eye = jnp.eye(N, dtype=H.dtype)
  if kind == "identity":
    return eye, eye
  if kind == "diag":
    s = jnp.sqrt(jnp.diagonal(H) + lam)
    return jnp.diag(s), jnp.diag(1.0 / s)
  if kind == "exact":
    e, V = linalg.eigh_desc(H) if eig is None else eig
    e = jnp.maximum(e + lam, lam)
    return _mm(V * jnp.sqrt(e)[None, :], V.T), _mm(V / jnp.sqrt(e)[None, :], V.T)
  raise ValueError(f"SRR scaling {kind!r} is unknown; use one of {SCALINGS}.")


def truncated(A: jax.Array, S_inv: jax.Array, p: int) -> LowRank:
  """``S⁻¹ SVD_p(A)`` as factors: ``L = S⁻¹ U_p Σ_p``, ``R = V_pᵀ``."""
  L, R = linalg.truncated_svd(A, p)
  return LowRank(_mm(S_inv, L), R)


def tail_fractions(s: jax.Array, r: int) -> jax.Array:
  """``ρ_p = Σ_{i>p} s_i² / Σ s_i²`` for p = 0..r, from singular values s (descending)."""
  e = s**2
  total = jnp.sum(e)
  head = jnp.concatenate([jnp.zeros((1,), e.dtype), jnp.cumsum(e[:r])])
  return (total - head) / jnp.maximum(total, jnp.finfo(e.dtype).tiny)


def paper_k(W: jax.Array, S: jax.Array, rank: int, key: jax.Array) -> jax.Array:
  """Paper B's criterion as the notes give it: ``argmin_{k=0..r} ρ_k(S W) · ρ_{r−k}(S E_rand)``, E_rand ~ U[−1, 1].

  Kept for comparison only (``srr`` uses ``choose_k``): on real layers it picks k = 12–26 of 32 where the
  brute-force best is 0–8 (ALGORITHMS.md §B.2, measured), and it moves with the probe's seed.
  """
  E_rand = jax.random.uniform(key, W.shape, W.dtype, -1.0, 1.0)
  rho_w = tail_fractions(jnp.linalg.svd(_mm(S, W), compute_uv=False), rank)      # (r+1,) indexed by k
  rho_e = tail_fractions(jnp.linalg.svd(_mm(S, E_rand), compute_uv=False), rank)  # (r+1,) indexed by r−k
  return jnp.argmin(rho_w * rho_e[::-1]).astype(jnp.int32)


def k_scores(W: jax.Array, S: jax.Array, pres: LowRank, spec: GridSpec, rank: int) -> jax.Array:
  """The step-aware proxy of ``𝓛(k)²`` for k = 0..r: ``Σ_j δ_j(k)² · ρ_{r−k}(S²)``.

  Derivation (Paper B's factorisation ``𝓛(k)² = ‖S E_k‖² · ρ_{r−k}(S E_k)``, with its two assumptions
  replaced where they fail on real layers):

  * Quantization-exposed energy. Paper B assumes ``‖S E_k‖² ∝ ρ_k(S W)``. With a strongly anisotropic
    ``S = H_λ^{1/2}``, ρ_k(SW) falls fast because S, not W, is concentrated, while the quantization error
    follows the residual's grid step, which barely shrinks with k. A uniform quantizer's error per entry has
    variance ``δ²/12``, so ``‖S E_k‖² ∝ Σ_j δ_j(W − L₁R₁(k))²`` (δ_j the grid step of column j of the residual,
    summed over its groups), from the grid the base quantizer would fit. The step is the min–max one even
    when the base quantizer searches clip ratios (``spec.mse``): a clip search for each of the r + 1
    candidates cost 67–208× a GPTQ sweep on SmolLM2's layers, and a shrink common to all k leaves the
    argmin unchanged.
  * Unrecoverable fraction. Paper B takes the normalised spectrum of ``S E_rand`` for one random probe. For
    any E with i.i.d. zero-mean entries ``E[(S E)(S E)ᵀ] ∝ S Sᵀ``: its spectrum is the expectation the probe
    estimates, so ``ρ_{r−k}`` is taken from the eigenvalues of ``S Sᵀ`` (for the exact scaling those of
    ``H_λ``): deterministic, hence stable across seeds by construction.

  Where Paper B's exact form is uncertain (ALGORITHMS.md §B.2 rebuilds it from notes) this is our form, not
  the paper's; validated against the brute-force best k (tests/quant/test_srr.py; experiments/layer_defaults.py).

  Args:
    W: (d_in, d_out) weights; S: the scaling; pres: the rank-r preserve ``S⁻¹ SVD_r(S W)`` (its first k
    components are L₁R₁(k)); spec: the base quantizer's grid; rank: r.

  Returns:
    (r + 1,) scores indexed by k.
  """
  e = jnp.maximum(jnp.linalg.eigvalsh(_mm(S, S.T))[::-1], 0.0)
  rho = tail_fractions(jnp.sqrt(e), rank)  # (r+1,) indexed by p = r − k
  step_spec = dataclasses.replace(spec, mse=False, shrink=1.0)  # the min–max step: see the docstring

  def exposed(k):
    keep = jnp.arange(rank) < k
    res = W - _mm(pres.L * keep[None, :], pres.R)
    return jnp.sum(grid_lib.fit_grid(res, step_spec).scales ** 2)

  steps = jax.lax.map(exposed, jnp.arange(rank + 1))
  return steps * rho[::-1]


def choose_k(W: jax.Array, S: jax.Array, pres: LowRank, spec: GridSpec, rank: int) -> jax.Array:
  """``k* = argmin_k k_scores(...)``: the step-aware candidate (int32 scalar)."""
  return jnp.argmin(k_scores(W, S, pres, spec, rank)).astype(jnp.int32)


def expected_paper_k(W: jax.Array, S: jax.Array, rank: int) -> jax.Array:
  """Paper B's ``argmin_k ρ_k(S W) · ρ_{r−k}(·)`` with the probe's spectrum replaced by its expectation, the
  eigenvalues of ``S Sᵀ`` (``k_scores``): the paper's candidate, free of the seed (int32 scalar)."""
  rho_w = tail_fractions(jnp.linalg.svd(_mm(S, W), compute_uv=False), rank)
  e = jnp.maximum(jnp.linalg.eigvalsh(_mm(S, S.T))[::-1], 0.0)
  return jnp.argmin(rho_w * tail_fractions(jnp.sqrt(e), rank)[::-1]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("rank", "kind", "spec"))
def _candidates(W, H, eig, lam, rank: int, kind: str, spec: GridSpec):
  """The two criteria's k: the step-aware one and the paper's (expected probe)."""
  S, S_inv = scaling(H, kind, lam, eig)
  pres = truncated(_mm(S, W), S_inv, rank)
  return choose_k(W, S, pres, spec, rank), expected_paper_k(W, S, rank)


def concat(a: LowRank, b: LowRank) -> LowRank:
  """``[L_a L_b]``, ``[R_a; R_b]``."""
  return LowRank(jnp.concatenate([a.L, b.L], axis=1), jnp.concatenate([a.R, b.R], axis=0))


class SRRResult(NamedTuple):
  """``srr``'s result: ``W ≈ Q + L R`` with ``L R = [L₁ L₂][R₁; R₂]`` (k preserved, r − k reconstructed)."""
  codes: jax.Array                  # (d_in, d_out) uint8, the quantized residual W − L₁R₁
  grid: Grid                        # (G, d_out)
  Q: jax.Array                      # (d_in, d_out)
  lr: LowRank                       # (d_in, r), (r, d_out): the first k columns preserve, the rest reconstruct
  k: int                            # the preserved rank used
  factor: hessian.Factor | None     # the GPTQ base quantizer's factor (None for RTN)


@functools.partial(jax.jit, static_argnames=("rank", "kind", "spec"))
def _preserve(W, H, eig, lam, k_fixed, rank: int, kind: str, spec: GridSpec):
  """Scaling, k (criterion unless k_fixed ≥ 0), the preserved term masked to its first k components, residual."""
  S, S_inv = scaling(H, kind, lam, eig)
  pres = truncated(_mm(S, W), S_inv, rank)
  k = k_fixed
  keep = jnp.arange(rank) < k
  pres = LowRank(pres.L * keep[None, :], pres.R * keep[:, None])
  return S, S_inv, k, pres, W - _mm(pres.L, pres.R)


@functools.partial(jax.jit, static_argnames=("spec", "rank"))
def _reconstruct(Wres, codes, grid, S, S_inv, pres, k, spec: GridSpec, rank: int):
  """``S⁻¹ SVD_{r−k}(S E)`` and the rank-r concatenation [L₁ L₂] with the first k of L₁, first r−k of L₂."""
  E = Wres - grid_lib.dequantize(codes, grid, spec)
  rec = truncated(_mm(S, E), S_inv, rank)
  both = concat(pres, rec)  # (d_in, 2r): keep columns i < k of the first, i < r − k of the second
  i = jnp.arange(rank)
  idx = jnp.where(i < k, i, rank + i - k)
  return LowRank(both.L[:, idx], both.R[idx])


_rtn = jax.jit(grid_lib.rtn_dequantized, static_argnames=("spec",))


def srr(W: jax.Array, H: jax.Array | hessian.Site, spec: GridSpec, rank: int, *, k: int | None = None,
        scaling: str = "exact", quantizer: str = "gptq", seed: int = 0, damp: float = 0.01,
        act_order: bool = False, static_groups: bool = False, block_size: int = 128,
        factor: str = "cholesky") -> SRRResult:
  """Preserve-then-quantize (Paper B): the four steps of the module docstring.

  Args:
    W: (d_in, d_out) weights.
    H: (d_in, d_in) ``XᵀX``, or a ``hessian.Site`` (its eigendecomposition serves the exact scaling).
    spec: the grid.
    rank: the rank budget r = k + (r − k).
    k: the preserved rank, or None for the criterion ``choose_k`` (deterministic, step-aware).
    scaling: ``identity``, ``diag`` or ``exact`` (``scaling``), damped by ``λ = damp · mean diag H``.
    quantizer: the base quantizer of the residual, ``"gptq"`` (with ``damp``, ``act_order``, ``static_groups``,
      ``block_size``, ``factor`` as ``gptq.gptq``) or ``"rtn"``.
    seed: unused (the criterion no longer draws a probe); accepted for compatibility.

  Returns:
    ``SRRResult(codes, grid, Q, lr, k, factor)``.
  """
  site = hessian.prepare(H, damp, method=factor)
  Wz = site.zero_dead(jnp.asarray(W, site.Hf.dtype))
  eig = site.eigh() if scaling == "exact" else None
  del seed  # the criteria are deterministic (k_scores); kept so callers need not change
  lam = damp * site.mean_diag
  if k is None:  # neither criterion wins every regime (module docstring): run both, keep the lower objective
    ks = sorted({int(c) for c in _candidates(Wz, site.Hf, eig, lam, rank, scaling, spec)})
  else:
    ks = [k]
  f = None if quantizer == "rtn" else site.factor(damp, act_order=act_order, method=factor)
  best = None
  for kk in ks:
    S, S_inv, _, pres, Wres = _preserve(Wz, site.Hf, eig, lam, kk, rank, scaling, spec)
    if f is None:
      codes, grid, Q = _rtn(Wres, spec)
    else:
      codes, grid, Q = gptq_lib.quantize_with_factor(Wres, f, spec, static_groups=static_groups,
                                                     block_size=block_size)
    lr = _reconstruct(Wres, codes, grid, S, S_inv, pres, kk, spec, rank)
    value = float(_damped_objective(Wz, Q, lr, site.Hf, lam)) if len(ks) > 1 else 0.0
    if best is None or value < best[0]:
      best = (value, SRRResult(codes, grid, Q, lr, kk, f))
  return best[1]


_damped_objective = jax.jit(lambda W, Q, lr, H, lam: lowrank.objective(W - Q - _mm(lr.L, lr.R),
                                                                        hessian.shifted(H, lam)))
