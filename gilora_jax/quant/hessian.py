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

Preparing a site. The linears of one input site (q/k/v, gate/up) share one H, so everything that depends on H
alone is done once per site by ``prepare(H, damp) -> Site``: the data checks (finite, symmetric, a Gram
matrix, calibration tokens behind it), dead features, the damped factor (with damping escalation), and one
eigendecomposition that gilora, SRR and the bounds all read. Every algorithm accepts either H or a Site.

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

import functools
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gilora_jax.quant import linalg
from gilora_jax.quant.linalg import HIGHEST

log = logging.getLogger(__name__)

MAX_ESCALATIONS = 4  # damp × 10 each time: 0.01 → 100 at most, then fail
FACTORS = ("cholesky", "eigh")


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
  # linalg.tn, not x.T @ x: that one's sum over tokens is split by the thread count, so H (and every code
  # downstream) would change with the machine.
  return HessianStats(stats.xtx + linalg.tn(x, x), stats.count + n)


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


def shifted(H: jax.Array, lam: float | jax.Array) -> jax.Array:
  """``H + λ I`` for an absolute λ (gilora's augmented λ, SRR's): the one place a diagonal shift is formed."""
  return H + lam * jnp.eye(H.shape[0], dtype=H.dtype)


def damped(H: jax.Array, damp: float | jax.Array) -> jax.Array:
  """``H_λ = H + λ I`` with the relative ``λ = damp · mean(diag H)``."""
  return shifted(H, damping(H, damp))


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
  """Top-r eigenpairs of a symmetric H: ``(σ² (r,) descending, V_r (d, r))`` (``linalg.top_eigh``)."""
  return linalg.top_eigh(H, r)


# ------------------------------------------------------------------------------------------------ prepared sites


class Factor(NamedTuple):
  """A damped Hessian's triangular factor, as the GPTQ sweep reads it."""
  Tt: jax.Array            # (d, d) lower-triangular Tᵀ, T Tᵀ = the damped Hessian in sweep order
  perm: jax.Array | None   # (d,) act-order's row order, or None for the natural order
  damp: float              # the relative damping actually used (after any escalation)


class NotPSDError(ValueError):
  """H is not positive semi-definite beyond round-off: it cannot be a Gram matrix XᵀX."""


@jax.jit
def _checks(H):
  """Data checks of H and its dead features, in a few cheap passes (H is not copied).

  Returns the dead mask, mean diag H with dead entries counted as 1 (the unit of the damping), and the checks:
  whether every entry is finite, the relative asymmetry ``‖(H − Hᵀ) v‖ / ‖H v‖`` for a fixed random probe v
  (≈ 1e-7 for a Gram matrix, O(1) for a matrix that is not one; two mat-vecs instead of a d² transposition),
  the most negative diagonal entry relative to the largest, and the largest diagonal entry (0: no data).
  The probe is ``cos(1.618… · i)``, not a random draw: a threefry draw made this the slowest compile of a layer's
  quantization (0.6 s of ~3 s per distinct shape on a 2-core CPU); any fixed vector with no structure H could
  align with serves.
  """
  diag = jnp.diagonal(H)
  v = jnp.cos(jnp.arange(H.shape[0], dtype=H.dtype) * 1.6180339887)
  Hv, vH = jnp.matmul(H, v, precision=HIGHEST), jnp.matmul(v, H, precision=HIGHEST)
  tiny = jnp.finfo(H.dtype).tiny
  checks = {"finite": jnp.isfinite(H).all(),
            "asym": jnp.linalg.norm(Hv - vH) / jnp.maximum(jnp.linalg.norm(Hv), tiny),
            "neg_diag": -jnp.min(diag) / jnp.maximum(jnp.max(jnp.abs(diag)), tiny),
            "max_diag": jnp.max(jnp.abs(diag))}
  dead = diag == 0
  return dead, jnp.mean(jnp.where(dead, 1.0, diag)), checks


_fix_dead_h = jax.jit(lambda H: fix_dead(H, jnp.zeros((H.shape[0], 0), H.dtype))[0])
_eigh = jax.jit(linalg.eigh_desc)
_eigvalsh = jax.jit(jnp.linalg.eigvalsh)


@functools.partial(jax.jit, static_argnames=("act_order", "method"))
def _damped_factor(H, damp, act_order: bool, method: str):
  """The damped H in sweep order, its transposed factor, and whether the factor is finite."""
  Hd = damped(H, damp)
  perm = jnp.argsort(-jnp.diagonal(Hd), stable=True) if act_order else None
  Tt = factor(Hd if perm is None else Hd[perm][:, perm], method, transpose=True)
  return Tt, perm, factor_ok(Tt)


