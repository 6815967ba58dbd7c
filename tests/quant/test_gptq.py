"""The GPTQ sweep against the float64 NumPy port of the reference, and its relational properties."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gilora_jax as gj
from gilora_jax.quant import gptq as gptq_lib
from gilora_jax.quant import grid as grid_lib
from gilora_jax.quant import hessian
from tests.quant import problems
from tests.reference.gptq_numpy import gptq_reference, rtn_reference

PLAIN = dict(mse=False, act_order=False)  # the reference's min–max grid and natural row order

CASES = [  # (group_size, symmetric, act_order, static_groups)
    (None, False, False, False),
    (None, True, False, False),
    (32, False, False, False),
    (32, True, False, False),
    (32, False, True, True),
    (32, True, False, True),  # static groups in natural order: one grid row per micro-block
    (None, False, True, False),
]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("group_size, symmetric, act_order, static_groups", CASES)
def test_float64_codes_identical_to_reference(group_size, symmetric, act_order, static_groups):
  W, _, H = problems.layer(seed=1, d_in=96, d_out=40, n=600, decay=30)
  H[5, :] = H[:, 5] = 0.0  # a dead feature
  ref = gptq_reference(W, H, 3, group_size=group_size, symmetric=symmetric, act_order=act_order,
                       static_groups=static_groups, block_size=group_size or 128)
  res = gj.quantize_layer(W, H, method="gptq", bits=3, group_size=group_size, symmetric=symmetric,
                          act_order=act_order, static_groups=static_groups, diagnostics=False, mse=False)
  if symmetric:  # the reference keeps IST's half-range quirk for columns without a negative entry; ours does not
    assert (W.min(axis=0) < 0).all()
  np.testing.assert_array_equal(np.asarray(res.codes), ref["codes"])
  np.testing.assert_allclose(np.asarray(res.Q), ref["Q"], atol=1e-12)


def test_float32_matches_reference_closely():
  W, _, H = problems.layer(seed=2, d_in=256, d_out=128, n=2048, decay=60, outliers=3)
  ref = gptq_reference(W, H, 4, group_size=64, block_size=64)
  res = gj.quantize_layer(W.astype(np.float32), H.astype(np.float32), method="gptq", bits=4, group_size=64,
                          mse=False, act_order=False)
  same = np.mean(np.asarray(res.codes) == ref["codes"])
  assert same >= 0.995, same
  err_ref = problems.out_err(W, ref["Q"], H)
  assert abs(problems.out_err(W, res.Q, H) / err_ref - 1) < 0.01


# (block, segments, micro-block): the slow set adds an odd block, whose many unrolled blocks take ~10 s to
# compile on a 2-core CPU (block 1 took 20; gptq.reference is the row-by-row case, tested against the sweep).
BLOCKINGS = ((32, 4, 16), (128, 1, 16), (64, 5, 4), (128, 2, 32))
BLOCKINGS_SLOW = ((7, 3, 16),) + BLOCKINGS


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("group_size", [None, 16, 64])
@pytest.mark.parametrize("blockings", [BLOCKINGS, pytest.param(BLOCKINGS_SLOW, marks=pytest.mark.slow)],
                         ids=["fast", "all"])
def test_result_does_not_depend_on_block_size(group_size, blockings):
  W, _, H = problems.layer(seed=3, d_in=128, d_out=24, n=500)
  Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(128)
  T = hessian.factor(jnp.asarray(Hd))
  spec = grid_lib.GridSpec(bits=3, group_size=group_size)
  grid = None if group_size else grid_lib.fit_grid(jnp.asarray(W), spec)
  outs = [np.asarray(gptq_lib.sweep(jnp.asarray(W), T, spec, grid=grid, block_size=b, num_segments=s, micro_block=m)[0])
          for b, s, m in blockings]
  # The transposed factor (what quantize_layer hands over) gives the same codes.
  outs.append(np.asarray(gptq_lib.sweep(jnp.asarray(W), T.T, spec, grid=grid, transposed=True)[0]))
  for o in outs[1:]:
    np.testing.assert_array_equal(o, outs[0])


def test_segments_of_one_size_share_one_compiled_sweep(caplog):
  """The driver's segments reuse one executable (their start is traced); a per-segment sweep would compile 4."""
  W, _, H = problems.layer(seed=4, d_in=256, d_out=23, n=400)  # a shape no other test sweeps: compiled here
  T = hessian.factor(jnp.asarray(H + 0.01 * np.mean(np.diag(H)) * np.eye(256), jnp.float32))
  spec = grid_lib.GridSpec(bits=3, group_size=32)
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    gptq_lib.sweep(jnp.asarray(W, jnp.float32), T, spec, block_size=32, num_segments=4, micro_block=8)
  sweeps = [r.getMessage() for r in caplog.records if "Compiling jit(_segment)" in r.getMessage()]
  assert len(sweeps) == 1, sweeps


