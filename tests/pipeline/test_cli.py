"""The `gilora` command line end to end on tiny HF folders: quantize → checkpoint → restore → eval, a run killed
by SIGKILL and resumed, and the user-facing errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from gilora_jax import cli
from gilora_jax.pipeline import apply, ckpt, data, evaluate, run
from gilora_jax.models import deit, qwen3
from gilora_jax import load_model
from gilora_jax.nn import QuantizedLinear

from .tiny import make_lm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LM_ARGS = ["--method", "gptq+olrc", "--bits", "3", "--rank", "4", "--nsamples", "4", "--seqlen", "32",
           "--batch-size", "2"]


def _run(capsys, *argv):
  rc = cli.main(list(argv))
  out, err = capsys.readouterr()
  return rc, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def _text(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _jsonl(path):
  return [json.loads(line) for line in _text(path).splitlines()]


def _state(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def _assert_same_state(a, b):
  jax.tree.map(np.testing.assert_array_equal, _state(a), _state(b))


def _layer_lines(caplog):
  return [r for r in caplog.records if r.name == "gilora_jax.pipeline.apply" and "rel_err" in r.getMessage()]


def test_lm_quantize_save_restore_eval(lm_folder, tmp_path, capsys, caplog):
  out = str(tmp_path / "q")
  rc, lines, err = _run(capsys, "-v", "quantize", "--model", lm_folder, *LM_ARGS, "--out", out)
  assert rc == 0, err
  assert lines[0]["layers"] == 14 and lines[0]["blocks"] == 2 and lines[0]["resumed_from_block"] is None
  assert "block 2/2 done" in err and len(_layer_lines(caplog)) == 14  # progress per block, one log line per layer
  assert not os.path.exists(out + run.PARTIAL_SUFFIX)
  records = _jsonl(os.path.join(out, run.RECORDS_FILE))
  assert [r["path"] for r in records[:3]] == [f"layers.0.self_attn.{p}_proj" for p in "qkv"]
  assert all(r["rel_err"] <= r["rel_err_quantized"] for r in records)  # OLrC only ever lowers the error
  png = data.read_image(os.path.join(out, run.PLOT_FILE))
  assert png.shape[2] == 3 and png.min() < 255

  # The CLI's result is the library's on the same calibration windows, bit for bit, and survives the round trip.
  tok = AutoTokenizer.from_pretrained(lm_folder)
  calib = data.lm_calibration(tok, _text(os.path.join(lm_folder, "calib.txt")), 4, 32, 2, 0)
  ref = apply.quantize_model(load_model(lm_folder), calib, method="gptq+olrc", bits=3, rank=4).model
  restored = load_model(out)  # no options passed: the checkpoint rebuilds its own abstract model
  assert isinstance(restored.layers[1].mlp.down_proj, QuantizedLinear)
  _assert_same_state(ref, restored)
  ids = np.asarray(calib[0].inputs)
  np.testing.assert_array_equal(np.asarray(qwen3.forward(ref, ids)), np.asarray(qwen3.forward(restored, ids)))

  rc, lines, err = _run(capsys, "eval", "--model", out, "--seqlen", "64")
  assert rc == 0, err
  text_ids = data.tokenize(tok, _text(os.path.join(lm_folder, "eval.txt")))
  want = evaluate.perplexity(ref, text_ids, 64)
  assert lines[0]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
  assert lines[0]["tokens"] == want["tokens"] == (len(text_ids) // 64) * 63

  rc, lines, err = _run(capsys, "generate", "--model", out, "--prompt", "the king", "--max-new-tokens", "5")
  assert rc == 0, err
  assert lines[0]["completion"] == qwen3.generate(restored, tok, "the king", 5)

  rc, _, err = _run(capsys, "quantize", "--model", lm_folder, *LM_ARGS, "--out", out)
  assert rc == 2 and "already holds a finished checkpoint" in err


def test_vit_quantize_eval(vit_folder, tmp_path, capsys):
  rng = np.random.default_rng(0)
  npz = str(tmp_path / "images.npz")
  np.savez(npz, images=rng.integers(0, 256, (24, 32, 32, 3)).astype(np.uint8), labels=rng.integers(0, 4, 24))
  out = str(tmp_path / "qvit")
  skip, q4 = r"layers\.1\.(intermediate|output)\.dense", r".*attention\.attention\.query"
  rc, lines, err = _run(capsys, "quantize", "--model", vit_folder, "--method", "gptq+olrc", "--bits", "3", "--rank",
                        "4", "--calib", npz, "--nsamples", "8", "--batch-size", "4", "--protocol", "fp",
                        "--rule", f"{skip}=skip", "--rule", f"{q4}=bits:4,rank:0", "--out", out)
  assert rc == 0, err
  assert lines[0]["layers"] == 2 * 6 - 2 and lines[0]["protocol"] == "fp"
  restored = load_model(out)
  float_model = load_model(vit_folder)
  calib = data.vision_calibration(vit_folder, data.load_images(npz, split="calib")[0], 8, 4, 0)
  rules = (apply.Rule(skip, skip=True), apply.Rule(q4, bits=4, rank=0))
  ref = apply.quantize_model(float_model, calib, method="gptq+olrc", bits=3, rank=4, protocol="fp", rules=rules).model
  _assert_same_state(ref, restored)
  # Rules: skipped linears stay float, the query projections are 4-bit without a low-rank term; biases are kept.
  assert isinstance(restored.layers[1].intermediate.dense, nnx.Linear)
  q, k = restored.layers[0].attention.attention.query, restored.layers[0].attention.attention.key
  assert (q.grid.bits, q.rank, k.grid.bits, k.rank) == (4, 0, 3, 4)
  fc1 = restored.layers[0].intermediate.dense
  assert isinstance(fc1, QuantizedLinear) and isinstance(restored.cls_classifier, nnx.Linear)
  np.testing.assert_array_equal(np.asarray(fc1.bias[...]), np.asarray(float_model.layers[0].intermediate.dense.bias[...]))
  px = np.asarray(calib[0].inputs)
  np.testing.assert_array_equal(np.asarray(deit.forward(ref, px)), np.asarray(deit.forward(restored, px)))
  rc, lines, err = _run(capsys, "eval", "--model", out, "--images", npz)
  assert rc == 0, err
  images, labels = data.load_images(npz)
  logits = np.asarray(deit.forward(ref, deit.preprocess(images, vit_folder)))
  assert lines[0] == {"model": out, "images_path": npz, "top1": float(np.mean(logits.argmax(-1) == labels)),
                      "images": 24}


def test_killed_run_resumes_bit_identical(tmp_path, capsys, caplog):
  folder = str(tmp_path / "lm3")
  make_lm(folder, num_layers=3, seed=1)
  out = str(tmp_path / "q")
  argv = ["quantize", "--model", folder, *LM_ARGS, "--out", out]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "float32"}
  proc = subprocess.Popen([sys.executable, "-m", "gilora_jax.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  partial = out + run.PARTIAL_SUFFIX
  deadline = time.monotonic() + 150
  while not ckpt.is_checkpoint(partial) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{stderr.decode()[-2000:]}"
  done = ckpt.read_meta(partial)["quant"]["blocks_done"]
  assert 1 <= done < 3 and not ckpt.is_checkpoint(out)

  rc, lines, err = _run(capsys, "-v", *argv)  # the same command again
  assert rc == 0, err
  assert lines[0]["resumed_from_block"] == done and f"resuming {partial} from block {done}" in caplog.text
  assert len(_layer_lines(caplog)) == 7 * (3 - done)  # only the missing blocks were quantized
  # The uninterrupted result, from the library on the same calibration windows.
  calib = data.lm_calibration(AutoTokenizer.from_pretrained(folder), _text(os.path.join(folder, "calib.txt")), 4, 32,
                             2, 0)
  ref = apply.quantize_model(load_model(folder), calib, method="gptq+olrc", bits=3, rank=4)
  resumed = load_model(out)
  _assert_same_state(resumed, ref.model)  # codes, scales, zeros, L, R of every block
  ids = np.arange(64, dtype=np.int32).reshape(2, 32)
  np.testing.assert_array_equal(np.asarray(qwen3.forward(resumed, ids)), np.asarray(qwen3.forward(ref.model, ids)))
  strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
  assert strip(_jsonl(os.path.join(out, run.RECORDS_FILE))) == strip([r._asdict() for r in ref.records])


def test_resume_refuses_other_options(lm_folder, tmp_path, capsys):
  out = str(tmp_path / "q")
  model = load_model(lm_folder)
  ckpt.save_quantized(out + run.PARTIAL_SUFFIX, model, {"config": {}, "num_blocks": 2, "blocks_done": 1}, [],
                      extra_meta={"run": {}})
  rc, _, err = _run(capsys, "quantize", "--model", lm_folder, *LM_ARGS, "--out", out)
  assert rc == 2 and "unfinished run with other options" in err


def test_clear_errors(lm_folder, tmp_path, capsys):
  rc, _, err = _run(capsys, "eval", "--model", str(tmp_path / "nope"), "--seqlen", "8")
  assert rc == 2 and "is not an existing local folder" in err
  bad = tmp_path / "gpt2"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
  rc, _, err = _run(capsys, "quantize", "--model", str(bad), "--method", "rtn")
  assert rc == 2 and "is not supported" in err and "Qwen3ForCausalLM" in err
  short = tmp_path / "short.txt"
  short.write_text("to be")
  rc, _, err = _run(capsys, "eval", "--model", lm_folder, "--text", str(short), "--seqlen", "64")
  assert rc == 2 and "fewer than one window of seqlen=64" in err
  rc, _, err = _run(capsys, "quantize", "--model", lm_folder, "--method", "gptq", "--calib", str(short), "--seqlen",
                    "64", "--out", str(tmp_path / "x"))
  assert rc == 2 and "fewer than one window" in err
  rc, _, err = _run(capsys, "quantize", "--model", lm_folder, "--method", "gptq", "--rule", "broken",
                    "--out", str(tmp_path / "x"))
  assert rc == 2 and "--rule" in err
