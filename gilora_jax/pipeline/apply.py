"""Block-by-block quantization of a whole model: `quantize_model(model, calib, ...) -> (new model, records)`.

The model must expose the three-step calibration interface of `gilora_jax.models` (`embed`, `layers`, `head`;
each block returns `(x, taps)`) and a `QUANT_SITES` table in its module (`qwen3`, `deit`). For each block i:

  1. every calibration batch's block-i input goes through the *float* block once; its taps are folded into one
     float32 Hessian XᵀX per input site (q/k/v share one, gate/up share one); padding tokens are masked out;
  2. every chosen linear is quantized by `gilora_jax.quantize_layer` with its site's H and swapped for a
     `QuantizedLinear` (surgery by assignment on a copy of the model: the input model is left untouched);
  3. the inputs of block i + 1 are computed from those of block i through either
       protocol="quantized": the quantized block (GPTQ's protocol: later layers see earlier layers' errors), or
       protocol="fp":        the full-precision block (the paper's protocol, following Qronos: every block is
                             calibrated on the float model's activations).

Only one block's activations (for all calibration batches) are resident; Hessians accumulate batch by batch.
Embeddings, norms and the heads stay in full precision. Per-module `Rule`s (regex on the module path, e.g.
`layers.3.mlp.down_proj`; first match wins, qwix style) override bits/rank/method/group size/loops or skip a
linear.

Resuming: `after_block(i, model, records)` is called after each finished block (the CLI checkpoints there), and
`resume=Resume(partial_model, records, blocks_done)` continues such a run. The activations feeding the next block
are recomputed from the stored blocks with the same jitted functions as in an uninterrupted run, so the
resumed result is bit-identical (XLA on one machine is deterministic for a given program and input).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx

from gilora_jax.pipeline import calib as calib_lib
from gilora_jax.layer import METHODS, HessianCache, LayerConfig, quantize_layer
from gilora_jax.models import quant_sites
from gilora_jax.nn import QuantizedLinear, clone, get_path, set_path

log = logging.getLogger(__name__)

PROTOCOLS = ("quantized", "fp")


@dataclasses.dataclass(frozen=True)
class Rule:
  """Per-module override: modules whose path fully matches `pattern` get these settings (None = keep default).

  Paths are dotted from the model root, e.g. `layers.0.self_attn.q_proj` (Qwen3) or
  `layers.3.intermediate.dense` (DeiT). `skip=True` leaves the module in full precision.
  """
  pattern: str
  method: str | None = None
  bits: int | None = None
  rank: int | None = None
  group_size: int | None = None
  loops: int | None = None
  skip: bool = False


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Every option of a model quantization run (the one config object; stored in the checkpoint's meta)."""
  method: str = "gilora"
  bits: int = 3
  rank: int = 16
  group_size: int | None = None
  symmetric: bool = False
  loops: int = 0
  damp: float = 0.01
  act_order: bool = False
  seed: int = 0
  protocol: str = "quantized"
  rules: tuple[Rule, ...] = ()
  options: tuple[tuple[str, Any], ...] = ()  # further quantize_layer options (shrink, mse, diagnostics, ...)

  def validate(self) -> None:
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} is unknown; choose one of {METHODS}.")
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"protocol={self.protocol!r} is unknown; choose one of {PROTOCOLS}.")
    known = {f.name for f in dataclasses.fields(LayerConfig)}
    bad = {k for k, _ in self.options} - known
    if bad:
      raise ValueError(f"unknown quantize_layer option(s) {sorted(bad)}; valid: {sorted(known)}.")
    for r in self.rules:
      re.compile(r.pattern)
      if r.method is not None and r.method not in METHODS:
        raise ValueError(f"rule {r.pattern!r}: method={r.method!r} is unknown; choose one of {METHODS}.")

  def for_module(self, path: str) -> dict[str, Any] | None:
    """quantize_layer keyword arguments for the module at `path`, or None when a rule skips it."""
    kw = dict(method=self.method, bits=self.bits, rank=self.rank, group_size=self.group_size,
              symmetric=self.symmetric, loops=self.loops, damp=self.damp, act_order=self.act_order, seed=self.seed,
              **dict(self.options))
    for rule in self.rules:
      if re.fullmatch(rule.pattern, path):
        if rule.skip:
          return None
        kw.update({k: v for k in ("method", "bits", "rank", "group_size", "loops")
                   if (v := getattr(rule, k)) is not None})
        break
    return kw

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["options"] = dict(self.options)
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> QuantConfig:
    d = dict(d)
    d["rules"] = tuple(Rule(**r) for r in d.get("rules", ()))
    d["options"] = tuple(sorted(d.get("options", {}).items()))
    return cls(**d)


class LayerRecord(NamedTuple):
  """What happened to one linear. Errors are `tr(EᵀHE)/tr(WᵀHW)` with this block's calibration H (None when
  `diagnostics=False`): Q alone, after the method's own compensation, and final (after refinement)."""
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
  upper_bound: float | None
  lower_estimate: float | None
  damp: float
  seconds: float


class Resume(NamedTuple):
  """A partially quantized run to continue: blocks [0, blocks_done) of `model` are final."""
  model: nnx.Module
  records: list[LayerRecord]
  blocks_done: int


class QuantizeOutput(NamedTuple):
  model: nnx.Module
  records: list[LayerRecord]


# Jitted per-block steps. The graphdef is static: blocks of one structure compile once.
@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, inputs):
  return nnx.merge(graphdef, state).embed(inputs)


@functools.partial(jax.jit, static_argnums=0)
def _block_forward(graphdef, state, x):
  y, _ = nnx.merge(graphdef, state)(x)
  return y


