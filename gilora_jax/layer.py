"""``quantize_layer``: one linear layer, any method, from its weight and calibration Hessian.

The integration over the math layer: it validates the options and the inputs (a clear ``ValueError`` naming the
fix, never a silent NaN), prepares the Hessian once (``hessian.prepare``: checks, dead features, damping with
escalation), runs the method from the ``METHODS`` table (``gilora_jax.methods``), the refinement loops
(``refine.refine``) when asked, and reports the layer's errors in a typed ``LayerReport``.

To quantize the linears that read one input (q/k/v, gate/up) pass one prepared site as ``H`` to each call:
``site = hessian.prepare(H)``; then its checks, factor and eigendecomposition are computed once.
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gilora_jax import config as config_lib
from gilora_jax.config import LayerConfig
from gilora_jax.methods import METHODS, refines
from gilora_jax.quant import bounds as bounds_lib
from gilora_jax.quant import hessian, lowrank
from gilora_jax.quant import refine as refine_lib
from gilora_jax.quant.linalg import mm

__all__ = ["LayerReport", "LayerResult", "METHODS", "quantize_layer"]

_D = LayerConfig()  # the defaults of the signature below are the config's: one source for every default
# A relative error below zero by more than this is not round-off of a PSD H (whose float32 error sums stay far
# above it): the call fails instead of reporting it. Round-off negatives above it are reported as 0.
_NEG_TOL = 1e-6


class LayerReport(NamedTuple):
  """What happened to one layer. Errors are ``tr(EᵀHE)/tr(WᵀHW)`` with the undamped H: of Q alone, after the
  method's own low-rank term, and final (after refinement); which fields are filled (the others are None or
  empty) is the ``diagnostics`` level's choice (``quantize_layer``)."""
  method: str
  bits: int
  rank: int                            # the rank used (0 for rtn, gptq)
  group_size: int | None
  rel_err: float | None
  rel_err_quantized: float | None
  rel_err_method: float | None
  objective: tuple[float, ...]         # the damped objective ``tr(Eᵀ H_λ E)``: after the method, then after the
                                       # refinement's steps (every step with "full", every OLrC with "auto")
  damp: float                          # the relative damping used (after any escalation)
  lam: float                           # λ of the method's damped objective (gilora: its augmented pass's)
  upper_bound: float | None            # gilora only ("full"): Paper A's Cor. 3.9 bound on its damped error,
                                       # relative to tr(WᵀHW) (``quant.bounds``); None for every other method,
                                       # which it does not bound (RTN exceeds it 48× on a constructed layer)
  srr_k: int | None                    # SRR's preserved rank
  seconds: float


class LayerResult(NamedTuple):
  """Result of ``quantize_layer``; the layer computes ``x (Q + L R)``."""
  Q: jax.Array       # (d_in, d_out) float32, dequantized quantized part
  L: jax.Array       # (d_in, r) float32
  R: jax.Array       # (r, d_out) float32
  codes: jax.Array   # (d_in, d_out) uint8, in [0, 2**bits − 1]
  scales: jax.Array  # (G, d_out) float32; G = d_in // group_size, or 1 per-channel
  zeros: jax.Array   # (G, d_out) float32
  report: LayerReport


def _error(W, Q, lr, H):
  return lowrank.objective(W - Q - mm(lr.L, lr.R), H)


@jax.jit
def _stage_errors(W, Wz, H, Hf, Q, lr, damp):
  """Before refinement: the error of Q alone, with the method's low-rank term, ``tr(WᵀHW)``, the damped
  objective."""
  zero = lowrank.LowRank(lr.L[:, :0], lr.R[:0])
  return (_error(W, Q, zero, H), _error(W, Q, lr, H), lowrank.objective(W, H),
          lowrank.objective(Wz - Q - mm(lr.L, lr.R), hessian.damped(Hf, damp)))


_final_error = jax.jit(lambda W, H, Q, lr: (_error(W, Q, lr, H), lowrank.objective(W, H)))
_final_numerator = jax.jit(lambda W, H, Q, lr: _error(W, Q, lr, H))  # "full": tr(WᵀHW) is the stage errors' own


