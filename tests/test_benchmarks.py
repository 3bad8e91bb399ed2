"""The detection-quality benchmark harness (benchmarks/quality.py): protocols, PyOD thresholds, a quick run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks import quality
from tests.conftest import SHARED_DATA


def test_dataset_names_match_the_published_table():
    names = list(quality.available_datasets(SHARED_DATA / "adbench"))
    published = quality.read_published(SHARED_DATA / "published_auroc_dev.csv")
    assert set(published) == {"semi", "unsup"}
    assert set(names) == set(published["semi"]) == set(published["unsup"])
    assert names[:3] == ["breastw", "cardio", "thyroid"]  # the published table's order


def test_semi_split_trains_on_half_of_the_normal_rows_only():
    y = np.array([0] * 101 + [1] * 9)
    np.random.default_rng(0).shuffle(y)
    split = quality.make_split(y, "semi", seed=3)
    normal = np.flatnonzero(y == 0)
    assert (y[split.train] == 0).all() and len(split.train) == 50
    assert not set(split.train) & set(split.test)
    assert set(split.train) | set(split.test) == set(range(len(y)))  # every anomaly and the other normals
    assert split.test_labels.sum() == 9 and (split.test_labels == y[split.test]).all()
    assert (quality.make_split(y, "semi", seed=3).train == split.train).all()  # seeded
    assert not np.array_equal(quality.make_split(y, "semi", seed=4).train, split.train)
    assert set(split.train) < set(normal)

    unsup = quality.make_split(y, "unsup", seed=3)
    assert (unsup.train == np.arange(len(y))).all() and (unsup.test == np.arange(len(y))).all()


def test_ks_plus_sees_only_too_small_p_values():
    uniform = (np.arange(1000) + 0.5) / 1000
    assert quality.ks_uniform(uniform)["ks_statistic"] < 0.01 and quality.ks_uniform(uniform)["ks_plus"] < 0.01
    liberal = quality.ks_uniform(uniform * 0.8)  # p-values too small: more false alarms than asked for
    assert liberal["ks_plus"] == pytest.approx(0.2, abs=0.01)
    conservative = quality.ks_uniform(np.r_[uniform[:700], np.ones(300)])  # tied p-values at 1, as duplicate rows give
    assert conservative["ks_statistic"] == pytest.approx(0.3, abs=0.01) and conservative["ks_plus"] < 0.01


@pytest.mark.parametrize("method", ["iforest", "knn"])
def test_pyod_threshold_equals_fitting_with_that_contamination(method):
    """The harness re-thresholds one fitted detector per target FPR instead of refitting it."""
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(600, 4)), rng.normal(size=(400, 4)) * 1.3
    fitted = quality.make_peer(method, seed=1).fit(train)
    for alpha in quality.TARGET_FPRS:
        refit = quality.make_peer(method, seed=1).set_params(contamination=alpha).fit(train)
        quality.pyod_threshold(fitted, alpha)
        shift = refit.decision_scores_ - fitted.decision_scores_  # IForest: sklearn's offset_; KNN: none
        np.testing.assert_allclose(shift, shift[0], atol=1e-12)
        assert refit.threshold_ - fitted.threshold_ == pytest.approx(shift[0], abs=1e-12)
        np.testing.assert_array_equal(fitted.predict(test), refit.predict(test))


@pytest.mark.slow
def test_quick_run(tmp_path, capsys):
    """`python -m benchmarks.quality --quick`: thyroid, seed 0, semi, ours + iforest + knn."""
    out = tmp_path / "quality.json"
    assert quality.main(["--quick", "--out", str(out)]) == 0
    markdown = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert result["complete"]
    records = result["records"]
    assert {r["method"] for r in records} == {"ours", "iforest", "knn"}
    for record in records:
        assert "error" not in record, record
        assert (record["dataset"], record["protocol"], record["seed"]) == ("thyroid", "semi", 0)
        assert 0.0 <= record["auroc"] <= 1.0 and 0.0 <= record["auprc"] <= 1.0
        assert record["fit_seconds"] >= 0 and record["score_seconds"] >= 0
        # semi: half of thyroid's 3,679 normal rows train; the rest and the 93 anomalies test
        assert record["n_train"] == 1839 and record["n_test"] == 1840 + 93 and record["n_test_anomalies"] == 93
    ours = next(r for r in records if r["method"] == "ours")
    assert ours["auroc"] >= 0.9  # published VAE: 98.55
    for peer in (r for r in records if r["method"] != "ours"):
        assert peer["auroc"] >= 0.95, peer  # published IForest 99.0, KNN 98.7: the peers are run properly too
    assert result["aggregates"]["summary"]["semi"]["ours"]["auroc_mean"] == pytest.approx(ours["auroc"])

    calibration = result["calibration"]
    for method in ("ours", "iforest", "knn"):
        entries = {e["target_fpr"]: e for e in calibration if e["method"] == method}
        assert set(entries) == {0.001, 0.01, 0.05}
        for alpha, entry in entries.items():
            assert entry["n_test_normal"] == 1840
            if method == "ours" and alpha == 0.001:
                # 299 calibration rows cannot give a 0.1% threshold: recorded, not dropped
                assert entry["n_calibration"] < 999 and "realized_fpr" not in entry and "999" in entry["error"]
                continue
            assert 0.0 <= entry["realized_fpr"] <= 1.0
            if alpha == 0.05:  # a threshold taken the wrong way round or on other rows would be far off
                assert 0.01 <= entry["realized_fpr"] <= 0.15, entry
    assert 0.0 <= ours["ks_plus"] <= ours["ks_statistic"] <= 1.0
    # The exported scorer's p-values on unseen normal rows are not too small (too many false alarms).
    assert ours["ks_plus"] < ours["ks_critical_5pct"]
    # the exported scorer's is_anomaly is the 1% threshold recomputed from the bundle's calibration scores
    ours_1pct = next(e for e in calibration if e["method"] == "ours" and e["target_fpr"] == 0.01)
    assert ours["bundle_is_anomaly_fpr"] == pytest.approx(ours_1pct["realized_fpr"])

    assert "python -m benchmarks.quality --quick" in markdown.splitlines()[1]
    for text in ("thyroid", "ours", "iforest", "knn", "### AUROC, semi", "### Calibration honesty", "pub. VAE",
                 "honest about its own precision"):
        assert text in markdown
    assert "| thyroid | " in markdown and "98.5" in markdown  # published VAE beside ours
    assert out.with_suffix(".md").read_text() == markdown


def test_stated_range_coverage_counts_runs_inside_the_beta_binomial_range():
    """599 calibration rows (k = 6 at 1%) and 3,000 test normal rows: 1.0% lies inside the
    stated range, 3.0% far above it; peers' entries are not counted."""
    base = {"target_fpr": 0.01, "n_calibration": 599, "expected_fpr": 6 / 600, "n_test_normal": 3000}
    entries = [base | {"method": "ours", "realized_fpr": 0.010}, base | {"method": "ours", "realized_fpr": 0.030},
               base | {"method": "knn", "realized_fpr": 0.010}, base | {"method": "ours", "error": "DataError"}]
    coverage = quality.stated_range_coverage(entries)["0.01"]
    assert coverage == {"runs": 2, "inside": 1, "runs_large": 2, "inside_large": 1}


