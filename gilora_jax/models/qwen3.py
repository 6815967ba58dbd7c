"""Dense Qwen3 causal LM in Flax NNX, numerically matching `transformers`' `Qwen3ForCausalLM`.

One file, bonsai style: `ModelConfig` (frozen, with presets), the modules, `QUANT_SITES`, a jitted `forward`,
then greedy generation with a fixed-size KV cache.

Architecture: pre-norm decoder, `x += attn(rms(x)); x += mlp(rms(x))`; GQA attention with an RMSNorm over
`head_dim` on q and k (before RoPE, "rotate_half" convention, theta from the config); SwiGLU MLP; final RMSNorm,
then an lm head that is either its own matrix or the transposed token embedding (tied).

Every projection is a 2-D `nnx.Linear` with kernel `(d_in, d_out)`; heads are split by a reshape afterwards, so
each quantizable weight is a plain matrix. Submodule names follow the HF checkpoint
(`layers[i].self_attn.q_proj`, `layers[i].mlp.down_proj`, ...).

Calibration without hooks. The model exposes three steps, and every block returns the inputs of its linears:

  x = model.embed(input_ids)                     # (B, T) int32 -> (B, T, D) in cfg.dtype
  for block in model.layers:                     # an nnx.List of DecoderLayer
    x, taps = block(x)                           # or block(x, positions, mask); see DecoderLayer.__call__
  logits = model.head(x)                         # final norm + lm head -> (B, T, V)

`block(x, positions=None, mask=None) -> (x, taps)`: `positions` (B, T) int32 defaults to `arange(T)` and
`mask` (B, T, T) bool (True = may attend) defaults to causal. `taps` maps each key of `QUANT_SITES` to the
array that the named linears read, shaped (B, T, d_in).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ARCHITECTURE = "Qwen3ForCausalLM"

# Which linears (paths relative to a DecoderLayer) read which tapped input. Linears that share an input share one
# Hessian, so each input site is computed once.
QUANT_SITES = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_in": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "down_in": ("mlp.down_proj",),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyper-parameters of a dense Qwen3 model.

  `dtype` is the activation/compute dtype, `param_dtype` the storage dtype of the weights (both numpy dtype
  names, "float32" or "bfloat16", so the config stays hashable and JSON-serialisable).
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 40960
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{name} must be 'float32', 'bfloat16' or 'float16', got {getattr(self, name)!r}")

  @property
  def architecture(self) -> str:
    return ARCHITECTURE

  # Official dense sizes (Qwen/Qwen3-*/config.json). Every one has vocab 151936, theta 1e6, eps 1e-6, head_dim 128.
  @classmethod
  def _official(cls, layers, hidden, mlp, heads, kv_heads, tied, **kw) -> ModelConfig:
    return cls(vocab_size=151936, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
               bos_token_id=151643, eos_token_id=(151645,), **kw)

  @classmethod
  def qwen3_0_6b(cls, **kw) -> ModelConfig:
    return cls._official(28, 1024, 3072, 16, 8, True, **kw)

  @classmethod
  def qwen3_1_7b(cls, **kw) -> ModelConfig:
    return cls._official(28, 2048, 6144, 16, 8, True, **kw)

  @classmethod
  def qwen3_4b(cls, **kw) -> ModelConfig:
    return cls._official(36, 2560, 9728, 32, 8, True, **kw)

  @classmethod
  def qwen3_8b(cls, **kw) -> ModelConfig:
    return cls._official(36, 4096, 12288, 32, 8, False, **kw)

  @classmethod
  def qwen3_14b(cls, **kw) -> ModelConfig:
    return cls._official(40, 5120, 17408, 40, 8, False, **kw)

  @classmethod
  def qwen3_32b(cls, **kw) -> ModelConfig:
    return cls._official(64, 5120, 25600, 64, 8, False, **kw)

  @classmethod
  def from_hf_config(cls, path_or_dict: str | os.PathLike | dict[str, Any], *, dtype: str = "float32",
                     param_dtype: str | None = None) -> ModelConfig:
    """Reads a HF Qwen3 `config.json` (a folder, the file itself, or the parsed dict).

    Accepts both the transformers 4.x layout (top-level `rope_theta`) and the 5.x one (`rope_parameters`).
    `dtype`/`param_dtype` choose the JAX dtypes (default float32 for both, whatever the checkpoint stores).
    """
    hf, where = _read_config(path_or_dict)
    if hf.get("model_type") != "qwen3":
      raise ValueError(f"{where} is a {hf.get('model_type')!r} config (architectures {hf.get('architectures')}), "
                       f"not a dense Qwen3 ('qwen3'); pass the folder of a Qwen3ForCausalLM checkpoint.")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (only the default RoPE).")
    theta = rope.get("rope_theta") or hf.get("rope_theta")
    if theta is None:
      raise ValueError(f"{where}: no rope_theta (looked in rope_parameters.rope_theta and rope_theta).")
    if hf.get("use_sliding_window"):
      raise ValueError(f"{where}: use_sliding_window=true is not supported.")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (Qwen3 uses 'silu').")
    eos = hf.get("eos_token_id")
    heads = hf["num_attention_heads"]
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 40960), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=() if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
        pad_token_id=hf.get("pad_token_id"), dtype=dtype, param_dtype=param_dtype or dtype)

  def to_hf_config(self) -> dict[str, Any]:
    """The `config.json` dict that `transformers.Qwen3ForCausalLM` loads."""
    eos = self.eos_token_id
    return {
        "architectures": [ARCHITECTURE], "model_type": "qwen3", "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim, "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps, "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
        "max_position_embeddings": self.max_position_embeddings, "use_sliding_window": False,
        "bos_token_id": self.bos_token_id, "eos_token_id": (list(eos) if len(eos) > 1 else eos[0]) if eos else None,
        "pad_token_id": self.pad_token_id, "dtype": self.param_dtype,
    }


def _read_config(path_or_dict) -> tuple[dict[str, Any], str]:
  """(config dict, a description of where it came from for error messages)."""
  if isinstance(path_or_dict, dict):
    return path_or_dict, "the given config dict"
  path = os.path.join(path_or_dict, "config.json") if os.path.isdir(path_or_dict) else os.fspath(path_or_dict)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f), path
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path} not found: pass a local HF model folder that holds config.json.") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); restore the file from the original checkpoint.") from e


def _bcast_last(v: jax.Array, ndim: int) -> jax.Array:
  """(F,) -> (1, ..., 1, F) with `ndim` dims, for explicit broadcasting under rank_promotion='raise'."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


