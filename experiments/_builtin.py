"""Plumbing shared by the two scripts that train the built-in models (train_builtin_lm.py, train_builtin_vit.py).

Kept out of the library on purpose: nothing here is needed to *use* the shipped models, only to rebuild them.
"""
import argparse
import dataclasses
import json
import pathlib
import time
import typing


def parse_args(cls, argv=None):
  """A frozen dataclass of scalar fields -> `--field value` flags (tyro-like, argparse only)."""
  parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                   formatter_class=argparse.RawTextHelpFormatter)
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    tp = hints[f.name]
    if tp is bool:
      parser.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
    elif typing.get_origin(tp) is tuple:
      parser.add_argument(f"--{f.name}", type=lambda s: tuple(x for x in s.split(",") if x), default=f.default,
                          help="comma-separated")
    else:
      parser.add_argument(f"--{f.name}", type=tp, default=f.default)
  return cls(**vars(parser.parse_args(argv)))


class JsonlWriter:
  """Appends one JSON record per line to workdir/metrics.jsonl (big_vision style); echoes to stdout."""

  def __init__(self, workdir: pathlib.Path):
    workdir.mkdir(parents=True, exist_ok=True)
    self._f = open(workdir / "metrics.jsonl", "w", encoding="utf-8")  # pylint: disable=consider-using-with
    self._t0 = time.time()

  def write(self, **record):
    record = {"wall_s": round(time.time() - self._t0, 2), **record}
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()
    print(json.dumps(record), flush=True)

  def close(self):
    self._f.close()


def write_json(path: pathlib.Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def args_dict(args) -> dict:
  return {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in dataclasses.asdict(args).items()}


def export(graphdef, state, folder: pathlib.Path, save_dtype: str, model: str, extra_config: dict | None = None):
  """Writes the HF folder (config.json + model.safetensors) with gilora_jax.models.convert.save_hf.

  ``model`` names the port (``"qwen3"`` or ``"deit"``); weights are cast to ``save_dtype`` on the way out.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import convert, deit, qwen3  # pylint: disable=import-outside-toplevel
  cls = {"qwen3": qwen3.Qwen3, "deit": deit.DeiT}[model]
  cfg = dataclasses.replace(nnx.merge(graphdef, state).config, param_dtype=save_dtype)
  out_graphdef, out_state = nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(out_state, jax.tree.map(lambda x: x.astype(save_dtype), nnx.to_pure_dict(state)))
  convert.save_hf(nnx.merge(out_graphdef, out_state), folder, extra_config=extra_config)
