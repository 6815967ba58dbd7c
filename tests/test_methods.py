"""A battery every method must pass (optax contrib/_common_test.py style)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gilora_jax as gj
from gilora_jax.quant import grid as grid_lib
from tests.quant import problems

# srr_k=0 in the grid-exact case: preserving a subspace first changes the residual's grid by design.
METHODS = [(m, {}) for m in gj.METHODS if m != "srr"] + [("srr", {"srr_k": 0}), ("srr", {})]
IDS = [m + ("-k0" if o else "") for m, o in METHODS]


@pytest.fixture(scope="module")
def problem():
  W, _, H = problems.layer(seed=9, d_in=64, d_out=48, n=400, decay=12)
  H[3, :] = H[:, 3] = 0.0  # a dead feature
  return W.astype(np.float32), H.astype(np.float32)


@pytest.mark.parametrize("method, opts", METHODS, ids=IDS)
def test_battery(problem, method, opts):
  W, H = problem
  bits, rank, group = 3, 6, 16
  res = gj.quantize_layer(W, H, diagnostics="full", method=method, bits=bits, rank=rank, group_size=group, **opts)
  r = 0 if method in ("rtn", "gptq") else rank
  # Shapes and dtypes.
  assert res.Q.shape == W.shape and res.Q.dtype == jnp.float32
  assert res.L.shape == (64, r) and res.R.shape == (r, 48)
  assert res.codes.dtype == jnp.uint8 and res.codes.shape == W.shape
  assert res.scales.shape == res.zeros.shape == (64 // group, 48)
  # Codes in range; finite, positive scales; Q is exactly the dequantized codes.
  assert int(res.codes.max()) <= 2**bits - 1
  for a in (res.Q, res.L, res.R, res.scales, res.zeros):
    assert bool(jnp.all(jnp.isfinite(a)))
  assert bool(jnp.all(res.scales > 0))
  spec = grid_lib.GridSpec(bits=bits, group_size=group)
  np.testing.assert_array_equal(grid_lib.dequantize(res.codes, grid_lib.Grid(res.scales, res.zeros), spec), res.Q)
  # The dead feature is zeroed in Q (any value is optimal; zero is the reference's choice).
  np.testing.assert_array_equal(np.asarray(res.Q[3]), 0.0)
  # Deterministic.
  again = gj.quantize_layer(W, H, diagnostics="full", method=method, bits=bits, rank=rank, group_size=group, **opts)
  np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(res.codes))
  np.testing.assert_array_equal(np.asarray(again.L), np.asarray(res.L))
  assert 0 <= res.report.rel_err < 1


@pytest.mark.parametrize("method, opts", METHODS[:-1], ids=IDS[:-1])
def test_grid_exact_weight_is_reproduced(method, opts):
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 8, (32, 16))
  codes[0], codes[1] = 0, 7
  scales, zeros = rng.uniform(0.1, 1, 16), rng.integers(1, 7, 16)
  W = (scales * (codes - zeros)).astype(np.float32)
  _, _, H = problems.layer(seed=1, d_in=32, d_out=16, n=200)
  res = gj.quantize_layer(W, H.astype(np.float32), diagnostics="full", method=method, bits=3, rank=4, **opts)
  np.testing.assert_array_equal(np.asarray(res.codes), codes)
  np.testing.assert_allclose(np.asarray(res.Q + res.L @ res.R), W, atol=1e-5)


def test_gptq_rows_are_separable_so_fused_projections_match(problem):
  """q/k/v share one Hessian: quantizing [Wq Wk Wv] at once equals three separate runs (STYLE.md §4b)."""
  W, H = problem
  fused = gj.quantize_layer(W, H, method="gptq", bits=3)
  parts = [gj.quantize_layer(W[:, a:a + 16], H, method="gptq", bits=3) for a in (0, 16, 32)]
  np.testing.assert_array_equal(np.asarray(fused.codes), np.concatenate([np.asarray(p.codes) for p in parts], 1))


def test_math_layer_is_jittable_and_vmappable():
  from gilora_jax.quant import gptq, hessian  # pylint: disable=import-outside-toplevel
  W, _, H = problems.layer(seed=2, d_in=32, d_out=8, n=100)
  T = hessian.factor(jnp.asarray(H + np.mean(np.diag(H)) * 0.01 * np.eye(32), jnp.float32))
  spec = grid_lib.GridSpec(bits=4)
  f = jax.jit(lambda w: gptq.sweep(w, T, spec)[0])
  W2, _, _ = problems.layer(seed=3, d_in=32, d_out=8, n=100)  # an independent weight (2W has W's codes)
  stacked = jnp.stack([jnp.asarray(W, jnp.float32), jnp.asarray(W2, jnp.float32)])
  out = jax.vmap(f)(stacked)
  assert not np.array_equal(f(stacked[0]), f(stacked[1]))
  for i in range(2):
    np.testing.assert_array_equal(out[i], f(stacked[i]))