def test_resume_runs_only_what_an_interrupted_run_left(tmp_path):
    """A run cut short keeps its finished runs: --resume runs the rest, and the result is whole."""
    out = tmp_path / "quality.json"
    argv = ["--datasets", "thyroid", "--seeds", "2", "--protocols", "semi", "--methods", "iforest", "--out", str(out)]
    assert quality.main(argv) == 0
    whole = json.loads(out.read_text())
    interrupted = dict(whole, complete=False, records=whole["records"][:1],
                       calibration=[c for c in whole["calibration"] if c["seed"] == 0])
    out.write_text(json.dumps(interrupted))
    assert quality.main([*argv, "--resume"]) == 0
    finished = json.loads(out.read_text())
    assert finished["complete"] and len(finished["resumed"]) == 1 and finished["resumed"][0]["kept_runs"] == 1
    key = lambda r: (r["seed"], r["method"])  # noqa: E731
    assert sorted(map(key, finished["records"])) == sorted(map(key, whole["records"]))
    assert [r["auroc"] for r in sorted(finished["records"], key=key)] == [r["auroc"] for r in sorted(whole["records"], key=key)]
    assert len(finished["calibration"]) == len(whole["calibration"])
    # Another run's file is never mixed in.
    with pytest.raises(SystemExit, match="other settings"):
        quality.main([*argv[:3], "3", *argv[4:], "--resume"])


