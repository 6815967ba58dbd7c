"""Evaluation: perplexity against transformers on the same windows, windowing, chunked NLL, image reading, plots."""
import os
import struct
import zlib

import numpy as np
import pytest

from gilora_jax.pipeline import data, evaluate, plot
from gilora_jax import load_model

TORCH_REASON = "PyTorch CPU is the reference for the perplexity parity test (pip install -e .[test])"


def test_perplexity_matches_transformers(lm_folder):
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  from transformers import AutoTokenizer, Qwen3ForCausalLM  # pylint: disable=import-outside-toplevel
  tok = AutoTokenizer.from_pretrained(lm_folder)
  with open(os.path.join(lm_folder, "eval.txt"), encoding="utf-8") as f:
    ids = data.tokenize(tok, f.read())
  seqlen = 128
  ours = evaluate.perplexity(load_model(lm_folder), ids, seqlen, batch_size=4)
  # The GPTQ reference loop (llama_eval): each window scored alone, loss · seqlen summed, / (nsamples · seqlen).
  pt = Qwen3ForCausalLM.from_pretrained(lm_folder, dtype=torch.float32).eval()
  w = evaluate.windows(ids, seqlen)
  nlls = []
  with torch.no_grad():
    for row in w:
      x = torch.as_tensor(row[None].astype(np.int64))
      nlls.append(pt(x, labels=x).loss.double() * seqlen)
  ref = float(torch.exp(torch.stack(nlls).sum() / (len(w) * seqlen)))
  assert ours["windows"] == len(w) == len(ids) // seqlen and ours["tokens"] == len(w) * (seqlen - 1)
  assert ours["perplexity"] == pytest.approx(ref, rel=1e-5)


def test_chunked_nll_equals_the_full_logits_one(lm_folder, monkeypatch):
  """The NLL from logits chunks and micro-batches equals log_softmax over the whole (B, T, V) logits."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gilora_jax.models import qwen3  # pylint: disable=import-outside-toplevel
  model = load_model(lm_folder)
  ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 33)).astype(np.int32)
  logits = np.asarray(qwen3.forward(model, ids), np.float64)[:, :-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0].sum(1)
  for rows, chunk in ((4, 32), (1, 5), (2, 7), (4, 1)):
    got = np.asarray(evaluate._window_nll(model, jnp.asarray(ids), rows, chunk))  # pylint: disable=protected-access
    np.testing.assert_allclose(got, want, rtol=2e-6)
  # The planner keeps a chunk of logits and a micro-batch's attention scores within their budgets.
  monkeypatch.setattr(evaluate, "_LOGITS_BUDGET", 4 * 101 * 10)
  monkeypatch.setattr(evaluate, "_SCORES_BUDGET", 2 * 4 * 33 * 33)
  rows, chunk = evaluate._plan(model, 4, 33)  # pylint: disable=protected-access
  assert (rows, chunk) == (2, 20)
  full = evaluate.perplexity(model, ids.reshape(-1), 33, batch_size=4)
  assert full["nll"] == pytest.approx(float(want.sum()) / (4 * 32), rel=2e-6)


def test_windows_drop_the_tail_and_reject_short_text():
  w = evaluate.windows(np.arange(10), 4)
  np.testing.assert_array_equal(w, [[0, 1, 2, 3], [4, 5, 6, 7]])
  with pytest.raises(ValueError, match="fewer than one window"):
    evaluate.windows(np.arange(3), 4)


def test_load_text_folder_needs_datasets(tmp_path):
  try:
    import datasets  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    pytest.skip("datasets is installed here; the error path is for installs without it")
  except ImportError:
    pass
  with pytest.raises(ValueError, match="needs the `datasets` package"):
    data.load_text(tmp_path)
  with pytest.raises(FileNotFoundError):
    data.load_text(tmp_path / "missing.txt")


def _png_bytes(img, filters, color_type):
  """An 8-bit PNG using the given filter type per row (an independent encoder, for the decoder's test)."""
  h, w, c = img.shape
  px = img.astype(np.int32).reshape(h, w * c)
  rows = []
  prev = np.zeros(w * c, np.int32)
  for y in range(h):
    f, cur = filters[y % len(filters)], px[y]
    left = np.concatenate([np.zeros(c, np.int32), cur[:-c]])
    upleft = np.concatenate([np.zeros(c, np.int32), prev[:-c]])
    if f == 0:
      pred = np.zeros_like(cur)
    elif f == 1:
      pred = left
    elif f == 2:
      pred = prev
    elif f == 3:
      pred = (left + prev) // 2
    else:
      p = left + prev - upleft
      pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - upleft)
      pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
    rows.append(bytes([f]) + ((cur - pred) & 0xFF).astype(np.uint8).tobytes())
    prev = cur

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels,color_type", [(1, 0), (2, 4), (3, 2), (4, 6)])
def test_png_decoder_all_filters(rng, tmp_path, channels, color_type):
  img = rng.integers(0, 256, (7, 5, channels)).astype(np.uint8)
  path = str(tmp_path / "x.png")
  with open(path, "wb") as f:
    f.write(_png_bytes(img, [0, 1, 2, 3, 4], color_type))
  want = np.repeat(img[..., :1], 3, -1) if channels <= 2 else img[..., :3]
  np.testing.assert_array_equal(data.read_image(path), want)


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


def test_image_folders(rng, tmp_path):
  imgs = rng.integers(0, 256, (6, 4, 4, 3)).astype(np.uint8)
  labels = [2, 0, 2, 1, 0, 1]
  for i, (img, y) in enumerate(zip(imgs, labels)):  # class subfolders named by id, three formats
    d = tmp_path / "classes" / str(y)
    d.mkdir(parents=True, exist_ok=True)
    if i % 3 == 0:
      np.save(d / f"{i}.npy", img)
    elif i % 3 == 1:
      (d / f"{i}.ppm").write_bytes(b"P6\n# comment\n4 4\n255\n" + img.tobytes())
    else:
      (d / f"{i}.png").write_bytes(_png_bytes(img, [4], 2))
  got, got_labels = data.load_images(tmp_path / "classes")
  order = sorted(range(6), key=lambda i: (labels[i], str(i)))
  np.testing.assert_array_equal(got, imgs[order])
  np.testing.assert_array_equal(got_labels, np.asarray(labels)[order])
  flat = tmp_path / "flat"  # ImageNet-style val folder: sorted files + labels.txt
  flat.mkdir()
  for i, img in enumerate(imgs[:3]):
    (flat / f"v{i}.pgm").write_bytes(b"P5 4 4 255\n" + img[..., 0].tobytes())
  (flat / "labels.txt").write_text("3\n1\n4\n")
  got, got_labels = data.load_images(flat)
  np.testing.assert_array_equal(got, np.repeat(imgs[:3, ..., :1], 3, -1))
  assert got_labels.tolist() == [3, 1, 4]
  with pytest.raises(ValueError, match="labels.txt"):
    (tmp_path / "empty").mkdir()
    data.load_images(tmp_path / "empty")
