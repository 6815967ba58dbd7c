"""One-layer GPTQ benchmark: gilora_jax against llm-compressor and a matmul roofline, in one process.

Builds one synthetic but LLM-like layer (W: scaled Student-t; X: heavy-tailed tokens with a decaying spectrum
and a few outlier features; H = XᵀX in float32, built once), quantizes it to 4 bits, group 128, symmetric, with
our `gj.quantize_layer(method="gptq")` (with our default lazy groups, and with static groups: llm-compressor's own
grid protocol) and with llm-compressor's GPTQ weight solve on the same W and H, timed in interleaved rounds, and
prints one JSON line (also appended to --out). See benchmarks/README.md for what each figure means.

  PYTHONPATH=/path/to/main /work/venv-peer/bin/python benchmarks/layer.py
  python benchmarks/layer.py --d 1024 --n-tokens 2048 --no-peer      # quick smoke run
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

BITS, GROUP_SIZE, SYMMETRIC, DAMP, BLOCK_SIZE = 4, 128, True, 0.01, 128


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--d", type=int, default=4096, help="d_in = d_out of the layer")
  p.add_argument("--n-tokens", type=int, default=8192, help="calibration tokens behind H = XᵀX")
  p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                 help="also run llm-compressor's GPTQ (skipped with a message when it is not installed)")
  p.add_argument("--reps", type=int, default=3,
                 help="timed repetitions (best-of) of the matmul and of our warm runs (both arms)")
  p.add_argument("--peer-reps", type=int, default=2,
                 help="timed repetitions (best-of) of llm-compressor per torch thread count, each in a round with one "
                 "call of each of our arms")
  p.add_argument("--torch-threads", type=int, nargs="+", default=sorted({os.cpu_count() or 1, 1}, reverse=True),
                 help="torch thread counts to time llm-compressor with on the CPU; llmc_s is the best (default: cores "
                 "and 1)")
  p.add_argument("--peer-device", choices=("auto", "cpu", "cuda"), default="auto",
                 help="where llm-compressor runs: auto = cuda when JAX's default backend is a GPU and torch sees one "
                 "(the same device as ours), else cpu")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--malloc-tuning", action=argparse.BooleanOptionalAction, default=True,
                 help="gilora_jax.runtime.tune_cpu_malloc() at start, as the gilora command does; it applies to the "
                 "whole process, i.e. to llm-compressor too (default on; --no-malloc-tuning: glibc's defaults)")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "layer.jsonl")
  return p.parse_args(argv)


def tune_malloc(enabled):
  """gilora_jax.runtime.tune_cpu_malloc() before any JAX or torch work (same policy for both); returns whether it
  is in effect (False when off, not on glibc, or when gilora_jax is not importable)."""
  if not enabled:
    return False
  try:
    from gilora_jax import runtime  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return runtime.tune_cpu_malloc()


def log(msg):
  print(f"[layer] {msg}", file=sys.stderr, flush=True)


def version(dist):
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def make_layer(d, n_tokens, seed):
  """W (d, d) and H = XᵀX (d, d), float32.

  X = DCT(Z · s · signs) with Z ~ Student-t(5) (heavy-tailed tokens), s_k = (k+1)^-1/2 (a power-law spectrum:
  eigenvalues of H decay like 1/k), a random-sign orthogonal DCT to spread the spectrum over all features, and
  8 outlier features scaled ×20 (the massive activation channels of real LLMs). W ~ 0.02 · Student-t(5).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import scipy.fft  # pylint: disable=import-outside-toplevel  (a jax dependency)
  rng = np.random.default_rng(seed)
  W = (0.02 * rng.standard_t(5.0, size=(d, d))).astype(np.float32)
  s = (np.arange(d) + 1.0)**-0.5 * rng.choice([-1.0, 1.0], size=d)
  X = rng.standard_t(5.0, size=(n_tokens, d)).astype(np.float32)
  X *= s.astype(np.float32)
  X = scipy.fft.dct(X, axis=1, norm="ortho", overwrite_x=True).astype(np.float32)
  X[:, rng.choice(d, size=8, replace=False)] *= 20.0
  Xj = jnp.asarray(X)
  H = np.asarray(jnp.matmul(Xj.T, Xj, precision="highest"))
  return W, H


