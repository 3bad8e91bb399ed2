"""Reduced-precision scorers (`vaeguard export --precision fp16|int8`): each variant has its own
calibration, loads through the hash check, agrees with fp32, scores a row alike in any batch,
scores through the CLI, and a failed export leaves the bundle as it was.

The table bundle is the session's `trained_bundle`, copied before anything is added to it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline import precision, precision_graphs
from pipeline.bundle import CALIBRATION_IMAGES, CALIBRATION_ROWS, Bundle, sha256_file
from pipeline.calibrate import Calibration
from pipeline.config import ImageTrainJob, ScoreJob
from pipeline.contract import IR_VERSION
from pipeline.errors import BundleError, DeviceError, ExportError
from pipeline.image_workflow import run_image_training
from pipeline.metrics import auroc
from pipeline.runtime import BundleScorer, gpu_present, variant_device
from pipeline.scoring import score
from pipeline.scoring_report import summary_markdown
from tests.conftest import run_main
from tests.test_image_pipeline import image_config, textures
from tests.test_layering import imported_after

VARIANTS = ("fp16", "int8")


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under a folder (hidden ones too) with a digest of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def variant_bundle(tmp_path_factory, trained_bundle) -> Path:
    """A copy of the session bundle with both variants added."""
    bundle = shutil.copytree(trained_bundle, tmp_path_factory.mktemp("variants") / "sensors")
    for name in VARIANTS:
        precision.export_variant(bundle, name, device="cpu", threads=2)
    return bundle


@pytest.fixture(scope="module")
def calibration_rows(trained_bundle) -> pd.DataFrame:
    return pd.read_parquet(trained_bundle / CALIBRATION_ROWS)


def test_training_keeps_the_calibration_rows(trained_bundle, calibration_rows):
    bundle = Bundle.load(trained_bundle)
    assert bundle.manifest["files"][CALIBRATION_ROWS] == sha256_file(trained_bundle / CALIBRATION_ROWS)
    assert list(calibration_rows.columns) == list(bundle.schema.feature_columns)  # no ids, no label
    assert len(calibration_rows) == bundle.calibration.n
    # They are the rows the fp32 table was calibrated on.
    scores = BundleScorer(bundle, "cpu", 2).score_frame(calibration_rows)["score"].to_numpy()
    np.testing.assert_allclose(np.sort(scores), bundle.calibration.scores, rtol=1e-5)


def test_both_variants_load_with_their_hashes(variant_bundle):
    bundle = Bundle.load(variant_bundle)
    for name in VARIANTS:
        entry = bundle.manifest["variants"][name]
        path = bundle.scorer_path_for(name)
        assert path.name == f"scorer.{name}.onnx" == entry["file"]
        assert bundle.manifest["files"][path.name] == sha256_file(path)
        assert entry["tool"] == precision.TOOLS[name]
        assert entry["device"] == "cpu" and entry["threads"] == 2 and entry["speed_ratio"] > 0
        assert entry["consistency"]["passed"] is True
        batch = entry["batch_dependence"]
        assert batch["passed"] is True and batch["rows"] == bundle.calibration.n
        assert batch["max_rel_score_change"] <= batch["tolerance"] == precision.BATCH_TOLERANCE
        assert entry["warnings"] == []  # decisions agree with fp32 on 99% or more
        assert {"decision_agreement", "max_abs_score_error", "max_rel_score_error", "median_rel_score_error",
                "created_at", "batch_dependence"} <= set(entry)
        onnx.checker.check_model(str(path), full_check=True)
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert props["vaeguard.precision"] == name and float(props["vaeguard.threshold"]) == entry["threshold"]
    assert bundle.scorer_path_for("fp32") == bundle.scorer_path


@pytest.mark.parametrize("name", VARIANTS)
def test_threshold_is_the_variants_own_conformal_quantile(variant_bundle, calibration_rows, name):
    bundle = Bundle.load(variant_bundle)
    entry, fp32 = bundle.manifest["variants"][name], bundle.calibration
    own = np.sort(BundleScorer(bundle, "cpu", 2, name).score_frame(calibration_rows)["score"].to_numpy())
    calibration = Calibration.from_dict(entry["calibration"])
    np.testing.assert_array_equal(calibration.scores, own)
    # Same n, rank and target as fp32; only the scores (and so the threshold) are the variant's.
    assert (calibration.n, calibration.rank, calibration.target_fpr) == (fp32.n, fp32.rank, fp32.target_fpr)
    assert entry["threshold"] == calibration.threshold == float(own[calibration.n - calibration.rank])
    # The table baked into the variant: float32, laid out as fp32's (-inf, the scores, +inf
    # padding to the same power of two), this threshold.
    inits = {i.name: i for i in onnx.load(str(bundle.scorer_path_for(name))).graph.initializer}
    assert inits["table.scores"].data_type == inits["table.threshold"].data_type == TensorProto.FLOAT
    table = numpy_helper.to_array(inits["table.scores"])
    assert len(table) == len(fp32.search_table()) >= calibration.n + 1
    assert table[0] == -np.inf
    np.testing.assert_array_equal(table[1:calibration.n + 1], own)
    assert np.all(table[calibration.n + 1:] == np.inf)
    assert numpy_helper.to_array(inits["table.threshold"]) == np.float32(entry["threshold"])


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_agree_with_fp32(variant_bundle, calibration_rows, incoming_csv, name):
    bundle = Bundle.load(variant_bundle)
    fp32, variant = BundleScorer(bundle, "cpu", 2), BundleScorer(bundle, "cpu", 2, name)
    on_cal = (fp32.score_frame(calibration_rows)["is_anomaly"] == variant.score_frame(calibration_rows)["is_anomaly"])
    assert on_cal.mean() >= 0.99
    assert bundle.manifest["variants"][name]["decision_agreement"] == pytest.approx(on_cal.mean())
    incoming = pd.read_csv(incoming_csv)
    labels = incoming["label"].to_numpy()
    reference, scored = fp32.score_frame(incoming), variant.score_frame(incoming)
    assert (reference["is_anomaly"] == scored["is_anomaly"]).mean() >= 0.99
    reference_auroc, variant_auroc = auroc(labels, reference["score"]), auroc(labels, scored["score"])
    assert variant_auroc > 0.9 and abs(variant_auroc - reference_auroc) <= 0.01


def _scored_in_batches(scorer: BundleScorer, frame: pd.DataFrame, size: int) -> pd.DataFrame:
    return pd.concat([scorer.score_frame(frame.iloc[i:i + size]) for i in range(0, len(frame), size)])


@pytest.mark.parametrize("name", ["fp32", *VARIANTS])
def test_a_rows_score_does_not_depend_on_its_batch(variant_bundle, incoming_csv, name):
    """The same rows alone, in batches of 7 and in the middle of a big batch of extreme rows
    (numeric columns x100) get the same scores and decisions, up to float rounding.

    int8 as quantize_dynamic writes it failed this: one activation range per batch, which the
    extreme rows widened, made the normal rows beside them score tens of percent apart.
    """
    bundle = Bundle.load(variant_bundle)
    scorer = BundleScorer(bundle, "cpu", 2, name)
    incoming = pd.read_csv(incoming_csv)
    rows, extreme = incoming.iloc[:70], incoming.iloc[70:1070].copy()
    numeric = list(bundle.schema.numeric)
    extreme[numeric] = extreme[numeric] * 100
    crowd = pd.concat([extreme.iloc[:500], rows, extreme.iloc[500:]])
    alone = _scored_in_batches(scorer, rows, 1)
    in_sevens = _scored_in_batches(scorer, rows, 7)
    in_crowd = scorer.score_frame(crowd).iloc[500:570]
    scale = np.maximum(np.abs(alone["score"].to_numpy(np.float64)), bundle.calibration_for(name)["threshold"])
    for batched in (in_sevens, in_crowd):
        change = np.abs(batched["score"].to_numpy(np.float64) - alone["score"].to_numpy(np.float64)) / scale
        assert change.max() <= precision.BATCH_TOLERANCE
        assert batched["is_anomaly"].tolist() == alone["is_anomaly"].tolist()
    assert scorer.score_frame(extreme)["is_anomaly"].mean() > 0.9  # the x100 rows are anomalies to every scorer


def _tiny_mlp() -> onnx.ModelProto:
    """x [rows, 6] -> Gemm -> Elu -> Gemm -> y [rows, 4], named like the exporter's encoder."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(size=(8, 6)), "b1": rng.normal(size=8), "w2": rng.normal(size=(4, 8)),
               "b2": rng.normal(size=4)}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="/encoder/fc1/Gemm", transB=1),
         helper.make_node("Elu", ["h"], ["a"], name="/encoder/act/Elu", alpha=1.0),
         helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="/encoder/fc2/Gemm", transB=1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 4])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    return model


