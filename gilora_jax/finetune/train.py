"""The QPEFT loop around `finetune.core`: initialise, train, evaluate a held-apart split, checkpoint, resume.

`finetune(model, data, ...)` trains the factors of a quantized model in memory; with `out=` it also keeps

  out/
    finetune.json       what this run is (init, options, seeds, data and model fingerprints, SRR's k per layer):
                        a later call with `out` resumes only a run identical to it
    train/step_NNNNNNN/ the latest orbax checkpoint (factors, optimizer state, step, data position, k per layer),
                        written atomically every `ckpt_every` steps (`pipeline.ckpt.write_folder`); older ones of
                        this run are removed once a newer one is on disk
    curves.jsonl        one line per step: step, loss, lr, seconds; + eval_loss and eval_perplexity / eval_accuracy
                        every `eval_every` steps (step 0 is the initialisation)
    curves.png          the curves (matplotlib)

and resumes from the latest checkpoint: the data order is a function of (seed, position) and the step is
restored bit for bit, so a killed run continues the same loss curve (curves.jsonl is cut back to the step it
resumes from). `finetune_folder` (`gilora finetune`) adds reading a quantized checkpoint, its float source
(for LoftQ), the data files, and writes `out/model/`: an ordinary quantized checkpoint (`gilora eval`,
`gilora export` read it).

A loss that is not finite stops the run (`DivergedError`) with the step and learning rate; the last good
checkpoint stays as it was.
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gilora_jax import nn
from gilora_jax.finetune import core
from gilora_jax.finetune.core import INITS, TrainConfig
from gilora_jax.pipeline import ckpt, files as files_lib

log = logging.getLogger(__name__)

FORMAT = "gilora_jax.finetune/1"
RUN_FILE = "finetune.json"
TRAIN_DIR = "train"
CURVES_FILE = "curves.jsonl"
PLOT_FILE = "curves.png"
MODEL_DIR = "model"
# The quantizer method whose own factors each init keeps (olrc: OLrC of the checkpoint's GPTQ Q).
OWN_FACTORS = {"olrc": "gptq+olrc", "gilora": "gilora", "srr": "srr"}


class DivergedError(ValueError):
  """The loss stopped being finite."""


class Data(NamedTuple):
  """Train and held-apart examples. LM: (n, T) int32 windows; classifier: (pixels (n, C, H, W), labels (n,))."""
  objective: str
  train: Any
  held: Any
  describe: dict  # what they are (paths, counts, the split), stored in finetune.json


class FinetuneResult(NamedTuple):
  model: nnx.Module
  curves: list[dict]
  ks: dict[str, int]   # SRR's preserved rank per layer (empty for the other inits)
  resumed_from: int | None


def _rows(x) -> int:
  return int(np.shape(jax.tree.leaves(x)[0])[0])


def _take(x, idx):
  return jax.tree.map(lambda a: np.asarray(a)[idx], x)


def lm_data(ids: np.ndarray, seqlen: int, *, held_ids: np.ndarray | None = None, held_fraction: float = 0.1,
            describe: dict | None = None) -> Data:
  """Non-overlapping `seqlen` windows of a token stream (`evaluate.windows`, the evaluation's); the held-apart split
  is `held_ids`' windows, or the last `held_fraction` of the windows (never shuffled in: no window is in both)."""
  from gilora_jax.pipeline import evaluate  # pylint: disable=import-outside-toplevel
  w = evaluate.windows(np.asarray(ids), seqlen)
  if held_ids is not None:
    train, held = w, evaluate.windows(np.asarray(held_ids), seqlen)
  else:
    n_held = int(round(len(w) * held_fraction))
    if n_held < 1 or n_held >= len(w):
      raise ValueError(f"the text gives {len(w)} windows of {seqlen} tokens: too few to hold {held_fraction:.0%} apart "
                       f"and train on the rest; pass a longer text, a smaller --seqlen or a held-apart text.")
    train, held = w[:-n_held], w[-n_held:]
  return Data("lm", train, held, {**(describe or {}), "seqlen": seqlen, "train_windows": int(len(train)),
                                  "held_windows": int(len(held))})


def image_data(pixels: np.ndarray, labels: np.ndarray, *, held: tuple[np.ndarray, np.ndarray] | None = None,
               held_fraction: float = 0.2, seed: int = 0, describe: dict | None = None) -> Data:
  """Preprocessed images (n, C, H, W) and labels; held apart: `held`, or a seeded `held_fraction` of them."""
  pixels, labels = np.asarray(pixels, np.float32), np.asarray(labels, np.int32)
  if held is None:
    n_held = int(round(len(labels) * held_fraction))
    if n_held < 1 or n_held >= len(labels):
      raise ValueError(f"{len(labels)} images are too few to hold {held_fraction:.0%} apart and train on the rest; "
                       f"pass more images or a held-apart folder.")
    perm = np.random.default_rng([seed, 7]).permutation(len(labels))
    held = (pixels[perm[:n_held]], labels[perm[:n_held]])
    pixels, labels = pixels[perm[n_held:]], labels[perm[n_held:]]
  return Data("classifier", (pixels, labels), (np.asarray(held[0], np.float32), np.asarray(held[1], np.int32)),
              {**(describe or {}), "train_images": int(len(labels)), "held_images": int(len(held[1]))})


def batch_indices(n: int, batch: int, seed: int, position: int) -> np.ndarray:
  """Example indices [position, position + batch) of the stream that visits a fresh seeded permutation of the n
  examples every epoch: a function of (seed, position) only, so a resumed run draws the same batches."""
  out = []
  for p in range(position, position + batch):
    epoch, i = divmod(p, n)
    out.append(np.random.default_rng([seed, epoch]).permutation(n)[i])
  return np.asarray(out)


# ------------------------------------------------------------------------------------------------ initialisation


def _records_by_path(records: list[dict] | None) -> dict[str, dict]:
  return {r["path"]: r for r in records or ()}


def init_factors(model: nnx.Module, init: str, paths: list[str], *, key: jax.Array, records: list[dict] | None = None,
                 float_model: nnx.Module | None = None, loftq_iters: int = 1) -> dict[str, int]:
  """Sets L, R of the `QuantizedLinear`s at `paths` of `model` (in place) for `init` (`core`'s docstring), from the
  Q they hold; returns SRR's preserved rank per layer (init "srr"), else {}.

  `records` (the checkpoint's per-layer records) say which method wrote each layer: "olrc", "gilora" and "srr"
  keep the factors of a layer that method quantized (their Q and L R are one design) and refuse any other.
  `float_model`: the float weights W, for "loftq".
  """
  if init not in INITS:
    raise ValueError(f"init {init!r} is unknown; use one of {', '.join(INITS)}.")
  by_path = _records_by_path(records)
  ks = {}
  for i, path in enumerate(paths):
    layer = nn.get_path(model, path)
    if init == "zero":
      lr = core.zero_init(jax.random.fold_in(key, i), layer.in_features, layer.out_features, layer.rank)
      layer.L.set_value(lr.L)
      layer.R.set_value(lr.R)
    elif init == "loftq":
      if float_model is None:
        raise ValueError("init 'loftq' needs the float weights W (the checkpoint's source model) for SVD(W − Q).")
      W = jnp.asarray(nn.get_path(float_model, path).kernel[...], jnp.float32)
      codes, scales, zeros, _, L, R = core.loftq_init(W, layer.dequantized(), layer.rank, layer.grid, loftq_iters)
      layer.L.set_value(L)
      layer.R.set_value(R)
      if loftq_iters > 1:  # LoftQ's own Q (core's docstring)
        layer.codes.set_value(nn.pack_codes(codes, layer.grid.bits))
        layer.scales.set_value(scales)
        layer.zeros.set_value(zeros)
    else:
      want = OWN_FACTORS[init]
      rec = by_path.get(path)
      if rec is None or rec.get("method") != want:
        got = "no record" if rec is None else f"method {rec.get('method')!r}"
        raise ValueError(f"init {init!r} keeps the factors a {want} quantization wrote, but {path} has {got}; "
                         f"quantize with --method {want} first (its Q and L R are designed together), or use init "
                         f"zero or loftq on this checkpoint.")
      if init == "srr":
        if (rec.get("config") or {}).get("final_olrc"):
          raise ValueError(f"init 'srr' trains SRR's preserved and residual blocks, but {path} was quantized with "
                           f"SRR's final OLrC, which replaces them by one optimal rank-r term; quantize with "
                           f"--method srr --no-final-olrc for this init, or use init olrc on this checkpoint.")
        k = rec.get("srr_k")
        if k is None:
          k = (rec.get("config") or {}).get("srr_k")
        if k is None:
          raise ValueError(f"{path}: the checkpoint does not record SRR's preserved rank k (written before records kept "
                           f"it, with the criterion choosing k); quantize it again with this gilora_jax, or with a "
                           f"fixed --srr-k.")
        ks[path] = int(k)
    if init != "zero":
      L, R = core.balance(layer.L[...], layer.R[...])
      layer.L.set_value(L)
      layer.R.set_value(R)
  return ks


# ------------------------------------------------------------------------------------------------ checkpoints


def _fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model: nnx.Module) -> str:
  """Architecture, config and every quantized site's shapes and grid: what a checkpoint of this model must match."""
  return _fingerprint({"config": dataclasses.asdict(model.config), "sites": nn.quantized_specs(model)})