def factor_ok(Tt: jax.Array) -> jax.Array:
  """Whether a factor from ``factor`` is usable: a failed Cholesky is NaN throughout, so its diagonal tells."""
  diag = jnp.diagonal(Tt)
  return jnp.all(jnp.isfinite(diag) & (diag > 0))


# A Gram matrix formed in float32 has eigenvalues below zero only by round-off, a few 1e-7 of the largest; an
# indefinite matrix beyond this relative tolerance is refused rather than damped into a meaningless objective.
_PSD_TOL = {np.dtype("float32"): 1e-4, np.dtype("float64"): 1e-10}


class Site:
  """A calibration Hessian prepared once for every linear that reads the same inputs (see the module docstring).

  Attributes:
    H: (d, d) the Hessian as given; errors are measured with it.
    Hf: (d, d) with dead features fixed (``H_ii ← 1``), what the algorithms factor.
    dead: (d,) bool mask of dead features, or None when there are none.
    mean_diag: float, mean diag of ``Hf``: the unit of the relative damping.
    damp: the default relative damping of the algorithms that take this site.
    method: the default factorisation, ``"cholesky"`` or ``"eigh"``.

  Methods compute on first use and memoise: ``factor(damp, act_order)``, ``eigh()``, ``eigenvalues()``, and
  ``memo(key, fn)`` for an algorithm's own H-only work (gilora's deflated factor). Hold a site only while
  quantizing its linears: it keeps a few (d, d) arrays alive.
  """

  def __init__(self, H: jax.Array, Hf: jax.Array, dead: jax.Array | None, mean_diag: float, *, damp: float,
               method: str):
    self.H, self.Hf, self.dead, self.mean_diag = H, Hf, dead, mean_diag
    self.damp, self.method = damp, method
    self._memo: dict[tuple, Any] = {}

  @property
  def d(self) -> int:
    return self.H.shape[0]

  def computed(self) -> list[tuple]:
    """The keys of what has been computed and memoised so far (``("factor", damp, act_order, method)``, ...)."""
    return list(self._memo)

  def memo(self, key: tuple, fn: Callable[[], Any]) -> Any:
    if key not in self._memo:
      self._memo[key] = fn()
    return self._memo[key]

  def zero_dead(self, W: jax.Array) -> jax.Array:
    """W with the rows of dead features zeroed (the reference's choice; any value is optimal)."""
    return W if self.dead is None else _zero_rows(W, self.dead)

  def eigh(self) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs of ``Hf``, descending (``linalg.eigh_desc``), computed once; an H found indefinite beyond
    round-off by them is refused (``check_psd``)."""
    def make():
      e, V = _eigh(self.Hf)
      self._check_eigenvalues(e)
      return e, V
    return self.memo(("eigh",), make)

  def eigenvalues(self) -> jax.Array:
    """Eigenvalues of ``Hf`` (from ``eigh()`` when it has run, else the cheaper values-only routine), checked
    like ``eigh()``'s."""
    if ("eigh",) in self._memo:
      return self._memo[("eigh",)][0]

    def make():
      e = _eigvalsh(self.Hf)
      self._check_eigenvalues(e)
      return e
    return self.memo(("eigvalsh",), make)

  def factor(self, damp: float | None = None, *, act_order: bool = False, method: str | None = None) -> Factor:
    """The transposed factor of ``Hf + λI`` (act-order: in sweep order), escalating the damping if needed."""
    damp = self.damp if damp is None else damp
    method = self.method if method is None else method
    if method == "eigh":  # it floors eigenvalues and never fails: check what it would hide
      self.check_psd()

    def make():
      used, (Tt, perm) = self.escalate(lambda d: _damped_factor(self.Hf, d, act_order, method), damp, method)
      return Factor(Tt, perm, used)
    return self.memo(("factor", damp, act_order, method), make)

  def escalate(self, make: Callable[[float], tuple], damp: float, method: str) -> tuple[float, tuple]:
    """Runs ``make(damp) -> (*outputs, ok)`` and, while ``ok`` is False (a factor that is not finite), ×10 the
    damping (logged), up to ``MAX_ESCALATIONS`` times; returns ``(damp used, outputs)``. The first failure is
    diagnosed: an H that is indefinite beyond round-off raises ``NotPSDError`` instead of being damped into an
    objective that can go negative."""
    for attempt in range(MAX_ESCALATIONS + 1):
      *out, ok = make(damp)
      if bool(ok):
        return damp, tuple(out)
      if attempt == 0:
        self.check_psd()
      if attempt < MAX_ESCALATIONS:
        log.warning("Hessian is not positive definite after damping %.3g (%s factor); retrying with damp=%.3g.",
                    damp, method, damp * 10)
        damp *= 10
    raise ValueError(
        f"The Hessian is not positive definite even with damp={damp:g} (relative to its mean diagonal), although it "
        f"is positive semi-definite up to round-off: it is too close to singular for {method}. Pass a larger damp "
        f"(0.01 is the reference's) or factor='eigh', which floors tiny eigenvalues.")

  def check_psd(self) -> None:
    """Raises ``NotPSDError`` when the smallest eigenvalue of ``Hf`` is below −tol · the largest (round-off of
    a Gram matrix stays far above; tol 1e-4 in float32, 1e-10 in float64). Runs with every eigendecomposition of
    the site (gilora's, SRR's, the bounds', ``factor="eigh"``) and when a Cholesky fails; a GPTQ-only call
    without diagnostics on an H that is indefinite by less than its damping optimises the damped objective,
    which is then positive definite, and reports no error."""
    self.eigenvalues()

  def _check_eigenvalues(self, e: jax.Array) -> None:
    e = np.asarray(e, np.float64)
    lo, hi = float(e.min()), float(np.abs(e).max())
    tol = _PSD_TOL.get(np.dtype(self.Hf.dtype), 1e-4)
    if hi > 0 and lo < -tol * hi:
      raise NotPSDError(
          f"H is not positive semi-definite: its smallest eigenvalue is {lo:.3g}, {-lo / hi:.2g} of the largest "
          f"(a Gram matrix XᵀX has none below round-off, about {tol:g} of it). It was not built as XᵀX: a "
          f"difference of Hessians, a mixed-precision sum or a corrupted file? Rebuild it with hessian.update.")


