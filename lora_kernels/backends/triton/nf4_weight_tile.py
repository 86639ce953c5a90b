"""The base weight W0 of the two GEMMs (forward y, backward dx), dense or NF4.

An NF4 W0 (``lora_kernels.nf4.NF4Weight``, bitsandbytes' layout) is never
dequantized as a whole: each GEMM decodes the W0 tiles of its reduction loop
in registers, through ``load_weight_tile``. Element (n, k) is element
``i = n·K + k`` of the row-major flattening: its 4-bit index is the high
nibble of byte i // 2 for even i, the low one for odd i, its value
``NF4[index] · absmax[i // blocksize]`` in fp32, rounded once to the GEMM's
operand dtype -- the same tile, bit for bit, as ``weight.dequantize(x.dtype)``
would give. Double quantization is undone on the host, once per call
(``NF4Weight.block_absmax``): a small fp32 vector read from cache.

The decode takes the shortest path the weight's shape allows, decided on the
host (``WeightArgs``) and compiled in as constexprs:

- K a multiple of 8 (``NF4_WORDS``): every row starts on a 32-bit word, so
  the packed bytes are an [N, K/8] matrix of int32 words, 8 elements each,
  and a tile's words are loaded as such, contiguous along each row (128-bit
  loads where K/8 is a multiple of 16; cp.async-pipelined like a dense
  tile). Each element is then a rotation and a LOP3 of its word into the
  address of its NF4 value in a 64-byte table, and one load from L1
  (``_NF4_VALUE_ASM``). Other K (odd, or rows starting mid-word): a byte
  gather per element, its nibble chosen by the flat index's parity.
- K a multiple of the blocksize (``NF4_ALIGNED``): a row's K step lies in
  whole blocks (K steps and blocksizes are powers of two: one divides the
  other), so one absmax is loaded per row and block of the step, not per
  element. Else one absmax gather per word (words path: 8 elements never
  straddle a block) or per element.
- Indices in int32 where every element's flat index fits (``NF4_INT32``:
  N·K < 2^31), else int64.

``WeightArgs`` gives a launcher the kernel arguments for either kind, so
the GEMMs stay one kernel each with a ``W_NF4`` constexpr switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...quant.nf4 import NF4_VALUES, NF4Weight
from . import _launch
from ._dot import round_to_operand

# The byte a masked NF4 load reads: index 7 in both nibbles, the code of 0.0,
# so masked elements decode to 0 like a dense tile's masked elements.
_ZERO_CODES = tl.constexpr(0x77)
_ZERO_WORD = tl.constexpr(0x77777777)

# Flat element indices below this fit in int32 (NF4_INT32).
INT32_INDEX_LIMIT = 2**31

_INTERPRETED = tl.constexpr(_launch.INTERPRETED)


@triton.jit
def _index(i, INT32: tl.constexpr):
    """Index tensor ``i`` in the weight's index type: int32 where the host
    found every flat index of the weight below 2^31, else int64."""
    if INT32:
        return i.to(tl.int32)
    else:
        return i.to(tl.int64)


@triton.jit
def row_offsets(n, per_row, INT32: tl.constexpr):
    """Where rows ``n`` of ``per_row`` items start: n · per_row in the
    weight's index type (see ``_index``)."""
    return _index(n, INT32) * per_row


# The NF4 value of element ``shift``: the index in bits [shift, shift + 4)
# of a 32-bit ``word`` of packed bytes, looked up in the 64-byte-aligned
# table at ``code_ptr``: the table address is its base with the index · 4 in
# bits 2..5, two ALU instructions from the word (a rotation and a LOP3), then
# one LDG from L1. Inline PTX also keeps Triton's pipeliner from staging the
# table loads in shared memory, as it did with a tl.load (a store, a barrier
# and a load per element).
_NF4_VALUE_ASM = tl.constexpr(
    "{\n"
    ".reg .b32 c, lo, hi;\n"
    ".reg .b64 a;\n"
    "mov.b64 {lo, hi}, $3;\n"
    "shf.r.wrap.b32 c, $1, $1, $2;\n"
    "lop3.b32 c, c, 0x3C, lo, 0xEA;\n"  # (c & 0x3C) | lo
    "mov.b64 a, {c, hi};\n"
    "ld.global.nc.f32 $0, [a];\n"
    "}"
)