def data_fingerprint(data: Data) -> str:
  h = hashlib.sha256()
  for x in jax.tree.leaves((data.train, data.held)):
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()[:16]


def _step_dir(out: str, step: int) -> str:
  return os.path.join(out, TRAIN_DIR, f"step_{step:07d}")


def _our_steps(out: str) -> list[int]:
  folder = os.path.join(out, TRAIN_DIR)
  if not os.path.isdir(folder):
    return []
  steps = []
  for name in os.listdir(folder):
    m = re.fullmatch(r"step_(\d{7})", name)
    if m and os.path.isfile(os.path.join(folder, name, ckpt.INFO_FILE)):
      steps.append(int(m.group(1)))
  return sorted(steps)


def _pack(tree) -> dict[str, np.ndarray]:
  """Every leaf of `tree` raveled into one 1-D array per dtype ({dtype name: array}), in leaf order: a handful of
  arrays for orbax instead of hundreds of small ones (a 28-layer model's factors and Adam moments are ~250
  leaves, which orbax writes one by one)."""
  groups: dict[str, list[np.ndarray]] = {}
  for x in jax.tree.leaves(tree):
    x = np.asarray(x)
    groups.setdefault(x.dtype.name, []).append(x.ravel())
  return {k: np.concatenate(v) for k, v in groups.items()}


