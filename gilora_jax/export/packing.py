"""Bit packing of b-bit codes into int32 words, as GPTQ and compressed-tensors store them (NumPy only, pure).

One layout serves both formats (shared/EXPORT_FORMATS.md §2.2, §3.2): along the packed axis, every 32
consecutive codes occupy exactly `b` little-endian words, code `i` of a block at global bit `i·b` (a code that
crosses a word boundary is split: its low bits end one word, its high bits start the next). For b = 2, 4, 8 this
is the familiar "`32/b` codes per word, lowest first"; for b = 3 it is GPTQ's continuous "10 | 1 | 10 | 1 | 10"
bitstream. The axis is zero-padded to a multiple of 32 and the words truncated to `⌈n·b/32⌉`.

  pack(values, bits)      (..., n) integers in [0, 2^b) -> (..., ⌈n·b/32⌉) int32, along the last axis
  unpack(words, bits, n)  the inverse, written independently (a bit stream from `np.unpackbits`), so that an
                          export's self-check does not decode with the code that encoded

GPTQ zero points (§2.3): v1 (`checkpoint_format: "gptq"`) stores `z − 1`, v2 (`"gptq_v2"`) stores `z`.
`v1_zeros` refuses a zero of 0 (unrepresentable); `decode_v1_zeros` undoes both the field-wise writers (ours,
AutoGPTQ's for z ≥ 1) and GPTQModel's packed-word subtract.
"""
# Math-style names follow the formats.  pylint: disable=invalid-name
from __future__ import annotations

import numpy as np

BLOCK = 32  # codes per packing block


def packed_words(n: int, bits: int) -> int:
  """Words that `n` codes of `bits` bits occupy: ⌈n·b/32⌉."""
  return -(-n * bits // 32)


def _check_bits(bits: int) -> None:
  if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
    raise ValueError(f"bits={bits!r}: packing supports 1..8 bits per code.")


def pack(values: np.ndarray, bits: int) -> np.ndarray:
  """(..., n) codes in [0, 2^bits) -> (..., ⌈n·bits/32⌉) int32 words, packed along the last axis.

  Example (codes 1..8 in 4 bits make one word, lowest code in the lowest nibble):
    >>> hex(int(pack(np.arange(1, 9), 4).view(np.uint32)[0]))
    '0x87654321'
  """
  _check_bits(bits)
  v = np.asarray(values)
  if v.size and (v.min() < 0 or v.max() >= 1 << bits):
    raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing; got [{v.min()}, {v.max()}].")
  n = v.shape[-1]
  pad = -n % BLOCK
  v = np.pad(v.astype(np.uint64), [(0, 0)] * (v.ndim - 1) + [(0, pad)])
  v = v.reshape(v.shape[:-1] + ((n + pad) // BLOCK, BLOCK))  # (..., blocks, 32)
  out = np.zeros(v.shape[:-1] + (bits,), np.uint64)  # (..., blocks, b) words of each block
  for i in range(BLOCK):
    w, off = divmod(i * bits, 32)
    out[..., w] |= (v[..., i] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
    if off + bits > 32:  # the code's high bits start the next word
      out[..., w + 1] |= v[..., i] >> np.uint64(32 - off)
  out = out.reshape(out.shape[:-2] + (-1,))[..., :packed_words(n, bits)]
  return out.astype(np.uint32).view(np.int32)


def unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
  """(..., W) int32 words -> (..., n) uint8 codes: the inverse of `pack` (via the little-endian bit stream)."""
  _check_bits(bits)
  words = np.asarray(words)
  if words.dtype not in (np.int32, np.uint32):
    raise ValueError(f"packed words must be int32 (or uint32); got {words.dtype}.")
  if words.shape[-1] != packed_words(n, bits):
    raise ValueError(f"{n} codes of {bits} bits need {packed_words(n, bits)} words along the packed axis; got "
                     f"{words.shape[-1]} (the wrong bit width, or a reader of another packing).")
  le = np.ascontiguousarray(words).astype("<u4", copy=False).view(np.uint8)  # little-endian bytes, word by word
  stream = np.unpackbits(le, axis=-1, bitorder="little")[..., :n * bits]  # bit j of the stream = global bit j
  fields = stream.reshape(stream.shape[:-1] + (n, bits)).astype(np.uint16)
  return (fields << np.arange(bits, dtype=np.uint16)).sum(axis=-1).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ GPTQ zero points

V1, V2 = "gptq", "gptq_v2"  # checkpoint_format values


def v1_zeros(zeros: np.ndarray) -> np.ndarray:
  """Integer zero points -> what a v1 checkpoint stores (`z − 1`); raises when some z is 0 (v1 cannot hold it)."""
  z = np.asarray(zeros)
  bad = int(np.count_nonzero(z < 1))
  if bad:
    raise ValueError(f"{bad} of {z.size} zero points are 0, which GPTQ v1 (checkpoint_format 'gptq', stored z − 1) "
                     f"cannot represent for field-wise readers (vLLM gptq_gemm, exllama); write v2 ('gptq_v2'), the "
                     f"default for asymmetric grids.")
  return z - 1


def decode_v1_zeros(qzeros: np.ndarray, bits: int, n: int) -> np.ndarray:
  """A v1 `qzeros` tensor (..., ⌈n·b/32⌉) -> the (..., n) true zero points.

  For 2/4/8 bits this adds 1 to every field as one word add (GPTQModel's reader), which undoes both a field-wise
  `z − 1` write and GPTQModel's packed-word subtract (the borrows it made when some z was 0 come back as carries);
  for 3 bits, fields are decoded as `(stored + 1) mod 2^b`, the inverse of GPTQModel's `(z − 1) & 7` repack. For
  every zero ≥ 1 both equal the field-wise `stored + 1` of vLLM and AutoGPTQ.
  """
  words = np.asarray(qzeros).view(np.uint32)
  if 32 % bits == 0:
    ones = sum(1 << (bits * k) for k in range(32 // bits))  # 0x11111111 at 4 bits, 0x55555555 at 2, ...
    return unpack((words.astype(np.uint64) + ones).astype(np.uint32), bits, n)  # mod 2^32, as GPTQModel does
  return ((unpack(words, bits, n).astype(np.uint16) + 1) % (1 << bits)).astype(np.uint8)
