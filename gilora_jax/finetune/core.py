"""QPEFT math: fine-tune the low-rank factors of `Q + L R` with optax, Q frozen (Paper B §QPEFT; QLoRA; LoftQ).

Pure functions on arrays and NNX states; the loop, data, checkpoints and files are in `finetune.train`.

What trains. Only the `L` and `R` `nnx.Param`s of the chosen `QuantizedLinear`s (`trainable_filter`); codes,
scales and zeros are not Params at all (`nn.QuantCodes`, `nn.QuantScale`), and every other Param (embeddings,
norms, biases, the head) stays frozen, as in QLoRA. The model is split once into `(graphdef, params, rest)`
and only `params` reaches the optimizer.

The optimizer (`optimizer`): optax `clip_by_global_norm → adamw(warm-up + cosine schedule)`, wrapped in
`optax.MultiSteps` for gradient accumulation (one optimizer step per `accum` micro-batches; the step count, the
schedule and the curves count optimizer steps). Its numbers are traced arguments of the jitted step
(`hyperparams`), so a sweep over learning rates or step counts compiles the step once per model and batch shape.

Initialisations for a fixed Q (`zero_init`, `loftq_init`; OLrC, gilora and SRR are the quantizer's own):

  zero    L ~ N(0, 1/r²), R = 0                   QLoRA / PEFT `init_lora_weights="gaussian"` (lora_A = Lᵀ)
  loftq   L R = SVD_r(W − Q), data-free           LoftQ (Li et al., arXiv:2310.08659), Alg. 1 with T = 1;
          T > 1 continues LoftQ's alternation Q_t = RTN(W − L_{t−1}R_{t−1}), L_tR_t = SVD_r(W − Q_t) on the
          checkpoint's grid: Q is then LoftQ's own, no longer the shared base (with Q fixed, iterating the SVD
          alone is a fixed point after one step, so T > 1 only means something when Q moves).

Every init but zero hands its factors over balanced (`balance`: the same L R, each rank-1 term split evenly),
so that AdamW's per-entry steps are of one size relative to both factors.

SRR's γ (`preserved_multipliers`). SRR's L = [L₁ L₂], R = [R₁; R₂] with the first k components preserved from
W and the other r − k reconstructing the error. Paper B scales the preserved block's gradient by γ. Under Adam a
constant factor on a parameter's gradient cancels in m / √v (the update is invariant to it up to ε), so scaling
gradients would do nothing; what γ means under AdamW is the preserved block's *update* scaled by γ (its
effective learning rate, weight decay included). That is what is applied here, after the whole optax chain; for
plain SGD the two are the same. γ = 0 freezes the block exactly (bit for bit), γ = 1 is plain LoRA training.
(`scale_gradient` is the gradient-side identity, for users with a non-adaptive optimizer.)

Losses: `lm_loss` is the evaluation's NLL (`pipeline.evaluate`: every window scored from an empty context, the
first token of a window unpredicted), `ce_loss` the classifier's cross-entropy.
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gilora_jax.nn import QuantizedLinear
from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant import lowrank
from gilora_jax.quant.grid import GridSpec

INITS = ("zero", "loftq", "olrc", "gilora", "srr")
OBJECTIVES = ("lm", "classifier")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """The optimizer and its schedule (hashable: static under `jit`, so runs of one config share one compile)."""
  steps: int = 200               # optimizer steps
  lr: float = 1e-3               # peak learning rate
  warmup: int = 20               # linear warm-up steps from 0 to `lr`
  final_lr: float = 0.1          # cosine decay to `final_lr · lr` at `steps`
  weight_decay: float = 0.0      # AdamW's decoupled weight decay (on L and R only)
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip: float = 1.0              # global-norm clipping of each optimizer step's (accumulated) gradient; 0: none
  accum: int = 1                 # micro-batches per optimizer step
  compute_dtype: str = "float32"  # "bfloat16": the forward in bf16; L, R and the optimizer state stay float32

  def validate(self) -> None:
    for name in ("steps", "accum"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
    if not self.lr > 0:
      raise ValueError(f"lr={self.lr} must be positive.")
    if not 0 <= self.warmup < self.steps:
      raise ValueError(f"warmup={self.warmup} must lie in 0..steps−1={self.steps - 1}.")
    if not 0 <= self.final_lr <= 1:
      raise ValueError(f"final_lr={self.final_lr} must lie in [0, 1] (a fraction of lr).")
    if self.weight_decay < 0 or self.clip < 0:
      raise ValueError("weight_decay and clip must be ≥ 0.")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype={self.compute_dtype!r} must be one of {COMPUTE_DTYPES}.")


HYPER = ("lr", "warmup", "steps", "final_lr", "weight_decay", "b1", "b2", "eps", "clip")


def hyperparams(cfg: TrainConfig) -> dict[str, np.ndarray]:
  """The optimizer's numbers as float32 arrays: traced, not static, so runs that differ only in them (learning
  rates, step counts) share one compiled step. `clip = 0` (off) becomes +inf."""
  h = {k: float(getattr(cfg, k)) for k in HYPER}
  h["clip"] = h["clip"] if h["clip"] > 0 else float("inf")
  return {k: np.float32(v) for k, v in h.items()}


def learning_rate(count: jax.typing.ArrayLike, h: dict[str, Any]) -> jax.Array:
  """Linear warm-up from 0 to `lr` over `warmup` steps, then cosine to `final_lr · lr` at `steps`
  (`optax.warmup_cosine_decay_schedule`'s formula, with traced hyperparameters); `count` = steps taken."""
  count = jnp.asarray(count, jnp.float32)
  warm = h["lr"] * count / jnp.maximum(h["warmup"], 1.0)
  t = jnp.clip((count - h["warmup"]) / jnp.maximum(h["steps"] - h["warmup"], 1.0), 0.0, 1.0)
  end = h["final_lr"] * h["lr"]
  cos = end + (h["lr"] - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
  return jnp.where(count < h["warmup"], warm, cos)


def schedule(cfg: TrainConfig) -> Callable[[int], float]:
  """The learning rate of optimizer step `count` (0-based) under `cfg`."""
  h = hyperparams(cfg)
  return lambda count: float(learning_rate(count, h))


def optimizer(h: dict[str, Any], accum: int = 1) -> optax.GradientTransformation:
  """`MultiSteps(chain(clip_by_global_norm, adamw(learning_rate)), accum)`: one call per micro-batch. `h`:
  `hyperparams` (arrays or tracers)."""
  inner = optax.chain(optax.clip_by_global_norm(h["clip"]),
                      optax.adamw(lambda count: learning_rate(count, h), b1=h["b1"], b2=h["b2"], eps=h["eps"],
                                  weight_decay=h["weight_decay"]))
  return optax.MultiSteps(inner, every_k_schedule=accum)


# ------------------------------------------------------------------------------------------------ what trains


def factor_paths(model: nnx.Module, pattern: str | None = None) -> list[str]:
  """Dotted paths of the `QuantizedLinear`s with low-rank factors whose path matches `pattern` (regex, search)."""
  out = []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, QuantizedLinear) and module.rank > 0:
      p = ".".join(str(k) for k in path)
      if pattern is None or re.search(pattern, p):
        out.append(p)
  return out


def trainable_filter(paths: list[str]) -> Callable[[tuple, Any], bool]:
  """An NNX filter: the `L` and `R` Params of the `QuantizedLinear`s at `paths`, nothing else."""
  chosen = frozenset(paths)

  def is_trainable(path: tuple, value: Any) -> bool:
    return (isinstance(value, nnx.Param) and len(path) > 1 and str(path[-1]) in ("L", "R")
            and ".".join(str(k) for k in path[:-1]) in chosen)
  return is_trainable


def split(model: nnx.Module, paths: list[str]) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """`(graphdef, params, rest)`: the trainable factors and everything else (frozen)."""
  return nnx.split(model, trainable_filter(paths), ...)


def with_compute_dtype(model: nnx.Module, dtype: str) -> nnx.Module:
  """`model` computing in `dtype`: every module's `dtype` attribute (nnx.Linear/Embed, `QuantizedLinear`, DeiT's
  embeddings) set, in place. Parameters keep their stored dtypes (L, R float32) and are cast in the forward."""
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "dtype") and not isinstance(getattr(type(module), "dtype", None), property):
      try:
        module.dtype = dtype if isinstance(module, QuantizedLinear) else jnp.dtype(dtype)
      except AttributeError:
        pass
  return model