def _unpack(packed: dict[str, np.ndarray], like):
  """Inverse of `_pack`: a tree structured like `like` (its leaves' shapes and dtypes)."""
  leaves, treedef = jax.tree.flatten(like)
  offsets: dict[str, int] = {}
  out = []
  for x in leaves:
    name, size = np.dtype(x.dtype).name, int(np.prod(np.shape(x)))
    o = offsets.get(name, 0)
    out.append(np.asarray(packed[name][o:o + size]).reshape(np.shape(x)))
    offsets[name] = o + size
  if any(offsets.get(k, 0) != v.size for k, v in packed.items()):
    raise ValueError("the checkpoint's arrays do not fit this model's factors and optimizer state")
  return jax.tree.unflatten(treedef, out)


def _save(out: str, step: int, params, opt_state, info: dict) -> None:
  ckpt.write_folder(_step_dir(out, step), _pack((params, opt_state)), {"format": FORMAT, **info})
  for old in _our_steps(out):  # ours only: step folders with our metadata
    if old < step:
      shutil.rmtree(_step_dir(out, old))


def _restore(out: str, step: int, params, opt_state, fix: str):
  folder = _step_dir(out, step)
  info = ckpt.read_checked(os.path.join(folder, ckpt.INFO_FILE), {"format", "step", "identity"}, (FORMAT,), fix)
  files_lib.verify(folder, info["files"], fix)
  like = (params, opt_state)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for k, v in _pack(jax.tree.map(
      lambda x: np.zeros((), x.dtype) if np.ndim(x) == 0 else np.zeros(np.shape(x), x.dtype), like)).items()}
  params, opt_state = _unpack(ckpt.read_tree(folder, target, fix), like)
  return params, opt_state, info


def _write_json(path: str, obj: Any) -> None:
  files_lib.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _write_curves(out: str, curves: list[dict]) -> None:
  files_lib.write_bytes(os.path.join(out, CURVES_FILE), "".join(json.dumps(c) + "\n" for c in curves).encode())


