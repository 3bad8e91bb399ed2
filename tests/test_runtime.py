import dataclasses
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline import cuda_libraries, runtime
from pipeline.bundle import Bundle
from pipeline.contract import OUTPUT_NAMES, categorical_input_name
from pipeline.cli import main
from pipeline.config import ModelConfig, TrainJob
from pipeline.errors import BundleError, ConfigError, DeviceError
from pipeline.outputs import summary_path
from pipeline.runtime import BundleScorer, category_codes, create_session, gpu_present
from pipeline.schema import as_category_array, categorical_strings, numeric_matrix
from pipeline.workflow import run_training
from tests.conftest import quiet_config, unknown_bucket_rows

no_gpu = pytest.mark.skipif(gpu_present(), reason="checks the behaviour of a machine without a GPU")


@no_gpu
def test_cuda_fails_clearly_when_not_active(trained_bundle):
    with pytest.raises(DeviceError, match=r"--device cuda .* not active .* --device cpu"):
        create_session(Bundle.load(trained_bundle).scorer_path, "cuda")


@no_gpu
def test_auto_on_a_machine_without_a_gpu_scores_on_the_cpu_without_a_warning(trained_bundle, caplog):
    """The CPU is what auto means there: a nightly warning that says to find a GPU is noise."""
    with caplog.at_level(logging.INFO, logger="vaeguard"):
        scorer = BundleScorer(Bundle.load(trained_bundle), device="auto")
    assert scorer.device == "cpu"
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "CUDA is not active" in r.getMessage()]
    assert said == [(logging.INFO, "CUDA is not active (no NVIDIA GPU driver on this machine; run on a machine with "
                                   "an NVIDIA GPU); scoring on the CPU")]


def test_auto_warns_once_where_a_gpu_is_there_but_cuda_is_not_active(trained_bundle, caplog, monkeypatch):
    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CPU])  # plain onnxruntime
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        scorer = BundleScorer(Bundle.load(trained_bundle), device="auto")
    assert scorer.device == "cpu"
    [warning] = [r.getMessage() for r in caplog.records if "CUDA is not active" in r.getMessage()]
    assert warning.startswith("CUDA is not active (this onnxruntime build has no CUDA provider; pip install "
                              "onnxruntime-gpu")


def test_unknown_device_is_a_config_error(trained_bundle):
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        create_session(Bundle.load(trained_bundle).scorer_path, "tpu")


# --- the missing-library message (CPU-only: the loader is replaced) ----------------------------


def refuse(*missing):
    """A stand-in for ctypes.CDLL that cannot open the given sonames."""
    def load(name):
        if name in missing:
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
    return load


def test_probe_names_the_libraries_that_cannot_be_loaded(monkeypatch):
    monkeypatch.setattr(cuda_libraries, "_load_library", refuse("libcublasLt.so.13", "libcudnn.so.9"))
    assert cuda_libraries.missing_cuda_libraries() == ["libcublasLt.so.13", "libcudnn.so.9"]
    why, fix = cuda_libraries.cuda_failure()
    assert why == "libcublasLt.so.13, libcudnn.so.9 not found"
    assert fix.startswith("pip install nvidia-cublas nvidia-cudnn-cu13 ") and "torch 2.13" in fix


def test_probe_without_a_driver_says_so_first(monkeypatch):
    monkeypatch.setattr(cuda_libraries, "_load_library", refuse("libcuda.so.1", "libcublas.so.13", "libcublasLt.so.13"))
    why, fix = cuda_libraries.cuda_failure()
    assert why == "libcuda.so.1, libcublasLt.so.13, libcublas.so.13 not found"
    assert fix.startswith("install an NVIDIA driver") and fix.count("nvidia-cublas") == 1


def test_probe_when_every_library_loads_keeps_the_providers_reason(monkeypatch):
    monkeypatch.setattr(cuda_libraries, "_load_library", refuse())
    assert cuda_libraries.missing_cuda_libraries() == []
    assert cuda_libraries.cuda_failure("CUDA driver version is insufficient")[0] == "CUDA driver version is insufficient"
    assert "not start" in cuda_libraries.cuda_failure()[0]


