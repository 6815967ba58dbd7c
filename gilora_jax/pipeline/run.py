"""The `gilora` command's engine: the resumable whole-model run, evaluation and generation from a folder, and the
built-in comparison. `gilora_jax.cli` only parses flags and prints; errors raised here name the command's flags.

`quantize_folder` checks everything it can before the long work starts, in this order, each failure one line:
the counts (nsamples, seqlen, batch size), the model folder and every option against every layer's shape (from
config.json alone, `convert.abstract_hf`), the output path (never the model folder or a parent of it; an
existing one only if it is a finished gilora checkpoint holding nothing else, with `overwrite`), an unfinished
run of other options, and the calibration data (readable, long enough, a tokenizer). It then holds an exclusive
lock on the output (`files.OutputLock`: a second run fails at once, naming the first's PID) while it loads the
weights, quantizes block by block, writes each finished block as a verified shard of `OUT.partial`
(`gilora_jax.pipeline.partial`: one block written per block, nothing rewritten), resumes from those shards when
the same command is run again (bit-identical), and writes `OUT` atomically.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from flax import nnx

from gilora_jax import nn
from gilora_jax import sharding as sharding_lib
from gilora_jax.config import OptionError, QuantConfig
from gilora_jax.models import convert, hf_config, llama
from gilora_jax.pipeline import apply, ckpt, data, evaluate, files, plot
from gilora_jax.pipeline import partial as partial_lib
from gilora_jax.pipeline.load import load_model

log = logging.getLogger(__name__)

# Files of a HF folder that a quantized checkpoint keeps beside its state (tokenizer, image preprocessing).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "generation_config.json", "preprocessor_config.json")
RECORDS_FILE = "records.jsonl"
PLOT_FILE = "errors.png"
PARTIAL_SUFFIX = ".partial"


def progress_bar(total: int, initial: int) -> Callable[[Iterable[int]], Iterable[int]]:
  """A tqdm bar over the blocks on a terminal; elsewhere (a log file, CI) one line per finished block with the
  elapsed time and an ETA, so a captured log is not a stream of carriage-return redraws."""
  import sys  # pylint: disable=import-outside-toplevel
  if sys.stderr.isatty():
    import tqdm  # pylint: disable=import-outside-toplevel
    return lambda it: tqdm.tqdm(it, total=total, initial=initial, desc="blocks", unit="block", file=sys.stderr,
                                dynamic_ncols=True)

  def lines(it):
    t0 = time.perf_counter()
    for i in it:
      yield i
      done = i + 1 - initial
      spent = time.perf_counter() - t0
      log.info("block %d/%d done, %.0f s elapsed, ETA %.0f s", i + 1, total, spent, spent / done * (total - i - 1))
  return lines


def is_lm(model) -> bool:
  return isinstance(model, llama.Llama)  # qwen3.Qwen3 included


def at_least(name: str, value: int, minimum: int = 1, why: str = "") -> None:
  """An integer option below its minimum is an `OptionError` naming the flag."""
  if value is None or value < minimum:
    raise OptionError(name, value, f"must be at least {minimum}{why}.")


def default_out(folder: str, config: QuantConfig) -> str:
  return os.path.abspath(f"{os.path.basename(folder)}-{config.layer.method}-w{config.layer.grid.bits}")


def _within(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies inside it (real paths: symlinks resolved)."""
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _clean_temporaries(path: str) -> None:
  """Tidies what a killed save of ours left beside `path` (under the lock): `.NAME.tmp-*` folders (an unfinished
  new checkpoint) are removed; a `.NAME.old-*` folder holds the previous checkpoint moved aside while the new one
  was renamed into place, so it is put back when `path` is missing (the kill fell between the two renames) and
  removed only when `path` is there."""
  parent, name = os.path.split(path)
  for stale in glob.glob(os.path.join(parent, f".{glob.escape(name)}.tmp-*")):
    shutil.rmtree(stale, ignore_errors=True)
  for old in glob.glob(os.path.join(parent, f".{glob.escape(name)}.old-*")):
    moved = os.path.join(old, "ckpt")
    if not os.path.exists(path) and ckpt.is_checkpoint(moved):
      os.rename(moved, path)
      log.warning("restored %s from %s (a save was interrupted between its renames)", path, old)
    shutil.rmtree(old, ignore_errors=True)