class RMSNorm(nnx.Module):
  """HF Qwen3RMSNorm: normalise in float32, cast back to the input dtype, then multiply by `scale`."""

  def __init__(self, dim: int, *, eps: float, param_dtype: str):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return _bcast_last(self.scale[...].astype(x.dtype), x.ndim) * y.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF "rotate_half" (non-interleaved) layout. x (B, T, N, H), positions (B, T) int."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))  # (H/2,)
  freqs = positions[..., None].astype(jnp.float32) * inv_freq[None, None, :]  # (B, T, H/2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # (B, T, 1, H)
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class LayerCache(NamedTuple):
  """Keys and values of one layer for every cache slot: (B, S, K, H) each, S = max sequence length."""
  k: jax.Array
  v: jax.Array


class Attention(nnx.Module):
  """GQA self-attention with per-head q/k RMSNorm and RoPE; optional fixed-size KV cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    linear = functools.partial(nnx.Linear, use_bias=cfg.attention_bias, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, rngs=rngs)
    self.q_proj = linear(d, h * hd)
    self.k_proj = linear(d, k * hd)
    self.v_proj = linear(d, k * hd)
    self.o_proj = linear(h * hd, d)
    self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta = h, k, hd, cfg.rope_theta

  @jax.named_scope("attention")
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: LayerCache | None = None,
               slot: jax.Array | int = 0) -> tuple[jax.Array, jax.Array, LayerCache | None]:
    """x (B, T, D); positions (B, T); mask (B, T, S) bool, True where query t may attend to key s.

    Without a cache the keys are this call's T tokens (S = T). With a cache, this call's keys and values are
    written at slots [slot, slot + T) and the queries attend over all S cache slots.
    Returns (output (B, T, D), o_proj input (B, T, N*H), updated cache or None).
    """
    b, t, _ = x.shape
    n, k, hd = self.num_heads, self.num_kv_heads, self.head_dim
    q = self.q_norm(self.q_proj(x).reshape(b, t, n, hd))  # (B, T, N*H) -> (B, T, N, H)
    key = self.k_norm(self.k_proj(x).reshape(b, t, k, hd))  # (B, T, K*H) -> (B, T, K, H)
    value = self.v_proj(x).reshape(b, t, k, hd)  # (B, T, K*H) -> (B, T, K, H)
    q, key = apply_rope(q, positions, self.rope_theta), apply_rope(key, positions, self.rope_theta)
    if cache is not None:
      start = (0, slot, 0, 0)
      cache = LayerCache(jax.lax.dynamic_update_slice(cache.k, key.astype(cache.k.dtype), start),
                         jax.lax.dynamic_update_slice(cache.v, value.astype(cache.v.dtype), start))
      key, value = cache.k.astype(x.dtype), cache.v.astype(x.dtype)
    # Query head j reads kv head j // G (HF repeat_kv), so split N as (K, G).
    q = q.reshape(b, t, k, n // k, hd)  # (B, T, N, H) -> (B, T, K, G, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, key) * jnp.asarray(hd ** -0.5, x.dtype)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    o_in = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value).reshape(b, t, n * hd)  # (B, T, K, G, H) -> (B, T, N*H)
    return self.o_proj(o_in), o_in, cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
    self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size)

  @jax.named_scope("mlp")
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, T, D) -> (output (B, T, D), down_proj input (B, T, F))."""
    down_in = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(down_in), down_in


