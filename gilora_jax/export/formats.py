"""The tensors and config dicts of each export format, built in memory from a quantized model (NumPy only).

Layouts are shared/EXPORT_FORMATS.md's (§2 GPTQ, §3 compressed-tensors `pack-quantized`, §4 the PEFT adapter).
Every function here is pure: a `Site` (one quantized linear's codes, grid, low-rank factors and HF name) in,
`{tensor name: array}` or a JSON dict out. `gilora_jax.export` writes them; `export.reader` reads them back.
"""
# Math-style names follow the papers and formats.  pylint: disable=invalid-name
from __future__ import annotations

import dataclasses
import re
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from gilora_jax import nn
from gilora_jax.export import packing
from gilora_jax.models import convert, llama
from gilora_jax.quant.grid import GridSpec

FORMATS = ("ct", "gptq", "dense")
GPTQ_BITS = (2, 3, 4, 8)  # transformers' GPTQConfig and vLLM accept only these
MARLIN_GROUPS = (None, 32, 64, 128)  # vLLM's Marlin kernels (None: per-channel, -1 in the configs)
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
PEFT_PREFIX = "base_model.model."
CT_MIN_VERSION_DENSE_PACKING = "0.18.0"  # 3/5/6/7-bit cross-word packing (EXPORT_FORMATS.md §3.2)
CT_MIN_VERSION = "0.15.0"  # the oldest compressed-tensors transformers 5.23 loads with


@dataclasses.dataclass(frozen=True)
class Site:
  """One quantized linear as the formats see it (float32 arrays in the (d_in, d_out) kernel orientation)."""
  path: str  # NNX module path: layers.0.self_attn.q_proj
  hf: str  # HF module name: model.layers.0.self_attn.q_proj
  grid: GridSpec
  codes: np.ndarray  # (d_in, d_out) uint8
  scales: np.ndarray  # (G, d_out)
  zeros: np.ndarray  # (G, d_out), integer-valued
  L: np.ndarray | None  # (d_in, r)
  R: np.ndarray | None  # (r, d_out)
  bias: np.ndarray | None  # (d_out,)

  @property
  def shape(self) -> tuple[int, int]:
    return self.codes.shape

  @property
  def rank(self) -> int:
    return 0 if self.L is None else self.L.shape[1]

  @property
  def short(self) -> str:
    return self.hf.rsplit(".", 1)[-1]

  def group_size(self) -> int:
    """Rows per group as the configs write it: the group size, or -1 per-channel."""
    return -1 if self.grid.group_size is None else self.grid.group_size

  def int_zeros(self) -> np.ndarray:
    return np.rint(self.zeros).astype(np.int64)

  def dequantized(self) -> np.ndarray:
    """Q (d_in, d_out) float32 = s · (c − z), exactly as `QuantizedLinear.dequantized` computes it."""
    g = np.arange(self.shape[0]) // (self.shape[0] // self.scales.shape[0])
    return (self.scales[g] * (self.codes.astype(np.float32) - self.zeros[g])).astype(np.float32)


def sites(model: nnx.Module) -> list[Site]:
  """Every `QuantizedLinear` of `model`, in model order, with its HF module name."""
  arch = model.config.architecture
  out = []
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, nn.QuantizedLinear):
      continue
    dotted = ".".join(str(p) for p in path)
    key = convert.hf_name(arch, dotted + ".kernel")
    if key is None or not key.endswith(".weight"):
      raise ValueError(f"{dotted} has no HF linear name in the {arch} key table; it cannot be exported.")
    codes = np.asarray(nn.unpack_codes(module.codes[...], module.grid.bits, module.in_features))
    out.append(Site(dotted, key[:-len(".weight")], module.grid, codes, np.asarray(module.scales[...], np.float32),
                    np.asarray(module.zeros[...], np.float32),
                    None if not module.rank else np.asarray(module.L[...], np.float32),
                    None if not module.rank else np.asarray(module.R[...], np.float32),
                    None if module.bias is None else np.asarray(module.bias[...])))
  return out


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
  """`x` as the format stores it in `dtype`, back in float32 (what a reader computes with)."""
  return np.asarray(x).astype(NUMPY_DTYPES[dtype]).astype(np.float32)


