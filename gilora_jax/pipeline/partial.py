"""An unfinished run, one shard per finished block: what `gilora quantize` resumes from.

  OUT.partial/
    gilora_partial.json   {"format", "run", "quant", "checksum"}: the run's source and calibration, its config and
                          block count, written once when the run starts
    block_00000/          block 0 once it is quantized: a folder like a checkpoint (`ckpt.write_folder`: orbax
    block_00001/          `state/` of the block, `gilora_ckpt.json` with its quantized sites' specs, its layer
    ...                   records, every file's SHA-256), written atomically when the block is finished
    outside/              the weights outside the blocks (embeddings, final norm, head), written once at the
                          start (streaming runs), so the run need not hold them; the output links it in

Finishing block i writes block i only: nothing rewrites a finished block, so the checkpointing cost is one block's
weights per block (the whole model once in all), not the whole model after every block. Resuming verifies every
shard against its SHA-256 (a corrupt shard is one line naming the file and the fix, never continued from),
restores blocks 0 … k − 1 into the float model and restarts at the first missing block; the activations feeding it
are recomputed through the restored blocks exactly as an uninterrupted run computed them, so the result is
bit-identical (`apply.quantize_model`, `Resume`).
"""
from __future__ import annotations

import json
import os
from typing import Any

from flax import nnx

from gilora_jax import nn
from gilora_jax.pipeline import ckpt
from gilora_jax.pipeline import files as files_lib

INFO = "gilora_partial.json"
FORMAT = "gilora_jax.partial/1"
BLOCK_FORMAT = "gilora_jax.block/1"
OUTSIDE_FORMAT = "gilora_jax.outside/1"


def is_partial(path: str) -> bool:
  """True for a folder holding an unfinished run of ours (its metadata file)."""
  return os.path.isfile(os.path.join(path, INFO))


def block_dir(partial: str, i: int) -> str:
  return os.path.join(partial, f"block_{i:05d}")


def start(partial: str, run: dict[str, Any], quant: dict[str, Any]) -> None:
  """Creates `partial` with its metadata (atomically: a killed start leaves no half-written file)."""
  os.makedirs(partial, exist_ok=True)
  info = {"format": FORMAT, "run": run, "quant": quant}
  info["checksum"] = ckpt.checksum(info)
  tmp = os.path.join(partial, f".{INFO}.tmp")
  files_lib.write_bytes(tmp, json.dumps(info, indent=2).encode())
  os.replace(tmp, os.path.join(partial, INFO))
  files_lib.fsync_dir(partial)


def outside_dir(partial: str) -> str:
  return os.path.join(partial, "outside")


def save_outside(partial: str, model: nnx.Module) -> str:
  """Writes the model's weights outside its blocks (embeddings, final norm, head) once, when the run starts:
  the run then need not hold them (the output links this folder in, like the block shards)."""
  shell = nn.clone(model)
  shell.layers = nnx.List([])
  return ckpt.write_folder(outside_dir(partial), nnx.to_pure_dict(nnx.state(shell)), {"format": OUTSIDE_FORMAT})


def has_outside(partial: str, *, verify: bool, fix: str) -> bool:
  """True when `save_outside`'s folder is there and whole (metadata checksum; with `verify`, every file)."""
  folder = outside_dir(partial)
  if not os.path.isfile(os.path.join(folder, ckpt.INFO_FILE)):
    return False
  info = ckpt.read_checked(os.path.join(folder, ckpt.INFO_FILE), {"format"}, (OUTSIDE_FORMAT,), fix)
  if verify:
    files_lib.verify(folder, info["files"], fix)
  return True


def read(partial: str, fix: str) -> dict[str, Any]:
  """The run's metadata (`start`), checked."""
  return ckpt.read_checked(os.path.join(partial, INFO), {"format", "run", "quant"}, (FORMAT,), fix)


def blocks_done(partial: str) -> int:
  """How many blocks, from block 0 on, have a finished shard."""
  k = 0
  while ckpt.is_checkpoint(block_dir(partial, k)):
    k += 1
  return k


def clean(partial: str) -> None:
  """Removes what a killed save left inside `partial`: unfinished shards (`.block_*.tmp-*`), moved-aside ones."""
  import glob  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  for stale in [p for pattern in (".block_*.tmp-*", ".block_*.old-*", ".outside.tmp-*", ".outside.old-*")
                for p in glob.glob(os.path.join(glob.escape(partial), pattern))]:
    shutil.rmtree(stale, ignore_errors=True)


def remove(partial: str) -> None:
  """Deletes a finished run's shards and metadata; anything else found in `partial` is left (with a warning)."""
  import logging  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  if not is_partial(partial):
    return
  for i in range(blocks_done(partial)):
    shutil.rmtree(block_dir(partial, i))
  if os.path.isfile(os.path.join(outside_dir(partial), ckpt.INFO_FILE)):  # ours: its metadata marks it finished
    shutil.rmtree(outside_dir(partial))
  os.remove(os.path.join(partial, INFO))
  try:
    os.rmdir(partial)
  except OSError:
    logging.getLogger(__name__).warning("left %s in place: it holds files gilora did not write (%s)", partial,
                                        ", ".join(sorted(os.listdir(partial))[:5]))


def save_block(partial: str, i: int, block: nnx.Module, records: list[dict]) -> str:
  """Writes block i's shard: its state, its quantized sites' specs (paths relative to the block) and records."""
  info = {"format": BLOCK_FORMAT, "block": i, "sites": nn.quantized_specs(block), "records": records}
  return ckpt.write_folder(block_dir(partial, i), nnx.to_pure_dict(nnx.state(block)), info)


def restore_blocks(partial: str, model: nnx.Module, k: int, *, verify: bool, fix: str) -> tuple[nnx.Module, list]:
  """`model` (float, modified in place) with blocks 0 … k − 1 replaced by their shards; and their records.

  Each shard is checked (metadata checksum; with `verify`, every file's SHA-256) before it is read."""
  records = []
  for i in range(k):
    folder = block_dir(partial, i)
    info = ckpt.read_checked(os.path.join(folder, ckpt.INFO_FILE), {"format", "block", "sites", "records"},
                             (BLOCK_FORMAT,), fix)
    if info["block"] != i:
      raise files_lib.CorruptCheckpointError(f"{folder} holds block {info['block']}, not {i}; {fix}")
    if verify:
      files_lib.verify(folder, info["files"], fix)
    block = nn.clone(model.layers[i])
    for path, spec in info["sites"].items():
      nn.set_path(block, path, nn.QuantizedLinear.from_spec(spec))
    graphdef, state = nnx.split(block)
    nnx.replace_by_pure_dict(state, ckpt.read_tree(folder, ckpt.abstract_target(state), fix))
    model.layers[i] = nnx.merge(graphdef, state)
    records.extend(info["records"])
  return model, records
