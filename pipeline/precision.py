"""Reduced-precision scorers: scorer.fp16.onnx (for GPUs) and scorer.int8.onnx (for CPUs).

`vaeguard export BUNDLE --precision fp16|int8` converts the bundle's fp32 scorer.onnx with
onnxruntime's own tools, then gives the variant its own threshold and calibration table: the
variant scores the calibration inputs the bundle keeps (calibration_rows.parquet or
calibration_images.npy), those scores are calibrated at the bundle's target FPR exactly as in
training, and the new table replaces the baked one. A threshold carried over from fp32 would
not hold: rounding moves every score, and the conformal guarantee is about the scores of the
graph that decides.

What runs in reduced precision is the VAE only (the nodes the exporter scopes /encoder/ and
/decoder/). Preprocessing, the string one-hot front, the score sum, the binary search over the
calibration table and the threshold comparison stay float32 in every variant, and the table's
initializers stay float32 tensors.

Before the manifest changes, the finished variant re-scores the calibration inputs and must
flag exactly the calibration scores above its own threshold (the conformal count), with
p-values equal to the table's. The variant is built in a temporary file inside the bundle and
moved into place, then the manifest is replaced, so a failed export leaves the bundle as it was.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper, numpy_helper

from pipeline.bundle import (CALIBRATION_IMAGES, CALIBRATION_ROWS, MANIFEST, VARIANT_FILES, Bundle, sha256_file)
from pipeline.calibrate import Calibration, calibrate, conformal_p_values
from pipeline.contract import IMAGE_INPUT, IR_VERSION, categorical_input_name
from pipeline.errors import BundleError, ConfigError, ExportError, PipelineError
from pipeline.runtime import CUDA, create_session
from pipeline.schema import categorical_strings, numeric_matrix

log = logging.getLogger("vaeguard")

TOOLS = {"fp16": "onnxruntime.transformers.float16", "int8": "onnxruntime.quantization.quantize_dynamic"}
# The TorchScript exporter scopes node names by module: the VAE's encoder and decoder nodes are
# "/encoder/..." and "/decoder/..."; the feature step, the score and the table are not.
VAE_SCOPES = ("/encoder/", "/decoder/")
# CalibrationTable's buffers, as the exporter names their initializers.
TABLE_SCORES, TABLE_THRESHOLD = "table.scores", "table.threshold"
SCORE_OUTPUTS = ["score", "p_value", "is_anomaly"]
TABLE_CHUNK = 65_536  # rows per run when scoring calibration rows: vaeguard score's default batch
IMAGE_CHUNK = 256  # images per run (pipeline.image_score's batch)
SPEED_ROWS = 65_536
SPEED_IMAGES = 1_024
REPEATS = 5
BATCH_PROBE = 256  # calibration inputs also scored one at a time, to measure batch dependence
# Above these, `vaeguard export` and `vaeguard score` warn (the manifest keeps the warnings).
MIN_AGREEMENT = 0.99
MAX_BATCH_CHANGE = 0.01


# --- calibration inputs --------------------------------------------------------------------


def is_image(bundle: Bundle) -> bool:
    return bundle.manifest.get("modality", "table") == "image"


def calibration_feeds(bundle: Bundle) -> dict[str, np.ndarray]:
    """The scorer's inputs for the bundle's calibration rows (or images)."""
    name = CALIBRATION_IMAGES if is_image(bundle) else CALIBRATION_ROWS
    path = bundle.path / name
    if name not in bundle.manifest["files"] or not path.is_file():
        raise BundleError(f"{bundle.path}: no {name} (bundles trained before reduced-precision export do not keep "
                          f"their calibration inputs); retrain with `vaeguard train` to add variants")
    if is_image(bundle):
        return {IMAGE_INPUT: np.ascontiguousarray(np.load(path), dtype=np.float32)}
    frame = pd.read_parquet(path)
    schema = bundle.schema
    feeds = {"numeric": numeric_matrix(frame, schema.numeric, str(path))} if schema.numeric else {}
    for column, values in zip(schema.categorical, categorical_strings(frame, schema.categorical)):
        feeds[categorical_input_name(column)] = values
    return feeds


def rows_of(feeds: dict[str, np.ndarray]) -> int:
    return len(next(iter(feeds.values())))


def take(feeds: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(values[index]) for name, values in feeds.items()}


def tiled(feeds: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The inputs repeated up to ``rows`` rows, for throughput measurements."""
    return take(feeds, np.arange(rows) % rows_of(feeds))


