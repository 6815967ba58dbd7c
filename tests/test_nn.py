"""QuantizedLinear: packing, the forward against quantize_layer's Q + LR, abstract shapes, Param filtering."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gilora_jax as gj
from gilora_jax.nn import QuantCodes, QuantScale, QuantizedLinear, pack_codes, packed_rows, unpack_codes
from gilora_jax.quant.grid import GridSpec


@pytest.mark.parametrize("bits,d_in", [(2, 6), (3, 7), (4, 8), (5, 5), (8, 3)])
def test_pack_roundtrip(bits, d_in, rng):
  codes = rng.integers(0, 2**bits, size=(d_in, 5)).astype(np.uint8)
  packed = pack_codes(codes, bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (packed_rows(d_in, bits), 5)
  np.testing.assert_array_equal(np.asarray(unpack_codes(packed, bits, d_in)), codes)


def test_pack_layout_low_nibble_first():
  packed = pack_codes(np.array([[1], [2], [15]], np.uint8), 4)
  assert packed[:, 0].tolist() == [1 | 2 << 4, 15]


@pytest.mark.parametrize("method,group_size,bias", [("gptq+olrc", None, True), ("rtn", 16, False)])
def test_forward_matches_layer_result(method, group_size, bias, rng):
  d_in, d_out = 64, 64  # the pipeline tests' shape: quantize_layer compiles once for the folder
  X = rng.standard_normal((200, d_in)).astype(np.float32)
  W = (0.3 * rng.standard_normal((d_in, d_out))).astype(np.float32)
  res = gj.quantize_layer(W, X.T @ X, method=method, bits=3, rank=4, group_size=group_size)
  b = rng.standard_normal(d_out).astype(np.float32) if bias else None
  lin = QuantizedLinear.from_result(res, grid=GridSpec(bits=3, group_size=group_size), bias=b)
  np.testing.assert_array_equal(np.asarray(lin.dequantized()), np.asarray(res.Q))  # bit-exact storage
  x = rng.standard_normal((2, 3, d_in)).astype(np.float32)
  want = x @ (np.asarray(res.Q) + np.asarray(res.L) @ np.asarray(res.R)) + (0 if b is None else b)
  np.testing.assert_allclose(np.asarray(lin(x)), want, rtol=1e-5, atol=1e-5)
  assert lin.rank == (0 if method == "rtn" else 4)
  assert (lin.L is None) == (lin.R is None) == (method == "rtn")


def test_empty_matches_structure_and_param_filter(rng):
  grid = GridSpec(bits=4, group_size=8)
  full = QuantizedLinear(rng.integers(0, 16, (16, 10)), np.ones((2, 10)), np.zeros((2, 10)), np.zeros((16, 3)),
                         np.zeros((3, 10)), grid=grid, bias=np.zeros(10, np.float32))
  abstract = nnx.eval_shape(lambda: QuantizedLinear.from_spec(full.spec()))
  shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(nnx.state(m)))
  assert shapes(abstract) == shapes(full)
  assert nnx.graphdef(abstract) == nnx.graphdef(full)
  params = nnx.to_pure_dict(nnx.state(full, nnx.Param))
  assert set(params) == {"L", "R", "bias"}  # codes and grid parameters are frozen for QPEFT
  assert isinstance(full.codes, QuantCodes) and isinstance(full.scales, QuantScale)


def test_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="scales/zeros"):
    QuantizedLinear(np.zeros((8, 4), np.uint8), np.ones((2, 4)), np.zeros((2, 4)), np.zeros((8, 1)),
                    np.zeros((1, 4)), grid=GridSpec(bits=3))
