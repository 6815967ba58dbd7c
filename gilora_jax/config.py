"""The one configuration of a quantization: frozen, nested dataclasses holding every default in one place.

  LayerConfig   what `quantize_layer` does to one linear: the method, its grid (`GridSpec`), rank, damping,
                seed, and the options of GPTQ (`GPTQOptions`), the refinement loops (`RefineOptions`) and SRR
                (`SRROptions`)
  QuantConfig   a whole model: the LayerConfig every linear gets, the propagation protocol, and per-module
                `Rule`s that change any field of it (`dataclasses.replace` on the nested config) or skip a linear

Flat names. Every leaf field has one flat name (`FIELDS`): the `quantize_layer` keyword, the `gilora` flag
(`--group-size` for `group_size`) and the key of a `--rule` are all the same word, so the three can never
disagree on a default or a spelling. `LayerConfig.replace(bits=4, loops=2)` and `from_flat(...)` speak it.

Validation raises `OptionError` (a ValueError) that carries the flat name, so the library says `rank=40 ...`
and the CLI says `--rank 40 ...` from the same check (`OptionError.render`).

Every config round-trips through JSON (`to_json` / `from_json`) and is stored in each checkpoint and records file.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
import re
import typing
from typing import Any, Callable

from gilora_jax.quant.grid import GridSpec, OptionError

METHODS = ("rtn", "gptq", "gptq+lorc", "gptq+olrc", "gilora", "srr")
PROTOCOLS = ("quantized", "fp")
# How one block's calibration activations (every sample's inputs) are stored between blocks: "float32" as the
# model computes them, or "bfloat16" (half the memory; each block still computes, and forms its Hessians, in
# float32 from the rounded inputs).
ACTIVATIONS = ("float32", "bfloat16")
FACTORS = ("cholesky", "eigh")
# gilora's intrinsic-pass λ: damp times the mean diagonal of the deflated Hessian it factors (GPTQ's rule applied
# to that matrix), or of the augmented Hessian (Paper A's choice); quant.intrinsic explains the difference.
INTRINSIC_DAMPS = ("deflated", "augmented")
BIDUP_ORDERS = ("forward", "backward", "both")
SRR_SCALINGS = ("identity", "diag", "exact")
SRR_QUANTIZERS = ("gptq", "rtn")
# What a layer's report holds, cheapest first (``LayerConfig.diagnostics``; ``layer.quantize_layer`` documents each):
# nothing; what the method computes anyway; + the final relative error; + every stage's error and the bounds.
DIAGNOSTICS = ("off", "auto", "errors", "full")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQOptions:
  """The GPTQ sweep (Frantar et al., Alg. 1) and its reference options."""
  act_order: bool = True       # visit input rows by decreasing H_ii (with groups: static groups fitted up front)
  static_groups: bool = False  # fit group grids on W up front instead of lazily during the sweep
  block_size: int = 128        # rows per lazy-batch block (never changes the result)
  factor: str = "cholesky"     # the triangular factor of H_λ: "cholesky", or "eigh" (Paper A's GPTQ*)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RefineOptions:
  """Paper A's refinement loops: `loops` × [OLrC(Q) → Bid-Up(W − LR)], then a final OLrC."""
  loops: int = 0
  order: str = "forward"    # Bid-Up's row order: "forward", "backward", "both"
  deflated: bool = False    # Bid-Up on the Schur complement of L (re-optimises R jointly)
  final_olrc: bool = True   # gilora and srr with loops = 0: one OLrC of their Q


