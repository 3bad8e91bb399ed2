"""The training run end to end: detection quality, and nothing lost when a step fails."""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import workflow
from pipeline.batch_score import score_files
from pipeline.bundle import CALIBRATION_ROWS, Bundle
from pipeline.config import ScoreJob, TrainJob
from pipeline.errors import DataError, ExportError
from pipeline.inspect import describe_manifest
from pipeline.metrics import auprc, auroc
from pipeline.runtime import BundleScorer
from pipeline.synthetic import write_table
from tests.conftest import SHARED_DATA, quiet_config


def test_bundle_detects_injected_anomalies(trained_bundle):
    metrics = Bundle.load(trained_bundle).manifest["metrics"]
    assert metrics["auroc"] >= 0.90
    assert metrics["test_anomaly_rows"] > 50 and metrics["test_normal_rows"] > 400


def test_the_bundle_decides_its_own_calibration_and_test_rows_as_training_measured(sensor_csv, tmp_path):
    """Before: the threshold, the calibration table and the held-out metrics came from PyTorch's
    scores, which scorer.onnx's differ from by about 1e-6. Scoring its own calibration rows, the
    bundle flagged the threshold's own row in 4 of 8 small bundles (rank of them, not rank - 1),
    and gave about a third of them a p-value a step off their rank (156 of 499 on one)."""
    job = TrainJob(data=sensor_csv, name="sensors", out_dir=tmp_path / "out", label_column="label",
                   config=quiet_config(max_epochs=3))
    run = workflow.RunDir.create(job)
    try:
        for step in workflow.STEPS[:-1]:  # up to verification: the staged bundle is complete, less its report
            step(job, run)
        test = pd.read_parquet(run.rows).iloc[workflow.load_splits(run).test]
        test.to_parquet(tmp_path / "test.parquet")
        bundle = Bundle.load(run.bundle)
        scored = {}
        for name, data in (("cal", run.bundle / CALIBRATION_ROWS), ("test", tmp_path / "test.parquet")):
            score_files(ScoreJob(run.bundle, (data,), tmp_path / f"{name}.scores.parquet", device="cpu"))
            scored[name] = pd.read_parquet(tmp_path / f"{name}.scores.parquet")
    finally:
        run.remove()
    cal = bundle.calibration
    scores, flagged = scored["cal"]["score"].to_numpy(), scored["cal"]["is_anomaly"].to_numpy()
    np.testing.assert_array_equal(np.sort(scores), cal.scores)  # the table holds the bundle's own scores
    assert len(np.unique(scores)) == cal.n  # no ties in this data, so every rank below is one row's
    assert flagged.sum() == cal.rank - 1 == np.sum(scores > np.float32(cal.threshold))
    # The row of the j-th largest score gets (1 + j) / (n + 1), the threshold's row (1 + rank) / (n + 1).
    descending = np.argsort(-scores)
    np.testing.assert_array_equal(scored["cal"]["p_value"].to_numpy()[descending],
                                  np.arange(2, cal.n + 2, dtype=np.float32) / np.float32(cal.n + 1))
    assert not flagged[descending[cal.rank - 1]] and flagged[descending[: cal.rank - 1]].all()
    assert bundle.manifest["verification"]["consistency"] == {
        "rows": cal.n, "flagged": cal.rank - 1, "rate": (cal.rank - 1) / cal.n, "passed": True}
    # The held-out metrics are the bundle's own decisions on the test rows.
    labels, test_scores = test["label"].to_numpy().astype(int), scored["test"]["score"].to_numpy()
    normal, decided = labels == 0, scored["test"]["is_anomaly"].to_numpy()
    assert bundle.manifest["metrics"] == {
        "test_normal_rows": int(normal.sum()), "test_anomaly_rows": int((~normal).sum()),
        "test_fpr": float(decided[normal].mean()), "test_recall": float(decided[~normal].mean()),
        "auroc": auroc(labels, test_scores), "auprc": auprc(labels, test_scores)}


