"""Tiny quantized Qwen3 and DeiT models for the export tests, built by surgery with random grids (no quantization
run: the formats care about codes, scales, zeros and factors, not how they were found).

The models are not square: tests/pipeline/tiny.py's configs make every linear 64×64 (so the pipeline's jitted
stages compile once), which would let a swapped (d_in, d_out) anywhere in a format (weight_shape, the reader's
shapes, GPTQ's packed axes) pass unnoticed. Here the MLPs are 64→96→64 and Qwen3's k/v are 64→32 (2 KV heads).
"""
import os

import numpy as np
import pytest

from gilora_jax import config, nn
from gilora_jax.models import deit, quant_sites, qwen3
from gilora_jax.pipeline import ckpt, run
from gilora_jax.quant.grid import GridSpec
from tests.pipeline.tiny import LM_CONFIG, VIT_CONFIG, random_model

# Run by the GPTQ reload environment's python, not by the suite (it imports gptqmodel): not a module to collect.
collect_ignore = ["data/make_gptqmodel_fixture.py"]


def quantize_randomly(model, *, bits=4, group_size=32, symmetric=False, rank=4, seed=0, ranks=None):
  """`model` with every QUANT_SITES linear replaced by a QuantizedLinear holding random codes, a plausible grid
  (scales ~ 0.02, integer zeros over the whole range, 0 included), factors of rank `rank` (or `ranks[path]`) and
  the float linear's bias."""
  rng = np.random.default_rng(seed)
  grid = GridSpec(bits=bits, group_size=group_size, symmetric=symmetric)
  maxq = 2**bits - 1
  for i in range(len(model.layers)):
    for paths in quant_sites(model).values():
      for p in paths:
        path = f"layers.{i}.{p}"
        lin = nn.get_path(model, path)
        d_in, d_out = lin.in_features, lin.out_features
        g = grid.num_groups(d_in)
        r = rank if ranks is None else ranks.get(path, rank)
        zeros = np.full((g, d_out), 2.0**(bits - 1)) if symmetric else rng.integers(0, maxq + 1, (g, d_out))
        nn.set_path(model, path, nn.QuantizedLinear(
            rng.integers(0, maxq + 1, (d_in, d_out)).astype(np.uint8),
            (0.02 * (1 + rng.random((g, d_out)))).astype(np.float32), zeros.astype(np.float32),
            (0.3 * rng.standard_normal((d_in, r))).astype(np.float32),
            (0.01 * rng.standard_normal((r, d_out))).astype(np.float32), grid=grid,
            bias=None if lin.bias is None else lin.bias[...]))
  return model


# Non-square variants of the pipeline's tiny configs (which stay as they are: other tests pin figures on them).
EXPORT_LM_CONFIG = {**LM_CONFIG, "intermediate_size": 96, "num_key_value_heads": 2}  # k/v 64→32, MLP 64→96→64
EXPORT_VIT_CONFIG = {**VIT_CONFIG, "intermediate_size": 96}  # intermediate 64→96, output 96→64


def tiny_lm(**kw):
  return quantize_randomly(random_model(qwen3.Qwen3, qwen3.ModelConfig(**EXPORT_LM_CONFIG), seed=1), **kw)


def tiny_vit(**kw):
  return quantize_randomly(random_model(deit.DeiT, deit.ModelConfig(**EXPORT_VIT_CONFIG), seed=2), **kw)


def save_checkpoint(model, path, source=None):
  """`model` saved as `gilora quantize` leaves it (the source's side files and `meta["source"]`), without a run."""
  side = {} if source is None else {n: os.path.join(source, n) for n in run.SIDE_FILES
                                    if os.path.isfile(os.path.join(source, n))}
  quant = {"config": config.QuantConfig().to_json(), "blocks_done": 2, "num_blocks": 2}
  ckpt.save_quantized(str(path), model, quant, [], files=side, extra_meta={} if source is None else {"source": source})
  return str(path)


@pytest.fixture(scope="module")
def qlm():
  """A tiny Qwen3 quantized at 4 bits, asymmetric, groups of 32, rank 4."""
  return tiny_lm()


@pytest.fixture(scope="module")
def qvit():
  """A tiny DeiT quantized at 3 bits, symmetric, per-channel, rank 4."""
  return tiny_vit(bits=3, group_size=None, symmetric=True)