def causal_mask(batch: int, length: int) -> jax.Array:
  """(B, T, T) bool, True on and below the diagonal."""
  return jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool))[None], (batch, length, length))


class DecoderLayer(nnx.Module):
  """Pre-norm decoder block; `__call__` returns `(x, taps)` for calibration, `decode` runs against a KV cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.mlp = MLP(cfg, rngs=rngs)

  def _apply(self, x, positions, mask, cache, slot):
    attn_in = self.input_layernorm(x)
    attn_out, o_in, cache = self.self_attn(attn_in, positions, mask, cache, slot)
    x = x + attn_out
    mlp_in = self.post_attention_layernorm(x)
    mlp_out, down_in = self.mlp(mlp_in)
    taps = {"attn_in": attn_in, "o_in": o_in, "mlp_in": mlp_in, "down_in": down_in}
    return x + mlp_out, taps, cache

  def __call__(self, x: jax.Array, positions: jax.Array | None = None,
               mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x (B, T, D) -> (x (B, T, D), taps); positions (B, T) default arange(T); mask (B, T, T) default causal."""
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t)) if positions is None else positions
    mask = causal_mask(b, t) if mask is None else mask
    x, taps, _ = self._apply(x, positions, mask, None, 0)
    return x, taps

  def decode(self, x: jax.Array, positions: jax.Array, mask: jax.Array, cache: LayerCache,
             slot: jax.Array | int) -> tuple[jax.Array, LayerCache]:
    """x (B, T, D) written at cache slots [slot, slot + T); mask (B, T, S) over all S slots."""
    x, _, cache = self._apply(x, positions, mask, cache, slot)
    return x, cache


class Qwen3(nnx.Module):
  """Qwen3ForCausalLM. `model(input_ids)` maps int32 (B, T) to logits (B, T, V) in `cfg.dtype`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.lm_head = None if cfg.tie_word_embeddings else nnx.Linear(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(B, T) int32 -> (B, T, D)."""
    return self.embed_tokens(input_ids)

  def head(self, x: jax.Array) -> jax.Array:
    """Final norm + lm head: (B, T, D) -> logits (B, T, V). Tied: logits = h @ Eᵀ."""
    x = self.norm(x)
    return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """input_ids (B, T) -> logits (B, T, V); positions/mask as in `DecoderLayer.__call__`."""
    x = self.embed(input_ids)
    for layer in self.layers:
      x, _ = layer(x, positions, mask)
    return self.head(x)

  def decode(self, input_ids: jax.Array, positions: jax.Array, mask: jax.Array, cache: Sequence[LayerCache],
             slot: jax.Array | int) -> tuple[jax.Array, tuple[LayerCache, ...]]:
    """Runs T new tokens against the cache (prefill: T = prompt length, slot 0; decode: T = 1).

    input_ids, positions (B, T); mask (B, T, S) bool; returns (logits (B, T, V), updated cache).
    """
    x = self.embed(input_ids)
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache):
      x, layer_cache = layer.decode(x, positions, mask, layer_cache, slot)
      new_cache.append(layer_cache)
    return self.head(x), tuple(new_cache)