@jax.jit
def _error_from_objective(W, Wz, H, Hf, Q, lr, lam, damped_objective):
  """Final ``(tr(EᵀHE), tr(WᵀHW))`` from the damped objective the method computed anyway: ``tr(Ezᵀ H_λ Ez) −
  λ‖Ez‖²`` minus the dead rows' unit diagonal (dead rows of H are zero); one product, for ``tr(WᵀHW)``."""
  Ez = Wz - Q - mm(lr.L, lr.R)
  dead = jnp.diagonal(H) == 0
  sq = jnp.sum(Ez * Ez, axis=1)
  undamped = damped_objective - lam * jnp.sum(sq) - jnp.sum(jnp.where(dead, jnp.diagonal(Hf) * sq, 0.0))
  return undamped, lowrank.objective(W, H)


@functools.partial(jax.jit, static_argnames=("rank",))
def _bound(eigs, scales, lam, rank: int):
  """Paper A's Cor. 3.9 bound for gilora (absolute; ``quantize_layer`` divides it by ``tr(WᵀHW)``)."""
  return bounds_lib.upper_bound(eigs, scales, rank, lam)


_all_finite = jax.jit(lambda *xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))


def _nonneg(name: str, value: float) -> float:
  """A reported error, ≥ 0 by this check: round-off negatives become 0, anything below fails loudly."""
  if value < -_NEG_TOL:
    raise hessian.NotPSDError(
        f"the {name} came out negative ({value:.3g}), so H is not positive semi-definite: it was not built as "
        f"XᵀX (a difference of Hessians, a mixed-precision sum, a corrupted file?). Rebuild it with hessian.update.")
  return max(value, 0.0)


def _relative(name: str, num: Any, den: Any) -> float:
  """``num / tr(WᵀHW)``, checked: a negative ``tr(WᵀHW)`` is an indefinite H."""
  num, den = float(num), float(den)
  if den < 0:
    _nonneg("output energy tr(WᵀHW)", den / max(abs(num), float(np.finfo(np.float32).tiny)))
  if den > 0:
    return _nonneg(name, num / den)
  return 0.0 if _nonneg(name, num) == 0 else float("inf")  # XW = 0 on every token: any output error is infinite


def _inputs(W: Any, H: Any, cfg: LayerConfig) -> tuple[jax.Array, hessian.Site]:
  """Shape checks, then the float32 (float64 under x64) weight and its prepared site (the data checks)."""
  W = W if isinstance(W, jax.Array) else np.asarray(W)  # device arrays stay on their device
  if W.ndim != 2:
    raise ValueError(f"W must be a 2-D (d_in, d_out) weight; got shape {tuple(W.shape)}.")
  d_in, d_out = W.shape
  shape = (H.d, H.d) if isinstance(H, hessian.Site) else np.shape(H)
  if len(shape) != 2 or shape[0] != shape[1]:
    raise ValueError(f"H must be a square (d_in, d_in) matrix XᵀX; got shape {tuple(shape)}.")
  if shape[0] != d_in:
    hint = " W looks transposed: pass the (d_in, d_out) kernel, i.e. torch's weight.T." if shape[0] == d_out else ""
    raise ValueError(f"H is {shape[0]}×{shape[0]} but W has d_in={d_in} rows; H must be XᵀX of this layer's "
                     f"inputs.{hint}")
  cfg.validate_shape(d_in, d_out)
  # float32 (float64 inputs too, unless jax_enable_x64 is on); bfloat16/float16 weights are computed in float32
  dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(W.dtype, jnp.float32))
  site = hessian.prepare(H, cfg.damp, method=cfg.gptq.factor, dtype=dtype)
  W = jnp.asarray(W, site.Hf.dtype)
  if not bool(_all_finite(W)):
    raise ValueError(f"W contains {int(jnp.sum(~jnp.isfinite(W)))} NaN/Inf entries; fix the upstream computation "
                     f"(a diverged model, an fp16 overflow) before quantizing.")
  return W, site


