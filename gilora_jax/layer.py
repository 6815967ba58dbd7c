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
  """What happened to one layer. Errors are ``tr(EᵀHE)/tr(WᵀHW)`` with the undamped H (None without
  diagnostics): of Q alone, after the method's own low-rank term, and final (after refinement)."""
  method: str
  bits: int
  rank: int                            # the rank used (0 for rtn, gptq)
  group_size: int | None
  rel_err: float | None
  rel_err_quantized: float | None
  rel_err_method: float | None
  objective: tuple[float, ...]         # the damped objective before refinement and after every refinement step
  damp: float                          # the relative damping used (after any escalation)
  lam: float                           # λ of the method's damped objective (gilora: its augmented pass's)
  upper_bound: float | None            # Paper A's Cor. 3.9 bound, relative to tr(WᵀHW) (``quant.bounds``)
  lower_estimate: float | None         # its information-theoretic estimate, relative likewise
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


def _rel_err(W, Q, lr, H):
  E = W - Q - mm(lr.L, lr.R)
  return lowrank.objective(E, H) / jnp.maximum(lowrank.objective(W, H), jnp.finfo(W.dtype).tiny)


@jax.jit
def _stage_errors(W, Wz, H, Hf, Q, lr, damp):
  """Errors before refinement: Q alone, with the method's low-rank term, and the damped objective."""
  zero = lowrank.LowRank(lr.L[:, :0], lr.R[:0])
  return (_rel_err(W, Q, zero, H), _rel_err(W, Q, lr, H),
          lowrank.objective(Wz - Q - mm(lr.L, lr.R), hessian.damped(Hf, damp)))


@functools.partial(jax.jit, static_argnames=("bits", "rank"))
def _final(W, H, eigs, Q, lr, scales, lam, bits: int, rank: int):
  """Final relative error and Paper A's bounds, relative to tr(WᵀHW)."""
  tr = jnp.maximum(lowrank.objective(W, H), jnp.finfo(W.dtype).tiny)
  return (_rel_err(W, Q, lr, H), bounds_lib.upper_bound(eigs, scales, rank, lam) / tr,
          bounds_lib.lower_estimate(eigs, W, bits, rank) / tr)


_all_finite = jax.jit(lambda *xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))


def _nonneg(name: str, value: float) -> float:
  """A reported error, ≥ 0 by this check: round-off negatives become 0, anything below fails loudly."""
  if value < -_NEG_TOL:
    raise hessian.NotPSDError(
        f"the {name} came out negative ({value:.3g}), so H is not positive semi-definite: it was not built as "
        f"XᵀX (a difference of Hessians, a mixed-precision sum, a corrupted file?). Rebuild it with hessian.update.")
  return max(value, 0.0)


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
    W: (d_in, d_out) weight (the Flax kernel; torch's ``weight.T``), NumPy or JAX.
    H: (d_in, d_in) calibration Hessian ``XᵀX`` of the layer's inputs (``gilora_jax.quant.hessian``), or a
      ``hessian.prepare``-d site shared by the linears that read the same inputs.
    method: one of ``METHODS`` (``gilora_jax.methods``).
    bits: 2..8.
    rank: r of the low-rank term for ``gptq+lorc``, ``gptq+olrc``, ``gilora``, ``srr`` (``rtn``/``gptq`` use 0).
    group_size: input rows per grid (dividing d_in), or None for per-output-channel grids.
    symmetric: symmetric grids.
    loops: Bid-Up/OLrC refinement loops after the method (``refine.refine``).
    damp: relative damping, ``λ = damp · mean diag H`` (gilora: of the augmented Hessian). Escalated × 10 with a
      logged warning while a factorisation fails, up to 4 times; then ``ValueError``.
    act_order: visit input rows by decreasing ``H_ii`` (with groups, static groups fitted on W up front).
    seed: PRNG seed (SRR's random probe).
    config: a whole ``LayerConfig`` instead of the flat options (which must then stay at their defaults).
    **options: the other ``LayerConfig`` fields by their flat names (``config.FIELDS``): ``static_groups``,
      ``shrink``, ``mse``, ``block_size``, ``factor``, ``final_olrc``, ``bidup_order``, ``bidup_deflated``,
      ``srr_scaling``, ``srr_k``, ``srr_quantizer``, ``diagnostics``.

  Returns:
    ``LayerResult(Q, L, R, codes, scales, zeros, report)``; ``report`` is a ``LayerReport``. With
    ``diagnostics=False`` its errors and bounds are None (they cost an eigendecomposition of H and several
    d_in² d_out products).

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
  errs: dict[str, Any] = dict(rel_err=None, rel_err_quantized=None, rel_err_method=None, upper_bound=None,
                              lower_estimate=None)
  objective: list[float] = []
  if cfg.diagnostics:
    e_q, e_m, obj = _stage_errors(W, Wz, site.H, site.Hf, Q, lr, out.damp)
    errs.update(rel_err_quantized=_nonneg("error of Q", float(e_q)), rel_err_method=_nonneg("error", float(e_m)))
    objective = [_nonneg("damped objective", float(obj))]
  if refines(cfg):
    rc = cfg.refine
    res = refine_lib.refine(Wz, codes, grid, site.Hf, cfg.grid, r, loops=rc.loops, damp=out.damp, order=rc.order,
                            deflated=rc.deflated, block_size=cfg.gptq.block_size, Tt=out.Tt)
    codes, Q, lr = res.codes, res.Q, res.lr
    if cfg.diagnostics:
      objective += [_nonneg("damped objective", float(v)) for v in res.objective]
  if cfg.diagnostics:
    e, ub, le = _final(W, site.H, site.eigenvalues(), Q, lr, grid.scales, out.lam, cfg.grid.bits, r)
    errs.update(rel_err=_nonneg("error", float(e)), upper_bound=float(ub), lower_estimate=float(le))
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
