"""Block-by-block quantization of a whole model: `quantize_model(model, calib, ...) -> (new model, records)`.

The model must expose the three-step calibration interface of `gilora_jax.models` (`embed`, `layers`, `head`;
each block returns `(x, taps)`) and a `QUANT_SITES` table in its module (`llama`: the Llama family, Qwen3
included; `deit`). For each block i:

  1. every calibration batch's block-i input goes through the *float* block once; its taps are folded into one
     float32 Hessian XᵀX per input site (q/k/v share one, gate/up share one); padding tokens are masked out;
  2. every chosen linear is quantized by `gilora_jax.quantize_layer` with its site's H and swapped for a
     `QuantizedLinear` (surgery by assignment on a copy of the model: the input model is left untouched);
  3. the inputs of block i + 1 are computed from those of block i through either
       protocol="quantized": the quantized block (GPTQ's protocol: later layers see earlier layers' errors), a
                             second forward pass per block, or
       protocol="fp":        the full-precision block (the paper's protocol, following Qronos: every block is
                             calibrated on the float model's activations), in step 1's pass: one forward per block.

Only one block's activations (for all calibration batches) are resident; Hessians accumulate batch by batch.
Embeddings, norms and the heads stay in full precision. Per-module `config.Rule`s (regex on the module path,
e.g. `layers.3.mlp.down_proj`; first match wins, qwix style) change any option of the `LayerConfig` or skip a
linear. Every option is checked against every linear's shape (`check_config`) before the first forward pass.

Resuming: `after_block(i, model, records)` is called after each finished block (the CLI checkpoints there), and
`resume=Resume(partial_model, records, blocks_done)` continues such a run. The activations feeding the next block
are recomputed from the stored blocks with the same jitted functions as in an uninterrupted run, so the
resumed result is bit-identical (XLA on one machine is deterministic for a given program and input).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gilora_jax import config as config_lib
from gilora_jax import sharding as sharding_lib
from gilora_jax.config import PROTOCOLS, LayerConfig, QuantConfig, Rule
from gilora_jax.layer import quantize_layer
from gilora_jax.models import quant_sites
from gilora_jax.nn import QuantizedLinear, clone, get_path, set_path
from gilora_jax.pipeline import calib as calib_lib
from gilora_jax.quant import hessian

log = logging.getLogger(__name__)

__all__ = ["LayerRecord", "PROTOCOLS", "QuantConfig", "QuantizeOutput", "Resume", "Rule", "check_config",
           "make_config", "quantize_model"]


def make_config(config: QuantConfig | None = None, **kwargs: Any) -> QuantConfig:
  """`config`, or one built from keyword options: `protocol`, `rules` and any flat layer option
  (`method=..., bits=..., rank=..., loops=...`, as `quantize_layer` takes them)."""
  if config is not None:
    if kwargs:
      raise TypeError("pass either config or keyword options, not both")
    return config
  protocol = kwargs.pop("protocol", "quantized")
  rules = tuple(kwargs.pop("rules", ()))
  return QuantConfig(layer=config_lib.from_flat(**kwargs), protocol=protocol, rules=rules)


def check_config(model: nnx.Module, config: QuantConfig) -> list[tuple[str, LayerConfig | None]]:
  """Validates `config` against every quantizable linear of `model` before any work: options, rules and each
  layer's shape (rank, group size). Works on an abstract model (`nnx.eval_shape`), so the CLI runs it before
  loading a single weight. Returns `(path, LayerConfig or None for skipped)` per linear, in quantization order;
  a rule that matches no linear is logged as a warning (a typo in a pattern would otherwise pass silently).

  Raises `config.OptionError` (a ValueError) naming the option, the layer and the fix.
  """
  config.validate()
  plan, matched = [], set()
  for i in range(len(model.layers)):
    for paths in quant_sites(model).values():
      for rel in paths:
        path = f"layers.{i}.{rel}"
        cfg = config.for_module(path)
        matched.update(r.pattern for r in config.rules if re.fullmatch(r.pattern, path))
        if cfg is not None:
          d_in, d_out = get_path(model.layers[i], rel).kernel.shape
          cfg.validate_shape(d_in, d_out, where=path)
        plan.append((path, cfg))
  for r in config.rules:
    if r.pattern not in matched:
      log.warning("rule %r matches no quantizable linear (paths look like %s); it has no effect.", r.pattern,
                  plan[0][0] if plan else "layers.0...")
  return plan


class LayerRecord(NamedTuple):
  """What happened to one linear. Errors are `tr(EᵀHE)/tr(WᵀHW)` with this block's calibration H: Q alone, after
  the method's own compensation, and final (after refinement). With `diagnostics="auto"` (the default) only the
  final one is computed, with "full" all three and gilora's bounds, with "off" none (`quantize_layer`)."""
  block: int
  site: str
  path: str
  d_in: int
  d_out: int
  method: str
  bits: int
  rank: int
  group_size: int | None
  loops: int
  rel_err_quantized: float | None
  rel_err_method: float | None
  rel_err: float | None
  upper_bound: float | None  # gilora only: Paper A's Cor. 3.9 bound (LayerReport.upper_bound)
  damp: float
  seconds: float
  config: dict  # the linear's whole LayerConfig (after rules), by flat name: what a records file needs to be read
  # SRR's preserved rank k of this linear (L's first k columns, R's first k rows); None for the other methods and
  # in records written before it was kept. `gilora finetune --init srr` scales that block's updates by γ.
  srr_k: int | None = None