def test_int8_quantizes_each_row_by_its_own_range(tmp_path):
    model = _tiny_mlp()
    quantized = precision_graphs.to_int8(model, tmp_path)
    quantized.ir_version = IR_VERSION
    onnx.checker.check_model(quantized, full_check=True)
    ops = [n.op_type for n in quantized.graph.node]
    assert "DynamicQuantizeLinear" not in ops and "Elu" not in ops and ops.count("MatMulInteger") == 2
    assert all(helper.get_attribute_value(n.attribute[0]) == 0 for n in quantized.graph.node
               if n.op_type == "QuantizeLinear")  # axis 0: one scale per row
    x = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)
    x[3] = 0.0  # an all-zero row: scale floored, not 0 / 0
    x[7] *= 1000.0  # an extreme row, which must not coarsen the others
    int8 = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    together = int8.run(None, {"x": x})[0]
    alone = np.concatenate([int8.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_array_equal(together, alone)
    fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = fp32.run(None, {"x": x})[0]
    assert np.all(np.isfinite(together))
    # 8 bits per row: each row near its own float32 magnitude, the extreme one too (with one range
    # for the whole batch, the median row was 94% off and the worst 3.2x).
    error = np.abs(together - reference).max(axis=1) / np.abs(reference).max(axis=1)
    assert np.median(error) < 0.02 and error.max() < 0.1, error


def test_a_batch_dependent_variant_fails_the_export(monkeypatch, tmp_path, trained_bundle):
    """int8 as quantize_dynamic writes it (one activation range per batch) is refused, in one line."""
    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    before = snapshot(bundle)
    monkeypatch.setattr(precision_graphs, "per_row_activations", lambda model: model)
    with pytest.raises(ExportError, match="scores depend on the batch") as caught:
        precision.export_variant(bundle, "int8", device="cpu", threads=2)
    assert "\n" not in str(caught.value) and "left unchanged" in str(caught.value)
    assert snapshot(bundle) == before


def test_fp16_reduces_only_the_vae(variant_bundle):
    model = onnx.load(str(variant_bundle / "scorer.fp16.onnx"))
    halves = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16}
    assert halves and all(name.startswith(("vae.encoder.", "vae.decoder.")) for name in halves)
    assert "vae.decoder.log_scale" not in halves  # it weighs the score, which stays float32
    computes = {n.op_type for n in model.graph.node if n.name.startswith(precision_graphs.VAE_SCOPES)}
    assert "Gemm" in computes
    assert all(i.type.tensor_type.elem_type != TensorProto.FLOAT16 for i in [*model.graph.input, *model.graph.output])


def test_gemm_rewrite_gives_identical_scores(trained_bundle):
    original = precision_graphs.prepared(onnx.load(str(trained_bundle / "scorer.onnx")))
    gemms = precision_graphs.vae_nodes(original, ("Gemm",))
    rewritten = precision_graphs.gemm_to_matmul(original, set(gemms))
    assert not [n for n in rewritten.graph.node if n.op_type == "Gemm"]
    assert len([n for n in rewritten.graph.node if n.op_type == "MatMul"]) == len(gemms)
    feeds = precision.calibration_feeds(Bundle.load(trained_bundle))
    expected = session(trained_bundle / "scorer.onnx").run(None, feeds)
    actual = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(actual[4], expected[4])


def test_score_with_int8_via_the_cli(capsys, tmp_path, variant_bundle, incoming_csv):
    output = tmp_path / "scores.parquet"
    code, out, err = run_main(capsys, "score", variant_bundle, incoming_csv, "--output", output,
                              "--precision", "int8", "--device", "cpu", "--threads", "2")
    assert code == 0, err
    scored = pq.read_table(output).to_pandas()
    expected = BundleScorer(Bundle.load(variant_bundle), "cpu", 2, "int8").score_frame(pd.read_csv(incoming_csv))
    assert len(scored) == len(expected) == 2000
    assert scored["is_anomaly"].tolist() == expected["is_anomaly"].tolist()
    assert "2,000 rows" in out
    for warning in Bundle.load(variant_bundle).manifest["variants"]["int8"]["warnings"]:
        assert warning in err


@pytest.mark.parametrize("name", ["fp16", "int8"])
def test_a_variant_scores_only_on_the_device_it_was_checked_on(variant_bundle, name):
    bundle = Bundle.load(variant_bundle)
    assert bundle.manifest["variants"][name]["device"] == "cpu"
    BundleScorer(bundle, "cpu", 1, name)  # where the export checked it
    assert BundleScorer(bundle, "auto", 1, name).device == "cpu"
    # auto asks for the CPU even on a GPU machine; fp32 and explicit devices are left alone.
    assert [variant_device(bundle, p, d) for p, d in ((name, "auto"), ("fp32", "auto"), (name, "cuda"))] == [
        "cpu", "auto", "cuda"]
    bundle.manifest["variants"][name]["device"] = "cuda"  # as if exported on a GPU
    assert variant_device(bundle, name, "auto") == "auto"
    for device in ("cpu", "auto") if not gpu_present() else ("cpu",):
        with pytest.raises(DeviceError, match=rf"the {name} scorer of bundle .* was checked on cuda, and this run "
                                              rf"scores on cpu; score it with --device cuda, or check it on cpu with "
                                              rf"`vaeguard export .* --precision {name} --device cpu`"):
            BundleScorer(bundle, device, 1, name)


def test_report_of_a_variant_uses_its_own_calibration(capsys, tmp_path, variant_bundle, incoming_csv):
    output = tmp_path / "scores.parquet"
    code, out, err = run_main(capsys, "score", variant_bundle, incoming_csv, "--output", output, "--report",
                              "--precision", "int8", "--device", "cpu", "--threads", "2")
    assert code == 0, err
    entry = Bundle.load(variant_bundle).manifest["variants"]["int8"]
    html = (tmp_path / "scores.report.html").read_text()
    assert "int8 (scorer.int8.onnx)" in html and f"{entry['threshold']:.4g}" in html
    job = ScoreJob(bundle=variant_bundle, inputs=(incoming_csv,), output=output, precision="int8")
    assert "| scored by | int8 (scorer.int8.onnx) |" in summary_markdown(job)


def test_missing_variant_is_a_one_line_error(capsys, tmp_path, trained_bundle, incoming_csv):
    output = tmp_path / "scores.parquet"
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", output, "--precision", "fp16")
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"vaeguard export {trained_bundle} --precision fp16" in lines[0]
    assert not output.exists()
    with pytest.raises(BundleError, match="has no int8 scorer"):
        Bundle.load(trained_bundle).scorer_path_for("int8")


def test_export_cli_prints_a_summary(capsys, tmp_path, trained_bundle):
    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    code, out, err = run_main(capsys, "export", bundle, "--precision", "fp16", "--threads", "2")
    assert code == 0, err
    for word in ("scorer.fp16.onnx", "threshold:", "agreement:", "score error:", "speed:",
                 "device:      checked on cpu"):
        assert word in out
    inspected = run_main(capsys, "inspect", bundle)[1]
    assert "fp16" in inspected and "checked on cpu" in inspected


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_export_refuses_a_thread_count_below_one(capsys, tmp_path, trained_bundle, threads):
    """Before: --threads 0 or -2 silently meant the default (and was recorded as that)."""
    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    before = snapshot(bundle)
    code, _, err = run_main(capsys, "export", bundle, "--precision", "int8", "--threads", threads)
    assert code == 1 and err == f"error: --threads must be a positive integer, got {threads}; pass e.g. --threads 2, " \
                                "or leave it out for the default\n"
    assert snapshot(bundle) == before


def _bake_a_shifted_threshold(monkeypatch):
    real = precision.write_table

    def shifted(model, calibration):
        wrong = Calibration(calibration.scores, calibration.target_fpr, calibration.threshold * 0.5, calibration.rank)
        return real(model, wrong)

    monkeypatch.setattr(precision, "write_table", shifted)


@pytest.mark.parametrize("start", ["fresh", "with variants"])
def test_failed_export_leaves_the_bundle_unchanged(monkeypatch, tmp_path, trained_bundle, variant_bundle, start):
    bundle = shutil.copytree(trained_bundle if start == "fresh" else variant_bundle, tmp_path / "sensors")
    before = snapshot(bundle)
    _bake_a_shifted_threshold(monkeypatch)
    with pytest.raises(ExportError, match="not consistent with its own calibration"):
        precision.export_variant(bundle, "int8", device="cpu", threads=2)
    assert snapshot(bundle) == before  # no temporary file left either
    loaded = Bundle.load(bundle)
    if start == "fresh":
        with pytest.raises(BundleError, match="vaeguard export"):
            loaded.scorer_path_for("int8")
    else:
        assert loaded.scorer_path_for("int8").is_file()


def _while_exporting(monkeypatch, action):
    """Run ``action`` once, in the middle of the next export (after its checks, before it writes)."""
    real = precision.check_batch_independence
    pending = [action]

    def checks_then_acts(*args, **kwargs):
        report = real(*args, **kwargs)
        if pending:
            pending.pop()()
        return report

    monkeypatch.setattr(precision, "check_batch_independence", checks_then_acts)


def test_two_exports_at_once_keep_both_variants(monkeypatch, tmp_path, trained_bundle):
    """Before: each export wrote back the manifest it had read, so the fp16 variant that finished
    while int8 was made vanished from the manifest (its file left behind, unusable)."""
    monkeypatch.setattr(precision, "SPEED_ROWS", 1_024)
    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    _while_exporting(monkeypatch, lambda: precision.export_variant(bundle, "fp16", device="cpu", threads=2, repeats=1))
    precision.export_variant(bundle, "int8", device="cpu", threads=2, repeats=1)
    loaded = Bundle.load(bundle)
    assert set(loaded.manifest["variants"]) == {"fp16", "int8"}
    assert loaded.scorer_path_for("fp16").is_file() and loaded.scorer_path_for("int8").is_file()


def test_an_export_onto_a_bundle_replaced_meanwhile_writes_nothing(monkeypatch, tmp_path, trained_bundle,
                                                                    variant_bundle):
    """A retrain that swapped the bundle out while the variant was made: the variant belongs to the
    old scorer.onnx, so it must not be added to the new bundle."""
    monkeypatch.setattr(precision, "SPEED_ROWS", 1_024)
    bundle = tmp_path / "sensors"
    shutil.copytree(trained_bundle, bundle)

    def retrain():
        shutil.rmtree(bundle)
        shutil.copytree(variant_bundle, bundle)
        edit = json.loads((bundle / "manifest.json").read_text())
        model = onnx.load(str(bundle / "scorer.onnx"))  # another model: another hash
        helper.set_model_props(model, {"vaeguard.version": "retrained"})
        onnx.save(model, str(bundle / "scorer.onnx"))
        edit["files"]["scorer.onnx"] = sha256_file(bundle / "scorer.onnx")
        (bundle / "manifest.json").write_text(json.dumps(edit))

    _while_exporting(monkeypatch, retrain)
    with pytest.raises(ExportError, match="was replaced while its int8 scorer was made") as caught:
        precision.export_variant(bundle, "int8", device="cpu", threads=2, repeats=1)
    assert "\n" not in str(caught.value)
    after = json.loads((bundle / "manifest.json").read_text())
    assert after["variants"]["int8"] == json.loads((variant_bundle / "manifest.json").read_text())["variants"]["int8"]
    assert sha256_file(bundle / "scorer.int8.onnx") == sha256_file(variant_bundle / "scorer.int8.onnx")
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(".")]


