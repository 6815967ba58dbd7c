"""gj.export on tiny random quantized Qwen3 and DeiT models: every format's self-check (decode + transformers/peft
reload), the tensors and configs EXPORT_FORMATS.md specifies, import back, and the refusals."""
import json
import os
import re
import shutil

import compressed_tensors  # noqa: F401  pylint: disable=unused-import  (the test extra pins it: missing must fail)
import numpy as np
import peft  # noqa: F401  pylint: disable=unused-import
import pytest
from safetensors.numpy import load_file

import gilora_jax as gj
from gilora_jax import export as ex
from gilora_jax import nn
from gilora_jax.export import check as check_lib
from gilora_jax.export import formats, packing, reader
from gilora_jax.models import convert
from gilora_jax.pipeline import ckpt
from gilora_jax.pipeline import files as files_lib

from .conftest import save_checkpoint, tiny_lm, tiny_vit


@pytest.fixture(scope="module")
def out(tmp_path_factory):
  return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def lm_ct(qlm, out):
  return ex.export(qlm, out / "lm_ct", format="ct")


@pytest.fixture(scope="module")
def lm_gptq(qlm, out):
  return ex.export(qlm, out / "lm_gptq", format="gptq")


@pytest.fixture(scope="module")
def vit_ct(qvit, out):
  return ex.export(qvit, out / "vit_ct", format="ct", dtype="bfloat16")


def _json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _sites(model):
  return {s.path: s for s in formats.sites(model)}


def _same_quantized(imported, model, scale_dtype, factor_dtype=None):
  """Identical codes and zeros; scales (and factors) as the format rounds them."""
  got, want = _sites(imported), _sites(model)
  assert got.keys() == want.keys()
  for path, s in want.items():
    g = got[path]
    assert g.grid == s.grid
    np.testing.assert_array_equal(g.codes, s.codes)
    np.testing.assert_array_equal(g.zeros, s.zeros)
    np.testing.assert_array_equal(g.scales, formats.rounded(s.scales, scale_dtype))
    if factor_dtype is not None:
      L, R = formats.adapter_factors(s, factor_dtype)
      np.testing.assert_array_equal(g.L, L)
      np.testing.assert_array_equal(g.R, R)