class Resume(NamedTuple):
  """A partially quantized run to continue: blocks [0, blocks_done) of `model` are final."""
  model: nnx.Module
  records: list[LayerRecord]
  blocks_done: int


class QuantizeOutput(NamedTuple):
  model: nnx.Module
  records: list[LayerRecord]
  # Seconds per stage, each measured after its arrays are ready (so none is charged to the next): "read" (a
  # block's weights read from the `stream`, or its copy when there is none), "embed", and
  # summed over blocks "calibration" (the block's forward over every batch and its Hessians; under protocol="fp"
  # that pass also yields the next block's inputs), "quantize" (every linear, with its diagnostics),
  # "propagate" (protocol="quantized": the quantized block's forward), "after_block" (the caller's callback: the
  # CLI's checkpoint) and "resume" (rebuilding a resumed run's activations); "blocks": each block's own figures
  # (compilation shows as the first block's excess).
  stages: dict[str, Any] | None = None


# Jitted per-block steps. The graphdef is static: blocks of one structure compile once. Activations stored in
# bfloat16 (QuantConfig.activations) enter each block in float32 and leave it rounded again.
def _compute(x):
  return x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x


@functools.partial(jax.jit, static_argnums=(0, 3))
def _embed(graphdef, state, inputs, store=None):
  x = nnx.merge(graphdef, state).embed(inputs)
  return x if store is None else x.astype(store)


@functools.partial(jax.jit, static_argnums=0)
def _block_forward(graphdef, state, x):
  y, _ = nnx.merge(graphdef, state)(_compute(x))
  return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _block_stats(graphdef, state, x, mask, stats):
  _, taps = nnx.merge(graphdef, state)(_compute(x))
  return calib_lib.accumulate(stats, taps, mask)


@functools.partial(jax.jit, static_argnums=0)
def _block_stats_forward(graphdef, state, x, mask, stats):
  """The fp protocol's one pass: the float block's Hessians and its output (the next block's input) together."""
  y, taps = nnx.merge(graphdef, state)(_compute(x))
  return y.astype(x.dtype), calib_lib.accumulate(stats, taps, mask)


class _Activations:
  """One block's calibration activations, batch by batch: on the device, or with `offload` on the host (NumPy),
  each batch moved to the device for its step and back (`put` places it: on a mesh, over "data")."""

  def __init__(self, xs: list, offload: bool, put: Callable[[Any], Any]):
    self.offload, self.put = offload, put
    self.describe, self.fit = "", None  # sizes, and how many samples fit on the device (`_activations`)
    self.xs = [np.asarray(jax.device_get(x)) for x in xs] if offload else list(xs)

  def __len__(self) -> int:
    return len(self.xs)

  def get(self, k: int):
    return self.put(self.xs[k]) if self.offload else self.xs[k]

  def set(self, k: int, y) -> None:
    self.xs[k] = np.asarray(jax.device_get(y)) if self.offload else y

  def ready(self) -> _Activations:
    if not self.offload:
      jax.block_until_ready(self.xs)
    return self

  def nbytes(self) -> int:
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in self.xs)