@dataclasses.dataclass(frozen=True, kw_only=True)
class SRROptions:
  """Preserve-then-quantize (Paper B): scaling, preserved rank k, base quantizer."""
  scaling: str = "exact"    # "identity", "diag" (QERA-approx) or "exact" (H_λ^{1/2}, QERA-exact)
  k: int | None = None      # preserved rank; None = the paper's criterion
  quantizer: str = "gptq"   # the base quantizer of the residual: "gptq" or "rtn"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerConfig:
  """Every option of `quantize_layer` (hashable; its defaults are the library's defaults)."""
  method: str = "gilora"
  grid: GridSpec = GridSpec(bits=3, mse=True)  # the clip search on (GridSpec's own default, the min–max grid, is off)
  rank: int = 32
  damp: float = 0.01
  intrinsic_damp: str = "deflated"  # one of INTRINSIC_DAMPS; "augmented" is Paper A's (config.PAPER)
  seed: int = 0
  diagnostics: str = "auto"   # one of DIAGNOSTICS (True and False are read as "full" and "off")
  gptq: GPTQOptions = GPTQOptions()
  refine: RefineOptions = RefineOptions()
  srr: SRROptions = SRROptions()

  def __post_init__(self):
    if isinstance(self.diagnostics, bool):  # the boolean of earlier versions
      object.__setattr__(self, "diagnostics", "full" if self.diagnostics else "off")

  @property
  def effective_rank(self) -> int:
    """The rank the method uses: 0 for rtn and gptq, which have no low-rank term."""
    return 0 if self.method in ("rtn", "gptq") else self.rank

  def replace(self, **flat: Any) -> LayerConfig:
    """A copy with fields changed by flat name (`replace(bits=4, loops=2, srr_k=0)`)."""
    return from_flat(self, **flat)

  def flat(self) -> dict[str, Any]:
    """{flat name: value} of every leaf field."""
    return {name: _get(self, path) for name, (path, _) in FIELDS.items()}

  def validate(self) -> None:
    """Raises `OptionError` naming the field and the fix for any option that no layer could use."""
    _validate_options(self)

  def validate_shape(self, d_in: int, d_out: int, where: str = "") -> None:
    """Raises `OptionError` when the options do not fit a (d_in, d_out) layer (rank, group size, SRR's k)."""
    at = f" of {where}" if where else ""
    self.grid.validate(d_in, where)
    if self.effective_rank > min(d_in, d_out):
      raise OptionError("rank", self.rank, f"exceeds min(d_in, d_out)={min(d_in, d_out)} for a {d_in}×{d_out} "
                        f"layer{at}; use {{name}} ≤ {min(d_in, d_out)}.")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> LayerConfig:
    d = dict(d)
    for name, sub in (("grid", GridSpec), ("gptq", GPTQOptions), ("refine", RefineOptions), ("srr", SRROptions)):
      if name in d:
        d[name] = sub(**d[name])
    return cls(**d)


@dataclasses.dataclass(frozen=True, init=False)
class Rule:
  """Per-module override: linears whose dotted path fully matches `pattern` get the given fields of the run's
  LayerConfig changed (flat names: `Rule(r"layers[.]0[.].*", bits=4, rank=0)`), or stay in full precision
  (`Rule(r".*down_proj", skip=True)`). Paths are dotted from the model root (`layers.3.mlp.down_proj`); the first
  matching rule wins (qwix style)."""
  pattern: str
  set: tuple[tuple[str, Any], ...]
  skip: bool

  def __init__(self, pattern: str, *, skip: bool = False, **flat: Any):
    unknown = sorted(set(flat) - set(FIELDS))
    if unknown:
      raise TypeError(f"Rule({pattern!r}): unknown option(s) {unknown}; valid: {sorted(FIELDS)}")
    if skip and flat:
      raise TypeError(f"Rule({pattern!r}): skip=True leaves the linear in full precision; it takes no options.")
    object.__setattr__(self, "pattern", pattern)
    object.__setattr__(self, "set", tuple(sorted(flat.items())))
    object.__setattr__(self, "skip", bool(skip))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """A whole model's quantization: the layer config, the propagation protocol, and per-module rules.

  protocol="quantized": block i + 1 is calibrated on the quantized block i's outputs (GPTQ's protocol);
  protocol="fp": on the float model's (the paper's, following Qronos).
  activations: the dtype the calibration activations are kept in between blocks (`ACTIVATIONS`).
  """
  layer: LayerConfig = LayerConfig()
  protocol: str = "quantized"
  rules: tuple[Rule, ...] = ()
  activations: str = "float32"

  def validate(self) -> None:
    self.layer.validate()
    if self.protocol not in PROTOCOLS:
      raise OptionError("protocol", self.protocol, f"is unknown; choose one of {PROTOCOLS}.")
    if self.activations not in ACTIVATIONS:
      raise OptionError("activations", self.activations, f"is unknown; choose one of {ACTIVATIONS}.")
    for rule in self.rules:
      try:
        re.compile(rule.pattern)
      except re.error as e:
        raise OptionError("rule", rule.pattern, f"is not a valid regular expression ({e}).") from None
      try:
        self.layer.replace(**dict(rule.set)).validate()
      except OptionError as e:
        raise OptionError(e.name, e.value, f"{e.problem} (in the rule for {rule.pattern!r})") from None
      except TypeError as e:
        raise OptionError("rule", rule.pattern, f"sets {e}") from None

  def for_module(self, path: str) -> LayerConfig | None:
    """The LayerConfig of the linear at `path`, or None when a rule skips it."""
    for rule in self.rules:
      if re.fullmatch(rule.pattern, path):
        return None if rule.skip else self.layer.replace(**dict(rule.set))
    return self.layer

  def to_json(self) -> dict[str, Any]:
    out = {"layer": self.layer.to_json(), "protocol": self.protocol,
           "rules": [{"pattern": r.pattern, "set": dict(r.set), "skip": r.skip} for r in self.rules]}
    if self.activations != "float32":  # left out at its default: configs (and runs) from before it read the same
      out["activations"] = self.activations
    return out

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> QuantConfig:
    return cls(layer=LayerConfig.from_json(d.get("layer", {})), protocol=d.get("protocol", "quantized"),
               activations=d.get("activations", "float32"),
               rules=tuple(Rule(r["pattern"], skip=r.get("skip", False), **r.get("set", {}))
                           for r in d.get("rules", ())))


