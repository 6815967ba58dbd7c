"""The `METHODS` table: each method of the papers as a composition of the math layer's functions.

  rtn        grid.rtn                                         round-to-nearest on the fitted grid
  gptq       gptq.gptq                                        the GPTQ sweep (Frantar et al., Alg. 1)
  gptq+lorc  gptq.gptq → lowrank.lorc                         then the unweighted SVD of W − Q (ZeroQuant-V2)
  gptq+olrc  gptq.gptq → lowrank.olrc                         then the optimal weighted compensation (Paper A, Alg. 2)
  gilora     intrinsic.gilora (→ refine.refine, loops = 0)    GPTQ-intrinsic LoRA (Paper A, Alg. 3), then one OLrC
  srr        srr.srr (→ refine.refine, loops = 0)             preserve top-k, quantize the residual, reconstruct
                                                              (Paper B), then one OLrC of the final Q

Each entry maps `(W, site, cfg)` (the weight, its prepared `hessian.Site`, a `LayerConfig`) to a `MethodOutput`:
the quantized part, the method's own low-rank term, the damping it used, and the factor that the refinement
loops may reuse, and the damped objective where the method has it for free (OLrC's optimum). `quantize_layer`
adds the refinement loops (`refine.refine`) and the report.
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from gilora_jax import config as config_lib
from gilora_jax.config import LayerConfig
from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant import gptq as gptq_lib
from gilora_jax.quant import hessian, intrinsic, lowrank
from gilora_jax.quant import srr as srr_lib
from gilora_jax.quant.grid import Grid


class MethodOutput(NamedTuple):
  codes: jax.Array          # (d_in, d_out) uint8
  grid: Grid                # (G, d_out)
  Q: jax.Array              # (d_in, d_out)
  lr: lowrank.LowRank       # the method's own low-rank term, rank 0 for rtn and gptq
  damp: float               # the relative damping used (after any escalation)
  lam: float                # λ of the method's damped objective (gilora: its augmented pass's)
  Tt: jax.Array | None      # the transposed factor of H + λI in natural order, when the method made one
  srr_k: int | None         # SRR's preserved rank
  objective: jax.Array | None = None  # the damped objective of Q + L R when the method computed it anyway
  olrc_of_q: bool = False   # lr is OLrC(W − Q) at this damping and `objective` its optimum: refinement starts there


def _empty(W: jax.Array) -> lowrank.LowRank:
  return lowrank.LowRank(jnp.zeros((W.shape[0], 0), W.dtype), jnp.zeros((0, W.shape[1]), W.dtype))


def _gptq_kwargs(cfg: LayerConfig) -> dict:
  g = cfg.gptq
  return dict(damp=cfg.damp, act_order=g.act_order, static_groups=g.static_groups, block_size=g.block_size,
              factor=g.factor)


def _natural(f: hessian.Factor | None) -> jax.Array | None:
  """A factor of H + λI that OLrC can reuse: only in the natural row order."""
  return None if f is None or f.perm is not None else f.Tt


_rtn_q = jax.jit(grid_lib.rtn_dequantized, static_argnames=("spec",))
_lorc = jax.jit(lambda Wz, Q, rank: lowrank.lorc(Wz - Q, rank), static_argnames=("rank",))


@functools.partial(jax.jit, static_argnames=("rank",))
def _olrc(Wz, Q, H, damp, Tt, rank: int):
  return lowrank.olrc(Wz - Q, hessian.damped(H, damp), rank, T=None if Tt is None else Tt.T)


def rtn(W: jax.Array, site: hessian.Site, cfg: LayerConfig) -> MethodOutput:
  codes, grid, Q = _rtn_q(site.zero_dead(W), cfg.grid)
  return MethodOutput(codes, grid, Q, _empty(W), cfg.damp, cfg.damp * site.mean_diag, None, None)


def gptq(W: jax.Array, site: hessian.Site, cfg: LayerConfig) -> MethodOutput:
  r = gptq_lib.gptq(W, site, cfg.grid, **_gptq_kwargs(cfg))
  return MethodOutput(r.codes, r.grid, r.Q, _empty(W), r.factor.damp, r.factor.damp * site.mean_diag,
                      _natural(r.factor), None)


def gptq_lorc(W: jax.Array, site: hessian.Site, cfg: LayerConfig) -> MethodOutput:
  out = gptq(W, site, cfg)
  return out._replace(lr=_lorc(site.zero_dead(W), out.Q, cfg.rank))


def gptq_olrc(W: jax.Array, site: hessian.Site, cfg: LayerConfig) -> MethodOutput:
  out = gptq(W, site, cfg)
  lr, optimum = _olrc(site.zero_dead(W), out.Q, site.Hf, out.damp, out.Tt, cfg.rank)
  return out._replace(lr=lr, objective=optimum, olrc_of_q=True)


def gilora(W: jax.Array, site: hessian.Site, cfg: LayerConfig) -> MethodOutput:
  r = intrinsic.gilora(W, site, cfg.grid, cfg.rank, lam_from=cfg.intrinsic_damp, **_gptq_kwargs(cfg))
  return MethodOutput(r.codes, r.grid, r.Q, r.lr, r.factor.damp, float(r.ih.lam), None, None)


def srr(W: jax.Array, site: hessian.Site, cfg: LayerConfig) -> MethodOutput:
  s = cfg.srr
  r = srr_lib.srr(W, site, cfg.grid, cfg.rank, k=s.k, scaling=s.scaling, quantizer=s.quantizer, seed=cfg.seed,
                  **_gptq_kwargs(cfg))
  damp = cfg.damp if r.factor is None else r.factor.damp
  return MethodOutput(r.codes, r.grid, r.Q, r.lr, damp, damp * site.mean_diag, _natural(r.factor), r.k)


METHODS: dict[str, Callable[[jax.Array, hessian.Site, LayerConfig], MethodOutput]] = {
    "rtn": rtn, "gptq": gptq, "gptq+lorc": gptq_lorc, "gptq+olrc": gptq_olrc, "gilora": gilora, "srr": srr}
assert tuple(METHODS) == config_lib.METHODS, "config.METHODS names the table's entries"


def refines(cfg: LayerConfig) -> bool:
  """Whether the refinement step runs after the method: loops requested, or gilora's or SRR's final OLrC (for
  fixed Q the optimum over every rank-r term, so it can only lower the damped objective)."""
  return cfg.refine.loops > 0 or (cfg.method in ("gilora", "srr") and cfg.refine.final_olrc)
