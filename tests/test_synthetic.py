"""The synthetic sensor table: shape, determinism, structure and the injected anomalies."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from pipeline.synthetic import (
    ANOMALY_KINDS,
    MISSING_COLUMNS,
    SENSOR_COLUMNS,
    SyntheticSpec,
    make_sensor_table,
    write_table,
)

SPEC = SyntheticSpec(n_rows=2000, anomaly_fraction=0.04, seed=7)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return make_sensor_table(SPEC, with_kind=True)


def test_columns_dtypes_and_anomaly_mix(table: pd.DataFrame) -> None:
    expected = ["row_id", *SENSOR_COLUMNS, "line", "shift", "label", "anomaly_kind"]
    assert list(table.columns) == expected
    assert list(make_sensor_table(SPEC).columns) == expected[:-1]
    assert len(table) == SPEC.n_rows
    assert table["row_id"].dtype == np.int64 and table["row_id"].is_unique
    assert all(table[c].dtype == np.float64 for c in SENSOR_COLUMNS)
    assert table["label"].dtype == np.int64 and set(table["label"]) == {0, 1}
    assert all(pd.api.types.is_string_dtype(table[c]) for c in ("line", "shift", "anomaly_kind"))

    assert abs(table["label"].mean() - SPEC.anomaly_fraction) < 0.01
    kinds = table.loc[table["label"] == 1, "anomaly_kind"].value_counts()
    assert set(kinds.index) == set(ANOMALY_KINDS)
    assert kinds.max() - kinds.min() <= 1  # evenly mixed
    assert (table.loc[table["label"] == 0, "anomaly_kind"] == "").all()
    # Scattered through the table, not appended at the end.
    assert table.loc[table["label"] == 1, "row_id"].median() < 0.75 * SPEC.n_rows


def test_lines_and_shifts(table: pd.DataFrame) -> None:
    normal = table[table["label"] == 0]
    shares = normal["line"].value_counts(normalize=True)
    assert set(shares.index) == {"A", "B", "C"}
    assert shares["A"] > shares["B"] > shares["C"]
    rare = table.loc[table["anomaly_kind"] == "rare_category", "line"]
    assert not set(rare) & {"A", "B", "C"}
    # Lines run at different operating points, so a row's line is informative.
    rpm_by_line = normal.groupby("line")["rpm"].mean()
    assert rpm_by_line.max() - rpm_by_line.min() > 500
    assert set(table["shift"].dropna()) == {"day", "night"}
    assert table["shift"].isna().any()


def test_same_seed_same_table_other_seed_differs() -> None:
    first = make_sensor_table(SPEC, with_kind=True)
    pd.testing.assert_frame_equal(first, make_sensor_table(SPEC, with_kind=True), check_exact=True)
    other = make_sensor_table(SyntheticSpec(n_rows=2000, anomaly_fraction=0.04, seed=8))
    assert not first.drop(columns="anomaly_kind").equals(other)


def test_missing_values_in_normal_rows(table: pd.DataFrame) -> None:
    normal = table[table["label"] == 0]
    missing = normal[list(SENSOR_COLUMNS)].isna().mean()
    for column in SENSOR_COLUMNS:
        if column in MISSING_COLUMNS:
            assert 0.005 < missing[column] < 0.05, (column, missing[column])
        else:
            assert missing[column] == 0, column


def test_sensors_are_correlated(table: pd.DataFrame) -> None:
    corr = table.loc[table["label"] == 0, list(SENSOR_COLUMNS)].corr()
    strong = [(a, b) for a, b in itertools.combinations(SENSOR_COLUMNS, 2) if abs(corr.loc[a, b]) > 0.5]
    assert len(strong) >= 2, corr.round(2)


def test_point_outliers_are_far_out(table: pd.DataFrame) -> None:
    normal = table.loc[table["label"] == 0, list(SENSOR_COLUMNS)]
    median = normal.median()
    robust_std = 1.4826 * (normal - median).abs().median()
    outliers = table.loc[table["anomaly_kind"] == "point_outlier", list(SENSOR_COLUMNS)]
    distance = ((outliers - median).abs() / robust_std).max(axis=1)
    assert (distance > 5).all(), distance.describe()


def test_broken_correlation_rows_are_not_marginal_outliers(table: pd.DataFrame) -> None:
    normal = table.loc[table["label"] == 0, list(SENSOR_COLUMNS)]
    low, high = normal.quantile(0.005), normal.quantile(0.995)
    broken = table.loc[table["anomaly_kind"] == "broken_correlation", list(SENSOR_COLUMNS)]
    inside = (broken.ge(low) & broken.le(high)) | broken.isna()
    assert inside.all(axis=1).mean() >= 0.8, inside.mean()


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
def test_write_table_round_trips(tmp_path, suffix: str) -> None:
    frame = make_sensor_table(SyntheticSpec(n_rows=300, seed=1))
    path = write_table(frame, tmp_path / "nested" / f"sensors{suffix}")
    assert path.exists()
    if suffix == ".csv.gz":
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip's magic number
    back = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
    pd.testing.assert_frame_equal(back, frame, check_exact=False, rtol=1e-12)


def test_write_table_rejects_unknown_suffix(tmp_path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        write_table(make_sensor_table(SyntheticSpec(n_rows=10)), tmp_path / "sensors.xlsx")