# ------------------------------------------------------------------------------------------------ γ


def scale_gradient(x: jax.Array, gamma: float | jax.Array) -> jax.Array:
  """Identity in the forward pass, `γ ·` in the backward: `γ x + (1 − γ) stop_gradient(x)`.

  (Not `x + (γ − 1) stop_gradient(x)`, whose value is γ x.) For non-adaptive optimizers; see the module docstring
  for why AdamW takes `preserved_multipliers` instead.

  >>> float(jax.grad(lambda x: scale_gradient(x, 0.1) ** 2)(3.0))  # d(x²)/dx = 6, scaled by 0.1
  0.6000000238418579
  """
  return gamma * x + (1.0 - gamma) * jax.lax.stop_gradient(x)


def preserved_multipliers(params: nnx.State, ks: dict[str, int], gamma: float) -> Any:
  """A tree like `params` of update multipliers: γ on the first `ks[path]` columns of L and rows of R of each
  layer in `ks` (SRR's preserved block), 1 elsewhere. Shapes broadcast: (1, r) for L, (r, 1) for R."""
  def mult(path, x):
    keys = _keys(path)
    layer, name = ".".join(keys[:-1]), keys[-1]
    r = x.shape[1] if name == "L" else x.shape[0]
    m = np.ones((r,), np.float32)
    m[:ks.get(layer, 0)] = gamma
    return jnp.asarray(m.reshape((1, r) if name == "L" else (r, 1)))
  return jax.tree_util.tree_map_with_path(mult, params)


