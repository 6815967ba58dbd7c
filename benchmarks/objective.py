"""The layer-wise objective ``tr(Eᵀ H E)`` on XLA:CPU: the fused scalar reduction against the per-column form.

`lowrank.objective` is evaluated after every refinement step, for the final error of every layer in a whole-model
run (``diagnostics="errors"``) and by SRR's criterion. Written as ``sum(E * (H @ E))`` inside one jit, XLA:CPU
(jax 0.10) fuses the scalar reduction with the product into a kernel much slower than the product alone; the
per-column batched dot that `lowrank.objective` now uses does not. This script times, on d × d random E and
H = XᵀX (best of `--reps` warm calls each): the product alone, the fused form, the fused form behind an
optimization barrier, and the library's form; and checks the values agree. One JSON line, appended to --out.

  PYTHONPATH=$PWD python benchmarks/objective.py [--d 4096]
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import time


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "objective.jsonl"))
  a = p.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import lowrank  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant.linalg import mm  # pylint: disable=import-outside-toplevel
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  E = jax.random.normal(k1, (a.d, a.d))
  X = jax.random.normal(k2, (2 * a.d, a.d))
  H = jax.jit(mm)(X.T, X)
  forms = {
      "product alone": jax.jit(mm),
      "sum(E * (H @ E))": jax.jit(lambda H, E: jnp.sum(E * mm(H, E))),
      "the same behind a barrier": jax.jit(lambda H, E: jnp.sum(E * jax.lax.optimization_barrier(mm(H, E)))),
      "lowrank.objective (per column)": jax.jit(lambda H, E: lowrank.objective(E, H)),
  }
  rec = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "d": a.d,
         "host": {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "load": [round(x, 2) for x in os.getloadavg()], "backend": jax.default_backend()}}
  values = {}
  for name, fn in forms.items():
    out = jax.block_until_ready(fn(H, E))
    if out.ndim == 0:
      values[name] = float(out)
    times = []
    for _ in range(a.reps):
      t = time.perf_counter()
      jax.block_until_ready(fn(H, E))
      times.append(time.perf_counter() - t)
    rec[name] = round(min(times), 4)
  ref = values["sum(E * (H @ E))"]
  rec["max_rel_value_diff"] = max(abs(v - ref) / abs(ref) for v in values.values())
  print(json.dumps(rec))
  with open(a.out, "a", encoding="utf-8") as f:
    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
  main()
