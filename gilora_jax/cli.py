"""The ``gilora`` command line: flags in, JSON lines out. The work is in ``gilora_jax.pipeline.run``.

  gilora quantize                  the built-in comparison (the shipped Shakespeare LM and digits DeiT, every method)
  gilora quantize --model DIR ...  quantize a local HF folder block by block into a checkpoint (--out), resumable
  gilora quantize-layer IN.npz --out OUT.npz ...   one layer from the arrays W and H
  gilora eval --model DIR          perplexity (--text, --seqlen) or top-1 (--images)
  gilora generate --model DIR --prompt TEXT
  gilora export OUT --format {ct,gptq,dense} --to DIR   a quantized model as folders transformers/vLLM/PEFT load
  gilora finetune Q --text FILE | --images DIR --init ... --out DIR   QPEFT: train L, R of a quantized model

Every option of the layer configuration is a flag named after its field (``gilora_jax.config.FIELDS``), with the
library's default. Results are JSON lines on stdout; tables, the progress bar and warnings go to stderr, the
per-layer lines with ``-v``. A user error is one line, ``gilora: error: ...``, and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

from gilora_jax import config as config_lib
from gilora_jax import runtime

log = logging.getLogger("gilora")
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _fail(msg: str) -> int:
  print(f"gilora: error: {msg}", file=sys.stderr)
  return 2


# ------------------------------------------------------------------------------------------------ flags


def _value(name: str, text: str):
  """A flat option's value from text, typed by its config field."""
  kind = config_lib.field_type(name)
  if kind is bool:
    if text.lower() not in _BOOL_WORDS:
      raise config_lib.OptionError(name, text, "must be true or false.")
    return _BOOL_WORDS[text.lower()]
  if text.lower() == "none" and config_lib.default(name) is None:
    return None
  try:
    return int(text) if kind in (int, int | None) else float(text) if kind is float else text
  except ValueError:
    raise config_lib.OptionError(name, text, f"must be {'an integer' if kind in (int, int | None) else 'a number'}."
                                 ) from None


def _add_layer_flags(p: argparse.ArgumentParser, builtin: dict | None = None) -> None:
  """Every LayerConfig field as a flag (default: the config's; `builtin`: the built-in comparison's own)."""
  g = p.add_argument_group("layer options (every one a field of gilora_jax.config.LayerConfig)")
  fast = " ".join(config_lib.flag(k) if v else "--no-" + config_lib.flag(k)[2:] for k, v in config_lib.FAST.items())
  g.add_argument("--fast", action="store_true", default=None,
                 help=f"the preset {fast} (gilora_jax.config.FAST): no clip search, no act-order, for about 70 %% of "
                 f"the cost on SmolLM2-size layers; flags given beside it win")
  paper = " ".join(f"--{k.replace('_', '-')} {v}" if isinstance(v, str) else config_lib.flag(k) if v else
                   "--no-" + config_lib.flag(k)[2:] for k, v in config_lib.PAPER.items())
  g.add_argument("--paper", action="store_true", default=None,
                 help=f"the preset {paper} (gilora_jax.config.PAPER): the papers' settings exactly, as the defaults "
                 f"were before 2026-12-03 (min–max grids, natural row order, Paper A's intrinsic λ); flags given "
                 f"beside it win")
  for name, (_, help_) in config_lib.FIELDS.items():
    kind, default = config_lib.field_type(name), config_lib.default(name)
    shown = ("on" if default else "off") if kind is bool else ("unset" if default is None else default)
    extra = (f"; the built-in comparison: {builtin[name]}" if builtin and name in builtin and builtin[name] != default
             else "")
    flags = [config_lib.flag(name)] + (["--sym"] if name == "symmetric" else [])
    if kind is bool:
      g.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None,
                     help=f"{help_} (default {shown})")
    else:
      g.add_argument(*flags, dest=name, type=lambda t, n=name: _value(n, t), default=None,
                     metavar=name.split("_")[-1].upper(), help=f"{help_} (default {shown}{extra})")


