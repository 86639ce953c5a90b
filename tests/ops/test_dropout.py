"""The shared Philox4x32-10 dropout mask of lora_kernels.backends.torch.dropout
(defined in docs/architecture.md, "The op contract"), checked against a fixed
test vector and bit-exactly against Triton's own ``tl.randint4x`` (interpreted
on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch

from lora_kernels.backends.torch.dropout import (
    dropout_keep_mask,
    dropout_random_words,
    dropout_threshold,
    philox4x32,
)


def _as_int32(words: torch.Tensor) -> list[int]:
    return [w - 2**32 if w >= 2**31 else w for w in words.tolist()]


def test_philox_design_test_vector():
    seed = torch.tensor(123456789012345)
    c0 = torch.tensor([0, 1])
    words = torch.stack(philox4x32(seed, c0, torch.zeros_like(c0)), dim=-1)
    assert _as_int32(words[0]) == [-1763668274, 740546374, -1975667325, -972061508]
    assert _as_int32(words[1]) == [836315455, 1705091687, 1791118618, 254873946]


def test_threshold_is_floor_of_p_times_2_pow_32():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**31
    assert dropout_threshold(0.1) == 429496729
    assert dropout_threshold(1 - 2**-40) == 2**32 - 1


def test_mask_layout_and_rate():
    seed = torch.tensor([42])
    words = dropout_random_words(seed, 4 * 7 + 2)
    # Element i takes word (i & 3) of the Philox block i >> 2.
    block3 = torch.stack(philox4x32(seed.reshape(()), torch.tensor(3), torch.tensor(0)))
    assert torch.equal(words[12:16], block3)
    mask = dropout_keep_mask(seed, 200, 300, 0.25)
    assert mask.shape == (200, 300)
    assert abs(mask.double().mean().item() - 0.75) < 0.01
    assert dropout_keep_mask(seed, 3, 5, 0.0).all()


try:
    import triton
    import triton.language as tl
except ImportError:  # the reference tests above run without triton
    triton = None


if triton is not None:

    @triton.jit
    def _randint4x_kernel(seed_ptr, out_ptr, n_blocks, base_hi, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr)
        counter = offs.to(tl.int64) + (base_hi.to(tl.int64) << 32)
        c0, c1, c2, c3 = tl.randint4x(seed, counter)
        mask = offs < n_blocks
        tl.store(out_ptr + offs * 4 + 0, c0, mask=mask)
        tl.store(out_ptr + offs * 4 + 1, c1, mask=mask)
        tl.store(out_ptr + offs * 4 + 2, c2, mask=mask)
        tl.store(out_ptr + offs * 4 + 3, c3, mask=mask)


@pytest.mark.skipif(triton is None, reason="triton is not installed")
@pytest.mark.triton
@pytest.mark.parametrize("seed", [0, 123456789012345, 2**63 - 2])
@pytest.mark.parametrize("base_hi", [0, 5], ids=["counter<2^32", "counter>=2^32"])
def test_reference_equals_triton_randint4x(seed, base_hi):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_blocks = 100
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    out = torch.empty(n_blocks * 4, dtype=torch.int32, device=device)
    _randint4x_kernel[(triton.cdiv(n_blocks, 64),)](seed_t, out, n_blocks, base_hi, BLOCK=64)
    counters = torch.arange(n_blocks, dtype=torch.int64, device=device) + (base_hi << 32)
    expected = torch.stack(
        philox4x32(seed_t.reshape(()), counters & 0xFFFFFFFF, counters >> 32), dim=-1
    ).reshape(-1)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, expected)