def run_scorer(session, feeds: dict[str, np.ndarray], chunk: int, outputs=SCORE_OUTPUTS) -> dict[str, np.ndarray]:
    """Score in chunks of ``chunk`` rows, as batch scoring does (dynamic int8 depends on the batch)."""
    parts = [session.run(list(outputs), take(feeds, slice(i, i + chunk))) for i in range(0, rows_of(feeds), chunk)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(outputs)}


# --- graph passes ----------------------------------------------------------------------------


def prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with one opset import per domain (onnx.compose repeats the default one, which the
    quantizer rejects) and a unique name on every node (the converters name casts after them)."""
    model = copy.deepcopy(model)
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in versions.items())
    taken = {node.name for node in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"front/{node.op_type}_{i}"
            assert node.name not in taken
    return model


def vae_nodes(model: onnx.ModelProto, op_types: tuple[str, ...] | None = None) -> list[str]:
    names = [n.name for n in model.graph.node if n.name.startswith(VAE_SCOPES)
             and (op_types is None or n.op_type in op_types)]
    if not names:
        raise ExportError("scorer.onnx has no /encoder/ or /decoder/ nodes to convert; re-export the bundle "
                          "with this version of vaeguard")
    return names


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def gemm_to_matmul(model: onnx.ModelProto, nodes: set[str] | None = None) -> onnx.ModelProto:
    """Gemm(X, W, b) with a constant W (nn.Linear: transB=1) -> MatMul(X, W^T) + b, on a copy.

    onnxruntime's dynamic quantizer covers MatMul (as MatMulInteger) but not Gemm, which is
    what the TorchScript exporter writes for nn.Linear. The result computes the same numbers.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    rewritten, added = [], []
    for node in graph.node:
        simple = (node.op_type == "Gemm" and (nodes is None or node.name in nodes) and node.input[1] in weights
                  and _attribute(node, "transA", 0) == 0 and _attribute(node, "alpha", 1.0) == 1.0
                  and _attribute(node, "beta", 1.0) == 1.0)
        if not simple:
            rewritten.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        if _attribute(node, "transB", 0):
            weight = weight.T
        weight_name = f"{node.input[1]}.matmul"
        added.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        rewritten.append(helper.make_node("MatMul", [node.input[0], weight_name], [product],
                                          name=f"{node.name}.matmul"))
        if has_bias:
            rewritten.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                              name=f"{node.name}.add"))
    del graph.node[:]
    graph.node.extend(rewritten)
    graph.initializer.extend(added)
    _drop_unused_initializers(model)
    return model


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _toposort(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    available = {""} | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    ordered, pending = [], list(nodes)
    while pending:
        blocked = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                blocked.append(node)
        if len(blocked) == len(pending):
            raise ExportError(f"converted graph has unresolved inputs at {[n.name for n in blocked][:3]}")
        pending = blocked
    return ordered


def _cast_to(node: onnx.NodeProto) -> int | None:
    return _attribute(node, "to", None) if node.op_type == "Cast" else None


def keep_fp32_paths(model: onnx.ModelProto) -> onnx.ModelProto:
    """Undo the float16 converter's round trips between float32 nodes, in place.

    The converter declares every float tensor float16: a node left in float32 gets its output
    cast to float16 and cast back by each consumer (one Cast per consumer, with the same name:
    an invalid graph). Between two float32 nodes that is a lossy round trip, so the score, the
    table lookups and the comparison would see float16 values. Each Cast(float32 -> float16 ->
    float32) is bypassed here, duplicate nodes dropped, dead nodes pruned and the nodes sorted
    (the converter appends its casts at the end).
    """
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]
             if v.type.HasField("tensor_type")}
    types |= {init.name: init.data_type for init in graph.initializer}
    unique, seen = [], set()
    for node in graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            unique.append(node)
    producer = {name: node for node in unique for name in node.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in unique:
        source = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if (_cast_to(node) == TensorProto.FLOAT and source is not None and _cast_to(source) == TensorProto.FLOAT16
                and types.get(source.input[0]) == TensorProto.FLOAT):
            if node.output[0] in outputs:
                kept.append(helper.make_node("Identity", [source.input[0]], [node.output[0]], name=node.name))
            else:
                rename[node.output[0]] = source.input[0]
            continue
        kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    ordered = _toposort(graph, kept)
    needed = set(outputs)
    live = []
    for node in reversed(ordered):
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    value_info = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    _drop_unused_initializers(model)
    return model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The VAE's nodes in float16; inputs, outputs and everything else float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = prepared(model)
    allowed = set(vae_nodes(model))
    blocked = [node.name for node in model.graph.node if node.name not in allowed]
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
    return keep_fp32_paths(converted)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizer warns through the root logger ("consider pre-processing"), which the CLI
    would print without a handler; vaeguard's own log stays as it is."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def to_int8(model: onnx.ModelProto, workdir: Path) -> onnx.ModelProto:
    """Dynamic int8 quantization of the VAE's MatMuls (from its Gemms) and convolutions."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = prepared(model)
    model = gemm_to_matmul(model, set(vae_nodes(model, ("Gemm",))))
    targets = vae_nodes(model, ("MatMul", "Conv"))
    output = workdir / f".int8-{uuid.uuid4().hex[:8]}.onnx"
    try:
        with _quiet_root_logger():
            quantize_dynamic(model, output, op_types_to_quantize=["MatMul", "Conv"], nodes_to_quantize=targets,
                             per_channel=True, weight_type=QuantType.QInt8)
        return onnx.load(str(output))
    finally:
        output.unlink(missing_ok=True)


CONVERTERS = {"fp16": lambda model, workdir: to_fp16(model), "int8": to_int8}


# --- the calibration table -----------------------------------------------------------------


def padded_scores(calibration: Calibration) -> np.ndarray:
    """The table as CalibrationTable bakes it: +inf up to a power of two >= n + 1."""
    size = 1 << int(np.ceil(np.log2(calibration.n + 1)))
    padded = np.full(size, np.inf, dtype=np.float32)
    padded[: calibration.n] = calibration.scores
    return padded


def find_table(model: onnx.ModelProto, calibration: Calibration) -> tuple[str, str]:
    """The names of the table's initializers, checked by value against the manifest."""
    inits = {init.name: init for init in model.graph.initializer}
    if TABLE_SCORES not in inits or TABLE_THRESHOLD not in inits:
        raise ExportError(f"scorer.onnx has no {TABLE_SCORES} / {TABLE_THRESHOLD} initializers; re-export the bundle "
                          f"with this version of vaeguard")
    scores, threshold = (numpy_helper.to_array(inits[name]) for name in (TABLE_SCORES, TABLE_THRESHOLD))
    if not (np.array_equal(scores, padded_scores(calibration))
            and threshold.shape == () and threshold == np.float32(calibration.threshold)):
        raise ExportError("scorer.onnx's baked calibration table does not match the manifest's; re-export the bundle")
    return TABLE_SCORES, TABLE_THRESHOLD


def write_table(model: onnx.ModelProto, calibration: Calibration) -> onnx.ModelProto:
    """Replace the baked table and threshold (float32, same padded size) in place."""
    replacements = {TABLE_SCORES: padded_scores(calibration),
                    TABLE_THRESHOLD: np.asarray(calibration.threshold, dtype=np.float32)}
    found = 0
    for init in model.graph.initializer:
        if init.name in replacements:
            if init.data_type != TensorProto.FLOAT:
                kind = TensorProto.DataType.Name(init.data_type)
                raise ExportError(f"the converted scorer holds {init.name} as {kind}, not float32; the calibration "
                                  f"table must stay float32")
            old = numpy_helper.to_array(init)
            if old.shape != replacements[init.name].shape:
                raise ExportError(f"{init.name} has shape {old.shape}, expected {replacements[init.name].shape}")
            init.CopyFrom(numpy_helper.from_array(replacements[init.name], init.name))
            found += 1
    if found != len(replacements):
        raise ExportError(f"the converted scorer lost its {TABLE_SCORES} / {TABLE_THRESHOLD} initializers")
    return model


def check_consistency(outputs: dict[str, np.ndarray], calibration: Calibration, precision: str) -> dict:
    """The variant, re-scoring its own calibration inputs, must flag exactly the calibration
    scores above its threshold, with the table's p-values and the rule p_value <= target FPR."""
    score, p_value, flagged = outputs["score"], outputs["p_value"], outputs["is_anomaly"].astype(bool)
    expected = int(np.sum(calibration.scores > np.float32(calibration.threshold)))
    problems = []
    if not np.array_equal(flagged, score > np.float32(calibration.threshold)):
        problems.append("is_anomaly differs from score > threshold")
    if not np.array_equal(flagged, p_value <= np.float32(calibration.target_fpr)):
        problems.append("is_anomaly differs from p_value <= target FPR")
    if not np.array_equal(p_value, conformal_p_values(calibration.scores, score)):
        problems.append("p-values differ from the calibration table's")
    if int(flagged.sum()) != expected:
        problems.append(f"{int(flagged.sum())} calibration inputs flagged, the conformal count is {expected}")
    if problems:
        raise ExportError(f"the {precision} scorer is not consistent with its own calibration ({'; '.join(problems)}); "
                          f"the bundle was left unchanged")
    return {"rows": len(score), "flagged": expected, "rate": expected / len(score), "passed": True}


# --- measurements --------------------------------------------------------------------------


def score_errors(reference: dict[str, np.ndarray], variant: dict[str, np.ndarray]) -> dict:
    error = np.abs(variant["score"].astype(np.float64) - reference["score"].astype(np.float64))
    relative = error / np.maximum(np.abs(reference["score"].astype(np.float64)), 1e-12)
    return {"decision_agreement": float(np.mean(variant["is_anomaly"] == reference["is_anomaly"])),
            "max_abs_score_error": float(error.max()), "max_rel_score_error": float(relative.max()),
            "median_rel_score_error": float(np.median(relative))}


def batch_dependence(session, feeds: dict[str, np.ndarray], batched: np.ndarray, chunk: int) -> dict:
    """Scores of the first inputs one at a time against the same inputs scored in chunks.

    Dynamic quantization picks each activation's int8 range per run, over the whole batch, so a
    row's score depends on the rows scored with it; float graphs give 0 here.
    """
    rows = min(BATCH_PROBE, rows_of(feeds))
    alone = run_scorer(session, take(feeds, slice(0, rows)), 1, ["score"])["score"]
    change = np.abs(alone.astype(np.float64) - batched[:rows]) / np.maximum(np.abs(batched[:rows]), 1e-12)
    return {"rows": rows, "chunk": chunk, "max_rel_score_change": float(change.max())}


def throughput(sessions: dict[str, object], feeds: dict[str, np.ndarray], repeats: int = REPEATS) -> dict[str, float]:
    """Rows/s of each session on the same inputs, best of ``repeats``, interleaved so that a
    busy neighbour slows every session alike."""
    rows = rows_of(feeds)
    best = {name: float("inf") for name in sessions}
    for name, session in sessions.items():
        session.run(SCORE_OUTPUTS, feeds)  # warm-up: allocations, CUDA kernels
    for _ in range(repeats):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(SCORE_OUTPUTS, feeds)
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: rows / seconds for name, seconds in best.items()}


