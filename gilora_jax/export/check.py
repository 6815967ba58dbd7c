"""The export's self-check: decode what was written, and reload it the way a user's stack does.

1. `decode`: every written tensor is read back from disk and decoded with `reader` (`packing.unpack` reads the
   bit stream independently of the packer) and compared bit for bit with the model's codes and zeros, and with
   its scales and low-rank factors after the 16-bit rounding the format imposes.
2. `reload` (ct, dense): `transformers` loads the folder on CPU in float32 (compressed-tensors decompresses in
   plain torch), `peft` applies the adapter, and the logits on a few inputs are compared with our JAX model holding
   the values the folder holds (`reference`), also in float32: what is left is float32 round-off, so the tolerance
   is 1e-4 of the logits' scale. The message also states how far the 16-bit rounding moved the logits from the
   unrounded quantized model. gptq: the same with transformers + optimum + gptqmodel, run by the interpreter of a
   separate environment (`gptq_reload`), when one is given.
"""
# Math-style names follow the papers and formats.  pylint: disable=invalid-name
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import warnings

import numpy as np
from flax import nnx

from gilora_jax import nn
from gilora_jax.export import formats, reader
from gilora_jax.models import ARCHITECTURES, convert, llama

RTOL = 1e-4  # float32 evaluation of the same numbers by two frameworks, relative to max |logit|
RELOAD_PACKAGES = {"torch": "torch==2.13.0", "transformers": "transformers~=5.23.0",
                   "compressed_tensors": "compressed-tensors~=0.20.0", "peft": "peft~=0.21.2"}


class ExportCheckError(ValueError):
  """The folder just written does not decode or reload to the model it was written from."""


def missing_reload_packages() -> list[str]:
  """The pip requirements of the reload check that are not importable here."""
  return [req for mod, req in RELOAD_PACKAGES.items() if importlib.util.find_spec(mod) is None]


def _equal(what: str, got: np.ndarray, want: np.ndarray, problems: list[str]) -> None:
  got, want = np.asarray(got), np.asarray(want)
  if got.shape != want.shape:
    problems.append(f"{what}: shape {got.shape}, expected {want.shape}")
  elif not np.array_equal(got, want):
    problems.append(f"{what}: {int(np.count_nonzero(got != want))} of {want.size} values differ")


def decode(folder: str, fmt: str, sites: list[formats.Site], dtype: str, lowrank: str) -> None:
  """Raises `ExportCheckError` unless the folder's tensors decode to `sites` bit for bit (module docstring, 1)."""
  tensors = convert.read_safetensors(folder)
  qc = convert.hf_config.read_config(folder)[0].get("quantization_config") or {}
  problems: list[str] = []
  for s in sites:
    if fmt == "dense":
      W = s.dequantized() + (s.L @ s.R if lowrank == "merge" and s.rank else 0)
      _equal(f"{s.hf}.weight", tensors[f"{s.hf}.weight"].astype(np.float32), formats.rounded(W.T, dtype), problems)
      continue
    if fmt == "ct":
      d = reader.decode_ct(tensors, s.hf, reader.ct_scheme(qc, s.hf, folder) or {}, folder)
      scale_dtype = dtype
    else:
      d = reader.decode_gptq(tensors, s.hf, qc, folder)
      scale_dtype = "float16"
    if d.grid != dataclasses.replace(s.grid, shrink=1.0, mse=False):
      problems.append(f"{s.hf}: the config describes {d.grid}, the model has {s.grid}")
    _equal(f"{s.hf} codes", d.codes, s.codes, problems)
    _equal(f"{s.hf} zeros", d.zeros, s.zeros, problems)
    _equal(f"{s.hf} scales", d.scales, formats.rounded(s.scales, scale_dtype), problems)
  if lowrank == "adapter":
    arch = convert.architecture_of(*convert.hf_config.read_config(folder))
    factors = reader.read_adapter(os.path.join(folder, reader.ADAPTER_DIR), trim=False)
    r = formats.adapter_rank(sites)
    for s in sites:
      if s.rank:
        L, R = factors.get(formats.adapter_name(arch, s.hf), (None, None))
        if L is None:
          problems.append(f"adapter: no factors for {s.hf}")
          continue
        want_L, want_R = formats.padded(*formats.adapter_factors(s, dtype), r)
        _equal(f"adapter {s.hf} lora_A", L, want_L, problems)
        _equal(f"adapter {s.hf} lora_B", R, want_R, problems)
  if problems:
    raise ExportCheckError(f"self-check: the written tensors do not decode to the model ({len(problems)} problems): "
                           + "; ".join(problems[:5]))


