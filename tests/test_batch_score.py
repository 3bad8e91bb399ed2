import json
import os
from pathlib import Path
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from pipeline.batch_score import score_files
from pipeline.outputs import merge_scored_parts, summary_path
from pipeline.bundle import Bundle
from pipeline.config import ScoreJob, TrainJob
from pipeline.errors import ConfigError, DataError
from pipeline.runtime import BundleScorer
from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table
from pipeline.workflow import run_training
from tests.conftest import disk_full_when_writing, quiet_config, run_main


@pytest.fixture(scope="module")
def frame():
    return make_sensor_table(SyntheticSpec(n_rows=5000, seed=21))


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".CSV.GZ", ".parquet"])
def test_streamed_scores_equal_in_memory_scores(trained_bundle, frame, tmp_path, suffix):
    source = write_table(frame, tmp_path / f"in{suffix}")
    out = tmp_path / "scores.parquet"
    summary = score_files(ScoreJob(trained_bundle, (source,), out, device="cpu", batch_size=333))
    scored = pd.read_parquet(out)
    expected = BundleScorer(Bundle.load(trained_bundle), device="cpu").score_frame(frame)
    assert list(scored.columns) == ["row_id", "score", "recon", "kl", "p_value", "is_anomaly"]
    assert scored["row_id"].astype(int).tolist() == frame["row_id"].tolist()
    np.testing.assert_allclose(scored["score"], expected["score"], rtol=1e-6)
    assert summary.rows == 5000 and summary.anomalies == int(expected["is_anomaly"].sum())
    assert summary.auroc > 0.7  # the input carries the bundle's label column
    written = json.loads(summary_path(out).read_text())
    assert written["rows"] == 5000 and written["target_fpr"] == 0.01
    calibration = Bundle.load(trained_bundle).calibration_for("fp32")
    low, high = calibration["fpr_range_90"]
    assert low < calibration["expected_fpr"] < high
    assert written["fpr_range"] == f"{low:.2%}-{high:.2%} for 90% of calibration sets of {calibration['n_calibration']:,} rows"
    assert written["fpr_range"] in summary.describe()


def test_failed_run_leaves_existing_output_untouched(trained_bundle, frame, tmp_path):
    good = write_table(frame, tmp_path / "good.csv")
    bad_frame = frame.astype({"temperature": object})
    bad_frame.loc[4000, "temperature"] = "broken"
    bad = write_table(bad_frame, tmp_path / "bad.csv")
    out = tmp_path / "out" / "scores.csv"
    out.parent.mkdir()
    out.write_text("previous results\n")
    with pytest.raises(DataError, match=r"column 'temperature' must be numeric but row 4001"):
        score_files(ScoreJob(trained_bundle, (good, bad), out, device="cpu", batch_size=1000))
    assert out.read_text() == "previous results\n"
    assert [p.name for p in out.parent.iterdir()] == ["scores.csv"]  # no temp file left behind


def test_several_inputs_get_a_source_column(trained_bundle, frame, tmp_path):
    a = write_table(frame.iloc[:100], tmp_path / "a.parquet")
    b = write_table(frame.iloc[100:250], tmp_path / "b.csv")
    out = tmp_path / "scores.csv"
    score_files(ScoreJob(trained_bundle, (a, b), out, device="cpu"))
    scored = pd.read_csv(out)
    assert list(scored.columns[:2]) == ["source", "row_id"]
    assert scored["source"].value_counts().to_dict() == {str(a): 100, str(b): 150}


def test_merge_of_parts_matches_one_pass(trained_bundle, frame, tmp_path):
    parts = []
    for i, chunk in enumerate([frame.iloc[:50], frame.iloc[50:80]]):
        source = write_table(chunk, tmp_path / f"in{i}.csv")
        part = tmp_path / f"part{i}.parquet"
        score_files(ScoreJob(trained_bundle, (source,), part, device="cpu"))
        parts.append((str(source), part))
    assert merge_scored_parts(parts, tmp_path / "merged.parquet") == 80
    merged = pd.read_parquet(tmp_path / "merged.parquet")
    assert merged["source"].tolist() == [parts[0][0]] * 50 + [parts[1][0]] * 30