def test_ct_qwen3_reloads_in_transformers_and_peft_and_imports_back(qlm, lm_ct):
  assert lm_ct["lowrank"] == "adapter" and lm_ct["check"][0].startswith("decode")
  assert "base:" in lm_ct["check"][1] and "base + adapter:" in lm_ct["check"][1]
  folder = lm_ct["out"]
  qc = _json(os.path.join(folder, "config.json"))["quantization_config"]
  assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"] and "scale_dtype" not in str(qc)
  t = load_file(os.path.join(folder, "model.safetensors"))
  q = "model.layers.0.self_attn.k_proj"  # 64 -> 32: weight (d_out, d_in) = (32, 64)
  assert t[f"{q}.weight_packed"].dtype == np.int32 and t[f"{q}.weight_packed"].shape == (32, 64 * 4 // 32)
  assert t[f"{q}.weight_scale"].shape == (32, 2) and t[f"{q}.weight_zero_point"].shape == (32 * 4 // 32, 2)
  assert t[f"{q}.weight_shape"].tolist() == [32, 64] and f"{q}.weight" not in t and "lm_head.weight" in t
  d = "model.layers.1.mlp.down_proj"  # 96 -> 64, three groups of 32 along d_in
  assert t[f"{d}.weight_packed"].shape == (64, 96 * 4 // 32) and t[f"{d}.weight_scale"].shape == (64, 3)
  assert t[f"{d}.weight_zero_point"].shape == (64 * 4 // 32, 3) and t[f"{d}.weight_shape"].tolist() == [64, 96]
  for name in ("tokenizer.json",):  # no side files from an in-memory model
    assert not os.path.exists(os.path.join(folder, name))
  cfg = _json(os.path.join(folder, "adapter", "adapter_config.json"))
  assert cfg["r"] == cfg["lora_alpha"] == 4 and not cfg["use_dora"] and not cfg["use_rslora"]
  assert cfg["modules_to_save"] is None and cfg["rank_pattern"] == {}
  assert cfg["base_model_name_or_path"] == "lm_ct"  # the folder's name, not a path of this machine
  a = load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))
  assert a[f"base_model.model.{q}.lora_A.weight"].shape == (4, 64)  # (r, d_in)
  assert a[f"base_model.model.{q}.lora_B.weight"].shape == (32, 4)  # (d_out, r)
  assert a[f"base_model.model.{d}.lora_A.weight"].shape == (4, 96)
  imported = gj.load_model(folder)
  _same_quantized(imported, qlm, "float32", "float32")
  ids = check_lib.inputs(qlm)
  np.testing.assert_allclose(check_lib.jax_logits(imported, ids), check_lib.jax_logits(qlm, ids), atol=1e-4)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_the_adapter_is_applied_by_peft_not_just_loaded(lm_ct):
  """The reload check compares base and base + adapter separately; the adapter must move the logits well past the
  check's tolerance, or a silently ignored adapter would pass."""
  x = np.random.default_rng(0).integers(0, 101, size=(2, 16)).astype(np.int32)
  base, full = check_lib.torch_logits(lm_ct["out"], x, True, os.path.join(lm_ct["out"], "adapter"))
  assert np.abs(full - base).max() > 100 * check_lib.RTOL * max(1.0, np.abs(base).max())


def test_gptq_tensors_configs_and_import(qlm, lm_ct, lm_gptq):
  folder = lm_gptq["out"]
  assert lm_gptq["gptq_format"] == packing.V2 and lm_gptq["dtype"] == "float16"  # asymmetric -> v2
  config = _json(os.path.join(folder, "config.json"))
  assert config["quantization_config"] == _json(os.path.join(folder, "quantize_config.json"))
  qc = config["quantization_config"]
  assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["checkpoint_format"]) == (4, 32, False, False,
                                                                                                 "gptq_v2")
  t, c = load_file(os.path.join(folder, "model.safetensors")), load_file(os.path.join(lm_ct["out"],
                                                                                     "model.safetensors"))
  q = "model.layers.1.mlp.down_proj"  # 96 -> 64
  assert t[f"{q}.qweight"].shape == (96 * 4 // 32, 64) and t[f"{q}.qzeros"].shape == (3, 64 * 4 // 32)
  np.testing.assert_array_equal(t[f"{q}.qweight"], c[f"{q}.weight_packed"].T)  # one bitstream, two orientations
  np.testing.assert_array_equal(t[f"{q}.g_idx"], np.arange(96) // 32)
  k = "model.layers.0.self_attn.v_proj"  # 64 -> 32
  assert t[f"{k}.qweight"].shape == (64 * 4 // 32, 32) and t[f"{k}.qzeros"].shape == (2, 32 * 4 // 32)
  assert t[f"{k}.scales"].shape == (2, 32) and t["model.layers.0.mlp.up_proj.qweight"].shape == (8, 96)
  assert t[f"{q}.scales"].dtype == np.float16 and t["model.embed_tokens.weight"].dtype == np.float16
  _same_quantized(gj.load_model(folder), qlm, "float16", "float16")


def test_symmetric_gptq_is_v1_with_the_golden_zero_words(tmp_path):
  model = tiny_lm(bits=4, group_size=None, symmetric=True, rank=0)
  s = ex.export(model, tmp_path / "g", format="gptq")
  assert s["gptq_format"] == packing.V1 and s["lowrank"] == "drop"  # rank 0: no adapter to write
  assert not os.path.exists(tmp_path / "g" / "adapter")
  t = load_file(str(tmp_path / "g" / "model.safetensors"))
  words = t["model.layers.0.self_attn.q_proj.qzeros"].view(np.uint32)
  assert {hex(int(w)) for w in words.ravel()} == {"0x77777777"}  # 8 - 1 in every nibble
  _same_quantized(gj.load_model(str(tmp_path / "g")), model, "float16")


def test_gptq_v1_on_an_asymmetric_model_is_refused_with_the_count_of_zero_points(qlm, tmp_path):
  zero = sum(int(np.count_nonzero(s.int_zeros() == 0)) for s in formats.sites(qlm))
  assert zero > 0
  with pytest.raises(ValueError, match=f"{zero} of .* zero points .* are 0"):
    ex.export(qlm, tmp_path / "g", format="gptq", gptq_format="v1")
  assert not os.listdir(tmp_path)  # refused before anything was written
  safe = tiny_lm(seed=3)  # no zero of 0: v1 may hold it
  for s in formats.sites(safe):
    nn.get_path(safe, s.path).zeros[...] = np.maximum(s.zeros, 1.0)
  assert ex.export(safe, tmp_path / "v1", format="gptq", gptq_format="v1")["gptq_format"] == packing.V1
  _same_quantized(gj.load_model(str(tmp_path / "v1")), safe, "float16")


def _rewrite_json(path, **changes):
  obj = _json(path)
  for k, v in changes.items():
    if v is None:
      obj.pop(k, None)
    else:
      obj[k] = v
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)


def _relabel_gptq(folder, **changes):
  """The same changes in both GPTQ configs (config.json's quantization_config and quantize_config.json)."""
  config = _json(os.path.join(folder, "config.json"))
  _rewrite_json(os.path.join(folder, "config.json"), quantization_config={**config["quantization_config"], **changes})
  _rewrite_json(os.path.join(folder, "quantize_config.json"), **changes)


def test_gptq_sym_zeros_must_be_the_midpoint_and_the_v2_as_v1_mislabel_is_named(lm_gptq, tmp_path):
  """EXPORT_FORMATS.md §2.3's trap: v2 zeros (8) under checkpoint_format "gptq" decode to 9 and, unchecked, load
  into a model that is wrong everywhere."""
  model = tiny_lm(bits=4, group_size=None, symmetric=True, rank=0)
  folder = str(tmp_path / "sym_v2")
  ex.export(model, folder, format="gptq", gptq_format="v2")
  _same_quantized(gj.load_model(folder), model, "float16")  # labelled as written: fine
  _relabel_gptq(folder, checkpoint_format="gptq", format="gptq")  # the mislabel
  with pytest.raises(ValueError, match=r"every zero decodes to 9, not 2\^\(b-1\) = 8.*v2 zeros .z. under "
                                       r"checkpoint_format 'gptq'.*set \"checkpoint_format\" and \"format\" to "
                                       r"\"gptq_v2\"") as e:
    gj.load_model(folder)
  assert len(str(e.value).splitlines()) == 1
  asym = str(tmp_path / "asym")
  shutil.copytree(lm_gptq["out"], asym)
  _relabel_gptq(asym, sym=True)  # asymmetric zeros labelled symmetric
  with pytest.raises(ValueError, match=r"sym is true but \d+ of \d+ zeros decode to something other than"):
    gj.load_model(asym)


def test_an_autogptq_folder_with_only_quantize_config_json_loads(qlm, lm_gptq, tmp_path):
  """AutoGPTQ wrote quantize_config.json (no quant_method, sometimes) and no config.json quantization_config, and
  named its weights file after model_file_base_name."""
  folder = str(tmp_path / "autogptq")
  shutil.copytree(lm_gptq["out"], folder, ignore=shutil.ignore_patterns("adapter"))
  _rewrite_json(os.path.join(folder, "config.json"), quantization_config=None)
  _rewrite_json(os.path.join(folder, "quantize_config.json"), quant_method=None,
                model_file_base_name="gptq_model-4bit-32g")
  os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "gptq_model-4bit-32g.safetensors"))
  _same_quantized(gj.load_model(folder), qlm, "float16")


def test_activation_quantization_in_a_ct_config_is_refused(lm_ct, tmp_path):
  folder = str(tmp_path / "w4a8")
  shutil.copytree(lm_ct["out"], folder)
  config = _json(os.path.join(folder, "config.json"))
  config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
      "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
  _rewrite_json(os.path.join(folder, "config.json"), **config)
  with pytest.raises(ValueError, match=r"quantizes activations \(input_activations: 8-bit int.*weight-only"):
    gj.load_model(folder)


@pytest.mark.parametrize("field, value, message", [
    ("kv_cache_scheme", {"num_bits": 8, "type": "float", "strategy": "tensor"}, r"quantizes the KV cache \(8-bit"),
    ("sparsity_config", {"format": "sparse-24-bitmask", "targets": ["Linear"]}, r"sparsity_config applies sparsity"),
    ("transform_config", {"config_groups": {"u": {"type": "hadamard"}}}, r"transform_config applies transforms"),
])
def test_kv_cache_sparsity_and_transform_configs_are_refused(lm_ct, tmp_path, field, value, message):
  folder = str(tmp_path / field)
  shutil.copytree(lm_ct["out"], folder)
  config = _json(os.path.join(folder, "config.json"))
  config["quantization_config"][field] = value
  _rewrite_json(os.path.join(folder, "config.json"), **config)
  with pytest.raises(ValueError, match=message + r".*export without"):
    gj.load_model(folder)


def test_dense_qwen3_matches_our_quantized_model_in_float32(qlm, out):
  s = ex.export(qlm, out / "lm_dense", format="dense")
  assert s["lowrank"] == "merge" and not os.path.exists(out / "lm_dense" / "adapter")
  float_model = gj.load_model(str(out / "lm_dense"))  # a plain float Qwen3
  assert not _sites(float_model)
  ids = check_lib.inputs(qlm)
  np.testing.assert_allclose(check_lib.jax_logits(float_model, ids), check_lib.jax_logits(qlm, ids), atol=1e-4)


def test_deit_ct_bf16_and_dense_reload(qvit, vit_ct, out):
  assert len(vit_ct["check"]) == 2 and "base + adapter" in vit_ct["check"][1]
  qc = _json(os.path.join(vit_ct["out"], "config.json"))["quantization_config"]
  assert qc["version"] == "0.18.0"  # 3-bit packing needs compressed-tensors >= 0.18
  assert set(qc["ignore"]) == {"cls_classifier", "distillation_classifier"}
  t = load_file(os.path.join(vit_ct["out"], "model.safetensors"))
  q = "deit.encoder.layer.0.attention.attention.query"
  assert t[f"{q}.weight_scale"].dtype.name == "bfloat16" and t[f"{q}.weight_scale"].shape == (64, 1)
  assert f"{q}.weight_zero_point" not in t and t[f"{q}.bias"].dtype.name == "bfloat16"  # symmetric: no zeros
  up, down = "deit.encoder.layer.1.intermediate.dense", "deit.encoder.layer.1.output.dense"  # 64 -> 96 -> 64
  assert t[f"{up}.weight_packed"].shape == (96, 64 * 3 // 32) and t[f"{up}.weight_shape"].tolist() == [96, 64]
  assert t[f"{down}.weight_packed"].shape == (64, 96 * 3 // 32) and t[f"{down}.weight_scale"].shape == (64, 1)
  _same_quantized(gj.load_model(vit_ct["out"]), qvit, "bfloat16", "bfloat16")
  s = ex.export(qvit, out / "vit_dense", format="dense", adapter=True)  # dense Q plus the adapter
  assert s["lowrank"] == "adapter" and "base + adapter" in s["check"][1]


def test_per_layer_ranks_are_zero_padded_to_one_r(tmp_path):
  """vLLM reads `r` alone (it ignores rank_pattern), so every layer is padded with zero rank-1 terms to the largest
  rank, which adds nothing to L R; lora_alpha = r keeps the scaling 1."""
  ranks = {"layers.1.mlp.down_proj": 2, "layers.0.self_attn.k_proj": 0, "layers.0.self_attn.q_proj": 6}
  model = tiny_lm(rank=4, ranks=ranks)  # 4 is the most common rank, 6 the largest
  s = ex.export(model, tmp_path / "r", format="ct")
  cfg = _json(tmp_path / "r" / "adapter" / "adapter_config.json")
  assert cfg["r"] == cfg["lora_alpha"] == 6 and cfg["rank_pattern"] == cfg["alpha_pattern"] == {}
  assert "model.layers.0.self_attn.k_proj" not in cfg["target_modules"] and len(cfg["target_modules"]) == 13
  a = load_file(str(tmp_path / "r" / "adapter" / "adapter_model.safetensors"))
  assert {v.shape[0] for k, v in a.items() if k.endswith("lora_A.weight")} == {6}
  assert {v.shape[1] for k, v in a.items() if k.endswith("lora_B.weight")} == {6}
  down = "base_model.model.model.layers.1.mlp.down_proj"
  assert not a[f"{down}.lora_A.weight"][2:].any() and not a[f"{down}.lora_B.weight"][:, 2:].any()
  assert "base + adapter" in s["check"][1]  # peft applied the padded factors: the same L R
  imported = _sites(gj.load_model(str(tmp_path / "r")))  # the padding is trimmed: every layer at its own rank
  assert {p: imported[p].rank for p in ranks} == {p: r for p, r in ranks.items()}
  assert imported["layers.1.mlp.up_proj"].rank == 4


def test_a_failing_self_check_leaves_no_folder(qlm, tmp_path, monkeypatch):
  real = formats.ct_tensors

  def corrupt(site, dtype):
    t = real(site, dtype)
    key = f"{site.hf}.weight_packed"
    t[key] = t[key].copy()
    t[key][0, 0] ^= 1  # one bit of one code
    return t
  monkeypatch.setattr(formats, "ct_tensors", corrupt)
  with pytest.raises(check_lib.ExportCheckError, match="codes: 1 of 4096 values differ"):
    ex.export(qlm, tmp_path / "bad", format="ct")
  assert os.listdir(tmp_path) == []  # neither the folder nor its temporary


def test_refusals_name_the_fix(qlm, qvit, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="ct or --format dense"):
    ex.export(qvit, tmp_path / "a", format="gptq")
  with pytest.raises(ValueError, match="cannot absorb L R"):
    ex.export(qlm, tmp_path / "a", format="ct", merge_adapter=True)
  with pytest.raises(ValueError, match="choose one of ct, gptq, dense"):
    ex.export(qlm, tmp_path / "a", format="awq")
  with pytest.raises(ValueError, match="one .bits, group size, symmetric. per checkpoint"):
    ex.export(_mixed_bits(), tmp_path / "a", format="gptq")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty"):
    ex.export(qlm, tmp_path / "full", format="gptq")
  monkeypatch.setattr(check_lib, "missing_reload_packages", lambda: ["peft~=0.21.2"])
  with pytest.raises(ValueError, match=r"pip install 'gilora_jax\[export\]'.*--no-check"):
    ex.export(qlm, tmp_path / "a", format="ct")
  assert sorted(os.listdir(tmp_path)) == ["full"]


@pytest.fixture(scope="module")
def checkpoints(qlm, qvit, out):
  return {"lm": save_checkpoint(qlm, out / "lm_ckpt"), "vit": save_checkpoint(qvit, out / "vit_ckpt")}


def _never(*args, **kwargs):
  raise AssertionError("reached a step that a refusal should have come before")


def test_refusals_come_before_the_source_is_read(checkpoints, lm_ct, tmp_path, monkeypatch):
  """A bad destination, argument or architecture is refused from the metadata alone: restoring a checkpoint hashes
  every file and reads every weight, which on an 8B model is minutes spent before a one-line refusal."""
  monkeypatch.setattr(ckpt, "restore_model", _never)
  monkeypatch.setattr(reader, "load", _never)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("mine")
  for src in (checkpoints["lm"], lm_ct["out"]):  # a gilora checkpoint, and a ct folder read back
    with pytest.raises(FileExistsError, match="not empty"):
      ex.export(src, tmp_path / "full", format="ct")
    with pytest.raises(ValueError, match="dtype='float64': choose one of"):
      ex.export(src, tmp_path / "a", format="dense", dtype="float64")
    with pytest.raises(ValueError, match="GPTQ checkpoints are float16"):
      ex.export(src, tmp_path / "a", format="gptq", dtype="bfloat16")
    with pytest.raises(ValueError, match="gptq_format='v3'"):
      ex.export(src, tmp_path / "a", format="gptq", gptq_format="v3")
  with pytest.raises(ValueError, match="DeiTForImageClassificationWithTeacher cannot be exported as GPTQ"):
    ex.export(checkpoints["vit"], tmp_path / "a", format="gptq")
  assert sorted(os.listdir(tmp_path)) == ["full"]


def test_an_adapter_that_overflows_float16_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  model = tiny_lm(seed=4)
  lin = nn.get_path(model, "layers.1.mlp.up_proj")
  lin.L[...] = lin.L[...] * 1e7  # L R ~ 3e11: no balancing fits it in float16
  lin.R[...] = lin.R[...] * 1e7
  monkeypatch.setattr(files_lib, "make_temp_dir", _never)
  monkeypatch.setattr(convert, "write_safetensors", _never)
  with pytest.raises(ValueError, match="up_proj low-rank factors.*overflow float16"):
    ex.export(model, tmp_path / "a", format="ct", dtype="float16", check=False)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("where", ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight_scale",
                                   "deit.encoder.layer.0.attention.attention.query.bias"])
def test_every_float16_cast_is_range_checked(where, tmp_path):
  """A value past 65504 would be written as inf, and inf == inf passes the bit-for-bit decode check."""
  model = tiny_vit(bits=4) if where.startswith("deit") else tiny_lm()
  if where == "model.embed_tokens.weight":
    model.embed_tokens.embedding[0, 0] = 1e5
  elif where.endswith("weight_scale"):
    nn.get_path(model, "layers.0.mlp.up_proj").scales[0, 0] = 1e5
  else:
    nn.get_path(model, "layers.0.attention.attention.query").bias[3] = -1e5
  with pytest.raises(ValueError, match=f"{re.escape(where)}: .values. up to 1e\\+05 overflow float16"):
    ex.export(model, tmp_path / "a", format="ct", dtype="float16", check=False)
  assert not os.listdir(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced descriptors through /proc")
def test_every_file_and_folder_is_fsynced_before_the_rename(qlm, tmp_path, monkeypatch):
  real_fsync, real_rename = os.fsync, os.rename
  synced, unsynced_at_rename = set(), []

  def fsync(fd):
    synced.add(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
    real_fsync(fd)

  def rename(src, dst):
    if os.path.basename(src).startswith(".a.tmp-"):
      src = os.path.realpath(src)
      written = {src} | {os.path.join(root, n) for root, dirs, names in os.walk(src) for n in dirs + names}
      unsynced_at_rename.append(sorted(os.path.relpath(p, src) for p in written - synced))
    real_rename(src, dst)
  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "rename", rename)
  ex.export(qlm, tmp_path / "a", format="ct", check=False)
  assert unsynced_at_rename == [[]]


def _mixed_bits():
  model = tiny_lm()
  other = tiny_lm(bits=8, seed=5)
  nn.set_path(model, "layers.0.mlp.up_proj", nn.get_path(other, "layers.0.mlp.up_proj"))
  return model


def test_the_source_config_keeps_no_stale_torch_dtype(qlm, lm_folder, tmp_path):
  source = tmp_path / "src"
  source.mkdir()
  original = _json(os.path.join(lm_folder, "config.json"))
  (source / "config.json").write_text(json.dumps({**original, "torch_dtype": "bfloat16", "initializer_range": 0.02}))
  folder = tmp_path / "g"
  ex.export(save_checkpoint(qlm, tmp_path / "q", source=str(source)), folder, format="gptq", check=False)
  config = _json(folder / "config.json")
  assert config["dtype"] == "float16" and "torch_dtype" not in config
  assert config["initializer_range"] == 0.02  # the rest of the original's config is kept


def test_float_and_unknown_inputs_are_refused(tmp_path, lm_folder):
  with pytest.raises(ValueError, match="neither a gilora checkpoint"):
    ex.export(lm_folder, tmp_path / "a", format="ct")


LLAMA_FAMILY = {  # a tied Qwen2 with q/k/v biases, an untied Llama with llama3 RoPE: the other ports' folders
    "Qwen2ForCausalLM": dict(qkv_bias=True, tie_word_embeddings=True, rope_theta=1e6),
    "LlamaForCausalLM": dict(rope_type="llama3", rope_factor=8.0, rope_original_max_position_embeddings=16),
}


@pytest.mark.parametrize("architecture", sorted(LLAMA_FAMILY))
def test_the_llama_family_exports_reloads_and_imports_back(architecture, tmp_path):
  """ct (+ adapter, reloaded by transformers and peft in the self-check), gptq and dense for Llama and Qwen2."""
  from gilora_jax.models import llama  # pylint: disable=import-outside-toplevel
  from tests.pipeline.tiny import random_model  # pylint: disable=import-outside-toplevel

  from .conftest import EXPORT_LM_CONFIG, quantize_randomly  # pylint: disable=import-outside-toplevel
  base = {k: v for k, v in EXPORT_LM_CONFIG.items() if k in llama.ModelConfig.__dataclass_fields__}
  cfg = llama.ModelConfig(**{**base, **LLAMA_FAMILY[architecture], "architecture": architecture})
  model = quantize_randomly(random_model(llama.Llama, cfg, seed=4))
  for fmt in ("ct", "gptq", "dense"):
    res = ex.export(model, tmp_path / fmt, format=fmt)
    assert res["check"], res
    cfg_json = _json(os.path.join(res["out"], "config.json"))
    assert cfg_json["architectures"] == [architecture]
    if fmt != "dense":
      _same_quantized(gj.load_model(res["out"]), model, "float16" if fmt == "gptq" else "float32")
  ct = _json(os.path.join(tmp_path / "ct", "adapter", "adapter_config.json"))
  assert ct["task_type"] == "CAUSAL_LM"