@no_gpu
def test_device_cuda_error_names_missing_libraries_on_one_line(monkeypatch, trained_bundle, caplog):
    # As if a driver were there: onnxruntime really tries its CUDA provider, which cannot start here.
    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(cuda_libraries, "_load_library", refuse("libcudnn.so.9", "libcublasLt.so.13"))
    path = Bundle.load(trained_bundle).scorer_path
    with pytest.raises(DeviceError) as error:
        create_session(path, "cuda")
    message = str(error.value)
    assert "\n" not in message
    assert re.fullmatch(r"--device cuda asked for, but onnxruntime's CUDA provider is not active "
                        r"\(libcublasLt\.so\.13, libcudnn\.so\.9 not found\); pip install nvidia-cublas "
                        r"nvidia-cudnn-cu13 \(.*torch 2\.13.*\), or use --device cpu", message), message
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        assert create_session(path, "auto").get_providers() == ["CPUExecutionProvider"]
    [warning] = [r.getMessage() for r in caplog.records if "CUDA is not active" in r.getMessage()]
    assert "libcudnn.so.9" in warning and warning.endswith("scoring on the CPU")


def test_cuda_sessions_ask_for_exact_repeatable_math(monkeypatch, trained_bundle):
    # CUDA's defaults (TF32, timed cuDNN search) moved scores by up to 0.9% on an H100; the GPU
    # tests see that, and this check keeps the options on the way to onnxruntime where CI runs.
    asked = {}

    def session(path, options, providers):
        asked.update(options=options, providers=providers)
        raise RuntimeError("no GPU here")

    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(runtime.ort, "InferenceSession", session)
    with pytest.raises(DeviceError):
        create_session(Bundle.load(trained_bundle).scorer_path, "cuda")
    (name, cuda_options), *_ = asked["providers"]
    assert name == runtime.CUDA
    assert cuda_options["use_tf32"] == "0" and cuda_options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert asked["options"].use_deterministic_compute
    # The manifest tells other runtimes the same (README, "Scoring from another runtime").
    onnx_section = Bundle.load(trained_bundle).manifest["onnx"]
    assert onnx_section["cuda_provider_options"] == cuda_options
    assert onnx_section["cuda_session_options"] == {"use_deterministic_compute": True}


def test_score_frame_gives_exactly_what_session_run_gives(trained_bundle, sensor_frame):
    scorer = BundleScorer(Bundle.load(trained_bundle), device="cpu", threads=1)
    feeds = {"numeric": numeric_matrix(sensor_frame, scorer.numeric_columns, "t")}
    feeds |= {categorical_input_name(c): v for c, v in
              zip(scorer.categorical_columns, categorical_strings(sensor_frame, scorer.categorical_columns))}
    expected = scorer.session.run(list(OUTPUT_NAMES), feeds)
    got = scorer.score_frame(sensor_frame)[list(OUTPUT_NAMES)].to_numpy().T
    for a, b in zip(expected, got):
        assert np.array_equal(a, b.astype(a.dtype))


def test_score_batch_counts_the_rows_each_column_sends_to_the_unknown_bucket(trained_bundle, sensor_frame):
    """A column spelled differently ('a' for 'A') sends its rows to the unknown bucket silently; the
    counts say how many, per column, and which values."""
    scorer = BundleScorer(Bundle.load(trained_bundle), device="cpu", threads=1)
    frame = sensor_frame.iloc[:1000].copy()
    frame.loc[frame.index[:300], "line"] = frame["line"].iloc[:300].str.lower()
    frame.loc[frame.index[300:305], "line"] = None
    unseen = {}
    batches = pa.Table.from_pandas(frame, preserve_index=False).to_batches(max_chunksize=300)
    scores = np.concatenate([scorer.score_batch(b, "t", unseen=unseen)["score"] for b in batches])
    np.testing.assert_array_equal(scores, scorer.score_frame(frame)["score"].to_numpy())  # counting changes nothing
    stats = {s.name: s for s in Bundle.load(trained_bundle).preprocessor.categorical}
    for name, values in zip(scorer.categorical_columns, categorical_strings(frame, scorer.categorical_columns)):
        expected = unknown_bucket_rows(stats[name], values)
        assert (unseen[name].rows, unseen[name].unseen) == (1000, int(expected.sum())), name
        assert sum(unseen[name].examples.values()) == int(expected.sum())
    assert unseen["line"].unseen >= 300 and {"a", "b"} <= set(unseen["line"].examples)
    assert unseen["line"].examples.most_common(1)[0][0] == "a"
    assert scorer.score_batch(batches[0], "t")["score"].shape == (300,)  # without counts, as before


