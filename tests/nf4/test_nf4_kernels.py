"""The extension's NF4 ops (lora_kernels.backends.extension_nf4): nf4_dequantize is bit
for bit NF4Weight.dequantize, nf4_linear_small_m matches a float64 oracle
like the dense path does, both pass opcheck, bad inputs fail clearly, and on
a GPU the CUDA kernels agree with the CPU ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_kernels.backends import extension, extension_nf4
from lora_kernels.quant.nf4 import BLOCKSIZES, NF4_VALUES, NF4Weight, quantize_nf4

from lora_testing import assert_matches_oracle

pytestmark = pytest.mark.skipif(
    not extension_nf4.is_available("cpu"), reason="lora_kernels._C is built without the NF4 ops"
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ops = torch.ops.lora_kernels


def _weight(rows: int, cols: int, blocksize: int = 64, double_quant: bool = False, device="cpu"):
    return quantize_nf4(torch.randn(rows, cols, device=device), blocksize, double_quant)


def _raw_weight(rows: int, cols: int, blocksize: int, absmax: torch.Tensor | None = None):
    """Random codes (every nibble, the padding one too) and absmax: exercises
    codes that quantization of a smooth weight rarely produces."""
    numel = rows * cols
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8)
    if absmax is None:
        absmax = torch.rand(-(-numel // blocksize)) * 3
    return NF4Weight(packed, absmax, blocksize, (rows, cols), torch.float32)


# ---------------------------------------------------------------------------
# nf4_dequantize


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["fp32-absmax", "double-quant"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 65), (64, 96), (33, 1000)])
def test_dequantize_bit_identical(shape, blocksize, double_quant):
    weight = _weight(*shape, blocksize, double_quant)
    for dtype in DTYPES:
        got = extension_nf4.dequantize(weight, dtype)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, weight.dequantize(dtype)), (shape, blocksize, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_every_code_and_subnormals(dtype):
    # All 256 bytes in order, one block of absmax 1 (the table itself), then
    # blocks whose products are fp32 (and bf16) subnormals: kept, as torch keeps them.
    packed = torch.arange(256, dtype=torch.uint8).repeat(2).reshape(-1, 1)
    absmax = torch.tensor([1.0, 3.0e-39, 1.0e-45, 2.5e-38] * 8)
    weight = NF4Weight(packed, absmax, 32, (16, 64), torch.float32)
    got = extension_nf4.dequantize(weight, dtype)
    assert torch.equal(got, weight.dequantize(dtype))
    codes = got.reshape(-1)[:32].float()
    table = torch.tensor(NF4_VALUES).to(dtype).float()
    assert torch.equal(codes[0::2], table.repeat_interleave(16)[:16])
    assert torch.equal(codes[1::2], table[:16])


def test_dequantize_random_codes_and_default_dtype():
    weight = _raw_weight(7, 45, 32)
    assert torch.equal(extension_nf4.dequantize(weight), weight.dequantize())
    assert torch.equal(
        extension_nf4.dequantize(weight, torch.bfloat16), weight.dequantize(torch.bfloat16)
    )


def test_dequantize_empty():
    weight = NF4Weight(
        torch.empty(0, 1, dtype=torch.uint8), torch.empty(0), 64, (0, 5), torch.float16
    )
    assert extension_nf4.dequantize(weight).shape == (0, 5)


def test_dequantize_python_errors():
    weight = _weight(4, 8)
    with pytest.raises(TypeError, match="NF4Weight"):
        extension_nf4.dequantize(torch.zeros(4, 8))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got float64"):
        extension_nf4.dequantize(weight, torch.float64)


def _op_args(rows=6, cols=10, blocksize=32):
    weight = _weight(rows, cols, blocksize)
    return weight.packed, weight.absmax, blocksize, rows, cols


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: (a[0].float(), *a[1:]), "packed must be uint8"),
        (lambda a: (a[0].reshape(-1, 2).t(), *a[1:]), "packed must be contiguous"),
        (lambda a: (a[0][:-1], *a[1:]), "packed holds 29 bytes; a 6 x 10 NF4 weight needs 30"),
        (lambda a: (a[0], a[1].to(torch.uint8), *a[2:]), "absmax must be float32"),
        (lambda a: (a[0], a[1][:1], *a[2:]), "absmax holds 1 values; .* needs 2"),
        (lambda a: (a[0], torch.stack([a[1], a[1]], 1)[:, 0], *a[2:]), "absmax must be contiguous"),
        (lambda a: (*a[:2], 48, *a[3:]), "blocksize must be one of 32, 64"),
        (lambda a: (*a[:3], -1, a[4]), "rows >= 0 and cols >= 0"),
    ],
)
def test_dequantize_op_rejects_bad_arguments(mutate, message):
    args = mutate(_op_args())
    with pytest.raises(RuntimeError, match=message):
        ops.nf4_dequantize(*args, torch.float16)


def test_dequantize_op_rejects_output_dtype():
    with pytest.raises(RuntimeError, match="returns float32, float16 or bfloat16, got Double"):
        ops.nf4_dequantize(*_op_args(), torch.float64)


# ---------------------------------------------------------------------------
# nf4_linear_small_m


def _check_linear(x, weight, bias, context=""):
    got = extension_nf4.linear_small_m(x, weight, bias)
    dense = weight.dequantize(x.dtype)
    baseline = F.linear(x, dense, bias)
    oracle = F.linear(x.double(), dense.double(), None if bias is None else bias.double())
    assert got.dtype == x.dtype and got.shape == (x.shape[0], weight.out_features)
    assert_matches_oracle({"y": got}, {"y": baseline}, {"y": oracle}, x.dtype, context)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_every_m(dtype):
    weight = _weight(37, 75, 64, double_quant=True)
    for M in range(1, extension_nf4.SMALL_M_MAX + 1):
        x = torch.randn(M, 75, dtype=dtype)
        bias = torch.randn(37, dtype=dtype) if M % 2 else None
        _check_linear(x, weight, bias, f"M={M}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
@pytest.mark.parametrize(("N", "K"), [(1, 1), (5, 3), (17, 301), (130, 64), (3, 4100)])
def test_linear_shapes(N, K, blocksize, dtype):
    weight = _weight(N, K, blocksize)
    x = torch.randn(5, K, dtype=dtype)
    _check_linear(x, weight, torch.randn(N, dtype=dtype), f"N={N} K={K}")


def test_linear_strided_x_and_bias():
    weight = _weight(20, 48)
    x = torch.randn(48, 3).t()
    bias = torch.randn(40)[::2]
    _check_linear(x, weight, bias)


def test_linear_zero_rows_and_zero_features():
    weight = _weight(9, 16)
    y = extension_nf4.linear_small_m(torch.randn(0, 16), weight, torch.randn(9))
    assert y.shape == (0, 9)
    empty = NF4Weight(
        torch.empty(0, 1, dtype=torch.uint8), torch.empty(0), 64, (4, 0), torch.float32
    )
    bias = torch.randn(4)
    assert torch.equal(
        extension_nf4.linear_small_m(torch.randn(3, 0), empty, bias), bias.expand(3, 4)
    )
    assert torch.equal(extension_nf4.linear_small_m(torch.randn(3, 0), empty), torch.zeros(3, 4))


def test_linear_python_errors():
    weight = _weight(6, 8)
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="NF4Weight"):
        extension_nf4.linear_small_m(x, torch.randn(6, 8))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        extension_nf4.linear_small_m([[1.0] * 8], weight)
    with pytest.raises(ValueError, match="2-D"):
        extension_nf4.linear_small_m(x[0], weight)
    with pytest.raises(ValueError, match="at most 16 rows of x, got 17"):
        extension_nf4.linear_small_m(torch.randn(17, 8), weight)
    with pytest.raises(ValueError, match="x has 7 features"):
        extension_nf4.linear_small_m(torch.randn(2, 7), weight)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got float64"):
        extension_nf4.linear_small_m(x.double(), weight)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        extension_nf4.linear_small_m(x, weight, torch.randn(5))
    with pytest.raises(TypeError, match="bias must be float32"):
        extension_nf4.linear_small_m(x, weight, torch.randn(6, dtype=torch.float16))


def test_linear_op_rejects_bad_arguments():
    weight = _weight(6, 8)
    args = (weight.packed, weight.absmax, 64, 6)
    with pytest.raises(RuntimeError, match="takes at most 16 rows of x, got 17"):
        ops.nf4_linear_small_m(torch.randn(17, 8), *args, None)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.nf4_linear_small_m(torch.randn(8), *args, None)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        ops.nf4_linear_small_m(torch.randn(2, 8, dtype=torch.float64), *args, None)
    with pytest.raises(RuntimeError, match="packed holds 24 bytes; a 6 x 9 NF4 weight needs 27"):
        ops.nf4_linear_small_m(torch.randn(2, 9), *args, None)
    with pytest.raises(RuntimeError, match="bias must be Half"):
        ops.nf4_linear_small_m(torch.randn(2, 8, dtype=torch.half), *args, torch.randn(6))
    with pytest.raises(RuntimeError, match=r"bias must be \(out_features,\)"):
        ops.nf4_linear_small_m(torch.randn(2, 8), *args, torch.randn(7))


def test_registered_kernels():
    assert extension.has_kernel("nf4_dequantize", "CPU")
    assert extension.has_kernel("nf4_linear_small_m", "CPU")
    assert extension_nf4.is_available("cpu") and not extension_nf4.is_available("meta")


# ---------------------------------------------------------------------------
# CUDA kernels vs the CPU ones

gpu = pytest.mark.gpu


def _cuda_kernels():
    if not extension_nf4.is_available("cuda"):
        pytest.skip("lora_kernels._C is built without the CUDA NF4 kernels")


@gpu
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["fp32-absmax", "double-quant"])
def test_cuda_dequantize_matches(blocksize, double_quant):
    _cuda_kernels()
    for shape in [(1, 1), (3, 5), (37, 65), (256, 1000), (1023, 517)]:
        weight = _weight(*shape, blocksize, double_quant, device="cuda")
        for dtype in DTYPES:
            got = extension_nf4.dequantize(weight, dtype)
            assert torch.equal(got, weight.dequantize(dtype)), (shape, dtype)
            assert torch.equal(got.cpu(), extension_nf4.dequantize(weight.to("cpu"), dtype))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dequantize_misaligned_and_subnormal(dtype):
    _cuda_kernels()
    # Codes starting one byte past an allocation (the scalar path) and tiny absmax.
    weight = _raw_weight(31, 77, 64, absmax=torch.tensor([1.0, 3.0e-39, 1.0e-45] * 13)[:38])
    storage = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8, device="cuda")
    storage[1:] = weight.packed.reshape(-1).cuda()
    shifted = NF4Weight(storage[1:], weight.absmax.cuda(), 64, weight.shape, weight.dtype)
    assert torch.equal(extension_nf4.dequantize(shifted, dtype), shifted.dequantize(dtype))
    assert torch.equal(extension_nf4.dequantize(shifted, dtype).cpu(), weight.dequantize(dtype))


def _cuda_vs_cpu_linear(x, weight, bias, dense=None):
    """The CUDA op and the CPU op against the float64 oracle; ``dense``: the
    weight dequantized on the CPU in x's dtype, if already at hand."""
    x_cpu, bias_cpu = x.cpu(), None if bias is None else bias.cpu()
    cpu_weight = weight.to("cpu")
    dense = cpu_weight.dequantize(x.dtype) if dense is None else dense
    baseline = {"y": F.linear(x_cpu, dense, bias_cpu)}
    oracle = {
        "y": F.linear(x_cpu.double(), dense.double(), None if bias is None else bias_cpu.double())
    }
    got = extension_nf4.linear_small_m(x, weight, bias)
    assert_matches_oracle({"y": got.cpu()}, baseline, oracle, x.dtype, f"cuda M={x.shape[0]}")
    ref = extension_nf4.linear_small_m(x_cpu, cpu_weight, bias_cpu)
    assert_matches_oracle({"y": ref}, baseline, oracle, x.dtype, f"cpu M={x.shape[0]}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize(
    ("N", "K"),
    [(37, 128), (130, 320), (300, 4096), (4096, 4096), (1024, 14336), (17, 301), (9, 4100)],
)
def test_cuda_linear_matches(N, K, blocksize, dtype):
    # K % 64 == 0 with fp16/bf16 runs the tensor-core kernel, the rest the
    # SIMT one; the large shapes split K.
    _cuda_kernels()
    weight = _weight(N, K, blocksize, double_quant=True, device="cuda")
    dense = weight.to("cpu").dequantize(dtype)
    for M in (1, 2, 7, 8, 9, 16):
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        bias = torch.randn(N, dtype=dtype, device="cuda") if M % 2 else None
        _cuda_vs_cpu_linear(x, weight, bias, dense)