def _existing_bundle(path: Path) -> bytes:
    path.mkdir(parents=True)
    (path / "manifest.json").write_bytes(b'{"old": true}')
    return b'{"old": true}'


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def test_failed_export_keeps_the_existing_bundle(sensor_csv, tmp_path, monkeypatch):
    old = _existing_bundle(tmp_path / "sensors")

    def broken_verification(*args, **kwargs):
        raise ExportError("parity broken on purpose")

    monkeypatch.setattr(workflow, "verify_export", broken_verification)
    job = TrainJob(data=sensor_csv, name="sensors", out_dir=tmp_path, config=quiet_config(max_epochs=2))
    with pytest.raises(ExportError):
        workflow.run_training(job)
    assert (tmp_path / "sensors" / "manifest.json").read_bytes() == old
    assert _leftovers(tmp_path) == []


def test_failed_validation_writes_nothing(tmp_path, sensor_frame):
    small = write_table(sensor_frame.iloc[:100], tmp_path / "small.csv")
    job = TrainJob(data=small, name="small", out_dir=tmp_path / "new" / "out", config=quiet_config())
    with pytest.raises(DataError, match="too few rows"):
        workflow.run_training(job)
    assert [p.name for p in tmp_path.iterdir()] == ["small.csv"]  # not even the --out folders it made
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="too few rows"):
        workflow.run_training(dataclasses.replace(job, out_dir=tmp_path / "mine"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "small.csv"]  # the user's folder stays


def test_retraining_replaces_the_bundle(sensor_csv, tmp_path):
    job = TrainJob(data=sensor_csv, name="sensors", out_dir=tmp_path, config=quiet_config(max_epochs=2))
    workflow.run_training(job)
    first = Bundle.load(tmp_path / "sensors").manifest["files"]
    job = TrainJob(data=sensor_csv, name="sensors", out_dir=tmp_path, config=quiet_config(max_epochs=3, seed=1))
    workflow.run_training(job)
    assert Bundle.load(tmp_path / "sensors").manifest["files"] != first
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_thyroid_semi_supervised_auroc(tmp_path):
    """ADBench thyroid, semi protocol (train on normals; anomalies only in test).

    Published VAE: 98.55 AUROC (Livernoche et al. 2024). Floor a little below, for seed noise.
    """
    data = np.load(SHARED_DATA / "adbench" / "38_thyroid.npz")
    import pandas as pd

    frame = pd.DataFrame(data["X"], columns=[f"f{i}" for i in range(data["X"].shape[1])])
    frame["label"] = data["y"].astype(int)
    path = write_table(frame, tmp_path / "thyroid.parquet")
    job = TrainJob(data=path, name="thyroid", out_dir=tmp_path, label_column="label",
                   config=quiet_config(max_epochs=200, patience=15))
    facts = workflow.run_training(job)["calibrate_threshold"]
    assert facts["auroc"] >= 0.97
    assert facts["test_fpr"] <= 0.03


@pytest.mark.slow
def test_trimmed_training_resists_anomalies_among_the_training_rows(tmp_path):
    """ADBench annthyroid, unsup protocol: all 7,200 rows train, 534 of them (7.4%) anomalies,
    and the same rows are scored. Ignoring each batch's worst-fitting 5% of rows
    (training.trim_fraction) keeps the VAE from learning those anomalies: the benchmark measured
    AUROC higher on all 5 seeds (85.9 -> 90.0 on average, BENCHMARKS.md "Trimmed loss")."""
    import pandas as pd

    from pipeline.metrics import auroc
    from pipeline.runtime import BundleScorer

    data = np.load(SHARED_DATA / "adbench" / "2_annthyroid.npz")
    frame = pd.DataFrame(data["X"], columns=[f"f{i}" for i in range(data["X"].shape[1])])
    path = write_table(frame, tmp_path / "annthyroid.parquet")
    measured = {}
    for trim in (0.0, 0.05):
        job = TrainJob(data=path, name=f"trim-{trim}", out_dir=tmp_path, config=quiet_config(trim_fraction=trim))
        bundle = Bundle.load(workflow.run_training(job)["bundle"])
        scores = BundleScorer(bundle, device="cpu", threads=2).score_frame(frame, source="annthyroid")["score"]
        measured[trim] = auroc(data["y"].astype(int), scores.to_numpy(dtype=np.float64))
    assert measured[0.05] >= 0.87
    assert measured[0.05] > measured[0.0] + 0.01


def test_csv_categories_are_learned_as_written_so_scoring_recognises_them(sensor_frame, tmp_path):
    """Type inference read '007' as 7 and 'False' as false at training, while scoring reads the
    text as written: every row of the same file then fell into the unknown bucket."""
    frame = sensor_frame.copy()
    rng = np.random.default_rng(0)
    frame["site"] = rng.choice(["003", "007", "012"], len(frame))
    frame["door_open"] = rng.random(len(frame)) < 0.3  # written as False / True
    data = write_table(frame, tmp_path / "codes.csv")
    job = TrainJob(data=data, name="codes", out_dir=tmp_path / "out", id_columns=("row_id",), label_column="label",
                   config=quiet_config(max_epochs=3))
    bundle = Bundle.load(workflow.run_training(job)["bundle"])
    categories = {c["name"]: set(c["categories"]) for c in bundle.manifest["preprocessing"]["categorical"]}
    assert categories["site"] == {"003", "007", "012"} and categories["door_open"] == {"false", "true"}  # boolean

    out = tmp_path / "scores.parquet"
    score_files(ScoreJob(bundle.path, (data,), out, device="cpu"))
    streamed = pd.read_parquet(out)["score"].to_numpy()
    as_text = pd.read_csv(data, dtype={"site": str, "door_open": str})
    scorer = BundleScorer(bundle, device="cpu")
    np.testing.assert_allclose(streamed, scorer.score_frame(as_text)["score"], rtol=1e-6)
    unknown = scorer.score_frame(as_text.assign(site="999", door_open="maybe"))["score"].to_numpy()
    assert np.mean(np.abs(streamed - unknown) > 1e-3) > 0.9  # the file's values are known categories


@pytest.mark.parametrize("name", [".", "..", "", "a/b", "../escape", "a\\b", "a\0b", ".staging"])
def test_job_refuses_a_bundle_name_that_is_not_a_plain_folder_name(tmp_path, name):
    """Built into the typed jobs, so the flows refuse it as the CLI does."""
    from pipeline.config import ImageTrainJob
    from pipeline.errors import ConfigError

    for make in (TrainJob, ImageTrainJob):
        with pytest.raises(ConfigError, match="--name must be a plain folder name"):
            make(data=tmp_path / "d.csv", name=name, out_dir=tmp_path)


@pytest.mark.parametrize("ids, label", [(("row_id", "row_id"), None), (("row_id", "label"), "label")])
def test_job_refuses_a_column_named_twice(tmp_path, ids, label):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="named more than once"):
        TrainJob(data=tmp_path / "d.csv", name="x", id_columns=ids, label_column=label)