def test_export_into_a_folder_it_cannot_write_is_a_one_line_error(capsys, monkeypatch, tmp_path, trained_bundle):
    """Before: `error: unexpected PermissionError: [Errno 13] ... .scorer.int8.onnx.draft-...`."""
    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    before = snapshot(bundle)

    def refuse(model, path, *args, **kwargs):
        # As root a read-only folder is still writable, so the refusal is simulated where it happens.
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(onnx, "save", refuse)
    code, out, err = run_main(capsys, "export", bundle, "--precision", "int8", "--threads", "2")
    assert code == 1 and out == ""
    assert err == (f"error: {bundle}: cannot write scorer.int8.onnx into the bundle folder (Permission denied); "
                   f"`vaeguard export` adds the variant and rewrites manifest.json there: make the folder writable "
                   f"(or free disk space), or export a copy of the bundle; the bundle was left unchanged\n")
    assert snapshot(bundle) == before


def test_on_a_read_only_folder_the_cleanup_does_not_hide_what_to_fix(capsys, monkeypatch, tmp_path, trained_bundle):
    """Before: on a read-only mount the draft's removal failed too (EROFS, which missing_ok does not
    cover), and replaced the one-line message with `error: unexpected OSError: [Errno 30] ...`."""
    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    real_unlink = Path.unlink

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0] if args else ""))

    def unlink(path, missing_ok=False):
        if path.name.startswith(".scorer.int8.onnx."):
            read_only(path)
        return real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(onnx, "save", read_only)
    monkeypatch.setattr(Path, "unlink", unlink)
    code, out, err = run_main(capsys, "export", bundle, "--precision", "int8", "--threads", "2")
    assert code == 1 and out == ""
    assert err.startswith(f"error: {bundle}: cannot write scorer.int8.onnx into the bundle folder (Read-only file "
                          f"system); ") and err.count("\n") == 1


