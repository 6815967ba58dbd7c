"""The int32 bit packing shared by GPTQ and compressed-tensors: inverses, golden words, the 3-bit layout, zeros."""
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized import helpers as ct_helpers

from gilora_jax.export import packing


def words(a):
  return [hex(int(w)) for w in np.asarray(a).view(np.uint32).ravel()]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 64, 96, 7, 45, 100])  # multiples of 32 and padded lengths
def test_unpack_inverts_pack(bits, n):
  rng = np.random.default_rng(bits * 1000 + n)
  codes = rng.integers(0, 1 << bits, size=(5, n))
  packed = packing.pack(codes, bits)
  assert packed.dtype == np.int32 and packed.shape == (5, -(-n * bits // 32))
  np.testing.assert_array_equal(packing.unpack(packed, bits, n), codes)


def test_golden_words():
  assert words(packing.pack(np.arange(1, 9), 4)) == ["0x87654321"]
  assert int(packing.pack(np.arange(1, 9), 4)[0]) == -2023406815
  sym = {b: np.full(32, 1 << (b - 1)) for b in (2, 3, 4, 8)}  # symmetric zero points 2^(b-1) over 32 columns
  v1 = {b: words(packing.pack(packing.v1_zeros(z), b)) for b, z in sym.items()}
  v2 = {b: words(packing.pack(z, b)) for b, z in sym.items()}
  assert v1[2] == ["0x55555555"] * 2 and v1[4] == ["0x77777777"] * 4 and v1[8] == ["0x7f7f7f7f"] * 8
  assert v1[3] == ["0xdb6db6db", "0xb6db6db6", "0x6db6db6d"]
  assert v2[2] == ["0xaaaaaaaa"] * 2 and v2[4] == ["0x88888888"] * 4 and v2[8] == ["0x80808080"] * 8
  assert v2[3] == ["0x24924924", "0x49249249", "0x92492492"]


def test_three_bit_layout_is_the_10_1_10_1_10_bitstream():
  rng = np.random.default_rng(0)
  c = rng.integers(0, 8, size=32)
  w = packing.pack(c, 3).view(np.uint32).astype(np.int64)
  assert w.shape == (3,)
  for i in range(10):  # word 0: codes 0-9 at 0, 3, ..., 27; low 2 bits of code 10 at bits 30-31
    assert (w[0] >> (3 * i)) & 7 == c[i]
    assert (w[1] >> (3 * i + 1)) & 7 == c[11 + i]  # word 1: codes 11-20 at 1, 4, ..., 28
    assert (w[2] >> (3 * i + 2)) & 7 == c[22 + i]  # word 2: codes 22-31 at 2, 5, ..., 29
  assert (w[0] >> 30) | ((w[1] & 1) << 2) == c[10]  # bit 2 of code 10 at word 1 bit 0
  assert (w[1] >> 31) | ((w[2] & 3) << 1) == c[21]  # bits 1-2 of code 21 at word 2 bits 0-1


def test_pack_refuses_out_of_range_codes_and_unpack_wrong_widths():
  with pytest.raises(ValueError, match=r"\[0, 7\]"):
    packing.pack(np.array([8]), 3)
  with pytest.raises(ValueError, match="need 3 words"):
    packing.unpack(np.zeros(4, np.int32), 3, 32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_zero_decoders_agree_and_v1_refuses_zero(bits):
  rng = np.random.default_rng(bits)
  z = rng.integers(1, 1 << bits, size=(3, 64))  # every z >= 1: v1 can hold it
  stored = packing.pack(packing.v1_zeros(z), bits)
  fieldwise = packing.unpack(stored, bits, 64).astype(int) + 1  # vLLM's and AutoGPTQ's rule
  np.testing.assert_array_equal(fieldwise, z)
  np.testing.assert_array_equal(packing.decode_v1_zeros(stored, bits, 64), z)  # GPTQModel's word add
  np.testing.assert_array_equal(packing.unpack(packing.pack(z, bits), bits, 64), z)  # v2 stores z itself
  z[1, 5] = 0
  with pytest.raises(ValueError, match="1 of 192 zero points are 0"):
    packing.v1_zeros(z)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_decoder_undoes_gptqmodels_word_subtract(bits):
  """GPTQModel writes asymmetric v1 by subtracting 0x11..1 from each packed word (borrowing across fields where
  z = 0); its reader's word add, which decode_v1_zeros does, gives the zeros back exactly."""
  z = np.random.default_rng(0).integers(0, 1 << bits, size=(2, 32))
  z[0, :3] = 0
  ones = sum(1 << (bits * k) for k in range(32 // bits))
  v2 = packing.pack(z, bits).view(np.uint32).astype(np.int64)
  v1 = ((v2 - ones) % (1 << 32)).astype(np.uint32).view(np.int32)
  np.testing.assert_array_equal(packing.decode_v1_zeros(v1, bits, 32), z)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_the_compressed_tensors_packer(bits):
  codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(64, 96))  # C (d_in, d_out)
  signed = torch.tensor(codes.T - (1 << (bits - 1)), dtype=torch.int8)  # CT packs q − 2^(b−1) of (d_out, d_in)
  theirs = ct_helpers.pack_to_int32(signed, bits).numpy()
  weight_packed = packing.pack(codes.T, bits)  # (d_out, ⌈d_in·b/32⌉)
  np.testing.assert_array_equal(weight_packed, theirs)
  zp = np.random.default_rng(1).integers(0, 1 << bits, size=(96, 2))  # Zᵀ (d_out, G), packed along d_out
  theirs_zp = ct_helpers.pack_to_int32(torch.tensor(zp - (1 << (bits - 1)), dtype=torch.int8), bits, packed_dim=0)
  np.testing.assert_array_equal(packing.pack(zp.T, bits).T, theirs_zp.numpy())
