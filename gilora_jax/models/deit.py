"""ViT/DeiT image classifier in Flax NNX, numerically matching `transformers`' DeiT and ViT classifiers.

One file, bonsai style: `ModelConfig` (frozen, with presets), the modules, `QUANT_SITES`, a jitted `forward`, and
`preprocess` (the HF image-processor recipe in NumPy/JAX).

Three HF layouts share the encoder and differ in tokens and heads (`ModelConfig.architecture`):
  * `DeiTForImageClassificationWithTeacher`: [cls, dist] + patches; logits = (cls_classifier(x0) +
    distillation_classifier(x1)) / 2, as HF and timm do at inference.
  * `DeiTForImageClassification`: [cls, dist] + patches (the DeiT embedding always has the distillation token);
    logits = classifier(x0).
  * `ViTForImageClassification` (the non-distilled `facebook/deit-*` checkpoints): [cls] + patches;
    logits = classifier(x0).
Encoder block: pre-LN, `x += attn(LN(x)); x += fc2(gelu(fc1(LN(x))))`, exact (erf) GELU, biases everywhere.

Submodule names follow the HF checkpoint keys (`deit.encoder.layer.{i}.attention.attention.query`, ...), which
are also what transformers 5.x writes with `save_pretrained`, although its in-memory modules were renamed.

Calibration without hooks:

  x = model.embed(pixel_values)                  # (B, 3, H, W) float32 -> (B, N, D) tokens, pos-embedded
  for block in model.layers:                     # an nnx.List of EncoderLayer
    x, taps = block(x)                           # block(x) -> (x (B, N, D), taps)
  logits = model.head(x)                         # final LayerNorm + classifier(s) -> (B, num_labels)

`taps` maps each key of `QUANT_SITES` to the (B, N, d_in) input of the linears it names.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ARCHITECTURES = ("DeiTForImageClassificationWithTeacher", "DeiTForImageClassification", "ViTForImageClassification")

# Which linears (paths relative to an EncoderLayer, HF checkpoint names) read which tapped input.
QUANT_SITES = {
    "qkv_in": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    "attn_out_in": ("attention.output.dense",),
    "fc1_in": ("intermediate.dense",),
    "fc2_in": ("output.dense",),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyper-parameters of a ViT/DeiT classifier (square images and patches).

  `dtype` is the compute dtype, `param_dtype` the weight storage dtype (numpy dtype names). `layer_norm_eps`
  defaults to 1e-12, the value in every HF-converted DeiT config (timm itself uses 1e-6).
  """
  architecture: str = "DeiTForImageClassificationWithTeacher"
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  num_labels: int = 1000
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of heads={self.num_attention_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
    if self.num_labels < 1:
      raise ValueError(f"num_labels must be positive, got {self.num_labels}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{name} must be 'float32', 'bfloat16' or 'float16', got {getattr(self, name)!r}")

  @property
  def distillation_token(self) -> bool:
    return self.architecture.startswith("DeiT")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  # Official facebook/deit-* sizes. distilled=True -> *-distilled-* (WithTeacher); False -> the ViT-layout ones.
  @classmethod
  def _official(cls, hidden, heads, image_size, distilled, **kw) -> ModelConfig:
    arch = "DeiTForImageClassificationWithTeacher" if distilled else "ViTForImageClassification"
    return cls(architecture=arch, hidden_size=hidden, num_hidden_layers=12, num_attention_heads=heads,
               intermediate_size=4 * hidden, image_size=image_size, patch_size=16, **kw)

  @classmethod
  def deit_tiny_patch16_224(cls, distilled: bool = True, **kw) -> ModelConfig:
    return cls._official(192, 3, 224, distilled, **kw)

  @classmethod
  def deit_small_patch16_224(cls, distilled: bool = True, **kw) -> ModelConfig:
    return cls._official(384, 6, 224, distilled, **kw)

  @classmethod
  def deit_base_patch16_224(cls, distilled: bool = True, **kw) -> ModelConfig:
    return cls._official(768, 12, 224, distilled, **kw)

  @classmethod
  def deit_base_patch16_384(cls, distilled: bool = True, **kw) -> ModelConfig:
    return cls._official(768, 12, 384, distilled, **kw)

  @classmethod
  def from_hf_config(cls, path_or_dict: str | os.PathLike | dict[str, Any], *, dtype: str = "float32",
                     param_dtype: str | None = None) -> ModelConfig:
    """Reads a HF DeiT/ViT `config.json` (a folder, the file itself, or the parsed dict)."""
    if isinstance(path_or_dict, dict):
      hf, where = path_or_dict, "the given config dict"
    else:
      where = os.path.join(path_or_dict, "config.json") if os.path.isdir(path_or_dict) else os.fspath(path_or_dict)
      try:
        with open(where, encoding="utf-8") as f:
          hf = json.load(f)
      except FileNotFoundError as e:
        raise FileNotFoundError(f"{where} not found: pass a local HF model folder that holds config.json.") from e
      except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); restore the file from the original checkpoint.") from e
    archs = [a for a in hf.get("architectures") or () if a in ARCHITECTURES]
    if hf.get("model_type") not in ("deit", "vit") or not archs:
      raise ValueError(f"{where} is a {hf.get('model_type')!r} config with architectures {hf.get('architectures')};"
                       f" expected one of {ARCHITECTURES}.")
    if hf.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (DeiT/ViT use exact 'gelu').")
    sizes = {}
    for key in ("image_size", "patch_size"):
      v = hf.get(key, 224 if key == "image_size" else 16)
      if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
          raise ValueError(f"{where}: non-square {key}={v} is not supported.")
        v = v[0]
      sizes[key] = v
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    return cls(architecture=archs[0], hidden_size=hf.get("hidden_size", 768),
               num_hidden_layers=hf.get("num_hidden_layers", 12), num_attention_heads=hf.get("num_attention_heads", 12),
               intermediate_size=hf.get("intermediate_size", 3072), num_channels=hf.get("num_channels", 3),
               num_labels=num_labels, layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
               qkv_bias=hf.get("qkv_bias", True), dtype=dtype, param_dtype=param_dtype or dtype, **sizes)

  def to_hf_config(self) -> dict[str, Any]:
    """The `config.json` dict that transformers loads into `self.architecture`."""
    return {
        "architectures": [self.architecture], "model_type": "deit" if self.distillation_token else "vit",
        "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads, "intermediate_size": self.intermediate_size,
        "hidden_act": "gelu", "image_size": self.image_size, "patch_size": self.patch_size,
        "num_channels": self.num_channels, "num_labels": self.num_labels, "layer_norm_eps": self.layer_norm_eps,
        "qkv_bias": self.qkv_bias, "dtype": self.param_dtype,
    }