def test_first_seed_runs_the_held_out_seeds_on_their_own_splits(tmp_path):
    """--first-seed 5 checks defaults chosen on seeds 0-4 on splits they were never chosen on."""
    out = tmp_path / "held_out.json"
    argv = ["--datasets", "thyroid", "--seeds", "2", "--first-seed", "5", "--protocols", "semi", "--methods",
            "iforest", "--out", str(out)]
    assert quality.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["seeds"] == [5, 6] and sorted(r["seed"] for r in result["records"]) == [5, 6]
    assert "2 seed(s) (5..6)" in out.with_suffix(".md").read_text()


def test_rerun_replaces_one_methods_runs_and_keeps_the_others(tmp_path):
    """--resume --rerun knn runs knn again and keeps iforest's runs as they were."""
    out = tmp_path / "quality.json"
    argv = ["--datasets", "thyroid", "--seeds", "1", "--protocols", "semi", "--methods", "iforest", "knn",
            "--out", str(out)]
    assert quality.main(argv) == 0
    whole = json.loads(out.read_text())
    marked = [dict(r, auroc=0.123) for r in whole["records"]]  # as if both had scored 0.123
    out.write_text(json.dumps(dict(whole, records=marked)))
    assert quality.main([*argv, "--resume", "--rerun", "knn"]) == 0
    result = json.loads(out.read_text())
    rerun = {r["method"]: r["auroc"] for r in result["records"]}
    assert rerun["iforest"] == 0.123
    assert "Re-run in this result on " in quality.render_markdown(result)
    assert ": knn. The other methods' runs are kept" in quality.render_markdown(result)
    assert rerun["knn"] == next(r["auroc"] for r in whole["records"] if r["method"] == "knn")
    with pytest.raises(SystemExit):  # --rerun alone would have nothing to re-run inside
        quality.parse_args([*argv, "--rerun", "knn"])


def test_rerun_of_ours_accepts_new_ours_settings_only():
    """Ours' settings may change when ours is re-run; any other setting still refuses the earlier file."""
    settings = {"datasets": ["thyroid"], "seeds": [0], "ours_config": "defaults", "ours_settings": {"lr": 1}}
    earlier = {"settings": settings, "records": [{"dataset": "thyroid", "protocol": "semi", "method": "knn", "seed": 0},
                                                 {"dataset": "thyroid", "protocol": "semi", "method": "ours", "seed": 0}],
               "calibration": [], "started_at": "then", "environment": {}}
    fresh = {"settings": dict(settings, ours_settings={"lr": 2}), "environment": {}}
    result, _ = quality.resumed(dict(fresh), earlier, Path("q.json"), ("ours",))
    assert [r["method"] for r in result["records"]] == ["knn"]
    with pytest.raises(SystemExit, match="other settings"):
        quality.resumed(dict(fresh), earlier, Path("q.json"), ("knn",))
    with pytest.raises(SystemExit, match="other settings"):
        quality.resumed(dict(fresh, settings=dict(fresh["settings"], seeds=[0, 1])), earlier, Path("q.json"), ("ours",))