def test_sigterm_while_a_variant_is_committed_keeps_a_whole_variant(capsys, monkeypatch, tmp_path, variant_bundle):
    """Before: SIGTERM between the re-export's first manifest write (old int8 entry dropped) and the
    second left a bundle without its int8 scorer, and `error: terminated; no output was written`."""
    monkeypatch.setattr(precision, "SPEED_ROWS", 1_024)
    bundle = shutil.copytree(variant_bundle, tmp_path / "sensors")
    real_replace = os.replace

    def terminated_on_the_way(source, target, *args, **kwargs):
        if Path(target).name == "scorer.int8.onnx":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", terminated_on_the_way)
    code, _, err = run_main(capsys, "export", bundle, "--precision", "int8", "--threads", "2")
    assert code == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == ("error: terminated (SIGTERM) after the output was written whole, which "
                                            "was kept; the steps after it did not run")
    loaded = Bundle.load(bundle)  # every listed file matches its hash
    assert set(loaded.manifest["variants"]) == {"fp16", "int8"}
    assert loaded.manifest["variants"]["int8"]["created_at"] != \
        Bundle.load(variant_bundle).manifest["variants"]["int8"]["created_at"]  # the new one, whole
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(".")]


def test_inspect_shows_the_threshold_scoring_checks(capsys, tmp_path, variant_bundle):
    """Before: inspect printed the entry's top-level copy of the threshold, which nothing checks:
    edited by hand, inspect showed it while scoring used (and checked) the calibration's."""
    bundle = shutil.copytree(variant_bundle, tmp_path / "sensors")
    manifest = json.loads((bundle / "manifest.json").read_text())
    real = manifest["variants"]["int8"]["calibration"]["threshold"]
    manifest["variants"]["int8"]["threshold"] = 123.0
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = run_main(capsys, "inspect", bundle)
    assert code == 0, err
    [row] = [line for line in out.splitlines() if line.strip().startswith("int8 ")]
    assert f"threshold {real:.6g}" in row and "123" not in row
    assert f"expected FPR {manifest['variants']['int8']['calibration']['expected_fpr']:.6g}" in row