def test_a_failing_output_writer_leaves_nothing(tmp_path):
    """The background writer's error reaches the caller, and no temp or target file stays."""
    import pyarrow as pa

    from pipeline.outputs import OutputWriter

    target = tmp_path / "out.parquet"
    with pytest.raises(ValueError, match="(?i)schema"):
        with OutputWriter(target) as writer:
            writer.write(pa.table({"score": [1.0, 2.0]}))
            writer.write(pa.table({"score": ["not", "a float"]}))  # schema mismatch inside the writer thread
    assert list(tmp_path.iterdir()) == []
    with OutputWriter(target) as writer:
        writer.write(pa.table({"score": [1.0, 2.0]}))
    assert pd.read_parquet(target)["score"].tolist() == [1.0, 2.0]


def test_a_read_ahead_stopped_early_ends_its_thread_at_once():
    """A run stopped (a signal, an error) while the reader, at the end of its file, waited for room
    for its last item: the reader waited forever, and the run 5 s for it; the process then exited
    with it still there."""
    import threading
    import time

    import pyarrow as pa

    from pipeline.batch_score import _prefetch

    before = set(threading.enumerate())
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with _prefetch(iter([pa.record_batch({"x": [i]}) for i in range(3)])) as chunks:
            next(chunks)
            time.sleep(0.3)  # the reader fills the two slots and waits to put the end
            raise KeyboardInterrupt
    assert time.monotonic() - started < 2
    assert [thread for thread in threading.enumerate() if thread not in before] == []


def test_a_writer_that_fails_as_it_closes_the_file_fails_the_run(tmp_path, monkeypatch):
    """Parquet writes its footer as the file is closed, where a full disk shows: that error was lost
    in the writer thread, and a file without its footer was renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.outputs import OutputWriter

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "close", disk_full)
    with pytest.raises(OSError, match="No space left"):
        with OutputWriter(tmp_path / "out.parquet") as writer:
            writer.write(pa.table({"score": [1.0, 2.0]}))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_writer_removes_the_folders_it_made_and_keeps_the_users(tmp_path):
    """An output folder that did not exist before a failed run does not stay behind, empty."""
    import pyarrow as pa

    from pipeline.outputs import OutputWriter

    kept = tmp_path / "kept"
    kept.mkdir()
    for target in (tmp_path / "new" / "deeper" / "out.parquet", kept / "new" / "out.parquet"):
        with pytest.raises(ValueError, match="(?i)schema"):
            with OutputWriter(target) as writer:
                writer.write(pa.table({"score": [1.0, 2.0]}))
                writer.write(pa.table({"score": ["not", "a float"]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and list(kept.iterdir()) == []


def test_scoring_that_fails_on_a_later_file_leaves_no_new_folders(trained_bundle, frame, tmp_path):
    good = write_table(frame.iloc[:50], tmp_path / "good.csv")
    broken = frame.iloc[:50].astype({"temperature": object})
    broken.loc[broken.index[40], "temperature"] = "n/a?"
    bad = write_table(broken, tmp_path / "bad.csv")
    output = tmp_path / "scores" / "nightly" / "out.parquet"
    with pytest.raises(DataError, match="temperature"):
        score_files(ScoreJob(trained_bundle, (good, bad), output, device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "good.csv"]


def test_parquet_output_dictionary_encodes_only_low_cardinality_columns(trained_bundle, frame, tmp_path):
    """Unique ids and scores are written plain: trying a dictionary for them cost 4x the writing."""
    import pyarrow.parquet as pq

    out = tmp_path / "scores.parquet"
    score_files(ScoreJob(trained_bundle, (write_table(frame, tmp_path / "in.csv"),), out, device="cpu"))
    row_group = pq.ParquetFile(out).metadata.row_group(0)
    encodings = {row_group.column(i).path_in_schema: row_group.column(i).encodings
                 for i in range(row_group.num_columns)}
    dictionary = {name for name, used in encodings.items() if any("DICTIONARY" in e for e in used)}
    assert dictionary == {"p_value"}, encodings


def test_parquet_output_gathers_small_chunks_into_large_row_groups(tmp_path):
    """Small scored chunks share row groups (one per write made 147 for 1M rows), in order."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    from pipeline.outputs import ROW_GROUP_ROWS, OutputWriter

    target = tmp_path / "scores.parquet"
    chunk = 5_000
    n_chunks = 2 * ROW_GROUP_ROWS // chunk + 3
    with OutputWriter(target) as writer:
        for i in range(n_chunks):
            writer.write(pa.table({"row": np.arange(i * chunk, (i + 1) * chunk)}))
    metadata = pq.ParquetFile(target).metadata
    assert metadata.num_rows == n_chunks * chunk
    assert metadata.num_row_groups == 3  # two full groups and the rest
    assert all(metadata.row_group(g).num_rows >= ROW_GROUP_ROWS for g in range(2))
    assert np.array_equal(pd.read_parquet(target)["row"].to_numpy(), np.arange(n_chunks * chunk))


