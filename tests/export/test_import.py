"""`gj.load_model` on folders written by the formats' own libraries (not by us): compressed-tensors' compressor, and
GPTQModel itself; so that the reader is checked against the formats' authors rather than against our writer."""
import os

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import gilora_jax as gj
from gilora_jax import nn
from gilora_jax.models import qwen3

from .conftest import EXPORT_LM_CONFIG as LM_CONFIG  # non-square: k/v 64→32, MLP 64→96→64


def _ct_quantized_folder(folder, symmetric, bits, group_size):
  """A tiny random torch Qwen3 quantized by compressed-tensors: its QuantizationConfig applied, each target's
  scale and zero point set by its calculate_qparams from the weight's min/max, then ModelCompressor's
  compress_model, save_pretrained and update_config, the way llm-compressor saves."""
  from compressed_tensors.compressors import ModelCompressor  # pylint: disable=import-outside-toplevel
  from compressed_tensors.quantization import (  # pylint: disable=import-outside-toplevel
      QuantizationConfig, QuantizationStatus, apply_quantization_config)
  from compressed_tensors.quantization.utils import calculate_qparams  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cfg = transformers.Qwen3Config(**{k: v for k, v in qwen3.ModelConfig(**LM_CONFIG).to_hf_config().items()
                                    if k not in ("architectures", "model_type")})
  model = transformers.Qwen3ForCausalLM(cfg).eval()
  weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
             "strategy": "group" if group_size else "channel"}
  qcfg = QuantizationConfig(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                            ignore=["lm_head"], format="pack-quantized")
  apply_quantization_config(model, qcfg)
  for name, module in model.named_modules():
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None:
      continue
    w = module.weight.detach()  # (d_out, d_in)
    g = group_size or w.shape[1]
    wg = w.reshape(w.shape[0], -1, g)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), scheme.weights)
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
    if hasattr(module, "weight_zero_point"):
      module.weight_zero_point.data.copy_(zp.reshape(module.weight_zero_point.shape))
    module.quantization_status = QuantizationStatus.FROZEN
  compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
  compressor.compress_model(model)
  model.save_pretrained(folder)
  compressor.update_config(folder)
  return folder


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("symmetric,bits,group_size", [(False, 4, 32), (True, 3, None)])
def test_a_folder_from_the_compressed_tensors_compressor_loads_into_quantized_linears(tmp_path, symmetric, bits,
                                                                                     group_size):
  folder = _ct_quantized_folder(str(tmp_path / "ct"), symmetric, bits, group_size)
  ours = gj.load_model(folder)
  q = ours.layers[0].self_attn.q_proj
  assert isinstance(q, nn.QuantizedLinear) and q.grid.bits == bits and q.grid.symmetric == symmetric
  assert q.grid.group_size == group_size and q.rank == 0
  # compressed-tensors' own decompression (through transformers, dequantize=True) gives our Q, layer by layer ...
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
  for i, layer in enumerate(theirs.model.layers):
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
      W = nn.get_path(layer, name).weight.detach().numpy().T
      np.testing.assert_allclose(np.asarray(nn.get_path(ours, f"layers.{i}.{name}").dequantized()), W, rtol=0,
                                 atol=1e-7)
  # ... and the same logits.
  ids = np.random.default_rng(0).integers(0, LM_CONFIG["vocab_size"], size=(2, 12))
  with torch.no_grad():
    ref = theirs(input_ids=torch.from_numpy(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(qwen3.forward(ours, ids.astype(np.int32))), ref, atol=1e-4)


GPTQMODEL_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gptqmodel-w4g32")


def test_a_folder_gptqmodel_quantized_and_saved_loads_to_its_own_weights():
  """tests/export/data/gptqmodel-w4g32 was quantized and saved by GPTQModel 7.7 (its v1 zeros, fp16 scales, bf16
  other weights, `make_gptqmodel_fixture.py`), and reference.npz holds what transformers + gptqmodel make of it.
  Every linear we read dequantizes to GPTQModel's own `dequantize_weight()` bit for bit once rounded to float16,
  the precision its kernel dequantizes in (we keep float32); the logits agree up to that rounding."""
  ref = np.load(os.path.join(GPTQMODEL_FOLDER, "reference.npz"))
  model = gj.load_model(GPTQMODEL_FOLDER)
  layers = {".".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, nn.QuantizedLinear)}
  names = sorted(k[len("weight/model."):] for k in ref.files if k.startswith("weight/"))
  assert sorted(layers) == names and len(names) == 14
  for name in names:
    W = np.asarray(layers[name].dequantized())
    np.testing.assert_array_equal(W.astype(np.float16), ref[f"weight/model.{name}"], err_msg=name)
    assert layers[name].grid.bits == 4 and layers[name].grid.group_size == 32 and layers[name].grid.symmetric
  logits = np.asarray(qwen3.forward(model, ref["x"]))
  scale = float(np.abs(ref["logits"]).max())
  assert float(np.abs(logits - ref["logits"]).max()) < 2e-3 * scale