def test_conformal_spread_follows_the_beta_law():
    """An exact conformal threshold on 499 rows (k = 5) strays by about 1/sqrt(k) per seed; on 19,999 rows it barely does."""
    from benchmarks.conformal_spread import miss_chance

    rng = np.random.default_rng(0)
    k, spread, missed = miss_chance(499, 2866, 0.01, 5, 0.3, rng)
    assert k == 5 and 0.40 < spread < 0.55 and 0.10 < missed.mean() < 0.25
    k, spread, missed = miss_chance(19_999, 141_651, 0.01, 5, 0.3, rng)
    assert k == 200 and spread < 0.1 and missed.mean() < 0.001


def test_split_tails_threshold_is_exact_on_exchangeable_rows():
    """On rows that are exchangeable by construction, the train-half threshold's realized FPR
    averages k / (n + 1); ranking one place off (k of 4 or 6 instead of 5) would show as +-20%."""
    from benchmarks.split_tails import realized_rates

    y = np.array([0] * 4000 + [1] * 10)
    scores = np.random.default_rng(7).standard_normal(4000)
    target = 0.0025  # k = floor(0.0025 * 2001) = 5 on the 2,000-row train half
    rates = realized_rates(scores, y, seeds=400, target=target)
    assert rates.mean() / (5 / 2001) == pytest.approx(1.0, abs=0.1)
    assert rates.std() > 0  # each seed's split differs


def test_split_tails_scores_put_the_isolated_row_last():
    from benchmarks.split_tails import fixed_scores

    normal = np.random.default_rng(0).standard_normal((300, 4))
    normal[17] = 25.0
    for name, scores in fixed_scores(normal).items():
        assert np.argmax(scores) == 17, name


