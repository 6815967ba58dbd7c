"""Whole-model GPTQ benchmark: the `gilora quantize` command against llm-compressor's `oneshot`, side by side.

On one random-initialised HF folder of Qwen3-0.6B's shape cut to --blocks blocks (built once, cached under
--workdir, with a character-level tokenizer), one child process each, one after the other:

  * ours: `python -m gilora_jax.cli quantize --method gptq --bits 4 --group-size 128 --symmetric --rank 0 ...`;
  * the peer: llm-compressor's `oneshot(GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))`
    (W4A16 = int4, group 128, symmetric), handed the very token windows our command calibrates on (the same
    tokenizer call and `gilora_jax.pipeline.calib.token_windows` draw), saved dense (`save_compressed=False`:
    the fake-quantized float weights, read back with safetensors).

Each child's wall time (interpreter start, model load, calibration, quantization, output write: what a user
waits for) and its own peak RSS (`os.wait4` on that child: its rusage alone, not the max over all children).
Then the per-layer output error of both outputs on held-apart windows (another text, another seed) through the
float model (our JAX port): rel_err = ‖X W − X Ŵ‖²_F / ‖X W‖²_F for every quantized linear, X its input in the
float model. Last, the flops the run cannot avoid (calibration forwards, Hessians, GPTQ sweeps and Cholesky
factors) at the float32 matmul rate measured in the same run: our floor. See benchmarks/README.md.

  PYTHONPATH=/path/to/main /work/venv-peer/bin/python benchmarks/model.py              # 4 blocks, 32 × 512
  PYTHONPATH=$PWD python benchmarks/model.py --tiny --blocks 1 --nsamples 4 --seqlen 64 --no-peer   # seconds

Progress on stderr; one JSON line on stdout, appended to --out.
"""
import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
BITS, GROUP_SIZE = 4, 128  # the peer's W4A16 scheme: int4, group 128, symmetric (compressed_tensors _int_wnam)
# --tiny: a Qwen3 with every linear a multiple of the group size, for the smoke test (a folder in a second).
TINY = dict(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            rope_theta=1e4, max_position_embeddings=1024, tie_word_embeddings=True)


def _sibling(name):
  """benchmarks/<name>.py as a module (its shared helpers), however this file was loaded."""
  spec = importlib.util.spec_from_file_location(f"bench_{name}", pathlib.Path(__file__).with_name(f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


_layer = _sibling("layer")  # machine_facts, version, matmul_rate, emit, _git_commit


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--blocks", type=int, default=4, help="decoder blocks of the Qwen3-0.6B-shaped model")
  p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
  p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
  p.add_argument("--method", default="gptq", help="our --method (the peer always runs GPTQ)")
  p.add_argument("--rank", type=int, default=0, help="our --rank (default 0: GPTQ alone, as the peer)")
  p.add_argument("--loops", type=int, default=0, help="our --loops (refinement loops)")
  p.add_argument("--protocol", choices=("quantized", "fp"), default="quantized",
                 help="block i+1's inputs from the quantized block i (GPTQ's) or the float one; the peer gets the "
                 "same through its propagate_error (True / False)")
  p.add_argument("--diagnostics", default=None,
                 help="our --diagnostics VALUE, passed on as given (default: not passed, the command's default)")
  p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                 help="our --act-order / --no-act-order (rows by decreasing H_ii, group grids fitted up front: the "
                 "peer's actorder=static); default: not passed, the command's default (on since 2026-12-03)")
  p.add_argument("--fast", action="store_true",
                 help="our --fast preset (no clip search, no act-order; --act-order beside it wins): the peer's "
                 "algorithm is min-max grids + act-order, so --fast --act-order is the like-for-like pairing")
  p.add_argument("--batch-size", type=int, default=None,
                 help="our --batch-size (windows per forward); default: not passed, the command's (1024 tokens)")
  p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                 help="also run llm-compressor (skipped with a message when it is not importable)")
  p.add_argument("--peer-batch-size", type=int, default=1, help="oneshot's batch_size (its default: 1)")
  p.add_argument("--peer-actorder", choices=("static", "none"), default="static",
                 help="GPTQModifier's actorder: static is its default (activation order, grids fitted up front); "
                 "none visits rows in order, as our command does without --act-order")
  p.add_argument("--peer-threads", type=int, default=None, help="torch threads of the peer (default: torch's)")
  p.add_argument("--eval-samples", type=int, default=8, help="held-apart windows for the per-layer errors")
  p.add_argument("--eval-seed", type=int, default=1, help="seed of the held-apart windows (calibration: 0)")
  p.add_argument("--matmul-d", type=int, default=2048, help="size of the float32 matmul that sets the rate")
  p.add_argument("--reps", type=int, default=3, help="best-of repetitions of the matmul")
  p.add_argument("--compile-cache", choices=("cold", "warm"), default="cold",
                 help="our child's persistent compilation cache: cold (a fresh, empty folder: a user's first run) "
                 "or warm (WORKDIR/compile-cache, kept between runs: a repeated run, once a first one filled it)")
  p.add_argument("--tiny", action="store_true", help="a tiny Qwen3 (hidden 128) instead of Qwen3-0.6B's shape")
  p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/gilora_model_bench"))
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "model.jsonl")
  p.add_argument("--peer-child", type=pathlib.Path, default=None, help=argparse.SUPPRESS)  # internal: run the peer
  return p.parse_args(argv)


