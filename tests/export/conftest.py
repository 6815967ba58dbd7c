"""Tiny quantized Qwen3 and DeiT models for the export tests, built by surgery with random grids (no quantization
run: the formats care about codes, scales, zeros and factors, not how they were found)."""
import numpy as np
import pytest

from gilora_jax import nn
from gilora_jax.models import deit, quant_sites, qwen3
from gilora_jax.quant.grid import GridSpec
from tests.pipeline.tiny import LM_CONFIG, VIT_CONFIG, random_model


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


def tiny_lm(**kw):
  return quantize_randomly(random_model(qwen3.Qwen3, qwen3.ModelConfig(**LM_CONFIG), seed=1), **kw)


def tiny_vit(**kw):
  return quantize_randomly(random_model(deit.DeiT, deit.ModelConfig(**VIT_CONFIG), seed=2), **kw)


@pytest.fixture(scope="module")
def qlm():
  """A tiny Qwen3 quantized at 4 bits, asymmetric, groups of 32, rank 4."""
  return tiny_lm()


@pytest.fixture(scope="module")
def qvit():
  """A tiny DeiT quantized at 3 bits, symmetric, per-channel, rank 4."""
  return tiny_vit(bits=3, group_size=None, symmetric=True)
