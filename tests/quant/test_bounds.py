"""Paper A's upper bound holds at high bit width (no clipping); the lower estimate sits below the achieved error."""
import jax.numpy as jnp
import numpy as np
import pytest

import gilora_jax as gj
from gilora_jax.quant import bounds
from tests.quant import problems


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("r", [0, 4, 8])
def test_cor39_upper_bound_holds_at_8_bits(r):
  W, H = problems.spectral_drop(seed=0, r=8)
  res = gj.quantize_layer(W, H, method="gilora", bits=8, rank=r, final_olrc=False)
  # The bound is on the damped intrinsic objective ‖X(W − Q − V_r R)‖² + λ‖W − Q‖² + λ‖R‖², with λ of the
  # augmented pass.
  e, V = np.linalg.eigh(H)
  sig2 = e[::-1][:r]
  lam = 0.01 * (np.trace(H) + sig2.sum()) / (H.shape[0] + r)
  Q, L, R = (np.asarray(a) for a in (res.Q, res.L, res.R))
  E = W - Q - L @ R
  lhs = np.sum(E * (H @ E)) + lam * np.sum((W - Q) ** 2) + lam * np.sum(R**2)
  rhs = float(bounds.upper_bound(jnp.asarray(e), res.scales, r, lam))
  assert lhs <= rhs, (lhs, rhs)


def test_reported_bounds_bracket_the_error():
  W, H = problems.spectral_drop(seed=1)
  for bits in (2, 3, 4):
    info = gj.quantize_layer(W, H, method="gilora", bits=bits, rank=8).info
    assert 0 <= info["lower_estimate"] <= info["rel_err"] <= info["upper_bound"], info


def test_lower_estimate_vanishes_when_rank_covers_everything():
  W = jnp.ones((4, 3))
  assert float(bounds.lower_estimate(jnp.ones(4), W, 3, 3)) == 0.0
