"""Typed configuration shared by the CLI, the flows and the tests.

Every knob has a default that works without a config file; a YAML file (``--config``) may set
any subset, section by section, and unknown keys are an error rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import ConfigError, one_line

log = logging.getLogger("vaeguard")


@dataclass(frozen=True)
class PreprocessConfig:
    # Integer columns with at most this many distinct values are categories (codes, flags),
    # not quantities. Kept small so ordinal scores such as 1..10 stay numeric.
    max_integer_categories: int = 5
    # At most this many categories per column are one-hot encoded; rarer ones share "unknown".
    max_categories: int = 50
    # A category seen fewer times than this in training goes to "unknown" too: one-hot
    # columns that are almost always zero teach the model nothing.
    min_category_count: int = 2
    # Explicit overrides of the inferred column kinds.
    categorical_columns: tuple[str, ...] = ()
    numeric_columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _integer(self, "preprocess", "max_integer_categories", 0)
        _integer(self, "preprocess", "max_categories", 1)
        _integer(self, "preprocess", "min_category_count", 1)
        for key in ("categorical_columns", "numeric_columns"):
            _names(self, "preprocess", key)
        both = sorted(set(self.categorical_columns) & set(self.numeric_columns))
        if both:
            raise ConfigError(f"preprocess: column(s) {both} are in both categorical_columns and numeric_columns; "
                              f"name each column in one of them")


@dataclass(frozen=True)
class ModelConfig:
    # None: sized from the number of input features (see pipeline.model.default_layer_sizes).
    hidden_sizes: tuple[int, ...] | None = None
    latent_dim: int | None = None
    # Hidden-layer activation of the tabular VAE: silu, elu, tanh, leaky_relu or relu. SiLU
    # matched ELU's detection quality on 13 ADBench datasets (semi -0.4, unsup +0.3 AUROC points)
    # and scores 1.5x faster: onnxruntime runs x * sigmoid(x) as one vectorized kernel, while its
    # ELU took half the scorer's time (BENCHMARKS.md, "Activation").
    activation: str = "silu"
    # Weight of the KL term in the training loss (beta-VAE). Below 1 the latent code keeps
    # more detail, so reconstructions are sharper: better AUROC on thyroid and the demo data.
    beta: float = 0.1
    # Weight of the KL term in the anomaly score: score = recon + kl_weight * kl.
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        hidden = self.hidden_sizes
        if hidden is not None and (not isinstance(hidden, tuple) or not hidden
                                   or not all(_is_int(h) and h >= 1 for h in hidden)):
            raise ConfigError(f"model.hidden_sizes must be null or a non-empty list of positive integers, got "
                              f"{_shown(hidden)}; e.g. hidden_sizes: [64, 32], or null to size them from the features")
        if self.latent_dim is not None:
            _integer(self, "model", "latent_dim", 1, fix="e.g. latent_dim: 8, or null to size it from the features")
        _choice(self, "model", "activation", ACTIVATIONS)
        _number(self, "model", "beta", 0.0)
        _number(self, "model", "kl_weight", 0.0)


@dataclass(frozen=True)
class TrainingConfig:
    max_epochs: int = 200
    batch_size: int = 128
    # Adam's step. At 1e-3 most ADBench runs were still improving at epoch 200; 2e-3 gets
    # further in fewer epochs. Over the 14 datasets, clean training data (semi) gained 0.5 AUROC
    # points (wilt +4.1, vowels +1.6); contaminated data (unsup) lost 0.4 (pendigits -3.6), as
    # a larger step fits the anomalies among the training rows more closely (BENCHMARKS.md).
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    # For training data that may hold anomalies: each batch's loss ignores this share of its
    # worst-fitting rows, so the VAE does not learn to rebuild the anomalies among them. 0.05 took
    # mean AUROC on contaminated data (ADBench unsup, 10 datasets) from 81.6 to 82.7, and cost 0.7
    # on clean data (semi), which is why it is off unless asked for (BENCHMARKS.md, "Trimmed loss").
    trim_fraction: float = 0.0
    # Early stopping: stop after this many epochs without a better validation loss.
    patience: int = 15
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # auto and fp32: no autocast (bf16 was never faster on an H100; see
    # pipeline.train.autocast_dtype); bf16: autocast for any model on CUDA. The CPU always
    # trains in fp32.
    mixed_precision: str = "auto"
    # None: every core up to 4. Set explicitly because torch's default thread pool
    # thrashes on small shared machines (see DESIGN.md).
    threads: int | None = None
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal

    def __post_init__(self) -> None:
        # Checked here so a bad value from a config file or the CLI fails before any data is read.
        # numpy's generators take only non-negative seeds, and would say so only after the data is read.
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"training.seed (--seed) must be a non-negative integer, got {self.seed!r}; "
                              f"pass e.g. --seed 0")
        if not _is_number(self.trim_fraction) or not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"training.trim_fraction must be at least 0 and below 0.5, got {self.trim_fraction!r}; "
                              f"0.05 leaves each batch's worst-fitting 5% of rows out of the loss")
        # Otherwise these fail deep inside training, after the data is read, as a TypeError or an
        # IndexError; and a learning rate of 0 would export an untrained model without a word.
        _integer(self, "training", "max_epochs", 1)
        _integer(self, "training", "batch_size", 1)
        _integer(self, "training", "patience", 1)
        _number(self, "training", "learning_rate", 0.0, low_open=True)
        _number(self, "training", "weight_decay", 0.0)
        _number(self, "training", "val_fraction", 0.0, 1.0, high_open=True)
        _choice(self, "training", "device", ("auto", "cpu", "cuda"), flag="--device")
        _choice(self, "training", "mixed_precision", ("auto", "fp32", "bf16"))
        if self.threads is not None:
            _integer(self, "training", "threads", 1, fix="e.g. threads: 2, or null for every core up to 4")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ConfigError(f"training.progress must be true, false or null, got {_shown(self.progress)}; "
                              f"null shows a progress bar only on a terminal")


@dataclass(frozen=True)
class CalibrationConfig:
    target_fpr: float = 0.01
    cal_fraction: float = 0.2
    # Share of normal rows held out for AUROC/AUPRC when a label column exists.
    test_fraction: float = 0.2
    # Beyond this many calibration rows p-values gain nothing; the rest go to training.
    max_calibration_rows: int = 20_000

    def __post_init__(self) -> None:
        # pipeline.calibrate checks the target again, but only once the data is read.
        _number(self, "calibration", "target_fpr", 0.0, 0.5, low_open=True, high_open=True, flag="--target-fpr",
                fix="0.01 means 1% false alarms")
        _number(self, "calibration", "cal_fraction", 0.0, 1.0, low_open=True, high_open=True)
        _number(self, "calibration", "test_fraction", 0.0, 1.0, high_open=True)
        # Fewer could never reach the target, and the search for the rows needed would not end.
        needed = math.ceil(1.0 / self.target_fpr) - 1
        _integer(self, "calibration", "max_calibration_rows", needed,
                 fix=f"target FPR {self.target_fpr} needs at least {needed} calibration rows: raise "
                     f"max_calibration_rows or the target FPR")


@dataclass(frozen=True)
class PipelineConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        from pipeline.splits import MIN_TRAIN_SHARE  # splits imports this module

        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if type(value).__name__ != section.type:
                raise ConfigError(f"config.{section.name} must be a {section.type}, got {type(value).__name__}; "
                                  f"build one with pipeline.config.{section.type}(...) or load_config(FILE.yaml)")
        # Validation and test rows are shares of the table; training must keep MIN_TRAIN_SHARE of
        # it, or no table is large enough and the search for the rows needed never ends.
        held_out = self.training.val_fraction + self.calibration.test_fraction
        if held_out >= 1 - MIN_TRAIN_SHARE:
            raise ConfigError(f"training.val_fraction ({self.training.val_fraction}) plus calibration.test_fraction "
                              f"({self.calibration.test_fraction}) is {held_out:.3g}, which leaves less than "
                              f"{MIN_TRAIN_SHARE:.0%} of the rows to train on; keep their sum below "
                              f"{1 - MIN_TRAIN_SHARE:.2g}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "PipelineConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections), key=str)
        if unknown:
            raise ConfigError(
                f"{source}: unknown section(s) {unknown}; expected some of {sorted(sections)}"
            )
        defaults = cls()
        try:
            built = {
                name: _build_section(getattr(defaults, name), raw.get(name) or {}, f"{source}:{name}")
                for name in sections
            }
            return cls(**built)
        except ConfigError as exc:
            message = str(exc)
            # Name the file for a bad value too, so it is not mistaken for one from a flag.
            raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from exc


@dataclass(frozen=True)
class TrainJob:
    """What `vaeguard train` and the training flow are asked to do."""

    data: Path
    name: str
    out_dir: Path = Path("exported")
    label_column: str | None = None
    id_columns: tuple[str, ...] = ()
    config: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        check_bundle_name(self.name)
        _paths(self, "data", "out_dir")
        if self.label_column is not None and not isinstance(self.label_column, str):
            raise ConfigError(f"--label-column must be a column name, got {self.label_column!r}; "
                              f"pass e.g. --label-column label")
        if self.label_column == "":
            # An unset shell variable (--label-column "$LABEL"): read as no label, the labelled
            # anomalies were trained and calibrated on as normal rows, without a word.
            raise ConfigError("--label-column is empty; give the label column's name, or leave the option out "
                              "when the data has no labels (is a shell variable unset?)")
        # A bare string would be taken as one column per character.
        if isinstance(self.id_columns, list):
            object.__setattr__(self, "id_columns", tuple(self.id_columns))
        if not isinstance(self.id_columns, tuple) or not all(isinstance(c, str) for c in self.id_columns):
            raise ConfigError(f"--id-columns must be a list of column names, got {self.id_columns!r}; "
                              f"pass e.g. --id-columns row_id,batch (id_columns=('row_id', 'batch') in Python)")
        if "" in self.id_columns:
            raise ConfigError(f"--id-columns names an empty column, got {self.id_columns!r}; give each id column's "
                              f"name, e.g. --id-columns row_id,batch (is a shell variable unset?)")
        _pipeline_config(self.config)
        # A column named twice would be copied twice into the run's table, which pandas refuses
        # only after the whole file is read; and an id column cannot be the label as well.
        named = [*self.id_columns, *([self.label_column] if self.label_column else [])]
        repeated = sorted({c for c in named if named.count(c) > 1})
        if repeated:
            raise ConfigError(f"column(s) {repeated} named more than once across --id-columns and --label-column "
                              f"(got --id-columns {','.join(self.id_columns)!r}, --label-column "
                              f"{self.label_column!r}); name each column once, and not the label as an id")

    @property
    def bundle_dir(self) -> Path:
        return self.out_dir / self.name


@dataclass(frozen=True)
class ImageTrainJob:
    """What `vaeguard train IMAGE_DIR --image-size N` and the training flow are asked to do."""

    data: Path  # a folder of images, a CSV with a path column, or a .npy array
    name: str
    out_dir: Path = Path("exported")
    image_size: int = 64
    channels: int = 1  # 1 = grayscale, 3 = RGB
    path_column: str = "path"
    config: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        check_bundle_name(self.name)
        _paths(self, "data", "out_dir")
        # Checked here too (pipeline.images.ImageSpec checks again), so a bad size fails before
        # any image is read, in the CLI and the flows alike.
        if not _is_int(self.image_size) or self.image_size < 1:
            raise ConfigError(f"--image-size must be a positive integer, got {self.image_size!r}; pass e.g. "
                              f"--image-size 64")
        if not _is_int(self.channels) or self.channels not in (1, 3):
            raise ConfigError(f"--channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        _pipeline_config(self.config)

    @property
    def bundle_dir(self) -> Path:
        return self.out_dir / self.name


@dataclass(frozen=True)
class ScoreJob:
    """What `vaeguard score` and the scoring flow are asked to do."""

    bundle: Path
    inputs: tuple[Path, ...]
    output: Path
    device: str = "auto"
    batch_size: int = 65_536
    threads: int | None = None
    maps_dir: Path | None = None  # image bundles: write anomaly-map PNGs of flagged images here
    report: bool = False  # write OUT.report.html (plots, drift, top anomalies) next to the output
    precision: str = "fp32"  # fp32 (scorer.onnx) or a variant `vaeguard export --precision` added: fp16, int8

    def __post_init__(self) -> None:
        # The flows take this object as the CLI builds it, so both refuse the same values, before
        # any work (a Dask cluster, a part file).
        _paths(self, "bundle", "output")
        if self.maps_dir is not None:
            _paths(self, "maps_dir")
        # A bare string would be taken as one input per character.
        if isinstance(self.inputs, (str, os.PathLike)) or not isinstance(self.inputs, (tuple, list)):
            raise ConfigError(f"inputs must be a list of paths, got {self.inputs!r}; pass e.g. "
                              f"inputs=(Path('new.csv'),)")
        if not self.inputs:
            raise ConfigError("no input to score; name at least one CSV, Parquet file or image folder")
        object.__setattr__(self, "inputs", tuple(_path(p, "each input") for p in self.inputs))
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"--batch-size must be a positive number of rows, got {self.batch_size!r}; "
                              f"pass e.g. --batch-size 65536")
        check_threads(self.threads)
        for option, value, choices in (("--device", self.device, ("auto", "cpu", "cuda")),
                                       ("--precision", self.precision, ("fp32", "fp16", "int8"))):
            if value not in choices:
                raise ConfigError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class LandingJob:
    """What one run of the landing flow is asked to do; `vaeguard serve` passes it to every scheduled run."""

    bundle: Path
    watch: Path  # the landing folder
    output: Path  # scores, ledger, quarantine and run reports
    settle_seconds: float = 30.0  # a file whose mtime moved more recently is still being written
    device: str = "auto"
    batch_size: int = 65_536
    max_psi: float = 0.25  # drift alert above this population stability index of the scores
    rate_p_value: float = 0.001  # drift alert when the anomaly count is this unlikely under the target FPR

    def __post_init__(self) -> None:
        # The flow builds this from its parameters, so a run asked for nonsense fails before it
        # scores a file, not at the drift check after scoring them all.
        for key, flag, example in (("bundle", "BUNDLE", "/srv/vaeguard/exported/machines"),
                                   ("watch", "--watch", "/data/landing"), ("output", "--output", "/data/scored")):
            _absolute_path(self, key, flag, example)
        _number(self, "landing", "settle_seconds", 0.0, flag="--settle-seconds",
                fix="e.g. --settle-seconds 30 waits until a file has not changed for 30 s")
        _number(self, "landing", "max_psi", 0.0, low_open=True, flag="--max-psi",
                fix="e.g. --max-psi 0.25 alerts when the scores' PSI against calibration exceeds 0.25")
        _number(self, "landing", "rate_p_value", 0.0, 1.0, low_open=True, high_open=True, flag="--rate-p-value",
                fix="e.g. --rate-p-value 0.001 alerts when a run's anomaly count is that unlikely")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise _bad("landing", "batch_size", None, "a whole number of rows of at least 1", self.batch_size,
                       "e.g. batch_size 65536 (rows scored per chunk)")
        if not isinstance(self.device, str) or self.device not in ("auto", "cpu", "cuda"):
            raise _bad("landing", "device", "--device", "one of auto, cpu, cuda", self.device,
                       "e.g. --device cpu, or auto to use a GPU where onnxruntime's CUDA provider works")

    def parameters(self) -> dict[str, Any]:
        """The landing flow's parameters: plain JSON, as a Prefect deployment stores them."""
        return {f.name: str(v) if isinstance(v, Path) else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


# A longer interval is no schedule anyone waits for, and Python's timedelta (which Prefect turns
# the seconds into) overflows beyond about 8.6e13 seconds.
MAX_INTERVAL_SECONDS = 366 * 24 * 3600
# --api-wait: an hour covers any server start; longer is a server that is not coming.
MAX_API_WAIT_SECONDS = 3600.0


@dataclass(frozen=True)
class ServeJob:
    """What `vaeguard serve` is asked to do: run the landing job on a schedule, as a Prefect deployment."""

    landing: LandingJob
    cron: str | None = None  # exactly one of cron and interval
    interval: float | None = None  # seconds
    name: str | None = None  # deployment name; None: vaeguard-<bundle name>
    # How long to wait for a Prefect API that refuses connections (--api-wait): a server started
    # with serve (two system units at boot) answers about 10 s after it starts (11 s measured on
    # 2 cores), and serve's own start takes some of that.
    api_wait: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.landing, LandingJob):
            raise ConfigError(f"landing must be a LandingJob, got {type(self.landing).__name__}")
        if (self.cron is None) == (self.interval is None):
            raise ConfigError("give exactly one schedule: --cron EXPR or --interval SECONDS, e.g. --cron \"0 * * * *\" "
                              "or --interval 3600 for every hour")
        # The cron expression's fields are checked by Prefect's own parser (flows/serve.py), which
        # is what runs the schedule; here only what needs no Prefect.
        if self.cron is not None and (not isinstance(self.cron, str) or not self.cron.strip()):
            raise ConfigError(f"--cron must be a cron expression, got {self.cron!r}; e.g. --cron \"0 * * * *\" "
                              f"for every hour")
        if self.interval is not None:
            if not _is_number(self.interval) or not 0 < self.interval <= MAX_INTERVAL_SECONDS:
                raise ConfigError(f"--interval must be a number of seconds above 0 and at most {MAX_INTERVAL_SECONDS} "
                                  f"(366 days), got {self.interval!r}; e.g. --interval 3600 for every hour")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ConfigError(f"--name must be a deployment name, got {self.name!r}; e.g. --name nightly-machines, or "
                              f"leave it out for vaeguard-<bundle name>")
        if not _is_number(self.api_wait) or not 0 <= self.api_wait <= MAX_API_WAIT_SECONDS:
            raise ConfigError(f"--api-wait must be a number of seconds from 0 to {MAX_API_WAIT_SECONDS:g}, got "
                              f"{self.api_wait!r}; e.g. --api-wait 60 for a server that is slow to start")

    def deployment_name(self, bundle_name: str) -> str:
        return self.name or f"vaeguard-{bundle_name}"


