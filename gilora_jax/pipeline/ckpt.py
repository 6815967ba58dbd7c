"""Orbax save/restore of a model's state, with its config beside it so restoring needs no flags.

The only module that imports orbax. A checkpoint is a folder:

  path/
    gilora_ckpt.json   {"format", "architecture", "config", "meta", "files", "checksum"}: what to rebuild, the
                       caller's metadata, every other file's size and SHA-256, and a checksum of this JSON itself
    state/             orbax StandardCheckpointer output of `nnx.to_pure_dict(nnx.state(model))`

Saving is atomic: everything is written into a hidden temporary sibling folder, which is renamed to `path` only
once orbax has finished and the JSON is on disk. A crash leaves at most a `.<name>.tmp-*` folder, never a
`path` that looks finished. Restoring first verifies every file against the manifest (`verify_files=False`
skips it on trusted storage), so a damaged checkpoint fails with one line naming the file instead of loading
wrong numbers; then it builds the model abstractly (`nnx.eval_shape`) and lets orbax fill it, so arrays come back
bit for bit in their saved dtypes. `overwrite=True` replaces only a finished checkpoint that holds nothing but
the files it wrote (`check_replaceable`).

A whole-model run's output (`save_assembled`, format 3) keeps each block in a folder of its own:

  path/
    gilora_ckpt.json   as above, with "blocks": the count; its manifest lists every file below
    state/             the parts outside the blocks (embeddings, norms, head)
    block_00000/state/ block 0: the run's finished shard, hard-linked in, never serialised a second time
    ...

`meta` (any JSON-serialisable dict) and `build_abstract(config, meta) -> model` let callers store and restore
models whose structure differs from the float architecture (e.g. quantized layers swapped in).

Quantized models (`save_quantized`) store `meta["quant"] = {"sites": {module path: QuantizedLinear.spec()},
"config": QuantConfig JSON, "blocks_done", "num_blocks"}` and `meta["records"]` (the per-layer records).
`restore_model` sees `meta["quant"]` and rebuilds the abstract model itself (the float architecture from the
stored config, then `QuantizedLinear.empty` at every stored site), so restoring needs no options. A run that is
still in progress (blocks_done < num_blocks) is saved the same way under a different folder (see
`gilora_jax.pipeline.run`), so a partial run is never mistaken for a finished one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gilora_jax.pipeline import files as files_lib
from gilora_jax import nn
from gilora_jax.models import ARCHITECTURES

INFO_FILE = "gilora_ckpt.json"
STATE_DIR = "state"
# The format names predate the move of this module into pipeline/: they name the format, not the module, and
# must never change (checkpoints on disk carry them).
FORMAT = "gilora_jax.ckpt/2"
# A whole-model run's output: `state/` holds the parts outside the blocks, `block_00000/` ... each block (the
# finished run's shards, linked in, not written again).
BLOCKS_FORMAT = "gilora_jax.ckpt/3"
LEGACY_FORMATS = ("gilora_jax.ckpt/1",)  # no file manifest: restored without verification (with a warning)
FIX = "re-run the command that wrote it, or restore the folder from a backup."

log = logging.getLogger(__name__)


def is_checkpoint(path: str | os.PathLike) -> bool:
  """True if `path` is a finished checkpoint written by `save_model`."""
  return os.path.isfile(os.path.join(os.fspath(path), INFO_FILE))


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
  """True for a finished checkpoint and for a folder that has a checkpoint's `state/` but lost its metadata."""
  path = os.fspath(path)
  return is_checkpoint(path) or (os.path.isdir(os.path.join(path, STATE_DIR))
                                 and not os.path.isfile(os.path.join(path, "config.json")))


def _is_empty_dir(path: str) -> bool:
  return os.path.isdir(path) and not os.listdir(path)


