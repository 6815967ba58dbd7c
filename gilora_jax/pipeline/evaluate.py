"""Evaluation: perplexity of a causal LM on a text, top-1 accuracy of an image classifier on a folder.

Perplexity follows the GPTQ reference (IST-DASLab/gptq `datautils.py`/`llama_eval`): the whole text is tokenized
once, the token stream is cut into ⌊n / seqlen⌋ non-overlapping windows (the tail is dropped), each window is
scored independently from an empty context, and the first token of each window has no prediction. The reported
value is exp of the mean token NLL over all windows' tokens 1..seqlen−1, which equals the reference's
`exp(Σ_w loss_w · seqlen / (nsamples · seqlen))`, so numbers compare with published tables.

Images: no PIL. Supported inputs are
  * an .npz with `images` (N, H, W[, C]) uint8 and `labels` (N,) int (also `calib_images`/`calib_labels`);
  * a folder with one subfolder per class (names that are all integers are the labels, otherwise the sorted
    names are labels 0..K−1), or a flat folder with `labels.txt` (one integer per line, in sorted file order);
  * image files: .png (8-bit grey, grey+alpha, RGB or RGBA, non-interlaced), binary .ppm/.pgm (P6/P5, 8-bit),
    .npy ((H, W[, C]) uint8).
Grey images are repeated to 3 channels, alpha is dropped.
"""
from __future__ import annotations

import functools
import os
import struct
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SUFFIXES = (".png", ".ppm", ".pgm", ".npy")


# ------------------------------------------------------------------------------------------------ text / perplexity


def load_text(path: str | os.PathLike) -> str:
  """The text of a local file, or of a local HF `datasets` folder (all rows' "text" joined by "\\n\\n", as the
  GPTQ reference joins wikitext2); the latter needs the `datasets` package."""
  path = os.fspath(path)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} does not exist; pass a local text file (or a local HF datasets folder).")
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"{path!r} is a folder; reading a HF datasets folder (arrow/parquet) needs the `datasets` "
                     f"package, which is not installed. Pass a plain text file instead.") from e
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
  parquet = [f for f in files if f.endswith(".parquet")]
  if parquet:
    ds = datasets.load_dataset("parquet", data_files=parquet, split="train")
  else:
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
      ds = ds["test"] if "test" in ds else ds[next(iter(ds))]
  if "text" not in ds.column_names:
    raise ValueError(f"{path!r}: the dataset has columns {ds.column_names}, no 'text'.")
  return "\n\n".join(ds["text"])


def tokenize(tokenizer, text: str) -> np.ndarray:
  """Token ids of the whole text, (n,) int32, as the reference: one call, the tokenizer's default specials."""
  return np.asarray(tokenizer(text)["input_ids"], np.int32).reshape(-1)


def windows(ids: np.ndarray, seqlen: int) -> np.ndarray:
  """(⌊n / seqlen⌋, seqlen) non-overlapping windows; ValueError when the text is shorter than one window."""
  if seqlen < 2:
    raise ValueError(f"seqlen={seqlen} must be at least 2 (the first token of a window has no prediction).")
  n = ids.size // seqlen
  if n == 0:
    raise ValueError(f"the text has {ids.size} tokens, fewer than one window of seqlen={seqlen}; pass a longer "
                     f"text or a smaller --seqlen.")
  return ids[:n * seqlen].reshape(n, seqlen)


@jax.jit
def _window_nll(model, ids):
  """Summed NLL of tokens 1..T−1 of each row: (B, T) -> (B,) float32."""
  logits = model(ids).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0].sum(axis=1)


def perplexity(model, ids: np.ndarray, seqlen: int, batch_size: int = 8) -> dict[str, Any]:
  """GPTQ-protocol perplexity of a causal LM over a token stream; {"perplexity", "nll", "tokens", "windows"}.

  `tokens` counts the scored tokens, windows · (seqlen − 1).
  """
  w = windows(np.asarray(ids), seqlen)
  total = 0.0
  for i in range(0, len(w), batch_size):
    total += float(np.sum(np.asarray(_window_nll(model, jnp.asarray(w[i:i + batch_size])), np.float64)))
  tokens = w.shape[0] * (seqlen - 1)
  nll = total / tokens
  return {"perplexity": float(np.exp(nll)), "nll": nll, "tokens": tokens, "windows": int(w.shape[0])}


# ------------------------------------------------------------------------------------------------ images / top-1


def _png(data: bytes, where: str) -> np.ndarray:
  """Decodes an 8-bit, non-interlaced PNG (grey, grey+alpha, RGB, RGBA) to (H, W, C) uint8."""
  if data[:8] != b"\x89PNG\r\n\x1a\n":
    raise ValueError(f"{where}: not a PNG file")
  pos, idat, header = 8, [], None
  while pos < len(data):
    length, kind = struct.unpack(">I4s", data[pos:pos + 8])
    chunk = data[pos + 8:pos + 8 + length]
    pos += 12 + length
    if kind == b"IHDR":
      header = struct.unpack(">IIBBBBB", chunk)
    elif kind == b"IDAT":
      idat.append(chunk)
    elif kind == b"IEND":
      break
  if header is None:
    raise ValueError(f"{where}: PNG without IHDR")
  w, h, depth, color, _, _, interlace = header
  channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
  if depth != 8 or channels is None or interlace:
    raise ValueError(f"{where}: unsupported PNG (bit depth {depth}, colour type {color}, interlace {interlace}); "
                     f"only 8-bit non-interlaced grey/grey+alpha/RGB/RGBA (convert it, or save as .npy).")
  raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * channels)
  stride = w * channels
  out = np.zeros((h, stride), np.int32)
  prev = np.zeros(stride, np.int32)
  for y in range(h):
    f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
    if f == 0:
      cur = line
    elif f == 2:
      cur = (line + prev) & 0xFF
    else:  # filters 1 (sub), 3 (average), 4 (Paeth) depend on the pixel to the left: run along the row
      cur = np.zeros(stride, np.int32)
      for x in range(stride):
        a = cur[x - channels] if x >= channels else 0
        b = prev[x]
        c = prev[x - channels] if x >= channels else 0
        if f == 1:
          pred = a
        elif f == 3:
          pred = (a + b) // 2
        elif f == 4:
          p = a + b - c
          pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
          pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        else:
          raise ValueError(f"{where}: bad PNG filter type {f}")
        cur[x] = (line[x] + pred) & 0xFF
    out[y] = prev = cur
  return out.reshape(h, w, channels).astype(np.uint8)


