"""onnxruntime sessions for a bundle's scorer.onnx, on CUDA or CPU, and scoring of in-memory chunks.

onnxruntime-gpu silently falls back to the CPU when CUDA libraries are missing, so the
providers a session really got are checked: ``cuda`` fails with a clear message naming the
CUDA libraries that cannot be loaded, ``auto`` falls back to the CPU, with one warning where the
machine has an NVIDIA GPU (and quietly, logged at INFO, where it has none).

Batches go through plain ``session.run`` on both devices. IO binding (inputs copied to the GPU
as OrtValues, outputs bound to host memory) was what this module did before; over four runs on
an H100 it scored 256-image batches at 0.58-0.97x the plain run's rate and 65,536-row tables at
0.90-1.02x, so the simpler call stays (BENCHMARKS.md, "GPU").
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from onnx import helper, numpy_helper

from pipeline.bundle import Bundle, remake_hint
from pipeline.calibrate import Calibration, calibrate
from pipeline.cores import resolve_threads
from pipeline.cuda_libraries import cuda_failure, preload_cuda_libraries
from pipeline.errors import BundleError, ConfigError, DeviceError, ExportError
from pipeline.contract import (CUDA_PROVIDER_OPTIONS, CUDA_SESSION_OPTIONS, OUTPUT_NAMES,
                               categorical_input_name)
from pipeline.precision_graphs import find_table
from pipeline.schema import TableSchema, as_category_array, categorical_strings, check_finite, numeric_matrix
from pipeline.unseen import MissingCounts, UnseenCounts

log = logging.getLogger("vaeguard")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


# onnxruntime's errors about the model itself, whichever provider loads it: bytes that do not
# parse as one, a graph that does not check. A provider that fails raises others.
MODEL_ERRORS = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile")


def create_session(model_path: Path, device: str = "auto", threads: int | None = None,
                   contents: bytes | None = None) -> ort.InferenceSession:
    """``contents``: the model's bytes as their hash was checked (Bundle.scorer_bytes), loaded
    instead of opening ``model_path`` again, which then only names the model in messages. A model
    onnxruntime cannot load is a one-line BundleError naming its file."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    model = str(model_path) if contents is None else contents
    if device == "cpu":
        return _load_session(model_path, model, options, [CPU])
    if CUDA not in ort.get_available_providers():
        return _cpu_fallback(model_path, model, options, device, "this onnxruntime build has no CUDA provider",
                             "pip install onnxruntime-gpu (installing plain onnxruntime after it replaces it)")
    if not gpu_present():
        return _cpu_fallback(model_path, model, options, device, "no NVIDIA GPU driver on this machine",
                             "run on a machine with an NVIDIA GPU")
    preload_cuda_libraries()
    for name, value in CUDA_SESSION_OPTIONS.items():  # deterministic kernels where CUDA has a choice
        setattr(options, name, value)
    # Quiet the provider's own loader errors; the check after it says what happened, once.
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(model, options, providers=[(CUDA, dict(CUDA_PROVIDER_OPTIONS)), CPU])
    except Exception as exc:  # noqa: BLE001 - some builds raise instead of falling back
        if type(exc).__name__ in MODEL_ERRORS:  # the model's fault: no CUDA would load it either
            raise unloadable(model_path, exc) from exc
        return _cpu_fallback(model_path, model, options, device, *cuda_failure(str(exc).splitlines()[0]))
    finally:
        ort.set_default_logger_severity(2)
    if session.get_providers()[0] != CUDA:
        return _cpu_fallback(model_path, model, options, device, *cuda_failure())
    return session


def unloadable(model_path: Path, exc: Exception) -> BundleError:
    return BundleError(f"{model_path}: not a loadable ONNX model ({str(exc).splitlines()[0][:200]}); re-export the "
                       f"bundle{remake_hint(model_path.parent, model_path.name)}")


