"""`QuantizedLinear`: a drop-in for a model's `nnx.Linear` that computes `x (Q + L R) + b`.

Storage (all in `nnx.Variable`s, so `nnx.state`/orbax see every array):

  codes   QuantCodes uint8   packed codes: two 4-bit codes per byte when bits <= 4 (rows 2k, 2k + 1 of the
                             (d_in, d_out) code matrix share byte k: low nibble = row 2k), else one code per byte
  scales  QuantScale (G, d_out) float32 ┐ the grid: Q = scales[g(t)] · (codes[t] − zeros[g(t)]) (quant.grid)
  zeros   QuantScale (G, d_out) float32 ┘
  L       nnx.Param (d_in, r)     ┐ the low-rank term, trainable by nnx.Param filters (QPEFT); None when r = 0
  R       nnx.Param (r, d_out)    ┘ (rtn, gptq): orbax cannot store zero-size arrays
  bias    nnx.Param (d_out,)      only when the float linear had one

`QuantCodes` and `QuantScale` are not `nnx.Param`, so `nnx.state(model, nnx.Param)` (an optimizer's view)
holds only L, R, biases and the float parts of the model. The grid description (`GridSpec`: bits, group size,
symmetric, ...) is a frozen dataclass attribute, static under `jit`.

The forward dequantizes Q on the fly and never forms L R: `x Q + (x L) R` costs d_in·d_out + r·(d_in + d_out)
multiply-adds per token.
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant.grid import Grid, GridSpec


class QuantCodes(nnx.Variable):
  """Packed integer codes of a quantized weight (not an `nnx.Param`: optimizers never see them)."""


class QuantScale(nnx.Variable):
  """Per-group scales and zero points of a quantized weight (frozen, like the codes)."""


def packed_rows(d_in: int, bits: int) -> int:
  """Rows of the packed code matrix: ceil(d_in / 2) when two codes share a byte (bits <= 4), else d_in."""
  return (d_in + 1) // 2 if bits <= 4 else d_in


def pack_codes(codes: jax.typing.ArrayLike, bits: int) -> jax.Array:
  """(d_in, d_out) codes in [0, 2**bits) -> (packed_rows(d_in, bits), d_out) uint8.

  bits <= 4: byte k = codes[2k] | codes[2k + 1] << 4 (an odd d_in is padded with a zero row).
  """
  codes = jnp.asarray(codes, jnp.uint8)
  if bits > 4:
    return codes
  if codes.shape[0] % 2:
    codes = jnp.concatenate([codes, jnp.zeros((1, codes.shape[1]), jnp.uint8)], axis=0)
  pairs = codes.reshape(codes.shape[0] // 2, 2, codes.shape[1])  # (d_in/2, 2, d_out)
  return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_codes(packed: jax.Array, bits: int, d_in: int) -> jax.Array:
  """Inverse of `pack_codes`: (d_in, d_out) uint8."""
  if bits > 4:
    return packed
  lo, hi = packed & 0x0F, packed >> 4
  return jnp.stack([lo, hi], axis=1).reshape(-1, packed.shape[1])[:d_in]  # (d_in/2, 2, d_out) -> (d_in, d_out)


class QuantizedLinear(nnx.Module):
  """`y = x (Q + L R) + b` with Q stored as packed b-bit codes; same call signature as `nnx.Linear`.

  Build it from a `gilora_jax.quantize_layer` result with `from_result`, or with zero arrays of the right shapes
  with `empty` (for `nnx.eval_shape` when restoring a checkpoint).
  """

  def __init__(self, codes: jax.typing.ArrayLike, scales: jax.typing.ArrayLike, zeros: jax.typing.ArrayLike,
               L: jax.typing.ArrayLike, R: jax.typing.ArrayLike, *, grid: GridSpec,
               bias: jax.typing.ArrayLike | None = None, dtype: str = "float32"):
    """codes (d_in, d_out) unpacked integer codes; scales, zeros (G, d_out); L (d_in, r); R (r, d_out)."""
    codes = jnp.asarray(codes)
    d_in, d_out = codes.shape
    if jnp.shape(scales) != (grid.num_groups(d_in), d_out) or jnp.shape(zeros) != jnp.shape(scales):
      raise ValueError(f"scales/zeros must be ({grid.num_groups(d_in)}, {d_out}) for a {d_in}×{d_out} weight with "
                       f"{grid}; got {jnp.shape(scales)} and {jnp.shape(zeros)}.")
    if jnp.shape(L)[0] != d_in or jnp.shape(R)[1] != d_out or jnp.shape(L)[1] != jnp.shape(R)[0]:
      raise ValueError(f"L {jnp.shape(L)} and R {jnp.shape(R)} do not factor a {d_in}×{d_out} weight.")
    self.grid = grid
    self.in_features, self.out_features, self.rank = d_in, d_out, int(jnp.shape(L)[1])
    self.dtype = dtype
    self.codes = QuantCodes(pack_codes(codes, grid.bits))
    self.scales = QuantScale(jnp.asarray(scales, jnp.float32))
    self.zeros = QuantScale(jnp.asarray(zeros, jnp.float32))
    self.L = nnx.Param(jnp.asarray(L, jnp.float32)) if self.rank else None
    self.R = nnx.Param(jnp.asarray(R, jnp.float32)) if self.rank else None
    self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))

  @classmethod
  def from_result(cls, result, *, grid: GridSpec, bias: jax.typing.ArrayLike | None = None,
                  dtype: str = "float32") -> QuantizedLinear:
    """From a `gilora_jax.LayerResult` (codes, scales, zeros, L, R) on the grid `grid` it was quantized with."""
    return cls(result.codes, result.scales, result.zeros, result.L, result.R, grid=grid, bias=bias, dtype=dtype)

  @classmethod
  def empty(cls, d_in: int, d_out: int, *, grid: GridSpec, rank: int, use_bias: bool = False,
            bias_dtype: str = "float32", dtype: str = "float32") -> QuantizedLinear:
    """All-zero arrays of the right shapes and dtypes: the abstract layer that a checkpoint restores into."""
    g = grid.num_groups(d_in)
    return cls(jnp.zeros((d_in, d_out), jnp.uint8), jnp.ones((g, d_out), jnp.float32),
               jnp.zeros((g, d_out), jnp.float32), jnp.zeros((d_in, rank), jnp.float32),
               jnp.zeros((rank, d_out), jnp.float32), grid=grid,
               bias=jnp.zeros((d_out,), bias_dtype) if use_bias else None, dtype=dtype)

  def dequantized(self) -> jax.Array:
    """Q (d_in, d_out) float32, exactly `quantize_layer`'s `LayerResult.Q`."""
    codes = unpack_codes(self.codes[...], self.grid.bits, self.in_features)
    return grid_lib.dequantize(codes, Grid(self.scales[...], self.zeros[...]), self.grid)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (..., d_in) -> (..., d_out), in `self.dtype` (like `nnx.Linear(dtype=...)`)."""
    x = x.astype(self.dtype)
    y = jnp.matmul(x, self.dequantized().astype(self.dtype))
    if self.rank:
      y = y + jnp.matmul(jnp.matmul(x, self.L[...].astype(self.dtype)), self.R[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
    return y

  def spec(self) -> dict:
    """JSON description of this layer's shapes and grid: what `empty` needs to rebuild it (see ckpt.py)."""
    return {"d_in": self.in_features, "d_out": self.out_features, "rank": self.rank,
            "use_bias": self.bias is not None,
            "bias_dtype": None if self.bias is None else str(np.dtype(self.bias.get_value().dtype)), "dtype": self.dtype,
            "grid": {"bits": self.grid.bits, "group_size": self.grid.group_size, "symmetric": self.grid.symmetric,
                     "shrink": self.grid.shrink, "mse": self.grid.mse}}

  @classmethod
  def from_spec(cls, spec: dict) -> QuantizedLinear:
    """`empty(...)` from a `spec()` dict."""
    return cls.empty(spec["d_in"], spec["d_out"], grid=GridSpec(**spec["grid"]), rank=spec["rank"],
                     use_bias=spec["use_bias"], bias_dtype=spec["bias_dtype"] or "float32", dtype=spec["dtype"])


# ------------------------------------------------------------------------------------------------ model surgery


def get_path(module: Any, path: str) -> Any:
  """`module.a.b.0.c` by a dotted path (integers index `nnx.List`s)."""
  for part in path.split("."):
    module = module[int(part)] if part.isdigit() else getattr(module, part)
  return module


def set_path(module: Any, path: str, value: Any) -> None:
  """Assigns `value` at a dotted path (the NNX surgery idiom: the parent's attribute is replaced)."""
  parent, _, name = path.rpartition(".")
  parent = get_path(module, parent) if parent else module
  if name.isdigit():
    parent[int(name)] = value
  else:
    setattr(parent, name, value)


def clone(model: nnx.Module) -> nnx.Module:
  """A structurally independent copy (arrays are immutable and shared), so surgery leaves `model` untouched."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, state, copy=True)


def quantized_specs(model: nnx.Module) -> dict[str, dict]:
  """{module path: QuantizedLinear.spec()} for every quantized linear of `model` (what ckpt needs to rebuild it)."""
  out = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, QuantizedLinear):
      out[".".join(str(p) for p in path)] = module.spec()
  return out
