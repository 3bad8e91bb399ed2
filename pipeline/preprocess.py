"""Preprocessing fitted on training rows: impute, flag missing, scale robustly, one-hot.

The fitted state is plain data (medians, scales, category lists) that travels in the manifest
and is baked into scorer.onnx. ``transform`` here is the reference the ONNX graph must match:
it works in float32 and does the same operations in the same order.

Features, in order: scaled numeric columns, then one missing-indicator per numeric column
that had missing values in training, then per categorical column its kept categories and an
"unknown" bucket (unseen or too-rare categories at scoring time land there, no error).

A boolean column (true/false in any of the spellings of BOOLEAN_TEXT) keeps 'false'/'true' as its
categories, whatever the training file spelled: pandas' to_csv writes True/False and a Parquet bool
reads as true/false, and compared verbatim, a bundle trained on one put every row of the other in
the unknown bucket. An integer-coded column (categories '1', '2', '3') also takes '3.0' as '3': pandas
reads an integer column with one blank cell as float64, and its to_csv writes every value so. Each
column's spellings (CategoricalStats.spellings) are read alike here and in scorer.onnx (pipeline.export).
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import PreprocessConfig
from pipeline.errors import DataError
from pipeline.schema import TableSchema, categorical_strings, numeric_matrix

log = logging.getLogger("vaeguard")

UNKNOWN = "__unknown__"
# A boolean's spellings (what pandas' to_csv, pyarrow and other tools write) and what each means;
# missing stays missing. Any other value of a boolean column is unknown, as an unseen category is.
BOOLEAN_TEXT = {**dict.fromkeys(("false", "False", "FALSE"), "false"),
                **dict.fromkeys(("true", "True", "TRUE"), "true"), "": ""}
# Scaling by IQR / 1.349 makes a Gaussian column's scale equal its standard deviation, so
# reconstruction errors are in familiar units while outliers in training don't set the scale.
_IQR_TO_SIGMA = 1.349


@dataclass(frozen=True)
class NumericStats:
    name: str
    median: float
    scale: float
    has_indicator: bool
    # Share of training rows blank in this column (0 exactly where it has no indicator): scoring warns
    # when a run's share is far above it. In the manifest so that every runtime reads it there, not
    # from the calibration rows' Parquet. None: a bundle exported before it was recorded.
    missing_share: float | None = None


@dataclass(frozen=True)
class CategoricalStats:
    name: str
    categories: tuple[str, ...]  # "" is the missing value, when kept
    boolean: bool = False  # values are read through BOOLEAN_TEXT first; categories are 'false'/'true'
    integer: bool = False  # categories are integers' text ('3'); '3.0' is read as '3'
    # Share of training rows whose value went to the unknown bucket (categories too rare to keep):
    # scoring compares each run's share with it. None: a bundle exported before it was recorded.
    unknown_share: float | None = None

    @property
    def spellings(self) -> dict[str, str] | None:
        """Each text this column's values may come as, to the category (or missing "") it means;
        None where values are read verbatim. Any other text is unknown."""
        if self.boolean:
            return BOOLEAN_TEXT
        if self.integer:
            return {"": "", **{text: c for c in self.categories if c for text in (c, f"{c}.0")}}
        return None

    @property
    def known_texts(self) -> frozenset[str]:
        """Every text this column's scorer input takes as a kept category (missing "" when kept):
        any other text lands in the unknown bucket."""
        spellings = self.spellings
        if spellings is None:
            return frozenset(self.categories)
        kept = set(self.categories)
        return frozenset(text for text, meaning in spellings.items() if meaning in kept)


@dataclass(frozen=True)
class Preprocessor:
    numeric: tuple[NumericStats, ...]
    categorical: tuple[CategoricalStats, ...]

    @property
    def numeric_columns(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.numeric)

    @property
    def categorical_columns(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.categorical)

    @property
    def indicator_index(self) -> list[int]:
        """Positions (among numeric columns) of the columns that get a missing indicator."""
        return [i for i, s in enumerate(self.numeric) if s.has_indicator]

    @property
    def feature_names(self) -> list[str]:
        names = [s.name for s in self.numeric]
        names += [f"{s.name}__missing" for s in self.numeric if s.has_indicator]
        for s in self.categorical:
            names += [f"{s.name}={c}" for c in s.categories] + [f"{s.name}={UNKNOWN}"]
        return names

    @property
    def feature_columns(self) -> list[str]:
        """The input column of each feature, in feature_names' order. Taken from the parts, not parsed
        from the names: a column named 'a=b' or 'x__missing' reads as a one-hot of 'a' or the missing
        flag of 'x', and 'a=b' is also category 'b' of 'a'."""
        return ([s.name for s in self.numeric] + [s.name for s in self.numeric if s.has_indicator]
                + [s.name for s in self.categorical for _ in range(len(s.categories) + 1)])

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def n_onehot(self) -> int:
        return sum(len(s.categories) + 1 for s in self.categorical)

    def transform(self, numeric: np.ndarray, categories: Sequence[np.ndarray]) -> np.ndarray:
        """Raw inputs (float32 with NaN; arrays of str) to the model's float32 features."""
        numeric = np.asarray(numeric, dtype=np.float32)
        missing = np.isnan(numeric)
        medians = np.array([s.median for s in self.numeric], dtype=np.float32)
        scales = np.array([s.scale for s in self.numeric], dtype=np.float32)
        filled = np.where(missing, medians, numeric)
        parts = [(filled - medians) / scales, missing[:, self.indicator_index].astype(np.float32)]
        parts += [self.one_hot(stats, values) for stats, values in zip(self.categorical, categories)]
        return np.concatenate(parts, axis=1).astype(np.float32, copy=False)

    def onehot_block(self, categories: Sequence[np.ndarray], n_rows: int) -> np.ndarray:
        parts = [self.one_hot(stats, values) for stats, values in zip(self.categorical, categories)]
        return np.concatenate(parts, axis=1) if parts else np.zeros((n_rows, 0), np.float32)

    @staticmethod
    def one_hot(stats: CategoricalStats, values: np.ndarray) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(stats.categories)}
        spellings = stats.spellings
        if spellings is not None:
            lookup = {text: lookup[meaning] for text, meaning in spellings.items() if meaning in lookup}
        unknown = len(stats.categories)
        codes = np.fromiter((lookup.get(v, unknown) for v in values), dtype=np.int64, count=len(values))
        return np.eye(unknown + 1, dtype=np.float32)[codes]

    def transform_frame(self, frame: pd.DataFrame, source: str) -> np.ndarray:
        return self.transform(
            numeric_matrix(frame, self.numeric_columns, source),
            categorical_strings(frame, self.categorical_columns),
        )

    def to_dict(self) -> dict:
        return {
            "missing_category": "",
            "unknown_category": UNKNOWN,
            # The shares only where known: a manifest without them reads as before.
            "numeric": [{key: value for key, value in vars(s).items() if key != "missing_share" or value is not None}
                        for s in self.numeric],
            # "boolean" and "integer" only where true: a manifest without them reads as before.
            "categorical": [{"name": s.name, "categories": list(s.categories), **({"boolean": True} if s.boolean else {}),
                             **({"integer": True} if s.integer else {}),
                             **({} if s.unknown_share is None else {"unknown_share": s.unknown_share})}
                            for s in self.categorical],
            "feature_names": self.feature_names,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "Preprocessor":
        return cls(
            numeric=tuple(NumericStats(**{**s, "missing_share": _share(s, "missing_share", "numeric")})
                          for s in raw["numeric"]),
            categorical=tuple(CategoricalStats(s["name"], tuple(s["categories"]), _flag(s, "boolean"), _flag(s, "integer"),
                                               _share(s, "unknown_share", "categorical"))
                              for s in raw["categorical"]),
        )


def _flag(entry: dict, key: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise TypeError(f"categorical column {entry.get('name')!r}: {key!r} must be true or false, got {value!r}")
    return value


def _share(entry: dict, key: str, kind: str) -> float | None:
    value = entry.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise TypeError(f"{kind} column {entry.get('name')!r}: {key!r} must be a number from 0 to 1, got {value!r}")
    return None if value is None else float(value)


def fit_preprocessor(frame: pd.DataFrame, schema: TableSchema, config: PreprocessConfig,
                     source: str) -> Preprocessor:
    """Learn medians, robust scales and category lists from training rows only."""
    numeric = numeric_matrix(frame, schema.numeric, source).astype(np.float64)
    stats = [
        _numeric_stats(name, numeric[:, i], source) for i, name in enumerate(schema.numeric)
    ]
    categorical = [
        _categorical_stats(name, values, config, source)
        for name, values in zip(schema.categorical, categorical_strings(frame, schema.categorical))
    ]
    return Preprocessor(tuple(stats), tuple(categorical))


def _categorical_stats(name: str, values: np.ndarray, config: PreprocessConfig, source: str) -> CategoricalStats:
    distinct = set(pd.unique(values)) - {""}
    boolean = bool(distinct) and distinct <= BOOLEAN_TEXT.keys()
    integer = bool(distinct) and all(_INTEGER_TEXT.fullmatch(v) for v in distinct)
    if boolean:
        values = np.array([BOOLEAN_TEXT[v] for v in values], dtype=object)  # 'True' and 'true' count as one
    elif integer:
        values = np.array([v.removesuffix(".0") for v in values], dtype=object)  # '3.0' and '3' count as one
    kept = _kept_categories(values, config, name, source)
    unknown = ~pd.Series(values).isin(kept).to_numpy()
    share = round(int(unknown.sum()) / len(values), 6) if len(values) else 0.0
    if share > MAX_UNKNOWN_SHARE and name not in config.categorical_columns:
        _warn_mostly_unknown(name, values, unknown, kept, config, source)
    return CategoricalStats(name, kept, boolean, integer, share)


# A number written for people: a currency before it ('€1,546.46', 'USD 12'), thousands separators in it
# ('264,000'), or a unit after it ('12.5 kg', '45%'). Not a code ('X000123', 'AB-12'): nothing but a
# currency may come before the digits.
_DECORATED_NUMBER = re.compile(r"\s*(?P<currency>[$\u20ac\u00a3\u00a5\u20b9]|[A-Z]{3} )?\s*[+-]?\s*"
                               r"(?P<digits>\d{1,3}(?:[,\u00a0\u202f' ]\d{3})+|\d+)(?:\.\d+)?"
                               r"\s*(?P<unit>%|[A-Za-z\u00b0\u00b5/]{1,4})?\s*")


def _decorated_number(text: str) -> bool:
    match = _DECORATED_NUMBER.fullmatch(text)
    return bool(match) and bool(match["currency"] or match["unit"] or not match["digits"].isdigit())


def _mostly_decorated_numbers(texts) -> bool:
    """Nine in ten of ``texts`` (a column's distinct values) are numbers written for people."""
    texts = [str(t) for t in texts]
    return bool(texts) and sum(map(_decorated_number, texts)) >= 0.9 * len(texts)


# Past this share of training rows in the unknown bucket, a column's one-hot block says nothing
# about most rows, and it is seldom a category at all: numbers written with thousands separators
# ('264,000') or a currency ('€101.23'), or a near-unique code, sent 83-92% there. Categories stay
# far below it: 0.08% at most among the ADBench datasets' integer codes, 0 in the demo's line and
# shift; a long tail (Zipf-like, 500 values) cut at the default 50 most common sends about a third.
MAX_UNKNOWN_SHARE = 0.5


def _warn_mostly_unknown(name: str, values: np.ndarray, unknown: np.ndarray, kept: tuple[str, ...],
                         config: PreprocessConfig, source: str) -> None:
    """Warn about a categorical column whose values are mostly too rare to be categories.

    Nothing fails: such a column trains and scores, but reads as 'unknown' on most rows, while
    what it holds (an amount, a count, an id) is lost; the usual causes are fixed in the file.
    """
    counts = pd.Series(values).value_counts()
    example = next((v for v in values[unknown] if v), "")
    # Where most of those rows hold values common enough for a category but beyond max_categories,
    # raising it is the fix.
    cut = int(counts[(counts >= config.min_category_count) & ~counts.index.isin(kept)].sum())
    more = (f"; if it is a category with more than {config.max_categories} common values, raise "
            f"preprocess.max_categories in the --config file" if 2 * cut > unknown.sum() else "")
    log.warning("%s: column %r puts %s of the %s training rows in its 'unknown' category (%s distinct values, "
                "e.g. %r; a category must be seen at least %d times and be among the %d most common), so the "
                "model learns little from it: if it holds numbers written with thousands separators or units, "
                "write them as plain numbers; if it is an identifier, pass it with --id-columns %s%s; or, to keep "
                "it as it is without this warning, name it in the --config file: preprocess: "
                "{categorical_columns: [%s]}",
                source, name, f"{unknown.mean():.0%}", f"{len(values):,}", f"{len(counts):,}", example[:40],
                config.min_category_count, config.max_categories, shlex.quote(name), more, name)


# An integer as Python, pandas and pyarrow write it ('-12'), or as pandas writes it from a float64
# column ('-12.0'). Not '007': a code with leading zeros is text, which its writer keeps as written.
_INTEGER_TEXT = re.compile(r"(0|-?[1-9][0-9]*)(\.0)?")


# A robust z-score past this overflows float32 training: the loss squares it (times up to e^10
# for the decoder's sharpest sigma) and sums a batch of rows, which passes 3.4e38 near 1e16 (a
# value at z = 1e20 made every weight NaN). No measurement lies 1e15 robust standard deviations
# from its median: such a value is a glitch or a sentinel for "no reading" (9.99e37, say).
MAX_TRAINING_Z = 1e15


def check_training_scale(pre: Preprocessor, frame: pd.DataFrame, source: str) -> None:
    """Fail, naming the cell, if a numeric value of the training table is too far out to train on."""
    numeric = numeric_matrix(frame, pre.numeric_columns, source).astype(np.float64)
    medians = np.array([s.median for s in pre.numeric])
    scales = np.array([s.scale for s in pre.numeric])
    with np.errstate(invalid="ignore"):
        extreme = np.abs((numeric - medians) / scales) > MAX_TRAINING_Z  # missing (NaN) compares False
    if extreme.any():
        row, col = map(int, np.argwhere(extreme)[0])
        stats = pre.numeric[col]
        raise DataError(
            f"{source}: column {stats.name!r} holds {frame[stats.name].iloc[row]} at row {row + 1}, more than "
            f"{MAX_TRAINING_Z:.0e} robust standard deviations ({stats.scale:.4g}) from its median ({stats.median:.4g}), "
            f"too far out to train on in float32; fix the value, or blank it out if it marks a missing reading"
        )


def _numeric_stats(name: str, values: np.ndarray, source: str) -> NumericStats:
    present = values[~np.isnan(values)]
    if not present.size:
        # A sparse column whose few values all fell in the held-out rows (which rows those are
        # depends on the seed). Refused, training would fail with one seed or night and not the
        # next on the same kind of data; so it is learned as training saw it, always blank. Median
        # 0 and scale 1 (the fallback of a column without spread, below) keep it defined; at
        # scoring a value there differs from training through its missing indicator (1 on every
        # training row) and its distance from 0.
        log.warning("%s: numeric column %r has no value in any of the %s training rows (its few values all fell "
                    "in the rows held out from training), so the model learns it as always blank and nothing "
                    "from its values; leave the column out of the file, unless later training data will hold "
                    "values in it", source, name, f"{len(values):,}")
        return NumericStats(name, 0.0, 1.0, True, 1.0)
    median = float(np.median(present))
    q25, q75 = np.percentile(present, [25, 75])
    scale = float(q75 - q25) / _IQR_TO_SIGMA
    if scale <= 0:
        # Mostly-constant columns (sparse counts, rare flags): the IQR is zero, so fall back to
        # the spread of all values, and to 1 if even that is zero.
        scale = float(np.std(present)) or 1.0
    blank = int(np.count_nonzero(np.isnan(values)))
    return NumericStats(name, float(np.float32(median)), float(np.float32(scale)), blank > 0, blank / len(values))


def _kept_categories(values: np.ndarray, config: PreprocessConfig, name: str, source: str) -> tuple[str, ...]:
    counts = pd.Series(values).value_counts()
    kept = counts[counts >= config.min_category_count]
    if kept.empty:
        # Every value rare: a code or name per row, not a category. Its one-hot block would be the
        # unknown bucket alone, and the export crashed after training on the empty category list.
        example = str(counts.index[0])
        hint = (" (if the rows are image paths, train on images with --image-size)"
                if example.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")) else "")
        named = ("; naming it in preprocess.categorical_columns keeps a column categorical, but no value of this "
                 "one repeats, so it has no category to keep" if name in config.categorical_columns else "")
        if _mostly_decorated_numbers(counts.index[:1000]):
            # '€1,546.46': an amount, not an id. "Pass it with --id-columns" lost it from the model.
            raise DataError(f"{source}: column {name!r} holds numbers written with separators or units (e.g. "
                            f"{example!r}), {len(counts):,} distinct values in {len(values):,} training rows, none "
                            f"seen {config.min_category_count} times, so it is no category: write them as plain "
                            f"numbers (1546.46, not €1,546.46) and it trains as numeric; or leave it out of the "
                            f"file{named}")
        raise DataError(f"{source}: column {name!r} has {len(counts):,} distinct values in {len(values):,} training "
                        f"rows and none seen {config.min_category_count} times (e.g. {example!r}), so it is no "
                        f"category: it looks like an identifier; pass it with --id-columns {shlex.quote(name)}, or "
                        f"leave it out of the file{hint}{named}")
    counts = kept
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(str(c) for c, _ in ordered[: config.max_categories])
