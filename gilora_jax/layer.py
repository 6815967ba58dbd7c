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
import math
import operator
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


_INTEGER_OPTIONS = ("bits", "rank", "group_size", "loops", "block_size", "srr_k")


def _integer(name: str, value: Any) -> Any:
  """``value`` as a Python int (NumPy integers too; None stays None); ``ValueError`` for a float or a bool, which
  would otherwise be truncated (rank=3.7 → 3) or fail deep inside with a TypeError."""
  if value is None:
    return None
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name}={value!r} must be an integer, not a bool.")
  try:
    return operator.index(value)
  except TypeError:
    raise ValueError(f"{name}={value!r} must be an integer (got {type(value).__name__}).") from None


def _validate(W: np.ndarray, H: np.ndarray, cfg: LayerConfig, damp: float) -> None:
  """Checks of shapes and options (host side, no data pass; the data checks run fused in ``_prepare``)."""
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
  if cfg.method not in METHODS:
    raise ValueError(f"method={cfg.method!r} is unknown; choose one of {METHODS}.")
  cfg.spec.validate(d_in)
  if not isinstance(cfg.rank, (int, np.integer)) or cfg.rank < 0:
    raise ValueError(f"rank={cfg.rank!r} must be a non-negative integer.")
  if cfg.effective_rank > min(d_in, d_out):
    raise ValueError(f"rank={cfg.rank} exceeds min(d_in, d_out)={min(d_in, d_out)} for a {d_in}×{d_out} layer; "
                     f"use rank ≤ {min(d_in, d_out)}.")
  if not isinstance(cfg.loops, (int, np.integer)) or cfg.loops < 0:
    raise ValueError(f"loops={cfg.loops!r} must be a non-negative integer.")
  if cfg.block_size < 1:
    raise ValueError(f"block_size={cfg.block_size!r} must be a positive integer (rows per lazy-batch block; 128 is "
                     f"the reference's).")
  if not (damp > 0 and math.isfinite(damp)):
    raise ValueError(f"damp={damp!r} must be positive and finite (the reference uses 0.01 of the mean diagonal).")
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
def _prepare_h(H):
  """Data checks of H and its dead features, in a few cheap passes (H is not copied).

  Returns the dead mask, mean diag H with dead entries counted as 1 (the unit of the damping), and the checks:
  whether every entry is finite, the relative asymmetry ``‖(H − Hᵀ) v‖ / ‖H v‖`` for a fixed random probe v
  (≈ 1e-7 for a Gram matrix, O(1) for a matrix that is not one; two mat-vecs instead of a d² transposition),
  and the most negative diagonal entry relative to the largest.
  """
  diag = jnp.diagonal(H)
  v = jax.random.normal(jax.random.key(0), (H.shape[0],), H.dtype)
  Hv, vH = jnp.matmul(H, v, precision=HIGHEST), jnp.matmul(v, H, precision=HIGHEST)
  tiny = jnp.finfo(H.dtype).tiny
  checks = {"H_finite": jnp.isfinite(H).all(),
            "asym": jnp.linalg.norm(Hv - vH) / jnp.maximum(jnp.linalg.norm(Hv), tiny),
            "neg_diag": -jnp.min(diag) / jnp.maximum(jnp.max(jnp.abs(diag)), tiny)}
  dead = diag == 0
  return dead, jnp.mean(jnp.where(dead, 1.0, diag)), checks


_fix_dead = jax.jit(hessian.fix_dead)
_all_finite = jax.jit(lambda x: jnp.isfinite(x).all())
_results_finite = jax.jit(lambda *xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))