def test_agreement_is_shown_as_a_count(variant_bundle):
    """Before: one decision in 20,000 differing from fp32 was shown as `100.00%` by export and inspect."""
    from pipeline.inspect import describe_manifest

    manifest = json.loads((variant_bundle / "manifest.json").read_text())
    entry = manifest["variants"]["fp16"]
    entry["calibration"]["n_calibration"] = 20_000
    entry["decision_agreement"], entry["decisions_differ"] = 19_999 / 20_000, 1
    entry["median_rel_score_error"] = 3.1e-5
    entry["warnings"] = ["a warning the export recorded"]
    printed = precision.describe_variant(entry)
    assert "decisions agree with fp32 on 19,999 of the 20,000 calibration inputs" in printed
    inspected = describe_manifest(manifest)
    [row] = [line for line in inspected.splitlines() if line.strip().startswith("fp16 ")]
    assert "agrees with fp32 on 19,999/20,000" in row and "median rel error 0.0031%" in row
    assert "100.00%" not in printed + inspected
    assert "  warning: scorer.fp16.onnx: a warning the export recorded" in inspected.splitlines()


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_a_damaged_variant_can_be_exported_again(capsys, monkeypatch, tmp_path, variant_bundle, damage):
    """Before: every command refused the bundle (`scorer.int8.onnx is missing`), `vaeguard export`
    too, so the variant could only be repaired by editing manifest.json by hand."""
    monkeypatch.setattr(precision, "SPEED_ROWS", 1_024)
    bundle = shutil.copytree(variant_bundle, tmp_path / "sensors")
    if damage == "deleted":
        (bundle / "scorer.int8.onnx").unlink()
        with pytest.raises(BundleError, match=f"or make it again with `vaeguard export {bundle} --precision int8`"):
            Bundle.load(bundle)
    else:
        with open(bundle / "scorer.int8.onnx", "ab") as handle:
            handle.write(b"x")
    # Only the file being made again goes unchecked: a damaged other variant still stops the export.
    code, _, err = run_main(capsys, "export", bundle, "--precision", "fp16", "--threads", "2")
    assert code == 1 and "scorer.int8.onnx" in err
    code, _, err = run_main(capsys, "export", bundle, "--precision", "int8", "--threads", "2")
    assert code == 0, err
    loaded = Bundle.load(bundle)
    assert set(loaded.manifest["variants"]) == {"fp16", "int8"}
    assert sha256_file(loaded.scorer_path_for("int8")) == loaded.manifest["files"]["scorer.int8.onnx"]


