"""Reading compressed-tensors `pack-quantized` and GPTQ folders into models with `QuantizedLinear`s (NumPy only).

What `gilora_jax.load_model` does with a HF folder whose config.json has a `quantization_config` of
`quant_method` "compressed-tensors" or "gptq": ours (`gilora export`) or one written by llm-compressor or GPTQModel
(or AutoGPTQ, whose folders hold only `quantize_config.json`). Weight-only schemes only: activation quantization
(W4A8) is refused, and so is a GPTQ `sym: true` whose zeros are not 2^(b−1) (v2 zeros labelled v1, §2.3).
A PEFT adapter in `FOLDER/adapter/` (what `gilora export` writes beside the base) becomes the layers' `L`, `R`.

The decoders here are also the export's self-check (`gilora_jax.export.check`): `packing.unpack` reads the bit
stream independently of the packer that wrote it.
"""
# Math-style names follow the papers and formats.  pylint: disable=invalid-name
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np
from flax import nnx

from gilora_jax import nn
from gilora_jax.export import formats, packing
from gilora_jax.models import ARCHITECTURES, convert, hf_config
from gilora_jax.quant.grid import GridSpec

METHODS = ("compressed-tensors", "gptq")
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GPTQ_CONFIG = "quantize_config.json"  # AutoGPTQ-era folders have only this, no config.json["quantization_config"]


def quantization_config(folder: str) -> tuple[dict[str, Any], str]:
  """(the folder's quantization config, where it came from): config.json's `quantization_config`, else (AutoGPTQ
  era) `quantize_config.json`, whose `quant_method` defaults to "gptq"; ({}, config.json) when there is neither."""
  config, where = hf_config.read_config(folder)
  qc = config.get("quantization_config")
  if qc:
    return qc, where
  path = os.path.join(folder, GPTQ_CONFIG)
  if os.path.isfile(path):
    qc, where = hf_config.read_config(path)
    return {"quant_method": "gptq", **qc}, where
  return {}, where


def quant_method(folder: str) -> str | None:
  """The quant_method of a HF folder's quantization config (`quantization_config`) when it is one this module
  reads."""
  if not os.path.isfile(os.path.join(folder, "config.json")):
    return None
  method = quantization_config(folder)[0].get("quant_method")
  return method if method in METHODS else None


@dataclasses.dataclass(frozen=True)
class Decoded:
  """One linear's grid as a file stores it, decoded: codes (d_in, d_out) uint8, scales and zeros (G, d_out)."""
  grid: GridSpec
  codes: np.ndarray
  scales: np.ndarray
  zeros: np.ndarray
  bias: np.ndarray | None


def _grid(bits: int, group_size: int | None, symmetric: bool, where: str) -> GridSpec:
  grid = GridSpec(bits=int(bits), group_size=None if group_size in (None, -1) else int(group_size),
                  symmetric=bool(symmetric))
  grid.validate(where=where)
  return grid


# ------------------------------------------------------------------------------------------------ compressed-tensors


def _ct_matches(target: str, name: str) -> bool:
  if target.startswith("re:"):
    return re.match(target[3:], name) is not None
  return target in (name, "Linear")


