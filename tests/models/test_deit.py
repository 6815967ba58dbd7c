"""DeiT/ViT port vs transformers' classifiers on tiny random checkpoints, and `preprocess`."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gilora_jax.models import deit
from gilora_jax import load_model

ARCHS = ["DeiTForImageClassificationWithTeacher", "DeiTForImageClassification", "ViTForImageClassification"]

# Our HF-checkpoint paths -> transformers 5.x in-memory module names (renamed there; checkpoints kept the old keys).
PT_LINEAR = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
             "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}

_run = jax.jit(lambda module, method, *args: getattr(module, method)(*args), static_argnums=1)


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("arch", ARCHS)
def test_submodules_and_logits_match_transformers(hf_deit, capture, torch, arch, rng):
  pt, folder = hf_deit(arch)
  model = load_model(folder)
  assert model.config.architecture == arch and model.config.layer_norm_eps == 1e-6
  pre = "vit" if arch.startswith("ViT") else "deit"
  x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  hooked = [f"{pre}.embeddings", f"{pre}.layers.0", f"{pre}.layers.0.attention", f"{pre}.layers.0.mlp",
            f"{pre}.layers.1"] + [f"{pre}.layers.0.{p}" for p in PT_LINEAR.values()]
  with capture(pt, hooked) as cap, torch.no_grad():
    ref_logits = pt(torch.tensor(x)).logits.numpy()
  d = cap.data

  assert _max_abs(_run(model, "embed", x), d[f"{pre}.embeddings"][1]) <= 1e-5
  layer0 = model.layers[0]
  attn_out, _ = _run(layer0.attention, "__call__", d[f"{pre}.layers.0.attention"][0])
  assert _max_abs(attn_out, d[f"{pre}.layers.0.attention"][1]) <= 1e-5
  mlp = jax.jit(lambda layer, h: layer.output(jax.nn.gelu(layer.intermediate(h), approximate=False)))
  assert _max_abs(mlp(layer0, d[f"{pre}.layers.0.mlp"][0]), d[f"{pre}.layers.0.mlp"][1]) <= 1e-5
  layer_out, _ = _run(model.layers[1], "__call__", d[f"{pre}.layers.1"][0])
  assert _max_abs(layer_out, d[f"{pre}.layers.1"][1]) <= 1e-5
  logits = deit.forward(model, x)
  assert logits.shape == (2, 10) and _max_abs(logits, ref_logits) <= 1e-4

  _, taps = _run(layer0, "__call__", d[f"{pre}.layers.0"][0])
  assert set(taps) == set(deit.QUANT_SITES)
  for site, paths in deit.QUANT_SITES.items():
    for path in paths:
      assert isinstance(functools.reduce(getattr, path.split("."), layer0), nnx.Linear)
      assert _max_abs(taps[site], d[f"{pre}.layers.0.{PT_LINEAR[path]}"][0]) <= 1e-5, (site, path)


def test_bfloat16_forward_is_close_to_float32(hf_deit, rng):
  _, folder = hf_deit(ARCHS[0])
  f32, bf16 = load_model(folder), load_model(folder, dtype="bfloat16")
  assert bf16.layers[0].attention.attention.query.kernel[...].dtype == jnp.bfloat16
  x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  ref, out = deit.forward(f32, x), deit.forward(bf16, x)
  assert out.dtype == jnp.bfloat16
  assert _max_abs(out, ref) <= 0.03 * float(jnp.max(jnp.abs(ref)))


def test_wrong_image_size_is_a_clear_error(hf_deit):
  _, folder = hf_deit(ARCHS[0])
  with pytest.raises(ValueError, match=r"Input image size \(48\*48\) doesn't match the model \(32\*32\)"):
    load_model(folder)(np.zeros((1, 3, 48, 48), np.float32))


# Paper parameter counts (DeiT, Touvron et al. 2021, Table 1), in millions.
@pytest.mark.parametrize("preset,distilled,millions", [
    ("deit_tiny_patch16_224", False, 5.7), ("deit_tiny_patch16_224", True, 5.9), ("deit_small_patch16_224", False, 22),
    ("deit_base_patch16_224", False, 86), ("deit_base_patch16_224", True, 87), ("deit_base_patch16_384", False, 86)])
def test_presets_have_the_paper_parameter_counts(preset, distilled, millions):
  cfg = getattr(deit.ModelConfig, preset)(distilled=distilled)
  one = nnx.eval_shape(lambda: deit.DeiT(dataclasses.replace(cfg, num_hidden_layers=1), rngs=nnx.Rngs(0)))
  per_block = sum(x.size for x in jax.tree.leaves(nnx.state(one.layers[0])))
  n = (sum(x.size for x in jax.tree.leaves(nnx.state(one))) + (cfg.num_hidden_layers - 1) * per_block) / 1e6
  assert abs(n - millions) / millions < 0.015, n


def _torch_reference_preprocess(torch, img_u8, cfg):  # pylint: disable=redefined-outer-name
  """What transformers' torchvision backend does: antialiased bicubic on uint8, crop, rescale, normalize."""
  t = torch.tensor(img_u8).permute(2, 0, 1)[None].float()
  size = (cfg["size"]["height"], cfg["size"]["width"])
  t = torch.nn.functional.interpolate(t, size=size, mode="bicubic", antialias=True, align_corners=False)
  t = t.round().clamp(0, 255)
  ch, cw = cfg["crop_size"]["height"], cfg["crop_size"]["width"]
  top, left = (size[0] - ch) // 2, (size[1] - cw) // 2
  t = t[:, :, top:top + ch, left:left + cw] / 255.0
  mean, std = torch.tensor(cfg["image_mean"])[None, :, None, None], torch.tensor(cfg["image_std"])[None, :, None, None]
  return ((t - mean) / std).numpy()


def test_preprocess_follows_the_deit_image_processor_recipe(torch, rng, tmp_path):
  cfg = {"do_resize": True, "size": {"height": 40, "width": 40}, "resample": 3, "do_center_crop": True,
         "crop_size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
         "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
  images = [rng.integers(0, 256, (57, 71, 3), dtype=np.uint8), rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)]
  pixels = deit.preprocess(images, cfg)
  assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == np.float32
  ref = np.concatenate([_torch_reference_preprocess(torch, img, cfg) for img in images])
  # jax.image.resize and torch's antialiased bicubic agree to ~1e-4 grey levels; rounding to uint8 can then flip
  # a pixel by one level where the value sits at .5.
  one_level = 1 / 255 / min(cfg["image_std"])
  assert _max_abs(pixels, ref) <= one_level * 1.01
  assert np.mean(np.abs(pixels - ref) > 1e-5) < 0.01
  # Reading the config from the model folder gives the same result.
  (tmp_path / "preprocessor_config.json").write_text(__import__("json").dumps(cfg))
  np.testing.assert_array_equal(deit.preprocess(images, tmp_path), pixels)


def test_preprocess_shortest_edge_keeps_aspect_and_crops_centrally():
  img = np.zeros((40, 80, 3), np.uint8)
  img[:, 40:] = 255  # right half white
  cfg = {"size": {"shortest_edge": 20}, "do_center_crop": True, "crop_size": {"height": 20, "width": 20},
         "do_normalize": False}
  out = deit.preprocess(img, cfg)  # resize to 20x40, crop columns 10..30: left half black, right half white
  assert out.shape == (1, 3, 20, 20)
  np.testing.assert_array_equal(out[0, :, :, :8], 0.0)
  np.testing.assert_array_equal(out[0, :, :, 12:], 1.0)