def check_bundle_name(name: str) -> None:
    """A bundle name is one plain folder name inside --out. Publishing renames OUT/NAME, so "."
    or ".." would swap out the output folder itself or its parent, a slash would write outside
    it, and names starting with "." are the run's own staging folders (.NAME.run-*, .NAME.retired-*)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or name.startswith(".")
            or any(c in name for c in ("/", "\\", "\0"))):
        raise ConfigError(f"--name must be a plain folder name (not empty, no '/', '\\' or NUL, not starting "
                          f"with '.'), got {name!r}; pass e.g. --name my_model")


def _paths(job: Any, *names: str) -> None:
    """Paths given as strings (from Python or a Prefect parameter) become Path objects."""
    for name in names:
        object.__setattr__(job, name, _path(getattr(job, name), name))


def _path(value: Any, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise ConfigError(f"{name} must be a path, got {value!r}")
    return Path(value)


def _absolute_path(job: Any, key: str, flag: str, example: str) -> None:
    """A path of the landing job, which must not depend on the folder a run starts in.

    A deployment run starts in the serving process's folder, not in the folder of whoever
    triggered it: a relative path (or an empty one, which is the current folder) would point the
    run at another folder, whose files it would score and quarantine (move away)."""
    value = getattr(job, key)
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value) or not Path(value).is_absolute():
        raise _bad("landing", key, flag, "an absolute path", value if not isinstance(value, Path) else str(value),
                   f"name it from the root, e.g. {example} (a served run starts in the folder of `vaeguard serve`, "
                   f"not in yours)")
    object.__setattr__(job, key, Path(value))


def _pipeline_config(config: Any) -> None:
    if not isinstance(config, PipelineConfig):
        raise ConfigError(f"config must be a PipelineConfig (pipeline.config.load_config reads one from YAML), "
                          f"got {type(config).__name__}")


# Hidden-layer activations pipeline.model.ACTIVATIONS builds (named here so that a config is
# checked without importing torch; tests/test_workflow.py keeps the two equal).
ACTIVATIONS = ("elu", "leaky_relu", "relu", "silu", "tanh")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def _bad(section: str, key: str, flag: str | None, expected: str, value: Any, fix: str) -> ConfigError:
    where = f"{section}.{key}" + (f" ({flag})" if flag else "")
    return ConfigError(f"{where} must be {expected}, got {_shown(value)}; {fix}")


def _integer(config: Any, section: str, key: str, minimum: int, fix: str = "") -> None:
    value = getattr(config, key)
    if not _is_int(value) or value < minimum:
        raise _bad(section, key, None, f"an integer of at least {minimum}", value,
                   fix or f"e.g. {key}: {getattr(type(config)(), key)}")


def _number(config: Any, section: str, key: str, low: float, high: float = math.inf, *, low_open: bool = False,
             high_open: bool = False, flag: str | None = None, fix: str = "") -> None:
    value = getattr(config, key)
    inside = _is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not inside:
        bounds = f"{'above' if low_open else 'of at least'} {low:g}" + (
            "" if high == math.inf else f" and {'below' if high_open else 'at most'} {high:g}")
        raise _bad(section, key, flag, f"a number {bounds}", value,
                   fix or f"e.g. {key}: {getattr(type(config)(), key)}")


def _choice(config: Any, section: str, key: str, choices: tuple[str, ...], flag: str | None = None) -> None:
    value = getattr(config, key)
    if value not in choices or not isinstance(value, str):
        raise _bad(section, key, flag, f"one of {', '.join(choices)}", value,
                   f"e.g. {key}: {getattr(type(config)(), key)}")


def _names(config: Any, section: str, key: str) -> None:
    # A bare string would be matched by `name in value`, that is by substring.
    value = getattr(config, key)
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise _bad(section, key, None, "a list of column names", value,
                   f"e.g. {key}: [line, shift]; quote a name YAML would read as a number or a boolean: ['1']")


_T = TypeVar("_T")


def _build_section(default: _T, raw: Any, source: str) -> _T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(default)}
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    values = {}
    for key, value in raw.items():
        if isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, str) and isinstance(getattr(default, key), float):
            # YAML 1.1 reads 1e-3 (no dot) as a string; YAML 1.2 and people read a number.
            try:
                value = float(value)
            except ValueError:
                pass
        values[key] = value
    return dataclasses.replace(default, **values)


class _StrictLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error: YAML keeps only the last, so a
    section written twice (an appended `training:`) would silently drop the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader refuses it, with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str] | None) -> PipelineConfig:
    """Read a YAML config file; None gives the defaults."""
    if path is None:
        return PipelineConfig()
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file, e.g. --config vaeguard.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(" ".join(f"{where}: not valid YAML: {problem}; fix the file there".split())) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {one_line(exc)}") from exc
    return PipelineConfig.from_dict(raw, source=str(path))


def show_progress(requested: bool | None = None) -> bool:
    """Progress bars only for a person at a terminal: never in CI logs or inside Prefect runs
    (flows/ sets VAEGUARD_PROGRESS=0), unless asked for explicitly."""
    if requested is not None:
        return requested
    return sys.stderr.isatty() and os.environ.get("VAEGUARD_PROGRESS", "1") != "0"


def check_threads(threads: Any) -> None:
    """--threads of scoring and export: a positive integer, or None for the default (0 or less
    must not silently mean the default)."""
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise ConfigError(f"--threads must be a positive integer, got {threads!r}; pass e.g. --threads 2, "
                          f"or leave it out for the default")
