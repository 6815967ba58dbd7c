"""gilora's intrinsic pass: which damping λ, and does re-running it with OLrC's L help? (issue 14, "Study the λ of
the deflated pass and the alternation of OLrC and the intrinsic pass with OLrC's L")

Real layers and Hessians as experiments/layer_defaults.py takes them (the built-in LM, or a local HF folder with
``--model``). Every variant is gilora at the library's grid settings (3-bit per-channel, the clip search and
act-order, rank 32), then one OLrC, and its error ``tr(EᵀHE)/tr(WᵀHW)`` is divided by the old default gptq+olrc's
(``config.PAPER``) on the same layer, as in layer_defaults.py. Variants, by label:

  ``augmented``      λ = damp · mean diag of the augmented Hessian (Paper A; ``intrinsic_damp="augmented"``)
  ``deflated``       λ = damp · mean diag of the deflated Hessian the sweep factors (the library's default)
  ``deflated×c``     c times that (is the deflated diagonal the right scale, or only a better one?)
  ``…+altN``         then N times: the intrinsic pass again with L = the last OLrC's L in place of V_r (the Schur
                     complement ``S_L = H + λI − HL(LᵀHL + λI)⁻¹LᵀH``, formed as Gram matrices of ``H^{1/2}``
                     so it stays ≥ λ in float32), and OLrC of its Q; a round is kept only if it lowers the error
  ``…+loopN``        then N deflated Bid-Up loops (``refine.refine``), the library's refinement

  python experiments/intrinsic_study.py --model runs/smollm2-135m-instruct --blocks 0,10,20,29 --workdir runs/is_smol
  python experiments/intrinsic_study.py --workdir runs/is_lm

One JSON line per (layer, variant) in workdir/metrics.jsonl; the medians (worst in brackets) are printed.
"""
import dataclasses
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for gilora_jax
import _builtin  # noqa: E402  pylint: disable=wrong-import-position
import layer_defaults  # noqa: E402  pylint: disable=wrong-import-position

DEFAULT_VARIANTS = ("augmented", "deflated", "deflated×0.3", "deflated×0.6", "deflated×1.5", "deflated×2",
                    "augmented+alt1", "deflated+alt1", "deflated+alt2", "deflated+loop1", "deflated+alt1+loop1")


@dataclasses.dataclass(frozen=True)
class Args:
  """gilora's intrinsic-pass λ and the OLrC/intrinsic alternation on real layers."""
  bits: int = 3
  rank: int = 32
  damp: float = 0.01
  calib_windows: int = 64
  model: str = ""                           # a local HF folder; empty: the built-in LM
  blocks: tuple[str, ...] = ()              # block indices (comma-separated); empty: all
  variants: tuple[str, ...] = DEFAULT_VARIANTS
  workdir: pathlib.Path = pathlib.Path("runs/intrinsic_study")


def parse(label: str) -> tuple[str, float, int, int]:
  """'deflated×0.6+alt1+loop1' -> ('deflated', 0.6, 1, 1)."""
  head, *rest = label.split("+")
  base, _, scale = head.partition("×")
  if base not in ("augmented", "deflated") or any(not (p[:3] == "alt" or p[:4] == "loop") for p in rest):
    sys.exit(f"--variants: cannot read {label!r}; write e.g. deflated, augmented, deflated×0.6+alt1+loop1")
  alts = sum(int(p[3:]) for p in rest if p.startswith("alt"))
  loops = sum(int(p[4:]) for p in rest if p.startswith("loop"))
  return base, float(scale or 1), alts, loops