# ------------------------------------------------------------------------------------------------ presets

# Flat option sets applied as a whole (`quantize_layer(W, H, **FAST)`, `LayerConfig().replace(**FAST)`,
# `gilora quantize --fast`); options given beside a preset win. The defaults take the clip search and act-order,
# which halve gilora's error on real layers (BENCHMARKS.md, "Layer settings"); FAST turns both off, as the
# defaults were before, for about 70 % of the cost on SmolLM2-size layers (less saved on wider ones).
FAST: dict[str, Any] = {"mse": False, "act_order": False}
# The papers' settings exactly: FAST, and gilora's intrinsic pass damped as Paper A damps it (the augmented
# Hessian's mean diagonal). The deflated λ the defaults take costs nothing, so FAST keeps it; the paper-settings
# rows of experiments/paper_tables.py and the papers' ordering test of the built-in LM use this preset.
PAPER: dict[str, Any] = {**FAST, "intrinsic_damp": "augmented"}


# ------------------------------------------------------------------------------------------------ flat names

# flat name -> (dotted path in LayerConfig, help). The order is the order of `gilora --help`.
FIELDS: dict[str, tuple[str, str]] = {
    "method": ("method", f"one of {', '.join(METHODS)}"),
    "bits": ("grid.bits", "bit width of the grid, 2..8"),
    "rank": ("rank", "rank r of the low-rank term (rtn and gptq have none)"),
    "group_size": ("grid.group_size", "input rows per grid; unset: one grid per output channel"),
    "symmetric": ("grid.symmetric", "symmetric grids (zero point in the middle)"),
    "shrink": ("grid.shrink", "shrink factor β of the min–max grid step, in (0, 1]; with --no-mse only"),
    "mse": ("grid.mse", "search each column's clip ratio for the smallest |q − w|^2.4 (overrides shrink)"),
    "loops": ("refine.loops", "Bid-Up/OLrC refinement loops after the method"),
    "damp": ("damp", "relative damping λ = damp · mean diag H (gilora's intrinsic pass: of the Hessian it factors)"),
    "intrinsic_damp": ("intrinsic_damp", f"which mean diagonal gilora's intrinsic-pass λ scales: "
                       f"{' or '.join(INTRINSIC_DAMPS)} Hessian (augmented: Paper A's)"),
    "act_order": ("gptq.act_order", "visit input rows by decreasing H_ii"),
    "static_groups": ("gptq.static_groups", "fit group grids on W up front (llm-compressor's protocol)"),
    "block_size": ("gptq.block_size", "rows per lazy-batch block of the sweep (never changes the result)"),
    "factor": ("gptq.factor", f"the factor of H_λ: {' or '.join(FACTORS)} (Paper A's GPTQ*)"),
    "bidup_order": ("refine.order", f"Bid-Up's row order: {', '.join(BIDUP_ORDERS)}"),
    "bidup_deflated": ("refine.deflated", "Bid-Up on the Schur complement of L, re-optimising R jointly"),
    "final_olrc": ("refine.final_olrc", "gilora/srr with no loops: one OLrC of the final Q"),
    "srr_scaling": ("srr.scaling", f"SRR's scaling: {', '.join(SRR_SCALINGS)}"),
    "srr_k": ("srr.k", "SRR's preserved rank; unset: the paper's criterion"),
    "srr_quantizer": ("srr.quantizer", f"SRR's base quantizer: {' or '.join(SRR_QUANTIZERS)}"),
    "seed": ("seed", "PRNG seed (calibration sampling)"),
    "diagnostics": ("diagnostics", f"what each layer's report holds: {', '.join(DIAGNOSTICS)} (auto: what the "
                    f"method computes anyway, and in a whole-model run or quantize-layer the final error; errors: "
                    f"the final error; full: every stage's error and gilora's bounds)"),
}
_CHOICES = {"method": METHODS, "factor": FACTORS, "intrinsic_damp": INTRINSIC_DAMPS, "bidup_order": BIDUP_ORDERS,
            "srr_scaling": SRR_SCALINGS, "srr_quantizer": SRR_QUANTIZERS, "diagnostics": DIAGNOSTICS}


def _get(cfg: Any, path: str) -> Any:
  for part in path.split("."):
    cfg = getattr(cfg, part)
  return cfg