@pytest.mark.parametrize("ids, label, message", [
    ((), "", r"--label-column is empty; give the label column's name, or leave the option out"),
    (("row_id", ""), "label", r"--id-columns names an empty column, got \('row_id', ''\)"),
])
def test_an_empty_label_or_id_column_name_is_a_config_error(tmp_path, ids, label, message):
    """`--label-column "$LABEL"` with LABEL unset trained the labelled anomalies as normal rows."""
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        TrainJob(data=tmp_path / "d.csv", name="x", id_columns=ids, label_column=label)


@pytest.mark.parametrize("rows", [1, 2, 150])
def test_a_table_too_short_to_split_says_so_before_its_columns_are_judged(tmp_path, sensor_frame, rows):
    """One row makes every column constant: it was refused as "no usable feature columns; every
    column is an id, the label, or constant" instead of for its length."""
    from pipeline.config import PipelineConfig
    from pipeline.errors import DataError
    from pipeline.splits import rows_needed

    config = PipelineConfig()
    needed = rows_needed(config.calibration, config.training, labelled=True)
    assert rows < needed
    data = tmp_path / "short.csv"
    sensor_frame.head(rows).to_csv(data, index=False)
    with pytest.raises(DataError, match=rf"short\.csv: too few rows to train and calibrate: {rows} rows, need at "
                                        rf"least {needed} for target FPR 0\.01 \(calibration alone needs 99\); add rows "
                                        r"or raise --target-fpr$"):
        workflow.run_training(TrainJob(data=data, name="short", out_dir=tmp_path / "out", label_column="label",
                                       id_columns=("row_id",), config=config))
    assert not (tmp_path / "out").exists()


