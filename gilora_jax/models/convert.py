"""Local HF checkpoint folders <-> NNX models (the Llama family, DeiT/ViT), with safetensors, never over the network.

Key mapping is one table per architecture of `Rule(hf, nnx, transform)` rows, as in bonsai's `params.py`. Both
sides are templates: `{name:regex}` placeholders in the HF key are captured and substituted into the NNX path
(`{name}`), so the same table converts in both directions. The transform tag says how the tensor's layout
changes (torch Linear `(out, in)` <-> flax `(in, out)`; torch Conv2d `(O, I, kh, kw)` <-> flax `(kh, kw, I, O)`).

Loading builds the model abstractly (`nnx.eval_shape`, no random weights), streams each safetensors file once,
fills the pure-dict state and merges. Every mismatch (HF keys with no target, targets that no key filled, wrong
shapes) is collected and raised together in one `CheckpointMismatchError`.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy so safetensors can return bf16 arrays)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gilora_jax import runtime
from gilora_jax.models import ARCHITECTURES, ModelSpec, deit, hf_config, llama

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class Transform(enum.Enum):
  """How a tensor's layout differs between the HF checkpoint and the NNX variable."""
  NONE = "none"
  LINEAR = "linear"  # torch (out, in) <-> flax kernel (in, out)
  CONV = "conv"  # torch (O, I, kh, kw) <-> flax kernel (kh, kw, I, O)


def _to_nnx(x: np.ndarray, t: Transform) -> np.ndarray:
  if t is Transform.NONE or x.ndim != {Transform.LINEAR: 2, Transform.CONV: 4}[t]:
    return x  # a tensor of the wrong rank is left as is and then reported as a shape mismatch
  return x.T if t is Transform.LINEAR else np.transpose(x, (2, 3, 1, 0))


def _to_hf(x: np.ndarray, t: Transform) -> np.ndarray:
  if t is Transform.NONE:
    return x
  return x.T if t is Transform.LINEAR else np.transpose(x, (3, 2, 0, 1))