@jax.jit
def forward(model: Qwen3, input_ids: jax.Array) -> jax.Array:
  """Jitted `model(input_ids)`: (B, T) int32 -> logits (B, T, V)."""
  return model(input_ids)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> tuple[LayerCache, ...]:
  """An all-zero KV cache with `max_len` slots per layer, in the compute dtype."""
  shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
  return tuple(LayerCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
               for _ in range(cfg.num_hidden_layers))


@jax.jit
def _prefill(model: Qwen3, input_ids, attention_mask, cache):
  """Fills slots [0, T) from the (left-padded) prompt; returns (next-token logits (B, V), cache, key_valid, pos)."""
  b, t = input_ids.shape
  s = cache[0].k.shape[1]
  valid = attention_mask.astype(bool)
  positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)  # as HF for left padding
  key_valid = jnp.pad(valid, ((0, 0), (0, s - t)))  # (B, S): prompt slots that are real tokens
  causal = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]  # (T, S)
  mask = causal[None] & key_valid[:, None, :]
  logits, cache = model.decode(input_ids, positions, mask, cache, 0)
  return logits[:, -1], cache, key_valid, positions[:, -1]


@jax.jit
def _decode_step(model: Qwen3, token, position, slot, key_valid, cache):
  """One token per row at cache slot `slot` (traced, so this compiles once per cache shape)."""
  s = cache[0].k.shape[1]
  key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((key_valid.shape[0], 1), bool), (0, slot))
  mask = ((jnp.arange(s) <= slot)[None, :] & key_valid)[:, None, :]  # (B, 1, S)
  logits, cache = model.decode(token[:, None], position[:, None], mask, cache, slot)
  return logits[:, -1], cache, key_valid


def greedy_generate(model: Qwen3, input_ids: jax.typing.ArrayLike, max_new_tokens: int, *,
                    attention_mask: jax.typing.ArrayLike | None = None, eos_token_id: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None) -> np.ndarray:
  """Greedy decoding with a fixed-size KV cache, token for token equal to HF `generate(do_sample=False)`.

  input_ids (B, T) int, left-padded when rows differ in length (then pass `attention_mask` (B, T), 1 = token).
  Stops after `max_new_tokens` or once every row has produced an EOS; rows that finished early are filled with
  `pad_token_id` (default: the first EOS id), as transformers does. EOS ids default to `model.config`'s.
  Returns (B, T + n_new) int32 numpy: the prompt followed by the generated tokens.
  The prefill compiles once per prompt shape and the decode step once per cache shape (B, T + max_new_tokens).
  """
  cfg = model.config
  input_ids = jnp.asarray(input_ids, jnp.int32)
  b, t = input_ids.shape
  attention_mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  eos = cfg.eos_token_id if eos_token_id is None else (
      (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
  pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id if cfg.pad_token_id is not None else (
      eos[0] if eos else 0)
  eos_ids = jnp.asarray(eos, jnp.int32)
  if max_new_tokens <= 0:
    return np.asarray(input_ids)

  cache = init_cache(cfg, b, t + max_new_tokens)
  logits, cache, key_valid, position = _prefill(model, input_ids, attention_mask, cache)
  finished = jnp.zeros((b,), bool)
  out = []
  for i in range(max_new_tokens):
    if i:
      position = position + 1
      logits, cache, key_valid = _decode_step(model, token, position, jnp.int32(t + i - 1), key_valid, cache)
    token = jnp.where(finished, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    out.append(token)
    finished = finished | jnp.isin(token, eos_ids)
    if eos and bool(finished.all()):
      break
  return np.asarray(jnp.concatenate([input_ids, jnp.stack(out, axis=1)], axis=1))


def generate(model: Qwen3, tokenizer, prompt: str, max_new_tokens: int) -> str:
  """Prompt in, text out: tokenizes `prompt`, decodes greedily, returns only the new text (specials skipped).

  `tokenizer` is a transformers tokenizer, e.g. `AutoTokenizer.from_pretrained(local_folder)`.
  """
  ids = np.asarray(tokenizer(prompt, return_tensors="np")["input_ids"], np.int32)
  eos = model.config.eos_token_id or (() if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,))
  pad = tokenizer.pad_token_id if model.config.pad_token_id is None else model.config.pad_token_id
  tokens = greedy_generate(model, ids, max_new_tokens, eos_token_id=eos, pad_token_id=pad)
  return tokenizer.decode(tokens[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
