"""onnxruntime sessions for a bundle's scorer.onnx, on CUDA or CPU, and scoring of in-memory chunks.

onnxruntime-gpu silently falls back to the CPU when CUDA libraries are missing, so the
providers a session really got are checked: ``cuda`` fails with a clear message, ``auto``
falls back to the CPU with one warning.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow as pa

from pipeline.bundle import Bundle
from pipeline.config import resolve_threads
from pipeline.errors import ConfigError, DeviceError
from pipeline.contract import OUTPUT_NAMES, categorical_input_name
from pipeline.schema import as_category_array, categorical_strings, check_finite, numeric_matrix

log = logging.getLogger("vaeguard")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def create_session(model_path: Path, device: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    if device == "cpu":
        return ort.InferenceSession(str(model_path), options, providers=[CPU])
    if CUDA not in ort.get_available_providers():
        return _cpu_fallback(model_path, options, device, "this onnxruntime build has no CUDA provider")
    if not gpu_present():
        return _cpu_fallback(model_path, options, device, "no NVIDIA GPU driver on this machine")
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # picks up CUDA/cuDNN shipped with a CUDA build of torch, if any
        except Exception:  # noqa: BLE001 - best effort; the provider check below decides
            pass
    # Quiet the provider's own loader errors; the check after it says what happened, once.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(model_path), options, providers=[CUDA, CPU])
    except Exception as exc:  # noqa: BLE001 - some builds raise instead of falling back
        return _cpu_fallback(model_path, options, device, str(exc).splitlines()[0])
    finally:
        ort.set_default_logger_severity(2)
    if session.get_providers()[0] != CUDA:
        return _cpu_fallback(model_path, options, device, "CUDA 13 and cuDNN 9 libraries or a GPU were not found")
    return session


def gpu_present() -> bool:
    """An NVIDIA driver is loaded; without one, trying the CUDA provider only makes noise."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def _cpu_fallback(model_path: Path, options: ort.SessionOptions, device: str, why: str) -> ort.InferenceSession:
    if device == "cuda":
        raise DeviceError(
            f"--device cuda asked for, but onnxruntime's CUDA provider is not active ({why}); "
            f"install the CUDA 13 / cuDNN 9 runtime on a GPU machine, or use --device cpu"
        )
    log.warning("CUDA is not active (%s); scoring on the CPU", why)
    return ort.InferenceSession(str(model_path), options, providers=[CPU])


class BundleScorer:
    """Scores chunks of rows with a bundle's scorer.onnx; one session, reused for every chunk."""

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None):
        self.bundle = bundle
        self.schema = bundle.schema
        self.session = create_session(bundle.scorer_path, device, threads)
        self.device = "cuda" if self.session.get_providers()[0] == CUDA else "cpu"

    @property
    def numeric_columns(self) -> list[str]:
        return list(self.schema.numeric)

    @property
    def categorical_columns(self) -> list[str]:
        return list(self.schema.categorical)

    def score_arrays(self, numeric: np.ndarray, categories: list[np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {}
        if self.schema.numeric:
            feeds["numeric"] = np.ascontiguousarray(numeric, dtype=np.float32)
        for name, values in zip(self.schema.categorical, categories):
            feeds[categorical_input_name(name)] = values
        return dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), feeds)))

    def score_batch(self, batch: pa.RecordBatch, source: str, row_offset: int = 0) -> dict[str, np.ndarray]:
        """A record batch with numeric columns as float64 and categorical ones as strings."""
        numeric = np.empty((batch.num_rows, len(self.schema.numeric)), dtype=np.float64)
        for i, name in enumerate(self.schema.numeric):
            numeric[:, i] = batch.column(name).to_numpy(zero_copy_only=False)
        check_finite(numeric, self.schema.numeric, source, row_offset)
        categories = [as_category_array(batch.column(name)) for name in self.schema.categorical]
        return self.score_arrays(numeric.astype(np.float32), categories)

    def score_frame(self, frame: pd.DataFrame, source: str = "input") -> pd.DataFrame:
        numeric = numeric_matrix(frame, self.schema.numeric, source)
        outputs = self.score_arrays(numeric, categorical_strings(frame, self.schema.categorical))
        return pd.DataFrame(outputs, index=frame.index)


_SHARED: dict[tuple, BundleScorer] = {}
_SHARED_LOCK = threading.Lock()


def shared_scorer(bundle_path: str | Path, device: str = "auto", threads: int | None = None) -> BundleScorer:
    """One onnxruntime session per bundle version, device and process, reused for every file.

    A Dask worker or a flow scoring many files builds its session once instead of per file;
    the bundle's hashes are still checked on every call, so a replaced bundle gets a new one.
    """
    bundle = Bundle.load(bundle_path)
    key = (str(bundle.path.resolve()), tuple(sorted(bundle.manifest["files"].items())), device, threads)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = BundleScorer(bundle, device, threads)
        return _SHARED[key]