_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One row of a key table: HF key template, NNX path template, layout transform."""
  hf: str
  nnx: str
  transform: Transform = Transform.NONE

  def _patterns(self) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in _PLACEHOLDER.finditer(self.hf)}

  @staticmethod
  def _compile(template: str, patterns: dict[str, str]) -> re.Pattern:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
      parts += [re.escape(template[pos:m.start()]), f"(?P<{m.group(1)}>{patterns[m.group(1)]})"]
      pos = m.end()
    return re.compile("".join(parts + [re.escape(template[pos:])]))

  def hf_to_nnx(self, key: str) -> str | None:
    m = self._compile(self.hf, self._patterns()).fullmatch(key)
    return None if m is None else _PLACEHOLDER.sub(lambda p: m.group(p.group(1)), self.nnx)

  def nnx_to_hf(self, path: str) -> str | None:
    m = self._compile(self.nnx, self._patterns()).fullmatch(path)
    return None if m is None else _PLACEHOLDER.sub(lambda p: m.group(p.group(1)), self.hf)


# Llama, Qwen2, Mistral and Qwen3 share one layout; each config only switches the biases and q/k norms on or off.
LLAMA_RULES = (
    Rule("model.embed_tokens.weight", "embed_tokens.embedding"),
    Rule(r"model.layers.{i:\d+}.{norm:input_layernorm|post_attention_layernorm}.weight", "layers.{i}.{norm}.scale"),
    Rule(r"model.layers.{i:\d+}.self_attn.{proj:[qkvo]_proj}.weight", "layers.{i}.self_attn.{proj}.kernel",
         Transform.LINEAR),
    Rule(r"model.layers.{i:\d+}.self_attn.{proj:[qkvo]_proj}.bias", "layers.{i}.self_attn.{proj}.bias"),
    Rule(r"model.layers.{i:\d+}.self_attn.{norm:[qk]_norm}.weight", "layers.{i}.self_attn.{norm}.scale"),
    Rule(r"model.layers.{i:\d+}.mlp.{proj:gate_proj|up_proj|down_proj}.weight", "layers.{i}.mlp.{proj}.kernel",
         Transform.LINEAR),
    Rule(r"model.layers.{i:\d+}.mlp.{proj:gate_proj|up_proj|down_proj}.bias", "layers.{i}.mlp.{proj}.bias"),
    Rule("model.norm.weight", "norm.scale"),
    Rule("lm_head.weight", "lm_head.kernel", Transform.LINEAR),
)
QWEN3_RULES = LLAMA_RULES  # the name before the generalisation


def _vit_rules(prefix: str) -> tuple[Rule, ...]:
  """DeiT (`deit.`) and ViT (`vit.`) checkpoints share everything but the prefix and the heads."""
  layer = prefix + r".encoder.layer.{i:\d+}."
  linears = r"attention\.attention\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense"
  return (
      Rule(prefix + ".embeddings.{tok:cls_token|distillation_token|position_embeddings}", "embeddings.{tok}"),
      Rule(prefix + ".embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.kernel",
           Transform.CONV),
      Rule(prefix + ".embeddings.patch_embeddings.projection.bias", "embeddings.patch_embeddings.projection.bias"),
      Rule(layer + "{lin:" + linears + "}.weight", "layers.{i}.{lin}.kernel", Transform.LINEAR),
      Rule(layer + "{lin:" + linears + "}.bias", "layers.{i}.{lin}.bias"),
      Rule(layer + "{ln:layernorm_before|layernorm_after}.weight", "layers.{i}.{ln}.scale"),
      Rule(layer + "{ln:layernorm_before|layernorm_after}.bias", "layers.{i}.{ln}.bias"),
      Rule(prefix + ".layernorm.weight", "layernorm.scale"),
      Rule(prefix + ".layernorm.bias", "layernorm.bias"),
      Rule("{head:classifier|cls_classifier|distillation_classifier}.weight", "{head}.kernel", Transform.LINEAR),
      Rule("{head:classifier|cls_classifier|distillation_classifier}.bias", "{head}.bias"),
  )


@dataclasses.dataclass(frozen=True)
class KeyTable:
  """How one HF architecture's tensor names map to the NNX state."""
  rules: tuple[Rule, ...]
  ignored: Callable[[Any], tuple[str, ...]] = lambda cfg: ()  # HF key regexes to skip, given the model config


# One key table per registered architecture (`gilora_jax.models.ARCHITECTURES`).
KEY_TABLES = {
    **{name: KeyTable(
        LLAMA_RULES,
        # Old exports carry RoPE buffers; tied checkpoints may still store a copy of the embedding as lm_head.
        lambda cfg: (r".*\.rotary_emb\.inv_freq",) + ((r"lm_head\.weight",) if cfg.tie_word_embeddings else ()))
       for name in llama.ARCHITECTURES},
    "DeiTForImageClassificationWithTeacher": KeyTable(_vit_rules("deit")),
    "DeiTForImageClassification": KeyTable(_vit_rules("deit")),
    "ViTForImageClassification": KeyTable(_vit_rules("vit")),
}
assert set(KEY_TABLES) == set(ARCHITECTURES), "every registered architecture needs a key table"


class CheckpointMismatchError(ValueError):
  """The checkpoint's tensors do not fit the model its config.json describes; lists every problem at once."""


def local_folder(path: str | os.PathLike) -> str:
  """Returns `path` as an absolute folder path, or raises a clear error. Never downloads anything."""
  p = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.isdir(p):
    return p
  if os.path.exists(p):
    raise NotADirectoryError(f"{path!r} is a file; pass the local model folder that contains it "
                             f"(config.json plus {SAFETENSORS} or {SAFETENSORS_INDEX}).")
  raise FileNotFoundError(
      f"{path!r} is not an existing local folder. gilora_jax never downloads models from the Hugging Face Hub; "
      f"fetch the checkpoint yourself (e.g. `hf download <repo_id> --local-dir DIR`) and pass that local folder.")


def architecture_of(config: dict[str, Any], where: str) -> str:
  """The first supported entry of config.json "architectures", or a ValueError listing the supported ones."""
  found = [a for a in config.get("architectures") or () if a in ARCHITECTURES]
  if not found:
    raise ValueError(f"{where}: architectures {config.get('architectures')} (model_type {config.get('model_type')!r}) "
                     f"is not supported; supported: {sorted(ARCHITECTURES)}. Pass the folder of one of these.")
  return found[0]


