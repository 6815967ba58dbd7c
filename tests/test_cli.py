"""The `gilora` command: quantize-layer's arrays and JSON line; quantize → checkpoint → restore → eval → generate
on tiny HF folders; rules; the flags and their help. The bad-input battery, and the run killed by SIGKILL and
resumed bit-identically, are in tests/test_bad_input.py."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from gilora_jax import cli, load_model, nn
from gilora_jax.models import deit, qwen3
from gilora_jax.nn import QuantizedLinear
from gilora_jax.pipeline import apply, ckpt, data, evaluate, partial, run
from tests.pipeline.tiny import make_lm
from tests.quant import problems


def test_quantize_layer_roundtrip(tmp_path, capsys):
  W, _, H = problems.layer(seed=0, d_in=64, d_out=32, n=300, decay=10)
  np.savez(tmp_path / "in.npz", W=W.astype(np.float32), H=H.astype(np.float32))
  rc = cli.main(["quantize-layer", str(tmp_path / "in.npz"), "--method", "gilora", "--bits", "3", "--rank", "4",
                 "--group-size", "16", "--loops", "1", "--out", str(tmp_path / "out" / "q.npz")])
  assert rc == 0
  rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0 < rec["rel_err"] < 1 and rec["seconds"] > 0 and rec["method"] == "gilora"
  with np.load(tmp_path / "out" / "q.npz") as z:
    assert z["codes"].dtype == np.uint8 and z["L"].shape == (64, 4) and z["R"].shape == (4, 32)
    E = W - z["Q"] - z["L"] @ z["R"]
    np.testing.assert_allclose(np.sum(E * (H @ E)) / np.sum(W * (H @ W)), rec["rel_err"], rtol=1e-3)


@pytest.mark.parametrize("content, match", [(None, "does not exist"), ({"W": np.ones((4, 4))}, "lacks \\['H'\\]"),
                                            ("garbage", "not a readable .npz")])
def test_quantize_layer_bad_input(tmp_path, capsys, content, match):
  path = tmp_path / "in.npz"
  if isinstance(content, dict):
    np.savez(path, **content)
  elif content == "garbage":
    path.write_bytes(b"not an npz")
  rc = cli.main(["quantize-layer", str(path), "--out", str(tmp_path / "o.npz")])
  assert rc == 2
  assert re.search(match, capsys.readouterr().err)


def test_quantize_layer_reports_validation_errors(tmp_path, capsys):
  np.savez(tmp_path / "in.npz", W=np.ones((8, 4), np.float32), H=np.eye(8, dtype=np.float32))
  rc = cli.main(["quantize-layer", str(tmp_path / "in.npz"), "--group-size", "3", "--out", str(tmp_path / "o.npz")])
  assert rc == 2 and "does not divide d_in=8" in capsys.readouterr().err


def test_quantize_layer_flags_and_out_suffix(tmp_path, capsys):
  """--sym, --act-order and --damp reach quantize_layer; an --out without .npz names the file actually written."""
  W, _, H = problems.layer(seed=1, d_in=64, d_out=16, n=300)
  np.savez(tmp_path / "in.npz", W=W.astype(np.float32), H=H.astype(np.float32))
  rc = cli.main(["quantize-layer", str(tmp_path / "in.npz"), "--method", "gptq", "--bits", "4", "--group-size", "16",
                 "--sym", "--act-order", "--damp", "0.05", "--out", str(tmp_path / "q")])
  assert rc == 0
  rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rec["out"] == str(tmp_path / "q.npz") and rec["damp"] == 0.05
  with np.load(rec["out"]) as z:
    np.testing.assert_array_equal(z["zeros"], 8.0)  # symmetric 4-bit grid: zero point (maxq + 1) / 2
    assert z["scales"].shape == (4, 16)


def _options(help_text):
  """{flag: its help, joined} from an argparse help text."""
  out, flag = {}, None
  for line in help_text.splitlines():
    m = re.match(r"^  (-[^\s,]+)", line)
    if m:
      flag = m.group(1)
      parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
      out[flag] = parts[1] if len(parts) > 1 else ""
    elif flag and re.match(r"^ {6,}\S", line):
      out[flag] = (out[flag] + " " + line.strip()).strip()
    elif not line.strip() or not line.startswith(" "):
      flag = None
  return out


def test_every_flag_has_help_and_the_library_default():
  """One source for every default: each layer flag shows LayerConfig's default, quantize_layer's signature uses
  the same, and no flag of any command lacks a help text."""
  import inspect  # pylint: disable=import-outside-toplevel
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  from gilora_jax import config  # pylint: disable=import-outside-toplevel
  parser = cli.build_parser()
  for name, sub in parser.commands.items():
    options = _options(sub.format_help())
    assert len(options) > 3, name
    for flag, text in options.items():
      assert text, (name, flag)
  helps = _options(parser.commands["quantize"].format_help())
  for name in config.FIELDS:
    default = config.default(name)
    shown = ("on" if default else "off") if isinstance(default, bool) else "unset" if default is None else str(default)
    assert f"(default {shown}" in helps[config.flag(name)], (name, helps[config.flag(name)])
  assert "(default 32; the built-in comparison: 16)" in helps["--rank"]
  signature = inspect.signature(gj.quantize_layer).parameters
  for name in ("method", "bits", "rank", "group_size", "symmetric", "loops", "damp", "act_order", "seed"):
    assert signature[name].default == config.default(name), name


def test_rules_reach_any_option(tmp_path):
  """--rule keys are the flat option names (hyphens allowed), typed like the flags."""
  rules = cli.parse_rules([r"layers\.0\..*=bits:4,bidup-order:both,mse:true", ".*down_proj=skip",
                            ".*q_proj=srr_k:none,damp:0.05"])
  assert dict(rules[0].set) == {"bits": 4, "bidup_order": "both", "mse": True} and rules[1].skip
  assert dict(rules[2].set) == {"srr_k": None, "damp": 0.05}
  cfg = __import__("gilora_jax").config.QuantConfig(rules=rules)
  assert cfg.for_module("layers.0.mlp.up_proj").refine.order == "both"
  assert cfg.for_module("layers.1.mlp.down_proj") is None


# ------------------------------------------------------------------------------------------------ whole models

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


@pytest.mark.slow
def test_lm_quantize_save_restore_eval(lm_folder, tmp_path, capsys, caplog):
  out = str(tmp_path / "q")
  rc, lines, err = _run(capsys, "-v", "quantize", "--model", lm_folder, *LM_ARGS, "--diagnostics", "full", "--out",
                        out)
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.slow
def test_a_bf16_checkpoint_streams_in_bf16_with_the_float32_result(tmp_path, capsys):
  """The run keeps a bf16 checkpoint's weights in bf16 (half the memory) and computes in float32: the result is
  the library's on the model loaded so (bit for bit), and that of the model loaded in float32 up to the float32
  round-off of fusing the upcast into other kernels; the parts outside the blocks keep the checkpoint's dtype."""
  folder = str(tmp_path / "bf16")
  make_lm(folder, seed=4, param_dtype="bfloat16")
  out = str(tmp_path / "q")
  rc, _, err = _run(capsys, "quantize", "--model", folder, *LM_ARGS, "--out", out)
  assert rc == 0, err
  calib = data.lm_calibration(data.load_tokenizer(folder), data.load_text(os.path.join(folder, "calib.txt")), 4, 32,
                              2, 0)
  same = apply.quantize_model(load_model(folder, param_dtype="bfloat16"), calib, method="gptq+olrc", bits=3,
                              rank=4).model
  f32 = apply.quantize_model(load_model(folder), calib, method="gptq+olrc", bits=3, rank=4).model
  got = load_model(out)
  assert got.embed_tokens.embedding[...].dtype == jnp.bfloat16 and got.layers[0].input_layernorm.scale[...].dtype \
      == jnp.bfloat16
  _assert_same_state(got, same)
  for i in range(2):
    for rel in ("self_attn.q_proj", "mlp.down_proj"):
      a, b = nn.get_path(got.layers[i], rel), nn.get_path(f32.layers[i], rel)
      assert np.mean(np.asarray(a.codes[...]) == np.asarray(b.codes[...])) > 0.97
      np.testing.assert_allclose(np.asarray(a.dequantized()), np.asarray(b.dequantized()), atol=0.02)


