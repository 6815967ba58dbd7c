"""quantize_model: per-site Hessians, both propagation protocols, padding masks, rules, surgery on a copy, resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gilora_jax as gj
from gilora_jax.pipeline import apply, calib, ckpt
from gilora_jax.models import qwen3
from gilora_jax import config, nn
from gilora_jax.nn import QuantizedLinear, pack_codes
from gilora_jax.quant import hessian

from .tiny import LM_CONFIG


def _codes(model):
  return {p: np.asarray(m.codes[...]) for p, m in nnx.iter_modules(model) if isinstance(m, QuantizedLinear)}


def _manual_H(block, xs, site):
  """XᵀX of `site`'s tap over every batch, eagerly (independent of apply's jitted path)."""
  H = np.zeros((0, 0))
  for x in xs:
    _, taps = block(x)
    t = np.asarray(taps[site], np.float64).reshape(-1, taps[site].shape[-1])
    H = t.T @ t if H.size == 0 else H + t.T @ t
  return H


def _rel_err_q(lin_float, lin_q, H):
  W = np.asarray(lin_float.kernel[...], np.float64)
  E = W - np.asarray(lin_q.dequantized(), np.float64)
  return np.trace(E.T @ H @ E) / np.trace(W.T @ H @ W)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["quantized", "fp"])
def test_hessians_follow_the_protocol(lm, lm_calib, protocol):
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(lm)))
  out = apply.quantize_model(lm, lm_calib, diagnostics="full", method="gptq", bits=3, protocol=protocol)
  # The input model is untouched; the new one has every site quantized, nothing else.
  assert all(isinstance(lm.layers[i].self_attn.q_proj, nnx.Linear) for i in range(2))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(lm))))
  assert len(out.records) == 2 * 7 and len(_codes(out.model)) == 14
  assert isinstance(out.model.embed_tokens, nnx.Embed) and isinstance(out.model.lm_head, nnx.Linear)

  x0 = [lm.embed(jnp.asarray(b.inputs)) for b in lm_calib]
  x1_fp = [lm.layers[0](x)[0] for x in x0]
  x1_q = [out.model.layers[0](x)[0] for x in x0]
  x1 = x1_q if protocol == "quantized" else x1_fp
  for i, xs in ((0, x0), (1, x1)):
    for site, rel in (("attn_in", "self_attn.q_proj"), ("down_in", "mlp.down_proj")):
      H = _manual_H(lm.layers[i], xs, site)
      rec = next(r for r in out.records if r.path == f"layers.{i}.{rel}")
      q = nn.get_path(out.model.layers[i], rel)
      f = nn.get_path(lm.layers[i], rel)
      np.testing.assert_allclose(rec.rel_err_quantized, _rel_err_q(f, q, H), rtol=2e-3)
      # The codes are quantize_layer's on that H (up to float32 round-off in H: allow rare flips).
      ref = gj.quantize_layer(np.asarray(f.kernel[...]), H.astype(np.float32), method="gptq", bits=3)
      codes = np.asarray(nn.get_path(out.model.layers[i], rel).codes[...])
      assert np.mean(codes == np.asarray(pack_codes(ref.codes, 3))) > 0.97
  # The two streams really differ, so the check above distinguishes the protocols.
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(x1_fp, x1_q)) > 1e-3


@pytest.mark.slow
def test_fp_protocol_ignores_earlier_quantization(lm, lm_calib):
  """Under the fp protocol block 1 sees float activations, so block 0's method cannot change block 1."""
  kw = dict(bits=3, protocol="fp")
  a = apply.quantize_model(lm, lm_calib, method="gptq", **kw)
  b = apply.quantize_model(lm, lm_calib, method="gptq", rules=(apply.Rule(r"layers\.0\..*", method="rtn"),), **kw)
  ca, cb = _codes(a.model), _codes(b.model)
  assert any((ca[p] != cb[p]).any() for p in ca if p[1] == 0)
  for p in ca:
    if p[1] == 1:
      np.testing.assert_array_equal(ca[p], cb[p])
  c = apply.quantize_model(lm, lm_calib, method="gptq", bits=3, protocol="quantized",
                           rules=(apply.Rule(r"layers\.0\..*", method="rtn"),))
  assert any((ca[p] != _codes(c.model)[p]).any() for p in ca if p[1] == 1)


@pytest.mark.slow
def test_padding_is_masked_out(lm):
  rng = np.random.default_rng(7)
  ids = rng.integers(0, 100, size=(2, 24)).astype(np.int32)
  mask = np.ones((2, 24), bool)
  mask[0, 15:] = False
  other = ids.copy()
  other[0, 15:] = rng.integers(0, 100, size=9)  # different pad ids must not change anything
  run = lambda t: _codes(apply.quantize_model(lm, [calib.CalibBatch(t, mask)], method="gptq", bits=3).model)
  a, b = run(ids), run(other)
  assert a.keys() == b.keys()
  for p in a:
    np.testing.assert_array_equal(a[p], b[p])
  with pytest.raises(ValueError, match="right-padded"):
    apply.quantize_model(lm, [calib.CalibBatch(ids, mask[:, ::-1])], method="rtn")


