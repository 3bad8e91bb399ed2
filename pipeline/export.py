"""Writing the three ONNX graphs of a bundle: encoder, decoder and the self-contained scorer.

Uses torch's TorchScript-based exporter (no onnxscript needed, one file per model, dynamic
batch axis named ``batch_size``). The scorer's categorical front end (strings -> one-hot with
an unknown bucket) is built with onnx.helper on the ai.onnx.ml OneHotEncoder (after a LabelEncoder
for boolean and integer-coded columns) and composed in front of the exported numeric graph.

The scorer is exported before it is calibrated, with a placeholder table of the right size
(pipeline.calibrate.placeholder_calibration): training scores the calibration inputs with that
very graph in onnxruntime, calibrates on those scores, and ``write_calibrated_scorer`` puts the
table into it. The table does not enter the score, so the bundle's scorer.onnx gives exactly the
scores it was calibrated on.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, compose, helper

from pipeline.calibrate import Calibration
from pipeline.contract import BATCH_AXIS as BATCH
from pipeline.contract import IMAGE_INPUT, IMAGE_OUTPUT_NAMES, IR_VERSION, ML_OPSET, OPSET, OUTPUT_NAMES, categorical_input_name
from pipeline.image_model import ConvVAE
from pipeline.model import VAE
from pipeline.precision_graphs import write_table
from pipeline.preprocess import UNKNOWN, Preprocessor
from pipeline.scorer_graph import ImageScorerGraph, ScorerGraph


def export_module(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path,
                  input_names: list[str], output_names: list[str]) -> onnx.ModelProto:
    axes = {name: {0: BATCH} for name in input_names + output_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=input_names, output_names=output_names,
                          dynamic_axes=axes, do_constant_folding=True, external_data=False)
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    # The exporter's shape inference can leak the batch axis name into other axes (after
    # interpolate it declared an image's height as batch_size). Only axis 0 varies, so the
    # others are declared from a real run: engines that plan buffers from shapes need that.
    with torch.no_grad():
        outputs = module(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for value, tensor in zip(model.graph.output, outputs):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis > 0:
                dim.Clear()
                dim.dim_value = tensor.shape[axis]
    return model


def export_encoder(vae: VAE, path: Path) -> None:
    example = torch.zeros(2, vae.n_features)
    model = export_module(vae.encoder.eval(), (example,), path, ["features"], ["mu", "logvar"])
    onnx.save(model, str(path))


def export_decoder(vae: VAE, path: Path) -> None:
    example = torch.zeros(2, vae.latent_dim)
    model = export_module(vae.decoder.eval(), (example,), path, ["z"], ["reconstruction"])
    onnx.save(model, str(path))


def export_scorer(graph: ScorerGraph, pre: Preprocessor, path: Path) -> None:
    examples = []
    if graph.has_numeric:
        examples.append(torch.zeros(2, len(pre.numeric)))
    if graph.has_onehot:
        examples.append(torch.zeros(2, pre.n_onehot))
    core = export_module(graph.eval(), tuple(examples), path, graph.input_names(), list(OUTPUT_NAMES))
    if graph.has_onehot:
        core = compose.merge_models(categorical_front(pre), core, io_map=[("onehot_block", "onehot")])
        core.ir_version = IR_VERSION
        one_opset_per_domain(core)
    onnx.save(core, str(path))


def write_calibrated_scorer(draft: Path, calibration: Calibration, path: Path) -> None:
    """The scorer exported at ``draft`` with ``calibration``'s table and threshold, written to ``path``."""
    model = write_table(onnx.load(str(draft)), calibration)
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))


def one_opset_per_domain(model: onnx.ModelProto) -> None:
    """onnx.compose.merge_models imports the default domain once per model it merges; the IR
    allows one version per domain, and stricter loaders (onnxruntime's quantizer, vendor
    converters) refuse a repeat."""
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in versions.items())


def categorical_front(pre: Preprocessor) -> onnx.ModelProto:
    """One string input per categorical column -> one float one-hot block with unknown buckets.

    OneHotEncoder with zeros=1 maps an unseen string to all zeros; the unknown bucket is then
    1 - (sum of the row), so each column's block always holds exactly one 1.

    A column with spellings (boolean: 'True' for 'true'; integer-coded: '3.0' for '3') first goes
    through a LabelEncoder that maps each spelling to its category (as Preprocessor.one_hot reads
    them), and anything else to a string that is no category (unknown), so every runtime decides
    alike from the raw strings.
    """
    inputs, nodes, blocks = [], [], []
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    axis = helper.make_tensor("axis_1", TensorProto.INT64, [1], [1])
    for i, stats in enumerate(pre.categorical):
        name = categorical_input_name(stats.name)
        inputs.append(helper.make_tensor_value_info(name, TensorProto.STRING, [BATCH]))
        known, seen, unknown = f"known_{i}", f"seen_{i}", f"unknown_{i}"
        values = name
        spellings = stats.spellings
        if spellings is not None:
            values = f"canonical_{i}"
            nodes.append(helper.make_node("LabelEncoder", [name], [values], domain="ai.onnx.ml",
                                          keys_strings=list(spellings), values_strings=list(spellings.values()),
                                          default_string=UNKNOWN))
        nodes += [
            helper.make_node("OneHotEncoder", [values], [known], domain="ai.onnx.ml",
                             cats_strings=list(stats.categories), zeros=1),
            helper.make_node("ReduceSum", [known, "axis_1"], [seen], keepdims=1),
            helper.make_node("Sub", ["one", seen], [unknown]),
        ]
        blocks += [known, unknown]
    nodes.append(helper.make_node("Concat", blocks, ["onehot_block"], axis=1))
    output = helper.make_tensor_value_info("onehot_block", TensorProto.FLOAT, [BATCH, pre.n_onehot])
    graph = helper.make_graph(nodes, "categorical_front", inputs, [output], initializer=[one, axis])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("ai.onnx.ml", ML_OPSET)])
    model.ir_version = IR_VERSION
    return model


def set_metadata(path: Path, props: Mapping[str, str]) -> None:
    """Key facts in the ONNX file itself, for runtimes that never read the manifest."""
    model = onnx.load(str(path))
    helper.set_model_props(model, {k: str(v) for k, v in props.items()})
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))


def export_image_encoder_decoder(vae: ConvVAE, directory: Path) -> None:
    """encoder.onnx and decoder.onnx of a convolutional VAE."""
    example = torch.zeros(2, vae.channels, vae.size, vae.size)
    onnx.save(export_module(vae.encoder.eval(), (example,), directory / "encoder.onnx", ["images"], ["mu", "logvar"]),
              str(directory / "encoder.onnx"))
    onnx.save(export_module(vae.decoder.eval(), (torch.zeros(2, vae.latent_dim),), directory / "decoder.onnx", ["z"],
                            ["reconstruction"]), str(directory / "decoder.onnx"))


def export_image_scorer(graph: ImageScorerGraph, path: Path) -> None:
    example = torch.zeros(2, graph.vae.channels, graph.vae.size, graph.vae.size)
    onnx.save(export_module(graph.eval(), (example,), path, [IMAGE_INPUT], list(IMAGE_OUTPUT_NAMES)), str(path))