def _layer_config(a: argparse.Namespace, base: dict | None = None) -> config_lib.LayerConfig:
  given = {n: getattr(a, n) for n in config_lib.FIELDS if getattr(a, n) is not None}
  preset = config_lib.PAPER if getattr(a, "paper", None) else config_lib.FAST if getattr(a, "fast", None) else {}
  return config_lib.from_flat(**{**(base or {}), **preset, **given})


def parse_rules(specs: list[str]) -> tuple[config_lib.Rule, ...]:
  """--rule 'REGEX=bits:4,rank:0' / 'REGEX=skip' -> Rules (keys: the flat option names, - or _)."""
  rules = []
  for spec in specs or ():
    pattern, sep, body = spec.rpartition("=")
    if not sep or not pattern:
      raise config_lib.OptionError("rule", spec, "must read 'REGEX=key:value,...' or 'REGEX=skip'.")
    if body.strip() == "skip":
      rules.append(config_lib.Rule(pattern, skip=True))
      continue
    kw = {}
    for item in body.split(","):
      key, colon, text = item.partition(":")
      key = key.strip().replace("-", "_")
      if key not in config_lib.FIELDS or not colon:
        raise config_lib.OptionError("rule", spec, f"has {item!r}; use key:value with a key among "
                                     f"{', '.join(config_lib.FIELDS)}, or 'skip'.")
      kw[key] = _value(key, text.strip())
    rules.append(config_lib.Rule(pattern, **kw))
  return tuple(rules)


# ------------------------------------------------------------------------------------------------ commands


# flags of a --model run; the comparison has none
_MODEL_ONLY = ("out", "overwrite", "calib", "batch_size", "verify", "mesh", "coordinator", "num_processes",
               "process_id", "offload_activations")


def _mesh(a: argparse.Namespace):
  """Joins a multi-host run when asked (before any JAX computation), then the run's mesh: None on one device with
  the automatic mesh (the plain single-device program)."""
  runtime.init_distributed(a.coordinator, a.num_processes, a.process_id, heartbeat_timeout_s=a.heartbeat_timeout)
  return _mesh_of(a.mesh)


def _mesh_of(spec: str | None):
  """The mesh `--mesh` names: None on one device with the automatic mesh (the plain single-device program)."""
  from gilora_jax import sharding  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  if spec in (None, "auto") and jax.device_count() == 1:
    return None
  return sharding.make_mesh(spec)


def cmd_quantize(a: argparse.Namespace) -> int:
  from gilora_jax.pipeline import run  # pylint: disable=import-outside-toplevel
  if a.model is None:
    given = [n for n in _MODEL_ONLY if getattr(a, n) not in (None, False)]
    if given:
      flags = ", ".join(config_lib.flag(n) for n in given)
      return _fail(f"{flags} need --model: without it, gilora quantize runs the built-in comparison, which reads "
                   f"the shipped models and writes nothing.")
    lm, vit = run.builtin_folders()
    table = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if lm is None and vit is None:  # the built-in models are not in this install: the example layer
      for row in run.example_comparison(_layer_config(a), table):
        print(json.dumps(row))
      return 0
    base = {k: run.BUILTIN[k] for k in ("bits", "rank")}
    cfg = config_lib.QuantConfig(layer=_layer_config(a, base), protocol=a.protocol, rules=parse_rules(a.rule),
                                 activations=a.activations)
    cfg.validate()
    rows = run.builtin_comparison(None if a.vision_only else lm, None if a.lm_only else vit, config=cfg,
                                  nsamples=run.BUILTIN["nsamples"] if a.nsamples is None else a.nsamples,
                                  seqlen=a.seqlen, eval_seqlen=a.eval_seqlen, table=table,
                                  vit_nsamples=run.BUILTIN["vit_nsamples"] if a.nsamples is None else a.nsamples)
    for row in rows:
      print(json.dumps(row))
    return 0
  cfg = config_lib.QuantConfig(layer=_layer_config(a), protocol=a.protocol, rules=parse_rules(a.rule),
                               activations=a.activations)
  cfg.validate()
  mesh = _mesh(a)

  from tqdm.contrib.logging import logging_redirect_tqdm  # pylint: disable=import-outside-toplevel
  with logging_redirect_tqdm(loggers=[logging.getLogger()]):  # log lines above the bar, not through it
    summary = run.quantize_folder(a.model, a.out, config=cfg, calib=a.calib,
                                  nsamples=128 if a.nsamples is None else a.nsamples, seqlen=a.seqlen,
                                  batch_size=a.batch_size, seed=cfg.layer.seed,
                                  overwrite=a.overwrite, verify=a.verify is not False, progress=run.progress_bar,
                                  mesh=mesh, offload=a.offload_activations)
  print(json.dumps(summary))
  return 0