def test_a_row_fp32_decides_by_rounding_is_no_variant_warning():
    """Before: fp32's threshold was the PyTorch score of a calibration row (fp32 is now calibrated on
    scorer.onnx's own scores), which scorer.onnx scored a few ulps to either side of it; flagged by fp32
    and not by the variant (whose threshold is its own score), that one row made every variant of a
    bundle with 99 calibration inputs warn `its decisions agree with fp32 on only 98.99%`, on every
    `vaeguard score --precision`. Any row within rounding of fp32's threshold is such a row."""
    from pipeline.verify import RTOL

    assert precision.FP32_ROUNDING == RTOL
    threshold = 5.92163
    fp32 = np.linspace(1.0, 5.9, 99).astype(np.float32)
    fp32[-1] = np.nextafter(np.float32(threshold), np.float32(np.inf))  # the threshold's own row
    variant = fp32 * np.float32(1.0001)
    variant_flags = np.zeros(99, bool)  # its own threshold is its top score
    errors = precision.score_errors({"score": fp32, "is_anomaly": fp32 > np.float32(threshold)},
                                    {"score": variant, "is_anomaly": variant_flags}, threshold)
    assert (errors["decisions_differ"], errors["differ_at_fp32_threshold"]) == (1, 1)
    entry = {**errors, "calibration": {"n_calibration": 99}}
    assert precision.variant_warnings(entry) == []
    assert "(1 at fp32's threshold, where float rounding decides)" in precision.describe_variant(
        {**entry, "file": "scorer.int8.onnx", "tool": "t", "precision": "int8", "threshold": threshold,
         "calibration": {"n_calibration": 99, "expected_fpr": 0.01}, "max_abs_score_error": 0.0,
         "max_rel_score_error": 0.0, "speed_ratio": 1.0, "variant_rows_per_s": 1.0, "fp32_rows_per_s": 1.0,
         "device": "cpu", "threads": 1, "batch_dependence": {"rows": 99, "batches": [1, 99],
                                                              "max_rel_score_change": 0.0, "tolerance": 1e-5}})
    # A row the variant decides otherwise away from fp32's threshold is the variant's own difference.
    variant_flags[50] = True
    errors = precision.score_errors({"score": fp32, "is_anomaly": fp32 > np.float32(threshold)},
                                    {"score": variant, "is_anomaly": variant_flags}, threshold)
    assert precision.variant_warnings({**errors, "calibration": {"n_calibration": 99}}) == [
        "its decisions differ from fp32's on 1 of the 99 calibration inputs (1.01%, more than 1%)"]


