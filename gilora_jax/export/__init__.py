"""Export of quantized models to the folders serving stacks load: compressed-tensors, GPTQ, dense, + PEFT LoRA.

`W ≈ Q + L R` is "a quantized base plus a LoRA adapter": `export(src, to, format=...)` writes `Q` as a
compressed-tensors `pack-quantized` (`"ct"`, what vLLM prefers) or GPTQ (`"gptq"`) checkpoint, or `Q + L R` as
float weights (`"dense"`), and `L R` as a PEFT adapter in `to/adapter/`. Byte-level layouts:
shared/EXPORT_FORMATS.md. The writer needs only safetensors and NumPy; the self-check (on by default) decodes
every written tensor independently and, for ct and dense, reloads the folder with transformers (+ peft) and
compares logits (`gilora_jax.export.check`). The folder is written under a temporary name and renamed at the end,
so a failed check leaves nothing behind.

`gilora_jax.load_model` reads ct and GPTQ folders back into `QuantizedLinear` models (`gilora_jax.export.reader`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import numpy as np
from flax import nnx

from gilora_jax.export import check as check_lib
from gilora_jax.export import formats, reader
from gilora_jax.export.formats import FORMATS
from gilora_jax.models import convert, hf_config

__all__ = ["FORMATS", "export", "load"]

log = logging.getLogger(__name__)
load = reader.load


def _inspect(model_or_folder) -> tuple[str | None, str]:
  """(the source folder or None for an in-memory model, its architecture), from the checkpoint's meta or the
  folder's config.json alone: the refusals that depend on the source come before its weights are read (and, for a
  gilora checkpoint, every file is hashed)."""
  if isinstance(model_or_folder, nnx.Module):
    return None, model_or_folder.config.architecture
  from gilora_jax.pipeline import ckpt  # pylint: disable=import-outside-toplevel  (orbax: only for checkpoints)
  folder = convert.local_folder(model_or_folder)
  if reader.quant_method(folder):
    return folder, convert.architecture_of(*hf_config.read_config(folder))
  if not ckpt.is_checkpoint(folder):
    raise ValueError(f"{folder} is neither a gilora checkpoint nor a compressed-tensors/GPTQ folder; export the "
                     f"output folder of `gilora quantize --model ... --out OUT`.")
  info = ckpt.read_info(folder)
  if "quant" not in info["meta"]:
    raise ValueError(f"{folder} is a float gilora checkpoint: nothing is quantized; run `gilora quantize` first.")
  return folder, info["architecture"]


def _source(model_or_folder, folder: str | None, verify: bool) -> nnx.Module:
  """The quantized model (`_inspect` has accepted `model_or_folder`)."""
  if folder is None:
    return model_or_folder
  from gilora_jax.pipeline import ckpt  # pylint: disable=import-outside-toplevel
  if reader.quant_method(folder):
    return reader.load(folder)
  return ckpt.restore_model(folder, verify_files=verify)


def _check_dtype(fmt: str, dtype: str | None) -> str | None:
  if fmt == "gptq":
    if dtype not in (None, "float16"):
      raise ValueError(f"dtype={dtype!r}: GPTQ checkpoints are float16 (vLLM's gptq kernels run in float16).")
    return "float16"
  if dtype is not None and dtype not in formats.NUMPY_DTYPES:
    raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(formats.NUMPY_DTYPES)}.")
  return dtype


def _side_files(folder: str | None) -> tuple[dict[str, str], dict[str, Any]]:
  """(tokenizer/preprocessor/generation files to copy, config.json entries of the original model to keep)."""
  if folder is None:
    return {}, {}
  from gilora_jax.pipeline import ckpt, run  # pylint: disable=import-outside-toplevel
  files = {n: os.path.join(folder, n) for n in run.SIDE_FILES if os.path.isfile(os.path.join(folder, n))}
  source = ckpt.read_meta(folder).get("source") if ckpt.is_checkpoint(folder) else folder
  extra = {}
  if source and os.path.isfile(os.path.join(source, "config.json")):
    # Not the original's quantization_config, nor its torch_dtype: transformers 5 writes `dtype`, which we set to
    # the folder's dtype, and a stale torch_dtype beside it would say another one.
    extra = {k: v for k, v in hf_config.read_config(source)[0].items() if k not in ("quantization_config",
                                                                                   "torch_dtype")}
  return files, extra


def _lowrank_mode(fmt: str, adapter: bool | None, merge_adapter: bool | None) -> str:
  """"adapter" (PEFT folder), "merge" (into dense weights) or "drop"."""
  if adapter and merge_adapter:
    raise ValueError("adapter and merge_adapter exclude each other: L R is either written as a PEFT adapter or "
                     "folded into the dense weights.")
  if merge_adapter and fmt != "dense":
    raise ValueError(f"merge_adapter: a {fmt} base is quantized and cannot absorb L R; use format='dense' to merge "
                     f"it, or keep it as the adapter (the default).")
  if merge_adapter or (fmt == "dense" and adapter is None and merge_adapter is None):
    return "merge"
  if adapter is False or (fmt == "dense" and merge_adapter is False and not adapter):
    return "drop"
  return "adapter"


def _check_destination(to: str, folder: str | None) -> str:
  final = os.path.abspath(os.fspath(to))
  if os.path.exists(final) and not (os.path.isdir(final) and not os.listdir(final)):
    raise FileExistsError(f"{final} exists and is not empty; export into a new folder (or remove it yourself).")
  if folder is not None:
    real, src = os.path.realpath(final), os.path.realpath(folder)
    if real == src or real.startswith(src + os.sep) or src.startswith(real + os.sep):
      raise ValueError(f"{final} is inside the source folder {folder} (or contains it); export elsewhere.")
  return final


def export(model_or_folder, to: str | os.PathLike, *, format: str = "ct",  # pylint: disable=redefined-builtin
           adapter: bool | None = None, merge_adapter: bool | None = None, gptq_format: str | None = None,
           dtype: str | None = None, check: bool = True, verify: bool = True,
           max_shard_bytes: int | None = 5 * 2**30, gptq_python: str | None = None) -> dict[str, Any]:
  """Writes a quantized model as a folder transformers/vLLM/GPTQModel/PEFT load; returns a summary dict.

  Args:
    model_or_folder: a model with `QuantizedLinear`s, a `gilora quantize` output folder, or a ct/GPTQ folder.
    to: the new folder (must not exist, or be empty).
    format: "ct" (compressed-tensors pack-quantized), "gptq", or "dense" (float weights).
    adapter: write `L R` as a PEFT LoRA folder `to/adapter/` (default for ct and gptq); False drops it.
    merge_adapter: fold `L R` into the weights (dense only; the default there).
    gptq_format: "v1" or "v2" zero points; default v1 for symmetric grids, v2 for asymmetric.
    dtype: the float dtype of the folder (default the model's `param_dtype`; GPTQ is always float16).
    check: decode everything written and (ct, dense) reload it with transformers + peft (module docstring).
    verify: check a gilora checkpoint's SHA-256 manifest before reading it.
    max_shard_bytes: safetensors shard size.
    gptq_python: for format "gptq" with `check`: the python of a separate environment with optimum + gptqmodel
      (their releases need a newer torch than this one's pin), which then reloads the folder with transformers
      and compares logits (`check.gptq_reload`); default the ``GILORA_GPTQ_PYTHON`` environment variable, and
      without either the GPTQ check is the decode alone.
  """
  # Everything that can be refused from the arguments, the destination and the source's metadata is refused
  # before the source's weights are read.
  if format not in FORMATS:
    raise ValueError(f"format={format!r}: choose one of {', '.join(FORMATS)}.")
  lowrank = _lowrank_mode(format, adapter, merge_adapter)
  dtype = _check_dtype(format, dtype)
  if format == "gptq":
    formats.check_gptq_format(gptq_format)
  gptq_python = gptq_python or (os.environ.get(check_lib.GPTQ_PYTHON_ENV) or None if format == "gptq" else None)
  if gptq_python and check and format == "gptq" and shutil.which(gptq_python) is None:
    raise ValueError(f"--gptq-python {gptq_python}: no such interpreter; pass the python of an environment with "
                     f"gptqmodel + optimum ({check_lib.GPTQ_ENV_HINT}), or leave it out for the decode-only check.")
  if check and format != "gptq":
    missing = check_lib.missing_reload_packages()
    if missing:
      raise ValueError(f"the {format} self-check reloads the folder with transformers + peft, and {', '.join(missing)} "
                       f"is not installed: pip install 'gilora_jax[export]' (or skip the check: check=False, "
                       f"--no-check).")
  folder, architecture = _inspect(model_or_folder)
  final = _check_destination(to, folder)
  if format == "gptq" and (problem := formats.gptq_architecture_problem(architecture)):
    raise ValueError(problem)
  model = _source(model_or_folder, folder, verify)
  sites = formats.sites(model)
  if not sites:
    raise ValueError("the model has no quantized linears; quantize it first (gilora quantize).")
  linears = formats.linear_names(model)
  dtype = _check_dtype(format, dtype or model.config.param_dtype)
  problems = formats.gptq_requirements(model, sites, linears) if format == "gptq" else []
  if problems:
    raise ValueError(problems[0] if len(problems) == 1 else "cannot write GPTQ: " + "; ".join(problems))
  notes = []
  if format == "ct":
    notes = formats.ct_kernel_notes(sites)
  elif format == "gptq":
    s = sites[0]
    if not (s.grid.symmetric and s.grid.bits in (4, 8) and s.grid.group_size in formats.MARLIN_GROUPS):
      notes.append(f"vLLM's Marlin kernels want symmetric 4/8-bit with groups -1/32/64/128; this {s.grid.bits}-bit "
                   f"{'symmetric' if s.grid.symmetric else 'asymmetric'} model runs on gptq_gemm.")
  if lowrank == "drop" and any(s.rank for s in sites):
    notes.append("the low-rank term L R is not written (adapter=False): the folder holds Q alone, a worse model.")
  for note in notes:
    log.warning("%s", note)
  if lowrank == "adapter" and not any(s.rank for s in sites):
    lowrank = "drop"  # rank 0 everywhere (rtn, gptq): there is no adapter to write

  paths = tuple(s.path for s in sites)
  tensors = {k: (formats.cast(k, v, dtype) if np.issubdtype(v.dtype, np.floating) else v)
             for k, v in convert.hf_tensors(model, skip=paths).items()}
  zero_format = formats.gptq_zero_format(sites, gptq_format) if format == "gptq" else None
  for s in sites:
    if format == "ct":
      tensors.update(formats.ct_tensors(s, dtype))
    elif format == "gptq":
      tensors.update(formats.gptq_tensors(s, zero_format))
    else:
      tensors.update(formats.dense_tensors(s, dtype, merge=lowrank == "merge"))
  meta = {"quantizer": [f"gilora_jax:{_version()}"], "lowrank_adapter": f"{reader.ADAPTER_DIR}/"
          if lowrank == "adapter" else None}
  qc = (formats.ct_config(model, sites, linears) if format == "ct" else
        formats.gptq_config(sites[0], zero_format, meta) if format == "gptq" else None)
  adapter_files = None
  if lowrank == "adapter":  # built (and range-checked) before anything is written
    adapter_files = (formats.adapter_tensors(model.config.architecture, sites, dtype),
                     formats.adapter_config(model, sites, linears, os.path.basename(final), _peft_version()))
  side, extra = _side_files(folder)
  config = {**extra, **model.config.to_hf_config(), "dtype": dtype}
  if qc is not None:
    config["quantization_config"] = qc

  from gilora_jax.pipeline import files as files_lib  # pylint: disable=import-outside-toplevel
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = files_lib.make_temp_dir(parent, f".{os.path.basename(final)}.tmp-")
  try:
    convert.write_safetensors(tmp, tensors, max_shard_bytes)
    _write_json(os.path.join(tmp, "config.json"), config)
    if format == "gptq":
      _write_json(os.path.join(tmp, "quantize_config.json"), qc)
    for name, src in side.items():
      shutil.copyfile(src, os.path.join(tmp, name))
    if adapter_files is not None:
      _write_adapter(os.path.join(tmp, reader.ADAPTER_DIR), *adapter_files)
    checked = []
    if check:
      check_lib.decode(tmp, format, sites, dtype, lowrank)
      checked.append("decode: every code, zero, scale and factor bit-identical")
      if format != "gptq":
        checked.append(check_lib.reload(tmp, format, model, sites, dtype, lowrank, tensors if format == "dense"
                                        else None))
      elif gptq_python:
        checked.append(check_lib.gptq_reload(tmp, model, sites, dtype, lowrank, gptq_python))
      else:
        log.info("the GPTQ folder was decoded, not reloaded: pass --gptq-python (or set %s) to the python of an "
                 "environment with gptqmodel + optimum to reload it with transformers", check_lib.GPTQ_PYTHON_ENV)
    _fsync_tree(tmp)  # the folder's content is on disk before its name says it is finished
    if os.path.isdir(final):
      os.rmdir(final)  # empty (checked above)
    os.rename(tmp, final)
    files_lib.fsync_dir(parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  summary = {"out": final, "format": format, "dtype": dtype, "lowrank": lowrank, "layers": len(sites),
             "gptq_format": zero_format, "warnings": notes, "check": checked if check else None}
  log.info("exported %d quantized linears to %s (%s)", len(sites), final, format)
  return summary


def _write_adapter(path: str, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(path)
  save_file(tensors, os.path.join(path, reader.ADAPTER_WEIGHTS), metadata={"format": "pt"})
  _write_json(os.path.join(path, reader.ADAPTER_CONFIG), config)


def _write_json(path: str, obj: Any) -> None:
  from gilora_jax.pipeline import files as files_lib  # pylint: disable=import-outside-toplevel
  files_lib.write_bytes(path, json.dumps(obj, indent=2).encode("utf-8"))


def _fsync_tree(folder: str) -> None:
  """fsyncs every file under `folder` (safetensors' writer and the side-file copies do not), then every directory
  bottom-up, as `pipeline.ckpt.write_folder` does before its rename: a crash after the rename must not leave a
  finished-looking folder with empty or partial files."""
  from gilora_jax.pipeline import files as files_lib  # pylint: disable=import-outside-toplevel
  for root, _, names in os.walk(folder, topdown=False):
    for name in names:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    files_lib.fsync_dir(root)


def _version() -> str:
  from gilora_jax import __version__  # pylint: disable=import-outside-toplevel
  return __version__


def _peft_version() -> str | None:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version("peft")
  except metadata.PackageNotFoundError:
    return None

