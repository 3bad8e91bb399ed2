"""Graph passes behind the reduced-precision scorers (pipeline.precision makes, checks and
records the variants; this module only rewrites ONNX graphs).

- ``to_fp16``: the VAE's nodes in float16 (onnxruntime's converter), with the converter's
  float32 -> float16 -> float32 round trips between float32 nodes undone (``keep_fp32_paths``).
- ``to_int8``: int8 weights from onnxruntime's ``quantize_dynamic`` (after ``gemm_to_matmul``:
  the quantizer covers MatMul, not Gemm), with every activation quantized per row instead of per
  batch (``per_row_activations``) and the Elus in front of the quantizers spelled with Exp
  (``position_free_elu``), so a row's score does not depend on the rows scored with it.
- ``find_table`` / ``write_table``: the baked calibration table, checked and replaced.

What runs in reduced precision is the VAE only: the nodes the TorchScript exporter scopes
/encoder/ and /decoder/. Preprocessing, the score, the table and the threshold stay float32.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.calibrate import Calibration
from pipeline.errors import ExportError

# The TorchScript exporter scopes node names by module: the VAE's encoder and decoder nodes are
# "/encoder/..." and "/decoder/..."; the feature step, the score and the table are not.
VAE_SCOPES = ("/encoder/", "/decoder/")
# CalibrationTable's buffers, as the exporter names their initializers.
TABLE_SCORES, TABLE_THRESHOLD = "table.scores", "table.threshold"
# Symmetric 8-bit activations: a row's largest |value| maps to 128 +- 127, 0 to 128 (0 is never used).
INT8_LEVELS, ZERO_POINT = 127, 128
INTEGER_OPS = ("MatMulInteger", "ConvInteger")  # input 0: the activation, input 2: its zero point


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
    A Gemm that reads X transposed (transA=1: the encoder's first layer, which reads the
    scorer's [features, rows] block) gets an explicit Transpose in front of its MatMul.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    rewritten, added = [], []
    for node in graph.node:
        simple = (node.op_type == "Gemm" and (nodes is None or node.name in nodes) and node.input[1] in weights
                  and _attribute(node, "alpha", 1.0) == 1.0
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
        rows = node.input[0]
        if _attribute(node, "transA", 0):
            rows = f"{node.name}.rows"
            rewritten.append(helper.make_node("Transpose", [node.input[0]], [rows], perm=[1, 0],
                                              name=f"{node.name}.transpose_a"))
        rewritten.append(helper.make_node("MatMul", [rows, weight_name], [product],
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
    """int8 weights from quantize_dynamic (per output channel for MatMul, per tensor for Conv),
    activations quantized per row (``per_row_activations``, ``position_free_elu``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = prepared(model)
    model = gemm_to_matmul(model, set(vae_nodes(model, ("Gemm",))))
    targets = vae_nodes(model, ("MatMul", "Conv"))
    output = workdir / f".int8-{uuid.uuid4().hex[:8]}.onnx"
    try:
        with _quiet_root_logger():
            quantize_dynamic(model, output, op_types_to_quantize=["MatMul", "Conv"], nodes_to_quantize=targets,
                             per_channel=True, weight_type=QuantType.QInt8)
        quantized = onnx.load(str(output))
    finally:
        output.unlink(missing_ok=True)
    return per_row_activations(position_free_elu(quantized))


def per_row_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """Quantize every activation per row (per image) instead of per run, in place.

    quantize_dynamic writes, in front of each quantized MatMul or Conv:

        x -> DynamicQuantizeLinear -> x_q (uint8), x_scale, x_zero_point      one range for all of x
        MatMulInteger(x_q, W_q, x_zero_point, W_zero_point) -> Cast -> Mul by Mul(x_scale, W_scale)

    DynamicQuantizeLinear takes its range from the whole tensor, that is from the whole batch, so
    a row's int8 values, and its score, depended on the rows scored with it: a batch holding
    extreme rows widened the range and made every normal row beside them noisier (a 4x false-alarm
    rate on the demo table, BENCHMARKS.md). vaeguard promises that a row gets the same score in any
    batch, so each DynamicQuantizeLinear becomes symmetric 8-bit quantization with one scale per
    row, taken from that row alone (for images, one per image):

        row_scale = max(ReduceMax(|x|, every axis but the batch axis) / 127, FLT_MIN)      [rows]
        x_q       = QuantizeLinear(x, row_scale, zero point 128 on every row, axis=0)     uint8, 1..255
        MatMulInteger(x_q, W_q, 128, W_zero_point) -> Cast -> Mul by W_scale -> Mul by row_scale [rows, 1, ...]

    - Symmetric (zero point 128 on every row), because onnxruntime's CPU MatMulInteger and
      ConvInteger take one activation zero point per tensor and refuse a per-row one; 0 stays
      exact, as with DynamicQuantizeLinear. It is int8 symmetric quantization shifted by 128: the
      activations stay uint8 because onnxruntime's uint8 x int8 kernels are the fast ones (int8 x
      int8 MatMulInteger ran 12x slower on this CPU).
    - The FLT_MIN floor keeps an all-zero row at zero instead of 0 / 0.
    - Two Muls to dequantize, not one by x_scale * W_scale: onnxruntime fuses MatMulInteger ->
      Cast -> Mul(.., Mul) into MatMulIntegerToFloat, which takes one activation scale per tensor
      and silently gives wrong scores with a per-row one.
    - The weights stay as quantize_dynamic made them: int8, zero point 0, one scale per output
      column for MatMul and one per tensor for Conv.

    Every other node is per row or elementwise, so a row is computed from its own values only;
    ``pipeline.precision`` checks it at export (each input alone against whole batches).
    """
    graph = model.graph
    ranks = _ranks(model)
    producer = {name: node for node in graph.node for name in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def only_consumer(name: str, op_type: str, where: str) -> onnx.NodeProto:
        users = consumers[name]
        if len(users) != 1 or users[0].op_type != op_type:
            raise ExportError(f"the int8 graph has an unexpected pattern after {where} (expected one {op_type}, "
                              f"found {sorted(u.op_type for u in users)}); keep fp32 or use fp16")
        return users[0]

    levels, floor, center = "per_row.levels", "per_row.floor", "per_row.center"
    graph.initializer.extend([numpy_helper.from_array(np.float32(INT8_LEVELS), levels),
                              numpy_helper.from_array(np.finfo(np.float32).tiny, floor),
                              numpy_helper.from_array(np.uint8(ZERO_POINT), center)])
    replaced: dict[str, list[onnx.NodeProto]] = {}  # node name -> the nodes that take its place
    changed: set[str] = set()
    for node in [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]:
        x, quantized, scale, zero_point = node.input[0], *node.output
        rank = ranks.get(x)
        if not rank or rank < 2:
            raise ExportError(f"the int8 graph quantizes {x}, whose rank is unknown; keep fp32 or use fp16")
        step = f"{node.name}.per_row"
        axes = f"{step}/axes"
        graph.initializer.append(numpy_helper.from_array(np.arange(1, rank, dtype=np.int64), axes))
        row_zero_points = numpy_helper.from_array(np.array([ZERO_POINT], np.uint8), "value")
        replaced[node.name] = [
            helper.make_node("Abs", [x], [f"{step}/abs"], name=f"{step}/Abs"),
            helper.make_node("ReduceMax", [f"{step}/abs"], [f"{step}/max"], name=f"{step}/ReduceMax",
                             axes=list(range(1, rank)), keepdims=0),
            helper.make_node("Div", [f"{step}/max", levels], [f"{step}/raw_scale"], name=f"{step}/Div"),
            helper.make_node("Max", [f"{step}/raw_scale", floor], [f"{step}/row_scale"], name=f"{step}/Max"),
            helper.make_node("Shape", [f"{step}/row_scale"], [f"{step}/rows"], name=f"{step}/Shape"),
            helper.make_node("ConstantOfShape", [f"{step}/rows"], [f"{step}/zero_points"],
                             name=f"{step}/ConstantOfShape", value=row_zero_points),
            helper.make_node("QuantizeLinear", [x, f"{step}/row_scale", f"{step}/zero_points"], [quantized],
                             name=f"{step}/QuantizeLinear", axis=0),
            helper.make_node("Unsqueeze", [f"{step}/row_scale", axes], [scale], name=f"{step}/Unsqueeze"),
        ]
        users = consumers[quantized]
        if not users or {u.name for u in consumers[zero_point]} != {u.name for u in users}:
            raise ExportError(f"the int8 graph has an unexpected pattern after {node.name}; keep fp32 or use fp16")
        for user in users:
            if user.op_type not in INTEGER_OPS or user.input[0] != quantized or user.input[2] != zero_point:
                raise ExportError(f"the int8 graph has an unexpected pattern at {user.name}; keep fp32 or use fp16")
            user.input[2] = center
            cast = only_consumer(user.output[0], "Cast", user.name)
            dequantize = only_consumer(cast.output[0], "Mul", cast.name)
            scales = producer.get(next(name for name in dequantize.input if name != cast.output[0]))
            if scales is None or scales.op_type != "Mul" or scale not in scales.input:
                raise ExportError(f"the int8 graph has an unexpected pattern at {dequantize.name}; keep fp32 or "
                                  f"use fp16")
            weight_scaled = f"{dequantize.output[0]}.weight_scaled"
            replaced[scales.name] = []
            replaced[dequantize.name] = [
                helper.make_node("Mul", [cast.output[0], *(name for name in scales.input if name != scale)],
                                 [weight_scaled], name=dequantize.name),
                helper.make_node("Mul", [weight_scaled, scale], list(dequantize.output),
                                 name=f"{dequantize.name}.per_row"),
            ]
        changed |= {quantized, scale, zero_point}
    nodes = [new for node in graph.node for new in replaced.get(node.name, [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    # Shapes that changed (one scale per tensor -> one per row) are left to inference.
    kept = [v for v in graph.value_info if v.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    _drop_unused_initializers(model)
    return model


def position_free_elu(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each of the VAE's Elus -> Max(x, 0) + alpha * (Exp(Min(x, 0)) - 1), in place.

    onnxruntime's CPU Elu can differ in the last bit depending on where an element sits in the
    batch (measured on the demo table: about 1 hidden value in 130 between a row scored alone and
    in a batch). Harmless in float, but every Elu output here feeds a quantizer, which rounds: a
    last-bit change that crosses a rounding boundary moves the 8-bit value by a whole step, and
    the row's score with it. The Exp op gave the same bits at every position (the export's batch
    check holds every variant to that), so the Elus are spelled with it. exp(x) - 1 instead of
    expm1 costs about 1e-7 absolute, far below an 8-bit step.
    """
    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.op_type != "Elu" or not node.name.startswith(VAE_SCOPES):
            nodes.append(node)
            continue
        x, y, step = node.input[0], node.output[0], f"{node.name}.exp"
        alpha = f"{step}/alpha"
        graph.initializer.extend([numpy_helper.from_array(np.float32(_attribute(node, "alpha", 1.0)), alpha),
                                  numpy_helper.from_array(np.float32(0.0), f"{step}/zero"),
                                  numpy_helper.from_array(np.float32(1.0), f"{step}/one")])
        nodes += [
            helper.make_node("Min", [x, f"{step}/zero"], [f"{step}/negative"], name=f"{step}/Min"),
            helper.make_node("Exp", [f"{step}/negative"], [f"{step}/exp"], name=f"{step}/Exp"),
            helper.make_node("Sub", [f"{step}/exp", f"{step}/one"], [f"{step}/expm1"], name=f"{step}/Sub"),
            helper.make_node("Mul", [f"{step}/expm1", alpha], [f"{step}/below"], name=f"{step}/Mul"),
            helper.make_node("Max", [x, f"{step}/zero"], [f"{step}/above"], name=f"{step}/Max"),
            helper.make_node("Add", [f"{step}/above", f"{step}/below"], [y], name=f"{step}/Add"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: len(v.type.tensor_type.shape.dim)
            for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


CONVERTERS = {"fp16": lambda model, workdir: to_fp16(model), "int8": to_int8}


# --- the calibration table -----------------------------------------------------------------


def find_table(model: onnx.ModelProto, calibration: Calibration) -> tuple[str, str]:
    """The names of the table's initializers, checked by value against the manifest."""
    inits = {init.name: init for init in model.graph.initializer}
    if TABLE_SCORES not in inits or TABLE_THRESHOLD not in inits:
        raise ExportError(f"scorer.onnx has no {TABLE_SCORES} / {TABLE_THRESHOLD} initializers; re-export the bundle "
                          f"with this version of vaeguard")
    scores, threshold = (numpy_helper.to_array(inits[name]) for name in (TABLE_SCORES, TABLE_THRESHOLD))
    if not (np.array_equal(scores, calibration.search_table())
            and threshold.shape == () and threshold == np.float32(calibration.threshold)):
        raise ExportError("scorer.onnx's baked calibration table does not match the manifest's; re-export the bundle")
    return TABLE_SCORES, TABLE_THRESHOLD


def write_table(model: onnx.ModelProto, calibration: Calibration) -> onnx.ModelProto:
    """Replace the baked table and threshold (float32, same padded size) in place."""
    replacements = {TABLE_SCORES: calibration.search_table(),
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