def _set(cfg: Any, path: str, value: Any) -> Any:
  head, _, rest = path.partition(".")
  return dataclasses.replace(cfg, **{head: _set(getattr(cfg, head), rest, value) if rest else value})


@functools.cache
def field_type(name: str) -> Any:
  """The annotated type of a flat field (`int`, `int | None`, `bool`, `float`, `str`)."""
  path = FIELDS[name][0]
  owner: Any = LayerConfig
  *parents, leaf = path.split(".")
  for part in parents:
    owner = typing.get_type_hints(owner)[part]
  return typing.get_type_hints(owner)[leaf]


def default(name: str) -> Any:
  """The library default of a flat field."""
  return _get(LayerConfig(), FIELDS[name][0])


def from_flat(base: LayerConfig | None = None, **flat: Any) -> LayerConfig:
  """`base` (default: the defaults) with fields changed by flat name; integers given as NumPy integers are
  converted, floats or bools given for an integer are refused (`OptionError`), unknown names are a TypeError."""
  cfg = LayerConfig() if base is None else base
  unknown = sorted(set(flat) - set(FIELDS))
  if unknown:
    raise TypeError(f"unknown option(s) {unknown}; valid options: {sorted(FIELDS)}")
  for name, value in flat.items():
    cfg = _set(cfg, FIELDS[name][0], _coerce(name, value))
  return cfg


def _coerce(name: str, value: Any) -> Any:
  """Integers as Python ints (np.int64 too); a float or bool where an integer belongs is an error, not a
  truncation (rank=3.7 would silently become 3)."""
  kind = field_type(name)
  if name == "diagnostics" and (isinstance(value, bool) or type(value).__name__ == "bool_"):
    return "full" if value else "off"  # the boolean of earlier versions: on was every stage's error and the bounds
  if kind in (int, int | None, typing.Optional[int]):
    if value is None:
      if kind is int:
        raise OptionError(name, value, "must be an integer.")
      return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
      raise OptionError(name, value, "must be an integer, not a bool.")
    try:
      return operator.index(value)
    except TypeError:
      raise OptionError(name, value, f"must be an integer (got {type(value).__name__}).") from None
  if kind is float:
    if isinstance(value, bool):
      raise OptionError(name, value, "must be a positive number.")
    try:
      return float(value)
    except (TypeError, ValueError):
      raise OptionError(name, value, "must be a positive number.") from None
  return value


def _validate_options(cfg: LayerConfig) -> None:
  for name, choices in _CHOICES.items():
    value = _get(cfg, FIELDS[name][0])
    if value not in choices:
      raise OptionError(name, value, f"is unknown; choose one of {choices}.")
  cfg.grid.validate(None)
  if cfg.grid.mse and cfg.grid.shrink != 1.0:  # the clip search replaces the fixed shrink: say so, never ignore it
    raise OptionError("shrink", cfg.grid.shrink, "has no effect while mse is on (the default: each column's clip "
                      "ratio is searched); turn mse off with it for a fixed shrink, or leave {name} at 1.")
  if not isinstance(cfg.rank, int) or cfg.rank < 0:
    raise OptionError("rank", cfg.rank, "must be a non-negative integer.")
  if not isinstance(cfg.refine.loops, int) or cfg.refine.loops < 0:
    raise OptionError("loops", cfg.refine.loops, "must be a non-negative integer.")
  if not isinstance(cfg.gptq.block_size, int) or cfg.gptq.block_size < 1:
    raise OptionError("block_size", cfg.gptq.block_size, "must be a positive integer (rows per lazy-batch block; "
                      "128 is the reference's).")
  if not (isinstance(cfg.damp, float) and cfg.damp > 0 and math.isfinite(cfg.damp)):
    raise OptionError("damp", cfg.damp, "must be positive and finite (the reference uses 0.01 of the mean "
                      "diagonal).")
  if not isinstance(cfg.seed, int) or cfg.seed < 0:
    raise OptionError("seed", cfg.seed, "must be a non-negative integer (NumPy's and JAX's generators take those).")
  k = cfg.srr.k
  if k is not None and not 0 <= k <= cfg.rank:
    raise OptionError("srr_k", k, f"must lie in 0..rank={cfg.rank} (or be unset for the paper's criterion).")


def flag(name: str) -> str:
  """The CLI flag of a flat name: `--group-size` for `group_size`."""
  return "--" + name.replace("_", "-")


def describe(render: Callable[[str], str] = flag) -> list[tuple[str, str, Any]]:
  """(flag, help, default) for every flat field, in `FIELDS` order (what `gilora --help` lists)."""
  return [(render(name), help_, default(name)) for name, (_, help_) in FIELDS.items()]