def test_score_batch_counts_each_numeric_columns_blank_rows_a_null_and_nan_alike(trained_bundle, sensor_frame):
    """A blank number gets training's median, silently: the counts say how many rows of each column
    were blank, whether the file wrote a null (CSV) or a NaN (a Parquet double)."""
    scorer = BundleScorer(Bundle.load(trained_bundle), device="cpu", threads=1)
    frame = sensor_frame.iloc[:1000].copy()
    frame["temperature"] = np.nan
    missing = {}
    batches = pa.Table.from_pandas(frame, preserve_index=False).to_batches(max_chunksize=300)
    # pandas writes NaN as null; a writer that keeps NaN (pyarrow from numpy, Spark) is the other half.
    batches = [b.set_column(b.schema.get_field_index("pressure"), "pressure",
                            pa.array(b.column("pressure").to_numpy(zero_copy_only=False) * np.nan,
                                     from_pandas=False)) if i == 0 else b for i, b in enumerate(batches)]
    assert batches[0].column("pressure").null_count == 0
    scores = np.concatenate([scorer.score_batch(b, "t", missing=missing)["score"] for b in batches])
    assert len(scores) == 1000
    expected = {name: int(frame[name].isna().sum()) for name in scorer.numeric_columns} | {"pressure": 300}
    assert {name: (tally.rows, tally.missing) for name, tally in missing.items()} == {
        name: (1000, count) for name, count in expected.items()}
    assert expected["temperature"] == 1000 and expected["vibration"] > 0


@pytest.mark.parametrize("column", [
    pa.array(["b", None, "a", "b", ""], pa.string()),
    pa.chunked_array([pa.array(["x", None]), pa.array(["y", "x"])]),
    pa.array(["p", "q", None, "p"]).dictionary_encode(),
    pa.array([1.0, float("nan"), None, 3.0]),
    pa.array([True, None, False]),
    pa.array([], pa.string()),
])
def test_category_codes_give_exactly_the_scorer_inputs_as_before(column):
    texts, indices = category_codes(column)
    assert texts[indices].tolist() == as_category_array(column).tolist()


@pytest.fixture(scope="module")
def elu_bundle(tmp_path_factory, sensor_csv) -> Path:
    job = TrainJob(data=sensor_csv, name="sensors", out_dir=tmp_path_factory.mktemp("elu"), label_column="label",
                   id_columns=("row_id",), config=dataclasses.replace(quiet_config(), model=ModelConfig(activation="elu")))
    return Path(run_training(job)["bundle"])


@pytest.mark.slow
@pytest.mark.parametrize("bundle_name", ["trained_bundle", "elu_bundle"])
def test_a_row_scores_the_same_bits_whatever_its_batch_or_threads(request, bundle_name, sensor_frame):
    """Scores are deterministic: the batch a row lands in (its file's size, the rows before it, an
    earlier bad row) and the thread count must not move even its last bit, or a row on the
    threshold would flip between runs. Before: onnxruntime's CPU Elu kernel gave a different last
    bit with the work split, and with `activation: elu` 909 of 3,000 rows scored one at a time
    differed from the same rows scored in one batch."""
    bundle = Bundle.load(request.getfixturevalue(bundle_name))
    scorer_one = BundleScorer(bundle, device="cpu", threads=1)
    scorer_two = BundleScorer(bundle, device="cpu", threads=2)
    whole = scorer_one.score_frame(sensor_frame)["score"].to_numpy()
    for threads, scorer, size in [(1, scorer_one, 1), (1, scorer_one, 7), (1, scorer_one, 1000), (2, scorer_two, 33),
                                  (2, scorer_two, 3000)]:
        parts = [scorer.score_frame(sensor_frame.iloc[i:i + size])["score"].to_numpy()
                 for i in range(0, len(sensor_frame), size)]
        assert np.array_equal(np.concatenate(parts), whole), f"{threads} thread(s), batches of {size}"


def _edited(trained_bundle, tmp_path, edit) -> Bundle:
    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return Bundle.load(bundle)  # the manifest itself has no hash: this still loads


def _swap_two_columns(manifest):
    numeric = manifest["schema"]["numeric"]
    numeric[0], numeric[1] = numeric[1], numeric[0]


