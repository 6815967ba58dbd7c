"""What block 0 of a whole-model run pays before its layers compute: `quantize_layer`'s first call per distinct shape.

For the five linear shapes of a Qwen3-0.6B block (4-bit, g128, symmetric gptq with the command's defaults), a fresh
child process times each shape's first call and a second, warm one, in three settings: no persistent compilation
cache, an empty cache (a user's first run: compile and write), and that cache again (a repeated run: trace, lower,
load). first − warm is the overhead; its parts are JAX's tracing and lowering (paid in every setting) and XLA's
compilation (which the warm cache replaces by a load).

Then one question for the pipeline: would compiling block 0's layer programs in a background thread while the
block's calibration runs hide that overhead? The child times a stand-in of the calibration (a chain of 2048²
matmuls using every core) and the first calls of three shapes, one after the other and side by side in two
threads. Appends one JSONL record.

    PYTHONPATH=$PWD python benchmarks/compile_cost.py
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import layer as bench  # pylint: disable=wrong-import-position

SHAPES = [(1024, 2048), (1024, 1024), (2048, 1024), (1024, 3072), (3072, 1024)]  # q, k/v, o, gate/up, down


def _layer_calls(shapes, repeat=True):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  out = []
  for d_in, d_out in shapes:
    X = rng.standard_normal((4096, d_in)).astype(np.float32)
    H, W = jnp.asarray(X.T @ X / 4096), jnp.asarray(0.02 * rng.standard_normal((d_in, d_out)).astype(np.float32))
    times = []
    for _ in range(2 if repeat else 1):
      t = time.perf_counter()
      jax.block_until_ready(gj.quantize_layer(W, H, method="gptq", bits=4, group_size=128, symmetric=True).codes)
      times.append(time.perf_counter() - t)
    out.append({"shape": [d_in, d_out], "first_s": round(times[0], 3),
                "warm_s": round(times[1], 3) if repeat else None})
  return out


def child(mode: str, cache: str | None) -> dict:
  from gilora_jax import runtime  # pylint: disable=import-outside-toplevel
  in_use = runtime.enable_compilation_cache(cache) if cache else None
  assert (in_use is not None) == bool(cache), (cache, in_use)
  if mode != "overlap":
    rows = _layer_calls(SHAPES)
    return {"mode": mode, "shapes": rows, "overhead_s": round(sum(r["first_s"] - r["warm_s"] for r in rows), 2)}
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  big = jnp.asarray(__import__("numpy").random.default_rng(0).standard_normal((2048, 2048)), jnp.float32)
  mm = jax.jit(lambda x: (x @ x) * 1e-3)
  mm(big).block_until_ready()

  def calibration():
    y = big
    for _ in range(30):
      y = mm(y)
    y.block_until_ready()
  shapes = SHAPES[:1] + SHAPES[2:3] + SHAPES[4:]
  res = {}
  for how in ("serial", "threads"):  # distinct shapes per arm: each arm compiles afresh
    arm_shapes = shapes if how == "serial" else [(a + 128, b + 128) for a, b in shapes]  # no program shared
    t = time.perf_counter()
    if how == "serial":
      calibration()
      t_cal = time.perf_counter() - t
      _layer_calls(arm_shapes, repeat=False)
    else:
      th = threading.Thread(target=_layer_calls, args=(arm_shapes, False))
      th.start()
      calibration()
      t_cal = time.perf_counter() - t
      th.join()
    res[how] = {"calibration_s": round(t_cal, 2), "total_s": round(time.perf_counter() - t, 2)}
  return {"mode": "overlap", **res, "gain": round(res["serial"]["total_s"] / res["threads"]["total_s"], 3)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "compile_cost.jsonl"))
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--cache", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:
    print(json.dumps(child(a.child, a.cache)))
    return
  cache = tempfile.mkdtemp(prefix="compile_cost_")
  runs = {}
  try:
    for mode, c in (("no_cache", None), ("cold_cache", cache), ("warm_cache", cache), ("overlap", None)):
      cmd = [sys.executable, __file__, "--child", mode] + (["--cache", c] if c else [])
      env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "GILORA_COMPILATION_CACHE")}
      env["GILORA_COMPILATION_CACHE"] = c or "0"
      print(f"[compile_cost] {mode} ...", file=sys.stderr, flush=True)
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
      runs[mode] = json.loads(out.strip().splitlines()[-1])
      print(f"[compile_cost] {mode}: {json.dumps(runs[mode])}", file=sys.stderr, flush=True)
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  record = {"bench": "compile_cost", **bench.machine_facts(), "gilora_commit": bench._git_commit(pathlib.Path(__file__).parent),  # pylint: disable=protected-access
            "loadavg_1m": os.getloadavg()[0], **runs}
  bench.emit(record, pathlib.Path(a.out))


if __name__ == "__main__":
  main()