def test_precision_module_needs_no_torch_or_prefect():
    modules = imported_after("import pipeline.precision, pipeline.precision_graphs, onnxruntime.transformers.float16, "
                             "onnxruntime.quantization")
    assert "torch" not in modules and "prefect" not in modules


# --- images ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory) -> Path:
    """A tiny grayscale 16x16 texture bundle (5 epochs), target FPR 0.05."""
    work = tmp_path_factory.mktemp("image-variants")
    np.save(work / "normal.npy", textures(240, seed=0, size=16))
    job = ImageTrainJob(data=work / "normal.npy", name="texture", out_dir=work / "exported", image_size=16,
                        channels=1, config=image_config(max_epochs=5, patience=5))
    return Path(run_image_training(job)["bundle"])


def test_image_variants(monkeypatch, tmp_path, image_bundle):
    monkeypatch.setattr(precision, "SPEED_IMAGES", 64)
    bundle = shutil.copytree(image_bundle, tmp_path / "texture")
    images = np.load(bundle / CALIBRATION_IMAGES)
    assert images.dtype == np.float32 and images.shape[1:] == (1, 16, 16)
    assert len(images) == Bundle.load(bundle).calibration.n
    for name in VARIANTS:
        entry = precision.export_variant(bundle, name, device="cpu", threads=2, repeats=1)
        assert entry["consistency"]["passed"] and entry["batch_dependence"]["passed"]
        # fp32 and the variant each flag exactly rank - 1 of the 39 images, so they differ by swapped
        # pairs: int8 swaps the top two (0.15% apart). Before fp32 was calibrated on its own scores it
        # flagged the threshold's image too, and the same int8 read as 1 difference.
        assert entry["decisions_differ"] <= 2
        assert entry["median_rel_score_error"] < 0.01
    loaded = Bundle.load(bundle)
    fresh = textures(20, seed=5, size=16)
    np.save(tmp_path / "fresh.npy", fresh)
    summaries = {name: score(ScoreJob(bundle=bundle, inputs=(tmp_path / "fresh.npy",),
                                      output=tmp_path / f"{name}.parquet", device="cpu", threads=2, precision=name))
                 for name in ("fp32", *VARIANTS)}
    assert {s.rows for s in summaries.values()} == {20}
    for name in VARIANTS:
        assert summaries[name].expected_fpr == loaded.manifest["variants"][name]["calibration"]["expected_fpr"]
        scores = pq.read_table(tmp_path / f"{name}.parquet").column("score").to_numpy()
        reference = pq.read_table(tmp_path / "fp32.parquet").column("score").to_numpy()
        np.testing.assert_allclose(scores, reference, rtol=0.02)
    # A variant checked on another device is refused before any output is written.
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"]["int8"]["device"] = "cuda"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeviceError, match="the int8 scorer of bundle 'texture' was checked on cuda"):
        score(ScoreJob(bundle=bundle, inputs=(tmp_path / "fresh.npy",), output=tmp_path / "refused.parquet",
                       device="cpu", threads=2, precision="int8"))
    assert not list(tmp_path.glob("refused*"))