def main(a: Args) -> dict:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gilora_jax import config, quantize_layer  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import gptq, hessian, intrinsic, lowrank  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import refine as refine_lib  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant.grid import GridSpec  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant.linalg import mm  # pylint: disable=import-outside-toplevel
  spec, r = GridSpec(bits=a.bits, mse=True), a.rank
  variants = {v: parse(v) for v in a.variants}

  def sweep(Wz, W, S):
    """GPTQ with act-order on the deflated Hessian S (as gilora's own pass)."""
    perm = jnp.argsort(-jnp.diagonal(S), stable=True)
    Tt = hessian.factor(S[perm][:, perm], "cholesky", transpose=True)
    if not bool(hessian.factor_ok(Tt)):
      raise RuntimeError("a deflated Hessian did not factor; raise --damp")
    return gptq.quantize_with_factor(Wz, hessian.Factor(Tt, perm, a.damp), spec, W_grid=W)

  def schur_of(Hh, L, lam):
    """``H + λI − HL(LᵀHL + λI)⁻¹LᵀH = CᵀC + DᵀD + λI`` with ``A = H^{1/2} L = U s Zᵀ``, ``C = (I − UUᵀ)H^{1/2}``,
    ``D = diag(√(λ/(s² + λ))) Uᵀ H^{1/2}`` (push-through identity): Gram matrices, so ≥ λ in any arithmetic."""
    U, s, _ = jnp.linalg.svd(mm(Hh, L), full_matrices=False)
    UtHh = mm(U.T, Hh)
    C = Hh - mm(U, UtHh)
    D = jnp.sqrt(lam / (s**2 + lam))[:, None] * UtHh
    S = mm(C.T, C) + mm(D.T, D) + lam * jnp.eye(L.shape[0], dtype=L.dtype)
    return 0.5 * (S + S.T)

  writer = _builtin.JsonlWriter(a.workdir)
  ratios = {v: [] for v in variants}
  for name, W, H in layer_defaults.layers(a.calib_windows, a.model, a.blocks):
    base = quantize_layer(W, H, method="gptq+olrc", bits=a.bits, rank=r, diagnostics="errors",
                          **config.PAPER).report.rel_err
    site = hessian.prepare(H, a.damp)
    W = jnp.asarray(W)
    Wz, (e, V) = site.zero_dead(W), site.eigh()
    e = jnp.maximum(e, 0.0)
    Hd = hessian.damped(site.Hf, a.damp)
    tr = float(lowrank.objective(W, site.H))
    Hh = mm(V * jnp.sqrt(e)[None, :], V.T)

    def err(Q, lr):
      return float(lowrank.objective(W - Q - mm(lr.L, lr.R), site.H)) / tr  # pylint: disable=cell-var-from-loop

    line = {}
    for label, (lam_from, scale, alts, loops) in variants.items():
      ih = intrinsic.deflate(site.Hf, r, a.damp * scale, eig=(e, V), lam_from=lam_from)  # λ is linear in damp
      lam = ih.lam
      codes, grid, Q = sweep(Wz, W, ih.S)
      lr, _ = lowrank.olrc(Wz - Q, Hd, r)
      best = err(Q, lr)
      for _ in range(alts):
        codes2, _, Q2 = sweep(Wz, W, schur_of(Hh, lr.L, lam))
        lr2, _ = lowrank.olrc(Wz - Q2, Hd, r)
        if err(Q2, lr2) < best:
          best, codes, Q, lr = err(Q2, lr2), codes2, Q2, lr2
      if loops:
        res = refine_lib.refine(Wz, codes, grid, site.Hf, spec, r, loops=loops, damp=a.damp, deflated=True,
                                trace=False)
        best = min(best, err(res.Q, res.lr))
      line[label] = best / base
      ratios[label].append(best / base)
      writer.write(layer=name, variant=label, rel_err=best, ratio=best / base, lam=float(lam))
    print(name, " ".join(f"{k}={v:.3f}" for k, v in line.items()), flush=True)
  print(f"\n{len(ratios[next(iter(ratios))])} layers, {a.bits}-bit per-channel, rank {r}: error / old default "
        f"gptq+olrc (median, worst)")
  table = {}
  for v, x in ratios.items():
    table[v] = dict(median=float(np.median(x)), worst=float(np.max(x)))
    print(f"  {v:<28}{np.median(x):>7.3f} ({np.max(x):.3f})")
  writer.close()
  return table


if __name__ == "__main__":
  main(_builtin.parse_args(Args))