def _safetensors_files(folder: str) -> list[str]:
  """Every safetensors file of the checkpoint: the single file, or all shards named by the index."""
  index = os.path.join(folder, SAFETENSORS_INDEX)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{index} is not a valid safetensors index (need a 'weight_map'): {e!r}; restore it from the "
                       f"original checkpoint.") from e
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
      raise FileNotFoundError(f"{index} lists {len(missing)} shard(s) missing from {folder}: {missing}. Copy every "
                              f"shard into the folder (an interrupted download leaves some out).")
    return [os.path.join(folder, s) for s in shards]
  single = os.path.join(folder, SAFETENSORS)
  if os.path.isfile(single):
    return [single]
  raise FileNotFoundError(f"{folder} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX}. Only safetensors "
                          f"checkpoints are read; re-save a PyTorch .bin checkpoint with `save_pretrained` first.")


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree[k]
  tree[path[-1]] = value


def _dotted(path: tuple) -> str:
  return ".".join(map(str, path))


def abstract_hf(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None) -> nnx.Module:
  """The model a HF folder holds, built abstractly from its config.json (`nnx.eval_shape`: shapes, no weights
  read), after checking that its safetensors files are there: what lets a long job validate its options against
  every layer's shape in a second, before loading anything."""
  folder = local_folder(path)
  config, where = hf_config.read_config(folder)
  name = architecture_of(config, where)
  cfg = ARCHITECTURES[name].config_cls.from_hf_config(config, dtype=dtype, param_dtype=param_dtype)
  _safetensors_files(folder)
  return nnx.eval_shape(lambda: ARCHITECTURES[name].model_cls(cfg, rngs=nnx.Rngs(0)))


def load_hf(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None) -> nnx.Module:
  """Loads a local HF checkpoint folder (config.json + safetensors, single file or sharded) into an NNX model.

  The architecture comes from config.json "architectures" (see `ARCHITECTURES`). Weights are cast to
  `param_dtype` (default: `dtype`, default float32) whatever the checkpoint stores.
  Raises `CheckpointMismatchError` listing every unmapped, missing and wrong-shaped tensor at once.
  """
  folder = local_folder(path)
  config, where = hf_config.read_config(folder)
  name = architecture_of(config, where)
  cfg = ARCHITECTURES[name].config_cls.from_hf_config(config, dtype=dtype, param_dtype=param_dtype)
  return LazyHF.from_files(ARCHITECTURES[name], KEY_TABLES[name], cfg, _safetensors_files(folder)).load()


_SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def stored_dtype(files: list[str]) -> str:
  """The floating dtype that holds most of a checkpoint's parameters (from the first file's header)."""
  counts: dict[str, int] = {}
  with safe_open(files[0], framework="numpy") as f:
    for key in f.keys():
      sl = f.get_slice(key)
      name = _SAFETENSORS_FLOATS.get(sl.get_dtype())
      if name is not None:
        counts[name] = counts.get(name, 0) + int(np.prod(sl.get_shape()))
  return max(counts, key=counts.get) if counts else "float32"


