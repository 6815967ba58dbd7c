"""Can XLA:CPU run the GPTQ sweep's sequential part beside a long product? Timed alone, in one jit, and dispatched.

The sweep's segments are a chain of small dependent kernels (one per swept row) that leave the second core
mostly idle, and the long left-looking products use every core. If independent work overlapped, a segment
could run beside the next segment's product and the call would approach its flop floor. This probes it with
stand-ins of the two shapes: a ``lax.scan`` of ``--rows`` elementwise row kernels on a (16, d) micro-block and a
(d/2, d/2) @ (d/2, d) product. Each is timed alone (best of ``--reps``), then both in **one jit** (no data
dependence between them: XLA's thunk executor may run them concurrently), then as **two executables
dispatched back to back** before blocking on either (JAX's asynchronous dispatch). ``overlap = (chain + matmul)
/ together``: 1 means no overlap, up to 1 + min/max with a perfect one. Appends one JSONL record.

    python benchmarks/cpu_overlap.py
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import layer as bench  # pylint: disable=wrong-import-position


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--d", type=int, default=4096)
  p.add_argument("--rows", type=int, default=8192, help="row kernels in the chain (the default about balances the two)")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "cpu_overlap.jsonl")
  a = p.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel

  d, b = a.d, 16
  x = jax.random.normal(jax.random.key(0), (b, d), jnp.float32)
  A = jax.random.normal(jax.random.key(1), (d // 2, d // 2), jnp.float32)
  B = jax.random.normal(jax.random.key(2), (d // 2, d), jnp.float32)
  rows = jnp.arange(b)[:, None]

  def chain(x):  # like a micro-block's rows: round row j, pass a multiple of it to the others
    def row(c, j):
      k = j % b
      return jnp.where(rows == k, jnp.round(c * 1.0001), c * 0.999 + 1e-3 * c[k][None]), None
    return lax.scan(row, x, jnp.arange(a.rows))[0]

  def product(A, B):
    return jnp.matmul(A, B, precision="highest")

  f_chain, f_product = jax.jit(chain), jax.jit(product)
  f_both = jax.jit(lambda x, A, B: (chain(x), product(A, B)))

  def best(fn):
    jax.block_until_ready(fn())
    out = []
    for _ in range(a.reps):
      t = time.perf_counter()
      jax.block_until_ready(fn())
      out.append(time.perf_counter() - t)
    return min(out)

  load_before = os.getloadavg()[0]
  s = {"chain_s": best(lambda: f_chain(x)), "matmul_s": best(lambda: f_product(A, B)),
       "one_jit_s": best(lambda: f_both(x, A, B)), "dispatched_s": best(lambda: (f_chain(x), f_product(A, B)))}
  total = s["chain_s"] + s["matmul_s"]
  rec = {"bench": "cpu_overlap", "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "d": d, "rows": a.rows,
         "reps": a.reps, **s, "overlap_one_jit": total / s["one_jit_s"],
         "overlap_dispatched": total / s["dispatched_s"],
         "overlap_perfect": total / max(s["chain_s"], s["matmul_s"]),
         "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0], **bench.machine_facts()}
  bench.log(", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in s.items()))
  bench.log(f"overlap: one jit {rec['overlap_one_jit']:.2f}, dispatched {rec['overlap_dispatched']:.2f} "
            f"(1 = none, {rec['overlap_perfect']:.2f} = perfect)")
  return bench.emit(rec, a.out)


if __name__ == "__main__":
  main()