def reference(model: nnx.Module, fmt: str, sites: list[formats.Site], dtype: str, lowrank: str,
              dense: dict[str, np.ndarray] | None = None) -> nnx.Module:
  """The float model (computing in float32) of exactly the numbers a reader of the folder computes with: the
  written tensors (`dense`: every tensor written, in memory) for dense; for ct, the other tensors rounded to
  `dtype` and each weight `s · (c − z)` with the stored scales, rounded to `dtype` as compressed-tensors'
  decompressor computes it (in the scale dtype); plus `L R` from the adapter's stored factors where peft adds
  them (`lowrank == "adapter"`)."""
  cfg = dataclasses.replace(model.config, dtype="float32", param_dtype="float32")
  if fmt == "dense":
    tensors = {k: v.astype(np.float32) for k, v in dense.items()}
  else:
    tensors = {k: formats.rounded(v, dtype)
               for k, v in convert.hf_tensors(model, skip=tuple(s.path for s in sites)).items()}
    for s in sites:
      site = dataclasses.replace(s, scales=formats.rounded(s.scales, dtype))
      tensors[f"{s.hf}.weight"] = formats.rounded(site.dequantized().T, dtype)
      if s.bias is not None:
        tensors[f"{s.hf}.bias"] = formats.rounded(s.bias, dtype)
  for s in sites:
    if lowrank == "adapter" and s.rank:
      L, R = formats.adapter_factors(s, dtype)
      tensors[f"{s.hf}.weight"] = tensors[f"{s.hf}.weight"] + (L @ R).T
  abstract = nnx.eval_shape(lambda: ARCHITECTURES[cfg.architecture].model_cls(cfg, rngs=nnx.Rngs(0)))
  return convert.fill_from_hf(abstract, tensors)


def inputs(model: nnx.Module) -> np.ndarray:
  """A few deterministic inputs: 2 × 16 token ids (LM) or 2 images."""
  rng = np.random.default_rng(0)
  cfg = model.config
  if model.config.architecture in llama.ARCHITECTURES:
    return rng.integers(0, cfg.vocab_size, size=(2, min(16, cfg.max_position_embeddings))).astype(np.int32)
  return rng.standard_normal((2, cfg.num_channels, cfg.image_size, cfg.image_size)).astype(np.float32)


def jax_logits(model: nnx.Module, x: np.ndarray) -> np.ndarray:
  from gilora_jax.models import deit  # pylint: disable=import-outside-toplevel
  fwd = llama.forward if model.config.architecture in llama.ARCHITECTURES else deit.forward
  return np.asarray(fwd(model, x), np.float32)