def test_negative_seed_is_a_config_error():
    from pipeline.config import PipelineConfig
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training\.seed \(--seed\) must be a non-negative integer"):
        PipelineConfig.from_dict({"training": {"seed": -1}})


def test_a_run_refuses_a_target_that_is_not_a_bundle_before_reading_data(tmp_path):
    """RunDir.create is where the CLI and the flows (tables and images) start a run."""
    from pipeline.config import ImageTrainJob
    from pipeline.errors import ConfigError

    (tmp_path / "mydir").mkdir()
    (tmp_path / "mydir" / "important.txt").write_text("keep")
    (tmp_path / "plain").write_text("keep")
    for make in (TrainJob, ImageTrainJob):
        for name in ("mydir", "plain"):
            with pytest.raises(ConfigError, match="training would replace it"):
                workflow.RunDir.create(make(data=tmp_path / "missing.csv", name=name, out_dir=tmp_path))
    assert (tmp_path / "mydir" / "important.txt").read_text() == "keep"
    assert (tmp_path / "plain").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydir", "plain"]


def test_config_objects_check_their_values_wherever_they_are_built():
    """The flows take these objects as Python builds them, so they refuse what the CLI refuses."""
    from pipeline.config import CalibrationConfig, ModelConfig, PipelineConfig, TrainingConfig
    from pipeline.errors import ConfigError

    bad = [(TrainingConfig, {"max_epochs": 0}, r"training\.max_epochs must be an integer of at least 1, got 0"),
           (TrainingConfig, {"learning_rate": 0.0}, r"training\.learning_rate must be a number above 0"),
           (TrainingConfig, {"batch_size": 64.0}, r"training\.batch_size must be an integer"),
           (TrainingConfig, {"trim_fraction": "0.1"}, r"training\.trim_fraction must be at least 0"),
           (CalibrationConfig, {"target_fpr": 0.5}, r"calibration\.target_fpr \(--target-fpr\) must be"),
           (ModelConfig, {"hidden_sizes": (64, 0)}, r"model\.hidden_sizes must be null or a non-empty list"),
           (ModelConfig, {"hidden_sizes": ()}, r"model\.hidden_sizes must be null or a non-empty list")]
    for make, values, message in bad:
        with pytest.raises(ConfigError, match=message):
            make(**values)
    with pytest.raises(ConfigError, match="leaves less than 40% of the rows to train on"):
        PipelineConfig(training=TrainingConfig(val_fraction=0.3), calibration=CalibrationConfig(test_fraction=0.3))
    assert PipelineConfig.from_dict({"model": {"hidden_sizes": [64, 32]}}).model.hidden_sizes == (64, 32)


def test_config_activations_are_the_ones_the_model_builds():
    from pipeline.config import ACTIVATIONS
    from pipeline.model import ACTIVATIONS as BUILT

    assert sorted(ACTIVATIONS) == sorted(BUILT)


def test_jobs_take_paths_as_strings_and_refuse_a_bare_string_for_a_list(tmp_path):
    from pipeline.config import ImageTrainJob
    from pipeline.errors import ConfigError

    job = TrainJob(data=str(tmp_path / "d.csv"), name="x", out_dir=str(tmp_path), id_columns=["row_id"])
    assert job.bundle_dir == tmp_path / "x" and job.data == tmp_path / "d.csv" and job.id_columns == ("row_id",)
    scored = ScoreJob(bundle=str(tmp_path / "b"), inputs=[str(tmp_path / "in.csv")], output=str(tmp_path / "o.csv"))
    assert scored.inputs == (tmp_path / "in.csv",) and scored.output == tmp_path / "o.csv"
    # Iterated, a bare string would be one column, or one input file, per character.
    with pytest.raises(ConfigError, match="--id-columns must be a list of column names, got 'row_id'"):
        TrainJob(data=tmp_path / "d.csv", name="x", id_columns="row_id")
    with pytest.raises(ConfigError, match="inputs must be a list of paths"):
        ScoreJob(bundle=tmp_path, inputs=str(tmp_path / "in.csv"), output=tmp_path / "o.csv")
    with pytest.raises(ConfigError, match="no input to score"):
        ScoreJob(bundle=tmp_path, inputs=(), output=tmp_path / "o.csv")
    for values, message in (({"batch_size": 0}, "--batch-size must be a positive number of rows"),
                            ({"threads": 0}, "--threads must be a positive integer"),
                            ({"device": "gpu"}, "--device must be one of auto, cpu, cuda"),
                            ({"precision": "bf16"}, "--precision must be one of fp32, fp16, int8")):
        with pytest.raises(ConfigError, match=message):
            ScoreJob(bundle=tmp_path, inputs=(tmp_path / "in.csv",), output=tmp_path / "o.csv", **values)
    for values, message in (({"image_size": 0}, "--image-size must be a positive integer"),
                            ({"channels": 2}, "--channels must be 1")):
        with pytest.raises(ConfigError, match=message):
            ImageTrainJob(data=tmp_path, name="x", **values)
    with pytest.raises(ConfigError, match="config must be a PipelineConfig"):
        TrainJob(data=tmp_path / "d.csv", name="x", config={"training": {"max_epochs": 3}})


