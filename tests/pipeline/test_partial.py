"""The per-block shards of an unfinished run (`pipeline.partial`): one block written per block, restored bit-exactly,
a corrupt shard refused, and a resumed run that writes only the blocks it computes."""
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from gilora_jax import load_model
from gilora_jax.nn import QuantizedLinear, clone
from gilora_jax.pipeline import apply, ckpt, data, files, run
from gilora_jax.pipeline import partial as partial_lib

FIX = "delete it to start over."


def _state(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


@pytest.fixture(scope="module")
def quantized(lm, lm_calib):
  return apply.quantize_model(lm, lm_calib, method="gptq+olrc", bits=3, rank=4)


def test_shards_hold_one_block_each_and_restore_bit_exactly(tmp_path, lm, quantized):
  partial = str(tmp_path / "p.partial")
  partial_lib.start(partial, {"source": "x"}, {"num_blocks": 2})
  for i in range(2):
    partial_lib.save_block(partial, i, quantized.model.layers[i], [r._asdict() for r in quantized.records
                                                                    if r.block == i])
    assert partial_lib.blocks_done(partial) == i + 1
  with open(os.path.join(partial_lib.block_dir(partial, 1), "gilora_ckpt.json"), encoding="utf-8") as f:
    info = json.load(f)
  assert info["block"] == 1 and sorted(info["sites"]) == sorted(  # a block's own paths: no embedding, no head
      f"{a}.{b}_proj" for a, bs in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for b in bs)
  restored, records = partial_lib.restore_blocks(partial, clone(lm), 2, verify=True, fix=FIX)
  assert isinstance(restored.layers[1].mlp.down_proj, QuantizedLinear)
  jax.tree.map(np.testing.assert_array_equal, _state(restored), _state(quantized.model))
  assert records == [r._asdict() for r in quantized.records]
  assert partial_lib.read(partial, FIX)["quant"] == {"num_blocks": 2}


def test_a_corrupt_shard_or_metadata_is_one_line_naming_the_file(tmp_path, lm, quantized):
  partial = str(tmp_path / "p.partial")
  partial_lib.start(partial, {}, {"num_blocks": 2})
  partial_lib.save_block(partial, 0, quantized.model.layers[0], [])
  shard = partial_lib.block_dir(partial, 0)
  victim = max((os.path.join(shard, f) for f in files.walk_files(shard)), key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    f.write(b"\x00garbage\x00")
  with pytest.raises(files.CorruptCheckpointError, match=f"{victim} does not match the SHA-256.*{FIX}"):
    partial_lib.restore_blocks(partial, clone(lm), 1, verify=True, fix=FIX)
  info = os.path.join(partial, partial_lib.INFO)
  with open(info, encoding="utf-8") as f:
    meta = json.load(f)
  meta["quant"]["num_blocks"] = 3
  with open(info, "w", encoding="utf-8") as f:
    json.dump(meta, f)
  with pytest.raises(files.CorruptCheckpointError, match="was altered after it was written"):
    partial_lib.read(partial, FIX)


def test_remove_leaves_what_it_did_not_write(tmp_path, quantized, caplog):
  partial = str(tmp_path / "p.partial")
  partial_lib.start(partial, {}, {"num_blocks": 2})
  partial_lib.save_block(partial, 0, quantized.model.layers[0], [])
  (tmp_path / "p.partial" / "notes.txt").write_text("mine")
  partial_lib.remove(partial)
  assert os.listdir(partial) == ["notes.txt"] and "gilora did not write" in caplog.text


@pytest.mark.slow
def test_a_resumed_run_writes_only_the_blocks_it_computes(tmp_path, monkeypatch):
  """Interrupted after block 0's shard, the same call resumes: block 0 is read, never written again, and the
  output equals an uninterrupted run's."""
  from tests.pipeline.tiny import make_lm  # pylint: disable=import-outside-toplevel
  folder = str(tmp_path / "lm")
  make_lm(folder, num_layers=3, seed=3)
  kw = dict(config=apply.make_config(method="gptq", bits=3), nsamples=4, seqlen=32, batch_size=2, seed=0)
  written, save = [], partial_lib.save_block

  def save_then_stop(partial, i, block, records):
    written.append(i)
    save(partial, i, block, records)
    if i == 0 and len(written) == 1:
      raise KeyboardInterrupt  # the user's Ctrl-C, right after the first shard
  monkeypatch.setattr(partial_lib, "save_block", save_then_stop)
  with pytest.raises(KeyboardInterrupt):
    run.quantize_folder(folder, str(tmp_path / "q"), **kw)
  assert partial_lib.blocks_done(str(tmp_path / "q.partial")) == 1
  # the weights outside the blocks were written first (the run does not hold them), and are not written again
  assert partial_lib.has_outside(str(tmp_path / "q.partial"), verify=True, fix="")
  outside = pathlib.Path(partial_lib.outside_dir(str(tmp_path / "q.partial")))
  outside_inodes = {p.stat().st_ino for p in outside.rglob("*") if p.is_file() and p.name != ckpt.INFO_FILE}
  monkeypatch.setattr(partial_lib, "save_outside", lambda *a: pytest.fail("the outside weights written twice"))
  summary = run.quantize_folder(folder, str(tmp_path / "q"), **kw)
  assert summary["resumed_from_block"] == 1 and written == [0, 1, 2]
  out_inodes = {p.stat().st_ino for p in (tmp_path / "q").rglob("*") if p.is_file()}
  assert outside_inodes and outside_inodes <= out_inodes  # linked into the output, not serialised again
  assert not os.path.exists(tmp_path / "q.partial")
  calib = data.lm_calibration(data.load_tokenizer(folder), data.load_text(os.path.join(folder, "calib.txt")), 4, 32,
                              2, 0)
  ref = apply.quantize_model(load_model(folder), calib, kw["config"])
  jax.tree.map(np.testing.assert_array_equal, _state(load_model(str(tmp_path / "q"))), _state(ref.model))
  # The output's blocks are those shards (linked in, not serialised again), verified like every file.
  out = tmp_path / "q"
  assert ckpt.read_info(out)["format"] == ckpt.BLOCKS_FORMAT and sorted(p.name for p in out.glob("block_*")) == [
      "block_00000", "block_00001", "block_00002"]
  victim = max((p for p in (out / "block_00001").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(victim, "r+b") as f:
    f.write(b"\xff\xfe")
  with pytest.raises(files.CorruptCheckpointError, match=f"{victim} does not match the SHA-256"):
    load_model(str(out))