def torch_logits(folder: str, x: np.ndarray, lm: bool, adapter: str | None) -> tuple[np.ndarray, np.ndarray | None]:
  """(logits of the base, logits with the adapter applied) from transformers (+ peft) on CPU in float32."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  kwargs = {"dtype": torch.float32, "device_map": "cpu"}
  qc = convert.hf_config.read_config(folder)[0].get("quantization_config")
  if qc is not None:
    kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
  auto = transformers.AutoModelForCausalLM if lm else transformers.AutoModelForImageClassification
  bars = transformers.utils.logging.is_progress_bar_enabled()
  transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar is not the export's progress
  try:
    with warnings.catch_warnings():  # our dequantize=True overrides the folder's loading attributes, as meant
      warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
      model = auto.from_pretrained(folder, **kwargs).eval()
  finally:
    if bars:
      transformers.utils.logging.enable_progress_bar()
  feed = (lambda m: m(input_ids=torch.from_numpy(x).long()).logits) if lm else (
      lambda m: m(pixel_values=torch.from_numpy(x)).logits)
  with torch.no_grad():
    base = feed(model).float().numpy()
    if adapter is None:
      return base, None
    import peft  # pylint: disable=import-outside-toplevel
    return base, feed(peft.PeftModel.from_pretrained(model, adapter).eval()).float().numpy()


def reload(folder: str, fmt: str, model: nnx.Module, sites: list[formats.Site], dtype: str, lowrank: str,
           dense: dict[str, np.ndarray] | None) -> str:
  """Raises `ExportCheckError` unless transformers (+ peft) on the folder gives our logits (module docstring, 2);
  returns the line that says what was compared."""
  x = inputs(model)
  lm = model.config.architecture in llama.ARCHITECTURES
  adapter = os.path.join(folder, reader.ADAPTER_DIR) if lowrank == "adapter" and any(s.rank for s in sites) else None
  base, full = torch_logits(folder, x, lm, adapter)
  wanted = [("base", base, "none" if adapter else lowrank)] + ([("base + adapter", full, "adapter")] if adapter else [])
  return _compare(fmt, model, sites, dtype, dense, x, wanted, "transformers")


def _compare(fmt, model, sites, dtype, dense, x, wanted, reader_name: str) -> str:
  """Each (what, logits, lowrank) of `wanted` against our model holding the written values (`reference`)."""
  lines = []
  for what, got, lr in wanted:
    ref = jax_logits(reference(model, fmt, sites, dtype, lr, dense), x)
    ours = jax_logits(model if lr in ("adapter", "merge") else _without_lowrank(model), x)
    scale = max(1.0, float(np.abs(ref).max()))
    err, moved = float(np.abs(got - ref).max()), float(np.abs(ref - ours).max())
    if not np.isfinite(got).all() or err > RTOL * scale:
      raise ExportCheckError(
          f"self-check: {reader_name}{' + peft' if lr == 'adapter' else ''} on {fmt} logits ({what}) differ from our "
          f"model with the written values by {err:.3g} (tolerance {RTOL * scale:.3g} = {RTOL} × max|logit|: float32 "
          f"evaluation of the same {dtype} weights, scales and factors); the folder does not hold this model.")
    lines.append(f"{what}: max|Δ| {err:.2g} ≤ {RTOL * scale:.2g} vs our model as written; {dtype} rounding moves "
                 f"it {moved:.2g} from the unrounded one")
  return "; ".join(lines)


GPTQ_PYTHON_ENV = "GILORA_GPTQ_PYTHON"
GPTQ_ENV_HINT = ('python3 -m venv gptq-env && gptq-env/bin/pip install "gptqmodel==7.7.0" "optimum==2.3.0" '
                 '"peft~=0.21.2" transformers')


def gptq_reload(folder: str, model: nnx.Module, sites: list[formats.Site], dtype: str, lowrank: str,
                python: str, timeout_s: float = 1800.0) -> str:
  """The GPTQ reload (module docstring, 2) in another interpreter, `python`, of an environment with optimum +
  gptqmodel (`_gptq_child.py`; they need a newer torch than this environment's pin). Raises `ExportCheckError`
  unless its logits (and, where an adapter was written and that environment has peft, with the adapter) equal our
  model's with the written values; returns the line that says what was compared. gptqmodel compiles its CPU
  kernels on first use (about 2 minutes once, cached under ~/.cache/gptqmodel)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  x = inputs(model)
  child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_gptq_child.py")
  with tempfile.TemporaryDirectory(prefix="gilora_gptq_check_") as tmp:
    np.savez(os.path.join(tmp, "in.npz"), x=x)
    out = os.path.join(tmp, "out.npz")
    try:
      p = subprocess.run([python, child, folder, os.path.join(tmp, "in.npz"), out], capture_output=True, text=True,
                         timeout=timeout_s, check=False, env={**os.environ, "PYTHONNOUSERSITE": "1"})
    except OSError as e:
      raise ExportCheckError(f"self-check: the GPTQ reload interpreter {python!r} cannot be run ({e.strerror}); "
                             f"pass --gptq-python the python of an environment with gptqmodel ({GPTQ_ENV_HINT}).") from None
    except subprocess.TimeoutExpired:
      raise ExportCheckError(f"self-check: the GPTQ reload with {python} took over {timeout_s:.0f} s; rerun (gptqmodel "
                             f"compiles its CPU kernels once), or skip it (--no-check).") from None
    last = (p.stderr.strip().splitlines() or [""])[-1][:300]
    if p.returncode == 3:
      raise ExportCheckError(f"self-check: {python} lacks the GPTQ reload's packages ({last}); install them there: "
                             f"{GPTQ_ENV_HINT}.")
    if p.returncode:
      raise ExportCheckError(f"self-check: transformers + gptqmodel ({python}) could not load the GPTQ folder: {last}")
    with np.load(out) as z:
      got = {k: z[k] for k in z.files}
  info = json.loads(str(got["info"]))
  adapter = lowrank == "adapter" and any(s.rank for s in sites)
  wanted = [("base", got["base"], "none")]
  if adapter and "adapter" in got:
    wanted.append(("base + adapter", got["adapter"], "adapter"))
  line = _compare("gptq", model, sites, dtype, None, x, wanted,
                  f"transformers {info['transformers']} + gptqmodel {info['gptqmodel']}")
  kernels = "/".join(info["kernels"]) or "?"
  skipped = "; the adapter not applied (no peft there)" if adapter and "adapter" not in got else ""
  return f"gptq reload ({python}: torch {info['torch']}, gptqmodel {info['gptqmodel']}, {kernels}): {line}{skipped}"


def _without_lowrank(model: nnx.Module) -> nnx.Module:
  """A copy of `model` whose quantized linears keep only Q (what a base without its adapter computes)."""
  out = nn.clone(model)
  for path, module in list(nnx.iter_modules(out)):
    if isinstance(module, nn.QuantizedLinear) and module.rank:
      d_in, d_out = module.in_features, module.out_features
      codes = nn.unpack_codes(module.codes[...], module.grid.bits, d_in)
      nn.set_path(out, ".".join(str(p) for p in path), nn.QuantizedLinear(
          codes, module.scales[...], module.zeros[...], np.zeros((d_in, 0), np.float32),
          np.zeros((0, d_out), np.float32), grid=module.grid,
          bias=None if module.bias is None else module.bias[...], dtype=module.dtype))
  return out

