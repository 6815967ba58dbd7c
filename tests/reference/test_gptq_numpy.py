"""Self-tests that make the float64 GPTQ reference trustworthy on its own (no JAX, no torch)."""
import numpy as np
import pytest

from .gptq_numpy import (dequantize, fit_grid, gptq_reference, inverse_cholesky_upper, output_error, quantize,
                         rtn_reference)


def _problem(rng, d_in=128, d_out=48, n=512, df=5.0):
  """W ~ N(0, 1/d_in); X = Student-t(df) tokens mixed by a matrix with decaying row norms (correlated features,
  as in real activations: GPTQ only helps where H is far from diagonal). diag(H) entries are distinct a.s."""
  W = rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)
  mix = rng.standard_normal((d_in, d_in)) / np.sqrt(np.arange(1.0, d_in + 1))[:, None]
  X = rng.standard_t(df, size=(n, d_in)) @ mix
  return W, X, X.T @ X


# --- grid -----------------------------------------------------------------------------------------------------


def test_fit_grid_asymmetric_contains_zero_and_all_zero_column():
  W = np.array([[1.0, -2.0, 0.0], [3.0, -1.0, 0.0]])
  scale, zero = fit_grid(W, 4, symmetric=False)
  np.testing.assert_allclose(scale, [3.0 / 15, 2.0 / 15, 2.0 / 15])  # col 0: [0, 3]; col 1: [-2, 0]; col 2: [-1, 1]
  np.testing.assert_array_equal(zero, [0.0, 15.0, np.round(7.5)])  # round half to even: 7.5 -> 8
  assert zero[2] == 8.0


def test_fit_grid_symmetric_quirks():
  W = np.array([[1.0, -2.0], [3.0, 1.0]])
  scale, zero = fit_grid(W, 4, symmetric=True)
  np.testing.assert_array_equal(zero, [8.0, 8.0])
  # Column 0 has no negative entry: xmin stays 0, scale = xmax / 15, and its max clips to 7 steps.
  np.testing.assert_allclose(scale, [3.0 / 15, 4.0 / 15])
  c = quantize(W, scale, zero, 15)
  np.testing.assert_allclose(dequantize(c, scale, zero)[1, 0], 7 * 3.0 / 15)
  # Column 1: +xmax would be 7.5 steps up; half-to-even gives 8, clamped to 15 - 8 = 7 steps.
  assert quantize(np.array([2.0]), scale[1], 8.0, 15)[0] == 15


def test_fit_grid_shrink_scales_after_zero():
  W = np.array([[-1.0], [2.0]])
  s0, z0 = fit_grid(W, 3, symmetric=False)
  s, z = fit_grid(W, 3, symmetric=False, shrink=0.9)
  np.testing.assert_allclose(s, 0.9 * s0)
  np.testing.assert_array_equal(z, z0)  # zero from the unshrunk range
  np.testing.assert_array_equal(z0, np.round(1.0 / (3.0 / 7)))


def test_inverse_cholesky_upper(rng):
  A = rng.standard_normal((20, 9))
  H = A.T @ A + np.eye(9)
  U = inverse_cholesky_upper(H)
  np.testing.assert_allclose(np.triu(U), U)
  np.testing.assert_allclose(U.T @ U, np.linalg.inv(H), rtol=1e-10, atol=1e-12)


# --- (a) GPTQ beats RTN on the output error -------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_rtn_output_error(rng, group_size, symmetric):
  W, _, H = _problem(rng)
  ref = gptq_reference(W, H, 4, group_size=group_size, symmetric=symmetric)
  rtn = rtn_reference(W, 4, group_size=group_size, symmetric=symmetric)
  e_gptq, e_rtn = output_error(W, ref["Q"], H), output_error(W, rtn["Q"], H)
  assert e_gptq < 0.5 * e_rtn  # ≈ 0.3 on this fixture
  # ...while the plain weight error goes up (qwix's relational property, PEERS.md §4.2).
  assert np.sum((W - ref["Q"])**2) > np.sum((W - rtn["Q"])**2)
  # Layout and consistency of the returned pieces.
  n_groups = 1 if group_size is None else W.shape[0] // group_size
  assert ref["scales"].shape == ref["zeros"].shape == (n_groups, W.shape[1])
  assert ref["codes"].min() >= 0 and ref["codes"].max() <= 15
  Q = dequantize(ref["codes"], ref["scales"][ref["g_idx"]], ref["zeros"][ref["g_idx"]])
  np.testing.assert_array_equal(Q, ref["Q"])


def test_same_grid_as_rtn_per_channel(rng):
  """Per-channel GPTQ uses exactly RTN's grid; with a huge damping GPTQ degenerates to RTN."""
  W, _, H = _problem(rng)
  ref = gptq_reference(W, H, 4, damp=1e9)
  rtn = rtn_reference(W, 4)
  np.testing.assert_array_equal(ref["codes"], rtn["codes"])


# --- (b) block-size (in)dependence ---------------------------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True])
def test_block_size_independent_per_channel(rng, act_order):
  W, _, H = _problem(rng)
  runs = [gptq_reference(W, H, 3, block_size=b, act_order=act_order) for b in (1, 7, 128)]
  for r in runs[1:]:
    np.testing.assert_array_equal(r["codes"], runs[0]["codes"])
    np.testing.assert_allclose(r["W_swept"], runs[0]["W_swept"], rtol=0, atol=1e-12)


