"""The Llama family of dense causal LMs in Flax NNX: Llama, Qwen2, Mistral and Qwen3, numerically matching
`transformers`' `LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM` and `Qwen3ForCausalLM`.

One file, bonsai style: `ModelConfig` (frozen, with presets), the modules, `QUANT_SITES`, a jitted `forward`,
then greedy generation with a fixed-size KV cache. `gilora_jax.models.qwen3` is this port with Qwen3's defaults
and names (`qwen3.Qwen3`, `qwen3.ModelConfig`), kept for the code and checkpoints that use them.

Architecture: pre-norm decoder, `x += attn(rms(x)); x += mlp(rms(x))`; GQA attention with RoPE ("rotate_half"
convention, theta from the config; optional "linear" or "llama3" frequency scaling); SwiGLU MLP; final RMSNorm,
then an lm head that is either its own matrix or the transposed token embedding (tied). The four architectures
differ only in switches of `ModelConfig`, checked against `architecture` so that every config is one that
transformers can load under that name:

  architecture         q/k RMSNorm  q/k/v bias           o bias            MLP bias      sliding window
  LlamaForCausalLM     no           attention_bias       attention_bias    mlp_bias      no
  Qwen2ForCausalLM     no           always (qkv_bias)    no                no            no
  MistralForCausalLM   no           no                   no                no            sliding_window
  Qwen3ForCausalLM     yes          attention_bias       attention_bias    no            no

(the q/k RMSNorm is over `head_dim`, per head, before RoPE). Mistral's sliding window follows transformers: a
query at cache position i attends to keys at positions j with i - window < j <= i.

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
import math
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gilora_jax.models import hf_config


class _Family(NamedTuple):
  """What one HF architecture of the family allows (see the module docstring's table), and what its transformers
  config class gives the keys that a config.json may leave out."""
  model_type: str
  qk_norm: bool  # q/k RMSNorm present (required, or forbidden)
  qkv_bias: bool  # q/k/v bias without an o bias (required, or forbidden)
  attention_bias: bool  # q/k/v/o bias may be switched on
  mlp_bias: bool  # MLP biases may be switched on
  sliding_window: bool  # a uniform sliding window may be set (Mistral's `sliding_window`)
  layer_windows: bool  # Qwen's `use_sliding_window` / `max_window_layers` / `layer_types` keys apply
  # transformers 5.23's defaults (configuration_<model_type>.py) for a key that config.json lacks: head_dim None
  # is hidden_size // num_attention_heads, num_key_value_heads None is num_attention_heads.
  max_position_embeddings: int
  num_key_value_heads: int | None
  head_dim: int | None
  window: int | None  # `sliding_window` (Mistral's; Qwen's applies only with use_sliding_window)
  bos_token_id: int | None
  eos_token_id: int | None


FAMILY = {
    "LlamaForCausalLM": _Family("llama", False, False, True, True, False, False, 2048, None, None, None, 1, 2),
    "Qwen2ForCausalLM": _Family("qwen2", False, True, False, False, False, True, 32768, 32, None, 4096, None, None),
    "MistralForCausalLM": _Family("mistral", False, False, False, False, True, False, 131072, 8, None, 4096, 1, 2),
    "Qwen3ForCausalLM": _Family("qwen3", True, False, True, False, False, True, 32768, 32, 128, 4096, None, None),
}
ARCHITECTURES = tuple(FAMILY)
ARCHITECTURE = "LlamaForCausalLM"
ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_ROPE_THETA = 1e4  # transformers' RotaryEmbeddingConfigMixin.default_theta, for a config without rope_theta

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
  """Static hyper-parameters of a dense Llama-family model (defaults: Llama's).

  Fields keep the values given, so `dataclasses.replace` and `to_hf_config` -> `from_hf_config` see what was
  set, not a stale derived value; the derived ones are properties. `head_dim` None is this architecture's
  transformers default (`resolved_head_dim`: hidden_size // num_attention_heads; Qwen3's is 128). RoPE:
  `rope_type` "default", "linear" (every frequency divided by `rope_factor`) or "llama3" (`rope_factor`,
  `rope_low_freq_factor`, `rope_high_freq_factor`, `rope_original_max_position_embeddings`; None is
  max_position_embeddings, see `original_max_position_embeddings`), as transformers computes them. `dtype` is
  the activation/compute dtype, `param_dtype` the storage dtype of the weights (both numpy dtype names, "float32"
  or "bfloat16", so the config stays hashable and JSON-serialisable).
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 1e4
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 4096
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  architecture: str = ARCHITECTURE
  qk_norm: bool = False
  qkv_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int | None = None

  def __post_init__(self):
    fam = FAMILY.get(self.architecture)
    if fam is None:
      raise ValueError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}; pick one of these.")
    if self.head_dim is None and fam.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                       f"{self.num_attention_heads}; set head_dim explicitly (as the checkpoint's config.json does).")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.num_key_value_heads}")
    if self.resolved_head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.resolved_head_dim}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}.")
    if self.rope_type != "default" and self.rope_factor < 1:
      raise ValueError(f"rope_factor must be >= 1 for rope_type {self.rope_type!r}, got {self.rope_factor}")
    if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ValueError(f"llama3 RoPE needs rope_high_freq_factor > rope_low_freq_factor, got "
                       f"{self.rope_high_freq_factor} <= {self.rope_low_freq_factor}")
    name = self.architecture
    if self.qk_norm != fam.qk_norm:
      raise ValueError(f"{name} {'has' if fam.qk_norm else 'has no'} q/k RMSNorm; set qk_norm={fam.qk_norm} "
                       f"(or the architecture that has {'none' if fam.qk_norm else 'it'}).")
    if self.qkv_bias != fam.qkv_bias:
      raise ValueError(f"{name} {'always has' if fam.qkv_bias else 'has no'} q/k/v-only biases; set "
                       f"qkv_bias={fam.qkv_bias}.")
    for flag in ("attention_bias", "mlp_bias"):
      if getattr(self, flag) and not getattr(fam, flag):
        raise ValueError(f"{name} has no {flag} switch; set {flag}=False (LlamaForCausalLM has it).")
    if self.sliding_window is not None and (not fam.sliding_window or self.sliding_window < 1):
      raise ValueError(f"sliding_window={self.sliding_window} needs architecture MistralForCausalLM and a positive "
                       f"window; set sliding_window=None for full attention.")
    hf_config.check_dtypes(self)

  # Official sizes (each repo's config.json). Presets build this class even when called on a subclass (qwen3's).
  @classmethod
  def llama3_2_1b(cls, **kw) -> ModelConfig:
    """meta-llama/Llama-3.2-1B."""
    return cls._llama3(16, 2048, 8192, 32, 64, True, 32.0, **kw)

  @classmethod
  def llama3_2_3b(cls, **kw) -> ModelConfig:
    """meta-llama/Llama-3.2-3B."""
    return cls._llama3(28, 3072, 8192, 24, 128, True, 32.0, **kw)

  @classmethod
  def llama3_1_8b(cls, **kw) -> ModelConfig:
    """meta-llama/Llama-3.1-8B."""
    return cls._llama3(32, 4096, 14336, 32, 128, False, 8.0, **kw)

  @classmethod
  def _llama3(cls, layers, hidden, mlp, heads, head_dim, tied, factor, **kw) -> ModelConfig:
    return ModelConfig(**{**dict(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=hidden, intermediate_size=mlp,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8, head_dim=head_dim,
        rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=tied, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=(128001,), rope_type="llama3", rope_factor=factor, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192), **kw})

  # SmolLM2 base and Instruct share sizes and weights layout; their config.json differ in the special tokens:
  # the base models use <|endoftext|> (0) as bos and eos, the Instruct ones <|im_start|> (1) / <|im_end|> (2),
  # padding with <|im_end|>. The Instruct values are those of the SmolLM2-135M-Instruct GGUF that
  # experiments/smollm2.py converts; the base ones follow its tokenizer (not checked against the hub).
  @classmethod
  def smollm2_135m(cls, **kw) -> ModelConfig:
    """HuggingFaceTB/SmolLM2-135M: a Llama with 9 query / 3 kv heads of 64, tied embeddings."""
    return cls._smollm2(30, 576, 1536, 9, 3, 1e5, False, **kw)

  @classmethod
  def smollm2_135m_instruct(cls, **kw) -> ModelConfig:
    """HuggingFaceTB/SmolLM2-135M-Instruct."""
    return cls._smollm2(30, 576, 1536, 9, 3, 1e5, True, **kw)

  @classmethod
  def smollm2_360m(cls, **kw) -> ModelConfig:
    """HuggingFaceTB/SmolLM2-360M."""
    return cls._smollm2(32, 960, 2560, 15, 5, 1e5, False, **kw)

  @classmethod
  def smollm2_360m_instruct(cls, **kw) -> ModelConfig:
    """HuggingFaceTB/SmolLM2-360M-Instruct."""
    return cls._smollm2(32, 960, 2560, 15, 5, 1e5, True, **kw)

  @classmethod
  def smollm2_1_7b(cls, **kw) -> ModelConfig:
    """HuggingFaceTB/SmolLM2-1.7B."""
    return cls._smollm2(24, 2048, 8192, 32, 32, 1.3e5, False, **kw)

  @classmethod
  def smollm2_1_7b_instruct(cls, **kw) -> ModelConfig:
    """HuggingFaceTB/SmolLM2-1.7B-Instruct."""
    return cls._smollm2(24, 2048, 8192, 32, 32, 1.3e5, True, **kw)

  @classmethod
  def _smollm2(cls, layers, hidden, mlp, heads, kv_heads, theta, instruct, **kw) -> ModelConfig:
    tokens = dict(bos_token_id=1, eos_token_id=(2,), pad_token_id=2) if instruct else dict(
        bos_token_id=0, eos_token_id=(0,))
    return ModelConfig(**{**dict(
        architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=hidden, intermediate_size=mlp,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
        rope_theta=theta, tie_word_embeddings=True, max_position_embeddings=8192, **tokens), **kw})

  @classmethod
  def qwen2_5_0_5b(cls, **kw) -> ModelConfig:
    """Qwen/Qwen2.5-0.5B."""
    return cls._qwen2_5(24, 896, 4864, 14, 2, True, **kw)

  @classmethod
  def qwen2_5_1_5b(cls, **kw) -> ModelConfig:
    """Qwen/Qwen2.5-1.5B."""
    return cls._qwen2_5(28, 1536, 8960, 12, 2, True, **kw)

  @classmethod
  def qwen2_5_7b(cls, **kw) -> ModelConfig:
    """Qwen/Qwen2.5-7B (vocab 152064)."""
    return cls._qwen2_5(28, 3584, 18944, 28, 4, False, vocab_size=152064, **kw)

  @classmethod
  def _qwen2_5(cls, layers, hidden, mlp, heads, kv_heads, tied, **kw) -> ModelConfig:
    return ModelConfig(**{**dict(
        architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=hidden, intermediate_size=mlp,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
        rope_theta=1e6, tie_word_embeddings=tied, max_position_embeddings=32768, qkv_bias=True,
        bos_token_id=151643, eos_token_id=(151643,)), **kw})

  @classmethod
  def mistral_7b_v0_1(cls, **kw) -> ModelConfig:
    """mistralai/Mistral-7B-v0.1 (sliding window 4096)."""
    return cls._mistral(32000, 1e4, 4096, **kw)

  @classmethod
  def mistral_7b_v0_3(cls, **kw) -> ModelConfig:
    """mistralai/Mistral-7B-v0.3 (vocab 32768, full attention)."""
    return cls._mistral(32768, 1e6, None, **kw)

  @classmethod
  def _mistral(cls, vocab, theta, window, **kw) -> ModelConfig:
    return ModelConfig(**{**dict(
        architecture="MistralForCausalLM", vocab_size=vocab, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=theta,
        tie_word_embeddings=False, max_position_embeddings=32768, sliding_window=window, bos_token_id=1,
        eos_token_id=(2,)), **kw})

  @classmethod
  def from_hf_config(cls, path_or_dict: str | os.PathLike | dict[str, Any], *, dtype: str = "float32",
                     param_dtype: str | None = None) -> ModelConfig:
    """Reads a HF Llama, Qwen2, Mistral or Qwen3 `config.json` (a folder, the file itself, or the parsed dict).

    Accepts both the transformers 4.x layout (top-level `rope_theta`, `rope_scaling`) and the 5.x one
    (`rope_parameters`). `dtype`/`param_dtype` choose the JAX dtypes (default float32 for both, whatever the
    checkpoint stores). A key the file leaves out takes the value that this architecture's transformers config
    class gives it (`FAMILY`: e.g. Mistral's 4096-token window, Qwen3's head_dim 128), not Llama's. Anything this
    port would not compute as transformers does is a one-line ValueError.
    """
    hf, where = hf_config.read_config(path_or_dict)
    arch = {f.model_type: a for a, f in FAMILY.items()}.get(hf.get("model_type"))
    if arch is None:
      raise ValueError(f"{where} is a {hf.get('model_type')!r} config (architectures {hf.get('architectures')}), not "
                       f"one of the Llama family ({', '.join(repr(f.model_type) for f in FAMILY.values())}); pass "
                       f"the folder of a {' / '.join(ARCHITECTURES)} checkpoint.")
    return cls._from_hf(hf, where, arch, dtype=dtype, param_dtype=param_dtype)

  @classmethod
  def _from_hf(cls, hf: dict[str, Any], where: str, arch: str, *, dtype: str, param_dtype: str | None):
    fam = FAMILY[arch]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"{where}: rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)} "
                       f"(this port would compute other positions than transformers does).")
    theta = rope.get("rope_theta") or hf.get("rope_theta") or DEFAULT_ROPE_THETA
    scaling = {}
    if rope_type != "default":
      need = ("factor",) + (("low_freq_factor", "high_freq_factor") if rope_type == "llama3" else ())
      missing = [k for k in need if rope.get(k) is None]
      if missing:
        raise ValueError(f"{where}: rope_type {rope_type!r} needs {missing} in rope_parameters/rope_scaling; restore "
                         f"them from the original config.json.")
      scaling = dict(rope_factor=float(rope["factor"]))
      if rope_type == "llama3":
        scaling.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"))
    if fam.layer_windows and hf.get("use_sliding_window"):
      # Qwen's window applies to the layers from max_window_layers on (or those layer_types names), as
      # Qwen2Config/Qwen3Config resolve it; Llama's and Mistral's configs have no such key, so it is ignored there.
      qwen_window = hf.get("sliding_window", fam.window)
      layers = hf.get("layer_types") or [
          "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
          for i in range(hf["num_hidden_layers"])]
      if qwen_window is not None and "sliding_attention" in layers:
        n_sliding = layers.count("sliding_attention")
        raise ValueError(f"{where}: use_sliding_window=true with sliding layers ({n_sliding} of {len(layers)}) is "
                         f"not supported for {arch}; set it to false if the checkpoint was trained without it.")
    window = hf.get("sliding_window", fam.window) if fam.sliding_window else None  # null: full attention
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (the Llama family uses 'silu').")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")  # None: the family's default, as transformers resolves it (resolved_head_dim)
    if head_dim is None and fam.head_dim is None and hf["hidden_size"] % heads:
      raise ValueError(f"{where}: hidden_size={hf['hidden_size']} is not divisible by num_attention_heads={heads} "
                       f"and there is no head_dim; add the checkpoint's head_dim to config.json.")
    # Missing keys take this architecture's transformers default; a null kv-head count means MHA, as there.
    kv_heads = hf.get("num_key_value_heads", fam.num_key_value_heads) or heads
    eos = hf.get("eos_token_id", fam.eos_token_id)
    return cls(
        architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_type=rope_type, **scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)) and fam.attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) and fam.mlp_bias, qk_norm=fam.qk_norm, qkv_bias=fam.qkv_bias,
        sliding_window=window, max_position_embeddings=hf.get("max_position_embeddings") or fam.max_position_embeddings,
        bos_token_id=hf.get("bos_token_id", fam.bos_token_id),
        eos_token_id=() if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
        pad_token_id=hf.get("pad_token_id"), dtype=dtype, param_dtype=param_dtype or dtype)

  def to_hf_config(self) -> dict[str, Any]:
    """The `config.json` dict that transformers loads as `self.architecture`."""
    eos = self.eos_token_id
    rope = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
    if self.rope_type != "default":
      rope["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      rope.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor)
      if self.rope_original_max_position_embeddings is not None:  # else transformers uses max_position_embeddings
        rope["original_max_position_embeddings"] = self.rope_original_max_position_embeddings
    fam = FAMILY[self.architecture]
    extra = {
        "llama": {"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias},
        "qwen2": {"use_sliding_window": False},
        "mistral": {"sliding_window": self.sliding_window},
        "qwen3": {"attention_bias": self.attention_bias, "use_sliding_window": False},
    }[fam.model_type]
    return {
        "architectures": [self.architecture], "model_type": fam.model_type, "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        **({} if self.head_dim is None else {"head_dim": self.head_dim}),  # left out: the class's default, as ours
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope, **extra,
        "tie_word_embeddings": self.tie_word_embeddings, "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id, "eos_token_id": (list(eos) if len(eos) > 1 else eos[0]) if eos else None,
        "pad_token_id": self.pad_token_id, "dtype": self.param_dtype,
    }

  @property
  def resolved_head_dim(self) -> int:
    """The per-head size the model is built with: `head_dim`, else the architecture's transformers default."""
    if self.head_dim is not None:
      return self.head_dim
    return FAMILY[self.architecture].head_dim or self.hidden_size // self.num_attention_heads

  @property
  def original_max_position_embeddings(self) -> int:
    """llama3 RoPE's pre-training context (defaults to max_position_embeddings, as transformers does)."""
    return self.rope_original_max_position_embeddings or self.max_position_embeddings


def _bcast_last(v: jax.Array, ndim: int) -> jax.Array:
  """(F,) -> (1, ..., 1, F) with `ndim` dims, for explicit broadcasting under rank_promotion='raise'."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


class RMSNorm(nnx.Module):
  """HF LlamaRMSNorm: normalise in float32, cast back to the input dtype, then multiply by `scale`."""

  def __init__(self, dim: int, *, eps: float, param_dtype: str):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return _bcast_last(self.scale[...].astype(x.dtype), x.ndim) * y.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_position_embeddings: int = 8192) -> np.ndarray:
  """RoPE inverse frequencies (head_dim / 2,) float32, in transformers' float32 arithmetic per rope_type."""
  inv_freq = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
  if rope_type == "linear":
    inv_freq = inv_freq / np.float32(factor)
  elif rope_type == "llama3":
    old = original_max_position_embeddings
    low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old) / wavelen - np.float32(low_freq_factor)) / np.float32(high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  elif rope_type != "default":
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}.")
  inv_freq = inv_freq.astype(np.float32)
  inv_freq.flags.writeable = False  # shared through the cache
  return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, theta: float | np.ndarray) -> jax.Array:
  """Rotary embedding, HF "rotate_half" (non-interleaved) layout. x (B, T, N, H), positions (B, T) int.

  `theta` is the base (default RoPE) or the (H/2,) inverse frequencies of `rope_inv_freq`.
  """
  inv_freq = rope_inv_freq(x.shape[-1], float(theta)) if np.ndim(theta) == 0 else np.asarray(theta, np.float32)
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
  """GQA self-attention with RoPE, optional per-head q/k RMSNorm, biases and sliding window; optional fixed-size
  KV cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    linear = functools.partial(nnx.Linear, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    qkv_bias = cfg.attention_bias or cfg.qkv_bias
    self.q_proj = linear(d, h * hd, use_bias=qkv_bias)
    self.k_proj = linear(d, k * hd, use_bias=qkv_bias)
    self.v_proj = linear(d, k * hd, use_bias=qkv_bias)
    self.o_proj = linear(h * hd, d, use_bias=cfg.attention_bias)
    norm = functools.partial(RMSNorm, hd, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    self.q_norm = norm() if cfg.qk_norm else None
    self.k_norm = norm() if cfg.qk_norm else None
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd
    self.sliding_window = cfg.sliding_window
    # Static RoPE settings (hashable): the frequencies are NumPy constants computed at trace time.
    self.rope = (hd, float(cfg.rope_theta), cfg.rope_type, float(cfg.rope_factor), float(cfg.rope_low_freq_factor),
                 float(cfg.rope_high_freq_factor), int(cfg.original_max_position_embeddings))

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
    q = self.q_proj(x).reshape(b, t, n, hd)  # (B, T, N*H) -> (B, T, N, H)
    key = self.k_proj(x).reshape(b, t, k, hd)  # (B, T, K*H) -> (B, T, K, H)
    value = self.v_proj(x).reshape(b, t, k, hd)  # (B, T, K*H) -> (B, T, K, H)
    if self.q_norm is not None:
      q, key = self.q_norm(q), self.k_norm(key)
    inv_freq = rope_inv_freq(*self.rope)
    q, key = apply_rope(q, positions, inv_freq), apply_rope(key, positions, inv_freq)
    if cache is not None:
      start = (0, slot, 0, 0)
      cache = LayerCache(jax.lax.dynamic_update_slice(cache.k, key.astype(cache.k.dtype), start),
                         jax.lax.dynamic_update_slice(cache.v, value.astype(cache.v.dtype), start))
      key, value = cache.k.astype(x.dtype), cache.v.astype(x.dtype)
    if self.sliding_window is not None:
      # transformers' window is over cache positions (slots here, pads included): key j is visible to query i
      # iff i - window < j (on top of the causal mask).
      q_idx = jnp.arange(t)[:, None] + slot  # (T, 1)
      mask = mask & (jnp.arange(key.shape[1])[None, :] > q_idx - self.sliding_window)[None]  # (B, T, S)
    # Query head j reads kv head j // G (HF repeat_kv), so split N as (K, G). The products run as one plain
    # batched GEMM per (B, K) with the G query heads stacked on T (M = G*T rows, contiguous operands): on
    # XLA:CPU faster than the same contraction with (T, K, G) left interleaved (benchmarks/attention.py).
    g = n // k
    s = key.shape[1]
    q = q.reshape(b, t, k, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, hd)  # (B, K, G*T, H)
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # (B, K, S, H)
    scores = jnp.einsum("BKQH,BKSH->BKQS", q, key) * jnp.asarray(hd ** -0.5, x.dtype)
    scores = jnp.where(mask[:, None, None], scores.reshape(b, k, g, t, s).astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)  # (B, K, G, T, S)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype).reshape(b, k, g * t, s)
    o_in = jnp.einsum("BKQS,BKSH->BKQH", probs, value).reshape(b, k, g, t, hd)
    o_in = o_in.transpose(0, 3, 1, 2, 4).reshape(b, t, n * hd)  # (B, K, G, T, H) -> (B, T, N*H)
    return self.o_proj(o_in), o_in, cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), biases only with `mlp_bias` (Llama)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               rngs=rngs)
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


class Llama(nnx.Module):
  """A Llama-family causal LM (`cfg.architecture`). `model(input_ids)` maps int32 (B, T) to logits (B, T, V) in
  `cfg.dtype`."""

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
def forward(model: Llama, input_ids: jax.Array) -> jax.Array:
  """Jitted `model(input_ids)`: (B, T) int32 -> logits (B, T, V)."""
  return model(input_ids)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> tuple[LayerCache, ...]:
  """An all-zero KV cache with `max_len` slots per layer, in the compute dtype."""
  shape = (batch, max_len, cfg.num_key_value_heads, cfg.resolved_head_dim)
  return tuple(LayerCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
               for _ in range(cfg.num_hidden_layers))


def _pick(logits, finished, eos_ids, pad):
  """Greedy token per row (B,), `pad` for rows already finished; a row finishes when it emits an EOS id."""
  token = jnp.where(finished, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
  return token, finished | jnp.isin(token, eos_ids)


@jax.jit
def _prefill(model: Llama, input_ids, attention_mask, cache, eos_ids, pad):
  """Fills slots [0, T) from the (left-padded) prompt and picks the first new token.

  Returns (token (B,), finished (B,), cache, key_valid (B, S), position of the last prompt token (B,)).
  """
  b, t = input_ids.shape
  s = cache[0].k.shape[1]
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)  # (B, T), as HF computes for left padding
  key_valid = jnp.pad(attention_mask.astype(bool), ((0, 0), (0, s - t)))  # (B, S): slots holding real tokens
  causal = jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]  # (T, S)
  logits, cache = model.decode(input_ids, positions, causal[None] & key_valid[:, None, :], cache, 0)
  token, finished = _pick(logits[:, -1], jnp.zeros((b,), bool), eos_ids, pad)
  return token, finished, cache, key_valid, positions[:, -1]


@jax.jit
def _decode_step(model: Llama, token, finished, position, slot, key_valid, cache, eos_ids, pad):
  """Feeds last step's token (B,) at cache slot `slot` and picks the next one.

  `slot` is traced, so this compiles once per cache shape rather than once per token.
  Returns (token, finished, position of the fed token, key_valid, cache).
  """
  s = cache[0].k.shape[1]
  position = position + 1
  key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((key_valid.shape[0], 1), bool), (0, slot))
  mask = ((jnp.arange(s) <= slot)[None, :] & key_valid)[:, None, :]  # (B, 1, S)
  logits, cache = model.decode(token[:, None], position[:, None], mask, cache, slot)
  token, finished = _pick(logits[:, -1], finished, eos_ids, pad)
  return token, finished, position, key_valid, cache


def greedy_generate(model: Llama, input_ids: jax.typing.ArrayLike, max_new_tokens: int, *,
                    attention_mask: jax.typing.ArrayLike | None = None, eos_token_id: int | Sequence[int] | None = None,
                    pad_token_id: int | None = None) -> np.ndarray:
  """Greedy decoding with a fixed-size KV cache, token for token equal to HF `generate(do_sample=False)`.

  input_ids (B, T) int, left-padded when rows differ in length (then pass `attention_mask` (B, T), 1 = token).
  Stops after `max_new_tokens` or once every row has produced an EOS; rows that finished early are filled with
  `pad_token_id` (default: the config's, else the first EOS id), as transformers does. EOS ids default to
  `model.config`'s; pass `eos_token_id=()` to always generate `max_new_tokens`.
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
  eos_ids, pad = jnp.asarray(eos, jnp.int32), jnp.int32(pad)
  if max_new_tokens <= 0:
    return np.asarray(input_ids)

  cache = init_cache(cfg, b, t + max_new_tokens)
  token, finished, cache, key_valid, position = _prefill(model, input_ids, attention_mask, cache, eos_ids, pad)
  out = [token]
  for slot in range(t, t + max_new_tokens - 1):
    if eos and bool(finished.all()):  # one host sync per token, only when an EOS can end generation early
      break
    token, finished, position, key_valid, cache = _decode_step(model, token, finished, position, jnp.int32(slot),
                                                               key_valid, cache, eos_ids, pad)
    out.append(token)
  return np.concatenate([np.asarray(input_ids), np.stack([np.asarray(o) for o in out], axis=1)], axis=1)


def generate(model: Llama, tokenizer, prompt: str, max_new_tokens: int) -> str:
  """Prompt in, text out: tokenizes `prompt`, decodes greedily, returns only the new text (specials skipped).

  `tokenizer` is a transformers tokenizer, e.g. `AutoTokenizer.from_pretrained(local_folder)`.
  """
  ids = np.asarray(tokenizer(prompt, return_tensors="np")["input_ids"], np.int32)
  eos = model.config.eos_token_id or (() if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,))
  pad = tokenizer.pad_token_id if model.config.pad_token_id is None else model.config.pad_token_id
  tokens = greedy_generate(model, ids, max_new_tokens, eos_token_id=eos, pad_token_id=pad)
  return tokenizer.decode(tokens[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
