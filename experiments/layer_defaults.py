"""Which layer settings reach the lowest error, and at what cost? (issue 14, "Defaults that reach the lowest error")

Real layers and Hessians ``XᵀX`` from the built-in LM (``gilora_jax/assets/qwen3-shakespeare``, float taps on
calib.txt, the protocol of probe_builtin_quant.py). For every layer it runs the variants below at the same bits,
grid and rank, and prints, per variant, the error ``tr(EᵀHE)/tr(WᵀHW)`` divided by today's default gptq+olrc on
the same layer (median over layers, worst in brackets) and the wall-clock cost relative to plain GPTQ (median;
after a warm-up call per shape, so compiles are not counted). With ``--srr_bruteforce`` it also tries every SRR
split k = 0..r and reports the criterion's k against the best. One JSON line per (layer, variant) in
workdir/metrics.jsonl. Errors are float32 (the issue's table is float64).

  python experiments/layer_defaults.py --bits 3 --rank 32 --workdir runs/layer_defaults
  python experiments/layer_defaults.py --bits 3 --rank 32 --srr_bruteforce true --workdir runs/layer_defaults_k
  python experiments/layer_defaults.py --model runs/smollm2-135m-instruct --blocks 0,10,20,29 --workdir runs/ld_smol

``--model`` takes any local HF folder of the Llama family (SmolLM2 from experiments/smollm2.py); ``--blocks``
picks the blocks whose linears are measured, ``--variants`` a subset of VARIANTS by label. ``--synthetic D``
replaces the layers by one synthetic D × D layer (benchmarks/layer.py's W and H from 8192 heavy-tailed tokens)
for the cost column at the width of the models users quantize (the clip search grows as d_in·d_out, GPTQ as
d_in²·d_out):

  python experiments/layer_defaults.py --synthetic 4096 --variants "gptq,gilora,gilora mse+act_order" --workdir runs/ld_4096
"""
import dataclasses
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for gilora_jax
import _builtin  # noqa: E402  pylint: disable=wrong-import-position

BEST = dict(mse=True, act_order=True, loops=3, bidup_deflated=True)  # the existing flags that measured best
# label -> quantize_layer options (method and flags), each on top of the flags the defaults had before 2026-12-03
# (gilora_jax.config.PAPER: no clip search, no act-order, Paper A's intrinsic λ), so that every label keeps the
# meaning of the tables measured before; "gilora (default)" takes the library's defaults as they are now.
PLAIN = dict(mse=False, act_order=False, intrinsic_damp="augmented")
DEFLATED = dict(intrinsic_damp="deflated")  # gilora's intrinsic λ from the deflated Hessian (quant.intrinsic)
VARIANTS = {label: {**PLAIN, **kw} for label, kw in {
    "gptq": dict(method="gptq"),
    "gptq+olrc": dict(method="gptq+olrc"),
    "gilora": dict(method="gilora"),
    "gilora 3 deflated loops": dict(method="gilora", loops=3, bidup_deflated=True),
    "gilora mse": dict(method="gilora", mse=True),
    "gilora act_order": dict(method="gilora", act_order=True),
    "gilora mse+act_order": dict(method="gilora", mse=True, act_order=True),
    "gilora mse+act_order 1 deflated loop": dict(method="gilora", mse=True, act_order=True, loops=1,
                                                 bidup_deflated=True),
    "gilora mse+act_order 2 deflated loops": dict(method="gilora", mse=True, act_order=True, loops=2,
                                                  bidup_deflated=True),
    "gilora best flags": dict(method="gilora", **BEST),
    "gilora deflated λ": dict(method="gilora", **DEFLATED),
    "gilora mse+act_order deflated λ": dict(method="gilora", mse=True, act_order=True, **DEFLATED),
    "gilora mse+act_order deflated λ 1 deflated loop": dict(method="gilora", mse=True, act_order=True, loops=1,
                                                           bidup_deflated=True, **DEFLATED),
    "gilora best flags deflated λ": dict(method="gilora", **BEST, **DEFLATED),
    "gptq+olrc best flags": dict(method="gptq+olrc", **BEST),
    "srr": dict(method="srr"),
    "srr mse+act_order": dict(method="srr", mse=True, act_order=True),
    "srr best flags": dict(method="srr", **BEST),
}.items()}
VARIANTS["gilora (default)"] = dict(method="gilora")


@dataclasses.dataclass(frozen=True)
class Args:
  """Per-variant error ratio and cost over the real layers of the built-in LM (or of --model)."""
  bits: int = 3
  group_size: int = 0                       # 0 = per output channel
  rank: int = 32
  calib_windows: int = 64                   # 256-token windows of calib.txt behind each Hessian
  srr_bruteforce: bool = False
  model: str = ""                           # a local HF folder (Llama/Qwen2/Qwen3 family); empty: the built-in LM
  blocks: tuple[str, ...] = ()              # block indices to take layers from (comma-separated); empty: all
  variants: tuple[str, ...] = ()            # labels of VARIANTS to run (comma-separated); empty: all
  synthetic: int = 0                        # > 0: one synthetic d × d layer (benchmarks/layer.py's) instead, for
                                            #   the cost column at a real model's width; its errors mean little
  workdir: pathlib.Path = pathlib.Path("runs/layer_defaults")


