"""QPEFT (`gilora_jax.finetune`): only L and R move, SRR's γ acts on the preserved block, a run killed by SIGKILL
resumes to the same loss curve, and bad input is one clear error. Tiny models and a few steps: the whole file
must stay within a few tens of seconds on a 2-core CI box."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from gilora_jax import cli
from gilora_jax.finetune import TrainConfig, core, finetune, train
from gilora_jax.nn import QuantizedLinear
from gilora_jax.pipeline import apply, calib, ckpt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = TrainConfig(steps=3, warmup=1, lr=1e-2)


def _flat(model):
  return {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]}


def _key(path):
  return ".".join(str(getattr(k, "key", k)) for k in path)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
  """A 1-block tiny Qwen3 HF folder (one block: the train step compiles in a few seconds). The persistent
  compilation cache is on from here, so the killed subprocess below finds the step compiled."""
  from gilora_jax import runtime  # pylint: disable=import-outside-toplevel
  from tests.pipeline.tiny import make_lm  # pylint: disable=import-outside-toplevel
  runtime.enable_compilation_cache()
  folder = str(tmp_path_factory.mktemp("lm1"))
  make_lm(folder, num_layers=1, seed=3)
  return folder


@pytest.fixture(scope="module")
def lm(lm_dir):
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  return load_model(lm_dir)


@pytest.fixture(scope="module")
def srr_model(lm, lm_calib):
  q = apply.quantize_model(lm, lm_calib, method="srr", bits=3, rank=4, srr_k=2,
                           final_olrc=False)  # both blocks non-empty, and kept
  return q.model, [r._asdict() for r in q.records]


@pytest.fixture(scope="module")
def lm_data():
  stream = np.random.default_rng(0).integers(0, 101, 1200).astype(np.int32)
  return train.lm_data(stream, 16)


def _start(model, records):
  """The model as training starts: the srr init (its factors balanced)."""
  start = train.nn.clone(model)
  train.init_factors(start, "srr", core.factor_paths(start), key=jax.random.key(0), records=records)
  return start


def test_only_the_factors_move_and_gamma_zero_freezes_the_preserved_block(srr_model, lm_data):
  model, records = srr_model
  untouched = _flat(model)
  before = _flat(_start(model, records))
  res = finetune(model, lm_data, init="srr", cfg=CFG, batch_size=4, gamma=0.0, records=records, eval_every=0)
  after = _flat(res.model)
  assert res.ks == {r["path"]: r["srr_k"] for r in records} and any(res.ks.values())
  moved = set()
  for path, x in before.items():
    name = _key(path)
    if name.rsplit(".", 1)[-1] not in ("L", "R"):
      np.testing.assert_array_equal(after[path], x, err_msg=name)  # codes, scales, zeros, norms, embeddings, head
      continue
    layer = name.rsplit(".", 1)[0]
    k = res.ks[layer]
    pres, resid = (np.s_[:, :k], np.s_[:, k:]) if name.endswith("L") else (np.s_[:k], np.s_[k:])
    np.testing.assert_array_equal(after[path][pres], x[pres], err_msg=name)  # γ = 0: bit for bit
    if not np.array_equal(after[path][resid], x[resid]):
      moved.add(layer)
  assert moved == {p for p, k in res.ks.items() if k < 4}  # every layer's residual block trained (r = 4)
  assert all(np.array_equal(_flat(model)[p], untouched[p]) for p in untouched)  # the input model is left as it was
  assert [c["step"] for c in res.curves] == [0, 1, 2, 3] and "eval_perplexity" in res.curves[-1]


def test_gamma_scales_the_preserved_blocks_update(srr_model, lm_data):
  """Adam's first update is the same whatever the gradient's scale; γ multiplies it on the preserved block only."""
  model, records = srr_model
  one = TrainConfig(steps=1, warmup=0, lr=1e-2)
  full, half = (finetune(model, lm_data, init="srr", cfg=one, batch_size=4, gamma=g, records=records,
                         eval_every=0).model for g in (1.0, 0.5))
  b0, bf, bh = _flat(_start(model, records)), _flat(full), _flat(half)
  layer = "layers.0.mlp.down_proj"
  k = next(r["srr_k"] for r in records if r["path"] == layer)
  for path in b0:
    if _key(path) in (f"{layer}.L", f"{layer}.R"):
      d_full, d_half = bf[path] - b0[path], bh[path] - b0[path]
      pres, resid = (np.s_[:, :k], np.s_[:, k:]) if _key(path).endswith("L") else (np.s_[:k], np.s_[k:])
      np.testing.assert_allclose(d_half[pres], 0.5 * d_full[pres], rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(d_half[resid], d_full[resid], rtol=1e-5, atol=1e-7)
      assert np.abs(d_full[pres]).max() > 0


def test_inits_from_one_base(lm, lm_calib, lm_data):
  """zero and loftq start from the checkpoint's Q: zero leaves Q + L R = Q, loftq is the SVD of W − Q."""
  q = apply.quantize_model(lm, lm_calib, method="gptq+olrc", bits=3, rank=4)
  path = "layers.0.self_attn.q_proj"
  for init in ("zero", "loftq"):
    model = train.nn.clone(q.model)
    train.init_factors(model, init, [path], key=jax.random.key(0), float_model=lm)
    layer = train.nn.get_path(model, path)
    LR = np.asarray(layer.L[...] @ layer.R[...])
    if init == "zero":
      assert np.all(LR == 0) and np.abs(np.asarray(layer.L[...])).max() > 0
    else:
      E = np.asarray(train.nn.get_path(lm, path).kernel[...]) - np.asarray(layer.dequantized())
      U, s, Vt = np.linalg.svd(E)
      np.testing.assert_allclose(LR, (U[:, :4] * s[:4]) @ Vt[:4], atol=1e-4)
  with pytest.raises(ValueError, match="keeps the factors a srr quantization wrote.*gptq\\+olrc"):
    train.init_factors(train.nn.clone(q.model), "srr", [path], key=jax.random.key(0),
                       records=[r._asdict() for r in q.records])