@functools.partial(jax.jit, static_argnums=0)
def _block_stats(graphdef, state, x, mask, stats):
  _, taps = nnx.merge(graphdef, state)(x)
  return calib_lib.accumulate(stats, taps, mask)


def _forward(block: nnx.Module, xs: list[jax.Array]) -> list[jax.Array]:
  """Replaces each batch's activations by the block's output, in place, so at most one block's worth (plus one
  batch) is alive at any time."""
  graphdef, state = nnx.split(block)
  for k, x in enumerate(xs):
    xs[k] = _block_forward(graphdef, state, x)
  return xs


def _quantize_linear(linear: nnx.Linear, H: jax.Array, kw: dict[str, Any],
                     cache: HessianCache) -> tuple[QuantizedLinear, dict]:
  W = np.asarray(linear.kernel[...], np.float32)
  res = quantize_layer(W, H, hessian_cache=cache, **kw)
  spec = LayerConfig(**{k: v for k, v in kw.items() if k not in ("damp", "seed")}).spec
  bias = None if linear.bias is None else linear.bias[...]
  return QuantizedLinear.from_result(res, grid=spec, bias=bias, dtype=str(np.dtype(linear.dtype or "float32"))), \
      res.info


def _log_record(r: LayerRecord) -> None:
  if r.rel_err is None:
    log.info("block %d %s %d×%d %s %db r%d  %.2fs", r.block, r.path.split(".", 2)[-1], r.d_in, r.d_out, r.method,
             r.bits, r.rank, r.seconds)
    return
  log.info("block %d %s %d×%d  rel_err %.4g (quantized) → %.4g (%s) → %.4g (final, r=%d, %d loops)  bound %.4g  "
           "%.2fs", r.block, r.path.split(".", 2)[-1], r.d_in, r.d_out, r.rel_err_quantized, r.rel_err_method,
           r.method, r.rel_err, r.rank, r.loops, r.upper_bound, r.seconds)


def quantize_model(model: nnx.Module, calib: Sequence[calib_lib.CalibBatch], config: QuantConfig | None = None, *,
                   resume: Resume | None = None,
                   after_block: Callable[[int, nnx.Module, list[LayerRecord]], None] | None = None,
                   progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
                   **kwargs: Any) -> QuantizeOutput:
  """Quantizes every chosen linear of `model`, block by block; returns a new model and the per-layer records.

  Args:
    model: a float model from `gilora_jax.models` (left unchanged).
    calib: calibration batches (`calib.CalibBatch`: inputs for `model.embed`, optional right-padded token mask).
    config: a `QuantConfig`; or pass its fields as keyword arguments (`method=..., bits=..., rank=...`).
    resume: continue a run from its last finished block (see the module docstring).
    after_block: called as `after_block(i, model, records)` after block i is quantized.
    progress: wraps the block iterator (e.g. `tqdm.tqdm`); the library itself prints nothing.

  Returns:
    `QuantizeOutput(model, records)`: the quantized model (a copy) and one `LayerRecord` per quantized linear.
  """
  if config is None:
    config = QuantConfig(**kwargs)
  elif kwargs:
    raise TypeError("pass either config or keyword options, not both")
  config.validate()
  if not calib:
    raise ValueError("quantize_model needs at least one calibration batch.")
  calib_lib.check_right_padded(calib)
  sites = quant_sites(model)
  num_blocks = len(model.layers)

  start = 0 if resume is None else resume.blocks_done
  new = clone(model if resume is None else resume.model)
  records = [] if resume is None else list(resume.records)

  graphdef, state = nnx.split(model)
  xs = [_embed(graphdef, state, np.asarray(b.inputs)) for b in calib]
  source = new if config.protocol == "quantized" else model
  for i in range(start):  # resume: rebuild block `start`'s inputs exactly as the uninterrupted run did
    xs = _forward(source.layers[i], xs)

  blocks = range(start, num_blocks)
  for i in (progress(blocks) if progress else blocks):
    block = new.layers[i]  # still all-float: surgery happens after the Hessians are collected
    d_in = {site: get_path(block, paths[0]).kernel.shape[0] for site, paths in sites.items()}
    stats = calib_lib.init_stats(d_in)
    graphdef, state = nnx.split(block)
    for x, b in zip(xs, calib):
      mask = None if b.mask is None else np.asarray(b.mask, bool)
      stats = _block_stats(graphdef, state, x, mask, stats)
    float_block = clone(block) if config.protocol == "fp" else None  # the fp protocol propagates through it
    for site, paths in sites.items():
      H = stats[site].xtx
      cache = HessianCache()  # the site's projections share H: check, factorise, decompose it once
      for rel in paths:
        path = f"layers.{i}.{rel}"
        kw = config.for_module(path)
        if kw is None:
          continue
        linear = get_path(block, rel)
        qlin, info = _quantize_linear(linear, H, kw, cache)
        set_path(block, rel, qlin)
        rec = LayerRecord(
            block=i, site=site, path=path, d_in=qlin.in_features, d_out=qlin.out_features, method=kw["method"],
            bits=kw["bits"], rank=qlin.rank, group_size=kw["group_size"], loops=kw["loops"],
            rel_err_quantized=info.get("rel_err_quantized"), rel_err_method=info.get("rel_err_method"),
            rel_err=info.get("rel_err"), upper_bound=info.get("upper_bound"),
            lower_estimate=info.get("lower_estimate"), damp=info["damp"], seconds=info["seconds"])
        records.append(rec)
        _log_record(rec)
    del stats
    xs = _forward(block if config.protocol == "quantized" else float_block, xs)
    if after_block is not None:
      after_block(i, new, records)
  return QuantizeOutput(new, records)
