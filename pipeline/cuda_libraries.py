"""Which CUDA libraries onnxruntime-gpu's CUDA provider needs, loading them, and saying which are missing.

onnxruntime-gpu falls back to the CPU when a library is missing and says so only in its own
log; this module names the libraries the dynamic loader cannot open and the wheels that bring
them, so ``--device cuda`` can fail with a message the user can act on.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import warnings

import onnxruntime as ort


@functools.cache
def preload_cuda_libraries() -> None:
    """Load CUDA 13 / cuDNN 9 from the nvidia-* wheels a CUDA build of torch 2.13 installs, if any.

    onnxruntime's ``preload_dlls`` prints its failures to stdout (where scores may go) and may
    warn; both are silenced here because ``cuda_failure`` names what is missing, once.
    """
    if not hasattr(ort, "preload_dlls"):
        return
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - best effort; the provider check after it decides
            pass


# What the CUDA provider of onnxruntime-gpu 1.31 (a CUDA 13.0 build) loads when it starts: the
# NEEDED entries of capi/libonnxruntime_providers_cuda.so (`readelf -d`; libcuda.so.1 is the
# driver's own) and cuDNN 9, which it dlopens. libcufft.so.12 and libnvrtc.so.13 are loaded only
# for FFT and runtime-compiled kernels (preload_dlls treats them as optional); scorer graphs use
# neither, so their absence is not why CUDA did not start. Values: what provides each library.
CUDA_LIBRARIES = {
    "libcuda.so.1": "an NVIDIA driver for CUDA 13",
    "libcudart.so.13": "nvidia-cuda-runtime",
    "libcublasLt.so.13": "nvidia-cublas",
    "libcublas.so.13": "nvidia-cublas",
    "libcurand.so.10": "nvidia-curand",
    "libcudnn.so.9": "nvidia-cudnn-cu13",
}


def _load_library(name: str) -> None:
    ctypes.CDLL(name)


def missing_cuda_libraries() -> list[str]:
    """The CUDA_LIBRARIES the dynamic loader cannot open, in the order above.

    Asked after ``preload_cuda_libraries``: a library it loaded from a wheel's folder is already
    in the process, and the loader finds it by its soname.
    """
    missing = []
    for name in CUDA_LIBRARIES:
        try:
            _load_library(name)
        except OSError:
            missing.append(name)
    return missing


def cuda_failure(detail: str | None = None) -> tuple[str, str]:
    """Why onnxruntime's CUDA provider did not start, and how to fix it, for a one-line message."""
    missing = missing_cuda_libraries()
    if not missing:
        return (detail or "the CUDA 13 and cuDNN 9 libraries load, but the provider did not start",
                "check that the driver supports CUDA 13 (nvidia-smi) and that the GPU is visible")
    wheels = [CUDA_LIBRARIES[name] for name in missing if CUDA_LIBRARIES[name].startswith("nvidia-")]
    fixes = [f"install {CUDA_LIBRARIES['libcuda.so.1']}"] if "libcuda.so.1" in missing else []
    if wheels:
        fixes.append(f"pip install {' '.join(dict.fromkeys(wheels))} "
                     f"(or a CUDA build of torch 2.13, which brings them)")
    return f"{', '.join(missing)} not found", "; ".join(fixes)
