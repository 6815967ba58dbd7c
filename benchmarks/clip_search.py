"""The clip search of `GridSpec(mse=True)` on a model's real linears: coarse to fine (the default) against the
exhaustive 80-ratio search, and against the previous implementation (80 ratios scored with `pow`, under `vmap`).

  PYTHONPATH=$PWD python benchmarks/clip_search.py [--model runs/smollm2-135m-instruct] [--blocks 0,10,20,29]

For every 2-D `*proj.weight` of the chosen blocks (default: the built-in LM, every block), at each bit width and
group size: the share of grid columns (one per output column and group) where the default picks the same ratio as
the exhaustive search, the worst column's and the summed score `Σ|q − w|^2.4` of the default ÷ the exhaustive
one's, and the wall time of `fit_grid` for the three (best of --reps, after a warm-up call, arrays ready before
the clock stops). One JSON line is printed and appended to --out (`benchmarks/results/clip_search.jsonl`).
Group sizes that do not divide a layer's d_in are skipped for that layer.
"""
import argparse
import datetime
import os
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import layer as layer_bench  # noqa: E402  pylint: disable=wrong-import-position


def _pow80(Wg, spec):
  """The previous implementation (until commit 753d38b): all 80 ratios scored with `|e| ** 2.4`, one group at a
  time under `vmap` (which compiles the scan about 10× slower on CPU, even for one group)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import grid as g  # pylint: disable=import-outside-toplevel
  xmin, xmax = jnp.minimum(Wg.min(0), 0.0), jnp.maximum(Wg.max(0), 0.0)

  def candidate(best, i):
    scale, zero = g._minmax_params((1 - i / 100) * xmin, (1 - i / 100) * xmax, spec, 1.0)  # pylint: disable=protected-access
    err = jnp.sum(jnp.abs(g.dequantize_rows(g.quantize_rows(Wg, scale, zero, spec.maxq), scale, zero) - Wg) ** 2.4, 0)
    better = err < best[0]
    return (jnp.where(better, err, best[0]), jnp.where(better, scale, best[1]), jnp.where(better, zero, best[2])), None

  init = (jnp.full(Wg.shape[1], jnp.inf),) + g._minmax_params(xmin, xmax, spec, 1.0)  # pylint: disable=protected-access
  (_, scale, zero), _ = lax.scan(candidate, init, jnp.arange(80, dtype=jnp.float32))
  return scale, zero


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="", help="a local HF folder; empty: the built-in LM")
  p.add_argument("--blocks", default="", help="comma-separated block indices; empty: all")
  p.add_argument("--bits", default="2,3,4")
  p.add_argument("--groups", default="0,32,64,128", help="group sizes; 0 = per output channel")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "clip_search.jsonl")
  a = p.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  from gilora_jax import assets  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import grid as grid_lib  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant.grid import GridSpec  # pylint: disable=import-outside-toplevel

  folder = pathlib.Path(a.model or assets.QWEN3_SHAKESPEARE)
  blocks = {int(b) for b in a.blocks.split(",") if b}
  weights = []
  for shard in sorted(folder.glob("*.safetensors")):
    with safe_open(shard, "np") as f:
      for k in f.keys():
        m = re.search(r"layers\.(\d+)\..*proj\.weight$", k)
        if m and (not blocks or int(m.group(1)) in blocks):
          weights.append((k, np.asarray(f.get_tensor(k), np.float32).T))  # (d_in, d_out), the paper's orientation
  if not weights:
    sys.exit(f"no *proj.weight of blocks {sorted(blocks) or 'any'} in {folder}")

  def fit(kind, spec):
    if kind == "pow80":
      return jax.jit(lambda W: jax.vmap(lambda w: _pow80(w, spec))(W.reshape(spec.num_groups(W.shape[0]), -1, W.shape[1])))
    return jax.jit(lambda W: tuple(grid_lib.fit_grid(W, spec, exhaustive=kind == "exhaustive")))

  def best_time(f, W):
    jax.block_until_ready(f(W))
    best = 1e9
    for _ in range(a.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(W))
      best = min(best, time.perf_counter() - t0)
    return best

  def score(W, s, z, spec):  # float64 Σ|q − w|^2.4 per grid column, (G, d_out)
    G = s.shape[0]
    Wg = np.asarray(W, np.float64).reshape(G, -1, W.shape[1])
    s, z = np.asarray(s, np.float64)[:, None], np.asarray(z, np.float64)[:, None]
    q = s * (np.clip(np.round(Wg / s) + z, 0, spec.maxq) - z)
    return np.sum(np.abs(q - Wg) ** 2.4, axis=1)

  load0 = os.getloadavg()[0]
  rows = []
  for bits in (int(b) for b in a.bits.split(",")):
    for g in (int(x) for x in a.groups.split(",")):
      spec = GridSpec(bits=bits, group_size=g or None, mse=True)
      same, worst, total, secs = [], [], [], {"default": 0.0, "exhaustive": 0.0, "pow80": 0.0}
      fns = {kind: fit(kind, spec) for kind in secs}
      for _, W in weights:
        if g and W.shape[0] % g:
          continue
        Wj = jnp.asarray(W)
        got = {kind: fn(Wj) for kind, fn in fns.items()}
        for kind, fn in fns.items():
          secs[kind] += best_time(fn, Wj)
        e_def, e_exh = score(W, *got["default"], spec), score(W, *got["exhaustive"], spec)
        same.append(float(np.mean(np.asarray(got["default"][0]) == np.asarray(got["exhaustive"][0]))))
        ok = e_exh > 0
        worst.append(float(np.max(e_def[ok] / e_exh[ok])))
        total.append(float(e_def.sum() / e_exh.sum()))
      if not same:
        continue
      rows.append({"bits": bits, "group_size": g or None, "layers": len(same),
                   "same_ratio_share": round(float(np.mean(same)), 5), "same_ratio_share_min": round(min(same), 5),
                   "score_ratio_worst_column": round(max(worst), 4), "score_ratio_layer_max": round(max(total), 6),
                   "score_ratio_layer_median": round(float(np.median(total)), 6),
                   "seconds": {k: round(v, 4) for k, v in secs.items()},
                   "speedup_vs_exhaustive": round(secs["exhaustive"] / secs["default"], 2),
                   "speedup_vs_pow80": round(secs["pow80"] / secs["default"], 2)})
      print(rows[-1], flush=True)
  rec = {"bench": "clip_search", "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "model": str(folder), "blocks": sorted(blocks) or "all", "linears": len(weights), "reps": a.reps,
         "rows": rows, "loadavg_1m_before": load0, "loadavg_1m_after": os.getloadavg()[0],
         "gilora_commit": layer_bench._git_commit(pathlib.Path(__file__).resolve().parent.parent),  # pylint: disable=protected-access
         **layer_bench.machine_facts()}
  return layer_bench.emit(rec, a.out)


if __name__ == "__main__":
  main()