def test_inputs_are_checked_before_a_session_is_built(trained_bundle, frame, tmp_path, monkeypatch):
    """A CSV without the bundle's columns fails on its own, before `--device auto` can warn about CUDA."""
    import pipeline.batch_score as batch_score

    built = []
    monkeypatch.setattr(batch_score, "shared_scorer", lambda *args: built.append(args))
    source = write_table(frame.drop(columns=["temperature"]), tmp_path / "in.csv")
    with pytest.raises(DataError, match=r"missing column\(s\) \['temperature'\]"):
        score_files(ScoreJob(trained_bundle, (source,), tmp_path / "scores.parquet", device="auto"))
    assert built == []
    assert list(tmp_path.iterdir()) == [source]


def test_the_bundle_is_loaded_and_hashed_once(trained_bundle, frame, tmp_path, monkeypatch):
    """The inputs check and the session share one load of the bundle (each load hashes every file)."""
    loads = []
    load = Bundle.load.__func__
    monkeypatch.setattr(Bundle, "load", classmethod(lambda cls, path: loads.append(path) or load(cls, path)))
    source = write_table(frame, tmp_path / "in.csv")
    summary = score_files(ScoreJob(trained_bundle, (source,), tmp_path / "scores.parquet", device="cpu"))
    assert summary.rows == len(frame)
    assert len(loads) == 1


