"""Builds lora_kernels._C, the C++/CUDA extension holding the `cpu` and `cuda` backends.

What gets built:
  * a CUDAExtension (csrc/*.cpp + csrc/cpu + csrc/cuda) when torch is a CUDA build
    and nvcc is found -- a GPU is not needed to compile;
  * otherwise a CppExtension with the CPU kernels only.

Environment knobs:
  LORA_KERNELS_BUILD_CUDA=0|1   force the CUDA part off or on (default: auto-detect)
  TORCH_CUDA_ARCH_LIST          target archs, default "8.0;9.0+PTX" (sm80 + sm90, PTX for newer GPUs)
  MAX_JOBS                      parallel compile jobs, default sized to cores and memory
"""

from __future__ import annotations

import glob
import os
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# nvcc on a template-heavy translation unit peaks at a few GB; size jobs so the
# build never swaps on a small machine.
GB_PER_COMPILE_JOB = 4


def _log(msg: str) -> None:
    print(f"[lora_kernels setup] {msg}", file=sys.stderr)


def _default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError):
        mem_gb = GB_PER_COMPILE_JOB * cores
    return max(1, min(cores, int(mem_gb // GB_PER_COMPILE_JOB)))


def _want_cuda(cuda_home: str | None) -> bool:
    import torch

    forced = os.environ.get("LORA_KERNELS_BUILD_CUDA")
    if forced is not None and forced.strip() not in ("", "auto"):
        want = forced.strip().lower() not in ("0", "false", "no", "off")
        if want and (torch.version.cuda is None or cuda_home is None):
            raise RuntimeError(
                "LORA_KERNELS_BUILD_CUDA=1 but "
                + (
                    "torch is a CPU-only build"
                    if torch.version.cuda is None
                    else "nvcc was not found"
                )
                + "; install a CUDA build of torch and the CUDA toolkit, or unset the variable."
            )
        return want
    if torch.version.cuda is None:
        _log("torch is a CPU-only build: compiling the CPU kernels only")
        return False
    if cuda_home is None:
        _log("nvcc not found (set CUDA_HOME): compiling the CPU kernels only")
        return False
    return True


def _has_cuda_headers(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h"))


def _point_cuda_home_at_toolkit() -> None:
    """Sets CUDA_HOME when torch would guess it wrong.

    torch takes CUDA_HOME from the directory above the `nvcc` on PATH; an nvcc
    wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc) then yields
    a directory without the CUDA headers and libraries. Must run before
    torch.utils.cpp_extension is imported, which reads CUDA_HOME once.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is not None and _has_cuda_headers(os.path.dirname(os.path.dirname(nvcc))):
        return
    for candidate in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if _has_cuda_headers(candidate):
            os.environ["CUDA_HOME"] = candidate
            _log(f"CUDA_HOME={candidate} (the nvcc on PATH is outside the toolkit)")
            return


def _pip_cuda_include_dirs() -> list[str]:
    """CUDA library headers shipped in the nvidia-* pip wheels (cusparse.h, cublas_v2.h, ...).

    A bare toolkit install may lack them, while torch's own headers include them.
    """
    roots = [*site.getsitepackages(), site.getusersitepackages()]
    found: list[str] = []
    for root in roots:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(path) and path not in found:
                    found.append(path)
    return found


def _extension():
    import torch  # noqa: F401  (build requirement; imported lazily so `setup.py --help` works)

    _point_cuda_home_at_toolkit()
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    with_cuda = _want_cuda(CUDA_HOME)

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No -std flag: BuildExtension adds the C++ standard the installed torch's
    # headers require (C++17 for older releases, C++20 for recent ones).
    cxx_flags = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000"]
    define_macros: list[tuple[str, str | None]] = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    _log(f"MAX_JOBS={os.environ['MAX_JOBS']}")

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        _log(f"building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        # The toolkit's headers first; the pip wheels only add the library
        # headers a bare toolkit may lack.
        include_dirs += [os.path.join(CUDA_HOME, "include"), *_pip_cuda_include_dirs()]
        define_macros.append(("LORA_KERNELS_WITH_CUDA", None))
        nvcc_flags = [
            "-O3",
            "--use_fast_math",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            "-DPy_LIMITED_API=0x03090000",
        ]
        return CUDAExtension(
            "lora_kernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return CppExtension(
        "lora_kernels._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _build_ext()},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