def _bcast_last(v: jax.Array, ndim: int) -> jax.Array:
  """(F,) -> (1, ..., 1, F), for explicit broadcasting under rank_promotion='raise'."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm numerics: two-pass variance in float32, affine in the compute dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype: str):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return y * _bcast_last(self.scale[...].astype(x.dtype), x.ndim) + _bcast_last(self.bias[...].astype(x.dtype),
                                                                                  x.ndim)


class Dense(nnx.Module):
  """A container holding one `dense` linear, mirroring HF's `*.output.dense` / `intermediate.dense` nesting."""

  def __init__(self, d_in: int, d_out: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(d_in, d_out, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.dense(x)


class SelfAttention(nnx.Module):
  """Multi-head self-attention scores and mixing; q/k/v are separate 2-D linears (HF `query`, `key`, `value`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    linear = functools.partial(nnx.Linear, use_bias=cfg.qkv_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               rngs=rngs)
    self.query, self.key, self.value = linear(d, d), linear(d, d), linear(d, d)
    self.num_heads = cfg.num_attention_heads

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (B, N, D) -> attention output before the output projection, (B, N, D)."""
    b, n, d = x.shape
    h = self.num_heads
    q = self.query(x).reshape(b, n, h, d // h)  # (B, N, D) -> (B, N, H, Dh), and likewise k, v
    k = self.key(x).reshape(b, n, h, d // h)
    v = self.value(x).reshape(b, n, h, d // h)
    scores = jnp.einsum("BQHD,BKHD->BHQK", q, k) * jnp.asarray((d // h) ** -0.5, x.dtype)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    return jnp.einsum("BHQK,BKHD->BQHD", probs, v).reshape(b, n, d)  # (B, N, H, Dh) -> (B, N, D)


class Attention(nnx.Module):
  """HF DeiTAttention: `attention` (q/k/v + mixing) then `output.dense`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attention = SelfAttention(cfg, rngs=rngs)
    self.output = Dense(cfg.hidden_size, cfg.hidden_size, cfg, rngs=rngs)

  @jax.named_scope("attention")
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x (B, N, D) -> (output (B, N, D), output.dense input (B, N, D))."""
    attn_out_in = self.attention(x)
    return self.output(attn_out_in), attn_out_in


class EncoderLayer(nnx.Module):
  """Pre-LN encoder block; returns `(x, taps)`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.layernorm_before = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype)
    self.attention = Attention(cfg, rngs=rngs)
    self.layernorm_after = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype)
    self.intermediate = Dense(cfg.hidden_size, cfg.intermediate_size, cfg, rngs=rngs)
    self.output = Dense(cfg.intermediate_size, cfg.hidden_size, cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x (B, N, D) -> (x (B, N, D), taps)."""
    qkv_in = self.layernorm_before(x)
    attn_out, attn_out_in = self.attention(qkv_in)
    x = x + attn_out
    fc1_in = self.layernorm_after(x)
    with jax.named_scope("mlp"):
      fc2_in = jax.nn.gelu(self.intermediate(fc1_in), approximate=False)
      x = x + self.output(fc2_in)
    return x, {"qkv_in": qkv_in, "attn_out_in": attn_out_in, "fc1_in": fc1_in, "fc2_in": fc2_in}


class PatchEmbeddings(nnx.Module):
  """Non-overlapping P x P patches -> D features, as a strided conv (HF `patch_embeddings.projection`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    p = cfg.patch_size
    self.projection = nnx.Conv(cfg.num_channels, cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
                               dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """(B, C, H, W) -> (B, N, D), patches in row-major order like HF's `flatten(2)`."""
    x = self.projection(jnp.transpose(pixel_values, (0, 2, 3, 1)))  # NCHW -> NHWC -> (B, H/P, W/P, D)
    return x.reshape(x.shape[0], -1, x.shape[-1])  # (B, H/P, W/P, D) -> (B, N, D)


class Embeddings(nnx.Module):
  """[cls, (dist)] + patch tokens, plus learned position embeddings."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, dt = cfg.hidden_size, cfg.param_dtype
    n_special = 2 if cfg.distillation_token else 1
    self.cls_token = nnx.Param(jnp.zeros((1, 1, d), dt))
    self.distillation_token = nnx.Param(jnp.zeros((1, 1, d), dt)) if cfg.distillation_token else None
    # Zeros, as HF DeiT initialises cls/dist/position embeddings; pretrained values come from the checkpoint.
    self.position_embeddings = nnx.Param(jnp.zeros((1, cfg.num_patches + n_special, d), dt))
    self.patch_embeddings = PatchEmbeddings(cfg, rngs=rngs)
    self.image_size, self.dtype = cfg.image_size, cfg.dtype

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """(B, C, H, W) -> (B, N + 1 or 2, D)."""
    b, _, h, w = pixel_values.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"Input image size ({h}*{w}) doesn't match the model ({self.image_size}*{self.image_size}); "
                       f"resize with `preprocess` first.")
    x = self.patch_embeddings(pixel_values.astype(self.dtype))
    specials = [self.cls_token[...]] + ([] if self.distillation_token is None else [self.distillation_token[...]])
    specials = [jnp.broadcast_to(t.astype(self.dtype), (b, 1, x.shape[-1])) for t in specials]
    return jnp.concatenate(specials + [x], axis=1) + self.position_embeddings[...].astype(self.dtype)


class DeiT(nnx.Module):
  """ViT/DeiT classifier. `model(pixel_values)` maps float32 (B, C, H, W) to logits (B, num_labels)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype)
    linear = functools.partial(nnx.Linear, cfg.hidden_size, cfg.num_labels, dtype=cfg.dtype,
                               param_dtype=cfg.param_dtype, rngs=rngs)
    if cfg.architecture == "DeiTForImageClassificationWithTeacher":
      self.cls_classifier, self.distillation_classifier = linear(), linear()
    else:
      self.classifier = linear()

  def embed(self, pixel_values: jax.Array) -> jax.Array:
    """(B, C, H, W) -> tokens (B, N', D)."""
    return self.embeddings(pixel_values)

  def head(self, x: jax.Array) -> jax.Array:
    """Final LayerNorm + classifier(s): (B, N', D) -> logits (B, num_labels)."""
    x = self.layernorm(x)
    if self.config.architecture == "DeiTForImageClassificationWithTeacher":
      return (self.cls_classifier(x[:, 0]) + self.distillation_classifier(x[:, 1])) / 2
    return self.classifier(x[:, 0])

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    x = self.embed(pixel_values)
    for layer in self.layers:
      x, _ = layer(x)
    return self.head(x)


@jax.jit
def forward(model: DeiT, pixel_values: jax.Array) -> jax.Array:
  """Jitted `model(pixel_values)`: (B, C, H, W) float32 -> logits (B, num_labels)."""
  return model(pixel_values)


# PIL resample codes as stored in preprocessor_config.json -> jax.image.resize methods.
_RESAMPLE = {0: "nearest", 2: "linear", 3: "cubic"}


def _hw(size: dict[str, int] | int, image_hw: tuple[int, int]) -> tuple[int, int]:
  """Target (H, W) of an HF `size`: {"height", "width"}, {"shortest_edge"} (aspect kept) or an int."""
  if isinstance(size, int):
    return size, size
  if "height" in size and "width" in size:
    return size["height"], size["width"]
  if "shortest_edge" in size:
    h, w = image_hw
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size["shortest_edge"] * long / short)
    return (size["shortest_edge"], new_long) if h <= w else (new_long, size["shortest_edge"])
  raise ValueError(f"unsupported size spec {size!r} (expected height/width or shortest_edge)")


def preprocess(images: np.ndarray | Sequence[np.ndarray], preprocessor_config: dict[str, Any] | str | os.PathLike
               ) -> np.ndarray:
  """HF image-processor recipe: resize, center crop, rescale, normalize; returns pixel_values (B, C, H, W) float32.

  `images`: one (H, W, C) array, a (B, H, W, C) batch, or a list of (H, W, C) arrays of any sizes; uint8 in
  [0, 255] (as from an image file) or float already in that range. `preprocessor_config`: the parsed
  `preprocessor_config.json`, or its path, or the model folder holding it.

  PIL is not a dependency, so resizing uses `jax.image.resize` (antialiased; "cubic" is Keys a = -0.5, PIL's
  BICUBIC kernel). For uint8 input the resized image is rounded and clipped to uint8 as PIL and torchvision do
  before rescaling. Expect agreement with HF's processors to about one grey level, not bit-exactness.
  """
  cfg = preprocessor_config
  if not isinstance(cfg, dict):
    path = os.path.join(cfg, "preprocessor_config.json") if os.path.isdir(cfg) else os.fspath(cfg)
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  if isinstance(images, np.ndarray) and images.ndim == 3:
    images = [images]
  out = []
  for img in images:
    img = np.asarray(img)
    if img.ndim != 3:
      raise ValueError(f"expected (H, W, C) images, got shape {img.shape}")
    is_uint8 = img.dtype == np.uint8
    x = img.astype(np.float32)
    if cfg.get("do_resize", True):
      h, w = _hw(cfg.get("size", {"height": 224, "width": 224}), x.shape[:2])
      method = _RESAMPLE.get(cfg.get("resample", 3))
      if method is None:
        raise ValueError(f"unsupported resample={cfg.get('resample')} (supported: {sorted(_RESAMPLE)})")
      x = np.asarray(jax.image.resize(x, (h, w, x.shape[2]), method=method, antialias=True))
      if is_uint8:
        x = np.clip(np.round(x), 0, 255)
    if cfg.get("do_center_crop", False):
      ch, cw = _hw(cfg.get("crop_size", {"height": 224, "width": 224}), x.shape[:2])
      if ch > x.shape[0] or cw > x.shape[1]:
        raise ValueError(f"crop {ch}x{cw} is larger than the resized image {x.shape[0]}x{x.shape[1]}")
      top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
      x = x[top:top + ch, left:left + cw]
    if cfg.get("do_rescale", True):
      x = x * np.float32(cfg.get("rescale_factor", 1 / 255))
    if cfg.get("do_normalize", True):
      mean = np.asarray(cfg.get("image_mean", (0.5, 0.5, 0.5)), np.float32)
      std = np.asarray(cfg.get("image_std", (0.5, 0.5, 0.5)), np.float32)
      x = (x - mean[None, None, :]) / std[None, None, :]
    out.append(np.transpose(x, (2, 0, 1)))  # (H, W, C) -> (C, H, W)
  shapes = {o.shape for o in out}
  if len(shapes) != 1:
    raise ValueError(f"preprocessed images differ in shape {sorted(shapes)}; enable do_resize/do_center_crop")
  return np.stack(out).astype(np.float32)
