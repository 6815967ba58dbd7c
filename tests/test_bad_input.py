"""The bad-input battery: every user mistake is one clear line and exit code 2 before any long work starts, nothing
a user owns is deleted, and damaged checkpoints are refused instead of loaded. Add new cases here.

The cases that must fail *before the weights are loaded* use a model folder whose config.json and tokenizer are
fine but whose model.safetensors is garbage: if a check ran after loading, the error would be about the weights.

One case of each kind runs `gilora` in a fresh subprocess, as a user does (`SUB`); the others of its kind call the
same entry point, `gilora_jax.cli.main(argv)`, in this process, which saves the ~2.5 s of starting Python, JAX and
flax per case (the suite must stay under 12 minutes on a 2-core CI box).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gilora_jax.pipeline import ckpt, files
from gilora_jax.pipeline import partial as partial_lib

from .pipeline.tiny import make_lm, make_vit

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "GILORA_MALLOC_TUNING": "0"}
FAST = ["--method", "gptq+olrc", "--bits", "3", "--rank", "4", "--nsamples", "4", "--seqlen", "32", "--batch-size", "2"]


def gilora(*args, cwd=None, timeout=240):
  """(exit code, stdout, stderr) of `gilora ARGS` in a fresh process."""
  p = subprocess.run([sys.executable, "-m", "gilora_jax.cli", *map(str, args)], cwd=cwd, env=ENV, timeout=timeout,
                     capture_output=True, text=True, check=False)
  return p.returncode, p.stdout, p.stderr


def gilora_here(capsys, *args):
  """(exit code, stdout, stderr) of `gilora_jax.cli.main(ARGS)` in this process."""
  from gilora_jax import cli  # pylint: disable=import-outside-toplevel
  capsys.readouterr()
  rc = cli.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return rc, out, err


SUB = "subprocess"  # the marker of a case that runs in its own process


def assert_one_line_error(rc, err, *fragments):
  assert rc == 2, err
  assert "Traceback" not in err, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("gilora: error: "), err
  for f in fragments:
    assert f in last, (f, last)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _write(path, data):
  with open(path, "wb") as f:
    f.write(data)


def snapshot(folder):
  """{relative path: bytes} of every file under folder."""
  return {rel: _read(os.path.join(folder, rel)) for rel in files.walk_files(folder)}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_input")
  lm = str(root / "lm")
  make_lm(lm)
  broken = str(root / "broken_weights")  # config, tokenizer and texts are fine; the weights are not
  shutil.copytree(lm, broken)
  with open(os.path.join(broken, "model.safetensors"), "wb") as f:
    f.write(b"garbage" * 100)
  vit = str(root / "vit")
  make_vit(vit)
  q = str(root / "q")
  from gilora_jax import cli  # pylint: disable=import-outside-toplevel
  assert cli.main(["quantize", "--model", lm, *FAST, "--out", q]) == 0  # in this process: its compilations are reused
  return {"root": root, "lm": lm, "broken": broken, "vit": vit, "q": q}


# ------------------------------------------------------------------------------------------------ refused up front

BEFORE_LOADING = [  # (flags, fragments of the one error line, how): all refused before model.safetensors is read
    (["--bits", "9"], ["--bits 9", "outside 2..8"], SUB),
    (["--rank", "100"], ["--rank 100", "min(d_in, d_out)=64", "layers.0.self_attn.q_proj", "--rank ≤ 64"], ""),
    (["--group-size", "48"], ["--group-size 48", "does not divide d_in=64", "layers.0.self_attn.q_proj"], ""),
    (["--loops", "-1"], ["--loops -1"], ""),
    (["--damp", "0"], ["--damp 0.0", "positive"], ""),
    (["--method", "awq"], ["--method awq", "unknown"], ""),
    (["--nsamples", "0"], ["--nsamples 0", "at least 1"], ""),
    (["--nsamples", "-5"], ["--nsamples -5", "at least 1"], ""),
    (["--batch-size", "0"], ["--batch-size 0", "at least 1"], ""),
    (["--seqlen", "0"], ["--seqlen 0", "at least 1"], ""),
    (["--rule", "(=bits:4"], ["--rule (", "not a valid regular expression"], ""),
    (["--rule", ".*q_proj=bitz:4"], ["--rule", "'bitz:4'", "key:value"], ""),
    (["--rule", r".*down_proj=rank:500"], ["--rank 500", "layers.0.mlp.down_proj"], ""),
    (["--calib", "{root}/nope.txt"], ["nope.txt does not exist", "--calib"], ""),
    (["--calib", "{root}/binary.txt"], ["binary.txt is not a UTF-8 text file", "--calib"], SUB),
    (["--calib", "{root}/short.txt"], ["fewer than one window of seqlen=32"], ""),
    (["--out", "{root}/user_folder"], ["user_folder exists and is not a gilora_jax checkpoint"], ""),
    (["--out", "{broken}", "--overwrite"], ["is the --model folder or contains it"], ""),
    (["--out", "{root}", "--overwrite"], ["is the --model folder or contains it"], ""),
    (["--out", "{q}"], ["already holds a finished checkpoint; pass --overwrite"], ""),
    (["--seed", "-1"], ["--seed -1", "non-negative"], ""),
]


@pytest.mark.parametrize("flags, fragments, how", BEFORE_LOADING, ids=[" ".join(f) for f, _, _ in BEFORE_LOADING])
def test_quantize_refuses_before_loading_the_weights(work, capsys, flags, fragments, how):
  root = work["root"]
  (root / "binary.txt").write_bytes(b"\x00\x01\xff\xfe" * 64)
  (root / "short.txt").write_text("to be")
  user = root / "user_folder"
  user.mkdir(exist_ok=True)
  (user / "notes.txt").write_text("mine")
  flags = [f.format(root=root, broken=work["broken"], q=work["q"]) for f in flags]
  out = [] if "--out" in flags else ["--out", str(root / "never_written")]
  before = snapshot(work["broken"])
  t0 = time.monotonic()
  args = ("quantize", "--model", work["broken"], *FAST, *out, *flags)
  rc, _, err = gilora(*args) if how == SUB else gilora_here(capsys, *args)
  assert_one_line_error(rc, err, *fragments)
  assert "safetensors" not in err  # the weights were never read
  assert snapshot(work["broken"]) == before and (user / "notes.txt").read_text() == "mine"
  assert not os.path.exists(root / "never_written")
  assert time.monotonic() - t0 < 60


def test_quantize_refuses_a_folder_without_tokenizer(work, capsys):
  folder = work["root"] / "no_tokenizer"
  shutil.copytree(work["broken"], folder, dirs_exist_ok=True)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (folder / name).unlink()
  rc, _, err = gilora_here(capsys, "quantize", "--model", folder, *FAST, "--out", work["root"] / "x")
  assert_one_line_error(rc, err, "has no tokenizer", "copy the tokenizer files")


@pytest.mark.parametrize("args, fragments, how", [
    (["generate", "--model", "{lm}", "--prompt", ""], ["--prompt ''", "is empty"], ""),
    (["generate", "--model", "{lm}", "--prompt", "   "], ["is empty"], ""),
    (["generate", "--model", "{lm}", "--prompt", "the", "--max-new-tokens", "-3"], ["--max-new-tokens -3"], ""),
    (["generate", "--model", "{lm}", "--prompt", "the", "--max-new-tokens", "0"], ["--max-new-tokens 0"], ""),
    (["eval", "--model", "{lm}", "--seqlen", "1"], ["--seqlen 1", "at least 2"], SUB),
    (["eval", "--model", "{lm}", "--batch-size", "0"], ["--batch-size 0"], ""),
    (["eval", "--model", "{lm}", "--text", "{root}/binary.txt"], ["binary.txt is not a UTF-8 text file"], ""),
    (["eval", "--model", "{vit}", "--text", "{root}/short.txt"], ["--text", "is for causal LMs"], ""),
    (["eval", "--model", "{root}/nowhere"], ["is not an existing local folder"], ""),
    (["quantize-layer", "{root}/garbage.npz", "--out", "{root}/o.npz"], ["garbage.npz is not a readable .npz"], ""),
    (["quantize-layer", "{root}/pickled.npz", "--out", "{root}/o.npz"], ["pickled (object) arrays", "never unpickles"],
     ""),
    (["quantize-layer", "{root}/layer.npz", "--out", "{root}/user_folder/mine.npz"], ["is not a quantize-layer result"],
     ""),
    (["quantize-layer", "{root}/layer.npz", "--out", "{root}/garbage.npz"], ["is not a quantize-layer result"], ""),
    (["generate", "--model", "{vit}", "--prompt", "the"], ["not a causal LM"], ""),
    (["eval", "--model", "{vit}", "--images", "{root}/short.txt"], ["is a file but not an .npz"], ""),
    (["eval", "--model", "{vit}", "--images", "{root}/mislabelled.npz"], ["20 images but 'labels' 5 labels"], ""),
    (["quantize", "--out", "{root}/x", "--calib", "{root}/nope.txt"], ["--out, --calib need --model"], ""),
])
def test_other_commands_name_the_fix(work, capsys, args, fragments, how):
  root = work["root"]
  (root / "binary.txt").write_bytes(b"\x00\x01\xff\xfe" * 64)
  (root / "short.txt").write_text("to be")
  (root / "garbage.npz").write_bytes(b"not an npz at all")
  np.savez(root / "pickled.npz", W=np.array([{"a": 1}], dtype=object), H=np.eye(2))
  np.savez(root / "layer.npz", W=np.ones((8, 4), np.float32), H=np.eye(8, dtype=np.float32))
  np.savez(root / "mislabelled.npz", images=np.zeros((20, 32, 32, 3), np.uint8), labels=np.zeros(5, np.int64))
  (root / "user_folder").mkdir(exist_ok=True)
  (root / "user_folder" / "notes.txt").write_text("mine")
  np.savez(root / "user_folder" / "mine.npz", a=np.arange(3))
  before = snapshot(root / "user_folder")
  args = [a.format(**work) for a in args]
  rc, _, err = gilora(*args) if how == SUB else gilora_here(capsys, *args)
  assert_one_line_error(rc, err, *fragments)
  assert snapshot(root / "user_folder") == before


def test_a_pickled_npz_is_never_unpickled(tmp_path):
  """np.load(allow_pickle=True) on a hostile file runs code: the reader must refuse before that."""
  marker = tmp_path / "ran"
  payload = tmp_path / "evil.npy"

  class Evil:
    def __reduce__(self):
      return (open, (str(marker), "w"))
  np.save(payload, np.array([Evil()], dtype=object), allow_pickle=True)
  os.rename(payload, tmp_path / "evil_array.npy")
  import zipfile  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(tmp_path / "evil.npz", "w") as z:
    z.write(tmp_path / "evil_array.npy", "W.npy")
  from gilora_jax.pipeline import data  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="never unpickles"):
    data.load_npz(tmp_path / "evil.npz", "W and H")
  assert not marker.exists()


# ------------------------------------------------------------------------------------------------ nothing is lost


def test_overwrite_replaces_only_our_checkpoints(work, capsys):
  root, lm = work["root"], work["lm"]
  before = snapshot(lm)
  # A finished checkpoint into which the user put a file of their own is not replaced.
  mixed = root / "mixed"
  shutil.copytree(work["q"], mixed)
  (mixed / "my_results.csv").write_text("a,b\n")
  rc, _, err = gilora_here(capsys, "quantize", "--model", lm, *FAST, "--out", mixed, "--overwrite")
  assert_one_line_error(rc, err, "holds files that gilora_jax did not write (my_results.csv)")
  assert (mixed / "my_results.csv").read_text() == "a,b\n"
  # Our own finished checkpoint is replaced by the new run; the model folder never changes.
  rc, out, err = gilora("quantize", "--model", lm, *FAST, "--out", work["q"], "--overwrite", "--bits", "4")
  assert rc == 0, err
  # The default output: a line per finished block (stderr is not a terminal here), no per-layer lines (-v),
  # no notices of third-party imports.
  assert "PyTorch was not found" not in err and "rel_err" not in err
  lines = [line for line in err.splitlines() if line.strip()]
  assert [line.split(" done")[0] for line in lines] == ["gilora: block 1/2", "gilora: block 2/2"], err
  assert ckpt.read_meta(work["q"])["quant"]["config"]["layer"]["grid"]["bits"] == 4
  assert snapshot(lm) == before
  # Output folders get the user's umask, not mkdtemp's 0700.
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(work["q"]).st_mode & 0o777 == 0o777 & ~mask


def test_an_empty_out_folder_is_used_without_overwrite(work, capsys):
  out = work["root"] / "made_for_it"
  out.mkdir()
  rc, lines, err = gilora_here(capsys, "quantize", "--model", work["lm"], *FAST, "--out", out)
  assert rc == 0, err
  assert ckpt.is_checkpoint(out) and not os.path.exists(str(out) + ".partial")


def test_quantize_layer_results_are_replaced_only_with_overwrite(work, capsys):
  root = work["root"]
  np.savez(root / "lay.npz", W=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32),
           H=np.eye(16, dtype=np.float32))
  args = ("quantize-layer", root / "lay.npz", "--method", "gptq", "--out", root / "res.npz")
  assert gilora_here(capsys, *args)[0] == 0
  mask = os.umask(0)
  os.umask(mask)
  assert os.stat(root / "res.npz").st_mode & 0o777 == 0o666 & ~mask  # the user's umask, not mkstemp's 0600
  rc, _, err = gilora_here(capsys, *args)
  assert_one_line_error(rc, err, "already holds a quantize-layer result; pass --overwrite")
  assert gilora_here(capsys, *args, "--overwrite")[0] == 0


def test_an_interrupted_overwrite_gets_the_previous_checkpoint_back(work):
  """A kill between moving the old checkpoint aside and renaming the new one in leaves only `.OUT.old-*`: the
  next run puts it back instead of deleting the only copy."""
  from gilora_jax.pipeline import run  # pylint: disable=import-outside-toplevel
  out = str(work["root"] / "interrupted")
  shutil.copytree(work["q"], work["root"] / ".interrupted.old-x" / "ckpt")
  run._clean_temporaries(out)  # pylint: disable=protected-access  (what every run does under its lock)
  assert ckpt.is_checkpoint(out) and not os.path.exists(work["root"] / ".interrupted.old-x")


def test_the_comparison_without_diagnostics_prints_dashes(capsys):
  from gilora_jax.pipeline import apply, run  # pylint: disable=import-outside-toplevel
  lines = []
  cfg = apply.make_config(method="gptq", bits=3, rank=4, diagnostics=False)
  rows = run.example_comparison(cfg.layer, lines.append)
  assert all(r["rel_err"] is None for r in rows) and "–" in lines[2]


def test_a_user_folder_at_out_partial_is_never_touched(work, capsys):
  out = work["root"] / "p"
  partial = work["root"] / "p.partial"
  partial.mkdir()
  (partial / "keep.txt").write_text("mine")
  rc, _, err = gilora_here(capsys, "quantize", "--model", work["lm"], *FAST, "--out", out)
  assert_one_line_error(rc, err, "p.partial exists but is not a gilora partial checkpoint")
  assert (partial / "keep.txt").read_text() == "mine" and not out.exists()


def test_a_second_run_into_the_same_out_fails_at_once_naming_the_first(work, capsys):
  out = str(work["root"] / "locked")
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from gilora_jax.pipeline import files; lock = files.OutputLock(sys.argv[1]).acquire(); "
      "print('held', flush=True); time.sleep(600)"), out], env=ENV, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    rc, _, err = gilora_here(capsys, "quantize", "--model", work["lm"], *FAST, "--out", out)
    assert_one_line_error(rc, err, "is being written by another gilora run", f"PID {holder.pid}")
    assert time.monotonic() - t0 < 60
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
  # The kernel released the lock with the killed process (its lock file stays behind, unlocked): the next run
  # takes it over, and a clean exit removes the file.
  assert os.path.exists(files.lock_path(out))
  with files.OutputLock(out):
    pass
  assert not os.path.exists(files.lock_path(out))


# ------------------------------------------------------------------------------------------------ damaged checkpoints


def _corrupt(path, n=4096):
  data = bytearray(_read(path))
  start = len(data) // 3
  data[start:start + n] = bytes(len(data[start:start + n]))
  _write(path, bytes(data))


def _largest_state_file(folder):
  state = os.path.join(folder, ckpt.STATE_DIR)
  return max((os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs), key=os.path.getsize)


@pytest.mark.parametrize("damage, fragments, how", [
    ("overwrite", ["does not match the SHA-256 recorded when it was written"], SUB),
    ("delete", ["is missing (the checkpoint lists it)"], ""),
    ("no_info", ["gilora_ckpt.json is missing", "state/ but not its metadata"], ""),
    ("truncated_info", ["gilora_ckpt.json is not valid JSON"], ""),
    ("edited_info", ["gilora_ckpt.json was altered after it was written"], ""),
])
def test_damaged_checkpoints_are_refused_with_one_line(work, capsys, damage, fragments, how):
  copy = str(work["root"] / f"damaged_{damage}")
  shutil.copytree(work["q"], copy)
  info = os.path.join(copy, ckpt.INFO_FILE)
  if damage == "overwrite":
    victim = _largest_state_file(copy)
    _corrupt(victim)
  elif damage == "delete":
    victim = _largest_state_file(copy)
    os.remove(victim)
  elif damage == "no_info":
    os.remove(info)
  elif damage == "truncated_info":
    text = _read(info)
    _write(info, text[:len(text) // 2])
  else:
    meta = json.loads(_read(info))
    meta["meta"]["records"][0]["rel_err"] = 0.0
    _write(info, json.dumps(meta).encode())
  args = ("eval", "--model", copy, "--seqlen", "64")
  rc, _, err = gilora(*args) if how == SUB else gilora_here(capsys, *args)
  assert_one_line_error(rc, err, *fragments)
  if damage in ("overwrite", "delete"):
    assert os.path.relpath(victim, copy) in err  # the file is named


def test_no_verify_skips_the_hashes(work, monkeypatch, capsys):
  """--no-verify reads a checkpoint without hashing it (trusted storage): an intact one evaluates the same."""
  from gilora_jax.pipeline import run  # pylint: disable=import-outside-toplevel
  a = json.dumps(run.evaluate_folder(work["q"], seqlen=64))
  calls = []
  monkeypatch.setattr(files, "sha256_file", lambda p: calls.append(p) or "")
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  load_model(work["q"], verify=False)
  assert calls == []
  rc, b, err = gilora_here(capsys, "eval", "--model", work["q"], "--seqlen", "64", "--no-verify")
  assert rc == 0, err
  assert json.loads(a)["perplexity"] == json.loads(b)["perplexity"]


def test_a_killed_run_resumes_bit_identical_but_never_from_a_corrupt_block(tmp_path, capsys):
  """SIGKILL after the first per-block checkpoint; a damaged partial checkpoint is refused (naming the file and
  the fix), the repaired one resumes, and the result equals an uninterrupted run bit for bit."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline import apply, data, run  # pylint: disable=import-outside-toplevel
  folder = str(tmp_path / "lm3")
  make_lm(folder, num_layers=3, seed=1)
  out = str(tmp_path / "q")
  partial = out + run.PARTIAL_SUFFIX
  proc = subprocess.Popen([sys.executable, "-m", "gilora_jax.cli", "quantize", "--model", folder, *FAST, "--out", out],
                          env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 150
  while partial_lib.blocks_done(partial) < 1 and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{stderr.decode()[-2000:]}"
  done = partial_lib.blocks_done(partial)
  assert 1 <= done < 3 and not ckpt.is_checkpoint(out)
  victim = _largest_state_file(partial_lib.block_dir(partial, 0))
  good = _read(victim)
  _corrupt(victim)
  rc, _, err = gilora_here(capsys, "quantize", "--model", folder, *FAST, "--out", out)
  assert_one_line_error(rc, err, os.path.relpath(victim, os.path.dirname(partial)), f"delete {partial} to start over")
  _write(victim, good)  # repaired: the same command resumes
  rc, lines, err = gilora("-v", "quantize", "--model", folder, *FAST, "--out", out)
  assert rc == 0, err
  assert json.loads(lines.splitlines()[-1])["resumed_from_block"] == done
  assert f"resuming {partial} from block {done}" in err
  assert sum("rel_err" in line for line in err.splitlines()) == 7 * (3 - done)  # only the missing blocks ran
  # The uninterrupted result, from the library on the same calibration windows.
  calib = data.lm_calibration(data.load_tokenizer(folder), data.load_text(os.path.join(folder, "calib.txt")), 4, 32,
                              2, 0)
  ref = apply.quantize_model(load_model(folder), calib, method="gptq+olrc", bits=3, rank=4)
  state = lambda m: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m)))  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, state(load_model(out)), state(ref.model))
  with open(os.path.join(out, run.RECORDS_FILE), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
  assert strip(records) == strip([r._asdict() for r in ref.records])


# ------------------------------------------------------------------------------------------------ what was used, and the output


def test_fewer_images_than_nsamples_is_said_and_recorded(work, capsys):
  rng = np.random.default_rng(0)
  npz = work["root"] / "ten.npz"
  np.savez(npz, images=rng.integers(0, 256, (10, 32, 32, 3)).astype(np.uint8), labels=rng.integers(0, 4, 10))
  out = work["root"] / "qvit"
  rc, lines, err = gilora_here(capsys, "quantize", "--model", work["vit"], *FAST[:6], "--calib", npz, "--nsamples", "50",
                               "--out", out)
  assert rc == 0, err
  assert "--nsamples 50" in err and "holds 10 images" in err
  assert json.loads(lines.splitlines()[-1])["nsamples"] == 10
  assert ckpt.read_meta(out)["run"]["calib"]["nsamples"] == 10


def test_calibration_windows_past_the_trained_positions_are_warned_about(work, capsys):
  fast = [a if a != "32" else "300" for a in FAST]  # --seqlen 300 > max_position_embeddings=256
  rc, _, err = gilora_here(capsys, "quantize", "--model", work["lm"], *fast, "--out", work["root"] / "long")
  assert rc == 0, err
  assert "--seqlen 300 exceeds the model's max_position_embeddings=256" in err


def test_long_prompts_are_warned_about(work, capsys, caplog):
  rc, lines, err = gilora_here(capsys, "generate", "--model", work["lm"], "--prompt", "the king " * 40, "--max-new-tokens",
                               "4")
  assert rc == 0, err
  # in this process the warning reaches pytest's log capture (the command's stderr handler prints it for a user)
  assert "exceeds max_position_embeddings=256" in err + caplog.text
  assert json.loads(lines)["prompt_tokens"] == 360