def _swap_two_numeric_columns(manifest):
    numeric = manifest["schema"]["numeric"]
    numeric[0], numeric[1] = numeric[1], numeric[0]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["calibration"].update(target_fpr=0.05), r"its target FPR is 0\.01, the manifest's 0\.05"),
    (_swap_two_numeric_columns, r"its numeric columns are \['temperature', 'pressure'.*the manifest's \['pressure'"),
])
def test_export_refuses_a_manifest_that_scoring_refuses(capsys, tmp_path, trained_bundle, edit, message):
    """Before: the export built, calibrated (at the edited target FPR) and added a variant on a
    manifest that `vaeguard score` then refused."""
    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(bundle)
    code, out, err = run_main(capsys, "export", bundle, "--precision", "fp16", "--threads", "2")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {bundle / 'scorer.onnx'}: ") and re.search(message, err), err
    assert err.endswith("the manifest was edited or belongs to another bundle: restore manifest.json or re-export "
                        "the bundle\n")
    assert snapshot(bundle) == before


def test_an_export_uses_the_bundle_it_loaded_when_a_retrain_replaces_it(monkeypatch, tmp_path, trained_bundle):
    """A retrain publishing right after the export loaded the bundle: before, the new scorer.onnx was
    read against the old manifest ("scorer.onnx's baked calibration table does not match the manifest's;
    re-export the bundle", a false alarm about a sound bundle)."""
    from pipeline.bundle import publish_bundle

    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    retrained = shutil.copytree(trained_bundle, tmp_path / ".sensors.run-1")
    table = pd.read_parquet(retrained / CALIBRATION_ROWS)
    table.iloc[::-1].to_parquet(retrained / CALIBRATION_ROWS)  # other rows: other bytes
    manifest = json.loads((retrained / "manifest.json").read_text())
    old = Calibration.from_dict(manifest["calibration"])
    model = precision_graphs.write_table(onnx.load(str(retrained / "scorer.onnx")),  # another table: another graph
                                         Calibration(old.scores * 2, old.target_fpr, old.threshold * 2, old.rank))
    onnx.save(model, str(retrained / "scorer.onnx"))
    manifest["files"] |= {name: sha256_file(retrained / name) for name in ("scorer.onnx", CALIBRATION_ROWS)}
    (retrained / "manifest.json").write_text(json.dumps(manifest))
    real, pending = Bundle.load, [retrained]

    def load_then_retrain(*args, **kwargs):
        loaded = real(*args, **kwargs)
        if pending:
            publish_bundle(pending.pop(), bundle)
        return loaded

    monkeypatch.setattr(precision.Bundle, "load", load_then_retrain)
    published = snapshot(retrained)
    with pytest.raises(BundleError, match=rf"{CALIBRATION_ROWS}: changed since bundle 'sensors' was loaded .*: was "
                                          rf"the bundle replaced meanwhile, by a retrain\? run the command again$"):
        precision.export_variant(bundle, "int8", device="cpu", threads=2, repeats=1)
    assert snapshot(bundle) == published  # the retrained bundle, as published
