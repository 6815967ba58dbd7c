"""QPEFT's other paths: a DeiT trained on an image folder through the command and exported with its trained adapter
(reloaded by transformers + peft in the export's own check), the bf16 forward, and the image folders that cannot
train (one line each)."""
import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file

from gilora_jax import cli, load_model, nn
from gilora_jax.finetune import TrainConfig, finetune, train

from .test_finetune import lm_data, srr_model, lm, lm_dir  # noqa: F401  pylint: disable=unused-import


def _run(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  cap = capsys.readouterr()
  return rc, [json.loads(x) for x in cap.out.splitlines() if x.startswith("{")], cap.err


def _image_folder(root, per_class=6, classes=4, seed=0):
  """PNGs in class subfolders (the layout users hold): each class a different mean colour, so it can be learnt."""
  rng = np.random.default_rng(seed)
  for c in range(classes):
    os.makedirs(root / f"{c}")
    for i in range(per_class):
      base = np.array([60 * c, 255 - 60 * c, 128], np.float32)
      img = np.clip(base + 40 * rng.standard_normal((32, 32, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(root / f"{c}" / f"{i}.png")
  return root


def _qlayers(model):
  return {".".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, nn.QuantizedLinear)}


def _factors(model):
  return {p: (np.asarray(m.L[...]), np.asarray(m.R[...])) for p, m in _qlayers(model).items()}


@pytest.mark.slow
def test_a_deit_finetunes_on_an_image_folder_and_exports_with_its_trained_adapter(vit_folder, tmp_path, capsys):
  images = _image_folder(tmp_path / "images")
  q, ft, ex = tmp_path / "q", tmp_path / "ft", tmp_path / "ct"
  rc, _, err = _run(capsys, "quantize", "--model", vit_folder, "--method", "gptq+olrc", "--bits", "3", "--rank", "4",
                    "--calib", images, "--nsamples", "8", "--batch-size", "4", "--fast", "--out", q)
  assert rc == 0, err
  rc, lines, err = _run(capsys, "finetune", q, "--images", images, "--init", "olrc", "--steps", "4", "--batch-size",
                        "4", "--eval-every", "2", "--lr", "1e-2", "--out", ft)
  assert rc == 0, err
  summary = lines[-1]
  assert summary["steps"] == 4 and 0 <= summary["eval_accuracy"] <= 1 and "eval_accuracy" in summary["initial"]
  with open(ft / train.CURVES_FILE, encoding="utf-8") as f:
    curves = [json.loads(line) for line in f]
  assert [c["step"] for c in curves] == [0, 1, 2, 3, 4] and all("eval_accuracy" in curves[s] for s in (0, 2, 4))
  assert all(np.isfinite(c["loss"]) for c in curves[1:])
  base, tuned = load_model(str(q)), load_model(str(ft / train.MODEL_DIR))
  fb, ftn = _factors(base), _factors(tuned)
  assert fb.keys() == ftn.keys() and len(fb) == 12
  moved = [p for p in fb if not np.allclose(fb[p][0] @ fb[p][1], ftn[p][0] @ ftn[p][1], atol=1e-6)]
  assert len(moved) == len(fb)  # every layer's L R trained
  for p, b in _qlayers(base).items():
    np.testing.assert_array_equal(np.asarray(b.codes[...]), np.asarray(_qlayers(tuned)[p].codes[...]), err_msg=p)
  # the export's own check reloads the folder with transformers (compressed-tensors) + peft and compares logits
  rc, lines, err = _run(capsys, "export", ft / train.MODEL_DIR, "--format", "ct", "--to", ex)
  assert rc == 0, err
  assert lines[0]["format"] == "ct" and len(lines[0]["check"]) == 2
  with open(ex / "adapter" / "adapter_config.json", encoding="utf-8") as f:
    adapter_cfg = json.load(f)
  weights = load_file(str(ex / "adapter" / "adapter_model.safetensors"))
  path, hf = "layers.0.intermediate.dense", "base_model.model.deit.layers.0.mlp.fc1"  # transformers 5's DeiT names
  a, b = weights[f"{hf}.lora_A.weight"], weights[f"{hf}.lora_B.weight"]
  L, R = ftn[path]
  np.testing.assert_allclose((b.astype(np.float32) @ a.astype(np.float32)).T, L @ R, rtol=0, atol=1e-5)
  assert adapter_cfg["r"] == 4 and not np.allclose(L @ R, fb[path][0] @ fb[path][1], atol=1e-6)


@pytest.mark.slow
def test_image_folders_that_cannot_train_are_one_line(vit_folder, tmp_path, capsys):
  images = _image_folder(tmp_path / "images", per_class=2)
  q = tmp_path / "q"
  rc, _, err = _run(capsys, "quantize", "--model", vit_folder, "--method", "gptq+olrc", "--bits", "3", "--rank", "4",
                    "--calib", images, "--nsamples", "4", "--batch-size", "4", "--fast", "--out", q)
  assert rc == 0, err
  empty, hollow = tmp_path / "empty", tmp_path / "hollow"
  empty.mkdir()
  for c in range(2):
    (hollow / f"{c}").mkdir(parents=True)
  one = _image_folder(tmp_path / "one", per_class=1, classes=1)
  five = _image_folder(tmp_path / "five", per_class=1, classes=5)
  for folder, fragment in ((empty, "no class subfolders and no labels.txt"),
                           (hollow, "no images (files ending in"),
                           (one, "1 images are too few to hold 20% apart"),
                           (five, "label 4 but the model has 4 classes")):
    rc, _, err = _run(capsys, "finetune", q, "--images", folder, "--init", "olrc", "--steps", "2", "--out",
                      tmp_path / "ft")
    assert rc == 2 and fragment in err.strip().splitlines()[-1] and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "ft")


def test_a_bf16_forward_trains_float32_factors_close_to_the_float32_run(srr_model, lm_data):  # noqa: F811
  """`compute_dtype="bfloat16"`: the forward in bf16, L, R and Adam's moments float32; the curve follows the
  float32 run's to bf16 precision, the frozen base is untouched and the result computes in float32 again."""
  model, records = srr_model
  cfg = TrainConfig(steps=3, warmup=1, lr=1e-2)
  runs = {d: finetune(model, lm_data, init="srr", cfg=dataclasses.replace(cfg, compute_dtype=d), batch_size=4,
                      records=records, eval_every=0) for d in ("float32", "bfloat16")}
  f32, bf16 = runs["float32"], runs["bfloat16"]
  key = lambda row: row.get("eval_loss", row.get("loss"))  # noqa: E731
  assert [r["step"] for r in bf16.curves] == [0, 1, 2, 3]
  for a, b in zip(f32.curves, bf16.curves):
    assert abs(key(a) - key(b)) < 0.03 * abs(key(a)), (a, b)
  assert all(key(a) != key(b) for a, b in zip(f32.curves, bf16.curves))  # the bf16 forward did run in bf16
  fa, fb = _qlayers(f32.model), _qlayers(bf16.model)
  assert fa.keys() == fb.keys()
  for p, a in fa.items():
    b = fb[p]
    assert b.L[...].dtype == b.R[...].dtype == np.float32 and b.dtype == a.dtype, p
    np.testing.assert_array_equal(np.asarray(a.codes[...]), np.asarray(b.codes[...]), err_msg=p)
    np.testing.assert_array_equal(np.asarray(a.scales[...]), np.asarray(b.scales[...]), err_msg=p)
    np.testing.assert_allclose(np.asarray(b.L[...] @ b.R[...]), np.asarray(a.L[...] @ a.R[...]), atol=2e-2)
