"""The ``gilora`` command line.

  gilora quantize-layer IN.npz --method M --bits B [--rank R --group-size G --sym --loops N --damp F
                        --act-order] --out OUT.npz
  gilora quantize --model DIR --method M --bits B [--rank R --group-size G --loops N --calib FILE --nsamples N
                  --seqlen L --protocol {quantized,fp} --rule 'REGEX=key:value,...' --out OUT]
                        quantize a model block by block; writes the checkpoint OUT (with records.jsonl and
                        errors.png inside), checkpointing after every block in OUT.partial and resuming from it
                        when the same command is run again
  gilora quantize       with no --model: the built-in comparison (the built-in Shakespeare LM and digits DeiT at
                        3 bits, every method: perplexity / top-1 tables) once gilora_jax/assets holds them;
                        otherwise the built-in example layer with every method (rel_err against Paper A's bounds)
  gilora eval --model DIR_OR_OUT (--text FILE --seqlen L | --images DIR_OR_NPZ)
                        one JSON line: perplexity and scored tokens, or top1 and images
  gilora generate --model DIR_OR_OUT --prompt TEXT [--max-new-tokens N]

Every command prints one JSON object per result line on stdout; progress and logs go to stderr.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import pathlib
import shutil
import sys
import time

import numpy as np

from gilora_jax import runtime

log = logging.getLogger("gilora")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--method", default="gilora", help="rtn, gptq, gptq+lorc, gptq+olrc, gilora, srr (default gilora)")
  p.add_argument("--bits", type=int, default=3, help="bit width, 2..8 (default 3)")
  p.add_argument("--rank", type=int, default=32, help="rank of the low-rank term (default 32)")
  p.add_argument("--group-size", type=int, default=None, help="input rows per grid (default: per output channel)")
  p.add_argument("--sym", action="store_true", help="symmetric grids")
  p.add_argument("--loops", type=int, default=0, help="Bid-Up/OLrC refinement loops (default 0)")
  p.add_argument("--damp", type=float, default=0.01, help="relative damping of H (default 0.01)")
  p.add_argument("--act-order", action="store_true", help="visit input rows by decreasing H_ii")
  p.add_argument("--seed", type=int, default=0)


def _quant_kwargs(a: argparse.Namespace) -> dict:
  return dict(method=a.method, bits=a.bits, rank=a.rank, group_size=a.group_size, symmetric=a.sym, loops=a.loops,
              damp=a.damp, act_order=a.act_order, seed=a.seed)


def _fail(msg: str) -> int:
  print(f"gilora: error: {msg}", file=sys.stderr)
  return 2


def cmd_quantize_layer(a: argparse.Namespace) -> int:
  """Quantize the W and H stored in an .npz; write Q, L, R, codes, scales, zeros; print a JSON line."""
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(a.input)
  if not path.is_file():
    return _fail(f"{path} does not exist; pass an .npz holding arrays 'W' (d_in, d_out) and 'H' (d_in, d_in).")
  try:
    with np.load(path) as z:
      missing = {"W", "H"} - set(z.files)
      if missing:
        return _fail(f"{path} lacks {sorted(missing)} (it holds {z.files}); save W as the (d_in, d_out) kernel and "
                     f"H = XᵀX as 'W' and 'H'.")
      W, H = z["W"], z["H"]
  except (OSError, ValueError) as e:
    return _fail(f"{path} is not a readable .npz ({e}).")
  try:
    res = gj.quantize_layer(W, H, **_quant_kwargs(a))
  except ValueError as e:
    return _fail(str(e))
  out = pathlib.Path(a.out)
  if out.suffix != ".npz":  # np.savez would append it anyway; the JSON line must name the file written
    out = out.with_name(out.name + ".npz")
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez(out, Q=np.asarray(res.Q), L=np.asarray(res.L), R=np.asarray(res.R), codes=np.asarray(res.codes),
           scales=np.asarray(res.scales), zeros=np.asarray(res.zeros))
  print(json.dumps({"input": str(path), "out": str(out), "d_in": int(W.shape[0]), "d_out": int(W.shape[1]),
                    **res.info}))
  return 0


EXAMPLE_RUNS = (  # (label, quantize_layer kwargs) for the built-in comparison
    ("rtn", dict(method="rtn")),
    ("gptq", dict(method="gptq")),
    ("gptq+lorc", dict(method="gptq+lorc")),
    ("gptq+olrc", dict(method="gptq+olrc")),
    ("gilora", dict(method="gilora")),
    ("gilora+2loops", dict(method="gilora", loops=2)),
    ("srr", dict(method="srr")),
)


def cmd_quantize_example(a: argparse.Namespace) -> int:
  """The built-in example layer, every method at the same bits and rank; a table on stderr, JSONL on stdout."""
  import gilora_jax as gj  # pylint: disable=import-outside-toplevel
  from gilora_jax.examples import example_layer  # pylint: disable=import-outside-toplevel
  W, H = example_layer()
  print(f"built-in example layer: W {W.shape[0]}×{W.shape[1]}, {a.bits}-bit, rank {a.rank}"
        f"{'' if a.group_size is None else f', group {a.group_size}'}", file=sys.stderr)
  print(f"{'method':<15}{'rel_err':>10}{'upper bound':>13}{'lower est.':>12}{'seconds':>9}", file=sys.stderr)
  for label, kw in EXAMPLE_RUNS:  # no shared HessianCache on purpose: each row's seconds include the H work
    res = gj.quantize_layer(W, H, **{**_quant_kwargs(a), "loops": 0, **kw})
    i = res.info
    print(f"{label:<15}{i['rel_err']:>10.5f}{i['upper_bound']:>13.5f}{i['lower_estimate']:>12.2e}"
          f"{i['seconds']:>9.2f}", file=sys.stderr)
    print(json.dumps({"layer": "example", "label": label, **i}))
  return 0


# ------------------------------------------------------------------------------------------------ whole models

# Files of a HF folder that a quantized checkpoint keeps beside its state (tokenizer, image preprocessing).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "generation_config.json", "preprocessor_config.json")
RECORDS_FILE = "records.jsonl"
PLOT_FILE = "errors.png"
PARTIAL_SUFFIX = ".partial"


def _is_lm(model) -> bool:
  from gilora_jax.models import qwen3  # pylint: disable=import-outside-toplevel
  return isinstance(model, qwen3.Qwen3)


def _source_folder(folder: str) -> str:
  """The float model folder a checkpoint was quantized from (itself for a HF folder)."""
  from gilora_jax.pipeline import ckpt  # pylint: disable=import-outside-toplevel
  return ckpt.read_meta(folder).get("source", folder) if ckpt.is_checkpoint(folder) else folder


def _parse_rules(specs: list[str]):
  """--rule 'REGEX=bits:4,rank:0' / 'REGEX=skip' -> apply.Rule objects."""
  from gilora_jax.pipeline.apply import Rule  # pylint: disable=import-outside-toplevel
  rules = []
  for spec in specs or ():
    pattern, sep, body = spec.rpartition("=")
    if not sep or not pattern:
      raise ValueError(f"--rule {spec!r}: expected 'REGEX=key:value,...' or 'REGEX=skip'.")
    kw: dict = {}
    for item in body.split(","):
      key, _, value = item.partition(":")
      if key == "skip":
        kw["skip"] = True
      elif key == "method":
        kw[key] = value
      elif key in ("bits", "rank", "group_size", "loops"):
        kw[key] = int(value)
      else:
        raise ValueError(f"--rule {spec!r}: unknown key {key!r}; use bits, rank, method, group_size, loops, skip.")
    rules.append(Rule(pattern, **kw))
  return tuple(rules)


def _quant_config(a: argparse.Namespace):
  from gilora_jax.pipeline.apply import QuantConfig  # pylint: disable=import-outside-toplevel
  options = {"shrink": a.shrink} if a.shrink != 1.0 else {}
  return QuantConfig(method=a.method, bits=a.bits, rank=a.rank, group_size=a.group_size, symmetric=a.sym,
                     loops=a.loops, damp=a.damp, act_order=a.act_order, seed=a.seed, protocol=a.protocol,
                     rules=_parse_rules(a.rule), options=tuple(sorted(options.items())))


def lm_calibration(tokenizer, text: str, nsamples: int, seqlen: int, batch_size: int, seed: int):
  """GPTQ-style calibration: `nsamples` random `seqlen`-token windows of the text, in batches."""
  from gilora_jax.pipeline import calib, evaluate  # pylint: disable=import-outside-toplevel
  return calib.batches(calib.token_windows(evaluate.tokenize(tokenizer, text), nsamples, seqlen, seed), batch_size)


def vision_calibration(folder: str, images_path: str, nsamples: int, batch_size: int, seed: int):
  """`nsamples` images drawn at random (seeded) from an image folder or .npz (its calib split), preprocessed."""
  from gilora_jax.pipeline import calib, evaluate  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import deit  # pylint: disable=import-outside-toplevel
  images, _ = evaluate.load_images(images_path, split="calib")
  idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:nsamples])
  return calib.batches(deit.preprocess(images[idx], folder), batch_size)


def _default_calib(folder: str, lm: bool) -> str:
  """calib.txt (LM) or the .npz holding calib_images (vision) beside the model, else a clear error."""
  if lm:
    path = os.path.join(folder, "calib.txt")
    if os.path.isfile(path):
      return path
    raise ValueError(f"no --calib given and {folder} has no calib.txt; pass --calib TEXT_FILE.")
  for name in sorted(os.listdir(folder)):
    if name.endswith(".npz"):
      return os.path.join(folder, name)
  raise ValueError(f"no --calib given and {folder} has no image .npz; pass --calib IMAGE_DIR_OR_NPZ.")


def _calibration(model, folder: str, a: argparse.Namespace):
  lm = _is_lm(model)
  path = a.calib or _default_calib(folder, lm)
  if lm:
    from gilora_jax.pipeline import evaluate  # pylint: disable=import-outside-toplevel
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return lm_calibration(tokenizer, evaluate.load_text(path), a.nsamples, a.seqlen, a.batch_size, a.seed), path
  return vision_calibration(folder, path, a.nsamples, a.batch_size, a.seed), path


def _tqdm(total: int, initial: int = 0):
  import tqdm  # pylint: disable=import-outside-toplevel

  def wrap(it):
    return tqdm.tqdm(it, total=total, initial=initial, desc="blocks", unit="block", file=sys.stderr)
  return wrap


def cmd_quantize_model(a: argparse.Namespace) -> int:
  """Quantize --model block by block, with a checkpoint after every block; resume a killed run."""
  from gilora_jax.pipeline import apply, ckpt, plot  # pylint: disable=import-outside-toplevel
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import convert  # pylint: disable=import-outside-toplevel
  folder = convert.local_folder(a.model)
  if ckpt.is_checkpoint(folder):
    raise ValueError(f"{folder} is a gilora checkpoint; quantize the float HF model folder it came from.")
  out = os.path.abspath(a.out or f"{os.path.basename(folder)}-{a.method}-w{a.bits}")
  partial = out + PARTIAL_SUFFIX
  if ckpt.is_checkpoint(out) and not a.overwrite:
    raise FileExistsError(f"{out} already holds a finished checkpoint; pass --overwrite or another --out.")
  config = _quant_config(a)
  config.validate()
  model = load_model(folder)
  calib, calib_path = _calibration(model, folder, a)
  run = {"source": folder, "calib": {"path": os.path.abspath(calib_path), "nsamples": a.nsamples,
                                     "seqlen": a.seqlen if _is_lm(model) else None, "batch_size": a.batch_size,
                                     "seed": a.seed}}
  # Through JSON, so that it compares equal to what a checkpoint stores (tuples come back as lists).
  run = json.loads(json.dumps(run))
  quant = {"config": json.loads(json.dumps(config.to_json())), "num_blocks": len(model.layers)}
  resume = None
  if ckpt.is_checkpoint(partial):
    meta = ckpt.read_meta(partial)
    if meta.get("run") != run or meta["quant"]["config"] != quant["config"]:
      raise ValueError(f"{partial} holds an unfinished run with other options; delete it to start over, or run the "
                       f"command that started it (options stored in {partial}/{ckpt.INFO_FILE}).")
    done = meta["quant"]["blocks_done"]
    records = [apply.LayerRecord(**r) for r in meta["records"]]
    resume = apply.Resume(ckpt.restore_model(partial), records, done)
    log.info("resuming %s from block %d of %d", partial, done, quant["num_blocks"])

  def after_block(i, partial_model, recs):
    if i + 1 < quant["num_blocks"]:
      ckpt.save_quantized(partial, partial_model, {**quant, "blocks_done": i + 1}, [r._asdict() for r in recs],
                          overwrite=True, extra_meta={"run": run})

  t0 = time.perf_counter()
  result = apply.quantize_model(model, calib, config, resume=resume, after_block=after_block,
                                progress=_tqdm(quant["num_blocks"], 0 if resume is None else resume.blocks_done))
  records = [r._asdict() for r in result.records]
  files = {name: os.path.join(folder, name) for name in SIDE_FILES if os.path.isfile(os.path.join(folder, name))}
  files[RECORDS_FILE] = "".join(json.dumps(r) + "\n" for r in records).encode()
  files[PLOT_FILE] = plot.error_plot(records)
  ckpt.save_quantized(out, result.model, {**quant, "blocks_done": quant["num_blocks"]}, records,
                      overwrite=a.overwrite, files=files, extra_meta={"run": run, "source": folder})
  shutil.rmtree(partial, ignore_errors=True)
  for stale in glob.glob(os.path.join(os.path.dirname(partial), f".{os.path.basename(partial)}.*")):
    shutil.rmtree(stale, ignore_errors=True)  # temporaries of per-block saves that a kill interrupted
  errs = [r["rel_err"] for r in records if r["rel_err"] is not None]
  print(json.dumps({"out": out, "model": folder, "method": a.method, "bits": a.bits, "rank": a.rank,
                    "protocol": a.protocol, "layers": len(records), "blocks": quant["num_blocks"],
                    "mean_rel_err": float(np.mean(errs)) if errs else None,
                    "max_rel_err": float(np.max(errs)) if errs else None,
                    "seconds": round(time.perf_counter() - t0, 2), "resumed_from_block":
                    None if resume is None else resume.blocks_done}))
  return 0


def evaluate_folder(folder: str, *, text: str | None = None, seqlen: int = 256, images: str | None = None,
                    batch_size: int | None = None, model=None) -> dict:
  """Perplexity (LM) or top-1 (classifier) of the model in `folder` (HF folder or gilora checkpoint)."""
  from gilora_jax.pipeline import evaluate  # pylint: disable=import-outside-toplevel
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import convert  # pylint: disable=import-outside-toplevel
  folder = convert.local_folder(folder)
  model = load_model(folder) if model is None else model
  source = _source_folder(folder)
  if _is_lm(model):
    if images is not None:
      raise ValueError("--images is for image classifiers; this is a causal LM (use --text).")
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
    text = text or _existing(os.path.join(source, "eval.txt"), "--text FILE")
    ids = evaluate.tokenize(AutoTokenizer.from_pretrained(folder), evaluate.load_text(text))
    return {"model": folder, "text": os.path.abspath(text), "seqlen": seqlen,
            **evaluate.perplexity(model, ids, seqlen, batch_size or 8)}
  if text is not None:
    raise ValueError("--text is for causal LMs; this is an image classifier (use --images).")
  images = images or _default_calib(source, lm=False)
  imgs, labels = evaluate.load_images(images)
  return {"model": folder, "images_path": os.path.abspath(images),
          **evaluate.top1(model, imgs, labels, folder, batch_size=batch_size or 128)}


def _existing(path: str, flag: str) -> str:
  if not os.path.isfile(path):
    raise ValueError(f"{path} does not exist; pass {flag}.")
  return path


def cmd_eval(a: argparse.Namespace) -> int:
  print(json.dumps(evaluate_folder(a.model, text=a.text, seqlen=a.seqlen, images=a.images,
                                   batch_size=a.batch_size)))
  return 0


def cmd_generate(a: argparse.Namespace) -> int:
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import convert, qwen3  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  folder = convert.local_folder(a.model)
  model = load_model(folder)
  if not _is_lm(model):
    raise ValueError(f"{folder} holds a {model.config.architecture}, not a causal LM; generate needs Qwen3.")
  text = qwen3.generate(model, AutoTokenizer.from_pretrained(folder), a.prompt, a.max_new_tokens)
  print(json.dumps({"model": folder, "prompt": a.prompt, "completion": text}))
  return 0


# ------------------------------------------------------------------------------------------------ built-in comparison

BUILTIN_RUNS = (  # (label, QuantConfig overrides): the methods of the built-in comparison
    ("rtn", dict(method="rtn")),
    ("gptq", dict(method="gptq")),
    ("gptq+olrc", dict(method="gptq+olrc")),
    ("gilora", dict(method="gilora")),
    ("gilora+1loop", dict(method="gilora", loops=1)),
)


def builtin_comparison(lm_folder: str | None, vit_folder: str | None, *, bits: int, rank: int, nsamples: int,
                       seqlen: int, eval_seqlen: int, protocol: str, seed: int, vit_nsamples: int = 128,
                       runs=BUILTIN_RUNS) -> list[dict]:
  """Quantizes the given LM / classifier folders with every run's method; returns one result dict per row.

  The LM is calibrated on `nsamples` random `seqlen`-token windows of its calib.txt and scored by perplexity on
  eval.txt (`eval_seqlen` windows); the classifier is calibrated on `vit_nsamples` images of the .npz beside it
  (its calib split) and scored by top-1 on its test split. Tables go to stderr.
  """
  from gilora_jax.pipeline import apply, evaluate  # pylint: disable=import-outside-toplevel
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  rows = []
  for folder in (f for f in (lm_folder, vit_folder) if f is not None):
    model = load_model(folder)
    lm = _is_lm(model)
    if lm:
      tok = AutoTokenizer.from_pretrained(folder)
      calib = lm_calibration(tok, evaluate.load_text(os.path.join(folder, "calib.txt")), nsamples, seqlen, 8, seed)
      ids = evaluate.tokenize(tok, evaluate.load_text(os.path.join(folder, "eval.txt")))

      def score(m):
        r = evaluate.perplexity(m, ids, eval_seqlen)
        return {"perplexity": r["perplexity"], "tokens": r["tokens"]}
    else:
      npz = _default_calib(folder, lm=False)
      calib = vision_calibration(folder, npz, vit_nsamples, 64, seed)
      images, labels = evaluate.load_images(npz)

      def score(m):
        return evaluate.top1(m, images, labels, folder)
    metric = "perplexity" if lm else "top1"
    base = score(model)
    rows.append({"model": os.path.basename(folder), "label": "float", **base, "mean_rel_err": None, "seconds": 0.0})
    print(f"\n{os.path.basename(folder)}: {bits}-bit, rank {rank}, "
          f"{f'{nsamples} calibration windows of {seqlen} tokens' if lm else f'{vit_nsamples} calibration images'}, "
          f"protocol {protocol}", file=sys.stderr)
    print(f"{'method':<14}{metric:>12}{'mean rel_err':>14}{'seconds':>9}", file=sys.stderr)
    print(f"{'float':<14}{base[metric]:>12.4f}{'':>14}{'':>9}", file=sys.stderr)
    for label, kw in runs:
      config = apply.QuantConfig(**{**dict(bits=bits, rank=rank, seed=seed, protocol=protocol), **kw})
      t0 = time.perf_counter()
      q = apply.quantize_model(model, calib, config)
      seconds = time.perf_counter() - t0
      res = score(q.model)
      err = float(np.mean([r.rel_err for r in q.records]))
      rows.append({"model": os.path.basename(folder), "label": label, **res, "mean_rel_err": err,
                   "seconds": round(seconds, 2)})
      print(f"{label:<14}{res[metric]:>12.4f}{err:>14.5f}{seconds:>9.1f}", file=sys.stderr)
  return rows


def _builtin_folders() -> tuple[str | None, str | None]:
  """(LM folder, DeiT folder) of the built-in models where gilora_jax/assets ships them, else None each."""
  import importlib  # pylint: disable=import-outside-toplevel
  try:
    assets = importlib.import_module("gilora_jax.assets")
  except ImportError:
    return None, None
  found = []
  for name in ("QWEN3_SHAKESPEARE", "DEIT_DIGITS"):
    p = getattr(assets, name, None)
    found.append(str(p) if p is not None and os.path.isfile(os.path.join(p, "config.json")) else None)
  return found[0], found[1]


def cmd_quantize(a: argparse.Namespace) -> int:
  if a.rank is None:  # models: rank 16 suits the small built-ins (hidden 96–128); the example layer keeps 32
    a.rank = 16 if a.model is not None or any(_builtin_folders()) else 32
  if a.model is not None:
    a.nsamples = 128 if a.nsamples is None else a.nsamples
    return cmd_quantize_model(a)
  lm_dir, vit_dir = _builtin_folders()
  if lm_dir is None and vit_dir is None:  # the built-in models are not shipped in this install: the example layer
    return cmd_quantize_example(a)
  lm_dir = None if a.vision_only else lm_dir
  vit_dir = None if a.lm_only else vit_dir
  rows = builtin_comparison(lm_dir, vit_dir, bits=a.bits, rank=a.rank, nsamples=a.nsamples or 32, seqlen=a.seqlen,
                            eval_seqlen=a.eval_seqlen, protocol=a.protocol, seed=a.seed,
                            vit_nsamples=a.nsamples or 128)
  for r in rows:
    print(json.dumps(r))
  return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default=None, help="local HF model folder (Qwen3, DeiT/ViT); without it, the built-in "
                 "comparison")
  p.add_argument("--calib", default=None, help="calibration text file (LM) or image folder/.npz (classifier); "
                 "default: calib.txt / the .npz in the model folder")
  p.add_argument("--nsamples", type=int, default=None, help="calibration windows (LM) or images (default 128; the "
                 "built-in comparison: 32 windows, all 128 shipped images)")
  p.add_argument("--seqlen", type=int, default=256, help="calibration window length in tokens (default 256)")
  p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
  p.add_argument("--protocol", choices=("quantized", "fp"), default="quantized",
                 help="next block's inputs from the quantized block (GPTQ) or the float one (paper; default quantized)")
  p.add_argument("--shrink", type=float, default=1.0, help="grid shrink factor beta (default 1.0)")
  p.add_argument("--rule", action="append", default=[], metavar="REGEX=key:value,...",
                 help="per-module override on module paths (e.g. 'layers\\.0\\..*=bits:4' or '.*down_proj=skip'); "
                 "repeatable, first match wins")
  p.add_argument("--out", default=None, help="output checkpoint folder (default ./<model>-<method>-w<bits>)")
  p.add_argument("--overwrite", action="store_true", help="replace a finished checkpoint at --out")
  p.add_argument("--eval-seqlen", type=int, default=256, help="built-in comparison: evaluation window (default 256)")
  p.add_argument("--lm-only", action="store_true", help="built-in comparison: only the LM")
  p.add_argument("--vision-only", action="store_true", help="built-in comparison: only the DeiT")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="gilora", description="Low-bit plus low-rank post-training quantization.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("quantize-layer", help="quantize one layer from an .npz holding W and H")
  p.add_argument("input", help=".npz with 'W' (d_in, d_out) and 'H' (d_in, d_in)")
  p.add_argument("--out", required=True, help="output .npz (Q, L, R, codes, scales, zeros)")
  _add_quant_args(p)
  p.set_defaults(func=cmd_quantize_layer)
  p = sub.add_parser("quantize", help="quantize a model; without --model, the built-in comparison")
  _add_quant_args(p)
  _add_model_args(p)
  p.set_defaults(rank=None)
  p.set_defaults(func=cmd_quantize)
  p = sub.add_parser("eval", help="perplexity of an LM on a text, or top-1 of a classifier on images")
  p.add_argument("--model", required=True, help="HF model folder or gilora checkpoint")
  p.add_argument("--text", default=None, help="text file or local HF datasets folder (default: eval.txt beside the "
                 "model)")
  p.add_argument("--seqlen", type=int, default=256, help="evaluation window in tokens (default 256)")
  p.add_argument("--images", default=None, help="image folder or .npz (default: the .npz beside the model)")
  p.add_argument("--batch-size", type=int, default=None, help="windows (default 8) or images (default 128) per batch")
  p.set_defaults(func=cmd_eval)
  p = sub.add_parser("generate", help="greedy continuation of a prompt by an LM (HF folder or gilora checkpoint)")
  p.add_argument("--model", required=True)
  p.add_argument("--prompt", required=True)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.set_defaults(func=cmd_generate)
  a = parser.parse_args(argv)
  # Before the first JAX computation: XLA's per-call buffers then stop page-faulting (gilora_jax/runtime.py).
  runtime.tune_cpu_malloc()
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
  for name in ("gilora", "gilora_jax"):  # our one line per layer; orbax/absl stay at WARNING
    logging.getLogger(name).setLevel(logging.INFO)
  try:
    return a.func(a)
  except (OSError, ValueError) as e:  # user errors (missing folder, unsupported model, short text): no traceback
    return _fail(str(e))


if __name__ == "__main__":
  sys.exit(main())
