"""Orbax checkpoints of models: bit-exact round trips, config stored beside the state, atomic saves."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gilora_jax.pipeline import ckpt
from gilora_jax.models import deit, qwen3
from gilora_jax import load_model

QWEN3_CFG = qwen3.ModelConfig(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, eos_token_id=(3, 5))
DEIT_CFG = deit.ModelConfig(hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=24,
                            image_size=16, patch_size=8, num_labels=5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qwen3_round_trip_is_bit_exact(tmp_path, random_model, dtype):
  model = random_model(qwen3.Qwen3, dataclasses.replace(QWEN3_CFG, dtype=dtype, param_dtype=dtype))
  path = ckpt.save_model(tmp_path / "ckpt", model, meta={"note": "float", "bits": None})
  assert path == str(tmp_path / "ckpt") and ckpt.is_checkpoint(path)
  restored = load_model(path)  # load_model recognises checkpoints: no flags needed
  assert restored.config == model.config
  ids = jnp.asarray(np.arange(12).reshape(2, 6) % 13, jnp.int32)
  ref, out = qwen3.forward(model, ids), qwen3.forward(restored, ids)  # jit vs jit: eager differs by ~1e-7
  assert out.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  assert ckpt.read_meta(path) == {"note": "float", "bits": None}


def test_deit_round_trip_is_bit_exact(tmp_path, random_model):
  model = random_model(deit.DeiT, DEIT_CFG, 1)
  ckpt.save_model(tmp_path / "ckpt", model)
  restored = ckpt.restore_model(tmp_path / "ckpt")
  x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(deit.forward(restored, x)), np.asarray(deit.forward(model, x)))


def test_build_abstract_receives_config_and_meta(tmp_path, random_model):
  model = random_model(qwen3.Qwen3, QWEN3_CFG, 0)
  ckpt.save_model(tmp_path / "ckpt", model, meta={"rank": 4})
  seen = []

  def build(cfg, meta):
    seen.append((cfg, meta))
    return qwen3.Qwen3(cfg, rngs=nnx.Rngs(7))

  restored = ckpt.restore_model(tmp_path / "ckpt", build_abstract=build)
  assert seen == [(QWEN3_CFG, {"rank": 4})]
  np.testing.assert_array_equal(np.asarray(restored.norm.scale[...]), np.asarray(model.norm.scale[...]))
  # A builder whose structure does not match the saved state fails instead of restoring something else.
  with pytest.raises(Exception):
    ckpt.restore_model(tmp_path / "ckpt", build_abstract=lambda cfg, meta: qwen3.Qwen3(
        dataclasses.replace(cfg, num_hidden_layers=1), rngs=nnx.Rngs(0)))


def test_existing_path_needs_overwrite_and_is_replaced_only_when_complete(tmp_path, random_model):
  a, b = random_model(qwen3.Qwen3, QWEN3_CFG, 0), random_model(qwen3.Qwen3, QWEN3_CFG, 1)
  path = ckpt.save_model(tmp_path / "ckpt", a, meta={"v": 1})
  with pytest.raises(FileExistsError, match="pass overwrite=True"):
    ckpt.save_model(path, b)
  ckpt.save_model(path, b, meta={"v": 2}, overwrite=True)
  assert ckpt.read_meta(path) == {"v": 2}
  np.testing.assert_array_equal(np.asarray(load_model(path).norm.scale[...]), np.asarray(b.norm.scale[...]))
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary or old folders left behind


def test_an_interrupted_save_leaves_nothing_that_looks_finished(tmp_path, random_model, monkeypatch):
  model = random_model(qwen3.Qwen3, QWEN3_CFG, 0)

  def crash(*args, **kwargs):
    raise KeyboardInterrupt("simulated crash while writing")

  # Crash after orbax has written the state, while the info file is being written (ckpt's own `open` only).
  monkeypatch.setattr(ckpt, "open", crash, raising=False)
  with pytest.raises(KeyboardInterrupt):
    ckpt.save_model(tmp_path / "ckpt", model)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == []
  # A temporary folder left by a killed process is never taken for a checkpoint.
  (tmp_path / ".ckpt.tmp-abc" / "state").mkdir(parents=True)
  assert not ckpt.is_checkpoint(tmp_path / ".ckpt.tmp-abc")
  with pytest.raises(FileNotFoundError, match="gilora_ckpt.json is missing.*save never finished"):
    ckpt.restore_model(tmp_path / ".ckpt.tmp-abc")


def test_meta_that_is_not_json_fails_before_writing(tmp_path, random_model):
  with pytest.raises(TypeError, match="not JSON serializable"):
    ckpt.save_model(tmp_path / "ckpt", random_model(qwen3.Qwen3, QWEN3_CFG, 0), meta={"x": np.zeros(2)})
  assert not os.path.exists(tmp_path / "ckpt")


def test_the_info_file_holds_what_restore_needs(tmp_path, random_model):
  path = ckpt.save_model(tmp_path / "ckpt", random_model(deit.DeiT, DEIT_CFG, 0), meta={"step": 3})
  info = json.loads((tmp_path / "ckpt" / ckpt.INFO_FILE).read_text())
  assert info["format"] == ckpt.FORMAT and info["architecture"] == DEIT_CFG.architecture
  assert deit.ModelConfig(**info["config"]) == DEIT_CFG and info["meta"] == {"step": 3}
  info["format"] = "something-else/9"
  (tmp_path / "ckpt" / ckpt.INFO_FILE).write_text(json.dumps(info))
  with pytest.raises(ValueError, match="format 'something-else/9' is not one this gilora_jax reads"):
    ckpt.restore_model(path)


def test_checkpoints_of_earlier_versions_still_load(tmp_path, random_model, caplog):
  """Format 1 (before manifests): no file list, no checksum; it loads, unverified, with a warning."""
  model = random_model(deit.DeiT, DEIT_CFG, 2)
  path = ckpt.save_model(tmp_path / "old", model, meta={"v": 1})
  info_path = tmp_path / "old" / ckpt.INFO_FILE
  info = json.loads(info_path.read_text())
  assert info["format"] == "gilora_jax.ckpt/2"  # the stored name: it must never change
  legacy = {k: info[k] for k in ("architecture", "config", "meta")}
  info_path.write_text(json.dumps({"format": "gilora_jax.ckpt/1", **legacy}))
  import logging  # pylint: disable=import-outside-toplevel
  with caplog.at_level(logging.WARNING):
    restored = load_model(path)
  assert "without checksums" in caplog.text
  x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(deit.forward(restored, x)), np.asarray(deit.forward(model, x)))
  with pytest.raises(FileExistsError, match="older gilora_jax without a file list"):
    ckpt.save_model(path, model, overwrite=True)
