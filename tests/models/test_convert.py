"""HF folder <-> NNX conversion: round trips, sharding, and clear errors for every kind of bad input."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from gilora_jax.models import convert, deit, qwen3
from gilora_jax import load_model


@pytest.fixture
def tiny_qwen3(random_model):
  def build(**kw) -> qwen3.Qwen3:
    cfg = qwen3.ModelConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, **kw)
    return random_model(qwen3.Qwen3, cfg)
  return build


def _assert_same_weights(a: nnx.Module, b: nnx.Module):
  pa, pb = nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b))
  assert jax.tree.structure(pa) == jax.tree.structure(pb)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def saved_qwen3(tmp_path, tiny_qwen3):
  model = tiny_qwen3()
  convert.save_hf(model, tmp_path / "hf")
  return model, str(tmp_path / "hf")


def test_save_then_load_restores_every_weight(saved_qwen3):
  model, folder = saved_qwen3
  assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
  _assert_same_weights(load_model(folder), model)


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_save_and_load(tmp_path, tiny_qwen3, tied):
  model = tiny_qwen3(tie_word_embeddings=tied)
  convert.save_hf(model, tmp_path, max_shard_bytes=4096)
  shards = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))
  assert len(shards) > 2 and os.path.isfile(tmp_path / convert.SAFETENSORS_INDEX)
  assert ("lm_head.weight" in json.loads((tmp_path / convert.SAFETENSORS_INDEX).read_text())["weight_map"]) != tied
  _assert_same_weights(load_model(tmp_path), model)
  # Saving again unsharded into the same folder leaves no stale shards behind.
  convert.save_hf(model, tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_a_path_that_is_not_a_local_folder_says_nothing_is_downloaded(saved_qwen3):
  with pytest.raises(FileNotFoundError, match=r"'Qwen/Qwen3-0.6B' is not an existing local folder.*never downloads.*"
                                              r"pass that local folder"):
    load_model("Qwen/Qwen3-0.6B")
  _, folder = saved_qwen3
  with pytest.raises(NotADirectoryError, match="is a file; pass the local model folder"):
    load_model(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_safetensors_file_is_named_with_the_fix(saved_qwen3, damage):
  _, folder = saved_qwen3
  path = os.path.join(folder, "model.safetensors")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-100] if damage == "truncated" else b"\x00not a safetensors file" * 8)
  with pytest.raises(ValueError, match=rf"{path} is not a readable safetensors file .*corrupt or truncated.*"
                                       r"replace it with an intact copy"):
    load_model(folder)


def test_a_config_of_another_architecture_lists_the_supported_ones(saved_qwen3, rewrite_config):
  _, folder = saved_qwen3
  rewrite_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(ValueError, match=r"config.json: architectures \['GPT2LMHeadModel'\].*not supported; supported: "
                                       r"\['DeiTForImageClassification', 'DeiTForImageClassificationWithTeacher', "
                                       r"'LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM', "
                                       r"'Qwen3ForCausalLM', 'ViTForImageClassification'\]"):
    load_model(folder)


def test_a_missing_shard_is_named(tmp_path, tiny_qwen3):
  convert.save_hf(tiny_qwen3(), tmp_path, max_shard_bytes=4096)
  shard = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))[1]
  os.remove(tmp_path / shard)
  with pytest.raises(FileNotFoundError, match=rf"lists 1 shard\(s\) missing .*'{shard}'.*"
                                              r"Copy every shard into the folder"):
    load_model(tmp_path)


def test_missing_weights_or_config_are_named(saved_qwen3):
  _, folder = saved_qwen3
  os.remove(os.path.join(folder, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="has neither model.safetensors nor model.safetensors.index.json"):
    load_model(folder)
  os.remove(os.path.join(folder, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    load_model(folder)


def test_all_mapping_errors_are_reported_in_one_exception(saved_qwen3):
  _, folder = saved_qwen3
  path = os.path.join(folder, "model.safetensors")
  tensors = load_file(path)
  tensors["model.layers.0.self_attn.q_proj.weigth"] = tensors.pop("model.layers.0.self_attn.q_proj.weight")  # typo
  del tensors["model.norm.weight"]
  tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # legacy buffer: ignored
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied copy: ignored
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(convert.CheckpointMismatchError) as err:
    load_model(folder)
  msg = str(err.value)
  assert "(1 unexpected, 3 missing, 1 wrong shape)" in msg
  assert "unexpected key: model.layers.0.self_attn.q_proj.weigth (model.safetensors)" in msg
  assert "missing (no checkpoint key maps to it): layers.0.self_attn.q_proj.kernel" in msg
  assert "missing (no checkpoint key maps to it): norm.scale" in msg
  assert "missing (no checkpoint key maps to it): layers.1.mlp.up_proj.kernel" in msg
  assert "wrong shape: model.layers.1.mlp.up_proj.weight [16, 31]" in msg and "[16, 32]" in msg


def test_config_reading_errors_name_the_file(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=rf"{tmp_path}/config.json is not valid JSON"):
    load_model(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "deit", "architectures": ["DeiTModel"]}))
  with pytest.raises(ValueError, match="not supported"):
    load_model(tmp_path)
  with pytest.raises(ValueError, match=r"'deit' config .* not a dense Qwen3"):
    qwen3.ModelConfig.from_hf_config(tmp_path)
  with pytest.raises(ValueError, match=r"expected one of \('DeiTForImageClassificationWithTeacher'"):
    deit.ModelConfig.from_hf_config(tmp_path)


def test_a_quantized_or_foreign_variable_cannot_be_saved_as_hf(tmp_path, tiny_qwen3):
  model = tiny_qwen3()
  model.layers[0].mlp.extra = nnx.Param(np.zeros(3, np.float32))
  with pytest.raises(ValueError, match=r"cannot express these Qwen3 variables as HF keys: \['layers.0.mlp.extra'\]"):
    convert.save_hf(model, tmp_path)


@pytest.mark.parametrize("variant", ["gqa_tied", "mha_untied_bias"])
def test_transformers_loads_our_qwen3_folder_bit_exactly(hf_qwen3, torch, variant, tmp_path):
  from transformers import Qwen3ForCausalLM  # pylint: disable=import-outside-toplevel
  pt, folder = hf_qwen3(variant)
  convert.save_hf(load_model(folder), tmp_path)
  back = Qwen3ForCausalLM.from_pretrained(str(tmp_path)).eval()
  ref, ours = pt.state_dict(), back.state_dict()
  assert set(ref) == set(ours)
  for k in ref:
    assert torch.equal(ref[k], ours[k]), k
  ids = torch.tensor(np.arange(14).reshape(2, 7) % pt.config.vocab_size)
  with torch.no_grad():
    assert torch.equal(pt(ids).logits, back(ids).logits)


@pytest.mark.parametrize("arch", ["DeiTForImageClassificationWithTeacher", "ViTForImageClassification"])
def test_transformers_loads_our_deit_folder_bit_exactly(hf_deit, torch, arch, tmp_path):
  import transformers  # pylint: disable=import-outside-toplevel
  pt, folder = hf_deit(arch)
  convert.save_hf(load_model(folder), tmp_path, extra_config={"id2label": pt.config.id2label})
  back = getattr(transformers, arch).from_pretrained(str(tmp_path)).eval()
  for k, v in pt.state_dict().items():
    assert torch.equal(v, back.state_dict()[k]), k
  x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    assert torch.equal(pt(x).logits, back(x).logits)


def test_a_bfloat16_checkpoint_loads_exactly_into_float32(hf_qwen3, torch, tmp_path):
  pt, _ = hf_qwen3("gqa_tied")
  bf16 = type(pt)(pt.config).to(torch.bfloat16)
  bf16.load_state_dict(pt.state_dict())
  bf16.save_pretrained(str(tmp_path))
  model = load_model(tmp_path)
  assert model.config.param_dtype == "float32"
  q_ref = bf16.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(model.layers[1].self_attn.q_proj.kernel[...]), q_ref.T)


@pytest.mark.parametrize("param_dtype", [None, "bfloat16"])
def test_tensors_read_in_pieces_equal_the_whole_read(lm_folder, monkeypatch, param_dtype):
  """Large tensors are read in row pieces placed into one device buffer (`convert._read_to_device`); with pieces of
  a few rows every tensor of the tiny model takes that path, kernels (transposed) and embeddings alike."""
  whole = nnx.to_pure_dict(nnx.state(convert.load_hf(lm_folder, param_dtype=param_dtype)))
  monkeypatch.setattr(convert, "_CHUNK_BYTES", 1000)  # 1000 B: 1-7 rows a piece, the last piece shorter
  placed, place = [], convert._place
  monkeypatch.setattr(convert, "_place", lambda out, part, start, axis: placed.append(axis) or place(out, part, start,
                                                                                                      axis))
  pieces = nnx.to_pure_dict(nnx.state(convert.load_hf(lm_folder, param_dtype=param_dtype)))
  assert placed.count(0) > 10 and placed.count(1) > 10  # the embedding's rows and the kernels' columns
  flat_w, flat_p = jax.tree_util.tree_leaves_with_path(whole), jax.tree_util.tree_leaves_with_path(pieces)
  assert [k for k, _ in flat_w] == [k for k, _ in flat_p]
  for (k, a), (_, b) in zip(flat_w, flat_p):
    assert a.dtype == b.dtype and a.shape == b.shape, k
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=str(k))