def check_range(name: str, x: np.ndarray, dtype: str) -> None:
  """Refuses values that overflow `dtype` (float16 tops out at 65504) or are not finite: an inf written where the
  model had a large finite value would also pass a bit-for-bit compare against the same cast (inf == inf)."""
  x = np.asarray(x)
  if not x.size:
    return
  bad = int(np.count_nonzero(~np.isfinite(x)))
  if bad:
    raise ValueError(f"{name}: {bad} of {x.size} values are inf or nan; the model itself is broken, so there is "
                     f"nothing sound to export.")
  peak, top = float(np.abs(x).max()), float(ml_dtypes.finfo(NUMPY_DTYPES[dtype]).max)
  if peak > top:
    raise ValueError(f"{name}: |values| up to {peak:.3g} overflow {dtype} (max {top:.6g}), the dtype this format "
                     f"stores them in; export with --format ct or dense in bfloat16/float32 instead.")


def cast(name: str, x: np.ndarray, dtype: str) -> np.ndarray:
  """`x` in `dtype` (contiguous), after `check_range`: every float tensor an export writes goes through here."""
  check_range(name, x, dtype)
  return np.ascontiguousarray(x).astype(NUMPY_DTYPES[dtype])


def balanced(L: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`L D, D⁻¹ R` with `D_kk = sqrt(‖R_k‖ / ‖L_k‖)`: the same product (in exact arithmetic), with each rank-1
  term's magnitude split evenly between its two factors, so that casting to a 16-bit dtype neither underflows the
  smaller nor overflows the larger (EXPORT_FORMATS.md §4.4). A zero column or row keeps D_kk = 1."""
  nl, nr = np.linalg.norm(L, axis=0), np.linalg.norm(R, axis=1)
  ok = (nl > 0) & (nr > 0)
  d = np.where(ok, np.sqrt(np.where(ok, nr, 1.0) / np.where(ok, nl, 1.0)), 1.0).astype(np.float32)
  return (L * d).astype(np.float32), (R / d[:, None]).astype(np.float32)


def adapter_factors(site: Site, dtype: str) -> tuple[np.ndarray, np.ndarray]:
  """(L, R) as the adapter stores them: balanced, rounded to `dtype`, float32."""
  L, R = balanced(site.L, site.R)
  check_range(f"{site.hf} low-rank factors", L, dtype)
  check_range(f"{site.hf} low-rank factors", R, dtype)
  return rounded(L, dtype), rounded(R, dtype)


# ------------------------------------------------------------------------------------------------ compressed-tensors


def ct_tensors(site: Site, dtype: str) -> dict[str, np.ndarray]:
  """`weight_packed`, `weight_scale`, `weight_shape` (+ `weight_zero_point` when asymmetric, + `bias`)."""
  b, (d_in, d_out) = site.grid.bits, site.shape
  out = {"weight_packed": packing.pack(site.codes.T, b),  # (d_out, ⌈d_in·b/32⌉)
         "weight_scale": cast(f"{site.hf}.weight_scale", site.scales.T, dtype),  # (d_out, G)
         "weight_shape": np.array([d_out, d_in], np.int64)}
  if not site.grid.symmetric:
    out["weight_zero_point"] = np.ascontiguousarray(packing.pack(site.int_zeros(), b).T)  # (⌈d_out·b/32⌉, G)
  if site.bias is not None:
    out["bias"] = cast(f"{site.hf}.bias", site.bias, dtype)
  return {f"{site.hf}.{k}": v for k, v in out.items()}


def _scheme_key(site: Site) -> tuple:
  return site.grid.bits, site.grid.group_size, site.grid.symmetric


def _regex_targets(architecture: str) -> list[str]:
  """Both the checkpoint names and transformers 5's module names (`module_names`) of the quantizable linears."""
  if architecture in llama.ARCHITECTURES:
    return [r"re:.*self_attn\.(q|k|v|o)_proj$", r"re:.*mlp\.(gate|up|down)_proj$"]
  return [r"re:.*attention\.attention\.(query|key|value)$", r"re:.*(attention\.output|intermediate|output)\.dense$",
          r"re:.*attention\.(q|k|v|o)_proj$", r"re:.*mlp\.fc(1|2)$"]


# transformers 5 renames the DeiT/ViT modules when it loads a checkpoint (its conversion_mapping: encoder.layer ->
# layers, attention.attention.query -> attention.q_proj, ..., output.dense -> mlp.fc2); the formats' module-name
# fields (compressed-tensors targets and ignore, PEFT target_modules) are matched against the loaded modules.
_V5_RENAMES = ((r"\.encoder\.layer\.", ".layers."), (r"attention\.attention\.query$", "attention.q_proj"),
               (r"attention\.attention\.key$", "attention.k_proj"), (r"attention\.attention\.value$", "attention.v_proj"),
               (r"attention\.output\.dense$", "attention.o_proj"), (r"intermediate\.dense$", "mlp.fc1"),
               (r"(?<!attention\.)output\.dense$", "mlp.fc2"))


def module_names(architecture: str, name: str) -> list[str]:
  """The checkpoint name of a module and, where transformers 5 loads it under another, that name too."""
  if architecture in llama.ARCHITECTURES:
    return [name]
  renamed = name
  for pattern, repl in _V5_RENAMES:
    renamed = re.sub(pattern, repl, renamed)
  return [name] if renamed == name else [name, renamed]


def ct_config(model: nnx.Module, all_sites: list[Site], linears: list[str]) -> dict[str, Any]:
  """`config.json["quantization_config"]` for compressed-tensors `pack-quantized` (EXPORT_FORMATS.md §3.3).

  One config group per (bits, group size, symmetric); targets are the architecture's regexes when every
  quantizable linear shares one scheme, else the explicit module names. `ignore` lists every other linear.
  """
  arch = model.config.architecture
  groups: dict[tuple, list[Site]] = {}
  for s in all_sites:
    groups.setdefault(_scheme_key(s), []).append(s)
  quantized = {s.hf for s in all_sites}
  uniform = len(groups) == 1 and quantized == set(linears)
  config_groups = {}
  for i, ((bits, group_size, symmetric), members) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
    config_groups[f"group_{i}"] = {
        "targets": _regex_targets(arch) if uniform else [n for s in members for n in module_names(arch, s.hf)],
        "format": "pack-quantized", "input_activations": None, "output_activations": None,
        "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
                    "strategy": "channel" if group_size is None else "group", "block_structure": None,
                    "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}}
  dense_packing = any(bits not in (1, 2, 4, 8) for bits, _, _ in groups)
  return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "version": CT_MIN_VERSION_DENSE_PACKING if dense_packing else CT_MIN_VERSION,
          "global_compression_ratio": None, "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
          "ignore": [m for n in head_names(model) + [n for n in linears if n not in quantized]
                     for m in module_names(arch, n)],
          "config_groups": config_groups}


def ct_kernel_notes(all_sites: list[Site]) -> list[str]:
  """Warnings for schemes vLLM's fast kernels will not take (EXPORT_FORMATS.md §3.4, §3.6)."""
  notes = set()
  for bits, group_size, symmetric in {_scheme_key(s) for s in all_sites}:
    if not symmetric and bits not in (4, 8):
      notes.add(f"vLLM's compressed-tensors path takes asymmetric grids only at 4 and 8 bits, not {bits}; serve "
                f"this {bits}-bit asymmetric model from --format gptq (gptq_gemm, checkpoint_format gptq_v2).")
    elif bits not in (4, 8) or group_size not in MARLIN_GROUPS:
      notes.add(f"vLLM's Marlin kernels want 4 or 8 bits and groups of -1/32/64/128; {bits}-bit, group "
                f"{group_size or -1} will run on a slower kernel (or, before vLLM's 2/3-bit support, not at all).")
  return sorted(notes)


# ------------------------------------------------------------------------------------------------ GPTQ


def check_gptq_format(requested: str | None) -> None:
  """Refuses a `gptq_format` that is none of None/"auto", "v1", "v2"."""
  if requested not in (None, "auto", "v1", "v2"):
    raise ValueError(f"gptq_format={requested!r}: use 'v1' (checkpoint_format gptq, stored z − 1), 'v2' "
                     f"(gptq_v2, stored z) or leave it unset (v1 for symmetric grids, v2 for asymmetric).")


def gptq_zero_format(all_sites: list[Site], requested: str | None) -> str:
  """v1 (`"gptq"`) for symmetric grids, v2 (`"gptq_v2"`) for asymmetric; `requested="v1"` on an asymmetric model
  only when no zero is 0, else a ValueError giving the count."""
  check_gptq_format(requested)
  symmetric = all(s.grid.symmetric for s in all_sites)
  if requested in (None, "auto"):
    return packing.V1 if symmetric else packing.V2
  if requested == "v1":
    zero = sum(int(np.count_nonzero(s.int_zeros() == 0)) for s in all_sites)
    total = sum(s.zeros.size for s in all_sites)
    if zero:
      raise ValueError(f"--gptq-format v1: {zero} of {total} zero points of this asymmetric model are 0, which v1 "
                       f"(stored z − 1) cannot hold for field-wise readers (vLLM gptq_gemm, exllama); write v2 (the "
                       f"default for asymmetric grids, checkpoint_format gptq_v2).")
    return packing.V1
  return packing.V2


def gptq_tensors(site: Site, zero_format: str) -> dict[str, np.ndarray]:
  """`qweight`, `qzeros`, `scales` (fp16), `g_idx` (+ `bias`, fp16) of one linear (EXPORT_FORMATS.md §2.1)."""
  b, (d_in, _) = site.grid.bits, site.shape
  z = site.int_zeros()
  stored = packing.v1_zeros(z) if zero_format == packing.V1 else z
  g = d_in if site.grid.group_size is None else site.grid.group_size
  out = {"qweight": np.ascontiguousarray(packing.pack(site.codes.T, b).T),  # (d_in·b/32, d_out), along d_in
         "qzeros": packing.pack(stored, b),  # (G, d_out·b/32), along d_out
         "scales": cast(f"{site.hf}.scales", site.scales, "float16"),
         "g_idx": (np.arange(d_in) // g).astype(np.int32)}
  if site.bias is not None:
    out["bias"] = cast(f"{site.hf}.bias", site.bias, "float16")
  return {f"{site.hf}.{k}": v for k, v in out.items()}


def gptq_config(site: Site, zero_format: str, meta: dict[str, Any]) -> dict[str, Any]:
  """The dict of `config.json["quantization_config"]` and `quantize_config.json` (EXPORT_FORMATS.md §2.4)."""
  return {"quant_method": "gptq", "method": "gptq", "bits": site.grid.bits, "group_size": site.group_size(),
          "desc_act": False, "sym": site.grid.symmetric, "lm_head": False, "true_sequential": True,
          "static_groups": True, "checkpoint_format": zero_format, "format": zero_format, "pack_dtype": "int32",
          "meta": meta}


def gptq_architecture_problem(architecture: str) -> str | None:
  """Why a model of `architecture` cannot be written as GPTQ (None when it can)."""
  if architecture not in llama.ARCHITECTURES:
    return (f"{architecture} cannot be exported as GPTQ: transformers loads GPTQ only for text models ('We can only "
            f"quantize pure text model'); use --format ct or --format dense.")
  return None


def gptq_requirements(model: nnx.Module, all_sites: list[Site], linears: list[str]) -> list[str]:
  """Why these sites cannot be written as one GPTQ checkpoint (empty when they can)."""
  problem = gptq_architecture_problem(model.config.architecture)
  if problem:
    return [problem]
  problems = []
  schemes = {_scheme_key(s) for s in all_sites}
  if len(schemes) > 1:
    problems.append(f"GPTQ holds one (bits, group size, symmetric) per checkpoint; these layers use {len(schemes)}: "
                    f"{sorted(schemes, key=str)}; use --format ct, which takes one config group per scheme.")
  missing = sorted(set(linears) - {s.hf for s in all_sites})
  if missing:
    problems.append(f"GPTQ loaders quantize every linear of a block; {len(missing)} are not quantized "
                    f"({missing[:3]}...); use --format ct (which lists them in 'ignore') or quantize them too.")
  for s in all_sites:
    if s.grid.bits not in GPTQ_BITS:
      problems.append(f"{s.hf}: {s.grid.bits} bits; GPTQ readers take {GPTQ_BITS} (use --format ct).")
      break
  for s in all_sites:
    d_in, d_out = s.shape
    if d_in % 32 or d_out % 32:
      problems.append(f"{s.hf}: {d_in}×{d_out}; GPTQ needs d_in and d_out divisible by 32 (use --format ct).")
      break
  return problems


# ------------------------------------------------------------------------------------------------ dense


def dense_tensors(site: Site, dtype: str, merge: bool) -> dict[str, np.ndarray]:
  """`weight` (d_out, d_in) = (Q + L R)ᵀ (or Qᵀ) in `dtype` (+ `bias`)."""
  W = site.dequantized()
  if merge and site.rank:
    W = W + site.L @ site.R
  out = {"weight": cast(f"{site.hf}.weight", W.T, dtype)}
  if site.bias is not None:
    out["bias"] = cast(f"{site.hf}.bias", site.bias, dtype)
  return {f"{site.hf}.{k}": v for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ PEFT adapter


def adapter_name(architecture: str, name: str) -> str:
  """The module name an adapter's keys use: the one transformers loads the module under (`module_names`); PEFT
  does not rename adapter keys of DeiT/ViT the way transformers renames their checkpoint keys."""
  return module_names(architecture, name)[-1]


def adapter_rank(all_sites: list[Site]) -> int:
  """The adapter's one `r`: the largest rank (smaller ones are zero-padded to it, `padded`)."""
  return max((s.rank for s in all_sites), default=0)


def padded(L: np.ndarray, R: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
  """`L (d_in, k)`, `R (k, d_out)` with zero columns / rows up to rank `r`: the same product `L R`, exactly."""
  k = L.shape[1]
  return np.pad(L, [(0, 0), (0, r - k)]), np.pad(R, [(0, r - k), (0, 0)])


def adapter_tensors(architecture: str, all_sites: list[Site], dtype: str) -> dict[str, np.ndarray]:
  """`lora_A.weight = Lᵀ (r, d_in)`, `lora_B.weight = Rᵀ (d_out, r)` under PEFT's `base_model.model.` prefix,
  from the balanced factors (`adapter_factors`), zero-padded to the one rank `adapter_rank` (vLLM reads `r` alone
  and ignores `rank_pattern`, so a layer of a larger rank than `r` would not load there)."""
  out = {}
  r = adapter_rank(all_sites)
  for s in all_sites:
    if s.rank:
      L, R = padded(*adapter_factors(s, dtype), r)  # already on the dtype's grid: the cast below is exact
      key = f"{PEFT_PREFIX}{adapter_name(architecture, s.hf)}"
      out[f"{key}.lora_A.weight"] = cast(f"{key}.lora_A.weight", L.T, dtype)
      out[f"{key}.lora_B.weight"] = cast(f"{key}.lora_B.weight", R.T, dtype)
  return out


def adapter_config(model: nnx.Module, all_sites: list[Site], linears: list[str], base: str,
                   peft_version: str | None) -> dict[str, Any]:
  """PEFT `adapter_config.json` (EXPORT_FORMATS.md §4.1): one rank `r` for every layer (`adapter_tensors` pads the
  smaller ones), scaling exactly 1 (`lora_alpha = r`), so no `rank_pattern`/`alpha_pattern`, which vLLM ignores;
  no DoRA/rsLoRA, no `modules_to_save`. `base` (`base_model_name_or_path`) is the quantized folder's name, a
  relative path, not one of the machine that wrote it."""
  adapted = [s for s in all_sites if s.rank]
  r = adapter_rank(adapted)
  # Short names (q_proj, ..., dense) when they pick exactly the adapted linears; else the full module names.
  arch = model.config.architecture
  shorts = sorted({s.short for s in adapted})
  short_ok = {n for n in linears if n.rsplit(".", 1)[-1] in shorts} == {s.hf for s in adapted}
  names = sorted({(n.rsplit(".", 1)[-1] if short_ok else n) for n in (adapter_name(arch, s.hf) for s in adapted)})
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM" if model.config.architecture in llama.ARCHITECTURES else None,
          "r": r, "lora_alpha": r, "lora_dropout": 0.0,
          "target_modules": names,
          "rank_pattern": {}, "alpha_pattern": {},
          "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
          "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base,
          "peft_version": peft_version}


# ------------------------------------------------------------------------------------------------ the model


def linear_names(model: nnx.Module) -> list[str]:
  """HF names of every linear the model's `QUANT_SITES` name, in every block: what a format may quantize."""
  from gilora_jax.models import quant_sites  # pylint: disable=import-outside-toplevel
  out = []
  for i in range(len(model.layers)):
    for paths in quant_sites(model).values():
      for p in paths:
        out.append(convert.hf_name(model.config.architecture, f"layers.{i}.{p}.kernel")[:-len(".weight")])
  return out


def head_names(model: nnx.Module) -> list[str]:
  """HF names of the linears outside the blocks (heads): never quantized, listed in compressed-tensors' ignore."""
  arch = model.config.architecture
  names = []
  for path, module in nnx.iter_modules(model):
    dotted = ".".join(str(p) for p in path)
    if isinstance(module, nnx.Linear) and not dotted.startswith("layers."):
      names.append(convert.hf_name(arch, dotted + ".kernel")[:-len(".weight")])
  return names