def check_out(out: str, identity: dict) -> bool:
  """Whether `out` holds this run, unfinished (resume); False when it is absent or empty. Raises for anything else:
  a folder that is not a fine-tune run, one of other settings or another model, a finished run."""
  if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
    return False
  run_file = os.path.join(out, RUN_FILE)
  if not os.path.isfile(run_file):
    raise FileExistsError(f"{out} exists and is not a gilora fine-tune run (no {RUN_FILE}); refusing to write into "
                          f"it. Pass another --out.")
  with open(run_file, encoding="utf-8") as f:
    theirs = json.load(f).get("identity", {})
  if theirs != identity:
    diff = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
    what = ("another model (its checkpoint's fingerprint differs)" if "model" in diff else
            f"other settings ({', '.join(diff)})")
    raise ValueError(f"{out} holds a fine-tune run of {what}; pass another --out, or delete {out} to start over.")
  if os.path.isdir(os.path.join(out, MODEL_DIR)):
    raise FileExistsError(f"{out} holds a finished fine-tune run ({os.path.join(out, MODEL_DIR)}); pass another --out.")
  return True


# ------------------------------------------------------------------------------------------------ the loop


def _evaluate(graphdef, params, rest, held, objective: str, batch_size: int, mesh=None) -> dict:
  total, aux, n = 0.0, 0.0, _rows(held)
  for i in range(0, n, batch_size):
    b = _batch(_take(held, np.arange(i, min(i + batch_size, n))), mesh)
    loss, a = core.eval_step(graphdef, params, rest, b, objective=objective)
    total, aux = total + float(loss), aux + float(a)
  loss = total / n
  if objective == "lm":
    return {"eval_loss": loss, "eval_perplexity": float(math.exp(min(loss, 700.0)))}
  return {"eval_loss": loss, "eval_accuracy": aux / n}


def _placed(tree, mesh=None):
  """`tree` committed to the first local device (no mesh), or replicated on every device of `mesh`: the placement
  the step's outputs have, so that every call of the jitted step sees the same argument shardings and it compiles
  once (uncommitted inputs would compile a second program for the committed outputs)."""
  if mesh is None:
    return jax.device_put(tree, jax.local_devices()[0])
  from gilora_jax import sharding  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda x: sharding.place(x, sharding.replicated(mesh)), tree)


def _batch(tree, mesh=None):
  """A batch of examples: on the first local device (no mesh), or its rows split over `mesh`'s ``data`` axis (a
  held-apart remainder that does not divide is replicated instead: evaluated whole on every device)."""
  if mesh is None:
    return _placed(tree)
  from gilora_jax import sharding  # pylint: disable=import-outside-toplevel
  rows = _rows(tree)
  if rows % mesh.shape["data"]:
    return _placed(tree, mesh)
  return jax.tree.map(lambda x: sharding.place(x, sharding.batch(mesh, np.shape(x))), tree)


def check_mesh(mesh, batch_size: int) -> None:
  """A fine-tune runs data-parallel on `mesh`: its micro-batch must divide over ``data`` (else `MeshError`, before
  any work), and it runs in one process (the checkpoints are written from this process's whole arrays)."""
  from gilora_jax import sharding  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    raise sharding.MeshError(f"a fine-tune runs in one process, and this one has joined {jax.process_count()}: run it "
                             f"on one host without jax.distributed (every local device goes on the mesh's data axis).")
  n = mesh.shape["data"]
  if batch_size % n:
    raise sharding.MeshError(f"--batch-size {batch_size} does not divide over the mesh's data axis of {n} devices: "
                             f"pass a multiple of {n} (the step's batch is split over data), or --mesh data=1.")