def _check_out(out: str, folder: str, overwrite: bool) -> None:
  if _within(folder, out):
    raise OptionError("out", out, f"is the --model folder or contains it ({folder}); writing there could replace "
                      f"the model. Choose another {{name}}.")
  if not os.path.exists(out):
    return
  if os.path.isdir(out) and not os.listdir(out):
    return  # an empty folder, made for the output: nothing to lose
  if ckpt.is_checkpoint(out) and not overwrite:
    raise OptionError("out", out, "already holds a finished checkpoint; pass --overwrite to replace it, or "
                      "another {name}.")
  try:
    ckpt.check_replaceable(out)
  except FileExistsError as e:
    raise OptionError("out", out, f"cannot be written: {e}") from None


CALIB_TOKENS_PER_FORWARD = 1024  # the default LM micro-batch, in tokens


def default_batch_size(seqlen: int, lm: bool, data_devices: int = 1) -> int:
  """Calibration windows per forward pass when `--batch-size` is not given: 1024 tokens of an LM (at least one
  window), 8 images of a classifier, rounded up to a multiple of the mesh's data axis. The forward's temporaries
  (attention scores, the MLP's intermediate) grow with the micro-batch while the Hessians and the speed do not:
  on Qwen3-0.6B's shape (4 blocks, 32 × 512 tokens, 2-core CPU) 8 windows peaked at 1.97 GiB and 2 at 1.48 GiB,
  in 75.5 and 70.8 s (BENCHMARKS.md, "With today's defaults")."""
  b = max(1, CALIB_TOKENS_PER_FORWARD // seqlen) if lm else 8
  return -(-b // data_devices) * data_devices


class _Calibration:
  """The calibration set of a run, read and checked before the weights are loaded."""

  def __init__(self, folder: str, lm: bool, path: str | None, nsamples: int, seqlen: int, batch_size: int,
               seed: int, position_limit: int | None = None):
    self.path = os.path.abspath(path or data.default_calib(folder, lm))
    if lm:
      limit = position_limit
      if limit is not None and seqlen > limit:
        log.warning("--seqlen %d exceeds the model's max_position_embeddings=%d: positions beyond it were never "
                    "trained, so the calibration activations are not the model's.", seqlen, limit)
      tokenizer = data.load_tokenizer(folder)
      text = data.load_text(self.path, "calibration text (--calib)")
      self.batches = data.lm_calibration(tokenizer, text, nsamples, seqlen, batch_size, seed)
      self.nsamples = nsamples
    else:
      images, _ = data.load_images(self.path, split="calib")
      self.nsamples = min(nsamples, len(images))
      if self.nsamples < nsamples:
        log.warning("--nsamples %d: %s holds %d images; calibrating on all %d (recorded in the checkpoint).",
                    nsamples, self.path, len(images), self.nsamples)
      self.batches = data.vision_calibration(folder, images, self.nsamples, batch_size, seed)
    self.record = {"path": self.path, "nsamples": self.nsamples, "seqlen": seqlen if lm else None,
                   "batch_size": batch_size, "seed": seed}


def quantize_folder(model: str, out: str | None = None, *, config: QuantConfig, calib: str | None = None,
                    nsamples: int = 128, seqlen: int = 256, batch_size: int | None = None, seed: int = 0,
                    overwrite: bool = False, verify: bool = True,
                    progress: Callable[[int, int], Callable[[Iterable[int]], Iterable[int]]] | None = None,
                    mesh: Any = None, offload: bool | None = None) -> dict[str, Any]:
  """Quantizes the HF model folder `model` into the checkpoint `out` (module docstring); returns the summary.

  `batch_size`: calibration windows (images) per forward; None: `default_batch_size`'s (1024 tokens of an LM).
  `progress(total, initial)` may return a wrapper of the block iterator (a tqdm bar). `verify=False` skips the
  SHA-256 check of a partial checkpoint being resumed. `mesh`: run on a `jax.sharding.Mesh`
  (`gilora_jax.sharding`); in a multi-host run every process calls this with the same arguments, each reads
  the weight slices its devices hold, and process 0 alone writes (the output folder must be on a file system
  every process reads, for resuming). `offload`: `apply.quantize_model`'s (calibration activations on the host).
  """
  t_start = time.perf_counter()
  at_least("nsamples", nsamples)
  at_least("seqlen", seqlen, why=" (tokens per calibration window)")
  if batch_size is not None:
    at_least("batch_size", batch_size)
  folder = convert.local_folder(model)
  if ckpt.looks_like_checkpoint(folder):
    raise ValueError(f"{folder} is a gilora checkpoint; quantize the float HF model folder it came from.")
  abstract = convert.abstract_hf(folder)
  lm = is_lm(abstract)
  given = batch_size is not None
  batch_size = batch_size if given else default_batch_size(seqlen, lm, 1 if mesh is None else mesh.shape["data"])
  if mesh is not None:  # the batches' rows must divide over "data": told now, not after tokenizing
    sizes = {batch_size} | ({nsamples % batch_size} if nsamples % batch_size else set())
    n = mesh.shape["data"]
    if any(b % n for b in sizes):
      raise OptionError("batch_size", batch_size, f"{'' if given else '(the default) '}with --nsamples {nsamples} "
                        f"gives batches of {sorted(sizes)} rows, which do not divide over the mesh's data axis of "
                        f"{n} devices; pass --nsamples and {{name}} multiples of {n}, or --mesh data=1,model="
                        f"{mesh.size}.")
  writer = sharding_lib.is_writer()
  apply.check_config(abstract, config)
  out = os.path.abspath(out) if out else default_out(folder, config)
  partial = out + PARTIAL_SUFFIX
  _check_out(out, folder, overwrite)  # fails fast, before waiting for anything
  with files.OutputLock(out) if writer else contextlib.nullcontext():  # the writer holds it for every process
    if writer:
      for path in (out, partial):
        _clean_temporaries(path)
      _check_out(out, folder, overwrite)  # again under the lock: nothing can have changed it since
    sharding_lib.barrier("checked")
    t = time.perf_counter()
    cal = _Calibration(folder, lm, calib, nsamples, seqlen, batch_size, seed,
                       getattr(abstract.config, "max_position_embeddings", None))
    stages = {"checks": round(t - t_start, 3), "calibration_data": round(time.perf_counter() - t, 3)}
    run = json.loads(json.dumps({"source": folder, "calib": cal.record}))  # as a checkpoint stores it
    quant = {"config": json.loads(json.dumps(config.to_json())), "num_blocks": len(abstract.layers)}
    fix = f"delete {partial} to start over."
    done = _check_partial(partial, run, quant, fix)
    sharding_lib.barrier("partial read")  # every process has read the partial run before the writer changes it
    t = time.perf_counter()
    # Streaming: each block's float weights when its turn comes (one block resident at a time), the embeddings,
    # norms and head once to write them and once for the embedding pass; every tensor's shape was checked
    # against the config from the safetensors headers.
    lazy = convert.LazyHF(folder, param_dtype="stored")  # bf16 weights stay bf16 (computed in float32)
    skeleton = lazy.abstract  # no weight held: blocks are read in turn, the rest only for the embedding pass
    stages["load"] = round(time.perf_counter() - t, 3)
    resume = None
    if done:
      restored, recs = partial_lib.restore_blocks(partial, nn.clone(skeleton), done, verify=verify, fix=fix)
      resume = apply.Resume(restored, [_record(r) for r in recs], done)
      log.info("resuming %s from block %d of %d", partial, done, quant["num_blocks"])
    elif done is None and writer:
      partial_lib.start(partial, run, quant)
    t_out = time.perf_counter()
    handover = []  # the outside weights just written, handed to the embedding pass (read once, then freed)
    if writer and not partial_lib.has_outside(partial, verify=verify, fix=fix):
      # the embeddings, norms and head are written first, while nothing else is in memory: the output links
      # them in at the end, so the run never holds them beside a block (2.3 GiB of an 8B model in bf16)
      handover.append(lazy.load(skip="layers"))
      partial_lib.save_outside(partial, handover[0])
    sharding_lib.barrier("outside written")
    stages["write_outside"] = round(time.perf_counter() - t_out, 3)

    def after_block(i, model, recs):  # one shard per finished block: nothing finished is ever rewritten
      block = model.layers[i] if mesh is None else sharding_lib.gathered(model.layers[i])  # every process
      if writer:
        partial_lib.save_block(partial, i, block, [r._asdict() for r in recs if r.block == i])
      sharding_lib.barrier(f"block {i} written")
      # the shard on disk is the block from now on (the output links it in): keep only its shapes, so the run's
      # memory does not grow with the blocks done (36 quantized 8B blocks would hold ~4 GB)
      model.layers[i] = _shapes_only(model.layers[i])

    stages["restore"] = round(time.perf_counter() - t - stages["load"] - stages["write_outside"], 3)
    t0 = time.perf_counter()
    wrap = None if progress is None else progress(quant["num_blocks"], 0 if resume is None else resume.blocks_done)
    result = apply.quantize_model(skeleton, cal.batches, config, resume=resume, after_block=after_block,
                                  progress=wrap if writer else None, check=False, stream=lazy,
                                  mesh=mesh, offload=offload,  # checked above, on the same shapes
                                  outside=lambda: handover.pop() if handover else None)
    del skeleton
    stages.update(result.stages, quantize_model=round(time.perf_counter() - t0, 3))
    stages["checkpoint"] = stages.pop("after_block")  # our after_block writes the block's shard
    t = time.perf_counter()
    records = [r._asdict() for r in result.records]
    side = {name: os.path.join(folder, name) for name in SIDE_FILES if os.path.isfile(os.path.join(folder, name))}
    side[RECORDS_FILE] = "".join(json.dumps(r) + "\n" for r in records).encode()
    side[PLOT_FILE] = plot.error_plot(records, title=f"{os.path.basename(folder)}: {config.layer.method}, "
                                      f"{config.layer.grid.bits}-bit, rank {config.layer.rank}")
    meta = {"run": run, "source": folder, "records": records,
            "quant": {**quant, "blocks_done": quant["num_blocks"], "sites": nn.quantized_specs(result.model)}}
    if writer:
      # the block shards and the outside weights written at the start, linked in: nothing is serialised again
      ckpt.save_assembled(out, result.model,
                          [partial_lib.block_dir(partial, i) for i in range(quant["num_blocks"])], meta,
                          overwrite=overwrite, files=side, outside_dir=partial_lib.outside_dir(partial))
      partial_lib.remove(partial)  # the finished run supersedes it (only what we wrote there is removed)
      for path in (out, partial):
        _clean_temporaries(path)
    sharding_lib.barrier("written")
    stages["write"] = round(time.perf_counter() - t, 3)
  errs = [r["rel_err"] for r in records if r["rel_err"] is not None]
  layer = config.layer
  return {"out": out, "model": folder, "method": layer.method, "bits": layer.grid.bits, "rank": layer.rank,
          "protocol": config.protocol, "layers": len(records), "blocks": quant["num_blocks"],
          "nsamples": cal.nsamples, "mean_rel_err": float(np.mean(errs)) if errs else None,
          "max_rel_err": float(np.max(errs)) if errs else None, "seconds": round(time.perf_counter() - t_start, 2),
          "resumed_from_block": None if resume is None else resume.blocks_done, "stages": stages}


def _shapes_only(module):
  """`module` with every array replaced by its ShapeDtypeStruct (what `nn.quantized_specs` still reads)."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))


def _check_partial(partial: str, run: dict, quant: dict, fix: str) -> int | None:
  """How many blocks an unfinished run at `partial` has finished (None when there is no such run); an error for a
  folder there that is not ours, or a run of other options."""
  if not os.path.exists(partial):
    return None
  if not partial_lib.is_partial(partial):
    if ckpt.is_checkpoint(partial):
      raise ValueError(f"{partial} holds an unfinished run of an earlier gilora_jax (one checkpoint of the whole "
                       f"model); finish it with that version, or delete it to start over.")
    raise FileExistsError(f"{partial} exists but is not a gilora partial checkpoint (no {partial_lib.INFO}); gilora "
                          f"keeps an unfinished run there. Move it away, or pass another --out.")
  meta = partial_lib.read(partial, fix)
  if meta["run"] != run or meta["quant"] != quant:
    raise ValueError(f"{partial} holds an unfinished run with other options; delete it to start over, or run the "
                     f"command that started it (options stored in {partial}/{partial_lib.INFO}).")
  partial_lib.clean(partial)
  return partial_lib.blocks_done(partial)


def source_folder(folder: str) -> str:
  """The float model folder a checkpoint was quantized from (itself for a HF folder)."""
  return ckpt.read_meta(folder).get("source", folder) if ckpt.is_checkpoint(folder) else folder


def evaluate_folder(folder: str, *, text: str | None = None, seqlen: int = 256, images: str | None = None,
                    batch_size: int | None = None, verify: bool = True, model=None) -> dict:
  """Perplexity (LM) or top-1 (classifier) of the model in `folder` (HF folder or gilora checkpoint)."""
  if batch_size is not None:
    at_least("batch_size", batch_size)
  folder = convert.local_folder(folder)
  model = load_model(folder, verify=verify) if model is None else model
  source = source_folder(folder)
  if is_lm(model):
    if images is not None:
      raise OptionError("images", images, "is for image classifiers; this is a causal LM (use --text).")
    at_least("seqlen", seqlen, 2, " (the first token of a window has no prediction)")
    if seqlen > model.config.max_position_embeddings:
      log.warning("--seqlen %d exceeds the model's max_position_embeddings=%d: positions beyond it were never "
                  "trained.", seqlen, model.config.max_position_embeddings)
    text = text or _existing(os.path.join(source, "eval.txt"), "--text FILE")
    ids = data.tokenize(data.load_tokenizer(folder), data.load_text(text, "evaluation text (--text)"))
    return {"model": folder, "text": os.path.abspath(text), "seqlen": seqlen,
            **evaluate.perplexity(model, ids, seqlen, batch_size or 8)}
  if text is not None:
    raise OptionError("text", text, "is for causal LMs; this is an image classifier (use --images).")
  images = images or data.default_calib(source, lm=False)
  imgs, labels = data.load_images(images)
  return {"model": folder, "images_path": os.path.abspath(images),
          **evaluate.top1(model, imgs, labels, folder, batch_size=batch_size or 128)}


def _existing(path: str, flag: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist; pass {flag}.")
  return path


def generate_folder(folder: str, prompt: str, max_new_tokens: int, *, verify: bool = True) -> dict:
  """Greedy continuation of `prompt` by the LM in `folder`; refuses an empty prompt or a non-positive length."""
  at_least("max_new_tokens", max_new_tokens)
  if not prompt.strip():
    raise OptionError("prompt", repr(prompt), "is empty; give the text to continue.")
  folder = convert.local_folder(folder)
  arch = ckpt.read_info(folder)["architecture"] if ckpt.looks_like_checkpoint(folder) else convert.architecture_of(
      *hf_config.read_config(folder))
  if arch not in llama.ARCHITECTURES:
    raise ValueError(f"{folder} holds a {arch}, not a causal LM; generate needs one of "
                     f"{', '.join(llama.ARCHITECTURES)}.")
  tokenizer = data.load_tokenizer(folder)
  n = len(data.tokenize(tokenizer, prompt))
  if n == 0:
    raise OptionError("prompt", repr(prompt), "has no tokens under this model's tokenizer; give some text.")
  model = load_model(folder, verify=verify)
  limit = model.config.max_position_embeddings
  if n + max_new_tokens > limit:
    log.warning("the prompt (%d tokens) plus --max-new-tokens %d exceeds max_position_embeddings=%d: positions "
                "beyond it were never trained.", n, max_new_tokens, limit)
  text = llama.generate(model, tokenizer, prompt, max_new_tokens)
  return {"model": folder, "prompt": prompt, "prompt_tokens": n, "max_new_tokens": max_new_tokens,
          "completion": text}


# ------------------------------------------------------------------------------------------------ built-in comparison

# The built-in comparison's settings: small built-in models (hidden 96–128), so rank 16 (the layer default is 32).
BUILTIN = {"bits": 3, "rank": 16, "nsamples": 32, "seqlen": 256, "eval_seqlen": 256, "vit_nsamples": 128}
BUILTIN_RUNS = (  # (label, flat option overrides): the methods of the built-in comparison
    ("rtn", dict(method="rtn")),
    ("gptq", dict(method="gptq")),
    ("gptq+olrc", dict(method="gptq+olrc")),
    ("gilora", dict(method="gilora")),
    ("gilora+1loop", dict(method="gilora", loops=1)),
)


def builtin_folders() -> tuple[str | None, str | None]:
  """(LM folder, DeiT folder) of the built-in models where gilora_jax/assets ships them, else None each."""
  from gilora_jax import assets  # pylint: disable=import-outside-toplevel
  found = []
  for p in (assets.QWEN3_SHAKESPEARE, assets.DEIT_DIGITS):
    found.append(str(p) if os.path.isfile(os.path.join(p, "config.json")) else None)
  return found[0], found[1]


def comparison_setup(folder: str, model, *, nsamples: int = BUILTIN["nsamples"], seqlen: int = BUILTIN["seqlen"],
                     eval_seqlen: int = BUILTIN["eval_seqlen"], vit_nsamples: int = BUILTIN["vit_nsamples"],
                     seed: int = 0, batch_size: int = 8) -> tuple[list, Callable[[Any], dict], str]:
  """(calibration batches, score(model) -> dict, metric name) of the comparison protocol for the model in `folder`
  (`builtin_comparison`'s docstring): an LM's calib.txt windows and eval.txt perplexity, a classifier's .npz
  calib split and test-split top-1. Shared with experiments/paper_tables.py."""
  if is_lm(model):
    tok = data.load_tokenizer(folder)
    calib = data.lm_calibration(tok, data.load_text(os.path.join(folder, "calib.txt")), nsamples, seqlen,
                                batch_size, seed)
    ids = data.tokenize(tok, data.load_text(os.path.join(folder, "eval.txt")))

    def score(m):
      r = evaluate.perplexity(m, ids, eval_seqlen, batch_size)
      return {"perplexity": r["perplexity"], "tokens": r["tokens"]}
    return calib, score, "perplexity"
  npz = data.default_calib(folder, lm=False)
  images, _ = data.load_images(npz, split="calib")
  calib = data.vision_calibration(folder, images, min(vit_nsamples, len(images)), 64, seed)
  test_images, labels = data.load_images(npz)
  return calib, lambda m: evaluate.top1(m, test_images, labels, folder), "top1"


def builtin_comparison(lm_folder: str | None, vit_folder: str | None, *, config: QuantConfig | None = None,
                       nsamples: int = BUILTIN["nsamples"], seqlen: int = BUILTIN["seqlen"],
                       eval_seqlen: int = BUILTIN["eval_seqlen"], vit_nsamples: int = BUILTIN["vit_nsamples"],
                       runs=BUILTIN_RUNS, table: Callable[[str], None] | None = None) -> list[dict]:
  """Quantizes the given LM / classifier folders with every run's method; returns one result dict per row.

  `config` gives the options every run shares (default: 3 bits, rank 16); each run changes its method/loops.
  The LM is calibrated on `nsamples` random `seqlen`-token windows of its calib.txt and scored by perplexity on
  eval.txt (`eval_seqlen` windows); the classifier on `vit_nsamples` images of the .npz beside it (its calib
  split) and scored by top-1 on its test split. `table(line)` receives the printed table, line by line.
  """
  config = config or apply.make_config(bits=BUILTIN["bits"], rank=BUILTIN["rank"])
  emit = table or (lambda line: None)
  rows = []
  for folder in (f for f in (lm_folder, vit_folder) if f is not None):
    model = load_model(folder)
    lm = is_lm(model)
    calib, score, metric = comparison_setup(folder, model, nsamples=nsamples, seqlen=seqlen,
                                            eval_seqlen=eval_seqlen, vit_nsamples=vit_nsamples,
                                            seed=config.layer.seed)
    base = score(model)
    rows.append({"model": os.path.basename(folder), "label": "float", **base, "mean_rel_err": None, "seconds": 0.0})
    layer = config.layer
    emit("")
    emit(f"{os.path.basename(folder)}: {layer.grid.bits}-bit, rank {layer.rank}, "
         f"{f'{nsamples} calibration windows of {seqlen} tokens' if lm else f'{vit_nsamples} calibration images'}, "
         f"protocol {config.protocol}")
    emit(f"{'method':<14}{metric:>12}{'mean rel_err':>14}{'seconds':>9}")
    emit(f"{'float':<14}{base[metric]:>12.4f}{'':>14}{'':>9}")
    for label, kw in runs:
      run_config = QuantConfig(layer=layer.replace(**kw), protocol=config.protocol, rules=config.rules)
      t0 = time.perf_counter()
      q = apply.quantize_model(model, calib, run_config)
      seconds = time.perf_counter() - t0
      res = score(q.model)
      errs = [r.rel_err for r in q.records if r.rel_err is not None]  # none with --no-diagnostics
      err = float(np.mean(errs)) if errs else None
      rows.append({"model": os.path.basename(folder), "label": label, **res, "mean_rel_err": err,
                   "seconds": round(seconds, 2)})
      emit(f"{label:<14}{res[metric]:>12.4f}{'–' if err is None else f'{err:.5f}':>14}{seconds:>9.1f}")
  return rows


def _record(r: dict) -> apply.LayerRecord:
  """A records-file row as a LayerRecord; rows written before lower_estimate was dropped still resume."""
  r = dict(r)
  r.pop("lower_estimate", None)
  return apply.LayerRecord(**r)


EXAMPLE_RUNS = (  # (label, flat overrides) for the built-in example layer
    ("rtn", dict(method="rtn")), ("gptq", dict(method="gptq")), ("gptq+lorc", dict(method="gptq+lorc")),
    ("gptq+olrc", dict(method="gptq+olrc")), ("gilora", dict(method="gilora")),
    ("gilora+2loops", dict(method="gilora", loops=2)), ("srr", dict(method="srr")))


def example_comparison(config, table: Callable[[str], None]) -> list[dict]:
  """The built-in example layer, every method at the same bits and rank (when the built-in models are absent).
  No shared site on purpose: each row's seconds include the Hessian work. Diagnostics "auto" means "full" here:
  the table is the comparison of errors (gilora's rows carry the bounds)."""
  from gilora_jax.examples import example_layer  # pylint: disable=import-outside-toplevel
  from gilora_jax.layer import quantize_layer  # pylint: disable=import-outside-toplevel
  W, H = example_layer()
  config = config.replace(diagnostics="full") if config.diagnostics == "auto" else config
  g = config.grid
  table(f"built-in example layer: W {W.shape[0]}×{W.shape[1]}, {g.bits}-bit, rank {config.rank}"
        f"{'' if g.group_size is None else f', group {g.group_size}'}")
  table(f"{'method':<15}{'rel_err':>10}{'Cor. 3.9 bound (gilora)':>25}{'seconds':>9}")
  rows = []
  for label, kw in EXAMPLE_RUNS:
    rep = quantize_layer(W, H, config=config.replace(**{"loops": 0, **kw})).report
    cells = ["–" if v is None else f"{v:.5f}" for v in (rep.rel_err, rep.upper_bound)]
    table(f"{label:<15}{cells[0]:>10}{cells[1]:>25}{rep.seconds:>9.2f}")
    rows.append({"layer": "example", "label": label, **rep._asdict()})
  return rows
