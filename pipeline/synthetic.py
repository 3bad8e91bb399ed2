"""Synthetic sensor table with known anomalies, for the demo and the tests.

The data models pumps on three production lines. Each row is one reading of eight sensors
driven by three hidden factors:

- load: how hard the pump works; it raises pressure, flow, power, torque and temperature;
- speed: motor speed; flow follows it linearly and vibration with its square;
- ambient: hall climate; warmer means drier, and the night shift runs cooler.

The sensors are tied together by physics-like, nonlinear links (hydraulic power is
flow * pressure, torque is power / rpm), so a model of the joint distribution has real
structure to learn, while each line has its own operating point (speed, pressure, base
temperature) so the context of a row matters.

Four kinds of anomalies are injected, each to test a different ability of a detector:

- ``point_outlier``: one or two sensors read 6 to 10 robust standard deviations off, like a
  failing probe. Any method should catch these; they are the floor.
- ``broken_correlation``: every value is ordinary for its column, but the values disagree
  with each other (power low while flow and pressure are high, or rpm that does not match
  flow). Per-column range checks cannot see these; only a joint model can.
- ``rare_category``: the line is a value never seen in training ("D"), with otherwise normal
  sensors. This checks that an unseen category is handled and flagged, not crashed on or
  silently mapped to a known one.
- ``wrong_line_profile``: the sensors follow one line's operating point but the row says
  another line. Each value is plausible for some line; only the pairing of context and
  readings is wrong (a contextual anomaly).

Everything is drawn from one ``numpy.random.default_rng(seed)`` in a fixed order, so a spec
always gives the same table, and the work is vectorised so a million rows take seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import ConfigError

SENSOR_COLUMNS: tuple[str, ...] = (
    "temperature",
    "pressure",
    "flow_rate",
    "vibration",
    "power_kw",
    "rpm",
    "humidity",
    "torque",
)
LINES: tuple[str, ...] = ("A", "B", "C")
LINE_SHARES: tuple[float, ...] = (0.5, 0.3, 0.2)
SHIFTS: tuple[str, ...] = ("day", "night")
RARE_LINE = "D"
ANOMALY_KINDS: tuple[str, ...] = (
    "point_outlier",
    "broken_correlation",
    "rare_category",
    "wrong_line_profile",
)
# Flaky sensors: missing values are confined to these so imputation has something to do
# without every column being incomplete.
MISSING_COLUMNS: tuple[str, ...] = ("vibration", "humidity", "torque")

# Operating point of each line, indexed like LINES. The differences are a few standard
# deviations apart in rpm and pressure so that a relabelled row is detectable.
_RPM0 = np.array([1800.0, 2400.0, 1300.0])
_FLOW_PER_KRPM = np.array([20.0, 16.0, 26.0])  # m3/h per 1000 rpm
_PRESSURE0 = np.array([5.0, 3.5, 6.5])  # bar
_EFFICIENCY = np.array([0.75, 0.70, 0.80])
_TEMP0 = np.array([62.0, 58.0, 68.0])  # deg C
_VIB0 = np.array([0.8, 0.6, 1.1])  # mm/s at 1000 rpm
_HUMIDITY0 = np.array([45.0, 50.0, 40.0])  # percent

# The ambient factor's mean per shift: nights are cooler and more humid.
_AMBIENT_BY_SHIFT = np.array([0.4, -0.6])

# Latent magnitudes for broken_correlation rows: far enough from the centre that mixing two
# regimes visibly breaks the links, near enough that every value stays inside the normal
# marginal range of its column.
_BROKEN_LATENT_RANGE = (0.8, 1.5)


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and make-up of a synthetic sensor table.

    ``missing_fraction`` is the share of cells set to NaN in each of the flaky sensor
    columns (``MISSING_COLUMNS``); half that share of ``shift`` values is missing too.
    """

    n_rows: int = 20_000
    anomaly_fraction: float = 0.03
    missing_fraction: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_rows < 1:
            raise ConfigError(f"SyntheticSpec.n_rows must be at least 1, got {self.n_rows}.")
        for name in ("anomaly_fraction", "missing_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"SyntheticSpec.{name} must be in [0, 1), got {value}.")


def _sensors(
    rng: np.random.Generator,
    line: np.ndarray,
    load: np.ndarray,
    speed: np.ndarray,
    ambient: np.ndarray,
) -> dict[str, np.ndarray]:
    """Sensor readings for given line indices and latent factors, with measurement noise."""
    n = line.shape[0]
    noise = rng.standard_normal((len(SENSOR_COLUMNS), n))

    rpm = _RPM0[line] * (1.0 + 0.12 * speed) + 15.0 * noise[0]
    flow = _FLOW_PER_KRPM[line] * rpm / 1000.0 * (1.0 + 0.10 * load) + 0.4 * noise[1]
    pressure = _PRESSURE0[line] * (1.0 + 0.18 * load) + 0.08 * noise[2]
    # Hydraulic power in kW is Q[m3/h] * p[bar] / 36; the motor draws more than that.
    power = flow * pressure / 36.0 / _EFFICIENCY[line] + 0.15 * noise[3]
    # Shaft torque follows from power and speed: P[kW] = T[Nm] * n[rpm] / 9550.
    torque = 9550.0 * power / rpm + 0.6 * noise[4]
    vibration = _VIB0[line] * (rpm / 1000.0) ** 2 * (1.0 + 0.15 * load) + 0.12 * noise[5]
    temperature = _TEMP0[line] + 1.2 * power + 3.0 * ambient + 1.0 * noise[6]
    humidity = np.clip(_HUMIDITY0[line] - 7.0 * ambient + 2.0 * noise[7], 5.0, 95.0)

    return {
        "temperature": temperature,
        "pressure": pressure,
        "flow_rate": flow,
        "vibration": vibration,
        "power_kw": power,
        "rpm": rpm,
        "humidity": humidity,
        "torque": torque,
    }


def make_sensor_table(
    spec: SyntheticSpec = SyntheticSpec(), *, with_kind: bool = False
) -> pd.DataFrame:
    """Build the sensor table described in the module docstring.

    Columns: ``row_id``, the eight ``SENSOR_COLUMNS``, ``line``, ``shift``, ``label``
    (1 = injected anomaly) and, with ``with_kind``, ``anomaly_kind`` ("" for normal rows).
    """
    rng = np.random.default_rng(spec.seed)
    n = spec.n_rows

    line = rng.choice(len(LINES), size=n, p=LINE_SHARES)
    shift = (rng.random(n) < 0.4).astype(np.int64)
    load = rng.standard_normal(n)
    speed = rng.standard_normal(n)
    ambient = rng.standard_normal(n) + _AMBIENT_BY_SHIFT[shift]
    values = np.column_stack(list(_sensors(rng, line, load, speed, ambient).values()))

    # Spread of the clean data, so outliers are "far" on every column's own scale.
    median = np.median(values, axis=0)
    robust_std = 1.4826 * np.median(np.abs(values - median), axis=0)

    # Anomalies go to random positions and the kinds cycle, so they are evenly mixed and
    # scattered through the table rather than clustered.
    n_anomalies = int(round(spec.anomaly_fraction * n))
    anomaly_rows = rng.choice(n, size=n_anomalies, replace=False)
    kind_index = np.full(n, -1, dtype=np.int64)
    kind_index[anomaly_rows] = np.arange(n_anomalies) % len(ANOMALY_KINDS)
    # Cells an anomaly lives in must not be blanked later, or the anomaly would vanish.
    tampered = np.zeros_like(values, dtype=bool)
    line_out = line.copy()

    rows = np.flatnonzero(kind_index == ANOMALY_KINDS.index("point_outlier"))
    if rows.size:
        n_cols = len(SENSOR_COLUMNS)
        first = rng.integers(n_cols, size=rows.size)
        second = (first + rng.integers(1, n_cols, size=rows.size)) % n_cols
        use_second = rng.random(rows.size) < 0.5
        for cols, active in ((first, np.ones(rows.size, dtype=bool)), (second, use_second)):
            r, c = rows[active], cols[active]
            k = rng.uniform(6.0, 10.0, size=r.size)
            sign = np.where(rng.random(r.size) < 0.5, -1.0, 1.0)
            shifted = median[c] + sign * k * robust_std[c]
            # Physical quantities here are non-negative; a negative reading would be a
            # giveaway of a different kind, so such faults read high instead.
            shifted = np.where(shifted < 0.0, median[c] + k * robust_std[c], shifted)
            values[r, c] = shifted
            tampered[r, c] = True

    rows = np.flatnonzero(kind_index == ANOMALY_KINDS.index("broken_correlation"))
    if rows.size:
        lo, hi = _BROKEN_LATENT_RANGE
        signs = np.where(rng.random((2, rows.size)) < 0.5, -1.0, 1.0)
        own_load = signs[0] * rng.uniform(lo, hi, size=rows.size)
        own_speed = signs[1] * rng.uniform(lo, hi, size=rows.size)
        own = _sensors(rng, line[rows], own_load, own_speed, ambient[rows])
        # The donor regime is the mirror image: high load becomes low load, and so on.
        donor = _sensors(rng, line[rows], -own_load, -own_speed, ambient[rows])
        # Either the load outputs disagree with flow and pressure, or the speed readings
        # disagree with flow and torque.
        swap_speed = rng.random(rows.size) < 0.5
        swapped = {"power_kw": ~swap_speed, "torque": ~swap_speed,
                   "rpm": swap_speed, "vibration": swap_speed}
        for j, name in enumerate(SENSOR_COLUMNS):
            take_donor = swapped.get(name, np.zeros(rows.size, dtype=bool))
            values[rows, j] = np.where(take_donor, donor[name], own[name])
            tampered[rows, j] = take_donor

    rows = np.flatnonzero(kind_index == ANOMALY_KINDS.index("rare_category"))
    line_out[rows] = len(LINES)  # index of RARE_LINE in the label array below

    rows = np.flatnonzero(kind_index == ANOMALY_KINDS.index("wrong_line_profile"))
    line_out[rows] = (line[rows] + rng.integers(1, len(LINES), size=rows.size)) % len(LINES)

    for name in MISSING_COLUMNS:
        j = SENSOR_COLUMNS.index(name)
        blank = (rng.random(n) < spec.missing_fraction) & ~tampered[:, j]
        values[blank, j] = np.nan
    shift_missing = rng.random(n) < spec.missing_fraction / 2.0

    line_labels = np.array([*LINES, RARE_LINE], dtype=object)
    shift_labels = np.array(SHIFTS, dtype=object)[shift]
    shift_labels[shift_missing] = None

    frame = pd.DataFrame({"row_id": np.arange(n, dtype=np.int64)})
    for j, name in enumerate(SENSOR_COLUMNS):
        frame[name] = values[:, j]
    frame["line"] = pd.Series(line_labels[line_out], dtype="str")
    frame["shift"] = pd.Series(shift_labels, dtype="str")
    frame["label"] = (kind_index >= 0).astype(np.int64)
    if with_kind:
        kind_labels = np.array(["", *ANOMALY_KINDS], dtype=object)
        frame["anomaly_kind"] = pd.Series(kind_labels[kind_index + 1], dtype="str")
    return frame


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` as CSV (.csv, or gzipped .csv.gz) or Parquet (.parquet or .pq), chosen by
    the suffix; return the path."""
    path = Path(path)
    suffix = ".csv.gz" if path.name.lower().endswith(".csv.gz") else path.suffix.lower()
    if suffix not in (".csv", ".csv.gz", ".parquet", ".pq"):
        raise ConfigError(
            f"{path}: cannot choose a format from suffix {suffix or '(none)'!r}; "
            "expected .csv, .csv.gz, .parquet or .pq"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".csv", ".csv.gz"):
        frame.to_csv(path, index=False)  # pandas gzips a .gz path
    else:
        frame.to_parquet(path, engine="pyarrow", index=False)
    return path