@pytest.mark.parametrize("codes, parses", [(None, 1), (["007", "012"], 2)], ids=["text_categories", "coded_categories"])
def test_a_csv_is_parsed_again_only_for_categories_its_reader_typed(sensor_frame, tmp_path, monkeypatch, codes, parses):
    """Every CSV with a categorical column was parsed twice, text categories ('line', 'shift') included."""
    import pipeline.tables as tables

    columns = []
    real = tables._read_csv
    monkeypatch.setattr(tables, "_read_csv", lambda path, convert, *a, **k: columns.append(
        list(convert.include_columns)) or real(path, convert, *a, **k))
    frame = sensor_frame.head(400)  # enough rows to train and calibrate on, checked as they are read
    data = write_table(frame.assign(site=(codes * 200)) if codes else frame, tmp_path / "t.csv")
    job = TrainJob(data=data, name="t", out_dir=tmp_path / "out", id_columns=("row_id",), label_column="label",
                   config=quiet_config())
    run = workflow.RunDir.create(job)
    try:
        workflow.load_and_validate(job, run)
        rows = pd.read_parquet(run.rows)
    finally:
        run.remove()
    assert len(columns) == parses and columns[1:] in ([], [["site"]])  # the second parse converts 'site' alone
    assert rows["line"].tolist() == frame["line"].tolist()
    if codes:
        assert rows["site"].iloc[:2].tolist() == codes  # spelled as written


