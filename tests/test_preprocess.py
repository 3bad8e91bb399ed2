import numpy as np
import pandas as pd
import pytest

from pipeline.config import PreprocessConfig
from pipeline.errors import DataError
from pipeline.preprocess import UNKNOWN, Preprocessor, fit_preprocessor
from pipeline.schema import infer_schema


@pytest.fixture
def frame():
    rng = np.random.default_rng(0)
    x = rng.normal(10.0, 2.0, 1000)
    x[::50] = np.nan
    return pd.DataFrame({"x": x, "y": rng.normal(size=1000),
                         "color": rng.choice(["red", "blue", "green"], 1000, p=[0.6, 0.3, 0.1])})


def fitted(frame, **config):
    config = PreprocessConfig(**config)
    return fit_preprocessor(frame, infer_schema(frame, source="t", config=config), config, "t")


def test_robust_statistics_and_feature_layout(frame):
    pre = fitted(frame)
    x = pre.numeric[0]
    assert x.median == pytest.approx(np.nanmedian(frame["x"]), rel=1e-6)
    assert x.scale == pytest.approx(2.0, rel=0.1)  # IQR / 1.349 recovers the std of a Gaussian
    assert x.has_indicator and not pre.numeric[1].has_indicator
    assert pre.feature_names == ["x", "y", "x__missing", "color=red", "color=blue", "color=green", f"color={UNKNOWN}"]


def test_transform_imputes_flags_and_one_hots(frame):
    pre = fitted(frame)
    out = pre.transform(np.array([[np.nan, 0.0], [pre.numeric[0].median, 1.0]], np.float32),
                        [np.array(["blue", "purple"], dtype=object)])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], [0.0, 0.0])       # missing -> median -> 0 after scaling
    np.testing.assert_array_equal(out[:, 2], [1.0, 0.0])    # missing indicator
    np.testing.assert_array_equal(out[0, 3:], [0, 1, 0, 0])  # blue
    np.testing.assert_array_equal(out[1, 3:], [0, 0, 0, 1])  # unseen -> unknown, no error


def test_rare_categories_go_to_unknown(frame):
    pre = fitted(frame, max_categories=2)
    assert pre.categorical[0].categories == ("red", "blue")


def test_round_trips_through_the_manifest_dict(frame):
    pre = fitted(frame)
    assert Preprocessor.from_dict(pre.to_dict()) == pre


@pytest.mark.parametrize("values, hint", [
    ([f"c{i}" for i in range(1000)], ""),
    ([f"images/{i}.png" for i in range(1000)], r" \(if the rows are image paths, train on images with --image-size\)"),
])
def test_a_text_column_of_rare_values_only_is_named_as_an_identifier(frame, values, hint):
    """Before: training ran to the end and the export failed with "unexpected ValueError: Could not
    infer attribute `cats_strings` type from empty iterator" (a CSV of image paths given without
    --image-size, which is read as a table, did the same)."""
    with pytest.raises(DataError, match=r"^t: column 'code' has 1,000 distinct values in 1,000 training rows and "
                                        r"none seen 2 times \(e\.g\. '.+'\), so it is no category: it looks like an "
                                        rf"identifier; pass it with --id-columns code, or leave it out of the file{hint}$"):
        fitted(frame.assign(code=values))