def test_rank_zero_and_diverging_runs_are_clear_errors(tmp_path, lm, lm_calib, srr_model, lm_data):
  rtn = apply.quantize_model(lm, lm_calib, method="rtn", bits=3).model
  with pytest.raises(ValueError, match="no low-rank factors \\(rank 0"):
    finetune(rtn, lm_data, init="zero", cfg=CFG)
  model, records = srr_model
  out = str(tmp_path / "nan")
  wild = TrainConfig(steps=6, warmup=0, lr=1e30, clip=0.0)
  with pytest.raises(train.DivergedError, match=r"loss became nan at step 2 \(learning rate 9.4e\+29\).*last good checkpoint is "
                     r".*step_0000001 \(step 1\)"):
    finetune(model, lm_data, init="srr", cfg=wild, batch_size=4, records=records, out=out, ckpt_every=1, eval_every=0)
  assert train._our_steps(out) == [1]  # pylint: disable=protected-access
  merged = [{**r, "config": {**r["config"], "final_olrc": True}} for r in records]  # SRR then its final OLrC
  with pytest.raises(ValueError, match="replaces them by one optimal rank-r term.*--no-final-olrc"):
    train.init_factors(train.nn.clone(model), "srr", core.factor_paths(model), key=jax.random.key(0),
                       records=merged)
  with pytest.raises(ValueError, match="fewer than one window of seqlen=16"):
    train.lm_data(np.arange(10, dtype=np.int32), 16)
  with pytest.raises(ValueError, match="holds a fine-tune run of another model"):
    finetune(model, lm_data, init="srr", cfg=wild, batch_size=4, records=records, out=out,
             source="another checkpoint")


def _write_checkpoint(folder, model, records, tokenizer_folder):
  side = {n: os.path.join(tokenizer_folder, n) for n in ("tokenizer.json", "tokenizer_config.json")
          if os.path.isfile(os.path.join(tokenizer_folder, n))}
  ckpt.save_quantized(folder, model, {"config": {}, "blocks_done": 2, "num_blocks": 2}, records, files=side)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_curve(tmp_path, lm_dir, srr_model, capsys):
  """SIGKILL after the first checkpoint; the same command resumes and the curve (and the result) equal an
  uninterrupted run's. The uninterrupted run goes first, in this process: the killed one then finds its compiled
  step in the shared compilation cache."""
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  qdir = str(tmp_path / "q")
  _write_checkpoint(qdir, *srr_model, lm_dir)
  text = os.path.join(lm_dir, "calib.txt")
  args = ["finetune", qdir, "--text", text, "--init", "srr", "--steps", "40", "--ckpt-every", "4", "--eval-every",
          "20", "--seqlen", "16", "--batch-size", "4", "--lr", "5e-3"]
  assert cli.main([*args, "--out", str(tmp_path / "ref")]) == 0
  ref = json.loads(capsys.readouterr().out.splitlines()[-1])
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  out = str(tmp_path / "ft")
  proc = subprocess.Popen([sys.executable, "-m", "gilora_jax.cli", *args, "--out", out], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 300  # a loaded machine compiles slowly
  while not train._our_steps(out) and proc.poll() is None and time.monotonic() < deadline:  # pylint: disable=protected-access
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{err.decode()[-2000:]}"
  done = train._our_steps(out)[-1]  # pylint: disable=protected-access
  assert 4 <= done < 40 and not os.path.exists(os.path.join(out, train.MODEL_DIR))
  assert cli.main([*args, "--out", out]) == 0
  summary = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert summary["resumed_from_step"] == done
  def curve(d):
    with open(os.path.join(d, train.CURVES_FILE), encoding="utf-8") as f:
      return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]
  assert curve(out) == curve(str(tmp_path / "ref")) and len(curve(out)) == 41
  assert summary["eval_loss"] == ref["eval_loss"]
  a, b = load_model(os.path.join(out, train.MODEL_DIR)), load_model(os.path.join(tmp_path, "ref", train.MODEL_DIR))
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
  assert isinstance(a.layers[0].mlp.down_proj, QuantizedLinear)
  assert ckpt.read_meta(os.path.join(out, train.MODEL_DIR))["finetune"]["ks"] == summary["srr_k"]
  assert os.path.getsize(os.path.join(out, train.PLOT_FILE)) > 1000
  # bad input through the command: one line each
  empty = tmp_path / "empty"
  empty.mkdir()
  for extra, fragment in ((["--images", str(empty)], "pass --text, not --images"),
                          (["--seqlen", "100000"], "fewer than one window of seqlen=100000")):
    argv = [a if a != "--text" or "--images" not in extra else a for a in args]
    if "--images" in extra:
      argv = [x for i, x in enumerate(argv) if x != "--text" and (i == 0 or argv[i - 1] != "--text")]
    rc = cli.main([*argv, *extra, "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err.strip().splitlines()[-1], err
  shutil.rmtree(tmp_path / "ref")