@pytest.mark.slow
def test_a_parquet_bundle_scores_the_same_rows_from_a_pandas_csv_alike(tmp_path):
    """A bundle trained on a Parquet bool column ('true'/'false') put every row of the nightly CSV
    exported from pandas ('True'/'False') in the unknown bucket: every score rose, a night of false
    alarms. An integer code with one blank was read as decimals from the Parquet, and became numeric."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n = 800
    a = rng.normal(size=n)
    flag = (a + rng.normal(scale=0.3, size=n) > 0).astype(object)
    flag[::97] = None
    code = pd.array(rng.integers(1, 4, n), dtype="Int64")
    code[5] = pd.NA
    frame = pd.DataFrame({"a": a, "b": 2 * a + rng.normal(scale=0.1, size=n), "flag": flag, "code": code})
    parquet = tmp_path / "night.parquet"
    # As a tool other than pandas writes it: bool and int64 with nulls, no pandas metadata.
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(), parquet)
    csv = tmp_path / "night.csv"
    frame.to_csv(csv, index=False)
    assert "True" in csv.read_text() and "true" not in csv.read_text()

    job = TrainJob(data=parquet, name="night", out_dir=tmp_path / "out", config=quiet_config(max_epochs=5))
    bundle = Bundle.load(workflow.run_training(job)["bundle"])
    scores = {}
    for data in (parquet, csv):
        score_files(ScoreJob(bundle.path, (data,), tmp_path / f"{data.suffix[1:]}.scores.parquet", device="cpu"))
        scores[data.suffix] = pd.read_parquet(tmp_path / f"{data.suffix[1:]}.scores.parquet")
    np.testing.assert_array_equal(scores[".csv"]["score"], scores[".parquet"]["score"])
    np.testing.assert_array_equal(scores[".csv"]["is_anomaly"], scores[".parquet"]["is_anomaly"])
    entries = {c["name"]: c for c in bundle.manifest["preprocessing"]["categorical"]}
    assert entries["flag"]["boolean"] and set(entries["flag"]["categories"]) == {"", "false", "true"}
    assert "boolean" not in entries["code"] and set(entries["code"]["categories"]) == {"1", "2", "3"}
    assert bundle.manifest["verification"]["passed"]


@pytest.mark.slow
def test_an_integer_code_scores_alike_after_pandas_rewrote_it_with_a_blank(tmp_path):
    """A nightly job reads the CSV with pandas; one blank cell makes an integer code float64, and
    to_csv writes '3.0' for 3. Read verbatim, every row of the code went to the unknown bucket: the
    whole night's scores rose and rows were flagged that were not the night before."""
    rng = np.random.default_rng(0)
    n = 600
    a = rng.normal(size=n)
    frame = pd.DataFrame({"row_id": [f"r{i}" for i in range(n)], "a": a, "b": 2 * a + rng.normal(scale=0.1, size=n),
                          "code": np.digitize(a + rng.normal(scale=0.3, size=n), [-0.5, 0.5]) + 1})
    train = tmp_path / "train.csv"
    frame.to_csv(train, index=False)
    job = TrainJob(data=train, name="codes", out_dir=tmp_path / "out", id_columns=("row_id",),
                   config=quiet_config(max_epochs=5))
    bundle = Bundle.load(workflow.run_training(job)["bundle"])
    night = pd.read_csv(train)
    night.loc[7, "code"] = None
    assert night["code"].dtype == np.float64
    nightly = {"csv": tmp_path / "night.csv", "parquet": tmp_path / "night.parquet"}
    night.to_csv(nightly["csv"], index=False)
    night.to_parquet(nightly["parquet"], index=False)  # float64 holding 3.0: read as '3' already
    assert ",2.0\n" in nightly["csv"].read_text()
    scores = {}
    for name, data in {"train": train, **nightly}.items():
        score_files(ScoreJob(bundle.path, (data,), tmp_path / f"{name}.scores.parquet", device="cpu"))
        scores[name] = pd.read_parquet(tmp_path / f"{name}.scores.parquet").drop(index=7)
    for name in nightly:
        np.testing.assert_array_equal(scores[name]["score"], scores["train"]["score"])
        np.testing.assert_array_equal(scores[name]["is_anomaly"], scores["train"]["is_anomaly"])
    entry = bundle.manifest["preprocessing"]["categorical"][0]
    assert entry == {"name": "code", "categories": entry["categories"], "integer": True, "unknown_share": 0.0}
    assert sorted(entry["categories"]) == ["1", "2", "3"] and bundle.manifest["verification"]["passed"]
    example = entry["categories"][0]
    assert f"integer-coded ('{example}.0' reads as '{example}')" in describe_manifest(bundle.manifest)


def test_a_flag_column_of_one_value_and_blanks_is_learned_from_which_rows_are_blank(tmp_path):
    """The flag is set exactly when `a` is high; anomalies have it flipped and nothing else odd.
    Before, the column was dropped as constant and these rows scored as normal (AUROC about 0.5)."""
    rng = np.random.default_rng(0)

    def rows(n: int, flipped: int) -> pd.DataFrame:
        a = rng.normal(size=n)
        flag = np.where(a > 0.5, 1.0, np.nan)
        flag[:flipped] = np.where(a[:flipped] > 0.5, np.nan, 1.0)
        return pd.DataFrame({"a": a, "b": a + 0.1 * rng.normal(size=n), "flag": flag,
                             "label": (np.arange(n) < flipped).astype(int)})

    job = TrainJob(data=write_table(rows(3000, 0), tmp_path / "train.csv"), name="flags", out_dir=tmp_path / "out",
                   label_column="label", config=quiet_config(max_epochs=40))
    bundle = Path(workflow.run_training(job)["bundle"])
    assert "flag" in Bundle.load(bundle).manifest["schema"]["numeric"]
    batch = rows(1000, 50)
    scored = tmp_path / "scores.parquet"
    score_files(ScoreJob(bundle, (write_table(batch, tmp_path / "batch.csv"),), scored, device="cpu"))
    assert auroc(batch["label"].to_numpy(), pd.read_parquet(scored)["score"].to_numpy()) >= 0.9