def device_name(device: str) -> str:
    if device == "cpu":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or platform.machine()
    return "CUDA GPU"


# --- the export ----------------------------------------------------------------------------


def write_manifest_atomic(directory: Path, manifest: dict) -> None:
    temporary = directory / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        temporary.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        os.replace(temporary, directory / MANIFEST)
    finally:
        temporary.unlink(missing_ok=True)


def save_model(model: onnx.ModelProto, path: Path, props: dict[str, str]) -> None:
    helper.set_model_props(model, props)
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))


def export_variant(bundle_path: str | Path, precision: str, device: str = "cpu", threads: int | None = None,
                   repeats: int = REPEATS) -> dict:
    """Add scorer.<precision>.onnx to a bundle with its own calibration; returns its manifest entry."""
    if precision not in VARIANT_FILES:
        raise ConfigError(f"--precision must be one of {', '.join(VARIANT_FILES)} for export, got {precision!r} "
                          f"(fp32 is scorer.onnx itself)")
    bundle = Bundle.load(bundle_path)
    directory = bundle.path
    name = VARIANT_FILES[precision]
    image = is_image(bundle)
    chunk = IMAGE_CHUNK if image else TABLE_CHUNK
    feeds = calibration_feeds(bundle)
    fp32_calibration = bundle.calibration
    fp32_model = onnx.load(str(bundle.scorer_path))
    find_table(fp32_model, fp32_calibration)
    tag = uuid.uuid4().hex[:8]
    draft, final = directory / f".{name}.draft-{tag}", directory / f".{name}.tmp-{tag}"
    try:
        variant = CONVERTERS[precision](fp32_model, directory)
        props = {p.key: p.value for p in fp32_model.metadata_props}
        save_model(variant, draft, props)
        try:
            session = create_session(draft, device, threads)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error, made one line
            raise ExportError(f"onnxruntime cannot run the {precision} scorer of {'an image' if image else 'a table'} "
                              f"bundle on this machine ({str(exc).splitlines()[0][:200]}); keep using fp32") from exc
        # The table does not enter the score, so the draft scores as the final variant will.
        scores = run_scorer(session, feeds, chunk)["score"]
        if not np.all(np.isfinite(scores)):
            raise ExportError(f"the {precision} scorer gives non-finite scores on "
                              f"{int(np.sum(~np.isfinite(scores)))} calibration inputs (float16 overflow?); keep fp32")
        calibration = calibrate(scores, fp32_calibration.target_fpr)
        save_model(write_table(variant, calibration), final,
                   props | {"vaeguard.precision": precision, "vaeguard.threshold": repr(calibration.threshold),
                            "vaeguard.n_calibration": str(calibration.n), "vaeguard.tool": TOOLS[precision]})
        onnx.checker.check_model(str(final), full_check=True)
        session = create_session(final, device, threads)
        outputs = run_scorer(session, feeds, chunk)
        consistency = check_consistency(outputs, calibration, precision)
        reference_session = create_session(bundle.scorer_path, device, threads)
        reference = run_scorer(reference_session, feeds, chunk)
        used = "cuda" if session.get_providers()[0] == CUDA else "cpu"
        speed_feeds = tiled(feeds, SPEED_IMAGES if image else SPEED_ROWS)
        rates = throughput({"fp32": reference_session, precision: session}, speed_feeds, repeats)
        entry = {
            "file": name, "precision": precision, "tool": TOOLS[precision],
            "created_at": datetime.now(timezone.utc).isoformat(),
            "threshold": calibration.threshold,
            "calibration": calibration.to_dict(),
            "reduced": "the VAE (encoder and decoder nodes); preprocessing, score sum, calibration table, "
                       "binary search and threshold comparison stay float32",
            "compared_on": f"{rows_of(feeds)} calibration {'images' if image else 'rows'}, against scorer.onnx",
            **score_errors(reference, outputs),
            "speed_ratio": rates[precision] / rates["fp32"],
            "fp32_rows_per_s": rates["fp32"], "variant_rows_per_s": rates[precision],
            "speed_batch": rows_of(speed_feeds), "speed_repeats": repeats,
            "device": used, "device_name": device_name(used),
            "threads": session.get_session_options().intra_op_num_threads,
            "batch_dependence": batch_dependence(session, feeds, outputs["score"], chunk),
            "consistency": consistency,
        }
        entry["warnings"] = variant_warnings(entry)
        manifest = copy.deepcopy(bundle.manifest)
        if name in manifest["files"]:
            # Re-export: drop the old variant from the manifest first, so no moment leaves a
            # manifest naming a file whose hash it does not match.
            manifest["files"].pop(name)
            manifest.get("variants", {}).pop(precision, None)
            write_manifest_atomic(directory, manifest)
        os.replace(final, directory / name)
        manifest["files"][name] = sha256_file(directory / name)
        manifest.setdefault("variants", {})[precision] = entry
        write_manifest_atomic(directory, manifest)
        return entry
    finally:
        draft.unlink(missing_ok=True)
        final.unlink(missing_ok=True)