def matmul_rate(d, reps):
  """Best-of-reps float32 (d × d) @ (d × d) rate in flop/s, through jnp on the default device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (d, d), jnp.float32)
  b = jax.random.normal(kb, (d, d), jnp.float32)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest"))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(max(1, reps)):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * d**3 / best


def rel_output_error(W, Q, H):
  """tr(EᵀHE) / tr(WᵀHW), E = W − Q: the relative layer-output error ‖X(W − Q)‖² / ‖XW‖² (float32, HIGHEST)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  Hj, Wj = jnp.asarray(H), jnp.asarray(W)
  Ej = Wj - jnp.asarray(Q, jnp.float32)
  num = jnp.sum(Ej * jnp.matmul(Hj, Ej, precision="highest"))
  den = jnp.sum(Wj * jnp.matmul(Hj, Wj, precision="highest"))
  return float(num / den)


def rtn_q(W, bits, group_size):
  """Round-to-nearest on the IST symmetric group grid (rows = input features), for context."""
  d_in, d_out = W.shape
  maxq = 2**bits - 1
  Wg = W.astype(np.float64).reshape(d_in // group_size, group_size, d_out)
  xmin = np.minimum(Wg.min(axis=1, keepdims=True), 0.0)
  xmax = np.maximum(Wg.max(axis=1, keepdims=True), 0.0)
  xmax = np.maximum(np.abs(xmin), xmax)
  xmin = np.where(xmin < 0, -xmax, xmin)
  zero_range = (xmin == 0) & (xmax == 0)
  xmin, xmax = np.where(zero_range, -1.0, xmin), np.where(zero_range, 1.0, xmax)
  scale, zero = (xmax - xmin) / maxq, (maxq + 1) / 2
  q = np.clip(np.round(Wg / scale) + zero, 0, maxq)
  return (scale * (q - zero)).reshape(d_in, d_out)


def ours_arms(W, H):
  """Our arms as {name: (call, options)}: ``call()`` runs one ``gj.quantize_layer(method="gptq")`` and returns
  (seconds, result). ``ours``: the library's default lazy groups (IST's semantics: each group's grid fitted when
  the sweep reaches it). ``ours_static``: ``static_groups=True``, every grid fitted on W before the sweep, which
  is what llm-compressor 0.14 does (the same algorithm as the peer). None when gilora_jax is unavailable."""
  try:
    import gilora_jax as gj  # pylint: disable=import-outside-toplevel
    quantize_layer = gj.quantize_layer
  except Exception as e:  # pylint: disable=broad-except
    log(f"gilora_jax.quantize_layer unavailable ({type(e).__name__}: {e}); skipping ours")
    return None
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  Wj, Hj = jnp.asarray(W), jnp.asarray(H)
  # diagnostics off: no error evaluation inside the timed call; llmc does none
  base = dict(method="gptq", bits=BITS, rank=0, group_size=GROUP_SIZE, symmetric=SYMMETRIC, damp=DAMP,
              act_order=False, block_size=BLOCK_SIZE, diagnostics=False)

  def arm(user_call=None, **extra):
    kwargs = {**base, **extra} if user_call is None else user_call

    def call():
      t = time.perf_counter()
      res = quantize_layer(Wj, Hj, **kwargs)
      jax.block_until_ready([res.Q, res.codes, res.scales, res.zeros])
      return time.perf_counter() - t, res

    return call, (dict(user_call) if user_call else
                  {k: v for k, v in kwargs.items() if k in ("block_size", "diagnostics", "static_groups")})

  # What a user types (the README's call): every other option at the library's default, diagnostics included;
  # and the same with every diagnostic on, to show what they cost.
  user = dict(method="gptq", bits=BITS, group_size=GROUP_SIZE, symmetric=SYMMETRIC)
  return ({"ours": arm(), "ours_static": arm(static_groups=True), "ours_default": arm(user),
           "ours_full_diagnostics": arm({**user, "diagnostics": "full"})},
          _git_commit(pathlib.Path(gj.__file__).parent))


def peer_device(choice):
  """The torch device llm-compressor runs on: ``auto`` follows JAX (cuda when JAX's default backend is a GPU and
  torch sees one). None when torch is not installed."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if choice == "auto":
    import jax  # pylint: disable=import-outside-toplevel
    choice = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  if choice == "cuda" and not torch.cuda.is_available():
    raise SystemExit("--peer-device cuda: torch sees no GPU (torch.cuda.is_available() is False)")
  return choice


def llmc_arm(W, H, n_tokens, device="cpu"):
  """llm-compressor 0.14 GPTQ weight solve on torch weight = Wᵀ: ``call(threads)`` → (seconds, Q, fell back).

  The same steps as `GPTQModifier.compress_module_list`: the default weight observer (memoryless min-max) fits
  the group grids on the original weight, then `quantize_weight` runs the sweep. llm-compressor keeps
  H = Σ 2·xxᵀ / num_samples; the damping is relative to mean(diag H), so any positive scaling gives the same
  codes: we pass 2·H / n_tokens. actorder=None to match our act_order=False. Returns None when not installed.
  On ``device="cuda"`` the inputs live on the GPU and the clock stops after ``torch.cuda.synchronize()``;
  ``threads`` then only sets torch's CPU threads.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from compressed_tensors.quantization import QuantizationArgs  # pylint: disable=import-outside-toplevel
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight  # pylint: disable=import-outside-toplevel
    from llmcompressor.observers import Observer  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    log(f"llm-compressor not installed ({e}); skipping the peer. Its virtual environment: benchmarks/README.md.")
    return None
  args = QuantizationArgs(num_bits=BITS, type="int", strategy="group", group_size=GROUP_SIZE, symmetric=SYMMETRIC,
                          actorder=None)
  weight = torch.from_numpy(np.ascontiguousarray(W.T)).to(device)  # (d_out, d_in), as nn.Linear.weight
  hessian = (torch.from_numpy(np.array(H)) * (2.0 / n_tokens)).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def call(threads):
    torch.set_num_threads(threads)
    w_in, h_in = weight.clone()[None], hessian.clone()[None]  # quantize_weight overwrites its inputs
    with torch.no_grad():
      sync()
      t = time.perf_counter()
      observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
      observer(weight)
      qp = observer.get_qparams()
      q, _, fallback = quantize_weight(w_in, h_in, qp["scale"][None], qp["zero_point"][None], None, args,
                                       blocksize=BLOCK_SIZE, percdamp=DAMP)
      sync()
      seconds = time.perf_counter() - t
    return seconds, np.asarray(q[0].cpu().numpy().T, np.float32), bool(fallback.any())

  return call


def run_interleaved(arms):
  """Best seconds of each arm, in rounds that call each arm still due once in turn, so that a slow spell of a
  noisy machine hits all arms alike instead of one. ``arms``: {name: (call() → (seconds, ...), repetitions)}."""
  best = {name: float("inf") for name in arms}
  for r in range(max((reps for _, reps in arms.values()), default=0)):
    times = {name: call()[0] for name, (call, reps) in arms.items() if r < reps}
    best.update({name: min(best[name], t) for name, t in times.items()})
    log(f"round {r + 1}: " + ", ".join(f"{name} {t:.2f} s" for name, t in times.items()))
  return best


def _git_commit(path):
  """The short commit of the checkout at ``path``, with ``+dirty`` when its files differ from that commit."""
  try:
    git = ["git", "-C", str(path)]
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--", "."], capture_output=True,
                           text=True, check=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def machine_facts():
  import jax  # pylint: disable=import-outside-toplevel
  cpu = None
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {
      "cores": os.cpu_count(),
      "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "cpu": cpu or platform.processor(),
      "jax_backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "python": platform.python_version(),
      **{k.replace("-", "_"): version(k)
         for k in ("jax", "jaxlib", "numpy", "torch", "llmcompressor", "compressed-tensors")},
  }


def main(argv=None):
  a = parse_args(argv)
  if a.d % GROUP_SIZE:
    raise SystemExit(f"--d must be a multiple of {GROUP_SIZE}")
  t_all, load_before = time.perf_counter(), os.getloadavg()[0]
  malloc_tuned = tune_malloc(a.malloc_tuning)
  log(f"malloc tuning {'on' if malloc_tuned else 'off'}")
  log(f"building the layer: d={a.d}, n_tokens={a.n_tokens}, seed={a.seed}")
  W, H = make_layer(a.d, a.n_tokens, a.seed)

  rate = matmul_rate(a.d, a.reps)
  roofline_s = (a.d**3 + (2.0 / 3.0) * a.d**3) / rate
  # The flops of our own sweep (inverse-free: one Cholesky, no triangular inverse), at the same rate.
  own_floor_s = (a.d**3 + a.d**3 / 3.0) / rate
  log(f"float32 matmul {rate / 1e9:.1f} Gflop/s -> roofline {roofline_s:.3f} s, our flops {own_floor_s:.3f} s")

  arms, first, results, commit = {}, {}, {}, None
  built = ours_arms(W, H)
  if built:
    ours, commit = built
    for name, (call, _) in ours.items():  # the first call compiles: timed alone, not part of the rounds
      first[name], res = call()
      results[name] = np.asarray(res.Q, np.float32), res.report.damp
      log(f"{name}: first call (compile + run) {first[name]:.2f} s")
      arms[name] = call, max(1, a.reps)
  device = peer_device(a.peer_device) if a.peer else None
  llmc = llmc_arm(W, H, a.n_tokens, device) if a.peer and device else None
  if not a.peer:
    log("--no-peer: skipping llm-compressor")
  elif device is None:
    log("torch not installed; skipping the peer. Its virtual environment: benchmarks/README.md.")
  # On the GPU the torch thread count does not matter: one arm, at the first count.
  thread_counts = a.torch_threads if device != "cuda" else a.torch_threads[:1]
  if llmc:
    log(f"llm-compressor on {device}")
    for threads in thread_counts:
      seconds, Q, fell_back = llmc(threads)  # warm-up (torch's first call allocates its workspace)
      if fell_back:
        log("llm-compressor fell back to RTN (Cholesky failed)")
      results["llmc"] = Q, None
      arms[f"llmc_t{threads}"] = (lambda threads=threads: llmc(threads)), max(1, a.peer_reps)
  best = run_interleaved(arms)

  rec = {
      "bench": "layer_gptq",
      "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "d_in": a.d, "d_out": a.d, "n_tokens": a.n_tokens, "seed": a.seed,
      "bits": BITS, "group_size": GROUP_SIZE, "symmetric": SYMMETRIC, "damp": DAMP, "block_size": BLOCK_SIZE,
      "matmul_gflops": rate / 1e9, "roofline_s": roofline_s, "own_floor_s": own_floor_s,
      "malloc_tuned": malloc_tuned,
      "ours_first_s": None, "ours_warm_s": None, "ours_over_roofline": None,
      "llmc_s": None, "llmc_over_ours": None,
      "ours_rel_err": None, "llmc_rel_err": None, "err_ratio_ours_over_llmc": None,
      "rtn_rel_err": rel_output_error(W, rtn_q(W, BITS, GROUP_SIZE), H),
  }
  for name in ("ours", "ours_static") if built else ():
    rec.update({f"{name}_first_s": first[name], f"{name}_warm_s": best[name],
                f"{name}_over_roofline": best[name] / roofline_s,
                f"{name}_over_own_floor": best[name] / own_floor_s,
                f"{name}_rel_err": rel_output_error(W, results[name][0], H),
                f"{name}_options": ours[name][1]})
  for name in ("ours_default", "ours_full_diagnostics") if built else ():
    rec.update({f"{name}_first_s": first[name], f"{name}_warm_s": best[name],
                f"{name}_over_ours": best[name] / best["ours"], f"{name}_options": ours[name][1]})
  if built:
    rec.update(ours_damp_used=results["ours"][1], gilora_commit=commit)
  if llmc:
    by_threads = {k[len("llmc_t"):]: v for k, v in best.items() if k.startswith("llmc_t")}
    best_threads = min(by_threads, key=by_threads.get)
    rec.update(llmc_s=by_threads[best_threads], llmc_device=device,
               llmc_s_by_torch_threads=by_threads if device == "cpu" else None,
               llmc_torch_threads=int(best_threads) if device == "cpu" else None,
               llmc_rel_err=rel_output_error(W, results["llmc"][0], H))
    # The time a 4x speed-up needs, against the roofline: below 1, 4x means running under the roofline.
    rec.update(llmc_quarter_over_roofline=rec["llmc_s"] / 4 / roofline_s)
  if built and llmc:
    for name in ("ours", "ours_static"):
      suffix = name[len("ours"):]
      rec[f"llmc_over_ours{suffix}"] = rec["llmc_s"] / rec[f"{name}_warm_s"]
      rec[f"err_ratio_ours{suffix}_over_llmc"] = rec[f"{name}_rel_err"] / rec["llmc_rel_err"]
  rec.update(machine_facts())
  rec.update(total_s=time.perf_counter() - t_all, loadavg_1m_before=load_before, loadavg_1m_after=os.getloadavg()[0])

  return emit(rec, a.out)


def emit(rec, out):
  """Prints the record as one JSON line on stdout and appends it to ``out`` (a results log of the benchmarks)."""
  line = json.dumps(rec, sort_keys=False)
  print(line, flush=True)
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out, "a", encoding="utf-8") as f:
    f.write(line + "\n")
  return rec


if __name__ == "__main__":
  main()