def check_replaceable(path: str | os.PathLike) -> None:
  """Raises FileExistsError unless `path` is absent or a finished checkpoint that holds only files it wrote.

  This is what `overwrite=True` may replace: never a folder without our metadata (a model folder, a user's
  folder), never a checkpoint into which someone has put files of their own.
  """
  folder = os.path.abspath(os.fspath(path))
  if not os.path.exists(folder) or _is_empty_dir(folder):
    return  # nothing there, or an empty folder (made for us): nothing of anyone's can be lost
  if not os.path.isdir(folder) or not is_checkpoint(folder):
    raise FileExistsError(f"{folder} exists and is not a gilora_jax checkpoint (no {INFO_FILE}); refusing to replace "
                          f"it. Choose another output path, or move it away yourself.")
  info = read_info(folder)
  if "files" not in info:
    raise FileExistsError(f"{folder} was written by an older gilora_jax without a file list, so it cannot be told "
                          f"apart from files added later; refusing to replace it. Delete it yourself if it is "
                          f"disposable, or choose another output path.")
  foreign = files_lib.foreign_files(folder, info["files"], own=(INFO_FILE,))
  if foreign:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise FileExistsError(f"{folder} holds files that gilora_jax did not write ({shown}); refusing to replace it. "
                          f"Move them out, or choose another output path.")


def checksum(info: dict[str, Any]) -> str:
  body = json.dumps({k: v for k, v in info.items() if k != "checksum"}, sort_keys=True)
  return hashlib.sha256(body.encode()).hexdigest()


def save_model(path: str | os.PathLike, model: nnx.Module, meta: dict[str, Any] | None = None, *,
               overwrite: bool = False, files: dict[str, str | bytes] | None = None) -> str:
  """Atomically writes `model`'s state, config and `meta` to the folder `path`; returns its absolute path.

  `model.config` must be one of the registered `ModelConfig`s. `files` maps extra file names to a source path
  or their bytes (tokenizer files, records). Every file's size and SHA-256 go into the metadata, which
  `restore_model` verifies. An existing `path` raises FileExistsError unless `overwrite=True`, and even then it is
  replaced only if it is a finished checkpoint holding nothing but what it wrote (`check_replaceable`), and only
  after the new checkpoint is complete.
  """
  final = os.path.abspath(os.fspath(path))
  if os.path.exists(final) and not _is_empty_dir(final):
    if not overwrite:
      raise FileExistsError(f"{final} exists; pass overwrite=True to replace it.")
    check_replaceable(final)
  cfg = model.config
  info = {"format": FORMAT, "architecture": cfg.architecture, "config": dataclasses.asdict(cfg), "meta": meta or {}}
  return write_folder(final, nnx.to_pure_dict(nnx.state(model)), info, files)