def test_a_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    """When the final rename fails (the target became a folder, the disk is full), the temp file goes too."""
    import pyarrow as pa

    import pipeline.outputs as outputs

    def failing_replace(source, target):
        raise IsADirectoryError(21, "Is a directory", str(source), None, str(target))

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(IsADirectoryError):
        with outputs.OutputWriter(tmp_path / "out.parquet") as writer:
            writer.write(pa.table({"score": [1.0, 2.0]}))
    with pytest.raises(IsADirectoryError):
        outputs.write_atomic(tmp_path / "out.summary.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_an_output_inside_the_bundle_is_refused(trained_bundle, frame, tmp_path):
    """--output B/calibration_rows.parquet replaced a hashed bundle file, and the bundle stopped loading."""
    import shutil

    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    source = write_table(frame.iloc[:50], tmp_path / "in.csv")
    for output in (bundle / "calibration_rows.parquet", bundle / "scores" / "s.parquet", bundle / "s.csv"):
        with pytest.raises(ConfigError, match="inside the bundle"):
            score_files(ScoreJob(bundle, (source,), output, device="cpu"))
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before
    assert not (bundle / "scores").exists()
    Bundle.load(bundle)


def test_merge_of_parts_refuses_to_replace_an_input(trained_bundle, frame, tmp_path):
    """The flow's merge step names the inputs too: its output must not be one of them."""
    source = write_table(frame.iloc[:50], tmp_path / "in.csv")
    part = tmp_path / "part.parquet"
    score_files(ScoreJob(trained_bundle, (source,), part, device="cpu"))
    before = source.read_bytes()
    with pytest.raises(ConfigError, match=r"is the input .*in\.csv"):
        merge_scored_parts([(str(source), part)], source)
    assert source.read_bytes() == before


def test_merge_of_parts_names_a_source_that_is_not_utf8(trained_bundle, frame, tmp_path):
    """An image folder's name need not be UTF-8 (b'caf\\xe9' on Linux): the flow's merge wrote it
    into the `source` column as it was, and pyarrow failed the run with UnicodeEncodeError."""
    part = tmp_path / "part.parquet"
    score_files(ScoreJob(trained_bundle, (write_table(frame.iloc[:20], tmp_path / "in.csv"),), part, device="cpu"))
    odd = os.fsdecode(b"/data/caf\xe9")
    rows = merge_scored_parts([(odd, part), ("/data/plain", part)], tmp_path / "merged.parquet")
    merged = pd.read_parquet(tmp_path / "merged.parquet")
    assert rows == 40 and merged["source"].tolist() == ["/data/caf\\xe9"] * 20 + ["/data/plain"] * 20


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_label_spelled_as_training_takes_it_is_read_at_scoring(trained_bundle, frame, tmp_path, suffix):
    """Training takes a true/false label; scoring read the label as a number and refused the same
    file ("column 'label' must be numeric but row 1 holds 'false'"), or from Parquet read it as 0/1
    only by accident of a cast."""
    part = frame.iloc[:1000]
    plain = score_files(ScoreJob(trained_bundle, (write_table(part, tmp_path / f"plain{suffix}"),),
                                 tmp_path / "plain_scores.parquet", device="cpu", batch_size=300))
    flags = part.assign(label=part["label"].astype(bool).astype(object))
    flags.loc[flags.index[7], "label"] = None  # a blank label: left out of AUROC, as before
    spelled = score_files(ScoreJob(trained_bundle, (write_table(flags, tmp_path / f"flags{suffix}"),),
                                   tmp_path / "flags_scores.parquet", device="cpu", batch_size=300))
    assert plain.auroc is not None and spelled.auroc is not None
    assert abs(spelled.auroc - plain.auroc) < 0.01 and spelled.rows == plain.rows

    odd = part.assign(label=np.where(np.arange(len(part)) == 650, "maybe", part["label"].astype(str)))
    with pytest.raises(DataError, match=r"label column 'label' must be 0 \(normal\) or 1 \(anomaly\) but row 651 "
                                        r"holds 'maybe'"):
        score_files(ScoreJob(trained_bundle, (write_table(odd, tmp_path / f"odd{suffix}"),),
                             tmp_path / "odd_scores.parquet", device="cpu", batch_size=300))
    assert not (tmp_path / "odd_scores.parquet").exists()


@pytest.fixture(scope="module")
def yes_no_bundle(tmp_path_factory):
    """A bundle trained on a 'yes'/'no' column, and its training file."""
    folder = tmp_path_factory.mktemp("yes_no")
    rng = np.random.default_rng(3)
    a = rng.normal(size=600)
    frame = pd.DataFrame({"a": a, "b": 2 * a + rng.normal(scale=0.1, size=600), "flag": np.where(a > 0, "yes", "no")})
    train = folder / "train.csv"
    frame.to_csv(train, index=False)
    job = TrainJob(data=train, name="flags", out_dir=folder / "out", config=quiet_config(max_epochs=3))
    return Path(run_training(job)["bundle"]), train


@pytest.mark.slow
def test_a_column_spelled_differently_warns_once_with_its_counts(yes_no_bundle, tmp_path, capsys):
    """A colleague's export now writes 'Y'/'N' for 'yes'/'no': every row went to the unknown bucket
    and scored higher, and the night's alarms came with no word of why."""
    from pipeline.cli import main

    bundle, train = yes_no_bundle
    night = pd.read_csv(train)
    night["flag"] = night["flag"].map({"yes": "Y", "no": "N"})
    night.to_csv(tmp_path / "night.csv", index=False)
    out = tmp_path / "night.parquet"
    assert main(["score", str(bundle), str(tmp_path / "night.csv"), "--output", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    warnings = [line for line in printed.err.splitlines() if "never saw" in line]
    frequent = Counter(night["flag"]).most_common()  # ties in the order of first appearance, as counted
    assert warnings == [f"warning: {tmp_path / 'night.csv'}: column 'flag': 600 of 600 rows (100%) hold values the "
                        f"bundle never saw (e.g. {', '.join(repr(v) for v, _ in frequent)}); it knows "
                        + ", ".join(repr(c) for c in Bundle.load(bundle).preprocessor.categorical[0].categories)
                        + "; a changed spelling or format sends every such row to the unknown bucket and raises "
                          "its score"]
    assert "values the bundle never saw in 'flag' (100% of rows): see the warning" in printed.out
    entry = json.loads(summary_path(out).read_text())["unseen_categories"]["flag"]
    assert {k: entry[k] for k in ("rows", "unseen", "share", "training_share")} == {
        "rows": 600, "unseen": 600, "share": 1.0, "training_share": 0.0}
    assert list(entry["examples"].items()) == frequent

    own = tmp_path / "own.parquet"
    assert main(["score", str(bundle), str(train), "--output", str(own), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "never saw" not in printed.err + printed.out
    assert json.loads(summary_path(own).read_text())["unseen_categories"] == {
        "flag": {"rows": 600, "unseen": 0, "share": 0.0, "training_share": 0.0, "examples": {}, "warning": None}}


def test_two_inputs_one_spelled_differently_each_file_has_its_counts_and_the_warning_names_it(trained_bundle, tmp_path):
    """`score B mon.parquet tue.parquet`: tue's export wrote the line in lower case. The run's warning
    said 'line' changed but not where; each file's entry now has its own counts, and the line names tue."""
    mon = make_sensor_table(SyntheticSpec(n_rows=300, seed=80))
    tue = make_sensor_table(SyntheticSpec(n_rows=300, seed=81))
    tue["line"] = tue["line"].str.lower()
    inputs = (write_table(mon, tmp_path / "mon.parquet"), write_table(tue, tmp_path / "tue.parquet"))
    out = tmp_path / "week.parquet"
    summary = score_files(ScoreJob(trained_bundle, inputs, out, device="cpu", batch_size=128))
    line = next(s for s in Bundle.load(trained_bundle).preprocessor.categorical if s.name == "line")
    own = [int((~frame["line"].isin(line.known_texts)).sum()) for frame in (mon, tue)]
    assert own[1] == 300 and own[0] < 10  # mon: the odd new line of the synthetic anomalies
    written = json.loads(summary_path(out).read_text())
    for i, path in enumerate(inputs):
        assert summary.files[i].unseen_categories["line"] == {"rows": 300, "unseen": own[i], "share": own[i] / 300}
        assert written["files"][i]["input"] == str(path)
        assert written["files"][i]["unseen_categories"] == summary.files[i].unseen_categories
    entry = written["unseen_categories"]["line"]
    assert (entry["rows"], entry["unseen"]) == (600, sum(own))
    assert entry["warning"].startswith(f"column 'line': {sum(own)} of 600 rows (")
    assert f") in {inputs[1]} (300 of 300 rows); it knows " in entry["warning"]
    assert str(inputs[0]) not in entry["warning"]
    # One input: its path starts the line, and no file is named besides.
    alone = score_files(ScoreJob(trained_bundle, inputs[1:], tmp_path / "tue_scores.parquet", device="cpu"))
    warning = alone.unseen_categories["line"]["warning"]
    assert warning.startswith(f"{inputs[1]}: column 'line': 300 of 300 rows (100%) hold values the bundle never saw (e.g. ")
    assert warning.count(str(inputs[1])) == 1 and "rows); it knows" not in warning
    assert alone.files[0].unseen_categories["line"] == {"rows": 300, "unseen": 300, "share": 1.0}


@pytest.fixture
def summary_write_fails(monkeypatch):
    """The disk fills up as the run's summary (``scores.summary.json``) is written."""
    disk_full_when_writing(monkeypatch, "scores.summary.json")


@pytest.mark.parametrize("earlier", [True, False], ids=["earlier output", "none"])
def test_a_summary_that_cannot_be_written_leaves_the_earlier_output(trained_bundle, frame, tmp_path,
                                                                    summary_write_fails, earlier):
    """The scores were renamed into place before their summary was written: a full disk then left
    the new scores beside the earlier run's summary (which describes other rows), or with none."""
    source = write_table(frame.head(500), tmp_path / "in.csv")
    out = tmp_path / "out" / "scores.parquet"
    if earlier:
        out.parent.mkdir()
        out.write_bytes(b"earlier scores")
        summary_path(out).write_text("earlier summary")
    with pytest.raises(OSError, match="No space left"):
        score_files(ScoreJob(trained_bundle, (source,), out, device="cpu"))
    if earlier:
        assert sorted(p.name for p in out.parent.iterdir()) == ["scores.parquet", "scores.summary.json"]
        assert out.read_bytes() == b"earlier scores" and summary_path(out).read_text() == "earlier summary"
    else:
        assert not out.parent.exists()  # nor the folder the run made for them


def test_staged_outputs_are_renamed_at_the_commit_and_removed_if_the_block_fails(tmp_path):
    from pipeline.outputs import StagedOutputs

    (tmp_path / "stale.csv").write_text("earlier run")
    (tmp_path / "kept.json").write_text("earlier")
    with pytest.raises(OSError):
        with StagedOutputs() as staged:
            staged.text(tmp_path / "kept.json", "new")
            staged.remove(tmp_path / "stale.csv")
            raise OSError("a later step failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "stale.csv"]  # untouched, no temp file
    assert (tmp_path / "kept.json").read_text() == "earlier"

    with StagedOutputs() as staged:
        staged.text(tmp_path / "kept.json", "new")
        staged.remove(tmp_path / "stale.csv")
        assert (tmp_path / "kept.json").read_text() == "earlier"  # nothing in place before the commit
        staged.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"] and staged.committed
    assert (tmp_path / "kept.json").read_text() == "new"


def test_staged_outputs_remove_only_the_named_files_of_a_folder(tmp_path):
    """A removed folder keeps what the earlier run did not write there (and itself, then); a link is not followed."""
    from pipeline.outputs import StagedOutputs

    figures, elsewhere = tmp_path / "r_files", tmp_path / "elsewhere"
    for folder in (figures, elsewhere):
        folder.mkdir()
        (folder / "plot.png").write_bytes(b"a figure")
    (figures / "notes.txt").write_text("the user's")
    (tmp_path / "linked_files").symlink_to(elsewhere)
    (tmp_path / "page.html").mkdir()  # a folder where a file of an earlier run was: not that file
    with StagedOutputs() as staged:
        for folder in (figures, tmp_path / "linked_files", tmp_path / "gone_files"):
            staged.remove(folder, owned={"plot.png"}.__contains__)
        staged.remove(tmp_path / "page.html")
        assert (figures / "plot.png").exists()  # nothing goes before the commit
        staged.commit()
    assert sorted(p.name for p in figures.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["plot.png"] and (tmp_path / "page.html").is_dir()
    (figures / "notes.txt").unlink()
    (figures / "plot.png").write_bytes(b"a figure")
    with StagedOutputs() as staged:
        staged.remove(figures, owned={"plot.png"}.__contains__)
        staged.commit()
    assert not figures.exists()


def test_staged_outputs_with_a_folder_in_the_way_replace_nothing(tmp_path):
    """A folder where the second file goes failed its rename after the first file was replaced."""
    from pipeline.outputs import StagedOutputs

    (tmp_path / "first.csv").write_text("earlier")
    (tmp_path / "stale.csv").write_text("earlier run")
    (tmp_path / "second.json").mkdir()
    with pytest.raises(ConfigError, match=r"second.json: is a folder, where this run puts a file; nothing was replaced"):
        with StagedOutputs() as staged:
            staged.text(tmp_path / "first.csv", "new")
            staged.remove(tmp_path / "stale.csv")
            staged.text(tmp_path / "second.json", "new")
            staged.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.csv", "second.json", "stale.csv"]  # no temp file
    assert (tmp_path / "first.csv").read_text() == "earlier" and not staged.committed


def test_a_numeric_column_left_blank_warns_and_is_in_the_summary(trained_bundle, tmp_path, capsys):
    """An export left 'temperature' empty: every row got training's median, so the night looked calmer
    than ever ("0 anomalies") with no word of why, where a blank categorical column warned."""
    night = make_sensor_table(SyntheticSpec(n_rows=500, seed=90))
    night["temperature"] = np.nan  # training had no blank here
    night["vibration"] = np.nan  # training had a few (2%)
    night.loc[night.index[:3], "pressure"] = np.nan  # the odd blank cell does not warn
    source = write_table(night, tmp_path / "night.csv")
    out = tmp_path / "night.parquet"
    code, printed, err = run_main(capsys, "score", trained_bundle, source, "--output", out, "--device", "cpu")
    assert code == 0, err
    written = json.loads(summary_path(out).read_text())
    entries = written["missing_numeric"]
    assert {k: entries["temperature"][k] for k in ("rows", "missing", "share", "training_share")} == {
        "rows": 500, "missing": 500, "share": 1.0, "training_share": 0.0}
    assert 0 < entries["vibration"]["training_share"] < 0.1 and entries["vibration"]["missing"] == 500
    assert (entries["pressure"]["missing"], entries["pressure"]["warning"]) == (3, None)
    medians = {s.name: s.median for s in Bundle.load(trained_bundle).preprocessor.numeric}
    warnings = [line for line in err.splitlines() if "are blank" in line]
    assert warnings == [
        f"warning: {source}: column '{name}': 500 of 500 rows (100%; {training} in training) are blank; scoring gives "
        f"a blank training's median ({medians[name]:.6g}), so no value of this column can flag those rows: fill the "
        f"column, or check the export that wrote the file"
        for name, training in (("temperature", "none"), ("vibration", f"{entries['vibration']['training_share']:.1%}"))]
    assert ("; far more blanks than in training in 'temperature' (100% of rows), 'vibration' (100% of rows): see the "
            "warning") in printed
    assert written["files"][0]["missing_numeric"]["temperature"] == {"rows": 500, "missing": 500, "share": 1.0}
    from pipeline.scoring_report import input_warnings

    assert input_warnings(out) == [line[len("warning: "):] for line in warnings]  # the report's alerts


def test_of_several_inputs_the_one_left_blank_is_named(trained_bundle, tmp_path):
    mon = make_sensor_table(SyntheticSpec(n_rows=300, seed=91))
    tue = make_sensor_table(SyntheticSpec(n_rows=300, seed=92))
    tue["temperature"] = np.nan
    inputs = (write_table(mon, tmp_path / "mon.parquet"), write_table(tue, tmp_path / "tue.csv"))
    summary = score_files(ScoreJob(trained_bundle, inputs, tmp_path / "both.parquet", device="cpu", batch_size=128))
    assert [f.missing_numeric["temperature"]["missing"] for f in summary.files] == [0, 300]
    entry = summary.missing_numeric["temperature"]
    assert (entry["rows"], entry["missing"]) == (600, 300)
    assert entry["warning"].startswith(f"column 'temperature': 300 of 600 rows (50%; none in training) are blank in "
                                       f"{inputs[1]} (300 of 300 rows); scoring gives ")
    assert all(not e["warning"] for name, e in summary.missing_numeric.items() if name != "temperature")


def test_an_unnamed_column_the_bundle_does_not_use_is_named_readably(trained_bundle, tmp_path, caplog):
    """A pandas index written by to_csv() has no name: the warning ended in nothing ('...does not use: ')."""
    frame = make_sensor_table(SyntheticSpec(n_rows=50, seed=93))
    frame["note "] = "x"
    source = tmp_path / "indexed.csv"
    frame.to_csv(source)  # index=True: an unnamed first column
    with caplog.at_level("WARNING", logger="vaeguard"):
        score_files(ScoreJob(trained_bundle, (source,), tmp_path / "indexed.parquet", device="cpu"))
    assert f"{source}: ignoring 2 column(s) the bundle does not use: column 1 (no name), 'note '" in caplog.messages


def test_twice_named_columns_the_bundle_does_not_use_are_ignored(trained_bundle, tmp_path):
    """A pandas index (unnamed) and a trailing comma on every line (another unnamed column): neither is
    read, yet the file was refused as "column '' appears twice". Twice among the columns read, a name
    is ambiguous (pyarrow's CSV reader silently takes the first) and is still refused."""
    frame = make_sensor_table(SyntheticSpec(n_rows=50, seed=94))
    source = tmp_path / "trailing.csv"
    source.write_text("".join(line + ",\n" for line in frame.to_csv().splitlines()))
    summary = score_files(ScoreJob(trained_bundle, (source,), tmp_path / "trailing.parquet", device="cpu"))
    assert summary.rows == 50
    twice = tmp_path / "twice.csv"
    twice.write_text("".join(line + f",{line.split(',')[1]}\n" for line in frame.to_csv(index=False).splitlines()))
    assert twice.read_text().splitlines()[0].endswith(",temperature")
    with pytest.raises(DataError, match="column 'temperature' appears twice in the header"):
        score_files(ScoreJob(trained_bundle, (twice,), tmp_path / "twice.parquet", device="cpu"))


def test_a_file_without_its_header_row_is_told_so_and_a_long_list_of_missing_columns_is_cut(trained_bundle, frame,
                                                                                            tmp_path):
    """Scoring a CSV whose header row was lost listed every column as missing, and a 2,000-column
    table with its names in capitals made a 57 KB error line."""
    from pipeline.batch_score import first_of

    headerless = tmp_path / "night.csv"
    frame.head(50).to_csv(headerless, index=False, header=False)
    with pytest.raises(DataError, match=r"night\.csv: missing column\(s\) \[.*\] that bundle 'sensors' was trained "
                                        r"on \(its first line, [^()]*, looks like data: is the header row missing\? add "
                                        r"a first line naming the columns\); add them"):
        score_files(ScoreJob(trained_bundle, (headerless,), tmp_path / "s.parquet", device="cpu"))
    named = tmp_path / "named.csv"
    frame.head(50).rename(columns=str.upper).to_csv(named, index=False)
    with pytest.raises(DataError) as caught:
        score_files(ScoreJob(trained_bundle, (named,), tmp_path / "s.parquet", device="cpu"))
    assert "looks like data" not in str(caught.value) and "which differ in case or spaces" in str(caught.value)
    names = [f"'c{i}'" for i in range(2000)]
    assert first_of(names) == ", ".join(names[:10]) + " and 1,990 more" and first_of(names[:10]) == ", ".join(names[:10])