@gpu
def test_cuda_linear_misaligned_codes_and_strided_x():
    _cuda_kernels()
    weight = _weight(70, 256, device="cuda")
    storage = torch.empty(weight.packed.numel() + 8, dtype=torch.uint8, device="cuda")
    storage[8:] = weight.packed.reshape(-1)
    shifted = NF4Weight(storage[8:], weight.absmax, 64, weight.shape, torch.bfloat16)
    x = torch.randn(256, 5, dtype=torch.bfloat16, device="cuda").t()
    _cuda_vs_cpu_linear(x, shifted, None)
    _cuda_vs_cpu_linear(x, weight, torch.randn(70, dtype=torch.bfloat16, device="cuda"))


@gpu
def test_cuda_over_2_31_elements():
    _cuda_kernels()
    rows, cols = 65537, 32832  # 2_151_710_784 elements: past int32 indexing
    numel = rows * cols
    free, _ = torch.cuda.mem_get_info()
    if free < numel * 3 + (2 << 30):  # codes, a bf16 copy, and room for the references
        pytest.skip(f"needs about {numel * 3 / 2**30:.0f} GiB of free GPU memory")
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), dtype=torch.uint8, device="cuda")
    absmax = torch.rand(numel // 64, device="cuda") + 0.5
    weight = NF4Weight(packed, absmax, 64, (rows, cols), torch.bfloat16)

    def part(first_row: int, n_rows: int) -> NF4Weight:
        e = first_row * cols  # a multiple of 64: slices start on a block and a byte
        return NF4Weight(
            packed[e // 2 : (e + n_rows * cols) // 2],
            absmax[e // 64 : (e + n_rows * cols) // 64],
            64,
            (n_rows, cols),
            torch.bfloat16,
        )

    dense = extension_nf4.dequantize(weight)
    for first in (0, rows // 2, rows - 4):
        assert torch.equal(dense[first : first + 4], part(first, 4).dequantize()), first
    del dense
    x = torch.randn(3, cols, dtype=torch.bfloat16, device="cuda")
    y = extension_nf4.linear_small_m(x, weight)
    for first in (0, rows // 2, rows - 4):
        rows_dense = part(first, 4).dequantize()
        assert_matches_oracle(
            {"y": y[:, first : first + 4]},
            {"y": F.linear(x, rows_dense)},
            {"y": F.linear(x.double(), rows_dense.double())},
            torch.bfloat16,
            f"rows {first}..{first + 3}",
        )
