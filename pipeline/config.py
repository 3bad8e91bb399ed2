"""Typed configuration shared by the CLI, the flows and the tests.

Every knob has a default that works without a config file; a YAML file (``--config``) may set
any subset, section by section, and unknown keys are an error rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import ConfigError


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
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"training.trim_fraction must be at least 0 and below 0.5, got {self.trim_fraction!r}; "
                              f"0.05 leaves each batch's worst-fitting 5% of rows out of the loss")


@dataclass(frozen=True)
class CalibrationConfig:
    target_fpr: float = 0.01
    cal_fraction: float = 0.2
    # Share of normal rows held out for AUROC/AUPRC when a label column exists.
    test_fraction: float = 0.2
    # Beyond this many calibration rows p-values gain nothing; the rest go to training.
    max_calibration_rows: int = 20_000


@dataclass(frozen=True)
class PipelineConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "PipelineConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ConfigError(
                f"{source}: unknown section(s) {unknown}; expected some of {sorted(sections)}"
            )
        defaults = cls()
        built = {
            name: _build_section(getattr(defaults, name), raw.get(name) or {}, f"{source}:{name}")
            for name in sections
        }
        return cls(**built)


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
    report: bool = False  # write report.html (plots, drift, top anomalies) next to the output
    precision: str = "fp32"  # fp32 (scorer.onnx) or a variant `vaeguard export --precision` added: fp16, int8


def check_bundle_name(name: str) -> None:
    """A bundle name is one plain folder name inside --out. Publishing renames OUT/NAME, so "."
    or ".." would swap out the output folder itself or its parent, a slash would write outside
    it, and names starting with "." are the run's own staging folders (.NAME.run-*, .NAME.retired-*)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or name.startswith(".")
            or any(c in name for c in ("/", "\\", "\0"))):
        raise ConfigError(f"--name must be a plain folder name (not empty, no '/', '\\' or NUL, not starting "
                          f"with '.'), got {name!r}; pass e.g. --name my_model")


_T = TypeVar("_T")


def _build_section(default: _T, raw: Any, source: str) -> _T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(default)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    values = {}
    for key, value in raw.items():
        if isinstance(value, list):
            value = tuple(value)
        values[key] = value
    return dataclasses.replace(default, **values)


def load_config(path: str | os.PathLike[str] | None) -> PipelineConfig:
    """Read a YAML config file; None gives the defaults."""
    if path is None:
        return PipelineConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    return PipelineConfig.from_dict(raw, source=str(path))


def show_progress(requested: bool | None = None) -> bool:
    """Progress bars only for a person at a terminal: never in CI logs or inside Prefect runs
    (flows/ sets VAEGUARD_PROGRESS=0), unless asked for explicitly."""
    if requested is not None:
        return requested
    return sys.stderr.isatty() and os.environ.get("VAEGUARD_PROGRESS", "1") != "0"


def resolve_threads(threads: int | None) -> int:
    return threads if threads and threads > 0 else max(1, min(os.cpu_count() or 1, 4))