class LazyHF:
  """A HF checkpoint read lazily: the abstract model from config.json, every tensor located (file, key, layout)
  and shape-checked from the safetensors headers up front, and any sub-module's weights read on demand
  (`load("layers.3")`), so a block-by-block job holds one block of float weights, not the model.

  Every mismatch (HF keys with no target, targets no key fills, wrong shapes) is raised together, before any
  weight is read, in one `CheckpointMismatchError`.
  """

  def __init__(self, path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None):
    """`param_dtype="stored"` keeps the weights in the checkpoint's floating dtype (bf16 stays bf16 on the host:
    half the memory; `dtype` is still what the forward computes in, and bf16 → float32 is exact)."""
    folder = local_folder(path)
    config, where = hf_config.read_config(folder)
    name = architecture_of(config, where)
    files = _safetensors_files(folder)
    if param_dtype == "stored":
      param_dtype = stored_dtype(files)
    cfg = ARCHITECTURES[name].config_cls.from_hf_config(config, dtype=dtype, param_dtype=param_dtype)
    self._setup(ARCHITECTURES[name], KEY_TABLES[name], cfg, files)

  @classmethod
  def from_files(cls, arch: ModelSpec, table: KeyTable, cfg, files: list[str]) -> LazyHF:
    self = cls.__new__(cls)
    self._setup(arch, table, cfg, files)
    return self

  def _setup(self, arch: ModelSpec, table: KeyTable, cfg, files: list[str]) -> None:
    self.config = cfg
    self.abstract = nnx.eval_shape(lambda: arch.model_cls(cfg, rngs=nnx.Rngs(0)))
    leaves = {_dotted(p): leaf for p, leaf in _flatten(nnx.to_pure_dict(nnx.state(self.abstract))).items()}
    ignored = [re.compile(r) for r in table.ignored(cfg)]
    self._where: dict[str, tuple[str, str, Transform]] = {}
    unexpected, wrong_shape = [], []
    for file in files:
      try:
        with safe_open(file, framework="numpy") as f:
          shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
      except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}). It is corrupt or truncated (an "
                         f"interrupted copy or download?); replace it with an intact copy.") from e
      for key, shape in shapes.items():
        if any(r.fullmatch(key) for r in ignored):
          continue
        target, rule = next(((t, r) for r in table.rules if (t := r.hf_to_nnx(key)) is not None), (None, None))
        if target is None or target not in leaves:
          unexpected.append(f"{key} ({os.path.basename(file)})")
          continue
        got = _to_nnx(np.empty(shape, np.bool_), rule.transform).shape  # the layout change, on no data
        if got != leaves[target].shape:
          wrong_shape.append(f"{key} {list(got)} (after {rule.transform.value} transform) vs {target} "
                             f"{list(leaves[target].shape)}")
          continue
        self._where[target] = (file, key, rule.transform)
    missing = sorted(set(leaves) - set(self._where))  # a wrong-shaped target is missing too
    if unexpected or missing or wrong_shape:
      lines = [f"checkpoint {os.path.dirname(files[0])} does not match {arch.model_cls.__name__} built from its "
               f"config.json ({len(unexpected)} unexpected, {len(missing)} missing, {len(wrong_shape)} wrong shape):"]
      lines += [f"  unexpected key: {k}" for k in unexpected]
      lines += [f"  missing (no checkpoint key maps to it): {m}" for m in missing]
      lines += [f"  wrong shape: {w}" for w in wrong_shape]
      lines.append("Check that config.json belongs to these weights (layer count, sizes, tie_word_embeddings).")
      raise CheckpointMismatchError("\n".join(lines))

  def load(self, path: str = "", *, skip: str | None = None, sharding: Any = None) -> nnx.Module:
    """The sub-module at dotted `path` ("" for the whole model) with its weights read, one tensor in memory at a
    time besides the result; leaves under `skip` (e.g. "layers") stay abstract.

    `sharding`: a function `shape -> jax.sharding.Sharding` (`gilora_jax.sharding.param` on a mesh) that places
    every weight as a global array; each process then reads from the file only the slices its own devices hold
    (a multi-host run reads every byte once per replica, not the whole tensor on every host)."""
    module = self.abstract
    for part in path.split(".") if path else ():
      module = module[int(part)] if part.isdigit() else getattr(module, part)
    graphdef, state = nnx.split(module)
    pure = nnx.to_pure_dict(state)
    prefix = f"{path}." if path else ""
    for p, leaf in _flatten(pure).items():
      target = prefix + _dotted(p)
      if skip is not None and (target == skip or target.startswith(skip + ".")):
        continue
      file, key, transform = self._where[target]
      if sharding is not None:
        _set(pure, p, _read_sharded(file, key, transform, leaf, sharding(leaf.shape)))
        continue
      _set(pure, p, _read_to_device(file, key, transform, leaf))
    nnx.replace_by_pure_dict(state, pure)
    runtime.release_free_memory()  # the host copies just freed (a tuned malloc would keep them resident)
    return nnx.merge(graphdef, state)


_CHUNK_BYTES = 64 << 20