def test_resume_refuses_other_options(lm_folder, tmp_path, capsys):
  out = str(tmp_path / "q")
  partial.start(out + run.PARTIAL_SUFFIX, {"source": lm_folder}, {"config": {}, "num_blocks": 2})
  rc, _, err = _run(capsys, "quantize", "--model", lm_folder, *LM_ARGS, "--out", out)
  assert rc == 2 and "unfinished run with other options" in err
  # a whole-model partial checkpoint of an earlier version is named as such, and left alone
  old = str(tmp_path / "old")
  ckpt.save_quantized(old + run.PARTIAL_SUFFIX, load_model(lm_folder), {"config": {}, "num_blocks": 2,
                                                                        "blocks_done": 1}, [], extra_meta={"run": {}})
  rc, _, err = _run(capsys, "quantize", "--model", lm_folder, *LM_ARGS, "--out", old)
  assert rc == 2 and "unfinished run of an earlier gilora_jax" in err and ckpt.is_checkpoint(old + run.PARTIAL_SUFFIX)


@pytest.mark.slow
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


def test_fast_preset_turns_off_the_clip_search_and_act_order_and_given_flags_win():
  """The defaults search the clip ratio and visit rows in act-order; --fast (config.FAST) is both off, as the
  defaults were before; a flag given beside it wins; quantize_layer takes the preset as keywords."""
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  from gilora_jax import config  # pylint: disable=import-outside-toplevel
  from gilora_jax.examples import example_layer  # pylint: disable=import-outside-toplevel
  assert config.LayerConfig().grid.mse and config.LayerConfig().gptq.act_order
  sub = cli.build_parser().commands["quantize"]
  cfg = lambda *argv: cli._layer_config(sub.parse_args(list(argv)))  # noqa: E731  pylint: disable=protected-access
  assert cfg().grid.mse and cfg().gptq.act_order
  assert not cfg("--fast").grid.mse and not cfg("--fast").gptq.act_order
  assert cfg("--fast", "--mse").grid.mse and not cfg("--fast", "--mse").gptq.act_order
  assert cfg("--fast", "--bits", "4").grid == config.GridSpec(bits=4)
  W, H = example_layer()
  fast = gj.quantize_layer(W, H, **config.FAST)
  plain = gj.quantize_layer(W, H, mse=False, act_order=False)
  np.testing.assert_array_equal(np.asarray(fast.codes), np.asarray(plain.codes))
  assert not np.array_equal(np.asarray(fast.codes), np.asarray(gj.quantize_layer(W, H).codes))