@triton.jit
def _nf4_values(word, shift, code_ptr):
    """The fp32 NF4 values of the 4-bit indices at bits ``shift`` of ``word``."""
    # Rotated right by shift - 2 (mod 32): the index · 4 in bits 2..5.
    rotation = (shift - 2) & 31
    if _INTERPRETED:
        # The same bits as the PTX's, then a gather.
        bits = word.to(tl.uint32, bitcast=True)
        rotated = (bits >> rotation) | (bits << ((32 - rotation) & 31))
        return tl.load(code_ptr + ((rotated & 0x3C) >> 2))
    else:
        return tl.inline_asm_elementwise(
            _NF4_VALUE_ASM,
            "=r,r,r,l",
            [word, rotation, code_ptr],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )


@triton.jit
def _load(pointers, mask, other):
    """tl.load, masked unless ``mask`` is None."""
    if mask is None:
        return tl.load(pointers)
    else:
        return tl.load(pointers, mask=mask, other=other)


@triton.jit
def _decode_nf4_elements(w_ptr, absmax_ptr, code_ptr, n, k, mask, K, BLOCKSIZE, INT32, DTYPE):
    """The NF4 tile of rows ``n`` × columns ``k`` for any K: per element, the
    flat index, a byte gather and an absmax gather (rows may start mid-byte)."""
    flat = row_offsets(n, K, INT32) + _index(k, INT32)
    byte = tl.load(w_ptr + (flat >> 1), mask=mask, other=_ZERO_CODES)
    # The high nibble for an even (first) element of its byte, the low one for an odd.
    index = (byte.to(tl.int32) >> (((flat & 1) ^ 1).to(tl.int32) * 4)) & 0xF
    absmax = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=mask, other=0.0)
    return round_to_operand(tl.load(code_ptr + index) * absmax, DTYPE)