def ct_scheme(qc: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
  """The `weights` args of the config group whose targets match module `name` (None when it is ignored)."""
  if any(_ct_matches(t, name) for t in qc.get("ignore") or ()):
    return None
  for group in (qc.get("config_groups") or {}).values():
    if any(_ct_matches(t, name) for t in group.get("targets") or ()):
      return group.get("weights")
  return None


def decode_ct(tensors: dict[str, np.ndarray], name: str, weights: dict[str, Any], where: str) -> Decoded:
  """`name.weight_packed/_scale/_shape/_zero_point` -> codes, scales, zeros (EXPORT_FORMATS.md §3.1)."""
  if weights.get("type", "int") != "int" or weights.get("strategy") not in ("group", "channel"):
    raise ValueError(f"{where}: {name} is quantized with type {weights.get('type')!r}, strategy "
                     f"{weights.get('strategy')!r}; gilora reads integer grids per group or per channel only.")
  if weights.get("actorder") == "group" or f"{name}.weight_g_idx" in tensors:
    raise ValueError(f"{where}: {name} uses act-order groups (weight_g_idx); gilora's grids are contiguous groups, "
                     f"so this checkpoint cannot be read; re-quantize with actorder 'weight' or null.")
  b, sym = int(weights["num_bits"]), bool(weights.get("symmetric", True))
  d_out, d_in = (int(v) for v in tensors[f"{name}.weight_shape"])
  grid = _grid(b, weights.get("group_size") if weights["strategy"] == "group" else None, sym, f"{where}: {name}")
  codes = packing.unpack(tensors[f"{name}.weight_packed"], b, d_in).T  # (d_out, d_in) -> (d_in, d_out)
  scales = np.asarray(tensors[f"{name}.weight_scale"]).astype(np.float32).T  # (d_out, G) -> (G, d_out)
  if sym:
    zeros = np.full(scales.shape, float(1 << (b - 1)), np.float32)  # CT's signed zero 0 is the stored 2^(b-1)
  else:
    zeros = packing.unpack(np.asarray(tensors[f"{name}.weight_zero_point"]).T, b, d_out).astype(np.float32)
  bias = tensors.get(f"{name}.bias")
  return Decoded(grid, np.ascontiguousarray(codes), np.ascontiguousarray(scales), zeros, bias)


# ------------------------------------------------------------------------------------------------ GPTQ


def decode_gptq(tensors: dict[str, np.ndarray], name: str, qc: dict[str, Any], where: str) -> Decoded:
  """`name.qweight/qzeros/scales/g_idx` -> codes, scales, zeros, decoding zeros as `checkpoint_format` says."""
  b = int(qc["bits"])
  qweight, scales = tensors[f"{name}.qweight"], np.asarray(tensors[f"{name}.scales"]).astype(np.float32)
  d_out = scales.shape[1]
  d_in = qweight.shape[0] * 32 // b
  grid = _grid(b, qc.get("group_size", -1), qc.get("sym", True), f"{where}: {name}")
  g = d_in if grid.group_size is None else grid.group_size
  g_idx = tensors.get(f"{name}.g_idx")
  if g_idx is not None and not np.array_equal(g_idx, np.arange(d_in) // g):
    raise ValueError(f"{where}: {name} has an act-order g_idx (desc_act); gilora's grids are contiguous groups, so "
                     f"this checkpoint cannot be read; re-quantize with desc_act false (static groups).")
  codes = packing.unpack(np.ascontiguousarray(qweight.T), b, d_in).T  # packed along d_in
  fmt = qc.get("checkpoint_format") or qc.get("format") or packing.V1
  if fmt == packing.V2:
    zeros = packing.unpack(tensors[f"{name}.qzeros"], b, d_out)
  elif fmt == packing.V1:
    zeros = packing.decode_v1_zeros(tensors[f"{name}.qzeros"], b, d_out)
  else:
    raise ValueError(f"{where}: checkpoint_format {fmt!r} is not GPTQ v1 ('gptq') or v2 ('gptq_v2').")
  if grid.symmetric:
    _check_symmetric_zeros(zeros, b, fmt, name, where)
  return Decoded(grid, np.ascontiguousarray(codes), scales, zeros.astype(np.float32), tensors.get(f"{name}.bias"))


def _check_symmetric_zeros(zeros: np.ndarray, bits: int, fmt: str, name: str, where: str) -> None:
  """`sym: true` means every zero is 2^(b−1); anything else is a checkpoint whose zeros and config disagree, most
  often v2 zeros (z) labelled `checkpoint_format: "gptq"` (v1, z − 1), which decode one too high (EXPORT_FORMATS.md
  §2.3: vLLM PR #38966, "!!!!" output). Raises a one-line ValueError naming the mislabel and its fix."""
  mid = 1 << (bits - 1)
  wrong = int(np.count_nonzero(zeros != mid))
  if not wrong:
    return
  if fmt == packing.V1 and np.all(zeros == mid + 1):
    raise ValueError(f"{where}: {name}: sym is true but every zero decodes to {mid + 1}, not 2^(b-1) = {mid}: its qzeros "
                     f"hold v2 zeros (z) under checkpoint_format 'gptq' (v1 stores z - 1), a known mislabel; set "
                     f"\"checkpoint_format\" and \"format\" to \"gptq_v2\" in config.json's quantization_config and "
                     f"in quantize_config.json.")
  raise ValueError(f"{where}: {name}: sym is true but {wrong} of {zeros.size} zeros decode to something other than "
                   f"2^(b-1) = {mid} (checkpoint_format {fmt!r}); the qzeros and the config disagree, so this "
                   f"checkpoint cannot be read as it is labelled.")


def _check_ct_config(qc: dict[str, Any], where: str) -> None:
  """Refuses what a weight-only read would silently drop: activation or KV-cache quantization (a `QuantizedLinear`
  holds a weight grid and computes in float, so a W4A8 checkpoint read weight-only would compute something its
  producer never evaluated), and sparsity or transform (rotation) configs, whose weights decode to the model only
  with the mask or the rotation applied."""
  if qc.get("kv_cache_scheme"):
    kv = qc["kv_cache_scheme"]
    raise ValueError(f"{where}: kv_cache_scheme quantizes the KV cache ({kv.get('num_bits')}-bit {kv.get('type')}); "
                     f"gilora reads weight-only schemes, whose KV cache stays in float; export without a KV-cache "
                     f"scheme.")
  for field, what in (("sparsity_config", "sparsity"), ("transform_config", "transforms (rotations)")):
    if qc.get(field):
      raise ValueError(f"{where}: {field} applies {what} the weights only decode with; gilora reads dense "
                       f"weight-only schemes; export without {field}.")
  for group_name, group in (qc.get("config_groups") or {}).items():
    for field in ("input_activations", "output_activations"):
      act = group.get(field)
      if act is not None:
        raise ValueError(f"{where}: config group {group_name!r} quantizes activations ({field}: "
                         f"{act.get('num_bits')}-bit {act.get('type')}, e.g. W4A8); gilora reads weight-only "
                         f"schemes, whose activations stay in float; export a weight-only (A16) checkpoint.")


# ------------------------------------------------------------------------------------------------ adapter


def read_adapter(folder: str, trim: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{HF module name: (L (d_in, r), R (r, d_out))} of a PEFT LoRA folder, with its scaling folded into R.

  `trim`: drop trailing rank-1 terms whose column of L and row of R are both zero (exact: `gilora export` pads
  every layer to the adapter's one `r`), so that a layer reads back at its own rank.
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  with open(os.path.join(folder, ADAPTER_CONFIG), encoding="utf-8") as f:
    cfg = json.load(f)
  if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
    raise ValueError(f"{folder}: only plain LoRA adapters can become L R (peft_type {cfg.get('peft_type')!r}, "
                     f"use_dora {cfg.get('use_dora')}).")
  tensors = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
  out = {}
  for key, A in tensors.items():
    if not key.endswith(".lora_A.weight"):
      continue
    name = key[:-len(".lora_A.weight")].removeprefix("base_model.model.")
    B = tensors[key.replace(".lora_A.", ".lora_B.")]

    def pattern(field, default, name=name):
      return next((v for p, v in (cfg.get(field) or {}).items() if re.match(rf"(.*\.)?({p})$", name)), default)
    r, alpha = pattern("rank_pattern", cfg["r"]), pattern("alpha_pattern", cfg["lora_alpha"])
    scaling = alpha / (np.sqrt(r) if cfg.get("use_rslora") else r)
    L, R = A.astype(np.float32).T, (B.astype(np.float32) * np.float32(scaling)).T
    if trim:
      used = np.flatnonzero(np.any(L != 0, axis=0) | np.any(R != 0, axis=1))
      k = 0 if used.size == 0 else int(used[-1]) + 1
      L, R = L[:, :k], R[:k]
    out[name] = (L, R)
  return out


# ------------------------------------------------------------------------------------------------ the model


def _read_tensors(folder: str, qc: dict[str, Any]) -> dict[str, np.ndarray]:
  """The folder's safetensors; an AutoGPTQ folder names its one file in `model_file_base_name`
  (`gptq_model-4bit-128g.safetensors`) instead of `model.safetensors`."""
  base = qc.get("model_file_base_name")
  single = os.path.join(folder, f"{base}.safetensors") if base else None
  if single and os.path.isfile(single) and not any(
      os.path.isfile(os.path.join(folder, n)) for n in (convert.SAFETENSORS, convert.SAFETENSORS_INDEX)):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return load_file(single)
  return convert.read_safetensors(folder)


def load(path: str | os.PathLike, *, dtype: str = "float32", adapter: bool = True) -> nnx.Module:
  """The model of a compressed-tensors or GPTQ folder, with a `QuantizedLinear` at every quantized linear (its
  codes, scales and zeros exactly as stored) and the float tensors cast to `dtype`; `L R` from `path/adapter/`
  when it is there and `adapter` is True."""
  folder = convert.local_folder(path)
  config, _ = hf_config.read_config(folder)
  qc, where = quantization_config(folder)
  method = qc.get("quant_method")
  if method not in METHODS:
    raise ValueError(f"{where}: quant_method {method!r} is not one gilora reads ({', '.join(METHODS)}).")
  if method == "compressed-tensors" and qc.get("format") not in ("pack-quantized", None):
    raise ValueError(f"{where}: compressed-tensors format {qc.get('format')!r}; gilora reads 'pack-quantized'.")
  if method == "compressed-tensors":
    _check_ct_config(qc, where)
  if method == "gptq" and qc.get("dynamic"):
    raise ValueError(f"{where}: GPTQ 'dynamic' per-module overrides are not supported; export without them.")
  arch_name = convert.architecture_of(config, where)
  arch = ARCHITECTURES[arch_name]
  cfg = arch.config_cls.from_hf_config(config, dtype=dtype, param_dtype=dtype)
  tensors = _read_tensors(folder, qc)
  suffix = ".weight_packed" if method == "compressed-tensors" else ".qweight"
  names = sorted(k[:-len(suffix)] for k in tensors if k.endswith(suffix))
  lowrank = {}
  adapter_dir = os.path.join(folder, ADAPTER_DIR)
  if adapter and os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG)):
    lowrank = read_adapter(adapter_dir)
  model = nnx.eval_shape(lambda: arch.model_cls(cfg, rngs=nnx.Rngs(0)))
  paths = []
  for name in names:
    path = next((p for r in convert.KEY_TABLES[arch_name].rules if (p := r.hf_to_nnx(name + ".weight"))), None)
    if path is None or not path.endswith(".kernel"):
      raise ValueError(f"{where}: quantized module {name} is not a linear of {arch_name} that gilora can hold.")
    path = path[:-len(".kernel")]
    if method == "compressed-tensors":
      weights = ct_scheme(qc, name, where)
      if weights is None:
        raise ValueError(f"{where}: {name} has packed weights but no config group of its quantization_config "
                         f"targets it.")
      d = decode_ct(tensors, name, weights, where)
    else:
      d = decode_gptq(tensors, name, qc, where)
    L, R = lowrank.pop(formats.adapter_name(arch_name, name), (np.zeros((d.codes.shape[0], 0), np.float32), np.zeros((0, d.codes.shape[1]),
                                                                                    np.float32)))
    expected = nn.get_path(model, path)
    use_bias = getattr(expected, "bias", None) is not None
    if (expected.in_features, expected.out_features) != d.codes.shape:
      raise convert.CheckpointMismatchError(f"{where}: {name} holds a {d.codes.shape[0]}×{d.codes.shape[1]} weight; "
                                            f"config.json says {expected.in_features}×{expected.out_features}.")
    if use_bias and d.bias is None:
      raise convert.CheckpointMismatchError(f"{where}: {name}.bias is missing.")
    nn.set_path(model, path, nn.QuantizedLinear(d.codes, d.scales, d.zeros, L, R, grid=d.grid, dtype=cfg.dtype,
                                                bias=None if not use_bias else np.asarray(d.bias).astype(dtype)))
    paths.append(path)
  if lowrank:
    raise ValueError(f"{adapter_dir}: the adapter has factors for {sorted(lowrank)[:3]}, which are not quantized "
                     f"linears of {folder}.")
  return convert.fill_from_hf(model, tensors, skip=tuple(paths))
