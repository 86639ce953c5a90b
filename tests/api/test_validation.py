"""Bad input raises a clear TypeError/ValueError naming the argument, before
any kernel runs; the C++ entry points check the same things themselves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lora_kernels
from lora_kernels import LoRALinear, lora_linear
from lora_kernels.backends.extension import has_kernel


def _args(M=4, K=8, N=6, r=2, dtype=torch.float32):
    return {
        "x": torch.randn(M, K, dtype=dtype),
        "weight": torch.randn(N, K, dtype=dtype),
        "lora_A": torch.randn(r, K, dtype=dtype),
        "lora_B": torch.randn(N, r, dtype=dtype),
    }


def _call(**overrides):
    kwargs = {**_args(), "scaling": 1.0, "bias": torch.randn(6), "dropout_p": 0.0}
    kwargs.update(overrides)
    return lora_linear(
        kwargs.pop("x"),
        kwargs.pop("weight"),
        kwargs.pop("lora_A"),
        kwargs.pop("lora_B"),
        kwargs.pop("scaling"),
        **kwargs,
    )


BAD_INPUTS = [
    ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor"),
    ({"weight": None}, TypeError, "weight must be a torch.Tensor"),
    ({"bias": 3.0}, TypeError, "bias must be a torch.Tensor or None"),
    ({"x": torch.ones(4, 8, dtype=torch.int64)}, TypeError, "x must be a floating-point"),
    ({"lora_A": torch.ones(2, 8, dtype=torch.int32)}, TypeError, "lora_A must be a floating-point"),
    ({"weight": torch.ones(6, 8, dtype=torch.int64)}, TypeError, "weight must be a floating-point"),
    ({"lora_B": torch.ones(6, 2, dtype=torch.bool)}, TypeError, "lora_B must be a floating-point"),
    ({"bias": torch.ones(6, dtype=torch.int8)}, TypeError, "bias must be a floating-point"),
    ({"lora_A": torch.randn(2, 8, dtype=torch.complex64)}, TypeError, "lora_A must be a floating"),
    ({"x": torch.tensor(1.0)}, ValueError, "x must have at least one dimension"),
    ({"x": torch.randn(4, 7)}, ValueError, "weight must have shape (out_features, in_features)"),
    ({"weight": torch.randn(6, 8, 1)}, ValueError, "weight must have shape"),
    ({"lora_A": torch.randn(2, 7)}, ValueError, "lora_A must have shape (r, in_features)"),
    ({"lora_A": torch.randn(0, 8), "lora_B": torch.randn(6, 0)}, ValueError, "rank r"),
    (
        {"lora_B": torch.randn(6, 3)},
        ValueError,
        "lora_B must have shape (out_features, r) = (6, 2)",
    ),
    ({"lora_B": torch.randn(5, 2)}, ValueError, "lora_B must have shape"),
    ({"bias": torch.randn(5)}, ValueError, "bias must have shape (out_features,) = (6,)"),
    ({"weight": torch.randn(6, 8, dtype=torch.float64)}, TypeError, "weight must have x's dtype"),
    ({"bias": torch.randn(6, dtype=torch.float16)}, TypeError, "bias must have x's dtype"),
    ({"lora_B": torch.randn(6, 2, dtype=torch.float16)}, TypeError, "lora_B must be float32"),
    (
        {
            "x": torch.randn(4, 8, dtype=torch.bfloat16),
            "weight": torch.randn(6, 8, dtype=torch.bfloat16),
            "bias": None,
            "lora_A": torch.randn(2, 8, dtype=torch.float16),
        },
        TypeError,
        "lora_A must be bfloat16 or float32",
    ),
    ({"weight": torch.randn(6, 8, device="meta")}, ValueError, "weight is on meta but x is on cpu"),
    ({"bias": torch.randn(6, device="meta")}, ValueError, "bias is on meta but x is on cpu"),
    ({"lora_A": torch.randn(2, 8, device="meta")}, ValueError, "lora_A is on meta but x is on cpu"),
    ({"lora_B": torch.randn(6, 2, device="meta")}, ValueError, "lora_B is on meta but x is on cpu"),
    ({"dropout_p": 1.0}, ValueError, "dropout_p must be in [0, 1)"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p must be in [0, 1)"),
    ({"dropout_p": "0.1"}, TypeError, "dropout_p must be a real number"),
    ({"scaling": float("nan")}, ValueError, "scaling must be finite"),
    ({"scaling": None}, TypeError, "scaling must be a real number"),
    ({"backend": "cublas"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_INPUTS)
def test_lora_linear_rejects(overrides, error, message):
    with pytest.raises(error, match=re.escape(message)):
        _call(**overrides)


def test_named_backend_that_cannot_run_raises():
    unavailable = [
        name
        for name in ("triton", "cuda", "cpu")
        if name not in lora_kernels.available_backends("cpu")
    ]
    for name in unavailable:
        with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run this input"):
            _call(backend=name)
    # cuda never runs on CPU tensors, whatever was built.
    with pytest.raises(RuntimeError, match="it runs on cuda tensors"):
        _call(backend="cuda")


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    assert lora_kernels.ops.registry.resolve_backend("auto", torch.randn(2, 2)).name == "torch"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND='nonsense' is not a backend"):
        _call()


@pytest.mark.parametrize("forced", ["cuda", "triton"])
def test_backend_variable_applies_only_to_the_devices_of_its_backend(monkeypatch, forced):
    # LORA_KERNELS_BACKEND=cuda must not break CPU tensors: they run on auto's choice.
    backend = lora_kernels.ops.registry.get_backend(forced)
    x = torch.randn(3, 8)
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    auto = lora_kernels.ops.registry.resolve_backend("auto", x).name
    monkeypatch.setenv("LORA_KERNELS_BACKEND", forced)
    chosen = lora_kernels.ops.registry.resolve_backend("auto", x).name
    # triton serves CPU tensors under the interpreter (the test suite sets it on CPU machines).
    assert chosen == (forced if backend.serves(x.device) else auto)
    layer = LoRALinear(8, 4, r=2)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    y = _call()
    assert y.shape == (4, 6) and torch.isfinite(y).all()
    # Named in the call itself, a backend that cannot run the input still raises.
    if not backend.serves(x.device):
        with pytest.raises(RuntimeError, match=f"backend '{forced}' cannot run this input"):
            _call(backend=forced)


def test_layer_backend_applies_to_the_devices_of_its_backend():
    # A layer built for the cuda backend and used on the CPU (moved there, or
    # loaded without a GPU) runs on auto; on a device its backend serves it is strict.
    x = torch.randn(3, 8)
    layer = LoRALinear(8, 4, r=2, init_lora_weights=False, backend="cuda")
    expected = LoRALinear(8, 4, r=2, backend="auto")
    expected.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), expected(x), rtol=0, atol=0)
    assert lora_kernels.ops.registry.backend_for_device("cuda", x.device) == "auto"
    assert lora_kernels.ops.registry.backend_for_device("cpu", x.device) == "cpu"
    assert lora_kernels.ops.registry.backend_for_device("torch", torch.device("meta")) == "torch"


def test_named_backend_is_strict_on_its_own_devices():
    # triton serves this machine's test device (CUDA, or the CPU under the
    # interpreter) but takes no float64: a clear error, not a silent fallback.
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(3, 8)
    strict = LoRALinear(8, 4, r=2, backend="triton", device=device, dtype=torch.float64)
    assert lora_kernels.ops.registry.backend_for_device("triton", torch.device(device)) == "triton"
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run this input"):
        strict(x.to(device, torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": 2.5}, "r must be an integer >= 1"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
        (
            {"init_lora_weights": "orthogonal"},
            "init_lora_weights must be True, False or 'gaussian'",
        ),
        ({"backend": "fast"}, "backend must be one of"),
    ],
)
def test_lora_linear_module_rejects(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LoRALinear(8, 6, **kwargs)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear"):
        LoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def _cpp_forward(**overrides):
    a = {**_args(), "bias": None, "scaling": 1.0, "dropout_p": 0.0, "seed": None, **overrides}
    return torch.ops.lora_kernels.lora_forward(
        a["x"],
        a["weight"],
        a["bias"],
        a["lora_A"],
        a["lora_B"],
        a["scaling"],
        a["dropout_p"],
        a["seed"],
    )


def _cpp_backward(**overrides):
    a = _args()
    a = {
        **a,
        "grad_y": torch.randn(4, 6),
        "S": torch.zeros(4, 2),
        "dropout_p": 0.0,
        "seed": None,
        **overrides,
    }
    return torch.ops.lora_kernels.lora_backward(
        a["grad_y"],
        a["x"],
        a["weight"],
        a["lora_A"],
        a["lora_B"],
        a["S"],
        1.0,
        a["dropout_p"],
        a["seed"],
        [True] * 5,
    )


SEED = torch.tensor([1])
CPP_BAD_INPUTS = {
    "x-rank": (_cpp_forward, {"x": torch.randn(8)}, "x must be 2-D"),
    "weight-shape": (_cpp_forward, {"weight": torch.randn(8, 6)}, "weight must be (N, K)"),
    "bias-shape": (_cpp_forward, {"bias": torch.randn(5)}, "bias must be (N,)"),
    "seed-missing": (_cpp_forward, {"dropout_p": 0.5}, "seed is required when dropout_p > 0"),
    "seed-dtype": (
        _cpp_forward,
        {"dropout_p": 0.5, "seed": torch.tensor([1.0])},
        "seed must be an int64 tensor with one element",
    ),
    "seed-numel": (
        _cpp_forward,
        {"dropout_p": 0.5, "seed": torch.tensor([1, 2])},
        "seed must be an int64 tensor with one element",
    ),
    "dropout-range": (_cpp_forward, {"dropout_p": 1.5}, "dropout_p must be in [0, 1)"),
    "adapter-dtype": (
        _cpp_forward,
        {"lora_B": torch.randn(6, 2, dtype=torch.float64)},
        "lora_B must be",
    ),
    "grad-shape": (_cpp_backward, {"grad_y": torch.randn(4, 5)}, "grad_y must be (M, N)"),
    "S-dtype": (_cpp_backward, {"S": torch.zeros(4, 2, dtype=torch.float64)}, "S must be Float"),
    "S-shape": (_cpp_backward, {"S": torch.zeros(4, 3)}, "S must be (M, r)"),
    "backward-seed": (
        _cpp_backward,
        {"dropout_p": 0.1, "seed": SEED.float()},
        "seed must be an int64",
    ),
    "meta-weight": (
        _cpp_forward,
        {"weight": torch.randn(6, 8, device="meta")},
        "weight is on meta but x is on cpu",
    ),
    "meta-S": (
        _cpp_backward,
        {"S": torch.zeros(4, 2, device="meta")},
        "S is on meta but x is on cpu",
    ),
}


@pytest.mark.skipif(not has_kernel("lora_forward", "CPU"), reason="C++ CPU kernels not built")
@pytest.mark.parametrize("case", list(CPP_BAD_INPUTS))
def test_cpp_entry_points_check_arguments(case):
    call, overrides, message = CPP_BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(**overrides)


@pytest.mark.gpu
def test_cpu_backend_choices_do_not_apply_to_gpu_tensors(monkeypatch):
    x = torch.randn(3, 8, device="cuda")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cpu")
    assert lora_kernels.ops.registry.resolve_backend("auto", x).name in ("triton", "cuda")
    layer = LoRALinear(8, 4, r=2, backend="cpu").cuda()
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_auto_order_follows_the_recorded_gpu_preferences(monkeypatch):
    # cuda before triton on CUDA tensors, unless a recorded benchmark says so for that GPU.
    from lora_kernels.ops import registry

    for recorded in registry.GPU_PREFERENCES:  # each rests on a recorded measurement
        assert (Path(__file__).parents[2] / "benchmarks" / recorded.evidence).is_file()
    assert registry.auto_order(torch.device("cpu")) == ("cpu", "torch")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert registry.auto_order(torch.device("cuda")) == ("cuda", "triton", "torch")
    preference = registry.Preference("H200", ("triton", "cuda", "torch"), "results/example.md")
    monkeypatch.setattr(registry, "GPU_PREFERENCES", (preference,))
    assert registry.auto_order(torch.device("cuda")) == ("triton", "cuda", "torch")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert registry.auto_order(torch.device("cuda")) == ("cuda", "triton", "torch")