def finetune(model: nnx.Module, data: Data, *, init: str, cfg: TrainConfig = TrainConfig(), batch_size: int = 8,
             gamma: float = 0.1, seed: int = 0, pattern: str | None = None, eval_every: int = 50,
             eval_batch_size: int | None = None, ckpt_every: int = 0, out: str | None = None,
             records: list[dict] | None = None, float_model: nnx.Module | None = None, loftq_iters: int = 1,
             source: str | None = None, progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
             on_step: Callable[[dict], None] | None = None, mesh: Any = None) -> FinetuneResult:
  """Fine-tunes L and R of `model`'s `QuantizedLinear`s (all, or those whose path matches the regex `pattern`) on
  `data` from the initialisation `init`; returns a new model (the input is left untouched).

  Args:
    model: a quantized model (`gilora_jax.load_model` of a `gilora quantize` output).
    data: `lm_data` or `image_data`.
    init: one of `INITS` (`core`'s docstring); "olrc", "gilora", "srr" need `records`, "loftq" `float_model`.
    cfg: the optimizer (`TrainConfig`); `batch_size` examples per micro-batch, `cfg.accum` micro-batches a step.
    gamma: SRR's γ on the preserved block's updates (init "srr" only; 0 freezes it).
    seed: the data order and the "zero" init.
    eval_every: held-apart evaluation every N steps (and at step 0 and the last step); 0: only those two.
    ckpt_every: with `out`, an orbax checkpoint every N steps (and at the end); 0: only at the end.
    out: a folder for checkpoints and curves (module docstring); a run found there resumes.
    source: names the model in the run's identity (the checkpoint folder's checksum for `finetune_folder`).
    on_step: called with every curve row as it is made.
    mesh: a `sharding.make_mesh` mesh: data-parallel training, each micro-batch's rows split over its ``data``
      axis (`batch_size` a multiple of it), the factors, optimizer state and frozen base replicated; XLA sums the
      devices' gradients. The same numbers as one device up to the order of that sum (a run may resume on
      another mesh). None: the first local device.

  Raises:
    ValueError: no low-rank factors to train (rank 0, or `pattern` matches none), an init the checkpoint cannot
      give, options out of range, an `out` of another run; `DivergedError` when the loss is not finite.
  """
  cfg.validate()
  if batch_size < 1 or eval_every < 0 or ckpt_every < 0 or not 0 <= gamma <= 1 or loftq_iters < 1:
    raise ValueError(f"batch_size={batch_size} must be ≥ 1, eval_every/ckpt_every ≥ 0, gamma={gamma} in [0, 1], "
                     f"loftq_iters={loftq_iters} ≥ 1.")
  if data.objective not in core.OBJECTIVES:
    raise ValueError(f"objective {data.objective!r} must be one of {core.OBJECTIVES}.")
  if mesh is not None:
    check_mesh(mesh, batch_size)
  paths = core.factor_paths(model, pattern)
  if not paths:
    n_q = sum(isinstance(m, nn.QuantizedLinear) for _, m in nnx.iter_modules(model))
    if n_q == 0:
      raise ValueError("the model has no QuantizedLinear layers: quantize it first (gilora quantize).")
    if not core.factor_paths(model):
      raise ValueError(f"the model's {n_q} quantized layers have no low-rank factors (rank 0: quantized with rtn or "
                       f"gptq, or --rank 0), so there is nothing to fine-tune; quantize with a low-rank method "
                       f"(gptq+olrc, gilora, srr) and --rank > 0.")
    raise ValueError(f"the layer pattern {pattern!r} matches none of the {len(core.factor_paths(model))} layers with "
                     f"factors (paths look like {core.factor_paths(model)[0]}).")
  model = nn.clone(model)
  ks = init_factors(model, init, paths, key=jax.random.key(seed), records=records, float_model=float_model,
                    loftq_iters=loftq_iters)
  identity = {"init": init, "train": dataclasses.asdict(cfg), "batch_size": batch_size, "gamma": gamma if ks else None,
              "seed": seed, "pattern": pattern, "loftq_iters": loftq_iters if init == "loftq" else None,
              "eval_every": eval_every, "data": data_fingerprint(data), "model": source or model_fingerprint(model)}
  compute = core.with_compute_dtype(nn.clone(model), cfg.compute_dtype) if cfg.compute_dtype != "float32" else model
  graphdef, params, rest = core.split(compute, paths)
  # One placement for every array (orbax-restored ones differ from jit outputs), so the step compiles once.
  # The step donates the factors' buffers: train on copies, never on the arrays the caller's model shares.
  params, rest = _placed(jax.tree.map(lambda x: jnp.array(x, copy=True), params), mesh), _placed(rest, mesh)
  hyper = _placed(core.hyperparams(cfg), mesh)
  opt_state = _placed(core.optimizer(hyper, cfg.accum).init(params), mesh)
  mult = _placed(core.preserved_multipliers(params, ks, gamma), mesh)
  start, curves, seconds0, resumed = 0, [], 0.0, None
  fix = "" if out is None else f"delete {out} to start over."
  if out is not None:
    out = os.path.abspath(out)
    if check_out(out, identity):
      steps = _our_steps(out)
      if steps:
        params, opt_state, info = _restore(out, steps[-1], params, opt_state, fix)
        params, opt_state = _placed(params, mesh), _placed(opt_state, mesh)
        if {k: int(v) for k, v in info.get("ks", {}).items()} != ks:
          raise ValueError(f"{out}: the checkpoint's SRR split k differs from this checkpoint's records; {fix}")
        start, seconds0, resumed = int(info["step"]), float(info.get("seconds", 0.0)), int(info["step"])
        curves = [r for r in info.get("curves", []) if r["step"] <= start]  # the checkpoint's own rows
        log.info("resuming %s from step %d of %d", out, start, cfg.steps)
    else:
      os.makedirs(out, exist_ok=True)
      _write_json(os.path.join(out, RUN_FILE), {"format": FORMAT, "identity": identity, "data": data.describe,
                                                "ks": ks, "paths": paths})
  sched = core.schedule(cfg)
  held_bs = eval_batch_size or 4 * batch_size
  t0 = time.perf_counter() - seconds0
  n_train = _rows(data.train)

  def emit(row):
    curves.append(row)
    if on_step is not None:
      on_step(row)

  if start == 0:
    emit({"step": 0, "seconds": round(time.perf_counter() - t0, 3),
          **_evaluate(graphdef, params, rest, data.held, data.objective, held_bs, mesh)})
  last_good = start
  steps = range(start + 1, cfg.steps + 1)
  try:
    for step in (progress(steps) if progress else steps):
      losses = []
      for micro in range(cfg.accum):
        position = ((step - 1) * cfg.accum + micro) * batch_size
        b = _batch(_take(data.train, batch_indices(n_train, batch_size, seed, position)), mesh)
        params, opt_state, loss = core.train_step(graphdef, params, rest, opt_state, mult, b, hyper,
                                                  accum=cfg.accum, objective=data.objective)
        losses.append(loss)
      loss = float(np.mean([float(x) for x in losses]))
      lr = sched(step - 1)
      if not math.isfinite(loss):
        where = (f"the last good checkpoint is {_step_dir(out, last_good)} (step {last_good})"
                 if out is not None and last_good in _our_steps(out) else "no checkpoint was written after it")
        raise DivergedError(f"the loss became {loss} at step {step} (learning rate {lr:.3g}); stopped, {where}. "
                            f"Lower --lr, lengthen --warmup or clip harder (--clip).")
      row = {"step": step, "loss": loss, "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
      if step == cfg.steps or (eval_every and step % eval_every == 0):
        row.update(_evaluate(graphdef, params, rest, data.held, data.objective, held_bs, mesh))
      emit(row)
      if out is not None and (step == cfg.steps or (ckpt_every and step % ckpt_every == 0)):
        _save(out, step, params, opt_state, {"step": step, "position": step * cfg.accum * batch_size,
                                             "identity": identity, "ks": ks, "seconds": row["seconds"],
                                             "curves": curves})
        last_good = step
        _write_curves(out, curves)
  finally:  # a stop (NaN, Ctrl-C) keeps the rows made so far; a resumed run cuts them back to its checkpoint
    if out is not None and curves:
      _write_curves(out, curves)
  graphdef0, _, rest0 = core.split(model, paths)
  final = nnx.merge(graphdef0, params, rest0)
  if out is not None:
    from gilora_jax.pipeline import plot  # pylint: disable=import-outside-toplevel
    files_lib.write_bytes(os.path.join(out, PLOT_FILE), plot.curves_plot(curves, title=f"init {init}"))
  return FinetuneResult(final, curves, ks, resumed)


# ------------------------------------------------------------------------------------------------ from folders


def finetune_folder(model: str, out: str, *, init: str, text: str | None = None, images: str | None = None,
                    held_text: str | None = None, held_images: str | None = None, held_fraction: float | None = None,
                    seqlen: int = 128, verify: bool = True, float_model: str | None = None, **kwargs: Any) -> dict:
  """`gilora finetune`: fine-tunes the quantized checkpoint `model` on a text file (causal LMs) or an image folder
  (classifiers) into `out` (module docstring); returns the summary. `float_model`: the float HF folder for
  init "loftq" (default: the source the checkpoint records). Other options: `finetune`'s."""
  from gilora_jax.models import convert, llama  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline import data as data_lib  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline import run  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline.load import load_model  # pylint: disable=import-outside-toplevel
  folder = convert.local_folder(model)
  if not ckpt.is_checkpoint(folder):
    raise ValueError(f"{folder} is not a gilora checkpoint (no {ckpt.INFO_FILE}); fine-tune the output of gilora "
                     f"quantize.")
  info = ckpt.read_info(folder)
  meta = info["meta"]
  if "quant" not in meta:
    raise ValueError(f"{folder} holds a float model; quantize it first (gilora quantize --model ... --rank R).")
  out = os.path.abspath(out)
  if run._within(folder, out) or run._within(out, folder):  # pylint: disable=protected-access
    raise ValueError(f"--out {out} and the checkpoint {folder} overlap; pass an --out outside it.")
  lm = info["architecture"] in llama.ARCHITECTURES
  if lm and images is not None or not lm and text is not None:
    raise ValueError(f"{folder} holds a {info['architecture']}: pass {'--text' if lm else '--images'}, not "
                     f"{'--images' if lm else '--text'}.")
  if lm and text is None or not lm and images is None:
    raise ValueError(f"pass {'--text FILE (a causal LM)' if lm else '--images DIR (a classifier)'} to train on.")
  seed = kwargs.get("seed", 0)
  if lm:
    tok = data_lib.load_tokenizer(folder)
    ids = data_lib.tokenize(tok, data_lib.load_text(text, "training text (--text)"))
    held_ids = None if held_text is None else data_lib.tokenize(tok, data_lib.load_text(held_text, "held-apart text"))
    d = lm_data(ids, seqlen, held_ids=held_ids, held_fraction=0.1 if held_fraction is None else held_fraction,
                describe={"text": os.path.abspath(text), "held_text": held_text and os.path.abspath(held_text)})
  else:
    from gilora_jax.models import deit  # pylint: disable=import-outside-toplevel
    imgs, labels = data_lib.load_images(images)
    held = None
    if held_images is not None:
      h_imgs, h_labels = data_lib.load_images(held_images)
      held = (deit.preprocess(h_imgs, folder), h_labels)
    d = image_data(deit.preprocess(imgs, folder), labels, held=held, seed=seed,
                   held_fraction=0.2 if held_fraction is None else held_fraction,
                   describe={"images": os.path.abspath(images),
                             "held_images": held_images and os.path.abspath(held_images)})
  qmodel = load_model(folder, verify=verify)
  if not lm and int(np.max(d.train[1])) >= qmodel.config.num_labels:
    raise ValueError(f"{images}: label {int(np.max(d.train[1]))} but the model has {qmodel.config.num_labels} "
                     f"classes.")
  fm = None
  if init == "loftq":
    src = float_model or meta.get("source")
    if not src or not os.path.isdir(src):
      raise ValueError(f"init loftq needs the float weights: the checkpoint's source {src!r} is not a folder here; "
                       f"pass --float-model DIR.")
    fm = load_model(src)
    if fm.config != qmodel.config:
      raise ValueError(f"--float-model {src} is another model than the one {folder} was quantized from.")
  t0 = time.perf_counter()
  res = finetune(qmodel, d, init=init, out=out, records=meta.get("records"), float_model=fm,
                 source=info.get("checksum"), **kwargs)
  side = {n: os.path.join(folder, n) for n in run.SIDE_FILES if os.path.isfile(os.path.join(folder, n))}
  ft = {"init": init, "ks": res.ks, "from": folder, "data": d.describe,
        "final": {k: v for k, v in res.curves[-1].items() if k.startswith("eval_")}}
  ckpt.save_model(os.path.join(out, MODEL_DIR), res.model, {**meta, "finetune": ft}, files=side)
  last = res.curves[-1]
  return {"out": out, "model": os.path.join(out, MODEL_DIR), "init": init, "steps": last["step"],
          "resumed_from_step": res.resumed_from, "layers": len(core.factor_paths(res.model, kwargs.get("pattern"))),
          "srr_k": res.ks or None, "initial": {k: v for k, v in res.curves[0].items() if k.startswith("eval_")},
          **{k: v for k, v in last.items() if k != "step"}, "wall_s": round(time.perf_counter() - t0, 2)}
