"""Orbax save/restore of a model's state, with its config beside it so restoring needs no flags.

The only module that imports orbax. A checkpoint is a folder:

  path/
    gilora_ckpt.json   {"format", "architecture", "config", "meta"}: what to rebuild, plus caller metadata
    state/             orbax StandardCheckpointer output of `nnx.to_pure_dict(nnx.state(model))`

Saving is atomic: everything is written into a hidden temporary sibling folder, which is renamed to `path` only
once orbax has finished and the JSON is on disk. A crash leaves at most a `.<name>.tmp-*` folder, never a
`path` that looks finished. Restoring builds the model abstractly (`nnx.eval_shape`) and lets orbax fill it, so
arrays come back bit for bit in their saved dtypes.

`meta` (any JSON-serialisable dict) and `build_abstract(config, meta) -> model` let callers store and restore
models whose structure differs from the float architecture (e.g. quantized layers swapped in).

Quantized models (`save_quantized`) store `meta["quant"] = {"sites": {module path: QuantizedLinear.spec()},
"config": QuantConfig JSON, "blocks_done", "num_blocks"}` and `meta["records"]` (the per-layer records).
`restore_model` sees `meta["quant"]` and rebuilds the abstract model itself (the float architecture from the
stored config, then `QuantizedLinear.empty` at every stored site), so restoring needs no options. A run that is
still in progress (blocks_done < num_blocks) is saved the same way under a different folder (see
`gilora_jax.cli`), so a partial run is never mistaken for a finished one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx

from gilora_jax.models.convert import ARCHITECTURES

INFO_FILE = "gilora_ckpt.json"
STATE_DIR = "state"
FORMAT = "gilora_jax.ckpt/1"


def is_checkpoint(path: str | os.PathLike) -> bool:
  """True if `path` is a finished checkpoint written by `save_model`."""
  return os.path.isfile(os.path.join(os.fspath(path), INFO_FILE))


def save_model(path: str | os.PathLike, model: nnx.Module, meta: dict[str, Any] | None = None, *,
               overwrite: bool = False, files: dict[str, str | bytes] | None = None) -> str:
  """Atomically writes `model`'s state, config and `meta` to the folder `path`; returns its absolute path.

  `model.config` must be one of the registered `ModelConfig`s. An existing `path` raises FileExistsError unless
  `overwrite=True`, in which case it is replaced only after the new checkpoint is complete.
  """
  final = os.path.abspath(os.fspath(path))
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"{final} exists; pass overwrite=True to replace it.")
  cfg = model.config
  info = {"format": FORMAT, "architecture": cfg.architecture, "config": dataclasses.asdict(cfg), "meta": meta or {}}
  encoded = json.dumps(info, indent=2)  # fail on non-JSON meta before writing anything
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, STATE_DIR), nnx.to_pure_dict(nnx.state(model)))
      checkpointer.wait_until_finished()
    for name, src in (files or {}).items():
      dst = os.path.join(tmp, name)
      if isinstance(src, bytes):
        with open(dst, "wb") as f:
          f.write(src)
      else:
        shutil.copyfile(src, dst)
    with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:  # last: its presence marks "finished"
      f.write(encoded)
    if os.path.exists(final):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=parent)
      os.rename(final, os.path.join(old, "ckpt"))
      os.rename(tmp, final)
      shutil.rmtree(old)
    else:
      os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def read_info(path: str | os.PathLike) -> dict[str, Any]:
  """The checkpoint's JSON: {"format", "architecture", "config", "meta"}."""
  folder = os.path.abspath(os.fspath(path))
  info_path = os.path.join(folder, INFO_FILE)
  if not os.path.isfile(info_path):
    raise FileNotFoundError(f"{folder} is not a finished gilora_jax checkpoint (no {INFO_FILE}); a save that was "
                            f"interrupted leaves only a hidden .tmp- folder. Save the model again.")
  with open(info_path, encoding="utf-8") as f:
    info = json.load(f)
  if info.get("format") != FORMAT:
    raise ValueError(f"{info_path}: format {info.get('format')!r}, expected {FORMAT!r}.")
  if info["architecture"] not in ARCHITECTURES:
    raise ValueError(f"{info_path}: unknown architecture {info['architecture']!r}; known: {sorted(ARCHITECTURES)}.")
  return info


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """The `meta` dict stored by `save_model`."""
  return read_info(path)["meta"]


def restore_model(path: str | os.PathLike,
                  build_abstract: Callable[[Any, dict[str, Any]], nnx.Module] | None = None) -> nnx.Module:
  """Restores a `save_model` checkpoint bit-exactly.

  `build_abstract(config, meta)` constructs the model to restore into (it runs under `nnx.eval_shape`, so it
  allocates nothing); the default builds the registered float architecture from the stored config.
  """
  folder = os.path.abspath(os.fspath(path))
  info = read_info(folder)
  arch = ARCHITECTURES[info["architecture"]]
  # JSON turns tuples into lists; config fields must stay hashable (the config is static jit metadata).
  cfg = arch.config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()})
  if build_abstract is None:
    build = build_quantized if "quant" in info["meta"] else (lambda c, _: arch.model_cls(c, rngs=nnx.Rngs(0)))
  else:
    build = build_abstract
  abstract = nnx.eval_shape(lambda: build(cfg, info["meta"]))
  graphdef, state = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(state))
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.join(folder, STATE_DIR), target)
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------------------------------------
# Quantized models
# ------------------------------------------------------------------------------------------------------------------


def build_quantized(config: Any, meta: dict[str, Any]) -> nnx.Module:
  """The float architecture of `config` with `QuantizedLinear.empty` at every site in `meta["quant"]["sites"]`."""
  from gilora_jax import apply, nn  # pylint: disable=import-outside-toplevel  (apply imports ckpt-free modules only)
  model = ARCHITECTURES[config.architecture].model_cls(config, rngs=nnx.Rngs(0))
  for path, spec in meta["quant"]["sites"].items():
    apply.set_path(model, path, nn.QuantizedLinear.from_spec(spec))
  return model


def save_quantized(path: str | os.PathLike, model: nnx.Module, quant: dict[str, Any], records: list[dict],
                   *, overwrite: bool = False, files: dict[str, str | bytes] | None = None,
                   extra_meta: dict[str, Any] | None = None) -> str:
  """Atomically saves a (possibly partially) quantized model: state, config, per-site specs and records.

  `quant` holds at least "config" (the QuantConfig JSON), "blocks_done" and "num_blocks"; the per-site specs are
  read off the model.
  """
  from gilora_jax import apply  # pylint: disable=import-outside-toplevel
  meta = {**(extra_meta or {}), "quant": {**quant, "sites": apply.quantized_specs(model)}, "records": records}
  return save_model(path, model, meta, overwrite=overwrite, files=files)


def is_quantized(path: str | os.PathLike) -> bool:
  """True if `path` is a finished checkpoint of a quantized model."""
  return is_checkpoint(path) and "quant" in read_meta(path)