def _pnm(data: bytes, where: str) -> np.ndarray:
  """Decodes a binary 8-bit PGM (P5) or PPM (P6) to (H, W, C) uint8."""
  tokens, pos = [], 0
  while len(tokens) < 4:
    while data[pos:pos + 1].isspace():
      pos += 1
    if data[pos:pos + 1] == b"#":
      pos = data.index(b"\n", pos)
      continue
    end = pos
    while not data[end:end + 1].isspace():
      end += 1
    tokens.append(data[pos:end])
    pos = end
  magic, w, h, maxval = tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3])
  if magic not in (b"P5", b"P6") or maxval > 255:
    raise ValueError(f"{where}: only binary 8-bit PGM (P5) / PPM (P6) are supported, got {magic!r} max {maxval}")
  c = 3 if magic == b"P6" else 1
  return np.frombuffer(data[pos + 1:pos + 1 + w * h * c], np.uint8).reshape(h, w, c)


def read_image(path: str) -> np.ndarray:
  """One image file as (H, W, 3) uint8 (see the module docstring for the formats)."""
  if path.endswith(".npy"):
    img = np.load(path)
  else:
    with open(path, "rb") as f:
      data = f.read()
    img = _png(data, path) if path.endswith(".png") else _pnm(data, path)
  return to_rgb(img, path)


def to_rgb(img: np.ndarray, where: str = "image") -> np.ndarray:
  """(H, W), (H, W, 1|2|3|4) -> (H, W, 3): grey repeated, alpha dropped."""
  img = np.asarray(img)
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3 or img.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f"{where}: expected an (H, W[, C]) image, got shape {img.shape}")
  if img.shape[-1] in (1, 2):
    img = np.repeat(img[..., :1], 3, axis=-1)
  return img[..., :3]


def load_images(path: str | os.PathLike, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, H, W, 3), labels (N,) int32) from an .npz or a folder (module docstring).

  `split="calib"` reads `calib_images`/`calib_labels` from an .npz that has them.
  """
  path = os.fspath(path)
  if os.path.isfile(path) and path.endswith(".npz"):
    with np.load(path) as z:
      prefix = "calib_" if split == "calib" and "calib_images" in z.files else ""
      if f"{prefix}images" not in z.files or f"{prefix}labels" not in z.files:
        raise ValueError(f"{path}: an image .npz needs arrays 'images' and 'labels'; it has {z.files}.")
      images, labels = z[f"{prefix}images"], z[f"{prefix}labels"]
    if images.ndim == 3:
      images = images[..., None]
    return np.stack([to_rgb(i, path) for i in images]), labels.astype(np.int32)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} does not exist; pass an image folder or an .npz with images and labels.")
  subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
  files, labels = [], []
  if subdirs:
    numeric = all(d.isdigit() for d in subdirs)
    for k, d in enumerate(subdirs):
      for f in sorted(os.listdir(os.path.join(path, d))):
        if f.lower().endswith(IMAGE_SUFFIXES):
          files.append(os.path.join(path, d, f))
          labels.append(int(d) if numeric else k)
  else:
    label_file = os.path.join(path, "labels.txt")
    if not os.path.isfile(label_file):
      raise ValueError(f"{path}: no class subfolders and no labels.txt; see gilora_jax.pipeline.evaluate for the layouts.")
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.lower().endswith(IMAGE_SUFFIXES)]
    with open(label_file, encoding="utf-8") as f:
      labels = [int(line) for line in f.read().split()]
    if len(labels) != len(files):
      raise ValueError(f"{label_file} has {len(labels)} labels for {len(files)} images.")
  if not files:
    raise ValueError(f"{path}: no images with suffixes {IMAGE_SUFFIXES}.")
  images = [read_image(f) for f in files]
  if len({i.shape for i in images}) != 1:
    raise ValueError(f"{path}: images differ in size {sorted({i.shape for i in images})}; this loader does not "
                     f"resize before batching, store them at one size.")
  return np.stack(images), np.asarray(labels, np.int32)


@functools.partial(jax.jit)
def _predict(model, pixel_values):
  return jnp.argmax(model(pixel_values), axis=-1)


def top1(model, images: np.ndarray, labels: np.ndarray, preprocessor_config: Any,
         batch_size: int = 128) -> dict[str, Any]:
  """Top-1 accuracy of a classifier; images are preprocessed with `deit.preprocess` and the model's config."""
  from gilora_jax.models import deit  # pylint: disable=import-outside-toplevel
  pixels = deit.preprocess(images, preprocessor_config)
  correct = 0
  for i in range(0, len(pixels), batch_size):
    correct += int(np.sum(np.asarray(_predict(model, jnp.asarray(pixels[i:i + batch_size]))) ==
                          labels[i:i + batch_size]))
  return {"top1": correct / len(labels), "images": int(len(labels))}
