"""Paper A's refinement loops: alternate the two exact block steps, OLrC(Q) and Bid-Up(LR), then a final OLrC.

For the damped objective ``f(Q, L, R) = tr((W − Q − LR)ᵀ H_λ (W − Q − LR))`` with Q on a fixed grid:

  repeat ``loops`` times:
    L, R ← OLrC(W − Q)                 (``lowrank.olrc``: the exact minimiser over rank-r L R for this Q)
    Q    ← Bid-Up(W − L R)             (``bidup.bidup``: every row of Q moved to its best grid point, R fixed;
                                        or, ``deflated``, over (Q, R) jointly on the Schur complement of L)
  L, R ← OLrC(W − Q)

Each step minimises f exactly over its block of variables, so the objective never increases in exact arithmetic.
In floating point a step can still rise (float32 near rank = d_in, where the deflated Hessian is nearly
singular), so every step is evaluated and kept only if it does not raise the objective (accept/reject): the
recorded objective (one value after every step, ``RefineResult.objective``) never increases, in any arithmetic.
``loops = 0`` is the single OLrC that Paper A applies after GPTQ-intrinsic LoRA.

References:
  Zhang & Saab, "GPTQ-intrinsic LoRA", arXiv:2606.01412, Alg. 2 (OLrC), Alg. 4 (Bid-Up), §5 (refinement loops).
"""
# Math-style names follow the papers.  pylint: disable=invalid-name
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gilora_jax.quant import bidup as bidup_lib
from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant import hessian, lowrank
from gilora_jax.quant.grid import Grid, GridSpec
from gilora_jax.quant.linalg import mm as _mm


class RefineResult(NamedTuple):
  codes: jax.Array         # (d_in, d_out) uint8, on the grid given
  Q: jax.Array             # (d_in, d_out) dequantized codes
  lr: lowrank.LowRank      # (d_in, r), (r, d_out)
  objective: jax.Array     # (2 · loops + 1,) the damped objective after every step; (loops + 1,) after every
                           # OLrC only, with ``trace=False``


@functools.partial(jax.jit, static_argnames=("spec", "rank", "loops", "order", "deflated", "block_size", "trace"))
def refine(W: jax.Array, codes: jax.Array, grid: Grid, H: jax.Array, spec: GridSpec, rank: int, *, loops: int,
           damp: float | jax.Array = 0.01, order: str = "forward", deflated: bool = False, block_size: int = 128,
           Tt: jax.Array | None = None, trace: bool = True,
           start: tuple[lowrank.LowRank, jax.Array] | None = None) -> RefineResult:
  """``loops`` × [OLrC → Bid-Up] then OLrC, from Q = the codes on ``grid`` (the grid is never re-fitted).

  Args:
    W: (d_in, d_out) target weights (dead rows zeroed, as the sweep saw them).
    codes: (d_in, d_out) the starting codes; grid: their grid; spec: its description.
    H: (d_in, d_in) undamped Hessian (dead features fixed); the objective damps it with ``damp``.
    rank: r of L R.
    loops: refinement loops (static; Paper A uses 1–2).
    damp: relative damping, ``λ = damp · mean diag H``.
    order, deflated, block_size: Bid-Up's options (``bidup.bidup``, ``bidup.deflated_hessian``).
    Tt: the transposed factor of ``H + λI`` (``hessian.Factor.Tt``, natural order) when the caller has it:
      OLrC's input side then reuses it instead of factoring again.
    trace: record the objective after every step; False records it after every OLrC only (the codes and
      factors are the same: every step's objective is evaluated anyway, one d_in² d_out product each, for the
      accept/reject guard that keeps the recorded objective from ever rising in floating point).
    start: ``(lr, optimum)``, the OLrC of the starting Q at this damping and its objective, when the caller
      has it (``gptq+olrc``'s method output): the first OLrC is then not computed again.

  Returns:
    ``RefineResult(codes, Q, lr, objective)``.
  """
  values = []
  Hd = hessian.damped(H, damp)
  T = None if Tt is None else Tt.T

  def objective(Q, lr):
    return lowrank.objective(W - Q - _mm(lr.L, lr.R), Hd)

  def guarded(new, old):
    """Keep a step only if its evaluated objective is no higher than the last one: each step is an exact block
    minimum in exact arithmetic only, and in float32 near rank = d_in (a nearly singular deflated Hessian, a
    ridge solve, the OLrC tail as a difference of traces) one can rise. The rejected step leaves the state."""
    ok = new[-1] <= old[-1]
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

  Q = grid_lib.dequantize(codes, grid, spec)
  lr, optimum = lowrank.olrc(W - Q, Hd, rank, T=T) if start is None else start
  # the first OLrC has nothing to be compared with; with no loop nothing is compared at all, so gilora's default
  # single OLrC records the optimum OLrC returns anyway instead of a d_in² d_out product (unless trace asks)
  state = (codes, Q, lr, objective(Q, lr) if loops or trace else optimum)
  values.append(state[-1])
  for i in range(loops):  # loops is small and static; each iteration is two exact block steps
    codes, Q, lr, _ = state
    if i:
      lr, _ = lowrank.olrc(W - Q, Hd, rank, T=T)
      state = guarded((codes, Q, lr, objective(Q, lr)), state)
      values.append(state[-1])
      codes, Q, lr, _ = state
    if deflated:
      HS, P = bidup_lib.deflated_hessian(Hd, lr.L)
      codes = bidup_lib.bidup(W, codes, grid, HS, spec, order=order, block_size=block_size)
      Q = grid_lib.dequantize(codes, grid, spec)
      lr = lowrank.LowRank(lr.L, _mm(P, W - Q))
    else:
      codes = bidup_lib.bidup(W - _mm(lr.L, lr.R), codes, grid, Hd, spec, order=order, block_size=block_size)
      Q = grid_lib.dequantize(codes, grid, spec)
    state = guarded((codes, Q, lr, objective(Q, lr)), state)
    if trace:
      values.append(state[-1])
  if loops:
    codes, Q, lr, _ = state
    lr, _ = lowrank.olrc(W - Q, Hd, rank, T=T)
    state = guarded((codes, Q, lr, objective(Q, lr)), state)
    values.append(state[-1])
  codes, Q, lr, _ = state
  return RefineResult(codes, Q, lr, jnp.stack(values))
