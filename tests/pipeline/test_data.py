"""Readers: texts (UTF-8 files, datasets folders), images through Pillow (files written by an independent PNG
encoder, PPM/PGM, .npy, class folders, labels.txt), arrays never unpickled."""
import struct
import zlib

import numpy as np
import pytest

from gilora_jax.pipeline import data


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


def test_images_of_different_sizes_come_back_as_a_list(rng, tmp_path):
  """An ImageNet-style folder holds images of many sizes: they are read, and deit.preprocess resizes them."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  d = tmp_path / "classes" / "cat"
  d.mkdir(parents=True)
  for i, (h, w) in enumerate(((12, 9), (7, 7), (20, 31))):
    Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(d / f"{i}.jpg", quality=95)
  images, labels = data.load_images(tmp_path / "classes")
  assert isinstance(images, list) and [i.shape for i in images] == [(12, 9, 3), (7, 7, 3), (20, 31, 3)]
  assert labels.tolist() == [0, 0, 0]
  (d / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="broken.jpg is not an image Pillow can decode"):
    data.load_images(tmp_path / "classes")


def test_text_readers_name_the_file(tmp_path):
  (tmp_path / "bin.txt").write_bytes(b"ok\xff\xfe")
  with pytest.raises(ValueError, match="bin.txt is not a UTF-8 text file .byte 0xff at offset 2."):
    data.load_text(tmp_path / "bin.txt")
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(ValueError, match="empty.txt is empty"):
    data.load_text(tmp_path / "empty.txt")
