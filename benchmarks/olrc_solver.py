"""OLrC's top-r eigenpairs: the dense eigh against block Krylov (`linalg.top_eigh_iterative`), cost and accuracy.

For each layer it quantizes W with plain GPTQ (3-bit per-channel), forms OLrC's Gram matrix of the residual
(``Eᵀ H_λ E`` or ``Z Zᵀ``, the smaller side, as `lowrank.olrc` does) and times the two top-r solvers on it (best of
`--reps` warm calls each), then compares OLrC's optimum ``tr − Σ e_r`` from each (the iterative one's
is its own subspace's value, so the ratio is what a user loses, ≥ 1 up to round-off). Layers: benchmarks/layer.py's
synthetic d × d layer for each `--d`, and with `--model` the linears of some blocks of a local HF folder (forced
through block Krylov even below `linalg.ITERATIVE_MIN_N`, for the accuracy on real residuals). One JSON line
per layer, appended to --out.

  PYTHONPATH=$PWD python benchmarks/olrc_solver.py
  PYTHONPATH=$PWD python benchmarks/olrc_solver.py --d 1024 2048 --model runs/smollm2-135m-instruct --blocks 0 29
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
import layer as layer_bench  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--d", type=int, nargs="*", default=[1024, 2048, 4096], help="synthetic d × d layers")
  p.add_argument("--n-tokens", type=int, default=8192)
  p.add_argument("--rank", type=int, default=32)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--model", default="", help="a local HF folder whose real layers are measured too")
  p.add_argument("--blocks", type=int, nargs="*", default=[0])
  p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "olrc_solver.jsonl"))
  a = p.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import hessian, linalg  # pylint: disable=import-outside-toplevel

  @jax.jit
  def gram(E, Hd):
    if E.shape[1] <= E.shape[0]:
      return linalg.tn(E, linalg.mm(Hd, E))
    Z = linalg.tn(hessian.factor(Hd), E)
    return linalg.mm(Z, Z.T)

  dense = jax.jit(linalg.top_eigh, static_argnums=1)
  iterative = jax.jit(linalg.top_eigh_iterative, static_argnums=1)

  def best(fn, *args):
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(a.reps):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(time.perf_counter() - t)
    return min(out)

  todo = [(f"synthetic {d}x{d}", *layer_bench.make_layer(d, a.n_tokens, 0)) for d in a.d]
  if a.model:
    import layer_defaults  # pylint: disable=import-outside-toplevel
    todo += layer_defaults.layers(64, a.model, tuple(str(b) for b in a.blocks))
  host = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
          "load": [round(x, 2) for x in os.getloadavg()], "backend": jax.default_backend()}
  with open(a.out, "a", encoding="utf-8") as f:
    for name, W, H in todo:
      Q = gj.quantize_layer(W, H, method="gptq", bits=3, mse=False, act_order=False, diagnostics="off").Q
      M = jax.block_until_ready(gram(jnp.asarray(W) - Q, hessian.damped(jnp.asarray(H), 0.01)))
      tr, r = float(jnp.trace(M)), a.rank
      if (linalg.KRYLOV_STEPS + 1) * (r + linalg.KRYLOV_OVERSAMPLE) > M.shape[0]:
        print(f"{name}: its {M.shape[0]}-wide Gram cannot hold the Krylov basis at rank {r}; skipped", flush=True)
        continue
      e_dense, _ = dense(M, r)
      e_iter, V = iterative(M, r)
      t_dense, t_iter = best(dense, M, r), best(iterative, M, r)
      own = float(jnp.trace(V.T @ M @ V))  # the subspace's own captured energy, against its Ritz sum
      rec = dict(time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), layer=name,
                 n=int(M.shape[0]), rank=r, dense_s=round(t_dense, 4), krylov_s=round(t_iter, 4),
                 speedup=round(t_dense / t_iter, 2),
                 optimum_ratio=(tr - float(jnp.sum(e_iter))) / (tr - float(jnp.sum(e_dense))),
                 ritz_vs_subspace=float(jnp.sum(e_iter)) / own, host=host)
      print(json.dumps(rec), flush=True)
      f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
  main()