def test_gptq_beats_rtn_in_output_but_not_weight_error():
  """qwix's relational property on heavy-tailed inputs: larger weight error, smaller output error."""
  W, _, H = problems.layer(seed=5, d_in=256, d_out=128, n=2048, decay=40)
  for bits in (3, 4, 8):
    g = gj.quantize_layer(W, H, diagnostics="full", method="gptq", bits=bits, group_size=64, **PLAIN)
    r = gj.quantize_layer(W, H, diagnostics="full", method="rtn", bits=bits, group_size=64, **PLAIN)
    assert g.report.rel_err < 0.8 * r.report.rel_err
    assert np.sum((np.asarray(g.Q) - W) ** 2) > np.sum((np.asarray(r.Q) - W) ** 2)
  ref = rtn_reference(W, 4, group_size=64)
  np.testing.assert_array_equal(np.asarray(gj.quantize_layer(W, H, method="rtn", bits=4, group_size=64, **PLAIN).codes),
                                ref["codes"])


def test_same_shaped_layers_do_not_recompile(caplog):
  W1, _, H1 = problems.layer(seed=6, d_in=64, d_out=32, n=300)
  W2, _, H2 = problems.layer(seed=7, d_in=64, d_out=32, n=300)
  for method in ("gptq", "gilora"):
    gj.quantize_layer(W1, H1, method=method, bits=3, rank=4, loops=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
      gj.quantize_layer(W2, H2, method=method, bits=3, rank=4, loops=1)
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert not compiles, compiles


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("bits, group_size, fixed", [(3, None, True), (4, 16, False), (2, 16, True), (3, 32, False)])
def test_fast_sweep_gives_the_textbook_recurrences_codes(bits, group_size, fixed):
  """gptq.reference (Alg. 1 as one lax.scan) and the blocked sweep: the same codes in float64, and Q bit-equal on
  a fixed grid (lazy group grids are fitted from rows summed in another order: equal to round-off)."""
  W, _, H = problems.layer(seed=11, d_in=96, d_out=20, n=500, decay=20)
  T = hessian.factor(hessian.damped(jnp.asarray(H), 0.01))
  spec = grid_lib.GridSpec(bits=bits, group_size=group_size)
  grid = grid_lib.fit_grid(jnp.asarray(W), spec) if fixed else None
  ca, ga, Qa = gptq_lib.reference(jnp.asarray(W), T, spec, grid=grid)
  cb, gb, Qb = gptq_lib.sweep(jnp.asarray(W), T, spec, grid=grid, block_size=32, micro_block=8)
  np.testing.assert_array_equal(np.asarray(ca), np.asarray(cb))
  if fixed:
    np.testing.assert_array_equal(np.asarray(Qa), np.asarray(Qb))
  else:
    np.testing.assert_allclose(np.asarray(ga.scales), np.asarray(gb.scales), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(Qa), np.asarray(Qb), rtol=0, atol=1e-12)
  # and both are the NumPy port of the IST reference's (static groups = grids fixed on W up front; block 1 so
  # that the reference fits every lazy group on fresh rows)
  ref = gptq_reference(W, H, bits, group_size=group_size, static_groups=fixed and group_size is not None,
                       block_size=1)
  np.testing.assert_array_equal(np.asarray(ca), ref["codes"])


def test_gptq_from_w_and_h_or_a_prepared_site():
  """gptq.gptq, called directly: the same codes from H or from a site, dead rows zeroed, the factor it used."""
  W, _, H = problems.layer(seed=12, d_in=64, d_out=20, n=400, decay=16)
  H[5, :] = H[:, 5] = 0.0  # a dead feature
  W, H = jnp.asarray(W, jnp.float32), jnp.asarray(H, jnp.float32)
  spec = grid_lib.GridSpec(bits=3, group_size=16)
  a = gptq_lib.gptq(W, H, spec)
  site = hessian.prepare(H)
  b = gptq_lib.gptq(W, site, spec)
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  np.testing.assert_array_equal(np.asarray(a.Q[5]), 0.0)
  assert a.factor.damp == 0.01 and a.factor.perm is None
  c = gptq_lib.gptq(W, site, spec, act_order=True)
  assert c.factor.perm is not None and c.grid.scales.shape == (4, 20)
  np.testing.assert_array_equal(np.asarray(gj.quantize_layer(W, H, method="gptq", bits=3, group_size=16, **PLAIN).codes),
                                np.asarray(a.codes))