_LAYER_KEYS = ("Q", "L", "R", "codes", "scales", "zeros")


def cmd_quantize_layer(a: argparse.Namespace) -> int:
  """Quantize the W and H stored in an .npz; write Q, L, R, codes, scales, zeros; print a JSON line."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from gilora_jax.layer import quantize_layer  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline import data, files  # pylint: disable=import-outside-toplevel
  what = "an .npz holding arrays 'W' (d_in, d_out) and 'H' (d_in, d_in)"
  arrays = data.load_npz(a.input, what)
  missing = {"W", "H"} - set(arrays)
  if missing:
    return _fail(f"{a.input} lacks {sorted(missing)} (it holds {sorted(arrays)}); save W as the (d_in, d_out) kernel "
                 f"and H = XᵀX as 'W' and 'H'.")
  out = a.out if a.out.endswith(".npz") else a.out + ".npz"  # the JSON line must name the file written
  if os.path.exists(out):
    try:
      ours = os.path.isfile(out) and set(data.load_npz(out, "a quantize-layer result")) == set(_LAYER_KEYS)
    except ValueError:
      ours = False
    if not ours:
      return _fail(f"--out {out} exists and is not a quantize-layer result; refusing to replace it. Pass another "
                   f"--out.")
    if not a.overwrite:
      return _fail(f"--out {out} already holds a quantize-layer result; pass --overwrite to replace it, or another "
                   f"--out.")
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  if not os.access(parent, os.W_OK):
    return _fail(f"--out {out}: cannot write into {parent}; pass an --out in a folder you can write to.")
  cfg = _layer_config(a)  # "auto" includes the final error here: one product, beside reading and writing files
  res = quantize_layer(arrays["W"], arrays["H"], config=cfg.replace(diagnostics="errors") if cfg.diagnostics ==
                       "auto" else cfg)
  fd, tmp = tempfile.mkstemp(suffix=".npz", dir=parent)
  try:
    with os.fdopen(fd, "wb") as f:  # written beside OUT, then renamed over it: never a half-written file
      np.savez(f, **{k: np.asarray(getattr(res, k)) for k in _LAYER_KEYS})
    os.chmod(tmp, 0o666 & ~files.user_umask())  # mkstemp's 0600 would make the result private
    os.replace(tmp, out)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  W = arrays["W"]
  print(json.dumps({"input": a.input, "out": out, "d_in": int(W.shape[0]), "d_out": int(W.shape[-1]),
                    **res.report._asdict()}))
  return 0


def cmd_eval(a: argparse.Namespace) -> int:
  from gilora_jax.pipeline import run  # pylint: disable=import-outside-toplevel
  print(json.dumps(run.evaluate_folder(a.model, text=a.text, seqlen=a.seqlen, images=a.images,
                                       batch_size=a.batch_size, verify=a.verify)))
  return 0


def cmd_generate(a: argparse.Namespace) -> int:
  from gilora_jax.pipeline import run  # pylint: disable=import-outside-toplevel
  print(json.dumps(run.generate_folder(a.model, a.prompt, a.max_new_tokens, verify=a.verify)))
  return 0


def cmd_export(a: argparse.Namespace) -> int:
  """Write a quantized model (a `gilora quantize` output) as a ct/gptq/dense folder; print a JSON line."""
  from gilora_jax import export  # pylint: disable=import-outside-toplevel
  print(json.dumps(export.export(a.model, a.to, format=a.format, adapter=a.adapter, merge_adapter=a.merge_adapter,
                                 gptq_format=a.gptq_format, dtype=a.dtype, check=a.check, verify=a.verify,
                                 gptq_python=a.gptq_python)))
  return 0


def cmd_finetune(a: argparse.Namespace) -> int:
  """QPEFT of a `gilora quantize` output: train its L, R (Q frozen) into --out; print a JSON summary line."""
  from gilora_jax.finetune import TrainConfig, train  # pylint: disable=import-outside-toplevel
  warmup = max(0, min(a.steps // 10, a.steps - 1)) if a.warmup is None else a.warmup
  try:
    cfg = TrainConfig(steps=a.steps, lr=a.lr, warmup=warmup, final_lr=a.final_lr, weight_decay=a.weight_decay,
                      clip=a.clip, accum=a.accum, compute_dtype=a.compute_dtype)
    cfg.validate()
  except ValueError as e:
    return _fail(f"--{str(e).replace('_', '-')}")
  progress = None
  if sys.stderr.isatty():
    import tqdm  # pylint: disable=import-outside-toplevel
    progress = lambda it: tqdm.tqdm(it, total=cfg.steps, initial=it.start - 1, desc="steps", unit="step",  # noqa: E731
                                    file=sys.stderr, dynamic_ncols=True)
  every = max(1, cfg.steps // 10)

  def on_step(row):
    if progress is None and row["step"] and (row["step"] % every == 0 or "eval_loss" in row):
      spent = row["seconds"]
      eta = spent / row["step"] * (cfg.steps - row["step"])
      held = "".join(f"  {k} {v:.4g}" for k, v in row.items() if k.startswith("eval_"))
      log.warning("step %d/%d  loss %.4g  lr %.3g%s  %.0f s elapsed, ETA %.0f s", row["step"], cfg.steps, row["loss"],
                  row["lr"], held, spent, eta)
  summary = train.finetune_folder(a.model, a.out, init=a.init, text=a.text, images=a.images, held_text=a.held_text,
                                  held_images=a.held_images, held_fraction=a.held_fraction, seqlen=a.seqlen,
                                  verify=a.verify, float_model=a.float_model, cfg=cfg, batch_size=a.batch_size,
                                  gamma=a.gamma, seed=a.seed, pattern=a.layers, eval_every=a.eval_every,
                                  ckpt_every=a.ckpt_every, loftq_iters=a.loftq_iters, progress=progress,
                                  on_step=on_step, mesh=_mesh_of(a.mesh))
  print(json.dumps(summary))
  return 0


def _add_finetune_parser(sub, verify: dict) -> argparse.ArgumentParser:
  from gilora_jax.finetune.core import INITS, TrainConfig  # pylint: disable=import-outside-toplevel
  d = TrainConfig()
  p = sub.add_parser("finetune", help="QPEFT: fine-tune the low-rank factors L, R of a quantized model (Q frozen) "
                     "with AdamW; resumable")
  p.add_argument("model", metavar="QUANTIZED", help="a `gilora quantize` output folder (rank > 0)")
  p.add_argument("--out", required=True, help="output folder: curves.jsonl, curves.png, train/ (the resumable "
                 "checkpoint) and model/ (the fine-tuned quantized checkpoint); running the same command again "
                 "resumes an unfinished run")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--text", help="causal LM: a UTF-8 text file, cut into --seqlen windows as gilora eval cuts them")
  src.add_argument("--images", help="classifier: an image folder (class subfolders or labels.txt) or .npz")
  p.add_argument("--held-text", help="held-apart text (default: the last --held-fraction of the --text windows)")
  p.add_argument("--held-images", help="held-apart images (default: a seeded --held-fraction of --images)")
  p.add_argument("--held-fraction", type=float, help="fraction held apart when no held-apart file is given "
                 "(default 0.1 of the windows, 0.2 of the images)")
  p.add_argument("--init", choices=INITS, required=True, help="zero: L Gaussian, R = 0 (QLoRA); loftq: SVD of W − Q "
                 "(the float source's W); olrc / gilora / srr: the factors a gptq+olrc / gilora / srr quantization "
                 "wrote (the checkpoint must be one)")
  p.add_argument("--gamma", type=float, default=0.1, help="srr: scale of the preserved rank-k block's updates "
                 "(0 freezes it; default %(default)s)")
  p.add_argument("--loftq-iters", type=int, default=1, help="loftq: alternations T; 1 keeps the checkpoint's Q, more "
                 "re-quantize W − L R by RTN as LoftQ does (default %(default)s)")
  p.add_argument("--float-model", help="loftq: the float HF folder (default: the source the checkpoint records)")
  p.add_argument("--layers", metavar="REGEX", help="train only the quantized linears whose path matches (e.g. "
                 "'mlp'); default all")
  p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
  p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
  p.add_argument("--warmup", type=int, help="linear warm-up steps (default steps/10)")
  p.add_argument("--final-lr", type=float, default=d.final_lr, help="cosine decay to this fraction of --lr "
                 "(default %(default)s)")
  p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
  p.add_argument("--clip", type=float, default=d.clip, help="global-norm gradient clipping, 0: off (default "
                 "%(default)s)")
  p.add_argument("--batch-size", type=int, default=8, help="windows or images per micro-batch (default %(default)s)")
  p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (default %(default)s)")
  p.add_argument("--seqlen", type=int, default=128, help="window in tokens (default %(default)s)")
  p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32", help="forward pass dtype; "
                 "L, R and the optimizer state stay float32 (default %(default)s)")
  p.add_argument("--seed", type=int, default=0, help="data order and the zero init (default %(default)s)")
  p.add_argument("--mesh", help="device mesh 'data=N' (or auto, the default: every local device on data): each "
                 "micro-batch split over data, the gradients summed by XLA; --batch-size must be a multiple of N")
  p.add_argument("--eval-every", type=int, default=50, help="held-apart evaluation every N steps (and at 0 and the "
                 "end; default %(default)s)")
  p.add_argument("--ckpt-every", type=int, default=50, help="resumable checkpoint every N steps (default "
                 "%(default)s)")
  p.add_argument("--verify", **verify)
  p.set_defaults(func=cmd_finetune)
  return p


def _add_export_parser(sub, verify: dict) -> argparse.ArgumentParser:
  p = sub.add_parser("export", help="write a quantized model as a compressed-tensors, GPTQ or dense folder (+ PEFT "
                     "adapter) that transformers, vLLM, GPTQModel and PEFT load; checked by reloading it")
  p.add_argument("model", metavar="OUT", help="a `gilora quantize` output folder (or a ct/GPTQ folder)")
  p.add_argument("--format", choices=("ct", "gptq", "dense"), required=True, help="ct: compressed-tensors "
                 "pack-quantized (vLLM's preferred); gptq: qweight/qzeros/scales (v1 zeros for symmetric grids, v2 "
                 "for asymmetric); dense: float weights")
  p.add_argument("--to", required=True, metavar="DIR", help="the new folder (must not exist, or be empty)")
  p.add_argument("--adapter", action=argparse.BooleanOptionalAction, default=None, help="write L R as a PEFT LoRA "
                 "folder DIR/adapter/ (default for ct and gptq; --no-adapter drops L R)")
  p.add_argument("--merge-adapter", action="store_true", default=None, help="fold L R into the weights (dense only, "
                 "its default)")
  p.add_argument("--gptq-format", choices=("v1", "v2"), help="GPTQ zero points: v1 (stored z - 1) or v2 (stored z); "
                 "default v1 for symmetric grids, v2 for asymmetric (v1 refuses a zero of 0)")
  p.add_argument("--gptq-python", metavar="PYTHON", help="gptq: also reload the folder with transformers + optimum + "
                 "gptqmodel run by this interpreter, of a separate environment (they need a newer torch than ours; "
                 "README), and compare logits; default $GILORA_GPTQ_PYTHON, else the decode alone")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="float dtype of the folder (default the "
                 "checkpoint's; gptq is always float16)")
  p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True, help="decode every written tensor "
                 "and, for ct/dense, reload the folder with transformers + peft and compare logits (default on)")
  p.add_argument("--verify", **verify)
  p.set_defaults(func=cmd_export)
  return p


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
  from gilora_jax.pipeline.run import BUILTIN  # pylint: disable=import-outside-toplevel  (imports orbax: keep lazy)
  parser = argparse.ArgumentParser(prog="gilora", description="Low-bit plus low-rank post-training quantization.")
  parser.add_argument("-v", "--verbose", action="store_true", help="log one line per quantized layer")
  sub = parser.add_subparsers(dest="command", required=True)
  parser.commands = {}  # name -> subparser (for the help tests and for tools that list the flags)
  verify = dict(action=argparse.BooleanOptionalAction, default=True,
                help="check every file of a checkpoint against its recorded SHA-256 before use (default on)")

  p = sub.add_parser("quantize", help="quantize a model; without --model, the built-in comparison")
  p.add_argument("--model", help="local HF model folder (Llama, Qwen2, Qwen3, Mistral, DeiT/ViT); without it, the "
                 "built-in comparison")
  p.add_argument("--out", help="output checkpoint folder (default ./<model>-<method>-w<bits>); an unfinished run "
                 "keeps its finished blocks in OUT.partial and resumes from them when the command is run again")
  p.add_argument("--overwrite", action="store_true", default=None, help="replace a finished gilora checkpoint at "
                 "--out (nothing else is ever replaced)")
  p.add_argument("--calib", help="calibration text file (LM) or image folder/.npz (classifier); default: calib.txt "
                 "/ the .npz in the model folder")
  p.add_argument("--nsamples", type=int, help=f"calibration windows (LM) or images (default 128; the built-in "
                 f"comparison: {BUILTIN['nsamples']} windows, {BUILTIN['vit_nsamples']} images)")
  p.add_argument("--seqlen", type=int, default=BUILTIN["seqlen"], help="calibration window in tokens (default "
                 "%(default)s)")
  p.add_argument("--batch-size", type=int, help="calibration windows or images per forward pass (default: 1024 "
                 "tokens' worth of windows, at least 1; 8 images)")
  p.add_argument("--protocol", choices=config_lib.PROTOCOLS, default="quantized", help="inputs of block i+1 from the "
                 "quantized block i (GPTQ's protocol) or from the float one (the paper's); default %(default)s")
  p.add_argument("--activations", choices=config_lib.ACTIVATIONS, default="float32", help="dtype of the calibration "
                 "activations kept between blocks (bfloat16: half the memory; Hessians stay float32); default "
                 "%(default)s")
  p.add_argument("--offload-activations", action=argparse.BooleanOptionalAction, default=None, help="keep the "
                 "calibration activations on the host, one batch on the device at a time (default: when they would "
                 "take more than half the device's free memory)")
  p.add_argument("--rule", action="append", default=[], metavar="REGEX=key:value,...", help="per-module override of "
                 "any layer option on module paths (e.g. 'layers\\.0\\..*=bits:4' or '.*down_proj=skip'); repeatable, "
                 "first match wins")
  p.add_argument("--verify", **{**verify, "default": None})
  p.add_argument("--eval-seqlen", type=int, default=BUILTIN["eval_seqlen"], help="built-in comparison: evaluation "
                 "window in tokens (default %(default)s)")
  p.add_argument("--lm-only", action="store_true", help="built-in comparison: only the LM")
  p.add_argument("--vision-only", action="store_true", help="built-in comparison: only the DeiT")
  g = p.add_argument_group("devices and hosts (gilora_jax.sharding; README: several devices, TPU pods)")
  g.add_argument("--mesh", help="device mesh 'data=N,model=M' (batch over data, weights over model, each layer's "
                 "columns over all); default auto: every device on data")
  g.add_argument("--coordinator", metavar="HOST:PORT", help="multi-host run: process 0's address (with "
                 "--num-processes and --process-id; on TPU pods and SLURM leave all three out)")
  g.add_argument("--num-processes", type=int, help="multi-host run: how many processes take part")
  g.add_argument("--process-id", type=int, help="multi-host run: this process's index, 0 .. N-1 (0 writes)")
  g.add_argument("--heartbeat-timeout", type=int, default=100, metavar="SECONDS", help="multi-host run: a process "
                 "silent this long stops the others with an error (default %(default)s)")
  _add_layer_flags(p, {k: BUILTIN[k] for k in ("bits", "rank")})
  p.set_defaults(func=cmd_quantize)
  parser.commands["quantize"] = p

  p = sub.add_parser("quantize-layer", help="quantize one layer from an .npz holding W and H")
  p.add_argument("input", help=".npz with 'W' (d_in, d_out) and 'H' (d_in, d_in)")
  p.add_argument("--out", required=True, help="output .npz (Q, L, R, codes, scales, zeros)")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier quantize-layer result at --out")
  _add_layer_flags(p)
  p.set_defaults(func=cmd_quantize_layer)
  parser.commands["quantize-layer"] = p

  p = sub.add_parser("eval", help="perplexity of an LM on a text, or top-1 of a classifier on images")
  p.add_argument("--model", required=True, help="HF model folder or gilora checkpoint")
  p.add_argument("--text", help="text file or local HF datasets folder (default: eval.txt beside the model)")
  p.add_argument("--seqlen", type=int, default=256, help="evaluation window in tokens (default %(default)s)")
  p.add_argument("--images", help="image folder or .npz (default: the .npz beside the model)")
  p.add_argument("--batch-size", type=int, help="windows (default 8) or images (default 128) per step")
  p.add_argument("--verify", **verify)
  p.set_defaults(func=cmd_eval)
  parser.commands["eval"] = p

  p = sub.add_parser("generate", help="greedy continuation of a prompt by an LM (HF folder or gilora checkpoint)")
  p.add_argument("--model", required=True, help="HF model folder or gilora checkpoint of a causal LM")
  p.add_argument("--prompt", required=True, help="the text to continue")
  p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default %(default)s)")
  p.add_argument("--verify", **verify)
  p.set_defaults(func=cmd_generate)
  parser.commands["generate"] = p
  parser.commands["export"] = _add_export_parser(sub, verify)
  parser.commands["finetune"] = _add_finetune_parser(sub, verify)
  return parser


class _Formatter(logging.Formatter):
  """`gilora: warning: ...` for warnings and errors, `gilora: ...` for progress and per-layer lines."""

  def format(self, record: logging.LogRecord) -> str:
    level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
    return f"gilora: {level}{record.getMessage()}"


def main(argv: list[str] | None = None) -> int:
  # transformers' import-time notices ("PyTorch was not found...") are nothing a user of this command can act on.
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  # Before orbax is imported, which configures the root logger itself at import time.
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(_Formatter())
  logging.basicConfig(level=logging.WARNING, handlers=[handler])
  a = build_parser().parse_args(argv)
  # Before the first JAX computation: XLA's per-call buffers then stop page-faulting (gilora_jax/runtime.py).
  runtime.tune_cpu_malloc()
  runtime.pin_lapack()  # before the first LAPACK call: the same factorisations on every x86-64 machine
  runtime.enable_compilation_cache()  # compile each shape once, across runs too (GILORA_COMPILATION_CACHE=0: off)
  for name in ("gilora", "gilora_jax"):  # one line per layer with -v; orbax/absl/transformers stay at WARNING
    logging.getLogger(name).setLevel(logging.INFO if a.verbose else logging.WARNING)
  logging.getLogger("gilora_jax.pipeline.run").setLevel(logging.INFO)  # resume notes: always shown
  try:
    return a.func(a)
  except config_lib.OptionError as e:  # an option: named as the flag
    return _fail(e.render(cli=True))
  except (OSError, ValueError, MemoryError) as e:  # user errors (missing folder, short text, too many samples)
    return _fail(str(e))
  except RuntimeError as e:  # a collective of a multi-host run failed: a peer died (XLA's error, one line of it)
    if not _multi_process():
      raise
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)[:300]
    return _fail(f"the {_multi_process()}-process run stopped ({first}); a process probably died: rerun the same "
                 f"command on every host to resume from the finished blocks.")


def _multi_process() -> int:
  """The process count of a joined multi-host run, else 0 (JAX not imported counts as none)."""
  jax = sys.modules.get("jax")
  try:
    return jax.process_count() if jax is not None and jax.process_count() > 1 else 0
  except Exception:  # pylint: disable=broad-except
    return 0


if __name__ == "__main__":
  sys.exit(main())