def _load_session(model_path: Path, model: str | bytes, options: ort.SessionOptions,
                  providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise unloadable(model_path, exc) from exc


def gpu_present() -> bool:
    """An NVIDIA driver is loaded; without one, trying the CUDA provider only makes noise."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def _cpu_fallback(model_path: Path, model: str | bytes, options: ort.SessionOptions, device: str, why: str,
                  fix: str) -> ort.InferenceSession:
    if device == "cuda":
        raise DeviceError(f"--device cuda asked for, but onnxruntime's CUDA provider is not active ({why}); "
                          f"{fix}, or use --device cpu")
    # On a machine without an NVIDIA GPU, auto means the CPU by design: a warning every night that says
    # to find a GPU would teach users to skip warnings. Where a GPU is there, CUDA should have worked.
    level = logging.WARNING if gpu_present() else logging.INFO
    log.log(level, "CUDA is not active (%s; %s); scoring on the CPU", why, fix)
    return _load_session(model_path, model, options, [CPU])


def variant_device(bundle: Bundle, precision: str, device: str) -> str:
    """The device to ask for: ``auto`` scores a reduced-precision scorer checked on the CPU there,
    even with a GPU at hand (see check_variant_device). Anything else is left as given: a variant
    checked on CUDA gets CUDA from ``auto`` where it is active, and a clear error where it is not."""
    if precision != "fp32" and device == "auto" and bundle.manifest["variants"][precision].get("device") == "cpu":
        return "cpu"
    return device


def check_variant_device(bundle: Bundle, precision: str, device: str) -> None:
    """A reduced-precision scorer is used only on the device its export checked it on.

    Reduced-precision kernels differ from device to device: the fp16 variant that passed every
    check on the CPU scored a row 1.1% differently alone and in a batch on an H100, and that
    export refused it there. The threshold and the batch check hold only where they were made.
    """
    if precision == "fp32":
        return
    checked = bundle.manifest["variants"][precision].get("device")
    if checked and checked != device:
        raise DeviceError(f"the {precision} scorer of bundle {bundle.name!r} was checked on {checked}, and this run "
                          f"scores on {device}; score it with --device {checked}, or check it on {device} with "
                          f"`vaeguard export {bundle.path} --precision {precision} --device {device}`")


def check_scorer_agrees(session: ort.InferenceSession, bundle: Bundle, precision: str) -> None:
    """The manifest says which column goes where and what the threshold is, but only the ONNX files
    are hash-checked: a hand-edited manifest (two columns swapped, a threshold "adjusted") would
    feed columns into the wrong slots or report a threshold the graph does not use, silently.
    The scorer's own metadata and inputs, covered by its hash, are the reference."""
    path = bundle.scorer_path_for(precision)
    metadata = session.get_modelmeta().custom_metadata_map

    def refuse(what: str) -> None:
        raise BundleError(f"{path}: {what}; the manifest was edited or belongs to another bundle: restore "
                          f"manifest.json or re-export the bundle")

    calibration = bundle.calibration_for(precision)
    threshold = calibration["threshold"]
    if "vaeguard.threshold" in metadata and float(metadata["vaeguard.threshold"]) != threshold:
        refuse(f"its threshold is {metadata['vaeguard.threshold']}, the manifest's {threshold!r} (the threshold is "
               f"baked into the graph; to flag at another rate, use p_value <= that rate)")
    # The summary, the drift checks and the report state the target and expected FPR from the
    # manifest: edited, a run flagging at 1% reported itself against 5%.
    for key, what in (("target_fpr", "target FPR"), ("n_calibration", "number of calibration inputs")):
        baked = metadata.get(f"vaeguard.{key}")
        if baked is not None and float(baked) != calibration[key]:
            refuse(f"its {what} is {baked}, the manifest's {calibration[key]!r}")
    if calibration["expected_fpr"] != calibration["rank"] / (calibration["n_calibration"] + 1):
        refuse(f"the manifest's expected FPR {calibration['expected_fpr']!r} is not its rank / (n_calibration + 1) "
               f"= {calibration['rank']} / {calibration['n_calibration'] + 1}")
    # The graph holds the calibration table too: scores scaled by hand, or a rank edited with its
    # expected FPR, passed the checks above and changed what inspect, the report and drift state.
    model, table = onnx.load_from_string(bundle.scorer_bytes(precision)), Calibration.from_dict(calibration)
    try:
        find_table(model, table)
    except ExportError:
        refuse("its baked calibration table is not the manifest's calibration scores and threshold")
    rank = calibrate(table.scores, table.target_fpr).rank
    if rank != calibration["rank"]:
        refuse(f"its calibration table puts the threshold at rank {rank} for the target FPR "
               f"{calibration['target_fpr']!r}, the manifest's rank is {calibration['rank']!r}")
    if bundle.manifest.get("modality") == "image":
        return  # one image input, whose size the session checks on every batch
    schema = bundle.schema
    # Order matters for the numeric block only: categorical inputs are named (checked below).
    baked = metadata.get("vaeguard.numeric_columns")
    if baked is not None and json.loads(baked) != list(schema.numeric):
        refuse(f"its numeric columns are {json.loads(baked)}, the manifest's {list(schema.numeric)}")
    # The numeric medians and scales are folded into unnamed constants of the graph, but they are
    # there by value: a manifest whose numbers were edited (which a runtime feeding encoder.onnx
    # itself would preprocess by) names none of them.
    if schema.numeric:
        numeric = bundle.preprocessor.numeric
        constants = [numpy_helper.to_array(init).ravel() for init in model.graph.initializer
                     if init.data_type == onnx.TensorProto.FLOAT and np.prod(init.dims) == len(numeric)]
        for what in ("median", "scale"):
            values = np.array([getattr(s, what) for s in numeric], dtype=np.float32)
            if not any(np.array_equal(values, constant) for constant in constants):
                refuse(f"none of its constants is the manifest's numeric {what}s {values.tolist()}")
    inputs = {value.name: value.shape for value in session.get_inputs()}
    expected = ({"numeric"} if schema.numeric else set()) | {categorical_input_name(c) for c in schema.categorical}
    if set(inputs) != expected or (schema.numeric and inputs["numeric"][1] != len(schema.numeric)):
        refuse(f"its inputs are {inputs}, the manifest's schema needs {sorted(expected)}")
    # Scoring counts a value the bundle never saw by the manifest's categories (pipeline.unseen),
    # while the graph decides by its own: the two must be the same.
    def taken(spellings: dict[str, str] | None) -> str:
        return "values as written" if spellings is None else f"the spellings {spellings}"

    front = baked_categories(model)
    for stats in bundle.preprocessor.categorical:
        categories, spellings = front.get(categorical_input_name(stats.name), (None, None))
        if categories != list(stats.categories):
            refuse(f"its categories of column {stats.name!r} are {categories}, the manifest's {list(stats.categories)}")
        if spellings != stats.spellings:
            refuse(f"its column {stats.name!r} takes {taken(spellings)}, the manifest's {taken(stats.spellings)} "
                   f"(preprocessing.categorical[].boolean / .integer)")


def baked_categories(model: onnx.ModelProto) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    """Per categorical input of a table scorer, the categories its OneHotEncoder keeps and the
    spellings its LabelEncoder maps first (None without one), as pipeline.export built them."""
    made_by = {output: node for node in model.graph.node for output in node.output}
    baked = {}
    for node in model.graph.node:
        if node.op_type != "OneHotEncoder":
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        source, spellings = node.input[0], None
        if source in made_by and made_by[source].op_type == "LabelEncoder":
            labels = {a.name: helper.get_attribute_value(a) for a in made_by[source].attribute}
            source = made_by[source].input[0]
            spellings = {k.decode(): v.decode() for k, v in zip(labels["keys_strings"], labels["values_strings"])}
        baked[source] = ([c.decode() for c in attributes["cats_strings"]], spellings)
    return baked


def table_feeds(schema: TableSchema, numeric: np.ndarray, categories: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A table scorer's inputs: the numeric block (if any) and one string array per categorical column."""
    feeds = {}
    if schema.numeric:
        feeds["numeric"] = np.ascontiguousarray(numeric, dtype=np.float32)
    for name, values in zip(schema.categorical, categories):
        feeds[categorical_input_name(name)] = values
    return feeds


def frame_feeds(schema: TableSchema, frame: pd.DataFrame, source: str) -> dict[str, np.ndarray]:
    return table_feeds(schema, numeric_matrix(frame, schema.numeric, source),
                       categorical_strings(frame, schema.categorical))


def category_codes(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A categorical column as its distinct texts and each row's index into them: the texts are
    ``as_category_array`` of the column's distinct values, so ``texts[indices]`` is exactly
    ``as_category_array(column)``, and the distinct values are there to count from."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    encoded = pc.dictionary_encode(column, null_encoding="encode")
    return as_category_array(encoded.dictionary), encoded.indices.to_numpy()


class BundleScorer:
    """Scores chunks of rows with a bundle's scorer.onnx; one session, reused for every chunk."""

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None, precision: str = "fp32"):
        self.bundle = bundle
        self.schema = bundle.schema
        self.precision = precision
        self.session = create_session(bundle.scorer_path_for(precision), variant_device(bundle, precision, device),
                                      threads, contents=bundle.scorer_bytes(precision))
        self.device = "cuda" if self.session.get_providers()[0] == CUDA else "cpu"
        check_variant_device(bundle, precision, self.device)
        check_scorer_agrees(self.session, bundle, precision)
        # What the graph takes as a kept category, per categorical column (after its spellings).
        self._known = {stats.name: stats.known_texts for stats in bundle.preprocessor.categorical}

    @property
    def numeric_columns(self) -> list[str]:
        return list(self.schema.numeric)

    @property
    def categorical_columns(self) -> list[str]:
        return list(self.schema.categorical)

    def score_arrays(self, numeric: np.ndarray, categories: list[np.ndarray]) -> dict[str, np.ndarray]:
        feeds = table_feeds(self.schema, numeric, categories)
        return dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), feeds)))

    def score_batch(self, batch: pa.RecordBatch, source: str, row_offset: int = 0,
                    unseen: dict[str, UnseenCounts] | None = None,
                    missing: dict[str, MissingCounts] | None = None) -> dict[str, np.ndarray]:
        """A record batch with numeric columns as float64 and categorical ones as strings.

        With ``unseen``, each categorical column's rows and the rows the scorer sends to its
        unknown bucket are added to that column's counts (made here on first use); with
        ``missing``, each numeric column's rows and blank rows, likewise."""
        # Filled column by column straight into float32 (the same rounding as a float64 matrix
        # cast afterwards, without that matrix and its extra pass: file scoring is CPU-bound).
        numeric = np.empty((batch.num_rows, len(self.schema.numeric)), dtype=np.float32)
        for i, name in enumerate(self.schema.numeric):
            column = batch.column(name).to_numpy(zero_copy_only=False)
            check_finite(column[:, None], [name], source, row_offset)
            if missing is not None:
                missing.setdefault(name, MissingCounts()).count(column)
            numeric[:, i] = column
        categories = []
        for name in self.schema.categorical:
            texts, indices = category_codes(batch.column(name))
            categories.append(texts[indices])
            if unseen is not None:
                unseen.setdefault(name, UnseenCounts()).count(texts, indices, self._known[name])
        return self.score_arrays(numeric, categories)

    def score_frame(self, frame: pd.DataFrame, source: str = "input") -> pd.DataFrame:
        feeds = frame_feeds(self.schema, frame, source)
        outputs = dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), feeds)))
        return pd.DataFrame(outputs, index=frame.index)


_SHARED: dict[tuple, BundleScorer] = {}
_SHARED_LOCK = threading.Lock()


def shared_scorer(bundle: Bundle | str | Path, device: str = "auto", threads: int | None = None,
                  precision: str = "fp32") -> BundleScorer:
    """One onnxruntime session per bundle version, device and process, reused for every file.

    A Dask worker or a flow scoring many files builds its session once instead of per file.
    The key holds the bundle's file hashes, so a replaced bundle gets a new session: give a
    path (loaded and hash-checked here) or a Bundle the caller has just loaded.
    """
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    key = (str(bundle.path.resolve()), tuple(sorted(bundle.manifest["files"].items())), device, threads, precision)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = BundleScorer(bundle, device, threads, precision)
        return _SHARED[key]
