"""The papers' tables, reproduced (issue 14): layer-wise error against rank and bits, and model-level quality.

Two tables, one command each; both resume (finished rows of workdir/results.jsonl are skipped when the same
command runs again) and write workdir/tables.md, one plot per model (matplotlib) and, with --results_md, the
same tables into that file between markers of their own (the rest of the file is left as it is).

  # Paper A's layer-wise figure: error against rank {0, 8, 16, 32, 64} at 3 bits and against bits {2, 3, 4} at
  # rank 32 (--sweep full: every pair), per-channel asymmetric, on real layers (the float model's inputs on its
  # calib.txt), each method at the paper's settings and at ours
  PYTHONPATH=. python experiments/paper_tables.py --table layers --workdir runs/paper_layers \\
      --models builtin-lm,builtin-deit,runs/smollm2-135m-instruct@10+20

  # Paper A's model-level tables: perplexity (LM) / top-1 (classifier), methods × bits × ranks
  PYTHONPATH=. python experiments/paper_tables.py --table models --workdir runs/paper_models

`--models`: comma-separated `builtin-lm` (the shipped Shakespeare Qwen3), `builtin-deit` (the shipped digits
DeiT) or a local HF folder (any Llama-family LM or DeiT/ViT with calib.txt + eval.txt, or an image .npz, beside
it: experiments/smollm2.py writes SmolLM2-135M so), each optionally `@B1+B2` for the blocks whose linears the
layer table measures (default: every block of the built-ins, blocks 0, middle and last of the others). With a
folder of real Qwen3-0.6B/1.7B/8B-Base or DeiT-S/B and its calibration/evaluation files the same command runs the
papers' protocol (pass --nsamples 128 --seqlen 2048 --eval_seqlen 2048).

Settings (`--settings`): `paper` = the papers' protocol (min–max grids, rows in order, gilora's intrinsic λ as
Paper A's: `gilora_jax.config.PAPER`), `default` = this library's defaults (the clip search and act-order, for
every method alike, and gilora's deflated λ). Methods: rtn, gptq (rank 0), gptq+lorc, gptq+olrc, gilora, gilora +
1/2/3 Bid-Up loops, srr. The layer table's error is ``tr(EᵀHE)/tr(WᵀHW)`` per layer divided by GPTQ's on the same
layer at the same bits and settings (median over the layers; rank 0 is GPTQ itself); gilora's Cor. 3.9 upper bound
is plotted beside it (it bounds gilora only). Model level: `gilora_jax.pipeline.run.comparison_setup`'s protocol
(the built-in comparison's: calib.txt windows, eval.txt perplexity; a classifier's calib split and test-split
top-1), the quantized propagation protocol.
"""
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for gilora_jax
import _builtin  # noqa: E402  pylint: disable=wrong-import-position

METHODS = {  # label -> layer options on top of the settings; rank-free methods run at rank 0 only
    "rtn": dict(method="rtn"), "gptq": dict(method="gptq"), "gptq+lorc": dict(method="gptq+lorc"),
    "gptq+olrc": dict(method="gptq+olrc"), "gilora": dict(method="gilora"),
    "gilora+1loop": dict(method="gilora", loops=1), "gilora+2loops": dict(method="gilora", loops=2),
    "gilora+3loops": dict(method="gilora", loops=3), "srr": dict(method="srr"),
}
RANK_FREE = ("rtn", "gptq")
SETTINGS = ("paper", "default")  # paper: gilora_jax.config.PAPER; default: the library's defaults
PROTOCOL = ("group_size", "nsamples", "seqlen", "eval_seqlen", "vit_nsamples", "seed")  # fixed per workdir
MARK = "<!-- paper_tables:{table} (experiments/paper_tables.py writes this section; edits here are replaced) -->"
END = "<!-- /paper_tables:{table} -->"


@dataclasses.dataclass(frozen=True)
class Args:
  """The papers' layer-wise and model-level tables (module docstring)."""
  table: str = "layers"                       # layers | models
  models: tuple[str, ...] = ("builtin-lm", "builtin-deit")
  methods: tuple[str, ...] = tuple(METHODS)
  settings: tuple[str, ...] = ("paper", "default")
  bits: tuple[str, ...] = ("2", "3", "4")
  ranks: tuple[str, ...] = ()                 # default: 0,8,16,32,64 (layers), 16,32,64 (models)
  sweep: str = "cross"                        # cross: every rank at --cross_bits, every bits at --cross_rank;
                                              #   full: every (bits, rank) pair (4× the rows of the layer table)
  cross_bits: int = 3
  cross_rank: int = 32
  group_size: int = 0                         # 0 = per output channel (the papers' protocol)
  nsamples: int = 32                          # LM calibration windows (layers: Hessians; models: the run's)
  seqlen: int = 256
  eval_seqlen: int = 256
  vit_nsamples: int = 128
  seed: int = 0
  workdir: pathlib.Path = pathlib.Path("runs/paper_tables")
  results_md: str = ""                        # e.g. RESULTS.md: the tables replace this table's section there


