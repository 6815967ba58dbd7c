"""Grids: the reference formulas, exact reproduction of grid-exact weights, validation."""
import jax.numpy as jnp
import numpy as np
import pytest

from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant.grid import GridSpec


def _numpy_fit(w, bits, symmetric):
  maxq = 2**bits - 1
  xmin, xmax = np.minimum(w.min(0), 0), np.maximum(w.max(0), 0)
  if symmetric:
    xmax = np.maximum(-xmin, xmax)
    xmin = -xmax
  s = (xmax - xmin) / maxq
  z = np.full_like(s, (maxq + 1) / 2) if symmetric else np.round(-xmin / s)
  return s, z


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_fit_matches_formula(rng, bits, symmetric):
  W = rng.standard_normal((64, 16)).astype(np.float32)
  s, z = grid_lib.fit_columns(jnp.asarray(W), GridSpec(bits=bits, symmetric=symmetric))
  s_ref, z_ref = _numpy_fit(W.astype(np.float64), bits, symmetric)
  np.testing.assert_allclose(s, s_ref, rtol=1e-6)
  np.testing.assert_array_equal(z, z_ref)


@pytest.mark.parametrize("group_size", [None, 16])
def test_grid_exact_weights_are_reproduced(rng, group_size):
  bits, d_in, d_out = 3, 64, 8
  spec = GridSpec(bits=bits, group_size=group_size)
  G = spec.num_groups(d_in)
  scales = rng.uniform(0.1, 1.0, (G, d_out))
  zeros = rng.integers(0, 8, (G, d_out)).astype(np.float64)
  codes = rng.integers(0, 8, (d_in, d_out))
  g = d_in // G
  for k in range(G):  # every group uses its extreme codes, so min–max refits the same grid
    codes[k * g, :], codes[k * g + 1, :] = 0, 7
  W = scales.repeat(g, 0) * (codes - zeros.repeat(g, 0))
  c, grid = grid_lib.rtn(jnp.asarray(W, jnp.float32), spec)
  np.testing.assert_array_equal(np.asarray(c), codes)
  np.testing.assert_allclose(grid_lib.dequantize(c, grid, spec), W, atol=1e-6)


def test_codes_range_and_dtype(rng):
  W = jnp.asarray(rng.standard_t(3, (32, 8)), jnp.float32)
  for bits in range(2, 9):
    c, _ = grid_lib.rtn(W, GridSpec(bits=bits))
    assert c.dtype == jnp.uint8
    assert int(c.min()) >= 0 and int(c.max()) <= 2**bits - 1


def test_shrink_scales_step(rng):
  W = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)
  s1, z1 = grid_lib.fit_columns(W, GridSpec(bits=3))
  s9, z9 = grid_lib.fit_columns(W, GridSpec(bits=3, shrink=0.9))
  np.testing.assert_allclose(s9, 0.9 * s1, rtol=1e-6)
  np.testing.assert_array_equal(z9, z1)


def test_mse_search_never_worse_than_minmax(rng):
  W = jnp.asarray(rng.standard_t(2, (256, 16)), jnp.float32)  # outliers: clipping pays off
  for bits in (2, 3, 4):
    err = {}
    for mse in (False, True):
      spec = GridSpec(bits=bits, mse=mse)
      c, grid = grid_lib.rtn(W, spec)
      err[mse] = np.sum(np.abs(np.asarray(grid_lib.dequantize(c, grid, spec)) - np.asarray(W)) ** 2.4, axis=0)
    assert np.all(err[True] <= err[False] * (1 + 1e-6))
    assert np.sum(err[True]) < np.sum(err[False])


def test_all_zero_column_gets_unit_range():
  s, z = grid_lib.fit_columns(jnp.zeros((8, 2)), GridSpec(bits=2))
  np.testing.assert_allclose(s, [2 / 3, 2 / 3], rtol=1e-6)
  c = grid_lib.quantize_rows(jnp.zeros((8, 2)), s[None], z[None], 3)
  np.testing.assert_array_equal(grid_lib.dequantize_rows(c, s[None], z[None]), 0.0)


@pytest.mark.parametrize("bad, match", [(dict(bits=1), "outside 2..8"), (dict(bits=9), "outside 2..8"),
                                        (dict(group_size=48), "does not divide"), (dict(shrink=0.0), "shrink")])
def test_validation_names_the_fix(bad, match):
  with pytest.raises(ValueError, match=match):
    GridSpec(**{"bits": 4, **bad}).validate(128)


def _np_clip_scores(W, bits):
  """Float64 NumPy port of the reference's clip search: the score of every candidate p = 1 − i/100, i < 80."""
  maxq = 2**bits - 1
  xmin, xmax = np.minimum(W.min(0), 0.0), np.maximum(W.max(0), 0.0)
  scores = []
  for i in range(80):
    p = 1.0 - i / 100
    lo, hi = p * xmin, p * xmax
    scale = (hi - lo) / maxq
    zero = np.round(-lo / scale)
    q = scale * (np.clip(np.round(W / scale) + zero, 0, maxq) - zero)
    scores.append(np.sum(np.abs(q - W) ** 2.4, axis=0))
  return np.stack(scores)  # (80, d_out)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_search_matches_brute_force(rng, bits):
  """The exhaustive search picks the brute-force best ratio; the coarse-to-fine default picks it on nearly all
  columns, lands within 2 % of the best score on every one and within 0.1 % summed (heavy tails, so clipping
  matters)."""
  W = rng.standard_t(3, (128, 256)).astype(np.float32)
  ref = _np_clip_scores(W.astype(np.float64), bits)
  best = ref.min(0)
  spec = GridSpec(bits=bits, mse=True)
  for exhaustive, tol, total, share in ((True, 1e-5, 1e-5, 1.0), (False, 2e-2, 1e-3, 0.97)):
    s, z = grid_lib.fit_columns(jnp.asarray(W), spec, exhaustive=exhaustive)
    s, z = np.asarray(s, np.float64), np.asarray(z, np.float64)
    q = s * (np.clip(np.round(W / s) + z, 0, 2**bits - 1) - z)
    got = np.sum(np.abs(q - W) ** 2.4, axis=0)
    assert np.all(got <= best * (1 + tol)), (exhaustive, np.max(got / best))
    assert got.sum() <= best.sum() * (1 + total), (exhaustive, got.sum() / best.sum())
    assert np.mean(got <= best * (1 + 1e-5)) >= share, (exhaustive, np.mean(got <= best * (1 + 1e-5)))