def test_block_size_independent_when_groups_start_on_blocks(rng):
  """Grouped, non-static: identical to block_size 1 iff every group start is a block start (group % block == 0)."""
  W, _, H = _problem(rng)
  fresh = gptq_reference(W, H, 3, group_size=14, block_size=1)
  np.testing.assert_array_equal(gptq_reference(W, H, 3, group_size=14, block_size=7)["codes"], fresh["codes"])
  np.testing.assert_array_equal(gptq_reference(W, H, 3, group_size=14, block_size=14)["codes"], fresh["codes"])
  fresh32 = gptq_reference(W, H, 3, group_size=32, block_size=1)
  np.testing.assert_array_equal(gptq_reference(W, H, 3, group_size=32, block_size=32)["codes"], fresh32["codes"])
  # Static groups: all grids fixed up front, so any block size gives the same codes.
  st = [gptq_reference(W, H, 3, group_size=14, static_groups=True, act_order=True, block_size=b) for b in (1, 7, 128)]
  for r in st[1:]:
    np.testing.assert_array_equal(r["codes"], st[0]["codes"])


def test_stale_group_quirk(rng):
  """IST quirk: group 32 < block 128 fits groups 1-3 of each block on weights lacking the in-block updates."""
  W, _, H = _problem(rng)
  fresh = gptq_reference(W, H, 3, group_size=32, block_size=32)
  stale = gptq_reference(W, H, 3, group_size=32, block_size=128)
  np.testing.assert_array_equal(stale["scales"][0], fresh["scales"][0])  # group 0 starts the block: fresh
  assert not np.allclose(stale["scales"][1], fresh["scales"][1])  # group 1 starts mid-block: stale
  # The stale grid of group 1 is the min/max of the rows 32..63 before the in-block updates of rows 0..31.
  np.testing.assert_allclose(stale["scales"][1], fit_grid(W[32:64], 3, False)[0])


# --- (c) 8-bit is nearly lossless ------------------------------------------------------------------------------


def test_8bit_error_tiny(rng):
  W, _, H = _problem(rng)
  ref = gptq_reference(W, H, 8, group_size=32, symmetric=True)
  rel = output_error(W, ref["Q"], H) / output_error(W, 0 * W, H)
  assert rel < 5e-5
  assert output_error(W, ref["Q"], H) < output_error(W, rtn_reference(W, 8, group_size=32, symmetric=True)["Q"], H)


# --- (d) act-order with static groups ------------------------------------------------------------------------


def test_act_order_static_groups(rng):
  W, _, H = _problem(rng)
  ref = gptq_reference(W, H, 4, group_size=32, act_order=True, static_groups=True)
  perm = ref["perm"]
  np.testing.assert_array_equal(np.sort(perm), np.arange(len(H)))
  assert np.all(np.diff(np.diag(H)[perm]) <= 0)
  np.testing.assert_array_equal(ref["g_idx"], np.arange(len(H)) // 32)  # natural-order groups
  for k in range(4):  # static grids: from the original W, natural order
    s, z = fit_grid(W[32 * k:32 * (k + 1)], 4, False)
    np.testing.assert_array_equal(ref["scales"][k], s)
    np.testing.assert_array_equal(ref["zeros"][k], z)
  Q = dequantize(ref["codes"], ref["scales"][ref["g_idx"]], ref["zeros"][ref["g_idx"]])
  np.testing.assert_array_equal(Q, ref["Q"])
  assert output_error(W, ref["Q"], H) < output_error(W, rtn_reference(W, 4, group_size=32)["Q"], H)


def test_act_order_dynamic_groups_follow_visiting_order(rng):
  W, _, H = _problem(rng)
  ref = gptq_reference(W, H, 4, group_size=32, act_order=True)
  np.testing.assert_array_equal(ref["g_idx"][ref["perm"]], np.arange(len(H)) // 32)
  Q = dequantize(ref["codes"], ref["scales"][ref["g_idx"]], ref["zeros"][ref["g_idx"]])
  np.testing.assert_array_equal(Q, ref["Q"])


def test_dead_features(rng):
  W, X, _ = _problem(rng)
  X[:, [3, 50]] = 0.0
  H = X.T @ X
  ref = gptq_reference(W, H, 4, group_size=32, act_order=True)
  np.testing.assert_array_equal(ref["Q"][[3, 50]], 0.0)
  assert np.isfinite(ref["Q"]).all()


# --- (e) the OBS property, checked by brute-force least squares ------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True])
def test_obs_property_by_least_squares(rng, act_order):
  """Each row, when quantized, equals row k of argmin_V ‖X̃(W − [Q_done; V])‖ given the rows already quantized.

  X̃ = [X; √λ I] realises the damped Hessian H + λI = X̃ᵀX̃, so the check is exact with damping.
  """
  d_in, d_out, n, damp = 6, 5, 40, 0.01
  W = rng.standard_normal((d_in, d_out))
  X = rng.standard_t(5.0, size=(n, d_in)) * np.arange(1.0, d_in + 1)
  H = X.T @ X
  ref = gptq_reference(W, H, 2, damp=damp, block_size=4, act_order=act_order)
  lam = damp * np.mean(np.diag(H))
  Xt = np.vstack([X, np.sqrt(lam) * np.eye(d_in)])
  perm = ref["perm"]
  for k in range(d_in):
    done, rest = perm[:k], perm[k:]
    target = Xt @ W - Xt[:, done] @ ref["Q"][done]
    V, *_ = np.linalg.lstsq(Xt[:, rest], target, rcond=None)
    np.testing.assert_allclose(ref["W_swept"][perm[k]], V[0], rtol=1e-9, atol=1e-9)
  # The very first row is the unmodified weight; IST's loss is Σ (w − q)² / d² / 2.
  np.testing.assert_array_equal(ref["W_swept"][perm[0]], W[perm[0]])
  assert ref["loss"] == pytest.approx(ref["losses"].sum())
