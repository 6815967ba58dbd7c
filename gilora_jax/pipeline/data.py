"""Reading what a user points the pipeline at: texts, tokenizers, images, arrays; and the calibration sets.

Every reader fails with one line that names the file and the fix (a binary file passed as text, a folder without
a tokenizer, an image Pillow cannot decode, an .npz of pickled objects: gilora never unpickles a file).

Texts: a UTF-8 file, or a local HF `datasets` folder (all rows' "text" joined by "\\n\\n", as the GPTQ reference
joins wikitext2; needs the `datasets` package).

Images (`load_images`):
  * an .npz with `images` (N, H, W[, C]) uint8 and `labels` (N,) int (also `calib_images`/`calib_labels`);
  * a folder with one subfolder per class (names that are all integers are the labels, otherwise the sorted
    names are labels 0..K−1: the ImageNet layout), or a flat folder with `labels.txt` (one integer per line, in
    sorted file order);
  * image files Pillow decodes (JPEG, PNG, BMP, WebP, TIFF, PPM/PGM, ...) and .npy arrays (H, W[, C]) uint8.
  Grey images are repeated to 3 channels, alpha is dropped.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Sequence

import numpy as np

from gilora_jax.pipeline import calib as calib_lib

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif", ".npy")


# ------------------------------------------------------------------------------------------------ text


def load_text(path: str | os.PathLike, what: str = "text") -> str:
  """The text of a local UTF-8 file or HF datasets folder (module docstring); `what` names it in errors."""
  path = os.fspath(path)
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise ValueError(f"{path} is not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset {e.start}); pass a "
                       f"plain text file as the {what}.") from None
    if not text.strip():
      raise ValueError(f"{path} is empty; the {what} needs some text.")
    return text
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist; pass a local text file (or a local HF datasets folder) as the "
                            f"{what}.")
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError(f"{path} is a folder; reading a HF datasets folder (arrow/parquet) needs the `datasets` "
                     f"package, which is not installed. Pass a plain text file instead.") from None
  files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
  parquet = [f for f in files if f.endswith(".parquet")]
  if parquet:
    ds = datasets.load_dataset("parquet", data_files=parquet, split="train")
  else:
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
      ds = ds["test"] if "test" in ds else ds[next(iter(ds))]
  if "text" not in ds.column_names:
    raise ValueError(f"{path}: the dataset has columns {ds.column_names}, no 'text'.")
  return "\n\n".join(ds["text"])


def load_tokenizer(folder: str | os.PathLike):
  """The transformers tokenizer saved in a local model folder, or a clear error when there is none."""
  folder = os.fspath(folder)
  if not any(os.path.isfile(os.path.join(folder, f)) for f in
             ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
    raise FileNotFoundError(f"{folder} has no tokenizer (tokenizer.json, tokenizer_config.json); copy the tokenizer "
                            f"files of the original model into it.")
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  try:
    return AutoTokenizer.from_pretrained(folder)
  except (OSError, ValueError, ImportError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{folder}: its tokenizer could not be loaded ({first[:200]}); check the tokenizer files "
                     f"(tokenizer.json is the one transformers reads without extra packages).") from None


def tokenize(tokenizer, text: str) -> np.ndarray:
  """Token ids of the whole text, (n,) int32, as the reference: one call, the tokenizer's default specials."""
  return np.asarray(tokenizer(text)["input_ids"], np.int32).reshape(-1)


def lm_calibration(tokenizer, text: str, nsamples: int, seqlen: int, batch_size: int,
                   seed: int) -> list[calib_lib.CalibBatch]:
  """GPTQ-style calibration: `nsamples` random `seqlen`-token windows of the text, in batches."""
  return calib_lib.batches(calib_lib.token_windows(tokenize(tokenizer, text), nsamples, seqlen, seed), batch_size)


# ------------------------------------------------------------------------------------------------ arrays