def write_folder(final: str, tree: Any, info: dict[str, Any], files: dict[str, str | bytes] | None = None,
                 before_manifest: Callable[[str], None] | None = None) -> str:
  """Atomically writes the folder `final`: `tree` (a pure dict of arrays) by orbax into `state/`, the extra
  `files`, then `INFO_FILE` holding `info` with the manifest of every other file and a checksum of itself, in a
  hidden temporary sibling renamed into place at the end. An existing `final` is replaced only after the new
  folder is complete (callers decide whether it may be: `check_replaceable`). `tree=None`: no orbax write here
  (`before_manifest` puts `state/` in, e.g. linked from a folder written earlier)."""
  json.dumps(info)  # fail on non-JSON meta before writing anything
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = files_lib.make_temp_dir(parent, f".{os.path.basename(final)}.tmp-")
  try:
    if tree is not None:
      if jax.process_count() > 1:  # orbax takes a process-local jax.Array for a shard of a global one: NumPy
        tree = jax.tree.map(np.asarray, tree)
      with _writer() as checkpointer:
        checkpointer.save(os.path.join(tmp, STATE_DIR), args=ocp.args.PyTreeSave(tree))
    for name, src in (files or {}).items():
      dst = os.path.join(tmp, name)
      if isinstance(src, bytes):
        files_lib.write_bytes(dst, src)
      else:
        shutil.copyfile(src, dst)
    if before_manifest is not None:  # more content, put in by the caller (save_assembled's blocks)
      before_manifest(tmp)
    info = {**info, "files": files_lib.manifest(tmp)}
    info["checksum"] = checksum(info)
    with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:  # last: its presence marks "finished"
      f.write(json.dumps(info, indent=2))
      f.flush()
      os.fsync(f.fileno())
    files_lib.fsync_dir(tmp)
    if os.path.exists(final):
      old = files_lib.make_temp_dir(parent, f".{os.path.basename(final)}.old-")
      os.rename(final, os.path.join(old, "ckpt"))
      os.rename(tmp, final)
      shutil.rmtree(old)
    else:
      os.rename(tmp, final)
    files_lib.fsync_dir(parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def read_checked(info_path: str, fields: set[str], formats: tuple[str, ...], fix: str) -> dict[str, Any]:
  """A folder's metadata JSON, checked: valid JSON with `fields`, a format among `formats`, and (all but the
  legacy format) its own checksum. One-line errors naming the file and `fix`."""
  try:
    with open(info_path, encoding="utf-8") as f:
      info = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise files_lib.CorruptCheckpointError(f"{info_path} is not valid JSON ({e}): the checkpoint's metadata is "
                                           f"damaged; {fix}") from None
  if not isinstance(info, dict) or not fields <= set(info):
    raise files_lib.CorruptCheckpointError(f"{info_path} lacks the checkpoint fields ({', '.join(sorted(fields))}); "
                                           f"{fix}")
  if info.get("format") not in formats:
    raise ValueError(f"{info_path}: format {info.get('format')!r} is not one this gilora_jax reads "
                     f"({', '.join(formats)}); read it with the gilora_jax that wrote it, or quantize the model again.")
  if info["format"] not in LEGACY_FORMATS and info.get("checksum") != checksum(info):
    raise files_lib.CorruptCheckpointError(f"{info_path} was altered after it was written (its checksum does not "
                                           f"match); {fix}")
  return info


def read_info(path: str | os.PathLike, fix: str = FIX) -> dict[str, Any]:
  """The checkpoint's JSON: {"format", "architecture", "config", "meta", "files", "checksum"}.

  Raises a one-line error naming the file when it is missing, not valid JSON, of another format, or altered
  since it was written (its checksum).
  """
  folder = os.path.abspath(os.fspath(path))
  info_path = os.path.join(folder, INFO_FILE)
  if not os.path.isfile(info_path):
    if os.path.isdir(os.path.join(folder, STATE_DIR)):
      raise FileNotFoundError(f"{info_path} is missing: {folder} has a checkpoint's {STATE_DIR}/ but not its "
                              f"metadata (deleted, or the save never finished); {fix}")
    raise FileNotFoundError(f"{folder} is not a finished gilora_jax checkpoint (no {INFO_FILE}); a save that was "
                            f"interrupted leaves only a hidden .tmp- folder. Save the model again.")
  info = read_checked(info_path, {"format", "architecture", "config", "meta"},
                      (FORMAT, BLOCKS_FORMAT, *LEGACY_FORMATS), fix)
  if info["architecture"] not in ARCHITECTURES:
    raise ValueError(f"{info_path}: unknown architecture {info['architecture']!r}; known: {sorted(ARCHITECTURES)}.")
  return info


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """The `meta` dict stored by `save_model`."""
  return read_info(path)["meta"]


def verify(path: str | os.PathLike, fix: str = FIX) -> dict[str, Any]:
  """Checks every file of a checkpoint against the sizes and SHA-256 digests recorded at save time; returns the
  info. Raises `files.CorruptCheckpointError` (a ValueError) naming the first damaged or missing file."""
  folder = os.path.abspath(os.fspath(path))
  info = read_info(folder, fix)
  if "files" not in info:
    log.warning("%s was written by an older gilora_jax without checksums; restoring it unverified.", folder)
    return info
  files_lib.verify(folder, info["files"], fix)
  return info


def restore_model(path: str | os.PathLike,
                  build_abstract: Callable[[Any, dict[str, Any]], nnx.Module] | None = None, *,
                  verify_files: bool = True, fix: str = FIX) -> nnx.Module:
  """Restores a `save_model` checkpoint bit-exactly.

  `build_abstract(config, meta)` constructs the model to restore into (it runs under `nnx.eval_shape`, so it
  allocates nothing); the default builds the registered float architecture from the stored config.
  `verify_files=False` skips the SHA-256 check of every file (for speed on trusted storage); a checkpoint that is
  damaged then restores wrong values or fails inside orbax. `fix` ends every error message.
  """
  folder = os.path.abspath(os.fspath(path))
  info = verify(folder, fix) if verify_files else read_info(folder, fix)
  arch = ARCHITECTURES[info["architecture"]]
  # JSON turns tuples into lists; config fields must stay hashable (the config is static jit metadata).
  try:
    cfg = arch.config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()})
  except TypeError as e:
    raise files_lib.CorruptCheckpointError(f"{os.path.join(folder, INFO_FILE)}: its config does not fit "
                                           f"{arch.config_cls.__name__} ({e}); {fix}") from None
  if build_abstract is None:
    build = build_quantized if "quant" in info["meta"] else (lambda c, _: arch.model_cls(c, rngs=nnx.Rngs(0)))
  else:
    build = build_abstract
  abstract = nnx.eval_shape(lambda: build(cfg, info["meta"]))
  if info["format"] != BLOCKS_FORMAT:
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, read_tree(folder, abstract_target(state), fix))
    return nnx.merge(graphdef, state)
  blocks = []
  for i, block in enumerate(abstract.layers):
    graphdef, state = nnx.split(block)
    nnx.replace_by_pure_dict(state, read_tree(os.path.join(folder, block_name(i)), abstract_target(state), fix))
    blocks.append(nnx.merge(graphdef, state))
  abstract.layers = nnx.List([])
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, read_tree(folder, abstract_target(state), fix))
  model = nnx.merge(graphdef, state)
  model.layers = nnx.List(blocks)
  return model


