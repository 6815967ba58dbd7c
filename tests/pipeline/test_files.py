"""File-system helpers: manifests and what they prove, the output lock, what overwrite may replace."""
import json
import os

import pytest

from gilora_jax.pipeline import ckpt, files


def test_manifest_verify_and_foreign_files(tmp_path):
  (tmp_path / "a.bin").write_bytes(b"x" * 100)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.txt").write_text("hello")
  m = files.manifest(str(tmp_path))
  assert sorted(m) == ["a.bin", "sub/b.txt"] and m["a.bin"]["bytes"] == 100
  files.verify(str(tmp_path), m, "fix it.")
  (tmp_path / "extra.csv").write_text("mine")
  assert files.foreign_files(str(tmp_path), m) == ["extra.csv"]
  (tmp_path / "a.bin").write_bytes(b"y" + b"x" * 99)  # same size, other bytes
  with pytest.raises(files.CorruptCheckpointError, match="a.bin does not match the SHA-256.*fix it."):
    files.verify(str(tmp_path), m, "fix it.")
  (tmp_path / "a.bin").write_bytes(b"x" * 50)
  with pytest.raises(files.CorruptCheckpointError, match="a.bin has 50 bytes where 100 were written"):
    files.verify(str(tmp_path), m, "fix it.")
  os.remove(tmp_path / "sub" / "b.txt")
  with pytest.raises(files.CorruptCheckpointError, match="b.txt is missing"):
    files.verify(str(tmp_path), {"sub/b.txt": m["sub/b.txt"]}, "fix it.")


def test_output_lock_is_exclusive_and_names_the_holder(tmp_path):
  out = str(tmp_path / "out")
  first = files.OutputLock(out).acquire()
  with pytest.raises(files.OutputBusyError, match=f"PID {os.getpid()}"):
    files.OutputLock(out).acquire()  # another open file description: flock conflicts even in one process
  with open(files.lock_path(out), encoding="utf-8") as f:
    info = json.load(f)
  assert info["pid"] == os.getpid()
  first.release()
  assert not os.path.exists(files.lock_path(out))
  with files.OutputLock(out):
    assert os.path.exists(files.lock_path(out))


def test_only_our_own_checkpoints_are_replaceable(tmp_path, random_model):
  from gilora_jax.models import qwen3  # pylint: disable=import-outside-toplevel
  cfg = qwen3.ModelConfig(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8)
  ckpt.check_replaceable(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  ckpt.check_replaceable(tmp_path / "empty")  # nothing in it to lose
  (tmp_path / "user").mkdir()
  (tmp_path / "user" / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not a gilora_jax checkpoint"):
    ckpt.save_model(tmp_path / "user", random_model(qwen3.Qwen3, cfg), overwrite=True)
  assert (tmp_path / "user" / "notes.txt").read_text() == "mine"
  path = ckpt.save_model(tmp_path / "ours", random_model(qwen3.Qwen3, cfg))
  ckpt.check_replaceable(path)
  with open(os.path.join(path, "results.csv"), "w", encoding="utf-8") as f:
    f.write("a")
  with pytest.raises(FileExistsError, match=r"holds files that gilora_jax did not write \(results.csv\)"):
    ckpt.save_model(path, random_model(qwen3.Qwen3, cfg), overwrite=True)
  assert os.path.exists(os.path.join(path, "results.csv"))