class HessianCache:
  """Memo of the work that depends on H alone, shared by the projections that read the same inputs.

  q/k/v (and gate/up) of a transformer block see the same calibration inputs, hence one H. Pass one
  ``HessianCache()`` to each of their ``quantize_layer`` calls (with the same H) and the symmetrised H, its
  checks, the damped factorisation (including any damping escalation), gilora's eigendecomposition and the
  eigenvalues for the bounds are computed once per site instead of once per projection. Hold it only while
  quantizing that site: it keeps a few (d_in, d_in) arrays alive.
  """

  def __init__(self):
    self._memo: dict[tuple, Any] = {}
    self.shape: tuple[int, ...] | None = None

  def get(self, key: tuple, fn):
    if key not in self._memo:
      self._memo[key] = fn()
    return self._memo[key]

  def bind(self, H) -> None:
    if self.shape is None:
      self.shape = tuple(H.shape)
    elif self.shape != tuple(H.shape):
      raise ValueError(f"this HessianCache was filled for an H of shape {self.shape}, not {tuple(H.shape)}; use "
                       f"one cache per input site.")


def _check_data(H, W, checks: dict) -> None:
  """Raises on the data problems ``_prepare_h`` measured (one host transfer of a few scalars)."""
  for name, x, finite in (("H", H, checks["H_finite"]), ("W", W, _all_finite(W))):
    if not bool(finite):
      bad = int(jnp.sum(~jnp.isfinite(x)))  # counted on the error path only
      raise ValueError(f"{name} contains {bad} NaN/Inf entries; fix the upstream computation (a diverged model, "
                       f"an fp16 overflow in the calibration forward) before quantizing.")
  if not float(checks["asym"]) <= 1e-3:
    raise ValueError("H is not symmetric; pass the Gram matrix XᵀX (hessian.update accumulates it).")
  if float(checks["neg_diag"]) > 1e-6:
    raise ValueError("H has negative diagonal entries, so it is not a Gram matrix XᵀX; check how it was built.")


@functools.partial(jax.jit, static_argnames=("deflate_rank", "act_order", "method"))
def _factor(H, damp, deflate_rank: int | None, act_order: bool, method: str):
  """The damped sweep Hessian (deflated for gilora) in sweep order, its triangular factor, and whether it is
  finite; gilora's intrinsic parts ride along."""
  if deflate_rank is not None:
    ih = intrinsic.deflate(H, deflate_rank, damp)
    Hd = ih.S
  else:
    ih = None
    Hd = H + hessian.damping(H, damp) * jnp.eye(H.shape[0], dtype=H.dtype)
  perm = jnp.argsort(-jnp.diagonal(Hd), stable=True) if act_order else None
  Tt = hessian.factor(Hd if perm is None else Hd[perm][:, perm], method, transpose=True)
  # A failed Cholesky is NaN throughout, so its diagonal tells (no pass over the whole factor).
  diag = jnp.diagonal(Tt)
  ok = jnp.all(jnp.isfinite(diag) & (diag > 0))
  return ih, Tt, perm, ok


def _gptq(W, Tt, perm, W_grid, spec: QuantGrid, lazy: bool, block_size: int):
  """GPTQ codes in the original row order, the grid and Q (``Tt``: the transposed factor, in sweep order).

  Not jitted as a whole: ``gptq_lib.gptq`` is a driver whose segments share one compiled sweep (a single traced
  graph would compile every segment separately); the steps around it are jitted on their own.
  """
  gptq = functools.partial(gptq_lib.gptq, block_size=block_size, transposed=True)
  if lazy:
    return gptq(W, Tt, spec)
  if perm is None:  # contiguous groups: the sweep reads one grid row per micro-block
    grid = _fixed_grid(W, W_grid, spec)
    codes, _, Q = gptq(W, Tt, spec, grid=grid)
    return codes, grid, Q
  grid, W_sweep, row_group = _fixed_grid_in_order(W, W_grid, perm, spec)
  codes, _, Q = gptq(W_sweep, Tt, spec, grid=grid, row_group=row_group)
  codes, Q = _unpermute(codes, Q, perm)
  return codes, grid, Q


