"""Where the time of `quantize_layer(method="gptq")` goes: each jitted stage of `gilora_jax.layer`, timed alone.

Same layer as `benchmarks/layer.py` (4096², 4-bit, g128, symmetric). Stages: the data checks of H, the damped
transposed Cholesky factor, the GPTQ sweep (and its two parts: the long left-looking products and the
segments' own sweeps), and the whole call; each is the best of `--reps` warm calls, and the flop rates are
against the same float32 matmul rate `layer.py` measures, with the rates of a micro-block's and a long product's
shape beside it. Appends one JSONL record.

    PYTHONPATH=$PWD python benchmarks/layer_stages.py

The stage functions are private to `gilora_jax.layer`; this script follows them, the public contract is
`quantize_layer`.
"""
from __future__ import annotations

import argparse
import inspect
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import layer as bench  # pylint: disable=wrong-import-position


def best(fn, reps):
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn())
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t)
  return min(out)


def sweep_parts(gptq_lib, run, reps):
  """Seconds of the sweep's two kinds of jitted stage, summed over one sweep (best of ``reps`` sweeps): the long
  left-looking products that bring each segment every earlier segment's residuals (``_left``) and the segments'
  own sweeps (``_segment``). Each call is blocked on, which the sweep itself does not do, so the parts add up to a
  little more than ``sweep_s``."""
  import jax  # pylint: disable=import-outside-toplevel
  totals = {}

  def timed(name, fn):
    def wrapper(*args, **kwargs):
      t = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      totals[name] = totals.get(name, 0.0) + time.perf_counter() - t
      return out
    return wrapper

  originals = {name: getattr(gptq_lib, name) for name in ("_left", "_segment")}
  best_parts = None
  try:
    for name, fn in originals.items():
      setattr(gptq_lib, name, timed(name, fn))
    jax.block_until_ready(run())
    for _ in range(reps):
      totals.clear()
      jax.block_until_ready(run())
      if best_parts is None or sum(totals.values()) < sum(best_parts.values()):
        best_parts = dict(totals)
  finally:
    for name, fn in originals.items():
      setattr(gptq_lib, name, fn)
  return {"sweep_left_s": best_parts.get("_left", 0.0), "sweep_segments_s": best_parts.get("_segment", 0.0)}


def matmul_rate_of(m, k, n, reps):
  """Best-of-reps float32 rate (flop/s) of an (m × k) @ (k × n) product, jitted, precision highest."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.key(2), (m, k), jnp.float32)
  b = jax.random.normal(jax.random.key(3), (k, n), jnp.float32)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest"))
  return 2.0 * m * k * n / best(lambda: f(a, b), max(reps, 10))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--n-tokens", type=int, default=8192)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--malloc-tuning", action=argparse.BooleanOptionalAction, default=True,
                 help="gilora_jax.runtime.tune_cpu_malloc() first, as layer.py and the gilora command (default on)")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "layer_stages.jsonl")
  a = p.parse_args(argv)
  malloc_tuned = bench.tune_malloc(a.malloc_tuning)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import _gptq_blocked  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import gptq as gptq_lib  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import hessian  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant.grid import GridSpec  # pylint: disable=import-outside-toplevel

  load_before = os.getloadavg()[0]
  W, H = bench.make_layer(a.d, a.n_tokens, a.seed)
  W, H = jnp.asarray(W, jnp.float32), jnp.asarray(H, jnp.float32)
  rate = bench.matmul_rate(a.d, a.reps)
  spec = GridSpec(bits=bench.BITS, group_size=bench.GROUP_SIZE, symmetric=bench.SYMMETRIC)
  factor = hessian.prepare(H, bench.DAMP).factor()
  sweep = lambda: gptq_lib.quantize_with_factor(W, factor, spec, block_size=bench.BLOCK_SIZE)
  s = {  # a fresh site per call: its checks and factor are memoised
      "checks_s": best(lambda: hessian.prepare(H, bench.DAMP).Hf, a.reps),
      "factor_s": best(lambda: hessian.prepare(H, bench.DAMP).factor().Tt, a.reps),
      "sweep_s": best(sweep, a.reps),
      "quantize_layer_s": best(lambda: gj.quantize_layer(
          W, H, method="gptq", bits=bench.BITS, group_size=bench.GROUP_SIZE, symmetric=bench.SYMMETRIC,
          damp=bench.DAMP, block_size=bench.BLOCK_SIZE, diagnostics=False).codes, a.reps),
  }
  parts = sweep_parts(_gptq_blocked, sweep, a.reps)
  d = a.d
  defaults = inspect.signature(gptq_lib.sweep).parameters
  b, segs = defaults["micro_block"].default, defaults["num_segments"].default
  # The sweep's product shapes: a micro-block's (b × B) @ (B × d_out), and the long one of the middle segment.
  shapes = {"micro": (b, bench.BLOCK_SIZE, d), "long": (d // segs, d // 2, d)}
  rates = {f"matmul_{name}_gflops": matmul_rate_of(*mkn, a.reps) / 1e9 for name, mkn in shapes.items()}
  rec = {"bench": "layer_stages", "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "d": d,
         "n_tokens": a.n_tokens, "reps": a.reps, "malloc_tuned": malloc_tuned, "matmul_gflops": rate / 1e9, **s,
         # Cholesky d³/3 flops; the sweep's lazy updates ≈ d_in² d_out (the roofline of layer.py counts d³ + ⅔d³)
         "factor_gflops": d ** 3 / 3 / s["factor_s"] / 1e9, "sweep_gflops": d ** 3 / s["sweep_s"] / 1e9,
         "own_floor_s": (d ** 3 + d ** 3 / 3) / rate, "roofline_s": (d ** 3 + 2 * d ** 3 / 3) / rate,
         "gilora_commit": bench._git_commit(pathlib.Path(gj.__file__).parent),  # pylint: disable=protected-access
         **parts, **rates, "matmul_shapes": {k: list(v) for k, v in shapes.items()},
         "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0], **bench.machine_facts()}
  for k, v in {**s, **parts}.items():
    bench.log(f"{k[:-2]:16s} {v * 1e3:8.1f} ms")
  bench.log(", ".join(f"{k} {rec[k]:.0f}" for k in rates) + f" (shapes m×k×n: {shapes})")
  bench.log(f"factor at {rec['factor_gflops']:.0f} Gflop/s, sweep at {rec['sweep_gflops']:.0f} Gflop/s; "
            f"matmul {rate / 1e9:.0f} Gflop/s")
  return bench.emit(rec, a.out)


if __name__ == "__main__":
  main()