def test_hessian_update_masks_tokens(rng):
  x = rng.standard_normal((2, 5, 3)).astype(np.float32)
  m = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  s = hessian.update(hessian.init(3), x, m)
  kept = x[m]
  np.testing.assert_allclose(np.asarray(s.xtx), kept.T @ kept, rtol=1e-5)
  assert int(s.count) == 8


@pytest.mark.slow
def test_resume_is_bit_identical(lm, lm_calib, tmp_path):
  """Checkpoint after block 0, restore, resume: the same codes, L, R and logits as one uninterrupted run."""
  cfg = apply.make_config(method="gptq+olrc", bits=3, rank=4, protocol="fp")
  saved = {}

  def after_block(i, model, records):
    if i == 0:
      saved["path"] = ckpt.save_quantized(tmp_path / "partial", model, {"blocks_done": 1}, [])
      saved["records"] = list(records)
  full = apply.quantize_model(lm, lm_calib, cfg, after_block=after_block)
  partial = ckpt.restore_model(saved["path"])
  assert isinstance(partial.layers[1].mlp.up_proj, nnx.Linear)  # block 1 was still float when saved
  resumed = apply.quantize_model(lm, lm_calib, cfg, resume=apply.Resume(partial, saved["records"], 1))
  a, b = nnx.to_pure_dict(nnx.state(full.model)), nnx.to_pure_dict(nnx.state(resumed.model))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
  assert [r.rel_err for r in full.records] == [r.rel_err for r in resumed.records]
  ids = jnp.asarray(lm_calib[0].inputs)
  np.testing.assert_array_equal(np.asarray(qwen3.forward(full.model, ids)), np.asarray(qwen3.forward(resumed.model,
                                                                                                       ids)))


def test_quant_config_json_round_trip():
  """What a checkpoint's metadata stores (to_json, through JSON text) reads back as the same config."""
  import json  # pylint: disable=import-outside-toplevel
  config = apply.make_config(method="gilora", bits=3, rank=8, group_size=32, loops=1, mse=False, shrink=0.9,
                             rules=(apply.Rule(r".*down_proj", bits=4, bidup_order="both"),
                                    apply.Rule(r".*q_proj", skip=True)))
  assert config.layer.grid.shrink == 0.9 and config.layer.refine.loops == 1
  assert apply.QuantConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def _code_list(model):
  return [np.asarray(m.codes[...]) for _, m in nnx.iter_graph(model) if isinstance(m, QuantizedLinear)]


def test_offloaded_activations_give_the_same_code_list(lm, lm_calib):
  on_device = apply.quantize_model(lm, lm_calib, method="gptq", bits=3)
  on_host = apply.quantize_model(lm, lm_calib, method="gptq", bits=3, offload=True)
  assert all((a == b).all() for a, b in zip(_code_list(on_device.model), _code_list(on_host.model)))
  assert [r.rel_err for r in on_device.records] == [r.rel_err for r in on_host.records]


def test_bfloat16_activations_are_stored_rounded_and_computed_in_float32(lm, lm_calib, monkeypatch):
  seen = []
  calibrate = apply._calibrate  # pylint: disable=protected-access

  def spy(block, xs, *args, **kw):
    seen.append(xs.get(0).dtype)
    stats = calibrate(block, xs, *args, **kw)
    seen.extend(s.xtx.dtype for s in stats.values())
    return stats
  monkeypatch.setattr(apply, "_calibrate", spy)
  cfg = apply.QuantConfig(layer=apply.make_config(method="gptq", bits=3).layer, activations="bfloat16")
  bf16 = apply.quantize_model(lm, lm_calib, cfg)
  assert set(seen) == {jnp.dtype("bfloat16"), jnp.dtype("float32")} and seen[0] == jnp.bfloat16
  f32 = apply.quantize_model(lm, lm_calib, method="gptq", bits=3)
  diffs = [abs(a.rel_err - b.rel_err) / b.rel_err for a, b in zip(bf16.records, f32.records)]
  assert np.median(diffs) < 0.05 and max(diffs) < 0.25, diffs  # rounded inputs: close, not equal
  assert any((a != b).any() for a, b in zip(_code_list(bf16.model), _code_list(f32.model)))
  with pytest.raises(config.OptionError, match="activations"):
    apply.QuantConfig(activations="float16").validate()


def test_out_of_device_memory_says_how_big_the_activations_are_and_what_to_pass(lm, lm_calib, monkeypatch):
  def oom(*args, **kw):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.00GiB.")
  monkeypatch.setattr(apply, "_calibrate", oom)
  with pytest.raises(MemoryError, match=r"block 0 ran out of device memory with the calibration activations on the "
                     r"device \(4 samples × 24×64 in float32: .* GiB a block's inputs\): pass fewer --nsamples .*"
                     r"--offload-activations") as e:
    apply.quantize_model(lm, lm_calib, method="gptq", bits=3)
  assert "\n" not in str(e.value)