def _builtins():
  from gilora_jax.pipeline import run  # pylint: disable=import-outside-toplevel
  lm, vit = run.builtin_folders()
  return {"builtin-lm": lm, "builtin-deit": vit}


def parse_models(specs) -> list[tuple[str, str, tuple[int, ...] | None]]:
  """[(name, folder, blocks or None)] from `--models`; a clear exit for a folder that is not there."""
  builtin, out = _builtins(), []
  for spec in specs:
    path, _, blocks = spec.partition("@")
    folder = builtin.get(path, path)
    if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
      sys.exit(f"--models: {path!r} is not a model folder (no config.json)"
               f"{'; the built-in models are not shipped in this install' if path in builtin else ''}")
    name = path if path in builtin else os.path.basename(os.path.normpath(folder))
    out.append((name, folder, tuple(int(b) for b in blocks.split("+")) if blocks else None))
  return out


def settings_overrides(name: str) -> dict:
  from gilora_jax import config  # pylint: disable=import-outside-toplevel
  if name not in SETTINGS:
    sys.exit(f"--settings: unknown {name!r}; choose from {', '.join(SETTINGS)}")
  return dict(config.PAPER) if name == "paper" else {}


class Results:
  """workdir/results.jsonl as a resumable store: `done(key)` for a finished row, `add(row)` appends and flushes."""

  def __init__(self, workdir: pathlib.Path, keys: tuple[str, ...]):
    workdir.mkdir(parents=True, exist_ok=True)
    self.path, self.keys = workdir / "results.jsonl", keys
    self.rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines()
                 if line.strip()] if self.path.exists() else []
    self._done = {self.key(r) for r in self.rows}

  def key(self, row) -> tuple:
    return tuple(row.get(k) for k in self.keys)

  def done(self, **key) -> bool:
    return self.key(key) in self._done

  def add(self, **row) -> None:
    self.rows.append(row)
    self._done.add(self.key(row))
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def layer_inputs(folder: str, blocks, nsamples: int, seqlen: int, vit_nsamples: int, seed: int):
  """Yields (layer path, W (d_in, d_out) float32, site) for the linears of `blocks` (None: every block of a model
  of <= 8 blocks, else first, middle and last): the site (`hessian.prepare`) of H from the float model's inputs on
  its calibration set, one per input site, so its checks, factors and eigendecomposition are computed once for
  every linear reading it and every (method, bits, rank) row, not once per row."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import deit, llama  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline import run  # pylint: disable=import-outside-toplevel
  from gilora_jax.quant import hessian  # pylint: disable=import-outside-toplevel
  model = load_model(folder)
  n = len(model.layers)
  keep = set(blocks) if blocks else (set(range(n)) if n <= 8 else {0, n // 2, n - 1})
  if not keep <= set(range(n)):
    sys.exit(f"--models: blocks {sorted(keep - set(range(n)))} out of range; {folder} has {n} blocks")
  calib, _, _ = run.comparison_setup(folder, model, nsamples=nsamples, seqlen=seqlen, vit_nsamples=vit_nsamples,
                                     seed=seed, batch_size=max(nsamples, vit_nsamples))
  sites = (llama if run.is_lm(model) else deit).QUANT_SITES
  x = jnp.concatenate([model.embed(jnp.asarray(b.inputs)) for b in calib])
  for i, block in enumerate(model.layers):
    if i > max(keep):
      break
    x, taps = block(x)
    if i not in keep:
      continue
    for site, t in taps.items():
      t = t.reshape(-1, t.shape[-1]).astype(jnp.float32)
      H = hessian.prepare(jnp.matmul(t.T, t, precision="highest"))
      for name in sites[site]:
        linear = block
        for part in name.split("."):
          linear = getattr(linear, part)
        yield f"layers.{i}.{name}", np.asarray(linear.kernel[...], np.float32), H


def plan(a: Args) -> list[tuple[str, str, int, int]]:
  """The (settings, method, bits, rank) rows of one model (per layer for the layer table)."""
  default = ("0", "8", "16", "32", "64") if a.table == "layers" else ("16", "32", "64")
  ranks = [int(r) for r in (a.ranks or default) if int(r) > 0]
  if a.sweep not in ("cross", "full"):
    sys.exit(f"--sweep: {a.sweep!r}; choose cross or full")
  out = []
  for s in a.settings:
    for b in (int(b) for b in a.bits):
      for m in a.methods:
        if m in RANK_FREE:
          out.append((s, m, b, 0))
          continue
        for r in ranks:
          if a.sweep == "full" or b == a.cross_bits or r == a.cross_rank:
            out.append((s, m, b, r))
  return out


def run_layers(a: Args, store: Results) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from gilora_jax import quantize_layer, runtime  # pylint: disable=import-outside-toplevel
  # Every (shape, bits, rank, method) compiles its own programs; kept in memory they ran the process out of
  # memory maps (XLA: "LLVM compilation error: Cannot allocate memory" after ~5000 compilations, vm.max_map_count
  # 65530). The in-memory caches are dropped after each layer and the persistent cache makes the recompiles loads.
  runtime.enable_compilation_cache()
  for name, folder, blocks in parse_models(a.models):
    todo = plan(a)
    for path, W, H in layer_inputs(folder, blocks, a.nsamples, a.seqlen, a.vit_nsamples, a.seed):
      jax.clear_caches()
      for s, m, b, r in todo:
        if r > min(W.shape) or store.done(model=name, layer=path, settings=s, method=m, bits=b, rank=r):
          continue
        kw = {**settings_overrides(s), **METHODS[m]}
        t0 = time.perf_counter()
        rep = quantize_layer(W, H, bits=b, rank=r, group_size=a.group_size or None, seed=a.seed,
                             diagnostics="full" if kw["method"] == "gilora" else "errors", **kw).report
        store.add(model=name, layer=path, settings=s, method=m, bits=b, rank=r, d_in=W.shape[0], d_out=W.shape[1],
                  rel_err=rep.rel_err, upper_bound=rep.upper_bound, srr_k=rep.srr_k,
                  seconds=round(time.perf_counter() - t0, 3))


def run_models(a: Args, store: Results) -> None:
  from gilora_jax import load_model  # pylint: disable=import-outside-toplevel
  from gilora_jax.config import QuantConfig  # pylint: disable=import-outside-toplevel
  from gilora_jax.pipeline import apply, run  # pylint: disable=import-outside-toplevel
  for name, folder, _ in parse_models(a.models):
    todo = plan(a)
    if all(store.done(model=name, settings=s, method=m, bits=b, rank=r) for s, m, b, r in todo) and store.done(
        model=name, settings=None, method="float", bits=None, rank=None):
      continue
    model = load_model(folder)
    calib, score, metric = run.comparison_setup(folder, model, nsamples=a.nsamples, seqlen=a.seqlen,
                                                eval_seqlen=a.eval_seqlen, vit_nsamples=a.vit_nsamples, seed=a.seed)
    if not store.done(model=name, settings=None, method="float", bits=None, rank=None):
      store.add(model=name, settings=None, method="float", bits=None, rank=None, metric=metric, **score(model))
    for s, m, b, r in todo:
      if store.done(model=name, settings=s, method=m, bits=b, rank=r):
        continue
      config = QuantConfig(layer=apply.make_config(
          bits=b, rank=r, group_size=a.group_size or None, seed=a.seed, **settings_overrides(s),
          **METHODS[m]).layer)
      t0 = time.perf_counter()
      q = apply.quantize_model(model, calib, config)
      seconds = time.perf_counter() - t0
      errs = [x.rel_err for x in q.records if x.rel_err is not None]
      store.add(model=name, settings=s, method=m, bits=b, rank=r, metric=metric, **score(q.model),
                mean_rel_err=float(np.mean(errs)) if errs else None, seconds=round(seconds, 2))
      del q


# ------------------------------------------------------------------------------------------------- tables and plots

def _fmt(v, digits=3):
  """Three significant figures (the ratios span 1e-4 .. 1e2: the DeiT's clip search takes GPTQ's error 17× down)."""
  return "–" if v is None else f"{v:#.{digits}g}"


def layer_tables(rows: list[dict]) -> tuple[str, dict]:
  """Markdown tables (per model × settings × bits: methods × ranks, median over layers of rel_err / GPTQ's) and
  the plotted series {(model, settings, bits): {method: (ranks, medians)}}."""
  by = {}
  for r in rows:
    by.setdefault((r["model"], r["settings"], r["bits"]), {}).setdefault(r["layer"], {})[(r["method"], r["rank"])] = r
  lines, series = [], {}
  for (model, settings, bits), layers in sorted(by.items()):
    every = set().union(*(per.keys() for per in layers.values()))  # a layer still running has fewer: left out
    layers = {name: per for name, per in layers.items() if set(per) == every}
    ranks = sorted({k[1] for per in layers.values() for k in per})
    methods = [m for m in METHODS if any(k[0] == m for per in layers.values() for k in per)]
    cell, bound = {}, {}
    for m in methods:
      for rank in ranks:
        rel = [per[(m, rank)]["rel_err"] / per[("gptq", 0)]["rel_err"] for per in layers.values()
               if (m, rank) in per and ("gptq", 0) in per and per[("gptq", 0)]["rel_err"]]
        if rel:
          cell[(m, rank)] = (float(np.median(rel)), float(np.max(rel)), len(rel))
        ub = [per[(m, rank)]["upper_bound"] / per[("gptq", 0)]["rel_err"] for per in layers.values()
              if (m, rank) in per and per[(m, rank)].get("upper_bound") is not None and ("gptq", 0) in per]
        if ub:
          bound[rank] = float(np.median(ub))
    gptq_abs = [per[("gptq", 0)]["rel_err"] for per in layers.values() if ("gptq", 0) in per]
    lines += ["", f"**{model}, {bits}-bit, {settings} settings** ({len(layers)} layers; GPTQ's own median "
              f"rel_err {_fmt(float(np.median(gptq_abs)) if gptq_abs else None)}): error / GPTQ's, median "
              f"(worst)", "", "| method | " + " | ".join(f"r{k}" for k in ranks) + " |",
              "|---|" + "---|" * len(ranks)]
    for m in methods:
      cells = [f"{_fmt(cell[(m, k)][0])} ({_fmt(cell[(m, k)][1])})" if (m, k) in cell else "" for k in ranks]
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if bound:
      lines.append("| gilora's Cor. 3.9 bound | " + " | ".join(_fmt(bound.get(k)) for k in ranks) + " |")
    series[(model, settings, bits)] = {
        m: ([k for k in ranks if (m, k) in cell], [cell[(m, k)][0] for k in ranks if (m, k) in cell])
        for m in methods}
    if bound:
      series[(model, settings, bits)]["gilora bound"] = (sorted(bound), [bound[k] for k in sorted(bound)])
  return "\n".join(lines), series


def model_tables(rows: list[dict]) -> str:
  """Markdown tables per model × settings: methods × (bits, rank) of the metric, the float model on top."""
  lines = []
  for model in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == model]
    base = next((r for r in mine if r["method"] == "float"), None)
    metric = mine[0]["metric"]
    unit = "perplexity (lower is better)" if metric == "perplexity" else "top-1 % (higher is better)"
    show = (lambda v: f"{v:.2f}") if metric == "perplexity" else (lambda v: f"{100 * v:.1f}")
    for settings in dict.fromkeys(r["settings"] for r in mine if r["settings"] is not None):
      got = {(r["method"], r["bits"], r["rank"]): r for r in mine if r["settings"] == settings}
      cols = sorted({(b, k) for _, b, k in got if k})
      lines += ["", f"**{model}, {settings} settings**: {unit}; float {show(base[metric]) if base else '–'}", "",
                "| method | " + " | ".join(f"{b}-bit r{k}" for b, k in cols) + " |", "|---|" + "---|" * len(cols)]
      for m in (m for m in METHODS if any(k[0] == m for k in got)):
        cells = [show(got[(m, b, 0 if m in RANK_FREE else k)][metric]) if (m, b, 0 if m in RANK_FREE else k) in got
                 else "" for b, k in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_layers(series: dict, folder: pathlib.Path, rank: int = 32) -> list[pathlib.Path]:
  """One figure per model, two panels per settings: error / GPTQ's against rank (at each bit width that has more
  than one rank) and against bits (at `rank`; rtn at rank 0), gilora's Cor. 3.9 bound dashed. Saved in `folder`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}

  def style(m):
    if m == "gilora bound":
      return dict(ls="--", color="k", lw=1)
    return dict(marker="o", ms=3, color=colors[m])

  paths = []
  for model in dict.fromkeys(k[0] for k in series):
    settings = list(dict.fromkeys(k[1] for k in series if k[0] == model))
    panels = []
    for st in settings:
      keys = sorted(k for k in series if k[:2] == (model, st))
      panels += [("rank", st, k[2]) for k in keys if max(len(v[0]) for v in series[k].values()) > 1]
      panels.append(("bits", st, None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (kind, st, bits) in zip(axes[0], panels):
      if kind == "rank":
        for m, (ks, ys) in series[(model, st, bits)].items():
          if m in RANK_FREE:
            ax.axhline(ys[0], lw=0.8, ls=":", color=colors[m], label=m)
          elif ks:
            ax.plot(ks, ys, label=m, **style(m))
        ax.set_xlabel("rank")
        ax.set_title(f"{bits}-bit, {st} settings", fontsize=9)
      else:
        by_method = {}
        for key in sorted(k for k in series if k[:2] == (model, st)):
          for m, (ks, ys) in series[key].items():
            want = 0 if m in RANK_FREE else rank
            if want in ks:
              by_method.setdefault(m, []).append((key[2], ys[ks.index(want)]))
        for m, pts in by_method.items():
          ax.plot([b for b, _ in pts], [y for _, y in pts], label=m, **style(m))
        ax.set_xlabel("bits")
        ax.set_xticks(sorted({b for pts in by_method.values() for b, _ in pts}))
        ax.set_title(f"rank {rank}, {st} settings", fontsize=9)
      ax.set_yscale("log")
      ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("error / GPTQ's (median over layers)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"{model}: layer-wise error against rank and bits", fontsize=10)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"paper_layers_{model}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
  return paths


def section(table: str, models) -> str:
  """The RESULTS.md section a table of these models owns: one per (table kind, models), so a SmolLM2 model table
  and the built-ins' are spliced side by side instead of replacing each other."""
  return f"{table} {'+'.join(models)}"


def splice(md_path: str, table: str, body: str) -> None:
  """Replaces (or appends) this table's marked section of `md_path`, atomically; the rest stays as it is."""
  path = pathlib.Path(md_path)
  text = path.read_text(encoding="utf-8") if path.exists() else ""
  mark, end = MARK.format(table=table), END.format(table=table)
  section = f"{mark}\n{body.strip()}\n{end}"
  if mark in text and end in text:
    text = text[:text.index(mark)] + section + text[text.index(end) + len(end):]
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def main(a: Args) -> str:
  if a.table not in ("layers", "models"):
    sys.exit(f"--table: {a.table!r}; choose layers or models")
  unknown = sorted(set(a.methods) - set(METHODS))
  if unknown:
    sys.exit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
  for s in a.settings:
    settings_overrides(s)
  if "gptq" not in a.methods and a.table == "layers":
    sys.exit("--methods: the layer table needs gptq (every error is relative to it)")
  keys = ("model", "layer", "settings", "method", "bits", "rank") if a.table == "layers" else (
      "model", "settings", "method", "bits", "rank")
  store = Results(a.workdir, keys)
  args_file = a.workdir / f"args_{a.table}.json"
  if args_file.exists():  # a row's key does not hold the protocol: a workdir keeps one protocol
    before = json.loads(args_file.read_text(encoding="utf-8"))
    changed = [k for k in PROTOCOL if k in before and before[k] != getattr(a, k)]
    if changed:
      sys.exit(f"--workdir {a.workdir} holds rows measured with " + ", ".join(f"--{k} {before[k]}" for k in changed)
               + "; pass those, or another --workdir")
  _builtin.write_json(args_file, _builtin.args_dict(a))
  (run_layers if a.table == "layers" else run_models)(a, store)
  # the tables show this command's rows only (a workdir may hold rows of other bits, ranks or models)
  wanted, blocks = set(plan(a)), {n: b for n, _, b in parse_models(a.models)}
  rows = [r for r in store.rows if r["model"] in blocks and (
      r["method"] == "float" or (r["settings"], r["method"], r["bits"], r["rank"]) in wanted) and (
          "layer" not in r or blocks[r["model"]] is None or int(r["layer"].split(".")[1]) in blocks[r["model"]])]
  if a.table == "layers":
    body, series = layer_tables(rows)
    # with --results_md the figures go beside it (results/), so the file's links work in a checkout
    pngs = plot_layers(series, pathlib.Path(a.results_md).parent / "results" if a.results_md else a.workdir,
                       a.cross_rank)
  else:
    body, pngs = model_tables(rows), []
  (a.workdir / "tables.md").write_text(body + "\n", encoding="utf-8")
  print(body)
  if a.results_md:
    rel = [os.path.relpath(p, os.path.dirname(os.path.abspath(a.results_md))) for p in pngs]
    splice(a.results_md, section(a.table, [n for n, _, _ in parse_models(a.models)]),
           body + "".join(f"\n\n![{pathlib.Path(p).stem}]({p})" for p in rel))
  return body


if __name__ == "__main__":
  main(_builtin.parse_args(Args))