def test_inspect_shows_the_edited_manifest_and_says_where_it_disagrees(capsys, trained_bundle, tmp_path):
    """Before: inspect printed a hand-edited threshold as the bundle's, with no word; the night's
    `vaeguard score` was the first to refuse the bundle."""
    bundle = _edited(trained_bundle, tmp_path, lambda m: m["calibration"].update(threshold=50.0))
    assert main(["inspect", str(bundle.path)]) == 0
    out, err = capsys.readouterr()
    assert "50" in out  # the manifest, as it is
    assert re.fullmatch(rf"warning: {re.escape(str(bundle.scorer_path))}: its threshold is [0-9.]+, the manifest's "
                        r"50\.0 .*\(`vaeguard score` refuses the bundle until then\)\n", err), err


def _next_rank(manifest):
    calibration = manifest["calibration"]
    calibration["rank"] += 1
    calibration["expected_fpr"] = calibration["rank"] / (calibration["n_calibration"] + 1)


def _rename_a_category(manifest):
    [line] = [c for c in manifest["preprocessing"]["categorical"] if c["name"] == "line"]
    assert line["categories"] == ["A", "B", "C"]
    line["categories"][0] = "Z"


@pytest.mark.parametrize("edit, message", [
    (_swap_two_columns, r"its numeric columns are \['temperature', 'pressure'.*the manifest's \['pressure', 'temperature'"),
    (lambda m: m["schema"].update(categorical=["line"]), r"its inputs are .*'cat_shift'.*the manifest's schema needs "
                                                          r"\['cat_line', 'numeric'\]"),
    (lambda m: m["calibration"].update(threshold=50.0), r"its threshold is [0-9.]+, the manifest's 50\.0 .*p_value <="),
    (lambda m: m["calibration"].update(target_fpr=0.05), r"its target FPR is 0\.01, the manifest's 0\.05"),
    (lambda m: m["calibration"].update(expected_fpr=0.05), r"the manifest's expected FPR 0\.05 is not its rank"),
    # Before, each of these passed: scoring and inspect stated what the graph does not do.
    (_next_rank, r"its calibration table puts the threshold at rank [0-9]+ for the target FPR 0\.01, the manifest's "
                 r"rank is [0-9]+;"),
    (lambda m: m["calibration"].update(scores=[2 * s for s in m["calibration"]["scores"]]),
     r"its baked calibration table is not the manifest's calibration scores and threshold;"),
    (_rename_a_category, r"its categories of column 'line' are \['A', 'B', 'C'\], the manifest's \['Z', 'B', 'C'\];"),
    (lambda m: m["preprocessing"]["categorical"][0].update(boolean=True),
     r"its column 'line' takes values as written, the manifest's the spellings \{'false': 'false'"),
    # Before, these passed: a runtime preprocessing for encoder.onnx by the manifest scaled otherwise.
    (lambda m: m["preprocessing"]["numeric"][0].update(median=m["preprocessing"]["numeric"][0]["median"] + 1),
     r"none of its constants is the manifest's numeric medians \[[-0-9.e, ]+\];"),
    (lambda m: m["preprocessing"]["numeric"][-1].update(scale=2 * m["preprocessing"]["numeric"][-1]["scale"]),
     r"none of its constants is the manifest's numeric scales \[[-0-9.e, ]+\];"),
])
def test_a_manifest_that_disagrees_with_its_scorer_is_refused(capsys, trained_bundle, tmp_path, incoming_csv,
                                                              edit, message):
    """Before: two columns swapped in the manifest fed each into the other's slot, and every row of
    a normal batch was flagged, without an error."""
    bundle = _edited(trained_bundle, tmp_path, edit)
    with pytest.raises(BundleError, match=message):
        BundleScorer(bundle, device="cpu", threads=1)
    output = tmp_path / "scores.parquet"
    assert main(["score", str(bundle.path), str(incoming_csv), "--output", str(output), "--device", "cpu"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after a warning about the column the edit dropped
    assert last.startswith(f"error: {bundle.path / 'scorer.onnx'}: ") and re.search(message, last), last
    assert not output.exists()


def test_a_scorer_is_built_from_the_bytes_load_checked(trained_bundle, tmp_path, sensor_frame):
    """Before: BundleScorer opened scorer.onnx again by path after Bundle.load had hashed it, so a
    retrain in between scored with the new graph against the old manifest (or failed)."""
    bundle = Bundle.load(shutil.copytree(trained_bundle, tmp_path / "sensors"))
    expected = BundleScorer(Bundle.load(trained_bundle), device="cpu", threads=1).score_frame(sensor_frame.head(50))
    (bundle.path / "scorer.onnx").write_bytes(b"what a retrain put there meanwhile")
    scored = BundleScorer(bundle, device="cpu", threads=1).score_frame(sensor_frame.head(50))
    assert scored.equals(expected)


def _truncated_with_its_hash(bundle: Path, name: str) -> None:
    """``name`` cut in half, and the manifest's sha256 made to match: a hash check alone passes it."""
    data = (bundle / name).read_bytes()
    (bundle / name).write_bytes(data[: len(data) // 2])
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data[: len(data) // 2]).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_a_scorer_onnxruntime_cannot_load_is_a_one_line_bundle_error(capsys, trained_bundle, tmp_path,
                                                                       incoming_csv):
    """Before: `error: unexpected InvalidProtobuf: [ONNXRuntimeError] ...`."""
    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    _truncated_with_its_hash(bundle, "scorer.onnx")
    message = (f"{bundle / 'scorer.onnx'}: not a loadable ONNX model ([ONNXRuntimeError] : 7 : INVALID_PROTOBUF : "
               f"Failed to load model because protobuf parsing failed.); re-export the bundle")
    with pytest.raises(BundleError, match=re.escape(message)):
        BundleScorer(Bundle.load(bundle), device="cpu", threads=1)
    with pytest.raises(BundleError, match=r"scorer\.onnx: not a loadable ONNX model \(.*\); re-export the bundle"):
        create_session(bundle / "scorer.onnx", "auto")  # by path, through the CPU fallback
    output = tmp_path / "scores.parquet"
    assert main(["score", str(bundle), str(incoming_csv), "--output", str(output), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not output.exists()


# --- on a GPU (skipped without one; CI has none) ---------------------------------------------


def assert_same_decisions(gpu: dict, cpu: dict, threshold: float) -> None:
    """Scores within 1e-5 relative; decisions identical except for rows that close to the threshold.

    With onnxruntime's default TF32 math, CUDA scores were up to 0.9% off (pipeline.contract.CUDA_PROVIDER_OPTIONS);
    without it, about 1e-6 at most.
    """
    np.testing.assert_allclose(gpu["score"], cpu["score"], rtol=1e-5, atol=1e-4)
    clear = np.abs(np.asarray(cpu["score"]) - threshold) > 1e-5 * max(abs(threshold), 1.0)
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(np.asarray(gpu["is_anomaly"])[clear], np.asarray(cpu["is_anomaly"])[clear])


@pytest.mark.gpu
def test_cuda_session_is_really_on_cuda_and_matches_cpu(trained_bundle, sensor_frame):
    bundle = Bundle.load(trained_bundle)
    gpu, cpu = BundleScorer(bundle, device="cuda"), BundleScorer(bundle, device="cpu")
    assert gpu.device == "cuda" and gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    assert_same_decisions(gpu.score_frame(sensor_frame), cpu.score_frame(sensor_frame),
                          bundle.manifest["calibration"]["threshold"])


@pytest.mark.gpu
def test_cuda_scores_repeat_exactly_in_a_new_session(trained_bundle, sensor_frame):
    bundle = Bundle.load(trained_bundle)
    first, second = (BundleScorer(bundle, device="cuda").score_frame(sensor_frame) for _ in range(2))
    assert np.array_equal(first["score"].to_numpy(), second["score"].to_numpy())


@pytest.mark.gpu
def test_cli_scores_on_cuda(capsys, tmp_path, trained_bundle, incoming_csv):
    from pipeline.cli import main

    outputs = {}
    for device in ("cuda", "cpu"):
        output = tmp_path / device / "scores.parquet"
        assert main(["score", str(trained_bundle), str(incoming_csv), "--output", str(output),
                     "--device", device]) == 0, capsys.readouterr().err
        assert json.loads(summary_path(output).read_text())["device"] == device
        outputs[device] = pd.read_parquet(output)
    assert_same_decisions(outputs["cuda"], outputs["cpu"],
                          Bundle.load(trained_bundle).manifest["calibration"]["threshold"])