def block_name(i: int) -> str:
  return f"block_{i:05d}"


def save_assembled(path: str | os.PathLike, model: nnx.Module, block_dirs: list[str], meta: dict[str, Any], *,
                   overwrite: bool = False, files: dict[str, str | bytes] | None = None,
                   outside_dir: str | None = None) -> str:
  """Atomically writes `model` as a checkpoint whose blocks are the finished shards `block_dirs` (folders
  written by `write_folder`, block i's state in `block_dirs[i]/state`), hard-linked in (copied across file
  systems), so no block is serialised again; only the parts outside `model.layers` are written, or with
  `outside_dir` (a `write_folder` folder of the model without its blocks, written earlier) linked in too, and
  `model` may then hold only shapes. The shards are left where they are (the caller removes them once this
  returns). Restores like any checkpoint."""
  final = os.path.abspath(os.fspath(path))
  if os.path.exists(final) and not _is_empty_dir(final):
    if not overwrite:
      raise FileExistsError(f"{final} exists; pass overwrite=True to replace it.")
    check_replaceable(final)
  shell = nn.clone(model)
  shell.layers = nnx.List([])
  cfg = model.config
  info = {"format": BLOCKS_FORMAT, "architecture": cfg.architecture, "config": dataclasses.asdict(cfg),
          "meta": meta, "blocks": len(block_dirs)}

  def link_blocks(tmp: str) -> None:
    parts = [(src, block_name(i)) for i, src in enumerate(block_dirs)]
    for src, name in parts + ([(outside_dir, ".")] if outside_dir is not None else []):
      shutil.copytree(src, os.path.join(tmp, name), copy_function=_link_or_copy,
                      ignore=shutil.ignore_patterns(INFO_FILE), dirs_exist_ok=True)
  tree = None if outside_dir is not None else nnx.to_pure_dict(nnx.state(shell))
  return write_folder(final, tree, info, files, before_manifest=link_blocks)


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def read_tree(folder: str, target: Any, fix: str = FIX) -> Any:
  """The orbax `state/` of `folder` restored into `target` (a pytree of ShapeDtypeStructs); orbax's and
  tensorstore's many error types become one `CorruptCheckpointError` line."""
  try:
    with _checkpointer() as checkpointer:
      return checkpointer.restore(os.path.join(folder, STATE_DIR), target)
  except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types, with long tracebacks)
    first = re.sub(r"<[^>]*>|See full TensorStore details:.*", "", str(e).strip().splitlines()[0] if str(e).strip()
                   else "")[:200].strip()
    raise files_lib.CorruptCheckpointError(f"{os.path.join(folder, STATE_DIR)} could not be restored "
                                           f"({type(e).__name__}: {first}); {fix}") from None


