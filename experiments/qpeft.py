"""QPEFT comparison: the held-apart metric after the same number of fine-tune steps from each initialisation.

For each built-in model (the Shakespeare Qwen3, the digits DeiT) and each bit width, quantize once per method
that owns a Q (gptq+olrc: the shared base of zero / loftq / olrc; gilora; srr), then fine-tune L and R from every
init (`gilora_jax.finetune`) for the same steps and seeds:

  PYTHONPATH=. python experiments/qpeft.py                      # 2 and 3 bits, rank 16, seeds 0 1, 60 steps
  PYTHONPATH=. python experiments/qpeft.py --bits 2 --seeds 0 --steps 20 --workdir runs/qpeft_smoke

Writes workdir/args.json, workdir/results.jsonl (one line per model × bits × init × seed, resumable: finished
lines are skipped when the script is run again), workdir/curves.jsonl (every held-apart point), workdir/table.md
and workdir/curves.png. Seeds are the fine-tune's (data order, the zero init); quantization uses seed 0.
LM: train on windows of calib.txt (training works), perplexity on the first `lm_held_windows` windows of
Hamlet (eval.txt, never trained on). DeiT: train on the 128 calibration images (train split), top-1 on the 359
held-out test digits.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import time

import numpy as np

from gilora_jax import assets, load_model
from gilora_jax.finetune import TrainConfig, finetune, train
from gilora_jax.models import deit
from gilora_jax.pipeline import apply, data


@dataclasses.dataclass(frozen=True)
class Args:
  bits: tuple = (2, 3)
  seeds: tuple = (0, 1)
  rank: int = 16
  steps: int = 60
  lr: float = 2e-3
  warmup: int = 6
  lm_batch: int = 8
  seqlen: int = 128
  lm_held_windows: int = 64
  vit_batch: int = 32
  gamma: float = 0.1
  calib_samples: int = 32  # LM: windows of 256 tokens for the quantization
  models: tuple = ("lm", "vit")  # or LM folders (e.g. runs/smollm2-135m-instruct)
  workdir: str = "runs/qpeft"


INIT_OF = (("gptq+olrc", ("zero", "loftq", "olrc")), ("gilora", ("gilora",)), ("srr", ("srr",)))


def _folder(kind):
  return {"lm": assets.QWEN3_SHAKESPEARE, "vit": assets.DEIT_DIGITS}.get(kind, kind)


def _name(kind):
  return kind if kind in ("lm", "vit") else os.path.basename(os.path.normpath(kind))


def _data(kind, a):
  if kind != "vit":  # the built-in LM, or an LM folder with calib.txt / eval.txt (experiments/smollm2.py's)
    folder = _folder(kind)
    tok = data.load_tokenizer(folder)
    texts = {s: (assets.lm_text(s) if kind == "lm" else data.load_text(os.path.join(folder, f"{s}.txt")))
             for s in ("calib", "eval")}
    ids = data.tokenize(tok, texts["calib"])
    held = data.tokenize(tok, texts["eval"])[:a.lm_held_windows * a.seqlen]
    calib = data.lm_calibration(tok, texts["calib"], a.calib_samples, 256, 8, 0)
    return train.lm_data(ids, a.seqlen, held_ids=held), calib, a.lm_batch
  images, labels = assets.digits("calib")
  test_images, test_labels = assets.digits("test")
  pre = lambda x: deit.preprocess(x, assets.DEIT_DIGITS)  # noqa: E731
  calib = data.vision_calibration(assets.DEIT_DIGITS, images, 128, 64, 0)
  return train.image_data(pre(images), labels, held=(pre(test_images), test_labels)), calib, a.vit_batch


def _float_metric(model, d, kind) -> float:
  """The float model's perplexity (LM) or top-1 (DeiT) on the fine-tune's held-apart split (`gilora eval`'s)."""
  from gilora_jax.pipeline import evaluate  # pylint: disable=import-outside-toplevel
  if kind != "vit":
    return float(evaluate.perplexity(model, np.asarray(d.held).reshape(-1), np.shape(d.held)[1], 8)["perplexity"])
  return float(evaluate.top1(model, *assets.digits("test"), assets.DEIT_DIGITS)["top1"])  # _data's held split


def main(a: Args) -> None:
  out = pathlib.Path(a.workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "args.json").write_text(json.dumps(dataclasses.asdict(a), indent=2), encoding="utf-8")
  results_path = out / "results.jsonl"
  done = set()
  if results_path.exists():
    for line in results_path.read_text(encoding="utf-8").splitlines():
      r = json.loads(line)
      done.add((r["model"], r["bits"], r["init"], r["seed"]))
  cfg = TrainConfig(steps=a.steps, lr=a.lr, warmup=a.warmup)
  for kind in a.models:
    float_model = load_model(_folder(kind))
    name = _name(kind)
    d, calib, batch = _data(kind, a)
    if (name, None, "float", None) not in done:  # the unquantized model on the same held-apart split
      metric = "eval_accuracy" if kind == "vit" else "eval_perplexity"
      value = _float_metric(float_model, d, kind)
      row = {"model": name, "bits": None, "rank": None, "method": None, "init": "float", "seed": None,
             "steps": 0, "initial": value, "final": value}
      print(json.dumps({**row, "metric": metric}), flush=True)
      with open(results_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    for bits in a.bits:
      for method, inits in INIT_OF:
        todo = [(i, s) for i in inits for s in a.seeds if (name, bits, i, s) not in done]
        if not todo:
          continue
        t = time.perf_counter()
        q = apply.quantize_model(float_model, calib, method=method, bits=bits, rank=a.rank,  # SRR keeps its blocks
                                 **({"final_olrc": False} if method == "srr" else {}))
        qs = round(time.perf_counter() - t, 1)
        records = [r._asdict() for r in q.records]
        for init, seed in todo:
          t = time.perf_counter()
          res = finetune(q.model, d, init=init, cfg=cfg, batch_size=batch, gamma=a.gamma, seed=seed,
                         eval_every=a.steps // 3, records=records, float_model=float_model)
          first, last = res.curves[0], res.curves[-1]
          metric = "eval_accuracy" if kind == "vit" else "eval_perplexity"
          row = {"model": name, "bits": bits, "rank": a.rank, "method": method, "init": init, "seed": seed,
                 "steps": a.steps, "initial": first[metric], "final": last[metric], "final_loss": last["eval_loss"],
                 "quantize_s": qs, "finetune_s": round(time.perf_counter() - t, 1)}
          print(json.dumps(row), flush=True)
          with open(results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
          with open(out / "curves.jsonl", "a", encoding="utf-8") as f:
            for c in res.curves:
              if "eval_loss" in c:
                f.write(json.dumps({"model": name, "bits": bits, "init": init, "seed": seed, **c}) + "\n")
  report(out)


def report(out: pathlib.Path) -> None:
  rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
  lines = ["| model | bits | init | quantized (step 0) | after fine-tune | seeds |", "|---|---|---|---|---|---|"]
  keys = sorted({(r["model"], r["bits"], r["init"]) for r in rows}, key=lambda k: (k[0], k[1] or 0, [
      "float", "zero", "loftq", "olrc", "gilora", "srr"].index(k[2])))
  for m, b, i in keys:
    if i == "float":
      r = next(r for r in rows if (r["model"], r["init"]) == (m, "float"))
      scale, fmt = (100, ".1f") if m == "vit" else (1, ".2f")
      lines.append(f"| {m} ({'top-1 %' if m == 'vit' else 'ppl Hamlet'}) | – | float (unquantized) | "
                   f"{r['final'] * scale:{fmt}} | – | – |")
      continue
    rs = [r for r in rows if (r["model"], r["bits"], r["init"]) == (m, b, i)]
    fin = np.array([r["final"] for r in rs])
    scale, fmt = (100, ".1f") if m == "vit" else (1, ".2f")
    metric = "top-1 %" if m == "vit" else "ppl Hamlet"
    lines.append(f"| {m} ({metric}) | {b} | {i} | {np.mean([r['initial'] for r in rs]) * scale:{fmt}} | "
                 f"{fin.mean() * scale:{fmt}} ± {fin.std() * scale:{fmt}} | {len(rs)} |")
  (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
  print("\n".join(lines))
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  curves = [json.loads(line) for line in (out / "curves.jsonl").read_text(encoding="utf-8").splitlines()]
  panels = sorted({(c["model"], c["bits"]) for c in curves})
  fig = Figure(figsize=(4 * len(panels), 3.4), dpi=110)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (m, b) in zip(axes, panels):
    for i in ("zero", "loftq", "olrc", "gilora", "srr"):
      pts = [c for c in curves if (c["model"], c["bits"], c["init"]) == (m, b, i)]
      if not pts:
        continue
      steps = sorted({c["step"] for c in pts})
      key = "eval_accuracy" if m == "vit" else "eval_perplexity"
      ys = [np.mean([c[key] for c in pts if c["step"] == s]) for s in steps]
      ax.plot(steps, ys, marker="o", markersize=3, label=i)
    ax.set_title(f"{m}, {b}-bit", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("held-apart top-1" if m == "vit" else "held-apart perplexity")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "curves.png", format="png")


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for f in dataclasses.fields(Args):
    if isinstance(f.default, tuple):
      kind = int if f.default and isinstance(f.default[0], int) else str
      p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, nargs="+", default=f.default)
    else:
      p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
  ns = vars(p.parse_args())
  main(Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()}))
  os._exit(0)  # pylint: disable=protected-access