@functools.partial(jax.jit, static_argnames=("spec",))
def _fixed_grid(W, W_grid, spec: QuantGrid):
  """Grids fixed up front. As the reference: per-channel grids come from W as given, static group grids from W
  with dead rows zeroed."""
  return grid_lib.fit_grid(W_grid if spec.group_size is None else W, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _fixed_grid_in_order(W, W_grid, perm, spec: QuantGrid):
  """Act-order's static grids (``_fixed_grid``), the rows in sweep order and the group each reads."""
  return _fixed_grid(W, W_grid, spec), W[perm], grid_lib.contiguous_row_group(W.shape[0], spec)[perm]


@jax.jit
def _unpermute(codes_p, Q_p, perm):
  return jnp.zeros_like(codes_p).at[perm].set(codes_p), jnp.zeros_like(Q_p).at[perm].set(Q_p)


@functools.partial(jax.jit, static_argnames=("spec",))
def _rtn(W, spec: QuantGrid):
  codes, grid = grid_lib.rtn(W, spec)
  return codes, grid, grid_lib.dequantize(codes, grid, spec)


@functools.partial(jax.jit, static_argnames=("method", "rank", "diagnostics"))
def _compensate(W, Wz, H, Hf, Q, ih, damp, Tt, method: str, rank: int, diagnostics: bool):
  """The method's own low-rank term for the quantized part Q, and the pre-refinement errors (``Tt``: the sweep's
  factor of the same damped H when there is one, so OLrC does not factor it again)."""
  Hd = _damped(Hf, damp)
  E = Wz - Q
  if method == "gptq+lorc":
    lr = lowrank.lorc(E, rank)
  elif method == "gptq+olrc":
    lr, _ = lowrank.olrc(E, Hd, rank, T=_upper(Tt))
  elif method == "gilora":
    lr = lowrank.LowRank(ih.V, intrinsic.ridge_r(ih, E))
  else:
    lr = lowrank.LowRank(jnp.zeros((W.shape[0], 0), W.dtype), jnp.zeros((0, W.shape[1]), W.dtype))
  stats = {}
  if diagnostics:
    zero = lowrank.LowRank(lr.L[:, :0], lr.R[:0])
    stats = {"rel_err_quantized": _rel_err(W, Q, zero, H), "rel_err_method": _rel_err(W, Q, lr, H),
             "objective": lowrank.objective(Wz - Q - _mm(lr.L, lr.R), Hd)}
  return lr, stats


def _damped(H, damp):
  return H + hessian.damping(H, damp) * jnp.eye(H.shape[0], dtype=H.dtype)


def _upper(Tt):
  return None if Tt is None else Tt.T


@functools.partial(jax.jit, static_argnames=("spec", "rank", "loops", "order", "deflated", "block_size"))
def _refine(Wz, codes, grid, Hf, damp, Tt, spec: QuantGrid, rank: int, loops: int, order: str, deflated: bool,
            block_size: int):
  """``loops`` × [OLrC → Bid-Up] then OLrC; returns codes, Q, (L, R) and the objective after every step."""
  trace = []
  Hd = _damped(Hf, damp)
  T = _upper(Tt)

  def objective(Q, lr):
    return lowrank.objective(Wz - Q - _mm(lr.L, lr.R), Hd)

  Q = grid_lib.dequantize(codes, grid, spec)
  for _ in range(loops):  # loops is small (Paper A: 1–2) and static; each iteration is two exact block steps
    lr, _ = lowrank.olrc(Wz - Q, Hd, rank, T=T)
    trace.append(objective(Q, lr))
    if deflated:
      HS, P = bidup_lib.deflated_hessian(Hd, lr.L)
      codes = bidup_lib.bidup(Wz, codes, grid, HS, spec, order=order, block_size=block_size)
      Q = grid_lib.dequantize(codes, grid, spec)
      lr = lowrank.LowRank(lr.L, _mm(P, Wz - Q))
    else:
      codes = bidup_lib.bidup(Wz - _mm(lr.L, lr.R), codes, grid, Hd, spec, order=order, block_size=block_size)
      Q = grid_lib.dequantize(codes, grid, spec)
    trace.append(objective(Q, lr))
  lr, _ = lowrank.olrc(Wz - Q, Hd, rank, T=T)
  trace.append(objective(Q, lr))
  return codes, Q, lr, jnp.stack(trace)


@functools.partial(jax.jit, static_argnames=("bits", "rank"))
def _report(W, H, eigs, Q, lr, scales, lam, bits: int, rank: int):
  """Final relative error and Paper A's bounds, relative to tr(WᵀHW)."""
  tr = jnp.maximum(lowrank.objective(W, H), jnp.finfo(W.dtype).tiny)
  return {"rel_err": _rel_err(W, Q, lr, H),
          "upper_bound": bounds_lib.upper_bound(eigs, scales, rank, lam) / tr,
          "lower_estimate": bounds_lib.lower_estimate(eigs, W, bits, rank) / tr}


_eigvalsh = jax.jit(jnp.linalg.eigvalsh)


@jax.jit
def _final_rel_err(W, Q, lr, H):
  return _rel_err(W, Q, lr, H)


@jax.jit
def _objective(Wz, Q, lr, Hf, damp):
  return lowrank.objective(Wz - Q - _mm(lr.L, lr.R), _damped(Hf, damp))


@functools.partial(jax.jit, static_argnames=("rank", "scaling"))
def _srr_preserve(W, H, lam, key, k_fixed, rank, scaling):
  """Scaling, k (criterion unless k_fixed ≥ 0), the preserved term masked to its first k components, residual."""
  S, S_inv = srr_lib.scaling(H, scaling, lam)
  k = jnp.where(k_fixed >= 0, k_fixed, srr_lib.choose_k(W, S, rank, key))
  pres = srr_lib.truncated(_mm(S, W), S_inv, rank)
  keep = jnp.arange(rank) < k
  pres = lowrank.LowRank(pres.L * keep[None, :], pres.R * keep[:, None])
  return S, S_inv, k, pres, W - _mm(pres.L, pres.R)


@functools.partial(jax.jit, static_argnames=("spec", "rank"))
def _srr_reconstruct(Wres, codes, grid, S, S_inv, pres, k, spec: QuantGrid, rank: int):
  """``S⁻¹ SVD_{r−k}(S E)`` and the rank-r concatenation [L₁ L₂] with the first k of L₁, first r−k of L₂."""
  E = Wres - grid_lib.dequantize(codes, grid, spec)
  rec = srr_lib.truncated(_mm(S, E), S_inv, rank)
  both = srr_lib.concat(pres, rec)  # (d_in, 2r): keep columns i < k of the first, i < r − k of the second
  i = jnp.arange(rank)
  idx = jnp.where(i < k, i, rank + i - k)
  return lowrank.LowRank(both.L[:, idx], both.R[idx])


def _mm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def _rel_err(W, Q, lr, H):
  E = W - Q - _mm(lr.L, lr.R)
  return lowrank.objective(E, H) / jnp.maximum(lowrank.objective(W, H), jnp.finfo(W.dtype).tiny)


# ----------------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------------


def _factor_with_escalation(H, damp: float, cfg: LayerConfig):
  """Damped sweep Hessian and its factor; damping × 10 (logged) while the factor is not finite, then fail."""
  for attempt in range(_MAX_ESCALATIONS + 1):
    aux, T, perm, ok = _factor(H, damp, cfg.rank if cfg.method == "gilora" else None, cfg.act_order, cfg.factor)
    if bool(ok):
      return aux, T, perm, damp
    if attempt < _MAX_ESCALATIONS:
      log.warning("Hessian is not positive definite after damping %.3g (%s factor); retrying with damp=%.3g.",
                  damp, cfg.factor, damp * 10)
      damp *= 10
  raise ValueError(
      f"The Hessian is not positive definite even with damp={damp:g} (relative to its mean diagonal). It is "
      f"probably corrupted (NaN-free but indefinite): rebuild it as XᵀX from finite calibration inputs, or try "
      f"factor='eigh', which floors tiny eigenvalues.")


def _gptq_stage(W, Wz, H, damp, cfg: LayerConfig, cache: HessianCache):
  """GPTQ (or its gilora variant) with damping escalation; returns codes, grid, Q, gilora's parts, damp used,
  and the transposed factor of ``H + λI`` in the original row order (None for gilora's deflated H or act-order's
  permuted one), which OLrC can reuse."""
  key = ("factor", damp, cfg.rank if cfg.method == "gilora" else None, cfg.act_order, cfg.factor)
  aux, T, perm, damp = cache.get(key, lambda: _factor_with_escalation(H, damp, cfg))
  lazy = cfg.group_size is not None and not (cfg.act_order or cfg.static_groups)
  codes, grid, Q = _gptq(Wz, T, perm, W, cfg.spec, lazy, cfg.block_size)
  return codes, grid, Q, aux, damp, (T if perm is None and aux is None else None)


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
    *,
    hessian_cache: HessianCache | None = None,
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
    hessian_cache: a ``HessianCache`` shared by the projections that read the same inputs (same H), so the
      H-only work (checks, factorisation, eigendecompositions) runs once per input site.
    **options: further ``LayerConfig`` fields: ``static_groups``, ``shrink`` (β), ``mse`` (clip search),
      ``block_size``, ``factor`` (``"cholesky"``/``"eigh"``), ``final_olrc`` (gilora: one OLrC of its Q when
      loops = 0; default True), ``bidup_order`` (``forward``/``backward``/``both``), ``bidup_deflated``,
      ``srr_scaling`` (``identity``/``diag``/``exact``), ``srr_k`` (None = criterion), ``srr_quantizer``
      (``gptq``/``rtn``).

  Returns:
    ``LayerResult(Q, L, R, codes, scales, zeros, info)``. ``info`` holds ``rel_err`` =
    ``tr(EᵀHE)/tr(WᵀHW)``, ``E = W − Q − LR`` with the undamped H; ``rel_err_quantized`` (Q alone) and
    ``rel_err_method`` (before refinement); ``objective`` (damped, after each refinement step); ``damp``
    actually used; ``lam``, the λ of the method's sweep and of the upper bound (gilora: its augmented pass's,
    ``intrinsic.deflate``; refinement and OLrC damp with ``damp · mean diag H``); ``upper_bound`` /
    ``lower_estimate`` relative to ``tr(WᵀHW)`` (``quant.bounds``); ``srr_k``; ``seconds``. With
    ``diagnostics=False`` only ``damp``, ``lam``, ``srr_k`` and ``seconds`` are filled (the error and bound
    evaluations cost several d_in² d_out matmuls and an eigendecomposition).

  Raises:
    ValueError: on NaN/Inf input, mismatched shapes, a rank above min(d_in, d_out), a group size that does not
      divide d_in, bits outside 2..8, or a Hessian that stays indefinite after damping escalation.
  """
  fields = {f.name for f in dataclasses.fields(LayerConfig)}
  unknown = set(options) - fields
  if unknown:
    raise TypeError(f"unknown option(s) {sorted(unknown)}; valid options: {sorted(fields - {'method'})}")
  ints = {name: _integer(name, value) for name, value in
          dict(bits=bits, rank=rank, group_size=group_size, loops=loops, **options).items() if name in _INTEGER_OPTIONS}
  for name in ("bits", "rank", "loops", "block_size"):
    if name in ints and ints[name] is None:
      raise ValueError(f"{name}=None must be an integer.")
  cfg = LayerConfig(method=method, symmetric=symmetric, act_order=act_order, **{**options, **ints})
  try:
    damp = float(damp)
  except (TypeError, ValueError):
    raise ValueError(f"damp={damp!r} must be a positive number.") from None
  t0 = time.perf_counter()
  W = W if isinstance(W, jax.Array) else np.asarray(W)  # device arrays stay on their device
  H = H if isinstance(H, jax.Array) else np.asarray(H)
  _validate(W, H, cfg, damp)
  # float32 (float64 inputs too, unless jax_enable_x64 is on); bfloat16/float16 weights are computed in float32
  dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(W.dtype, jnp.float32))
  W, H = jnp.asarray(W, dtype), jnp.asarray(H, dtype)
  r = cfg.effective_rank
  spec = cfg.spec
  cache = HessianCache() if hessian_cache is None else hessian_cache
  cache.bind(H)
  dead, mean_diag, checks = cache.get(("prepare",), lambda: _prepare_h(H))
  _check_data(H, W, checks)
  # Dead features (H_ii = 0): H_ii ← 1 and W_i ← 0, as the reference; no copies of H and W when there are none.
  Hf, Wz = (_fix_dead(H, W)[:2]) if bool(jnp.any(dead)) else (H, W)
  mean_diag = float(mean_diag)
  info: dict[str, Any] = {"method": method, "bits": bits, "rank": r, "group_size": group_size}

  ih = None
  srr_k = None
  Tt = None  # the factor of H + λI, when a GPTQ sweep made one
  if cfg.method == "rtn":
    codes, grid, Q = _rtn(Wz, spec)
  elif cfg.method == "srr":
    k_fixed = -1 if cfg.srr_k is None else cfg.srr_k
    S, S_inv, k, pres, Wres = _srr_preserve(Wz, Hf, damp * mean_diag, jax.random.key(seed), k_fixed, r,
                                            cfg.srr_scaling)
    if cfg.srr_quantizer == "rtn":
      codes, grid, Q = _rtn(Wres, spec)
    else:
      codes, grid, Q, _, damp, Tt = _gptq_stage(Wres, Wres, Hf, damp, dataclasses.replace(cfg, method="gptq"), cache)
    srr_k = int(k)
  else:
    codes, grid, Q, ih, damp, Tt = _gptq_stage(W, Wz, Hf, damp, cfg, cache)

  lr, stats = _compensate(W, Wz, H, Hf, Q, ih, damp, Tt, "rtn" if cfg.method == "srr" else cfg.method, r,
                          cfg.diagnostics)
  if cfg.method == "srr":
    lr = _srr_reconstruct(Wres, codes, grid, S, S_inv, pres, k, spec, r)
  refine = cfg.loops > 0 or (cfg.method == "gilora" and cfg.final_olrc)
  objective = []
  if cfg.diagnostics:
    info["rel_err_quantized"] = float(stats["rel_err_quantized"])
    info["rel_err_method"] = float(_final_rel_err(W, Q, lr, H)) if cfg.method == "srr" else float(
        stats["rel_err_method"])
  if refine:
    Q0, lr0 = Q, lr
    codes, Q, lr, trace = _refine(Wz, codes, grid, Hf, damp, Tt, spec, r, cfg.loops, cfg.bidup_order,
                                  cfg.bidup_deflated, cfg.block_size)
    if cfg.diagnostics:  # the damped objective before refinement, then after every exact block step
      start = float(stats["objective"]) if cfg.method != "srr" else float(_objective(Wz, Q0, lr0, Hf, damp))
      objective = [start] + [float(v) for v in trace]

  # λ of the method's damped objective, which the bound is stated for: gilora's sweep damps the augmented Hessian
  # (λ = damp · (tr H + Σ_{i≤r} σ_i²)/(N + r), ``intrinsic.deflate``), the others H itself.
  lam = float(ih.lam) if ih is not None else damp * mean_diag
  info.update(damp=float(damp), lam=lam, srr_k=srr_k)
  if cfg.diagnostics:
    eigs = cache.get(("eigvalsh",), lambda: _eigvalsh(Hf))
    info.update({name: float(v) for name, v in _report(W, H, eigs, Q, lr, grid.scales, lam, bits, r).items()})
    info["objective"] = objective
  # Finite inputs can still overflow float32 in the grid (|W| near 3e38: an infinite step); never hand that back.
  if not bool(_results_finite(Q, grid.scales, grid.zeros, lr.L, lr.R)):
    raise ValueError(
        f"quantizing this layer overflowed {Q.dtype} (non-finite scales, Q or low-rank factors) although W and H "
        f"are finite: max |W| = {float(jnp.max(jnp.abs(W))):.3g}. Rescale W (and undo the factor in the next "
        f"layer) or quantize in float64 (jax_enable_x64).")
  jax.block_until_ready((Q, lr, codes))
  info["seconds"] = time.perf_counter() - t0
  return LayerResult(Q, lr.L, lr.R, codes, grid.scales, grid.zeros, info)