def _this_process() -> ocp.options.MultiprocessingOptions:
  """Orbax options of this process alone: the folders here hold host (NumPy) arrays, written by the one process
  that writes (`sharding.is_writer`) and read by any, so no save or restore waits on other processes of a
  multi-host run (orbax's default would make every process take part in each save)."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                            barrier_sync_key_prefix=f"gilora-p{me}")


def _checkpointer() -> ocp.StandardCheckpointer:
  """The reader (any folder orbax wrote, compressed or not)."""
  return ocp.StandardCheckpointer(multiprocessing_options=_this_process())


def _writer() -> ocp.Checkpointer:
  """The writer: synchronous, and without orbax's default zstd. Weights barely compress (random-initialised
  float32: 7 %), and the compression was a third of the time: writing a Qwen3-0.6B's 0.62 GB embedding took
  3.3-3.9 s compressed and 2.6 s not, restoring it 2.8 s and 1.7 s (one process, 2-core CPU)."""
  alone = _this_process()  # the checkpointer's own save barriers too, not only the handler's
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, multiprocessing_options=alone),
                          multiprocessing_options=alone)


def abstract_target(state: Any) -> Any:
  """ShapeDtypeStructs on this process's first device for every array of an NNX state (what `read_tree`
  restores into)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(state))


# ------------------------------------------------------------------------------------------------------------------
# Quantized models
# ------------------------------------------------------------------------------------------------------------------


def build_quantized(config: Any, meta: dict[str, Any]) -> nnx.Module:
  """The float architecture of `config` with `QuantizedLinear.empty` at every site in `meta["quant"]["sites"]`."""
  model = ARCHITECTURES[config.architecture].model_cls(config, rngs=nnx.Rngs(0))
  for path, spec in meta["quant"]["sites"].items():
    nn.set_path(model, path, nn.QuantizedLinear.from_spec(spec))
  return model


def save_quantized(path: str | os.PathLike, model: nnx.Module, quant: dict[str, Any], records: list[dict],
                   *, overwrite: bool = False, files: dict[str, str | bytes] | None = None,
                   extra_meta: dict[str, Any] | None = None) -> str:
  """Atomically saves a (possibly partially) quantized model: state, config, per-site specs and records.

  `quant` holds at least "config" (the QuantConfig JSON), "blocks_done" and "num_blocks"; the per-site specs are
  read off the model.
  """
  meta = {**(extra_meta or {}), "quant": {**quant, "sites": nn.quantized_specs(model)}, "records": records}
  return save_model(path, model, meta, overwrite=overwrite, files=files)


def is_quantized(path: str | os.PathLike) -> bool:
  """True if `path` is a finished checkpoint of a quantized model."""
  return is_checkpoint(path) and "quant" in read_meta(path)