# ------------------------------------------------------------------------------------------------ initialisations


def zero_init(key: jax.Array, d_in: int, d_out: int, rank: int) -> lowrank.LowRank:
  """QLoRA's start: `L ~ N(0, 1/r²)` (PEFT's gaussian lora_A, transposed), `R = 0`, so `Q + L R = Q`."""
  return lowrank.LowRank(jax.random.normal(key, (d_in, rank), jnp.float32) / rank, jnp.zeros((rank, d_out),
                                                                                               jnp.float32))


@functools.partial(jax.jit, static_argnames=("rank", "spec", "iters"))
def loftq_init(W: jax.Array, Q: jax.Array, rank: int, spec: GridSpec, iters: int = 1):
  """LoftQ from the base `Q`: `L R = SVD_r(W − Q)`, then `iters − 1` alternations `Q ← RTN(W − L R)`,
  `L R ← SVD_r(W − Q)` on the grid `spec` (module docstring). Returns `(codes, scales, zeros, Q, L, R)`; with
  `iters = 1` Q is the base's and the codes/scales/zeros returned are unused placeholders (the caller keeps the
  base's)."""
  lr = lowrank.lorc(W - Q, rank)
  codes, grid = grid_lib.rtn(W, spec)  # placeholders of the right shapes for iters = 1
  for _ in range(iters - 1):
    codes, grid = grid_lib.rtn(W - lowrank_product(lr), spec)
    Q = grid_lib.dequantize(codes, grid, spec)
    lr = lowrank.lorc(W - Q, rank)
  return codes, grid.scales, grid.zeros, Q, lr.L, lr.R


@jax.jit
def balance(L: jax.Array, R: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`L D, D⁻¹ R` with `D_kk = sqrt(‖R_k‖ / ‖L_k‖)`: the same `L R`, each rank-1 term's magnitude split evenly
  between its factors (as LoftQ's and PiSSA's `U √Σ`, `√Σ Vᵀ`). The quantizers return `L = U Σ`, `R = Vᵀ`
  (or OLrC's `E V`, `Vᵀ`): R's entries ~1/√d_out, L's as large as the residual's singular values, so AdamW's
  per-entry steps of ~lr are huge relative to R and tiny relative to L; balanced, both move alike. A zero column
  or row (the zero init's R) keeps D_kk = 1. (`export.formats.balanced` is the NumPy twin, for the 16-bit cast.)"""
  nl, nr = jnp.linalg.norm(L, axis=0), jnp.linalg.norm(R, axis=1)
  ok = (nl > 0) & (nr > 0)
  d = jnp.where(ok, jnp.sqrt(jnp.where(ok, nr, 1.0) / jnp.where(ok, nl, 1.0)), 1.0)
  return L * d[None, :], R / d[:, None]


def lowrank_product(lr: lowrank.LowRank) -> jax.Array:
  return jnp.matmul(lr.L, lr.R, precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------------ losses


def lm_loss(model: nnx.Module, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean NLL of tokens 1..T−1 of each window (B, T) int32, float32; and the token count."""
  logits = model(ids[:, :-1]).astype(jnp.float32)  # (B, T−1, V)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.mean(nll), jnp.asarray(nll.size, jnp.float32)


def ce_loss(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy of a classifier on (pixels (B, C, H, W), labels (B,)); and the number correct."""
  pixels, labels = batch
  logits = model(pixels).astype(jnp.float32)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return loss, jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32)


LOSSES = {"lm": lambda m, b: lm_loss(m, b), "classifier": ce_loss}


# ------------------------------------------------------------------------------------------------ steps


def _keys(path) -> list[str]:
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


@functools.partial(jax.jit, static_argnames=("graphdef", "accum", "objective"), donate_argnums=(1, 3))
def train_step(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, opt_state: Any, mult: Any, batch: Any,
               hyper: dict[str, Any], *, accum: int, objective: str):
  """One micro-batch: `(params, opt_state, loss)`; `mult` (`preserved_multipliers`) scales the optax updates,
  `hyper` are the optimizer's numbers (`hyperparams`)."""
  def loss_of(p):
    return LOSSES[objective](nnx.merge(graphdef, p, rest), batch)[0]

  loss, grads = jax.value_and_grad(loss_of)(params)
  updates, opt_state = optimizer(hyper, accum).update(grads, opt_state, params)
  updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mult)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef", "objective"))
def eval_step(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Any, *, objective: str):
  """`(summed loss, count or correct)` of one held-apart batch (the loss summed over its rows)."""
  model = nnx.merge(graphdef, params, rest)
  loss, aux = LOSSES[objective](model, batch)
  rows = jax.tree.leaves(batch)[0].shape[0]
  return loss * rows, aux