def _chunks(file: str, key: str, transform: Transform, leaf: Any):
  """Yields `(axis, start, part)`: the tensor in the NNX layout and `leaf`'s dtype as NumPy pieces of ~64 MiB
  each, to be placed at `start` along `axis` of the result (the whole tensor once, `(0, 0, value)`, when it is
  small or its layout change needs it whole). The file is mapped anew for each piece: a mapping's pages count in
  the process's resident memory until it is closed, and a whole-tensor read plus its transposed copy held three
  copies of a 1.2 GB head at once."""
  with safe_open(file, framework="numpy") as f:
    stored = f.get_slice(key)
    shape = tuple(stored.get_shape())
    row_bytes = max(1, int(np.prod(shape[1:])) * np.dtype(leaf.dtype).itemsize)
    whole = (len(shape) < 2 or shape[0] * row_bytes <= _CHUNK_BYTES
             or (transform is not Transform.NONE and not (transform is Transform.LINEAR and len(shape) == 2)))
    if whole:
      yield 0, 0, np.asarray(_to_nnx(f.get_tensor(key), transform)).astype(leaf.dtype, copy=False)
      return
  step = max(1, _CHUNK_BYTES // row_bytes)
  for r0 in range(0, shape[0], step):
    r1 = min(r0 + step, shape[0])  # safetensors refuses a slice past the end
    with safe_open(file, framework="numpy") as f:
      part = f.get_slice(key)[r0:r1]
    if transform is Transform.LINEAR:  # stored (out, in) rows are the kernel's (in, out) columns
      yield 1, r0, np.ascontiguousarray(part.T).astype(leaf.dtype, copy=False)
    else:
      yield 0, r0, np.asarray(part).astype(leaf.dtype, copy=False)
    del part


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _place(out: jax.Array, part: jax.Array, start: jax.Array, axis: int) -> jax.Array:
  """`out` with `part` written at `start` along `axis`, in place (`out` is donated: no second copy)."""
  return lax.dynamic_update_slice_in_dim(out, part, start, axis)


def _read_to_device(file: str, key: str, transform: Transform, leaf: Any) -> jax.Array:
  """One tensor on the default device, read piece by piece (`_chunks`) into its final buffer. A NumPy array of
  the whole tensor handed to `device_put` was a second copy at the peak (CPU has no zero-copy transfer: the
  0.62 GB embedding of Qwen3-0.6B's shape took the process from 0.2 to 1.4 GiB while loading); here the peak is
  the result plus two pieces."""
  pieces = _chunks(file, key, transform, leaf)
  axis, start, part = next(pieces)
  if tuple(part.shape) == tuple(leaf.shape):
    return jax.device_put(part)
  out = jnp.zeros(tuple(leaf.shape), leaf.dtype)
  while part is not None:
    out = _place(out, jax.device_put(part), jnp.int32(start), axis)
    del part
    axis, start, part = next(pieces, (0, 0, None))
  return out


def _read_sharded(file: str, key: str, transform: Transform, leaf: Any, sharding: Any) -> jax.Array:
  """One tensor as a global array with `sharding`, each addressable shard read as a slice of the stored tensor
  (a kernel's (in, out) slice is the stored (out, in) weight's transposed slice)."""
  with safe_open(file, framework="numpy") as f:
    stored = f.get_slice(key)

    def shard(index: tuple) -> np.ndarray:
      if transform is Transform.NONE:
        value = stored[index] if index else f.get_tensor(key)
      elif transform is Transform.LINEAR and len(index) == 2:
        value = stored[index[1], index[0]].T
      else:  # a conv kernel: read whole, cut here
        value = _to_nnx(f.get_tensor(key), transform)[index]
      return np.ascontiguousarray(value).astype(leaf.dtype, copy=False)
    return jax.make_array_from_callback(tuple(leaf.shape), sharding, shard)


def save_hf(model: nnx.Module, path: str | os.PathLike, *, max_shard_bytes: int | None = None,
            extra_config: dict[str, Any] | None = None) -> None:
  """Writes `model` as a HF folder (config.json + safetensors) that `transformers` loads.

  `max_shard_bytes` splits the weights into `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
  `extra_config` entries (e.g. `id2label`, token ids from the original config.json) are written under ours.
  Weights are stored in the model's `param_dtype`.
  """
  cfg = model.config
  folder = os.path.abspath(os.fspath(path))
  write_safetensors(folder, hf_tensors(model), max_shard_bytes)
  with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
    json.dump({**(extra_config or {}), **cfg.to_hf_config()}, f, indent=2)


def hf_tensors(model: nnx.Module, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """{HF key: array in the HF layout} of every variable of `model` outside the sub-modules at the dotted paths
  `skip` (e.g. its quantized linears, which an exporter writes itself). Raises naming any unmappable variable."""
  table = KEY_TABLES[model.config.architecture]
  tensors, unmapped = {}, []
  for p, leaf in _flatten(nnx.to_pure_dict(nnx.state(model))).items():
    name = _dotted(p)
    if any(name.startswith(s + ".") for s in skip):
      continue
    for rule in table.rules:
      key = rule.nnx_to_hf(name)
      if key is not None:
        break
    if key is None:
      unmapped.append(name)
      continue
    tensors[key] = np.ascontiguousarray(_to_hf(np.asarray(leaf), rule.transform))
  if unmapped:
    raise ValueError(f"cannot express these {type(model).__name__} variables as HF keys: {unmapped}. Only float "
                     f"models convert to HF; save quantized ones with gilora_jax.pipeline.ckpt.save_model.")
  return tensors


def hf_name(architecture: str, path: str) -> str | None:
  """The HF key of the NNX variable at the dotted `path` (`layers.0.self_attn.q_proj.kernel` ->
  `model.layers.0.self_attn.q_proj.weight`), or None."""
  return next((k for r in KEY_TABLES[architecture].rules if (k := r.nnx_to_hf(path)) is not None), None)


def fill_from_hf(model: nnx.Module, tensors: dict[str, np.ndarray], skip: tuple[str, ...] = ()) -> nnx.Module:
  """`model` (abstract or not) with every variable outside the sub-modules `skip` read from `tensors` ({HF key:
  array}, the inverse of `hf_tensors`), cast to the variable's dtype; raises naming every missing or wrong-shaped
  key at once. The variables under `skip` keep their values."""
  table = KEY_TABLES[model.config.architecture]
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  problems = []
  for p, leaf in _flatten(pure).items():
    name = _dotted(p)
    if any(name.startswith(s + ".") for s in skip):
      continue
    rule, key = next(((r, k) for r in table.rules if (k := r.nnx_to_hf(name)) is not None), (None, None))
    if key is None or key not in tensors:
      problems.append(f"missing: {key or name}")
      continue
    value = _to_nnx(np.asarray(tensors[key]), rule.transform)
    if value.shape != leaf.shape:
      problems.append(f"wrong shape: {key} {list(value.shape)} vs {name} {list(leaf.shape)}")
      continue
    _set(pure, p, jnp.asarray(value.astype(leaf.dtype, copy=False)))
  if problems:
    raise CheckpointMismatchError(f"the tensors do not fit {type(model).__name__} built from its config.json "
                                  f"({len(problems)} problems):\n  " + "\n  ".join(problems))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def write_safetensors(folder: str, tensors: dict[str, np.ndarray], max_shard_bytes: int | None = None) -> None:
  """Writes `tensors` into `folder` as `model.safetensors`, or as shards of at most `max_shard_bytes` plus
  `model.safetensors.index.json`, removing the weight files of an earlier save first."""
  os.makedirs(folder, exist_ok=True)
  for stale in os.listdir(folder):  # weights of an earlier save would be mixed into ours
    if stale in (SAFETENSORS, SAFETENSORS_INDEX) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", stale):
      os.remove(os.path.join(folder, stale))
  shards, size = [{}], 0
  for key in sorted(tensors):
    if max_shard_bytes is not None and shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = tensors[key]
    size += tensors[key].nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(folder, SAFETENSORS), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
      weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(folder, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
      json.dump(index, f, indent=2)


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of a HF folder's safetensors file(s) (single or sharded), as NumPy arrays."""
  out = {}
  for file in _safetensors_files(folder):
    with safe_open(file, framework="numpy") as f:
      out.update({key: f.get_tensor(key) for key in f.keys()})
  return out
