"""The per-layer error figure (matplotlib)."""
import numpy as np

from gilora_jax.pipeline import data, plot


def test_error_plot_draws_every_series(tmp_path):
  recs = [dict(block=i // 2, path=f"layers.{i // 2}.x{i % 2}", rel_err_quantized=0.1, rel_err=0.01 * (i + 1),
               upper_bound=0.05) for i in range(6)]
  path = tmp_path / "p.png"
  path.write_bytes(plot.error_plot(recs, title="t"))
  img = data.read_image(str(path)).astype(int)
  assert img.shape[0] > 200 and img.shape[1] > 400
  for color in plot.COLORS.values():  # each series' colour is drawn (anti-aliasing blends the edges only)
    rgb = np.array([int(color[k:k + 2], 16) for k in (1, 3, 5)])
    assert (np.abs(img - rgb).sum(-1) < 30).sum() > 20, color
  # records without errors (diagnostics off) still give a valid figure
  assert plot.error_plot([dict(block=0, path="a", rel_err=None)]).startswith(b"\x89PNG")