def _activations(xs: list, offload: bool | None, put: Callable[[Any], Any], calib: Sequence[Any],
                 config: QuantConfig) -> _Activations:
  """The embedded batches as `_Activations`, offloaded when asked, or (None) when a block's inputs and outputs
  would take more than half the device's free memory; logged either way with the sizes."""
  acts = _Activations(xs, bool(offload), put)
  free, need = _device_free_bytes(), 2 * acts.nbytes()  # a block's inputs and its outputs
  if offload is None and free is not None and need > free // 2:
    log.info("calibration activations %.2f GiB (×2 for a block's outputs) exceed half the device's free %.2f GiB: "
             "kept on the host, one batch on the device at a time", need / 2 / 2**30, free / 2**30)
    acts = _Activations(acts.xs, True, put)
  n = sum(np.shape(b.inputs)[0] for b in calib)
  acts.describe = (f"{n} samples × {'×'.join(map(str, np.shape(xs[0])[1:]))} in {config.activations}: "
                   f"{need / 2 / 2**30:.2f} GiB a block's inputs")
  acts.fit = None if free is None else max(0, int(n * (free // 2) / max(need, 1)))
  return acts


@contextlib.contextmanager
def _device_memory(xs: _Activations, i: int):
  """A device out-of-memory error in block i's work becomes one line: how big the activations are, how many
  samples fit, what to pass."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (XLA's error type varies across versions)
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    where = "on the host" if xs.offload else "on the device"
    fit = "" if xs.fit is None else f"; about {xs.fit} samples fit on the device"
    raise MemoryError(f"block {i} ran out of device memory with the calibration activations {where} "
                      f"({xs.describe}){fit}: pass fewer --nsamples or a smaller --batch-size, --activations "
                      f"bfloat16, or --offload-activations (they then stay on the host).") from None


def _device_free_bytes() -> int | None:
  """Free memory of the first local device, where the backend reports it (GPUs, TPUs; not the CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  if "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _abstract(module: nnx.Module) -> bool:
  """True when some weight of `module` is only a shape (an `nnx.eval_shape` model)."""
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(module)))


def _calibrate(block: nnx.Module, xs: _Activations, masks: Sequence[Any], d_in: dict[str, int],
               forward: bool) -> dict[str, hessian.HessianStats]:
  """The block's Hessians over every batch; with `forward`, each batch's activations replaced by the block's
  output in the same pass (in place: at most one block's worth plus one batch is alive)."""
  stats = calib_lib.init_stats(d_in)
  graphdef, state = nnx.split(block)
  for k, mask in enumerate(masks):
    if forward:
      y, stats = _block_stats_forward(graphdef, state, xs.get(k), mask, stats)
      xs.set(k, y)
    else:
      stats = _block_stats(graphdef, state, xs.get(k), mask, stats)
  return jax.block_until_ready(stats)


def _forward(block: nnx.Module, xs: _Activations) -> _Activations:
  """Replaces each batch's activations by the block's output, in place, so at most one block's worth (plus one
  batch) is alive at any time."""
  graphdef, state = nnx.split(block)
  for k in range(len(xs)):
    xs.set(k, _block_forward(graphdef, state, xs.get(k)))
  return xs.ready()


def _quantize_linear(linear: nnx.Linear, site: hessian.Site, cfg: LayerConfig, mesh=None):
  if mesh is None:
    W = np.asarray(linear.kernel[...], np.float32)
  else:  # the layer math runs on the column shards (`gilora_jax.sharding`)
    W = sharding_lib.place(linear.kernel[...], sharding_lib.columns(mesh, linear.kernel.shape))
  # "auto" here includes the final error: its one d_in² d_out product is a few per cent of the block's Hessians
  res = quantize_layer(W, site, config=cfg.replace(diagnostics="errors") if cfg.diagnostics == "auto" else cfg)
  bias = None if linear.bias is None else linear.bias[...]
  dtype = str(np.dtype(linear.dtype or "float32"))
  return QuantizedLinear.from_result(res, grid=cfg.grid, bias=bias, dtype=dtype), res.report


def _log_record(r: LayerRecord) -> None:
  if r.rel_err is None:
    errors = ""
  elif r.rel_err_quantized is None:  # diagnostics "auto"/"errors": the final error only
    errors = f"  rel_err {r.rel_err:.4g}"
  else:
    errors = (f"  rel_err {r.rel_err_quantized:.4g} (quantized) → {r.rel_err_method:.4g} ({r.method}) → "
              f"{r.rel_err:.4g} (final, {r.loops} loops)" + ("" if r.upper_bound is None else
                                                             f"  Cor. 3.9 bound {r.upper_bound:.4g}"))
  log.info("block %d %s %d×%d %s %db r%d%s  %.2fs", r.block, r.path.split(".", 2)[-1], r.d_in, r.d_out, r.method,
           r.bits, r.rank, errors, r.seconds)


def quantize_model(model: nnx.Module, calib: Sequence[calib_lib.CalibBatch], config: QuantConfig | None = None, *,
                   resume: Resume | None = None,
                   after_block: Callable[[int, nnx.Module, list[LayerRecord]], None] | None = None,
                   progress: Callable[[Iterable[int]], Iterable[int]] | None = None, check: bool = True,
                   stream: Any = None, mesh: jax.sharding.Mesh | None = None, offload: bool | None = None,
                   outside: Callable[[], nnx.Module | None] | None = None, **kwargs: Any) -> QuantizeOutput:
  """Quantizes every chosen linear of `model`, block by block; returns a new model and the per-layer records.

  Args:
    model: a float model from `gilora_jax.models` (left unchanged).
    calib: calibration batches (`calib.CalibBatch`: inputs for `model.embed`, optional right-padded token mask).
    config: a `QuantConfig`; or keyword options (`make_config`: `method=..., bits=..., rank=..., protocol=...`).
    resume: continue a run from its last finished block (see the module docstring).
    after_block: called as `after_block(i, model, records)` after block i is quantized.
    progress: wraps the block iterator (e.g. `tqdm.tqdm`); the library itself prints nothing.
    check: validate `config` against every linear first (`check_config`); False when the caller just did.
    stream: streaming: an object whose `load(path)` reads the weights of the sub-module at `path`
      (`convert.LazyHF(folder)`); `model`'s blocks may then be abstract (`stream.load(skip="layers")`: only the
      embeddings, norms and head hold weights). Each block is read when its turn comes, so one block's float
      weights are resident at a time; the result is the same as from the loaded model. `model` may also be
      wholly abstract (`stream.abstract`): the weights outside the blocks are then read for the embedding pass
      and dropped after it, and the returned model holds only their shapes (`gilora quantize` wrote them to
      disk first). `outside`: called once instead of that read, it may hand over a model whose weights outside
      the blocks are already in memory (the caller then keeps no reference, so they are freed after the pass).
    mesh: run on the devices of a `jax.sharding.Mesh` with axes ("data", "model") (`sharding.make_mesh`):
      activations data-parallel, weights split over "model", each layer's math split over its output columns
      (`gilora_jax.sharding` says where everything lives). Every batch's rows must divide over "data". The
      result equals the single-device one up to the order of the cross-device sums (the Hessians' all-reduce).
    offload: keep the calibration activations on the host and move one batch at a time to the device (the same
      numbers, slower); None: only when they would take more than half the device's free memory (where the
      device reports it: GPUs, TPUs). Their dtype is `config.activations`.

  Returns:
    `QuantizeOutput(model, records, stages)`: the quantized model (a copy), one `LayerRecord` per quantized
    linear, and the seconds of each stage (`QuantizeOutput.stages`).
  """
  config = make_config(config, **kwargs)
  if check:
    check_config(model, config)
  calib_lib.check_batches(calib)
  if mesh is not None:
    sharding_lib.check_batches(mesh, calib)
  sites = quant_sites(model)
  num_blocks = len(model.layers)

  start = 0 if resume is None else resume.blocks_done
  new = clone(model if resume is None else resume.model)
  records = [] if resume is None else list(resume.records)
  fp = config.protocol == "fp"
  stages: dict[str, Any] = {k: 0.0 for k in ("read", "embed", "resume", "calibration", "quantize", "propagate",
                                             "after_block")}
  stages["blocks"] = []
  clock = time.perf_counter()

  def lap(name: str, block_stages: dict | None = None) -> None:
    nonlocal clock
    now = time.perf_counter()
    stages[name] += now - clock
    if block_stages is not None:
      block_stages[name] = round(now - clock, 3)
    clock = now

  float_block = (lambda i: model.layers[i]) if stream is None else (  # noqa: E731
      lambda i: stream.load(f"layers.{i}", **({} if mesh is None else {"sharding": functools.partial(
          sharding_lib.param, mesh)})))  # on a mesh each process reads only the slices its devices hold
  if mesh is None:
    on_mesh = put_batch = lambda a: a  # noqa: E731
  else:
    on_mesh = lambda m: sharding_lib.place_module(m, mesh)  # noqa: E731
    put_batch = lambda a: sharding_lib.place(a, sharding_lib.batch(mesh, np.shape(a)))  # noqa: E731
  masks = [None if b.mask is None else put_batch(np.asarray(b.mask, bool)) for b in calib]
  shell = clone(model)
  shell.layers = nnx.List([])  # the model without its blocks: what embedding needs (the blocks may be abstract)
  if stream is not None and _abstract(shell):  # read (or handed over) for the embedding pass only, dropped after
    handed = None if outside is None else outside()
    shell = stream.load(skip="layers") if handed is None else handed
    del handed
    shell.layers = nnx.List([])
  lap("read")
  graphdef, state = nnx.split(on_mesh(shell))
  store = None if config.activations == "float32" else jnp.dtype(config.activations)
  xs = []
  for b in calib:  # embedded batch by batch; with offload each goes to the host before the next is made
    xs.append(jax.block_until_ready(_embed(graphdef, state, put_batch(np.asarray(b.inputs)), store)))
    if offload:
      xs[-1] = np.asarray(jax.device_get(xs[-1]))
  del shell, graphdef, state
  xs = _activations(xs, offload, put_batch, calib, config)
  lap("embed")
  d_in_of = lambda block: {site: get_path(block, paths[0]).kernel.shape[0]  # noqa: E731
                           for site, paths in sites.items()}
  for i in range(start):  # resume: rebuild block `start`'s inputs exactly as the uninterrupted run did
    if fp:  # the same program as the uninterrupted run's pass (its Hessians are dropped)
      fb = on_mesh(clone(float_block(i)))
      _calibrate(fb, xs, masks, d_in_of(fb), forward=True)
    else:
      xs = _forward(on_mesh(clone(new.layers[i])), xs)
  lap("resume")

  blocks = range(start, num_blocks)
  for i in (progress(blocks) if progress else blocks):
    timing: dict[str, Any] = {"block": i}
    block = on_mesh(clone(float_block(i)))  # still all-float: surgery happens after the Hessians are collected
    lap("read", timing)
    with _device_memory(xs, i):
      stats = _calibrate(block, xs, masks, d_in_of(block), forward=fp)  # fp: xs now hold block i + 1's inputs
    lap("calibration", timing)
    for site, paths in sites.items():
      chosen = [(rel, config.for_module(f"layers.{i}.{rel}")) for rel in paths]
      chosen = [(rel, cfg) for rel, cfg in chosen if cfg is not None]
      if not chosen:
        continue
      if int(stats[site].count) == 0:
        raise ValueError(f"block {i}, {site} ({', '.join(paths)}): no calibration tokens reached this layer (every "
                         f"token masked out, or empty windows); check the calibration seqlen/nsamples and masks.")
      # the site's projections share H: checked, factored and decomposed once for all of them
      xtx = stats[site].xtx if mesh is None else sharding_lib.place(stats[site].xtx, sharding_lib.replicated(mesh))
      prepared = hessian.prepare(xtx, chosen[0][1].damp, method=chosen[0][1].gptq.factor)
      for rel, cfg in chosen:
        qlin, rep = _quantize_linear(get_path(block, rel), prepared, cfg, mesh)
        set_path(block, rel, qlin)
        rec = LayerRecord(
            block=i, site=site, path=f"layers.{i}.{rel}", d_in=qlin.in_features, d_out=qlin.out_features,
            method=cfg.method, bits=cfg.grid.bits, rank=qlin.rank, group_size=cfg.grid.group_size,
            loops=cfg.refine.loops, rel_err_quantized=rep.rel_err_quantized, rel_err_method=rep.rel_err_method,
            rel_err=rep.rel_err, upper_bound=rep.upper_bound, damp=rep.damp,
            seconds=rep.seconds, config=cfg.flat(), srr_k=rep.srr_k)
        records.append(rec)
        _log_record(rec)
      del prepared
    del stats
    new.layers[i] = block
    lap("quantize", timing)
    if not fp and i + 1 < num_blocks:  # the last block's outputs feed nothing
      with _device_memory(xs, i):
        xs = _forward(on_mesh(clone(block)) if mesh is not None else block, xs)
    lap("propagate", timing)
    if after_block is not None:
      after_block(i, new, records)
    lap("after_block", timing)
    stages["blocks"].append(timing)
  return QuantizeOutput(new, records, {k: round(v, 3) if isinstance(v, float) else v for k, v in stages.items()})