def layers(calib_windows: int, model_path: str = "", blocks: tuple = ()):
  """[(name, W (d_in, d_out) float32, H float32)] for every linear of the chosen blocks of the built-in LM, or
  of the HF folder `model_path` (its calib.txt when it has one, else the built-in LM's)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  from gilora_jax import assets, load_model  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import llama  # pylint: disable=import-outside-toplevel
  folder = model_path or assets.QWEN3_SHAKESPEARE
  model, tok = load_model(folder), AutoTokenizer.from_pretrained(folder)
  calib_txt = pathlib.Path(folder) / "calib.txt"
  text = calib_txt.read_text(encoding="utf-8") if calib_txt.is_file() else assets.lm_text("calib")
  ids = np.asarray(tok(text)["input_ids"], np.int32)
  keep = {int(b) for b in blocks}
  if keep and not keep <= set(range(len(model.layers))):
    sys.exit(f"--blocks: {sorted(keep - set(range(len(model.layers))))} out of range; {folder} has "
             f"{len(model.layers)} blocks (0..{len(model.layers) - 1})")
  last = max(keep, default=len(model.layers) - 1)
  calib = ids[: len(ids) // 256 * 256].reshape(-1, 256)[:calib_windows]
  out, x = [], model.embed(jnp.asarray(calib))
  for i, block in enumerate(model.layers):
    if i > last:
      break
    x, taps = block(x)
    if keep and i not in keep:
      continue
    for site, t in taps.items():
      t = t.reshape(-1, t.shape[-1]).astype(jnp.float32)
      H = np.asarray(t.T @ t)
      for name in llama.QUANT_SITES[site]:
        linear = block
        for part in name.split("."):
          linear = getattr(linear, part)
        out.append((f"layers.{i}.{name}", np.asarray(linear.kernel[...], np.float32), H))
  return out


def main(a: Args) -> dict:
  from gilora_jax import quantize_layer  # pylint: disable=import-outside-toplevel
  writer = _builtin.JsonlWriter(a.workdir)
  common = dict(bits=a.bits, rank=a.rank, group_size=a.group_size or None, diagnostics="errors")

  def run(W, H, **kw):
    quantize_layer(W, H, **common, **kw)  # warm-up: compiles for this shape are not the method's cost
    t0 = time.perf_counter()
    rep = quantize_layer(W, H, **common, **kw).report
    return rep, time.perf_counter() - t0

  kstats = []
  unknown = sorted(set(a.variants) - set(VARIANTS))
  if unknown:
    sys.exit(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
  variants = {v: VARIANTS[v] for v in (a.variants or VARIANTS)}
  if a.srr_bruteforce:
    variants.setdefault("srr", VARIANTS["srr"])
  variants.setdefault("gptq", VARIANTS["gptq"])
  variants.setdefault("gptq+olrc", VARIANTS["gptq+olrc"])
  err = {v: [] for v in variants}
  cost = {v: [] for v in variants}
  if a.synthetic:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import layer as layer_bench  # pylint: disable=import-outside-toplevel
    todo = [(f"synthetic {a.synthetic}x{a.synthetic}", *layer_bench.make_layer(a.synthetic, 8192, 0))]
  else:
    todo = layers(a.calib_windows, a.model, a.blocks)
  for name, W, H in todo:
    reps = {v: run(W, H, **kw) for v, kw in variants.items()}
    base, t_gptq = reps["gptq+olrc"][0].rel_err, reps["gptq"][1]
    for v, (rep, sec) in reps.items():
      err[v].append(rep.rel_err / base)
      cost[v].append(sec / t_gptq)
      writer.write(layer=name, variant=v, rel_err=rep.rel_err, ratio=rep.rel_err / base, seconds=round(sec, 4),
                   cost_vs_gptq=round(sec / t_gptq, 3), srr_k=rep.srr_k)
    if a.srr_bruteforce:
      ks = [quantize_layer(W, H, **common, **VARIANTS["srr"], srr_k=k).report.rel_err for k in range(a.rank + 1)]
      k_star = reps["srr"][0].srr_k
      kstats.append((name, k_star, int(np.argmin(ks)), ks[k_star] / min(ks)))
      writer.write(layer=name, srr_k=k_star, best_k=int(np.argmin(ks)), k_ratio=ks[k_star] / min(ks), errors=ks)
  print(f"\n{len(err['gptq'])} layers, {a.bits}-bit, group {a.group_size or 'per-channel'}, rank {a.rank}; "
        f"error / default gptq+olrc (median, worst), cost / plain gptq (median)")
  table = {}
  for v in variants:
    e, c = np.asarray(err[v]), np.asarray(cost[v])
    table[v] = dict(median=float(np.median(e)), worst=float(np.max(e)), cost=float(np.median(c)))
    print(f"  {v:<40}{np.median(e):>7.3f} ({np.max(e):.3f}){np.median(c):>8.2f}×")
  pairs = [v for v in ("gilora best flags", "gilora best flags deflated λ", "gilora (default)", "srr best flags")
           if v in err and "gptq+olrc best flags" in err]
  for v in pairs:
    best_olrc = np.asarray(err["gptq+olrc best flags"])
    rel = np.asarray(err[v]) / best_olrc
    print(f"  {v} / gptq+olrc best flags: median {np.median(rel):.3f}, worst {np.max(rel):.3f}")
  for name, k_star, best, ratio in kstats:
    print(f"  srr {name}: k* {k_star}, best k {best}, cost of the choice {ratio:.3f}×")
  writer.close()
  return table


if __name__ == "__main__":
  main(_builtin.parse_args(Args))
