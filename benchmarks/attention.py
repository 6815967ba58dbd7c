"""One attention layer of Qwen3-0.6B's shape (16 heads, 8 KV heads, head dim 128, hidden 1024) on 2 × 512 tokens,
the calibration forward's default micro-batch: best-of wall time of the jitted layer (projections included).

    PYTHONPATH=$PWD python benchmarks/attention.py
    PYTHONPATH=/path/to/another/checkout python benchmarks/attention.py   # the same script on other code

Appends one JSONL record (the gilora_jax it imported is named by its path and commit).
"""
import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import layer as bench  # pylint: disable=wrong-import-position


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "attention.jsonl"))
  a = p.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import gilora_jax  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import qwen3  # pylint: disable=import-outside-toplevel
  cfg = qwen3.ModelConfig(vocab_size=1000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=1,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=128)
  att = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)).layers[0].self_attn
  b, t = 2, 512
  x = jnp.asarray(np.random.default_rng(0).standard_normal((b, t, 1024)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  f = nnx.jit(lambda m, x, p, k: m(x, p, k)[0])
  f(att, x, pos, mask).block_until_ready()
  times = []
  for _ in range(a.reps):
    t0 = time.perf_counter()
    f(att, x, pos, mask).block_until_ready()
    times.append(time.perf_counter() - t0)
  src = pathlib.Path(gilora_jax.__file__).resolve().parent.parent
  rec = {"bench": "attention_layer", "shape": "Qwen3-0.6B, 2 x 512 tokens", "best_ms": round(min(times) * 1e3, 1),
         "median_ms": round(float(np.median(times)) * 1e3, 1), "gilora_path": str(src),
         "gilora_commit": bench._git_commit(src), "loadavg_1m": os.getloadavg()[0],  # pylint: disable=protected-access
         **bench.machine_facts()}
  bench.emit(rec, pathlib.Path(a.out))


if __name__ == "__main__":
  main()