def variant_warnings(entry: dict) -> list[str]:
    """What a user of the variant must know: weak agreement, or scores that depend on the batch.

    The second matters more than it looks: the variant is calibrated on batches of normal rows,
    and dynamic int8 widens its activation ranges on a batch holding extreme rows, which makes
    the normal rows beside them noisier and higher, so the false-alarm rate on such batches can
    exceed the target (measured on the demo table: 4.1% at a 1% target; BENCHMARKS.md).
    """
    warnings = []
    if entry["decision_agreement"] < MIN_AGREEMENT:
        warnings.append(f"its decisions agree with fp32 on only {entry['decision_agreement']:.2%} of the calibration "
                        f"inputs")
    change = entry["batch_dependence"]["max_rel_score_change"]
    if change > MAX_BATCH_CHANGE:
        warnings.append(f"its scores depend on the other rows in a batch (up to {change:.1%} apart when scored "
                        f"alone), so on batches with extreme rows its false-alarm rate can exceed the target; "
                        f"check it on labelled data, or use fp32 or fp16")
    return warnings


def describe_variant(entry: dict) -> str:
    """A few lines for `vaeguard export`."""
    calibration, batch = entry["calibration"], entry["batch_dependence"]
    return "\n".join([
        f"file:        {entry['file']} ({entry['tool']})",
        f"threshold:   {entry['threshold']:.6g} (own calibration: expected FPR {calibration['expected_fpr']:.4%} "
        f"from {calibration['n_calibration']:,} inputs)",
        f"agreement:   decisions agree with fp32 on {entry['decision_agreement']:.2%} of the calibration inputs",
        f"score error: max abs {entry['max_abs_score_error']:.3g}, max rel {entry['max_rel_score_error']:.2%}, "
        f"median rel {entry['median_rel_score_error']:.3%}",
        f"speed:       {entry['speed_ratio']:.2f}x fp32 ({entry['variant_rows_per_s']:,.0f} vs "
        f"{entry['fp32_rows_per_s']:,.0f} rows/s, {entry['device']}, {entry['threads']} threads)",
        f"batch:       scores change by up to {batch['max_rel_score_change']:.2%} when scored one at a time",
    ])
