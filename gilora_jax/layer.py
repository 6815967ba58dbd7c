"""``quantize_layer``: one linear layer, any method, from its weight and calibration Hessian.

This is the public entry point over the pure math in ``gilora_jax.quant``. It validates the inputs (a clear
``ValueError`` naming the fix, never a silent NaN), fixes dead features, damps the Hessian and escalates the
damping when a factorisation fails, runs the chosen method and the optional Bid-Up/OLrC refinement loops, and
reports the layer's relative output error. Each numerical stage is a jitted function whose static arguments
are the options, so quantizing many same-shaped layers compiles once.

Methods (``METHODS``):
  ``rtn``        round-to-nearest on the fitted grid
  ``gptq``       the GPTQ sweep (blocked, damped, optional act-order with static groups)
  ``gptq+lorc``  GPTQ, then the unweighted SVD of W − Q (ZeroQuant-V2 LoRC)
  ``gptq+olrc``  GPTQ, then the optimal weighted compensation (OLrC, Paper A Alg. 2)
  ``gilora``     GPTQ-intrinsic LoRA (Paper A Alg. 3), by default followed by one OLrC of its Q
  ``srr``        preserve the top-k scaled subspace, quantize the residual, reconstruct with rank r − k (Paper B)

Refinement (``loops`` ≥ 1, Paper A's refinement loops): ``loops`` × [OLrC(Q) → Bid-Up(W − LR)] then a final
OLrC. Every step exactly minimises ``tr((W − Q − LR)ᵀ H_λ (W − Q − LR))`` over its block of variables, so the
recorded objective never increases.
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gilora_jax.quant import bidup as bidup_lib
from gilora_jax.quant import bounds as bounds_lib
from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant import gptq as gptq_lib
from gilora_jax.quant import hessian
from gilora_jax.quant import intrinsic
from gilora_jax.quant import lowrank
from gilora_jax.quant import srr as srr_lib
from gilora_jax.quant.grid import Grid, QuantGrid

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "gptq+lorc", "gptq+olrc", "gilora", "srr")
_MAX_ESCALATIONS = 4  # damp × 10 each time: 0.01 → 100 at most, then fail
HIGHEST = jax.lax.Precision.HIGHEST


class LayerResult(NamedTuple):
  """Result of ``quantize_layer``; the layer computes ``x (Q + L R)``."""
  Q: jax.Array       # (d_in, d_out) float32, dequantized quantized part
  L: jax.Array       # (d_in, r) float32
  R: jax.Array       # (r, d_out) float32
  codes: jax.Array   # (d_in, d_out) uint8, in [0, 2**bits − 1]
  scales: jax.Array  # (G, d_out) float32; G = d_in // group_size, or 1 per-channel
  zeros: jax.Array   # (G, d_out) float32
  info: dict         # rel_err and per-stage diagnostics (see quantize_layer)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerConfig:
  """Every static option of ``quantize_layer`` (hashable: a jit static argument)."""
  method: str = "gilora"
  bits: int = 3
  rank: int = 32
  group_size: int | None = None
  symmetric: bool = False
  loops: int = 0
  act_order: bool = False
  static_groups: bool = False
  shrink: float = 1.0
  mse: bool = False
  block_size: int = 128
  factor: str = "cholesky"
  final_olrc: bool = True
  bidup_order: str = "forward"
  bidup_deflated: bool = False
  srr_scaling: str = "exact"
  srr_k: int | None = None
  srr_quantizer: str = "gptq"
  diagnostics: bool = True

  @property
  def spec(self) -> QuantGrid:
    return QuantGrid(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, shrink=self.shrink,
                     mse=self.mse)

  @property
  def effective_rank(self) -> int:
    return 0 if self.method in ("rtn", "gptq") else self.rank


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _validate(W: jax.Array, H: jax.Array, cfg: LayerConfig, damp: float) -> None:
  if W.ndim != 2:
    raise ValueError(f"W must be a 2-D (d_in, d_out) weight; got shape {tuple(W.shape)}.")
  d_in, d_out = W.shape
  if H.ndim != 2 or H.shape[0] != H.shape[1]:
    raise ValueError(f"H must be a square (d_in, d_in) matrix XᵀX; got shape {tuple(H.shape)}.")
  if H.shape[0] != d_in:
    hint = (" W looks transposed: pass the (d_in, d_out) kernel, i.e. torch's weight.T."
            if H.shape[0] == d_out else "")
    raise ValueError(f"H is {H.shape[0]}×{H.shape[0]} but W has d_in={d_in} rows; H must be XᵀX of this layer's "
                     f"inputs.{hint}")
  for name, a in (("W", W), ("H", H)):
    bad = int(jnp.size(a) - jnp.sum(jnp.isfinite(a)))
    if bad:
      raise ValueError(f"{name} contains {bad} NaN/Inf entries; fix the upstream computation (a diverged model, "
                       f"an fp16 overflow in the calibration forward) before quantizing.")
  Hn = np.asarray(H, np.float64)
  scale = max(np.abs(Hn).max(), np.finfo(np.float32).tiny)
  if np.abs(Hn - Hn.T).max() > 1e-3 * scale:
    raise ValueError("H is not symmetric; pass the Gram matrix XᵀX (hessian.update accumulates it).")
  if (np.diagonal(Hn) < -1e-6 * scale).any():
    raise ValueError("H has negative diagonal entries, so it is not a Gram matrix XᵀX; check how it was built.")
  if cfg.method not in METHODS:
    raise ValueError(f"method={cfg.method!r} is unknown; choose one of {METHODS}.")
  cfg.spec.validate(d_in)
  if not isinstance(cfg.rank, (int, np.integer)) or cfg.rank < 0:
    raise ValueError(f"rank={cfg.rank!r} must be a non-negative integer.")
  if cfg.rank > min(d_in, d_out):
    raise ValueError(f"rank={cfg.rank} exceeds min(d_in, d_out)={min(d_in, d_out)} for a {d_in}×{d_out} layer; "
                     f"use rank ≤ {min(d_in, d_out)}.")
  if not isinstance(cfg.loops, (int, np.integer)) or cfg.loops < 0:
    raise ValueError(f"loops={cfg.loops!r} must be a non-negative integer.")
  if not damp > 0:
    raise ValueError(f"damp={damp!r} must be positive (the reference uses 0.01 of the mean diagonal).")
  if cfg.factor not in ("cholesky", "eigh"):
    raise ValueError(f"factor={cfg.factor!r} is unknown; use 'cholesky' or 'eigh'.")
  if cfg.bidup_order not in ("forward", "backward", "both"):
    raise ValueError(f"bidup_order={cfg.bidup_order!r} is unknown; use 'forward', 'backward' or 'both'.")
  if cfg.srr_scaling not in srr_lib.SCALINGS:
    raise ValueError(f"srr_scaling={cfg.srr_scaling!r} is unknown; use one of {srr_lib.SCALINGS}.")
  if cfg.srr_quantizer not in ("gptq", "rtn"):
    raise ValueError(f"srr_quantizer={cfg.srr_quantizer!r} is unknown; use 'gptq' or 'rtn'.")
  if cfg.srr_k is not None and not 0 <= cfg.srr_k <= cfg.rank:
    raise ValueError(f"srr_k={cfg.srr_k} must lie in 0..rank={cfg.rank} (or None for the paper's criterion).")


# ----------------------------------------------------------------------------------------------------------------
# Jitted stages (one compilation per shape and static options)
# ----------------------------------------------------------------------------------------------------------------


@jax.jit
def _prepare(W, H):
  """Dead features fixed, symmetrised H."""
  H = 0.5 * (H + H.T)
  return hessian.fix_dead(H, W)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sweep_hessian(H, damp, cfg: LayerConfig):
  """The damped Hessian the GPTQ sweep uses (deflated for gilora), its λ and (gilora) the intrinsic parts."""
  if cfg.method == "gilora":
    ih = intrinsic.deflate(H, cfg.rank, damp)
    return ih.S, ih.lam, ih
  lam = hessian.damping(H, damp)
  return H + lam * jnp.eye(H.shape[0], dtype=H.dtype), lam, None


@functools.partial(jax.jit, static_argnames=("act_order", "method"))
def _factor(Hd, act_order: bool, method: str):
  perm = jnp.argsort(-jnp.diagonal(Hd), stable=True) if act_order else jnp.arange(Hd.shape[0])
  T = hessian.factor(Hd[perm][:, perm], method)
  ok = jnp.all(jnp.isfinite(T)) & jnp.all(jnp.diagonal(T) > 0)
  return T, perm, ok


@functools.partial(jax.jit, static_argnames=("cfg",))
def _gptq(W, T, perm, W_grid, cfg: LayerConfig):
  """GPTQ codes in the original row order, and the grid."""
  spec = cfg.spec
  d_in = W.shape[0]
  lazy = spec.group_size is not None and not (cfg.act_order or cfg.static_groups)
  if lazy:
    codes, grid, _ = gptq_lib.gptq(W, T, spec, block_size=cfg.block_size)
    return codes, grid
  grid = grid_lib.fit_grid(W_grid, spec)
  row_group = grid_lib.contiguous_row_group(d_in, spec)[perm]
  codes_p, _, _ = gptq_lib.gptq(W[perm], T, spec, grid=grid, row_group=row_group, block_size=cfg.block_size)
  return jnp.zeros_like(codes_p).at[perm].set(codes_p), grid


@functools.partial(jax.jit, static_argnames=("cfg",))
def _rtn(W, cfg: LayerConfig):
  codes, grid = grid_lib.rtn(W, cfg.spec)
  return codes, grid


@functools.partial(jax.jit, static_argnames=("spec",))
def _dequantize(codes, grid, spec):
  return grid_lib.dequantize(codes, grid, spec)


@functools.partial(jax.jit, static_argnames=("rank",))
def _olrc(E, Hd, rank):
  return lowrank.olrc(E, Hd, rank)


@functools.partial(jax.jit, static_argnames=("rank",))
def _lorc(E, rank):
  return lowrank.lorc(E, rank)


@jax.jit
def _ridge(ih, E):
  return intrinsic.ridge_r(ih, E)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _bidup_step(W, codes, grid, L, R, Hd, cfg: LayerConfig):
  """One refinement Bid-Up: literal (L R fixed) or deflated (L fixed, R re-solved). Returns codes and R."""
  if cfg.bidup_deflated:
    HS, P = bidup_lib.deflated_hessian(Hd, L)
    codes = bidup_lib.bidup(W, codes, grid, HS, cfg.spec, order=cfg.bidup_order, block_size=cfg.block_size)
    Q = grid_lib.dequantize(codes, grid, cfg.spec)
    return codes, jnp.matmul(P, W - Q, precision=HIGHEST)
  Wt = W - jnp.matmul(L, R, precision=HIGHEST)
  codes = bidup_lib.bidup(Wt, codes, grid, Hd, cfg.spec, order=cfg.bidup_order, block_size=cfg.block_size)
  return codes, R


@jax.jit
def _objective(W, Q, L, R, Hd):
  return lowrank.objective(W - Q - jnp.matmul(L, R, precision=HIGHEST), Hd)


@functools.partial(jax.jit, static_argnames=("rank", "scaling"))
def _srr_preserve(W, H, lam, key, k_fixed, rank, scaling):
  """Scaling, k (criterion unless k_fixed ≥ 0), and the preserved term masked to its first k components."""
  S, S_inv = srr_lib.scaling(H, scaling, lam)
  k = jnp.where(k_fixed >= 0, k_fixed, srr_lib.choose_k(W, S, rank, key))
  pres = srr_lib.truncated(jnp.matmul(S, W, precision=HIGHEST), S_inv, rank)
  keep = jnp.arange(rank) < k
  return S, S_inv, k, lowrank.LowRank(pres.L * keep, pres.R * keep[:, None])


@functools.partial(jax.jit, static_argnames=("rank",))
def _srr_reconstruct(E, S, S_inv, pres, k, rank):
  """``S⁻¹ SVD_{r−k}(S E)`` and the rank-r concatenation [L₁ L₂] with the first k of L₁, first r−k of L₂."""
  rec = srr_lib.truncated(jnp.matmul(S, E, precision=HIGHEST), S_inv, rank)
  both = srr_lib.concat(pres, rec)  # (d_in, 2r): keep columns i < k of the first, i < r − k of the second
  i = jnp.arange(rank)
  idx = jnp.where(i < k, i, rank + i - k)
  return lowrank.LowRank(both.L[:, idx], both.R[idx])


@jax.jit
def _rel_err(W, Q, L, R, H):
  E = W - Q - jnp.matmul(L, R, precision=HIGHEST)
  return lowrank.objective(E, H) / jnp.maximum(lowrank.objective(W, H), jnp.finfo(W.dtype).tiny)


# ----------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------


def _factor_with_escalation(H, damp: float, cfg: LayerConfig):
  """Damped sweep Hessian and its factor; damping × 10 (logged) while the factor is not finite, then fail."""
  for attempt in range(_MAX_ESCALATIONS + 1):
    Hd, lam, aux = _sweep_hessian(H, damp, cfg)
    T, perm, ok = _factor(Hd, cfg.act_order, cfg.factor)
    if bool(ok):
      return Hd, lam, aux, T, perm, damp
    if attempt < _MAX_ESCALATIONS:
      log.warning("Hessian is not positive definite after damping %.3g (%s factor); retrying with damp=%.3g.",
                  damp, cfg.factor, damp * 10)
      damp *= 10
  raise ValueError(
      f"The Hessian is not positive definite even with damp={damp:g} (relative to its mean diagonal). It is "
      f"probably corrupted (NaN-free but indefinite): rebuild it as XᵀX from finite calibration inputs, or try "
      f"factor='eigh', which floors tiny eigenvalues.")


def _gptq_stage(W, Wz, H, damp, cfg: LayerConfig):
  """GPTQ (or its gilora variant) with damping escalation; returns codes, grid, λ-damped H, λ, aux, damp used."""
  Hd, lam, aux, T, perm, damp = _factor_with_escalation(H, damp, cfg)
  codes, grid = _gptq(Wz, T, perm, W, cfg)
  return codes, grid, lam, aux, damp


def quantize_layer(
    W: Any,
    H: Any,
    method: str = "gilora",
    bits: int = 3,
    rank: int = 32,
    group_size: int | None = None,
    symmetric: bool = False,
    loops: int = 0,
    damp: float = 0.01,
    act_order: bool = False,
    seed: int = 0,
    **options: Any,
) -> LayerResult:
  """Quantizes one linear layer to ``W ≈ Q + L R``, minimising ``‖X W − X (Q + L R)‖²_F``.

  Args:
    W: (d_in, d_out) weight (the Flax kernel; torch's ``weight.T``), NumPy or JAX.
    H: (d_in, d_in) calibration Hessian ``XᵀX`` of the layer's inputs (``gilora_jax.quant.hessian``).
    method: one of ``METHODS`` (module docstring).
    bits: 2..8.
    rank: r of the low-rank term for ``gptq+lorc``, ``gptq+olrc``, ``gilora``, ``srr`` (``rtn``/``gptq`` use 0).
    group_size: input rows per grid (dividing d_in), or None for per-output-channel grids.
    symmetric: symmetric grids.
    loops: Bid-Up/OLrC refinement loops after the method.
    damp: relative damping, ``λ = damp · mean diag H`` (gilora: of the augmented Hessian). Escalated × 10 with a
      logged warning while a factorisation fails, up to 4 times; then ``ValueError``.
    act_order: visit input rows by decreasing ``H_ii`` (with groups, static groups fitted on W up front).
    seed: PRNG seed (SRR's random probe).
    **options: further ``LayerConfig`` fields: ``static_groups``, ``shrink`` (β), ``mse`` (clip search),
      ``block_size``, ``factor`` (``"cholesky"``/``"eigh"``), ``final_olrc`` (gilora: one OLrC of its Q when
      loops = 0; default True), ``bidup_order`` (``forward``/``backward``/``both``), ``bidup_deflated``,
      ``srr_scaling`` (``identity``/``diag``/``exact``), ``srr_k`` (None = criterion), ``srr_quantizer``
      (``gptq``/``rtn``).

  Returns:
    ``LayerResult(Q, L, R, codes, scales, zeros, info)``. ``info`` holds ``rel_err`` =
    ``tr(EᵀHE)/tr(WᵀHW)``, ``E = W − Q − LR`` with the undamped H; ``rel_err_quantized`` (Q alone) and
    ``rel_err_method`` (before refinement); ``objective`` (damped, after each refinement step); ``damp``
    actually used, ``lam``; ``upper_bound``/``lower_estimate`` relative to ``tr(WᵀHW)`` (``quant.bounds``);
    ``srr_k``; ``seconds``. With ``diagnostics=False`` only ``damp``, ``lam``, ``srr_k`` and ``seconds`` are
    filled (the error and bound evaluations cost several d_in² d_out matmuls and an eigendecomposition).

  Raises:
    ValueError: on NaN/Inf input, mismatched shapes, a rank above min(d_in, d_out), a group size that does not
      divide d_in, bits outside 2..8, or a Hessian that stays indefinite after damping escalation.
  """
  fields = {f.name for f in dataclasses.fields(LayerConfig)}
  unknown = set(options) - fields
  if unknown:
    raise TypeError(f"unknown option(s) {sorted(unknown)}; valid options: {sorted(fields - {'method'})}")
  cfg = LayerConfig(method=method, bits=bits, rank=int(rank), group_size=group_size, symmetric=symmetric,
                    loops=int(loops), act_order=act_order, **options)
  t0 = time.perf_counter()
  W = jnp.asarray(W)
  dtype = jnp.promote_types(W.dtype, jnp.float32)
  W = W.astype(dtype)
  H = jnp.asarray(H).astype(dtype)
  _validate(W, H, cfg, damp)
  r = cfg.effective_rank
  d_in, d_out = W.shape
  empty = lowrank.LowRank(jnp.zeros((d_in, 0), dtype), jnp.zeros((0, d_out), dtype))
  Hf, Wz, _ = _prepare(W, H)
  info: dict[str, Any] = {"method": method, "bits": bits, "rank": r, "group_size": group_size}

  ih = None
  srr_k = None
  if cfg.method == "rtn":
    codes, grid = _rtn(W, cfg)
    lam = hessian.damping(Hf, damp)
    lr = empty
  elif cfg.method == "srr":
    lam = hessian.damping(Hf, damp)
    k_fixed = -1 if cfg.srr_k is None else cfg.srr_k
    S, S_inv, k, pres = _srr_preserve(Wz, Hf, lam, jax.random.key(seed), k_fixed, r, cfg.srr_scaling)
    Wres = Wz - jnp.matmul(pres.L, pres.R, precision=HIGHEST)
    if cfg.srr_quantizer == "rtn":
      codes, grid = _rtn(Wres, cfg)
    else:
      codes, grid, lam, _, damp = _gptq_stage(Wres, Wres, Hf, damp, dataclasses.replace(cfg, method="gptq"))
    Q = _dequantize(codes, grid, cfg.spec)
    lr = _srr_reconstruct(Wres - Q, S, S_inv, pres, k, r)
    srr_k = int(k)
  else:
    codes, grid, lam, ih, damp = _gptq_stage(W, Wz, Hf, damp, cfg)
    lr = empty
  Q = _dequantize(codes, grid, cfg.spec)
  diag = cfg.diagnostics
  if diag:
    info["rel_err_quantized"] = float(_rel_err(W, Q, empty.L, empty.R, H))

  Hd = Hf + hessian.damping(Hf, damp) * jnp.eye(d_in, dtype=dtype)
  if cfg.method == "gptq+lorc":
    lr = _lorc(Wz - Q, r)
  elif cfg.method == "gptq+olrc":
    lr, _ = _olrc(Wz - Q, Hd, r)
  elif cfg.method == "gilora":
    lr = lowrank.LowRank(ih.V, _ridge(ih, Wz - Q))
  refine = cfg.loops > 0 or (cfg.method == "gilora" and cfg.final_olrc)
  objective = []
  if diag:
    info["rel_err_method"] = float(_rel_err(W, Q, lr.L, lr.R, H))
    if refine:
      objective.append(float(_objective(Wz, Q, lr.L, lr.R, Hd)))
  if refine:
    for _ in range(cfg.loops):
      lr, _ = _olrc(Wz - Q, Hd, r)
      if diag:
        objective.append(float(_objective(Wz, Q, lr.L, lr.R, Hd)))
      codes, R = _bidup_step(Wz, codes, grid, lr.L, lr.R, Hd, cfg)
      lr = lowrank.LowRank(lr.L, R)
      Q = _dequantize(codes, grid, cfg.spec)
      if diag:
        objective.append(float(_objective(Wz, Q, lr.L, lr.R, Hd)))
    lr, _ = _olrc(Wz - Q, Hd, r)
    if diag:
      objective.append(float(_objective(Wz, Q, lr.L, lr.R, Hd)))

  lam = hessian.damping(Hf, damp)
  info.update(damp=float(damp), lam=float(lam), srr_k=srr_k)
  if diag:
    eigs = jnp.linalg.eigvalsh(Hf)
    tr_whw = float(lowrank.objective(W, H))
    info.update(
        rel_err=float(_rel_err(W, Q, lr.L, lr.R, H)),
        objective=objective,
        upper_bound=float(bounds_lib.upper_bound(eigs, grid.scales, r, lam)) / tr_whw,
        lower_estimate=float(bounds_lib.lower_estimate(eigs, W, bits, r)) / tr_whw,
    )
  jax.block_until_ready((Q, lr, codes))
  info["seconds"] = time.perf_counter() - t0
  return LayerResult(Q, lr.L, lr.R, codes, grid.scales, grid.zeros, info)