_zero_rows = jax.jit(lambda W, dead: jnp.where(dead[:, None], 0.0, W))


def prepare(H: jax.typing.ArrayLike, damp: float = 0.01, *, method: str = "cholesky",
            dtype: Any = None) -> Site:
  """Checks H once and returns the ``Site`` every linear of this input site shares.

  Args:
    H: (d, d) calibration Hessian ``XᵀX`` (``update``).
    damp: the default relative damping (``λ = damp · mean diag H``) of the algorithms that take the site.
    method: the default factorisation, ``"cholesky"`` or ``"eigh"`` (``factor``).
    dtype: compute dtype (default: float32, or float64 for float64 input under ``jax_enable_x64``).

  Raises:
    ValueError: H is not finite, not symmetric, has a negative diagonal (not a Gram matrix), or is all zero
      (no calibration token reached the layer), each with the likely cause and the fix.

  Example:
    >>> site = prepare(jnp.diag(jnp.array([4.0, 0.0, 1.0])))
    >>> site.dead.tolist(), round(site.mean_diag, 3)
    ([False, True, False], 2.0)
  """
  if isinstance(H, Site):
    return H
  H = H if isinstance(H, jax.Array) else np.asarray(H)
  if H.ndim != 2 or H.shape[0] != H.shape[1]:
    raise ValueError(f"H must be a square (d_in, d_in) matrix XᵀX; got shape {tuple(H.shape)}.")
  dtype = jax.dtypes.canonicalize_dtype(jnp.promote_types(H.dtype, jnp.float32) if dtype is None else dtype)
  H = jnp.asarray(H, dtype)
  dead, mean_diag, checks = _checks(H)
  if not bool(checks["finite"]):
    bad = int(jnp.sum(~jnp.isfinite(H)))  # counted on the error path only
    raise ValueError(f"H contains {bad} NaN/Inf entries; fix the upstream computation (a diverged model, an fp16 "
                     f"overflow in the calibration forward) before quantizing.")
  if float(checks["max_diag"]) == 0.0:
    raise ValueError("H is all zero: no calibration tokens reached this layer. Check that the calibration windows "
                     "are not empty (seqlen, nsamples ≥ 1) and that the token mask is not all padding.")
  if not float(checks["asym"]) <= 1e-3:
    raise ValueError("H is not symmetric; pass the Gram matrix XᵀX (hessian.update accumulates it).")
  if float(checks["neg_diag"]) > 1e-6:
    raise ValueError("H has negative diagonal entries, so it is not a Gram matrix XᵀX; check how it was built.")
  if method not in FACTORS:
    raise ValueError(f"factor={method!r} is unknown; use 'cholesky' or 'eigh'.")
  any_dead = bool(jnp.any(dead))
  return Site(H, _fix_dead_h(H) if any_dead else H, dead if any_dead else None, float(mean_diag), damp=damp,
              method=method)