def log(msg):
  print(f"[model] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ inputs


def model_config(blocks, tiny):
  from gilora_jax.models import qwen3  # pylint: disable=import-outside-toplevel
  if tiny:
    from tests.pipeline import tiny as tiny_lib  # pylint: disable=import-outside-toplevel
    return qwen3.ModelConfig(vocab_size=len(tiny_lib.CHARS) + 1, num_hidden_layers=blocks, **TINY)
  return dataclasses.replace(qwen3.ModelConfig.qwen3_0_6b(), num_hidden_layers=blocks)


def build(workdir: pathlib.Path, blocks: int, tiny: bool) -> pathlib.Path:
  """The random model folder, cached: rebuilt only when its config.json is missing or of another shape."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.pipeline.tiny
  from gilora_jax.models import convert, qwen3  # pylint: disable=import-outside-toplevel
  from tests.pipeline import tiny as tiny_lib  # pylint: disable=import-outside-toplevel
  cfg = model_config(blocks, tiny)
  folder = workdir / (f"tiny-{blocks}blocks" if tiny else f"qwen3-0.6b-{blocks}blocks")
  want = {k: v for k, v in cfg.to_hf_config().items() if k in ("hidden_size", "intermediate_size",
                                                                 "num_hidden_layers", "vocab_size")}
  have = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
  if any(have.get(k) != v for k, v in want.items()) or not (folder / "tokenizer.json").exists():
    log(f"building a random {'tiny Qwen3' if tiny else 'Qwen3-0.6B-shaped model'} with {blocks} blocks in {folder}")
    shutil.rmtree(folder, ignore_errors=True)
    model = tiny_lib.random_model(qwen3.Qwen3, cfg, seed=0, scale=0.02)
    convert.save_hf(model, folder)
    tiny_lib.save_char_tokenizer(folder)
    del model
  return folder


def write_text(path: pathlib.Path, n_chars: int, seed: int) -> pathlib.Path:
  """`tiny.text(n_chars, seed)` at `path`, rewritten when shorter or of another seed."""
  from tests.pipeline import tiny as tiny_lib  # pylint: disable=import-outside-toplevel
  text = tiny_lib.text(n_chars, seed=seed)
  if not path.exists() or path.read_text(encoding="utf-8") != text:
    path.write_text(text, encoding="utf-8")
  return path


def windows(folder, text_path, nsamples, seqlen, seed):
  """(nsamples, seqlen) int32: exactly our command's calibration windows (`data.lm_calibration`: one tokenizer
  call with the folder's tokenizer, then `calib.token_windows(ids, nsamples, seqlen, seed)`)."""
  from gilora_jax.pipeline import data  # pylint: disable=import-outside-toplevel
  batches = data.lm_calibration(data.load_tokenizer(folder), data.load_text(text_path), nsamples, seqlen,
                                nsamples, seed)
  return np.concatenate([np.asarray(b.inputs) for b in batches])


# ------------------------------------------------------------------------------------------------ children


def run_child(cmd, log_path: pathlib.Path, extra_env: dict | None = None):
  """Runs `cmd` (stdout to memory via a file, stderr to `log_path`); returns (seconds, its own peak RSS in GiB,
  stdout). `os.wait4` on the child's pid gives that child's rusage alone (with any children it waited for),
  so the figure is its own peak, not the maximum over every child this process ever ran."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
         "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), **(extra_env or {})}
  out_path = log_path.with_suffix(".stdout")
  with open(out_path, "w", encoding="utf-8") as out, open(log_path, "w", encoding="utf-8") as err:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)  # pylint: disable=consider-using-with
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
  p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
  if p.returncode:
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
    raise SystemExit(f"{' '.join(map(str, cmd))} failed (exit {p.returncode}); {log_path} ends:\n{tail}")
  return seconds, usage.ru_maxrss / 2**20, out_path.read_text(encoding="utf-8")  # KiB -> GiB


def ours_command(a, folder, out, calib):
  cmd = [sys.executable, "-m", "gilora_jax.cli", "quantize", "--model", str(folder), "--out", str(out),
         "--method", a.method, "--bits", str(BITS), "--group-size", str(GROUP_SIZE), "--symmetric",
         "--rank", str(a.rank), "--loops", str(a.loops),
         "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--calib", str(calib), "--seed", "0",
         "--protocol", a.protocol] + ([] if a.batch_size is None else ["--batch-size", str(a.batch_size)])
  return cmd + ([] if a.diagnostics is None else ["--diagnostics", a.diagnostics]) + (
      ["--fast"] if a.fast else []) + ([] if a.act_order is None else ["--act-order" if a.act_order else "--no-act-order"])


def peer_available():
  return all(importlib.util.find_spec(m) is not None for m in ("llmcompressor", "torch", "datasets"))


def peer_child(spec_path: pathlib.Path) -> None:
  """The peer's process (`--peer-child SPEC.json`): load the folder with transformers, `oneshot` GPTQ W4A16 on
  the given windows, save dense; prints one JSON line with its stages. The solve and the Hessian hooks are timed
  by wrapping the two functions `GPTQModifier` calls (`quantize_weight`, `accumulate_hessian`); the rest of
  `oneshot` is tracing the model into subgraphs and the calibration/propagation forwards."""
  spec = json.loads(spec_path.read_text())
  t0 = time.perf_counter()
  import datasets  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from llmcompressor import oneshot  # pylint: disable=import-outside-toplevel
  from llmcompressor.modifiers.gptq import GPTQModifier  # pylint: disable=import-outside-toplevel
  from llmcompressor.modifiers.gptq import base as gptq_base  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel
  stages = {"import_s": time.perf_counter() - t0, "gptq_solve_s": 0.0, "hessian_s": 0.0}

  def timed(name, fn):
    def wrapper(*args, **kwargs):
      t = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        stages[name] += time.perf_counter() - t
    return wrapper

  gptq_base.quantize_weight = timed("gptq_solve_s", gptq_base.quantize_weight)
  gptq_base.accumulate_hessian = timed("hessian_s", gptq_base.accumulate_hessian)
  if spec["threads"]:
    torch.set_num_threads(spec["threads"])
  t = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32)
  stages["load_s"] = time.perf_counter() - t
  ids = np.load(spec["windows"])
  ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
  extra = {} if spec["actorder"] == "static" else {"actorder": None}  # static: GPTQModifier's own default
  recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], **extra)
  t = time.perf_counter()
  oneshot(model=model, tokenizer=spec["folder"], dataset=ds, recipe=recipe, num_calibration_samples=len(ids),
          max_seq_length=ids.shape[1], batch_size=spec["batch_size"], shuffle_calibration_samples=False,
          propagate_error=spec["propagate_error"])
  stages["oneshot_s"] = time.perf_counter() - t
  t = time.perf_counter()
  model.save_pretrained(spec["out"], save_compressed=False)  # dense: the fake-quantized float weights
  stages["save_s"] = time.perf_counter() - t
  stages["rest_of_oneshot_s"] = stages["oneshot_s"] - stages["gptq_solve_s"] - stages["hessian_s"]
  print(json.dumps({"stages": stages, "torch_threads": torch.get_num_threads()}), flush=True)


# ------------------------------------------------------------------------------------------------ errors


def effective_kernel(linear) -> np.ndarray:
  """The (d_in, d_out) float32 kernel a linear applies: W for `nnx.Linear`, Q + L R for `QuantizedLinear`."""
  from gilora_jax.nn import QuantizedLinear  # pylint: disable=import-outside-toplevel
  if not isinstance(linear, QuantizedLinear):
    return np.asarray(linear.kernel[...], np.float32)
  K = np.asarray(linear.dequantized(), np.float32)
  if linear.rank:
    K = K + np.asarray(linear.L[...], np.float32) @ np.asarray(linear.R[...], np.float32)
  return K


class PeerWeights:
  """The peer's dense output: every `*.weight` (d_out, d_in) of its safetensors files, transposed on read."""

  def __init__(self, folder: pathlib.Path):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self.files = [safe_open(str(f), "np") for f in sorted(folder.glob("*.safetensors"))]
    self.where = {k: f for f in self.files for k in f.keys()}

  def kernel(self, path: str) -> np.ndarray:
    return np.ascontiguousarray(self.where[f"model.{path}.weight"].get_tensor(f"model.{path}.weight").T,
                                np.float32)

  def grid_deviation(self, path: str) -> float | None:
    """max |w / s − round(w / s)| over the layer (0 when every weight is on its group's int grid), or None."""
    key = f"model.{path}.weight_scale"
    if key not in self.where:
      return None
    w = self.where[f"model.{path}.weight"].get_tensor(f"model.{path}.weight").astype(np.float64)  # (d_out, d_in)
    s = self.where[key].get_tensor(key).astype(np.float64)  # (d_out, d_in / group)
    s = np.repeat(s, w.shape[1] // s.shape[1], axis=1)
    r = w / s
    return float(np.max(np.abs(r - np.round(r))))


def layer_errors(folder, ours_dir, peer_dir, eval_ids, batch_size):
  """[{path, d_in, d_out, ours, peer}] with rel_err = ‖X(W − Ŵ)‖² / ‖XW‖² summed over the held-apart windows,
  X each linear's input in the float model (the block's taps), block after block through the float blocks."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import quant_sites  # pylint: disable=import-outside-toplevel
  from gilora_jax.nn import get_path  # pylint: disable=import-outside-toplevel

  model = gj.load_model(folder)
  ours = gj.load_model(ours_dir)
  peer = PeerWeights(peer_dir) if peer_dir else None
  sites = quant_sites(model)

  @jax.jit
  def sums(X, W, Ws):  # ‖XW‖², and ‖X(W − Ŵ)‖² for each Ŵ in Ws
    X = X.reshape(-1, X.shape[-1])
    f = lambda A: jnp.sum(jnp.square(jnp.matmul(X, A, precision="highest")))  # noqa: E731
    return f(W), [f(W - V) for V in Ws]

  block_fn = jax.jit(lambda g, s, x: nnx.merge(g, s)(x), static_argnums=0)
  xs = [model.embed(jnp.asarray(eval_ids[k:k + batch_size])) for k in range(0, len(eval_ids), batch_size)]
  rows = []
  for i, block in enumerate(model.layers):
    graphdef, state = nnx.split(block)
    kernels = {}
    for paths in sites.values():
      for rel in paths:
        path = f"layers.{i}.{rel}"
        W = effective_kernel(get_path(block, rel))
        Ws = [effective_kernel(get_path(ours.layers[i], rel))] + ([peer.kernel(path)] if peer else [])
        kernels[rel] = (path, jnp.asarray(W), [jnp.asarray(V) for V in Ws])
    acc = {rel: np.zeros(3) for rel in kernels}
    for k, x in enumerate(xs):
      xs[k], taps = block_fn(graphdef, state, x)
      for site, paths in sites.items():
        for rel in paths:
          den, nums = sums(taps[site], kernels[rel][1], kernels[rel][2])
          acc[rel][:1 + len(nums)] += [float(den)] + [float(n) for n in nums]
    for rel, (path, W, _) in kernels.items():
      den, num_ours, num_peer = acc[rel]
      rows.append({"path": path, "d_in": int(W.shape[0]), "d_out": int(W.shape[1]), "ours": num_ours / den,
                   "peer": num_peer / den if peer else None,
                   **({"peer_grid_max_dev": peer.grid_deviation(path)} if peer else {})})
    log(f"errors of block {i}: ours " + ", ".join(f"{r['path'].rsplit('.', 1)[-1]} {r['ours']:.4g}"
                                                  for r in rows[-len(kernels):]))
  return rows


# ------------------------------------------------------------------------------------------------ floor


def floor(cfg: dict, nsamples: int, seqlen: int, forwards: int, rate: float) -> dict:
  """The flops a whole-model GPTQ run cannot avoid, per the model's config.json, and their time at `rate`.

  Per block, n = nsamples · seqlen calibration tokens:
    forwards  `forwards` × (2 · linear params · n + 4 · nsamples · seqlen² · heads · head_dim): the linears, and
              the full T×T score and value products (what both implementations compute);
    hessian   Σ over input sites 2 · n · d_in² (q/k/v share one, gate/up share one, o and down one each);
    sweep     Σ over linears d_in² · d_out: each row's error reaches every later row once (half the d_in×d_in
              triangle, 2 flops per multiply-add), GPTQ's lazy-batch updates;
    cholesky  Σ over input sites d_in³ / 3.
  """
  d, f = cfg["hidden_size"], cfg["intermediate_size"]
  nh, kh, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
  linears = [(d, nh * hd), (d, kh * hd), (d, kh * hd), (nh * hd, d), (d, f), (d, f), (f, d)]
  site_d = [d, nh * hd, d, f]
  n, blocks = nsamples * seqlen, cfg["num_hidden_layers"]
  gflop = {
      "forward_gflop": forwards * (2 * sum(a * b for a, b in linears) * n + 4 * nsamples * seqlen**2 * nh * hd),
      "hessian_gflop": sum(2 * n * s**2 for s in site_d),
      "sweep_gflop": sum(a * a * b for a, b in linears),
      "cholesky_gflop": sum(s**3 / 3 for s in site_d),
  }
  gflop = {k: v * blocks / 1e9 for k, v in gflop.items()}
  total = sum(gflop.values())
  return {**gflop, "forwards_per_block": forwards, "total_gflop": total, "floor_s": total * 1e9 / rate,
          **{k.replace("gflop", "s"): v * 1e9 / rate for k, v in gflop.items()}}


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
  a = parse_args(argv)
  if a.peer_child is not None:
    return peer_child(a.peer_child)
  t_all, load_before = time.perf_counter(), os.getloadavg()[0]
  a.workdir.mkdir(parents=True, exist_ok=True)
  folder = build(a.workdir, a.blocks, a.tiny)
  cfg = json.loads((folder / "config.json").read_text())
  calib = write_text(a.workdir / "calib.txt", max(2 * a.nsamples * a.seqlen, 4 * a.seqlen), seed=1)
  held = write_text(a.workdir / "eval.txt", max(2 * a.eval_samples * a.seqlen, 4 * a.seqlen), seed=2)
  calib_ids = windows(folder, calib, a.nsamples, a.seqlen, seed=0)
  eval_ids = windows(folder, held, a.eval_samples, a.seqlen, seed=a.eval_seed)
  np.save(a.workdir / "calib_windows.npy", calib_ids)
  log(f"{folder.name}: {a.nsamples} × {a.seqlen} calibration windows, {a.eval_samples} held-apart windows")

  rate0 = _layer.matmul_rate(a.matmul_d, a.reps)
  log(f"float32 matmul {a.matmul_d}²: {rate0 / 1e9:.1f} Gflop/s")

  logs = a.workdir / "logs"
  logs.mkdir(exist_ok=True)
  ours_out = a.workdir / f"out-ours-{a.method}-{a.protocol}"
  for p in (ours_out, ours_out.with_name(ours_out.name + ".partial")):
    shutil.rmtree(p, ignore_errors=True)
  cmd = ours_command(a, folder, ours_out, calib)
  log(f"ours: {' '.join(cmd[1:])}  (stderr: {logs / 'ours.log'})")
  # the gilora command keeps compiled programs under ~/.cache by default: without this, which run pays the
  # compilation would depend on what ran before on the machine
  cache = a.workdir / ("compile-cache" if a.compile_cache == "warm" else "compile-cache-cold")
  if a.compile_cache == "cold":
    shutil.rmtree(cache, ignore_errors=True)
  cache_entries = len(os.listdir(cache)) if cache.is_dir() else 0
  log(f"compilation cache {a.compile_cache}: {cache} ({cache_entries} entries)")
  load_ours = os.getloadavg()[0]
  ours_s, ours_rss, stdout = run_child(cmd, logs / "ours.log", {"GILORA_COMPILATION_CACHE": str(cache)})
  summary = json.loads(stdout.strip().splitlines()[-1])
  records = [json.loads(line) for line in (ours_out / "records.jsonl").read_text().splitlines() if line.strip()]
  log(f"ours: {ours_s:.1f} s, peak RSS {ours_rss:.2f} GiB, quantize_model {summary.get('seconds')} s")

  peer = None
  if not a.peer:
    log("--no-peer: skipping llm-compressor")
  elif not peer_available():
    log("llm-compressor (or torch, datasets) is not importable here; skipping the peer. Its virtual environment: "
        "benchmarks/README.md.")
  else:
    peer_out = a.workdir / f"out-peer-{a.protocol}"
    shutil.rmtree(peer_out, ignore_errors=True)
    spec = {"folder": str(folder), "out": str(peer_out), "windows": str(a.workdir / "calib_windows.npy"),
            "batch_size": a.peer_batch_size, "actorder": a.peer_actorder, "threads": a.peer_threads,
            "propagate_error": a.protocol == "quantized"}
    spec_path = a.workdir / "peer_spec.json"
    spec_path.write_text(json.dumps(spec))
    log(f"peer: llm-compressor oneshot GPTQ W4A16, actorder {a.peer_actorder}, batch {a.peer_batch_size}, "
        f"propagate_error {spec['propagate_error']}  (stderr: {logs / 'peer.log'})")
    load_peer = os.getloadavg()[0]
    peer_s, peer_rss, stdout = run_child([sys.executable, str(pathlib.Path(__file__).resolve()), "--peer-child",
                                          str(spec_path)], logs / "peer.log")
    peer = {"wall_s": peer_s, "rss": peer_rss, "out": peer_out, "loadavg": load_peer,
            **json.loads(stdout.strip().splitlines()[-1])}
    log(f"peer: {peer_s:.1f} s, peak RSS {peer_rss:.2f} GiB, stages "
        + ", ".join(f"{k} {v:.1f}" for k, v in peer["stages"].items()))

  rate1 = _layer.matmul_rate(a.matmul_d, a.reps)
  rate = max(rate0, rate1)
  log(f"float32 matmul again: {rate1 / 1e9:.1f} Gflop/s; per-layer errors on the held-apart windows")
  rows = layer_errors(folder, ours_out, peer["out"] if peer else None, eval_ids, a.batch_size or 8)
  ours_mean = float(np.mean([r["ours"] for r in rows]))
  peer_mean = float(np.mean([r["peer"] for r in rows])) if peer else None

  fl = floor(cfg, a.nsamples, a.seqlen, 2 if a.protocol == "quantized" else 1, rate)
  rec = {
      "bench": "model_gptq",
      "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "model": folder.name, "blocks": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
      "params_m": round(os.path.getsize(folder / "model.safetensors") / 4 / 1e6, 1),
      "nsamples": a.nsamples, "seqlen": a.seqlen, "eval_samples": a.eval_samples, "eval_seed": a.eval_seed,
      "method": a.method, "rank": a.rank, "loops": a.loops, "protocol": a.protocol, "bits": BITS,
      "group_size": GROUP_SIZE, "symmetric": True,
      "ours_compile_cache": a.compile_cache, "ours_compile_cache_entries_before": cache_entries,
      "ours_cmd": " ".join(["gilora"] + cmd[3:]), "ours_batch_size": a.batch_size, "ours_diagnostics": a.diagnostics,
      "ours_act_order": a.act_order, "ours_fast": a.fast,
      "ours_layer_config": records[0].get("config") if records else None,  # as the command resolved it
      "ours_wall_s": ours_s, "ours_peak_rss_gb": ours_rss, "ours_quantize_s": summary.get("seconds"),
      "ours_layer_solve_s": sum(r["seconds"] for r in records),
      "ours_stages": summary.get("stages"), "ours_calib_mean_rel_err": summary.get("mean_rel_err"),
      "loadavg_1m_ours_start": load_ours,
      "peer": None, "peer_wall_s": None, "peer_peak_rss_gb": None, "peer_stages": None,
      "matmul_d": a.matmul_d, "matmul_gflops": rate / 1e9, "matmul_gflops_before_after": [rate0 / 1e9, rate1 / 1e9],
      "floor": fl, "ours_over_floor": ours_s / fl["floor_s"],
      "ours_quantize_over_floor": (summary["seconds"] / fl["floor_s"]) if summary.get("seconds") else None,
      "peer_over_ours": None, "peer_over_floor": None,
      "layers": rows, "ours_mean_rel_err": ours_mean, "peer_mean_rel_err": peer_mean,
      "err_ratio_ours_over_peer": ours_mean / peer_mean if peer else None,
  }
  if peer:
    devs = [r["peer_grid_max_dev"] for r in rows if r.get("peer_grid_max_dev") is not None]
    rec.update(peer="llmcompressor oneshot GPTQModifier(targets='Linear', scheme='W4A16', ignore=['lm_head'])",
               peer_actorder=a.peer_actorder, peer_batch_size=a.peer_batch_size,
               peer_propagate_error=a.protocol == "quantized", peer_save="save_compressed=False (dense)",
               peer_torch_threads=peer["torch_threads"], peer_wall_s=peer["wall_s"], peer_peak_rss_gb=peer["rss"],
               peer_stages=peer["stages"], loadavg_1m_peer_start=peer["loadavg"],
               peer_grid_max_dev=max(devs) if devs else None,
               peer_over_ours=peer["wall_s"] / ours_s, peer_over_floor=peer["wall_s"] / fl["floor_s"])
  import gilora_jax  # pylint: disable=import-outside-toplevel
  commit = _layer._git_commit(pathlib.Path(gilora_jax.__file__).parent)  # pylint: disable=protected-access
  rec.update(gilora_commit=commit)
  rec.update(_layer.machine_facts())
  rec.update(datasets=_layer.version("datasets"), transformers=_layer.version("transformers"),
             total_s=time.perf_counter() - t_all, loadavg_1m_before=load_before,
             loadavg_1m_after=os.getloadavg()[0])
  log(f"ours {ours_s:.1f} s / floor {fl['floor_s']:.1f} s = {rec['ours_over_floor']:.2f}; mean rel_err ours "
      f"{ours_mean:.4g}" + (f", peer {peer_mean:.4g} (ratio {rec['err_ratio_ours_over_peer']:.3f}); peer "
                            f"{peer['wall_s']:.1f} s = {rec['peer_over_ours']:.2f}× ours" if peer else ""))
  return _layer.emit(rec, a.out)


if __name__ == "__main__":
  main()