def load_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
  """Every array of an .npz, never unpickling (`allow_pickle=False`); one clear line for any unreadable file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist; pass {what}.")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"PK\x03\x04":  # every .npz is a zip archive
    raise ValueError(f"{path} is not a readable .npz (no zip archive header); pass {what}.")
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except ValueError as e:
    if "allow_pickle" in str(e) or "Object arrays" in str(e):
      raise ValueError(f"{path} holds pickled (object) arrays, and gilora never unpickles a file; save plain numeric "
                       f"arrays (np.savez) as {what}.") from None
    raise ValueError(f"{path} is not a readable .npz ({e}); pass {what}.") from None
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e}); pass {what}.") from None


# ------------------------------------------------------------------------------------------------ images


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


def read_image(path: str) -> np.ndarray:
  """One image file as (H, W, 3) uint8 (Pillow; .npy arrays as stored)."""
  if path.lower().endswith(".npy"):
    try:
      img = np.load(path, allow_pickle=False)
    except ValueError as e:
      raise ValueError(f"{path} is not a plain numeric .npy image ({e}).") from None
    return to_rgb(img, path)
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), np.uint8)
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise ValueError(f"{path} is not an image Pillow can decode ({type(e).__name__}: {e}); remove it from the folder "
                     f"or convert it.") from None


def load_images(path: str | os.PathLike, split: str | None = None) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
  """(images, labels (N,) int32) from an .npz or a folder (module docstring): images (N, H, W, 3) uint8 when they
  share one size, else a list of (H, W, 3) arrays (`deit.preprocess` resizes either).

  `split="calib"` reads `calib_images`/`calib_labels` from an .npz that has them.
  """
  path = os.fspath(path)
  if os.path.isfile(path) and not path.lower().endswith(".npz"):
    raise ValueError(f"{path} is a file but not an .npz; pass an image folder (class subfolders, or labels.txt) or an "
                     f".npz with arrays 'images' and 'labels'.")
  if os.path.isfile(path):
    z = load_npz(path, "an .npz with arrays 'images' (N, H, W[, C]) uint8 and 'labels' (N,)")
    prefix = "calib_" if split == "calib" and "calib_images" in z else ""
    if f"{prefix}images" not in z or f"{prefix}labels" not in z:
      raise ValueError(f"{path}: an image .npz needs arrays 'images' and 'labels'; it has {sorted(z)}.")
    images, labels = z[f"{prefix}images"], z[f"{prefix}labels"]
    if images.ndim == 3:
      images = images[..., None]
    if len(images) == 0:
      raise ValueError(f"{path}: '{prefix}images' holds no images.")
    if len(labels) != len(images):
      raise ValueError(f"{path}: '{prefix}images' holds {len(images)} images but '{prefix}labels' {len(labels)} "
                       f"labels; save one label per image.")
    return np.stack([to_rgb(i, path) for i in images]), labels.astype(np.int32)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist; pass an image folder or an .npz with images and labels.")
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
      raise ValueError(f"{path}: no class subfolders and no labels.txt; see gilora_jax.pipeline.data for the "
                       f"layouts.")
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.lower().endswith(IMAGE_SUFFIXES)]
    try:
      with open(label_file, encoding="utf-8") as f:
        labels = [int(line) for line in f.read().split()]
    except (ValueError, UnicodeDecodeError):
      raise ValueError(f"{label_file} must hold one integer label per line.") from None
    if len(labels) != len(files):
      raise ValueError(f"{label_file} has {len(labels)} labels for {len(files)} images.")
  if not files:
    raise ValueError(f"{path}: no images (files ending in {', '.join(IMAGE_SUFFIXES)}).")
  images = [read_image(f) for f in files]
  if len({i.shape for i in images}) == 1:
    return np.stack(images), np.asarray(labels, np.int32)
  return images, np.asarray(labels, np.int32)


def vision_calibration(preprocessor: Any, images: Sequence[np.ndarray], nsamples: int, batch_size: int,
                       seed: int) -> list[calib_lib.CalibBatch]:
  """`nsamples` images drawn at random (seeded) and preprocessed (`deit.preprocess` with the model folder's
  preprocessor config). The caller caps `nsamples` at the number of images (and says so)."""
  from gilora_jax.models import deit  # pylint: disable=import-outside-toplevel
  idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:nsamples])
  picked = images[idx] if isinstance(images, np.ndarray) else [images[i] for i in idx]
  return calib_lib.batches(deit.preprocess(picked, preprocessor), batch_size)


def default_calib(folder: str, lm: bool) -> str:
  """calib.txt (LM) or the .npz holding the calibration images (vision) beside the model, else a clear error."""
  if lm:
    path = os.path.join(folder, "calib.txt")
    if os.path.isfile(path):
      return path
    raise FileNotFoundError(f"no --calib given and {folder} has no calib.txt; pass --calib TEXT_FILE.")
  for name in sorted(os.listdir(folder)):
    if name.endswith(".npz"):
      return os.path.join(folder, name)
  raise FileNotFoundError(f"no --calib given and {folder} has no image .npz; pass --calib IMAGE_DIR_OR_NPZ.")