def test_paper_preset_is_fast_with_paper_a_intrinsic_lambda_and_given_flags_win():
  """--paper (config.PAPER) is the papers' settings exactly: --fast's min–max grid and natural order, and gilora's
  intrinsic pass damped as Paper A damps it; --fast keeps the (free) deflated λ."""
  from gilora_jax import config  # pylint: disable=import-outside-toplevel
  sub = cli.build_parser().commands["quantize"]
  cfg = lambda *argv: cli._layer_config(sub.parse_args(list(argv)))  # noqa: E731  pylint: disable=protected-access
  assert cfg().intrinsic_damp == cfg("--fast").intrinsic_damp == "deflated"
  paper = cfg("--paper")
  assert paper == config.LayerConfig().replace(**config.PAPER)
  assert paper.intrinsic_damp == "augmented" and not paper.grid.mse and not paper.gptq.act_order
  assert cfg("--paper", "--intrinsic-damp", "deflated").intrinsic_damp == "deflated"
  assert cfg("--paper", "--act-order").gptq.act_order


def test_the_default_calibration_batch_is_1024_tokens():
  from gilora_jax.pipeline import run  # pylint: disable=import-outside-toplevel
  assert [run.default_batch_size(s, lm=True) for s in (64, 256, 512, 1024, 2048, 5000)] == [16, 4, 2, 1, 1, 1]
  assert run.default_batch_size(224, lm=False) == 8
  assert run.default_batch_size(2048, lm=True, data_devices=4) == 4  # a multiple of the mesh's data axis
  assert run.default_batch_size(256, lm=True, data_devices=3) == 6