def quantize_layer(
    W: Any,
    H: Any,
    method: str = _D.method,
    bits: int = _D.grid.bits,
    rank: int = _D.rank,
    group_size: int | None = _D.grid.group_size,
    symmetric: bool = _D.grid.symmetric,
    loops: int = _D.refine.loops,
    damp: float = _D.damp,
    act_order: bool = _D.gptq.act_order,
    seed: int = _D.seed,
    *,
    config: LayerConfig | None = None,
    **options: Any,
) -> LayerResult:
  """Quantizes one linear layer to ``W ≈ Q + L R``, minimising ``‖X W − X (Q + L R)‖²_F``.

  Args:
    W: (d_in, d_out) weight (the Flax kernel; torch's ``weight.T``), NumPy or JAX. A ``jax.Array`` sharded by
      columns over several devices (``sharding.place(W, sharding.columns(mesh, W.shape))``) runs the whole call
      on the shards: codes, Q and R come back sharded alike, L replicated (``gilora_jax.sharding``).
    H: (d_in, d_in) calibration Hessian ``XᵀX`` of the layer's inputs (``gilora_jax.quant.hessian``), or a
      ``hessian.prepare``-d site shared by the linears that read the same inputs.
    method: one of ``METHODS`` (``gilora_jax.methods``).
    bits: 2..8.
    rank: r of the low-rank term for ``gptq+lorc``, ``gptq+olrc``, ``gilora``, ``srr`` (``rtn``/``gptq`` use 0).
    group_size: input rows per grid (dividing d_in), or None for per-output-channel grids.
    symmetric: symmetric grids.
    loops: Bid-Up/OLrC refinement loops after the method (``refine.refine``).
    damp: relative damping, ``λ = damp · mean diag H`` (gilora's intrinsic pass: of the deflated Hessian it
      factors, or of Paper A's augmented one with ``intrinsic_damp="augmented"``: ``quant.intrinsic``). Escalated
      × 10 with a logged warning while a factorisation fails, up to 4 times; then ``ValueError``.
    act_order: visit input rows by decreasing ``H_ii`` (with groups, static groups fitted on W up front).
    seed: PRNG seed (kept for compatibility: SRR's criteria no longer draw a random probe).
    config: a whole ``LayerConfig`` instead of the flat options (which must then stay at their defaults).
    **options: the other ``LayerConfig`` fields by their flat names (``config.FIELDS``): ``intrinsic_damp``,
      ``static_groups``, ``shrink``, ``mse``, ``block_size``, ``factor``, ``final_olrc``, ``bidup_order``, ``bidup_deflated``,
      ``srr_scaling``, ``srr_k``, ``srr_quantizer``, ``diagnostics``.

  Returns:
    ``LayerResult(Q, L, R, codes, scales, zeros, report)``; ``report`` is a ``LayerReport`` whose contents the
    ``diagnostics`` option picks, each level costing more than the one before:

    * ``"off"``: no error at all.
    * ``"auto"`` (default): only what the method computes anyway, so the call costs what the method costs:
      ``objective`` holds the damped objectives the method's OLrC steps return (gptq+olrc, gilora, refinement
      loops); the relative errors stay None.
    * ``"errors"``: also the final ``rel_err``, for one ``d_in² d_out`` product (``tr(WᵀHW)``; the numerator
      comes from the free objective where there is one, else from a second product). ``quantize_model`` asks
      for this level when its config says ``"auto"``: beside a block's Hessians it costs a few per cent.
    * ``"full"``: every stage's error (Q alone, the method's term, final), the damped objective after every
      refinement step, and for gilora Paper A's Cor. 3.9 upper bound from the eigendecomposition it already
      computed (it bounds gilora only, so other methods report None; the information-theoretic lower estimate
      is not reported: a worst case over weights, 30–30,000× below the achieved error on real layers, it says
      nothing about a given W; ``quant.bounds.lower_estimate`` still computes it): about five ``d_in² d_out``
      products. ``True``/``False`` mean full/off.

  Raises:
    ValueError: on NaN/Inf input, mismatched shapes, an option out of range (``config.OptionError``), an H with
      no calibration tokens behind it or one that is not positive semi-definite, or one that stays indefinite
      after damping escalation.
  """
  flat = dict(method=method, bits=bits, rank=rank, group_size=group_size, symmetric=symmetric, loops=loops,
              damp=damp, act_order=act_order, seed=seed, **options)
  if config is None:
    cfg = config_lib.from_flat(**flat)
  elif options or any(v != config_lib.default(k) for k, v in flat.items()):
    raise TypeError("pass either config=LayerConfig(...) or flat options, not both.")
  else:
    cfg = config
  cfg.validate()
  t0 = time.perf_counter()
  W, site = _inputs(W, H, cfg)
  r = cfg.effective_rank
  out = METHODS[cfg.method](W, site, cfg)
  codes, grid, Q, lr = out.codes, out.grid, out.Q, out.lr
  Wz = site.zero_dead(W)
  errs: dict[str, Any] = dict(rel_err=None, rel_err_quantized=None, rel_err_method=None, upper_bound=None)
  level, objective = cfg.diagnostics, []
  if level == "full":
    n_q, n_m, tr, obj = _stage_errors(W, Wz, site.H, site.Hf, Q, lr, out.damp)
    errs.update(rel_err_quantized=_relative("error of Q", n_q, tr), rel_err_method=_relative("error", n_m, tr))
    objective = [_nonneg("damped objective", float(obj))]
  elif level != "off" and out.objective is not None:
    objective = [_nonneg("damped objective", float(out.objective))]
  free = out.objective  # the damped objective of the final Q + L R, when it comes for free
  if refines(cfg):
    rc = cfg.refine
    res = refine_lib.refine(Wz, codes, grid, site.Hf, cfg.grid, r, loops=rc.loops, damp=out.damp, order=rc.order,
                            deflated=rc.deflated, block_size=cfg.gptq.block_size, Tt=out.Tt, trace=level == "full",
                            start=(out.lr, out.objective) if out.olrc_of_q else None)
    codes, Q, lr, free = res.codes, res.Q, res.lr, res.objective[-1]
    if level != "off":
      objective += [_nonneg("damped objective", float(v)) for v in res.objective]
  if level == "full":
    errs["rel_err"] = _relative("error", _final_numerator(W, site.H, Q, lr), tr)
  elif level == "errors" and free is None:
    num, tr = _final_error(W, site.H, Q, lr)
    errs["rel_err"] = _relative("error", num, tr)
  elif level == "errors":
    lam = hessian.damping(site.Hf, out.damp)  # the objective's λ (gilora's augmented λ is its sweep's only)
    num, tr = _error_from_objective(W, Wz, site.H, site.Hf, Q, lr, lam, free)
    errs["rel_err"] = _relative("error", num, tr)
  if level == "full" and cfg.method == "gilora":  # the bound holds for gilora; its eigendecomposition is there
    errs["upper_bound"] = _relative("upper bound", _bound(site.eigenvalues(), grid.scales, out.lam, r), tr)
  # Finite inputs can still overflow float32 in the grid (|W| near 3e38: an infinite step); never hand that back.
  if not bool(_all_finite(Q, grid.scales, grid.zeros, lr.L, lr.R)):
    raise ValueError(
        f"quantizing this layer overflowed {Q.dtype} (non-finite scales, Q or low-rank factors) although W and H "
        f"are finite: max |W| = {float(jnp.max(jnp.abs(W))):.3g}. Rescale W (and undo the factor in the next "
        f"layer) or quantize in float64 (jax_enable_x64).")
  jax.block_until_ready((Q, lr, codes))
  report = LayerReport(method=cfg.method, bits=cfg.grid.bits, rank=r, group_size=cfg.grid.group_size,
                       objective=tuple(objective), damp=float(out.damp), lam=float(out.lam), srr_k=out.srr_k,
                       seconds=time.perf_counter() - t0, **errs)
  return LayerResult(Q, lr.L, lr.R, codes, grid.scales, grid.zeros, report)