@triton.jit
def _decode_nf4_words(
    w_ptr,
    absmax_ptr,
    code_ptr,
    n,
    mask,
    k_first,
    K,
    row_words,
    BLOCKSIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
    INT32: tl.constexpr,
    COLS: tl.constexpr,
    K_ROWS: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """The NF4 tile of rows ``n`` × the ``COLS`` columns from ``k_first`` (a
    multiple of ``COLS``) of a W0 whose K is a multiple of 8, so that its
    packed bytes are an [N, K/8] matrix of int32 words (``row_words`` = K/8),
    8 elements each, all in one absmax block; columns past K masked
    (``K_ROWS``) or wrapped (else: rows where ``mask`` is false masked), as
    ``load_weight_tile``'s."""
    WORDS: tl.constexpr = COLS // 8
    # Contiguous along a row: row_words (specialised as a multiple of 16
    # where it is one) and the step's first word (a multiple of WORDS) give
    # 128-bit loads.
    word_cols = tl.multiple_of(k_first // 8, WORDS) + tl.arange(0, WORDS)
    # A forward step past K exists only if K is not a multiple of COLS, which
    # it is when aligned to blocks of at least COLS: no mask, no select.
    K_TAIL: tl.constexpr = K_ROWS and not (ALIGNED and COLS <= BLOCKSIZE)
    if K_ROWS:
        word_mask = (word_cols < row_words)[None, :] if K_TAIL else None
    else:
        word_cols = word_cols % row_words
        word_mask = mask[:, None]
    word = _load(
        w_ptr.to(tl.pointer_type(tl.int32))
        + row_offsets(n, row_words, INT32)[:, None]
        + word_cols[None, :],
        word_mask,
        _ZERO_WORD,
    )

    if ALIGNED:
        # A segment per block of the step (one when COLS <= BLOCKSIZE).
        SEGMENTS: tl.constexpr = (COLS + BLOCKSIZE - 1) // BLOCKSIZE
        blocks_per_row = K // BLOCKSIZE
        block = k_first // BLOCKSIZE + tl.arange(0, SEGMENTS)
        if K_ROWS:
            block_mask = (block < blocks_per_row)[None, :] if K_TAIL else None
        else:
            block = block % blocks_per_row
            block_mask = mask[:, None]
        absmax = _load(
            absmax_ptr + row_offsets(n, blocks_per_row, INT32)[:, None] + block[None, :],
            block_mask,
            0.0,
        )
        if SEGMENTS > 1:
            absmax = tl.reshape(
                tl.broadcast_to(absmax[:, :, None], (n.shape[0], SEGMENTS, WORDS // SEGMENTS)),
                (n.shape[0], WORDS),
            )
    else:
        k = k_first + 8 * tl.arange(0, WORDS)
        if K_ROWS:
            element_mask = (k < K)[None, :]
        else:
            k = k % K
            element_mask = mask[:, None]
        flat = row_offsets(n, K, INT32)[:, None] + _index(k, INT32)[None, :]
        absmax = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=element_mask, other=0.0)

    # [rows, WORDS, 8]: element 2j of a word is byte j's high nibble, 2j + 1
    # its low one (byte 0 in the word's low bits). The copies of each word
    # are made by joins, whose new dimension lies within a thread, so that a
    # thread decodes whole words into contiguous elements.
    copies = tl.join(word, word)
    copies = tl.join(copies, copies)
    copies = tl.reshape(tl.join(copies, copies), (n.shape[0], WORDS, 8))
    position = tl.arange(0, 8)
    shift = 8 * (position // 2) + 4 * (1 - position % 2)
    values = _nf4_values(copies, shift[None, None, :], code_ptr)
    w = round_to_operand(values * absmax[:, :, None], DTYPE)
    return tl.reshape(w, (n.shape[0], COLS))


@triton.jit
def _transposed(w):
    t = tl.trans(w)
    if _INTERPRETED:
        # numpy sums the products of a transposed (Fortran-ordered) operand
        # in another order than a C-ordered one's, as dense tiles are:
        # reshaping copies it in C order.
        t = tl.reshape(tl.reshape(t, (t.shape[0] * t.shape[1],)), (t.shape[0], t.shape[1]))
    return t


@triton.jit
def load_weight_tile(
    w_ptr,
    absmax_ptr,
    code_ptr,
    n,
    k,
    k_first,
    mask,
    stride_wn,
    stride_wk,
    K,
    W_NF4: tl.constexpr,
    NF4_BLOCKSIZE: tl.constexpr,
    NF4_WORDS: tl.constexpr,
    NF4_ALIGNED: tl.constexpr,
    NF4_INT32: tl.constexpr,
    DTYPE: tl.constexpr,
    K_ROWS: tl.constexpr,
):
    """The W0 tile of output features ``n`` × input features ``k`` (1-D int64
    index tensors; ``k`` is ``k_first`` + 0, 1, ...), with ``mask`` the 1-D
    mask of the reduction dimension, where the tile is 0. ``K_ROWS``: k is the
    reduction dimension and varies along the tile's rows (a [k, n] tile of
    W0ᵀ, the forward GEMM's; ``n`` all valid rows); else a [n, k] tile of W0
    (dx's, reduced over n; ``k`` wrapped into range).

    Dense (``W_NF4`` false): W0's own elements at ``w_ptr`` with strides
    (``stride_wn``, ``stride_wk``), in W0's dtype. NF4: ``w_ptr`` holds the
    packed bytes, with ``stride_wn`` = K/2 bytes per row when K is even,
    ``absmax_ptr`` the fp32 absmax of each block of ``NF4_BLOCKSIZE``
    elements, ``code_ptr`` the 16 fp32 NF4 values (64 bytes, gathered from
    L1); the decoded tile is in ``DTYPE``, the GEMM's operand dtype.
    """
    if W_NF4:
        # Decoded as a tile of W0, k along its last dimension, so that a
        # row's bytes are adjacent in a warp's loads, and transposed for the
        # forward GEMM (in registers, free).
        if NF4_WORDS:
            w = _decode_nf4_words(
                w_ptr,
                absmax_ptr,
                code_ptr,
                n,
                mask,
                k_first,
                K,
                stride_wn,
                NF4_BLOCKSIZE,
                NF4_ALIGNED,
                NF4_INT32,
                k.shape[0],
                K_ROWS,
                DTYPE,
            )
        else:
            # The mask runs along k (the forward's reduction) or along n (dx's).
            element_mask = mask[None, :] if K_ROWS else mask[:, None]
            w = _decode_nf4_elements(
                w_ptr,
                absmax_ptr,
                code_ptr,
                n[:, None],
                k[None, :],
                element_mask,
                K,
                NF4_BLOCKSIZE,
                NF4_INT32,
                DTYPE,
            )
        if K_ROWS:
            w = _transposed(w)
        return w
    elif K_ROWS:  # a dense W0ᵀ tile, [k, n], loaded as such: no transpose
        return tl.load(
            w_ptr + k[:, None] * stride_wk + n[None, :] * stride_wn, mask=mask[:, None], other=0.0
        )
    else:
        return tl.load(
            w_ptr + n[:, None] * stride_wn + k[None, :] * stride_wk, mask=mask[:, None], other=0.0
        )


# The NF4 table per device, created once: a per-call copy would be a host →
# device transfer in every launch. Fake tensors (torch.compile's tracing, the
# kernel report) are not kept, so they never reach a real launch.
_TABLES: dict[torch.device, torch.Tensor] = {}


def nf4_table(device: torch.device) -> torch.Tensor:
    """The 16 NF4 values as an fp32 tensor on ``device``, 64-byte aligned: the
    decode adds index · 4 to the low bits of its address (``_NF4_VALUE_ASM``)."""
    table = _TABLES.get(device)
    if table is None:
        from torch._subclasses.fake_tensor import is_fake

        values = torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
        if is_fake(values):
            return values
        buffer = torch.empty(32, dtype=torch.float32, device=device)
        start = (-buffer.data_ptr() % 64) // 4
        table = buffer[start : start + 16].copy_(values)
        _TABLES[device] = table
    return table


def _aligned_to_words(packed: torch.Tensor) -> bool:
    """Whether ``packed`` starts on a 4-byte boundary (fake tensors, which
    have no address, stand for a fresh allocation: aligned)."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(packed) or packed.data_ptr() % 4 == 0


@dataclass(frozen=True)
class WeightArgs:
    """The W0 arguments of a GEMM kernel: ``data`` (W0, or its packed NF4
    bytes) with its strides (NF4: K/2 bytes per row when K is even), the NF4
    block absmax and table (placeholders, never read, for a dense W0), the
    decode's constexprs (``constexprs``), and ``dtype``, that of the tiles the
    kernel multiplies (the compute dtype for NF4), which sets the dot's
    precision."""

    data: torch.Tensor
    stride_n: int
    stride_k: int
    absmax: torch.Tensor
    table: torch.Tensor
    nf4: bool
    blocksize: int
    dtype: torch.dtype
    words: bool = False
    aligned: bool = False
    int32: bool = False

    @staticmethod
    def of(weight: torch.Tensor | NF4Weight, in_features: int, dtype: torch.dtype) -> WeightArgs:
        """For a dense ``weight`` or an ``NF4Weight`` of ``in_features`` columns
        multiplied in ``dtype`` (x's)."""
        if not isinstance(weight, NF4Weight):
            return WeightArgs(
                weight, weight.stride(0), weight.stride(1), weight, weight, False, 1, weight.dtype
            )
        if weight.in_features != in_features:
            raise ValueError(
                f"the NF4 weight has {weight.in_features} input features, x has {in_features}"
            )
        K = in_features
        # The kernels index both as flat arrays.
        packed, absmax = weight.packed.contiguous(), weight.block_absmax().contiguous()
        # 32-bit words of packed bytes need a 4-byte aligned start: a view at an
        # odd storage offset (a flattened FSDP parameter) takes the byte path.
        words = K % 8 == 0 and _aligned_to_words(packed)
        return WeightArgs(
            packed,
            K // 8 if words else 0,
            1 if words else 0,
            absmax,
            nf4_table(weight.device),
            True,
            weight.blocksize,
            dtype,
            words,
            K % weight.blocksize == 0,
            weight.out_features * K < INT32_INDEX_LIMIT,
        )

    def constexprs(self) -> dict:
        """The decode's constexpr kernel arguments."""
        return {
            "W_NF4": self.nf4,
            "NF4_BLOCKSIZE": self.blocksize,
            "NF4_WORDS": self.words,
            "NF4_ALIGNED": self.aligned,
            "NF4_INT32": self.int32,
        }