def test_split_tails_prints_a_row_per_fixed_score(capsys):
    """The command behind BENCHMARKS.md's split table, on one real dataset and two seeds."""
    from benchmarks import split_tails

    split_tails.main(["--datasets", "wilt", "--seeds", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| wilt |")]
    assert [row.split(" | ")[1] for row in rows] == ["5-NN distance", "Mahalanobis"]
    assert all(" | 2,281 | " in row for row in rows)  # half of wilt's 4,562 normal rows
    with pytest.raises(SystemExit, match="no dataset nosuch"):
        split_tails.main(["--datasets", "nosuch"])


@pytest.mark.slow
def test_speed_harness_measures_every_contender(tmp_path):
    """benchmarks.speed on a few thousand rows, so the harness behind BENCHMARKS.md's speed table
    cannot rot. Only what the figures mean is asserted: speed belongs in the benchmark itself."""
    from benchmarks import speed

    result = speed.measure(rows=4000, train_rows=2000, work=tmp_path)
    assert set(result["scoring_rows_per_s"]) == {"ours_onnx", "ours_torch_eager", "pyod_vae", "pyod_iforest"}
    assert all(rate > 0 for rate in result["scoring_rows_per_s"].values())
    for kind in ("csv", "parquet"):
        figures = result["end_to_end"][kind]
        assert figures["score_over_parse"] == pytest.approx(
            figures["score_rows_per_s"] / figures["parse_rows_per_s"], rel=0.01)
    assert result["precision"]["fp32"]["auroc"] > 0.65  # the generator's anomalies are found
    for variant in ("fp16", "int8"):
        assert result["precision"][variant]["decision_agreement"] >= 0.99
    # Files of each run stay in the work folder given, which the CLI removes afterwards.
    assert (tmp_path / "test.csv").is_file() and (tmp_path / "out.csv.parquet").is_file()


def _result(records: list[dict], datasets: list[str], methods: list[str], calibration: list[dict] | None = None) -> dict:
    """A quality result as `quality.run` writes it, from hand-made records (no training)."""
    result = {"command": "", "complete": True, "seconds": 1.0, "records": records, "calibration": calibration or [],
              "settings": {"datasets": datasets, "seeds": [0, 1], "protocols": ["semi"], "methods": methods},
              "environment": {"cpu_count": 2, "threads": 2, "versions": {}, "git_commit": "x", "git_dirty": False}}
    result["aggregates"] = quality.aggregate(result, {})
    return result


def _record(dataset: str, method: str, seed: int, auroc: float | None) -> dict:
    record = {"dataset": dataset, "protocol": "semi", "method": method, "seed": seed, "n_train": 10, "n_test": 10,
              "n_test_anomalies": 2, "n_features": 3}
    if auroc is None:
        return record | {"error": "DataError: failed"}
    return record | {"auroc": auroc, "auprc": auroc / 2, "fit_seconds": 1.0, "score_seconds": 0.1}


def test_mean_over_datasets_compares_methods_on_the_same_datasets_and_seeds():
    """A method that fails on a hard dataset (or on one seed of it) must not top the mean by skipping it."""
    records = [_record(d, "steady", s, a) for d, a in (("easy", 0.9), ("hard", 0.6), ("mixed", 0.7)) for s in (0, 1)]
    records += [_record("easy", "flaky", s, 0.95) for s in (0, 1)]
    records += [_record("hard", "flaky", s, None) for s in (0, 1)]  # failed on every seed
    records += [_record("mixed", "flaky", 0, 0.99), _record("mixed", "flaky", 1, None)]  # one seed of two
    result = _result(records, ["easy", "hard", "mixed"], ["steady", "flaky"])
    summary = result["aggregates"]["summary"]["semi"]
    assert summary["common_datasets"] == ["easy"]
    assert summary["flaky"]["auroc_mean_common"] == pytest.approx(0.95)
    assert summary["steady"]["auroc_mean_common"] == pytest.approx(0.9)
    assert summary["flaky"]["auprc_median_common"] == pytest.approx(0.475)
    markdown = quality.render_markdown(result)
    # The bold mean is over "easy" alone for both; the own-datasets means follow, with their counts.
    assert "| **mean over the 1 datasets every method ran on every seed** | **90.0** | **95.0** |" in markdown
    assert "| mean over each method's own datasets (how many) | 73.3 (3) | 97.0 (2) |" in markdown
    assert "| **mean** |" not in markdown
    auprc = markdown.split("### AUPRC")[1].split("###")[0]
    assert "| **mean over the datasets every method ran on every seed (semi 1)** | **45.0** | **47.5** |" in auprc


def test_calibration_error_compares_methods_on_the_same_datasets():
    """ours cannot calibrate 0.1% on a small dataset; a peer's error there must not be set beside
    ours' error averaged over the large dataset alone."""
    entries = []
    for seed in (0, 1):
        for method, dataset, realized in (("ours", "large", 0.0016), ("knn", "large", 0.0011), ("knn", "small", 0.01)):
            entries.append({"dataset": dataset, "method": method, "seed": seed, "target_fpr": 0.001,
                            "n_test_normal": 5000 if dataset == "large" else 300, "realized_fpr": realized}
                           | ({"n_calibration": 1999, "expected_fpr": 0.002 / 2} if method == "ours" else {}))
        entries.append({"dataset": "small", "method": "ours", "seed": seed, "target_fpr": 0.001, "n_test_normal": 300,
                        "n_calibration": 99, "error": "DataError: 99 calibration rows cannot calibrate"})
    records = [_record(d, m, s, 0.9) | {"n_test_anomalies": 2} for d in ("large", "small") for m in ("ours", "knn")
               for s in (0, 1)]
    result = _result(records, ["large", "small"], ["ours", "knn"], entries)
    cal = result["aggregates"]["calibration"]
    assert cal["common_datasets"]["0.001"] == ["large"]
    assert cal["summary"]["ours"]["0.001"]["mare_common"] == pytest.approx(0.6)
    assert cal["summary"]["knn"]["0.001"]["mare_common"] == pytest.approx(0.1)  # not (0.1 + 9) / 2
    assert cal["summary"]["knn"]["0.001"]["mare"] == pytest.approx(4.55)  # its own datasets, shown apart
    markdown = quality.render_markdown(result)
    assert "| 0.1 | all, every method | 0.60 (1) | 0.10 (1) |" in markdown
    assert "| 0.1 | all, each method's own | 0.60 (1) | 4.55 (2) |" in markdown


@pytest.mark.slow
def test_ours_trains_on_the_train_rows_only_and_scores_as_vaeguard_score_does(tmp_path, monkeypatch):
    """No test row reaches ours' training file (whose rows also give its validation and calibration
    rows), and ours' test scores are what `vaeguard score` (batch_score.score_files) writes for
    those rows with the same bundle."""
    import pandas as pd

    from pipeline import workflow
    from pipeline.batch_score import score_files
    from pipeline.config import ScoreJob

    rng = np.random.default_rng(0)
    X = rng.normal(size=(1100, 4)).round(3)
    y = np.r_[np.zeros(1000, dtype=int), np.ones(100, dtype=int)]
    X[y == 1] += 4.0
    split = quality.make_split(y, "semi", seed=0)
    trained_on = []
    keep = tmp_path / "kept"  # run_ours removes its bundle; a copy is scored the user's way below
    real_training = workflow.run_training

    def spy(job):
        trained_on.append(pd.read_parquet(job.data).to_numpy())
        facts = real_training(job)
        shutil.copytree(facts["bundle"], keep)
        return facts

    monkeypatch.setattr(workflow, "run_training", spy)
    outcome = quality.run_method("ours", X, split, "semi", 0, tmp_path, "leak")
    np.testing.assert_array_equal(trained_on[0], X[split.train])
    assert not {tuple(r) for r in trained_on[0]} & {tuple(r) for r in X[split.test]}

    tests = tmp_path / "test.parquet"
    quality.feature_frame(X[split.test]).to_parquet(tests, index=False)
    score_files(ScoreJob(keep, (tests,), tmp_path / "scores.parquet", device="cpu"))
    as_user = pd.read_parquet(tmp_path / "scores.parquet")["score"].to_numpy(dtype=np.float64)
    np.testing.assert_array_equal(outcome.scores, as_user)
    assert outcome.extra["ks_plus"] < outcome.extra["ks_critical_5pct"]


def test_infinite_scores_are_counted_and_shown(tmp_path, monkeypatch):
    """scorer.onnx turns a NaN score into +inf, which the harness's NaN check cannot see: the run
    records how many test rows scored infinite, and the report names the run."""
    def fake(method, X, split, protocol, seed, workdir, name, config=None):
        scores = np.arange(len(split.test), dtype=np.float64)
        scores[np.flatnonzero(split.test_labels == 0)[:3]] = np.inf
        scores[np.flatnonzero(split.test_labels == 1)[:2]] = np.inf
        return quality.MethodResult(scores, 0.0, 0.0)

    monkeypatch.setattr(quality, "run_method", fake)
    result = quality.run(["thyroid"], 1, ["semi"], ["knn"], tmp_path / "q.json")
    assert result["records"][0]["infinite_scores"] == {"normal": 3, "anomaly": 2}
    assert "- thyroid semi knn seed 0: infinite test scores on 3 normal and 2 anomalous rows" in \
        quality.render_markdown(result)


BENCHMARK_MODULES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                           if p.stem != "__init__")


# Ids other than the bare names: a test whose keywords hold "gpu" is skipped without a GPU (conftest).
@pytest.mark.parametrize("module", BENCHMARK_MODULES, ids=lambda module: f"benchmarks.{module}")
def test_every_benchmark_explains_itself_with_help_and_runs_nothing(module):
    """BENCHMARKS.md names these commands; --help must describe one, not start it (autocast_speed
    took no options: on a GPU, --help ran the benchmark, and here it failed for want of CUDA)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and done.stderr == "", (done.stdout, done.stderr)
