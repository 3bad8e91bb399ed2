"""ONNX parity: encoder, decoder and scorer against PyTorch at batch sizes 1, 7 and 4096."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from pipeline.bundle import Bundle
from pipeline.calibrate import calibrate, conformal_p_values, placeholder_calibration
from pipeline.export import export_scorer, write_calibrated_scorer
from pipeline.model import VAE
from pipeline.runtime import BundleScorer
from pipeline.scorer_graph import CalibrationTable, ScorerGraph, graph_inputs
from pipeline.synthetic import SyntheticSpec, make_sensor_table

BATCHES = [1, 7, 4096]


@pytest.fixture(scope="module")
def bundle(trained_bundle):
    return Bundle.load(trained_bundle)


@pytest.fixture(scope="module")
def torch_graph(bundle):
    """The PyTorch scorer rebuilt from what a bundle ships: encoder/decoder weights and the manifest."""
    manifest = bundle.manifest
    vae = VAE.from_config(manifest["model"])
    # Load the weights back from the ONNX initializers so the comparison needs no checkpoint.
    state = {}
    for name in ("encoder", "decoder"):
        model = onnx.load(str(bundle.path / f"{name}.onnx"))
        for init in model.graph.initializer:
            state[f"{name}.{init.name}"] = torch.from_numpy(onnx.numpy_helper.to_array(init).copy())
    # The decoder's likelihood scale is not an ONNX initializer of decoder.onnx: it is in the manifest.
    state["decoder.log_scale"] = torch.tensor(manifest["model"]["decoder_log_scale"])
    vae.load_state_dict(state)
    return ScorerGraph(vae.eval(), bundle.preprocessor, manifest["score"]["kl_weight"], bundle.calibration).eval()


@pytest.fixture(scope="module")
def rows():
    frame = make_sensor_table(SyntheticSpec(n_rows=4096, seed=5))
    frame.loc[3, "line"] = "never-seen-line"
    frame.loc[4, ["pressure", "shift"]] = [np.nan, None]
    return frame


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("n", BATCHES)
def test_scorer_matches_pytorch(bundle, torch_graph, rows, n):
    batch = rows.iloc[:n]
    onnx_out = BundleScorer(bundle, device="cpu").score_frame(batch)
    with torch.no_grad():
        expected = dict(zip(["score", "recon", "kl", "p_value", "is_anomaly"],
                            (v.numpy() for v in torch_graph(*graph_inputs(bundle.preprocessor, batch, "rows")))))
    for name in ("score", "recon", "kl"):
        np.testing.assert_allclose(onnx_out[name].to_numpy(), expected[name], rtol=1e-4, atol=1e-4, err_msg=name)
    # p_value and is_anomaly step where a score passes a calibration score (a score of scorer.onnx,
    # whose decisions are the bundle's): a row whose two scores (equal to float rounding) straddle one
    # may differ by a step (seen: 1 row in 4,096 of a CI run). Every other row must get the same
    # p-value and decision.
    calibration, ours, theirs = bundle.calibration.scores, onnx_out["score"].to_numpy(), expected["score"]
    low, high = np.minimum(ours, theirs), np.maximum(ours, theirs)
    margin = 1e-6 * np.maximum(np.abs(high), 1.0)  # the graphs' comparisons may round either way
    straddled = ((calibration[None, :] >= (low - margin)[:, None]) & (calibration[None, :] <= (high + margin)[:, None]))
    clear = ~straddled.any(axis=1)
    assert clear.mean() > 0.99
    for name in ("p_value", "is_anomaly"):
        np.testing.assert_array_equal(onnx_out[name].to_numpy()[clear], expected[name][clear], err_msg=name)


@pytest.mark.parametrize("n", BATCHES)
def test_encoder_and_decoder_match_pytorch(bundle, torch_graph, rows, n):
    features = bundle.preprocessor.transform_frame(rows.iloc[:n], "rows")
    mu, logvar = session(bundle.path / "encoder.onnx").run(None, {"features": features})
    (reconstruction,) = session(bundle.path / "decoder.onnx").run(None, {"z": mu})
    with torch.no_grad():
        t_mu, t_logvar = torch_graph.vae.encoder(torch.from_numpy(features))
        t_rec = torch_graph.vae.decoder(t_mu)
    np.testing.assert_allclose(mu, t_mu.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logvar, t_logvar.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reconstruction, t_rec.numpy(), rtol=1e-4, atol=1e-5)


def test_scorer_p_values_and_decisions_follow_the_calibration(bundle, rows):
    out = BundleScorer(bundle, device="cpu").score_frame(rows)
    cal = bundle.calibration
    np.testing.assert_array_equal(out["p_value"].to_numpy(), cal.p_values(out["score"].to_numpy()))
    np.testing.assert_array_equal(out["is_anomaly"].to_numpy(), out["score"].to_numpy() > cal.threshold)
    np.testing.assert_array_equal(out["is_anomaly"].to_numpy(), out["p_value"].to_numpy() <= cal.target_fpr)


def test_a_scorer_exported_before_its_calibration_is_the_one_exported_with_it(bundle, torch_graph, tmp_path):
    """Training exports scorer.onnx with a placeholder table, calibrates on that graph's scores and
    writes the table in; the graph must be byte for byte the one an export with the table gives,
    or the bundle's scores need not be the ones it was calibrated on."""
    cal = bundle.calibration
    export_scorer(torch_graph, bundle.preprocessor, tmp_path / "with_table.onnx")
    draft = ScorerGraph(torch_graph.vae, bundle.preprocessor, torch_graph.kl_weight,
                        placeholder_calibration(cal.n, cal.target_fpr)).eval()
    export_scorer(draft, bundle.preprocessor, tmp_path / "draft.onnx")
    assert (tmp_path / "draft.onnx").read_bytes() != (tmp_path / "with_table.onnx").read_bytes()
    write_calibrated_scorer(tmp_path / "draft.onnx", cal, tmp_path / "calibrated.onnx")
    assert (tmp_path / "calibrated.onnx").read_bytes() == (tmp_path / "with_table.onnx").read_bytes()


def test_unknown_category_maps_to_the_unknown_bucket(bundle, rows):
    row = rows.iloc[[3]].copy()
    scorer = BundleScorer(bundle, device="cpu")
    unseen = scorer.score_frame(row)["score"].iloc[0]
    row["line"] = "another-unseen-value"
    assert scorer.score_frame(row)["score"].iloc[0] == unseen  # all unseen values are one bucket


def test_graph_contract(bundle):
    manifest = bundle.manifest
    for name in ("encoder.onnx", "decoder.onnx", "scorer.onnx"):
        model = onnx.load(str(bundle.path / name))
        assert model.ir_version == 10
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        for value in list(model.graph.input) + list(model.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch_size", (name, value.name)
        props = {p.key: p.value for p in model.metadata_props}
        assert float(props["vaeguard.threshold"]) == manifest["calibration"]["threshold"]
        assert json.loads(props["vaeguard.numeric_columns"]) == manifest["schema"]["numeric"]
    assert not list(bundle.path.glob("*.data"))
    # One version per domain (onnx.compose repeats the default one); stricter loaders refuse a repeat.
    scorer = onnx.load(str(bundle.scorer_path))
    assert sorted((o.domain, o.version) for o in scorer.opset_import) == [("", 17), ("ai.onnx.ml", 3)]
    inputs = {i.name: i.type for i in session(bundle.scorer_path).get_inputs()}
    assert inputs["numeric"] == "tensor(float)" and inputs["cat_line"] == "tensor(string)"
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_diff"]["score"] < 1e-3


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    shapes.update({n.output[0]: list(n.attribute[0].t.dims) for n in model.graph.node if n.op_type == "Constant"})
    return shapes


def test_scorer_graph_avoids_onnxruntimes_slow_kernels(bundle):
    """Two layout choices made the CPU scorer 1.5x faster (BENCHMARKS.md); a refactor that
    undoes either still scores correctly, so only this test would notice."""
    model = onnx.load(str(bundle.scorer_path))
    lookups = [n for n in model.graph.node if "table.scores" in n.input]
    assert lookups and {n.op_type for n in lookups} == {"GatherElements"}
    # A per-column vector ([k] or [1, k], k > 1) broadcast against a block of rows runs row by row.
    shapes = _static_shapes(model)

    def per_column(shape):
        return shape is not None and len(shape) >= 1 and shape[-1] not in (None, 1) and all(d == 1 for d in shape[:-1])

    slow = [n.name for n in model.graph.node if n.op_type in ("Add", "Sub", "Mul", "Div", "Where")
            and any(per_column(shapes.get(i)) for i in n.input)
            and any(len(shapes.get(i) or []) >= 2 and shapes[i][0] != 1 for i in n.input)]
    assert not slow


def test_scores_are_identical_across_runs_and_batchings(bundle, rows):
    scorer = BundleScorer(bundle, device="cpu")
    whole = scorer.score_frame(rows)["score"].to_numpy()
    pieces = np.concatenate([scorer.score_frame(rows.iloc[i:i + 1000])["score"].to_numpy()
                             for i in range(0, len(rows), 1000)])
    np.testing.assert_allclose(whole, pieces, rtol=1e-6, atol=1e-6)
    again = BundleScorer(Bundle.load(bundle.path), device="cpu").score_frame(rows)["score"].to_numpy()
    np.testing.assert_array_equal(whole, again)


@pytest.mark.parametrize("n", [99, 127, 128, 4095])
def test_baked_table_search_counts_exactly_at_every_edge(tmp_path, n):
    """The graph's binary search gives the conformal p-value exactly, for table sizes around a
    power of two and for scores on, between, below and above the calibration scores (ties too)."""
    rng = np.random.default_rng(n)
    scores = np.round(rng.normal(size=n), 1).astype(np.float32)  # rounding makes ties
    cal = calibrate(scores, 0.01)
    queries = np.concatenate([cal.scores, cal.scores + np.float32(0.05), [cal.scores[0] - 1, cal.scores[-1] + 1,
                              np.inf, -np.inf, np.float32(np.nextafter(cal.scores[-1], np.inf)), np.nan]]).astype(np.float32)
    path = tmp_path / "table.onnx"
    torch.onnx.export(CalibrationTable(cal), (torch.from_numpy(queries),), str(path), input_names=["score"],
                      output_names=["published", "p_value", "is_anomaly"], dynamic_axes={"score": {0: "n"}}, dynamo=False)
    published, p_value, flagged = session(path).run(None, {"score": queries})
    # A NaN score (float32 overflow inside the network) is published as +inf, so it is flagged.
    expected = np.where(np.isnan(queries), np.float32(np.inf), queries)
    np.testing.assert_array_equal(published, expected)
    np.testing.assert_array_equal(p_value, conformal_p_values(cal.scores, expected))
    np.testing.assert_array_equal(flagged, expected > np.float32(cal.threshold))
    assert flagged[-1] and p_value[-1] == np.float32(1 / (n + 1))


def test_a_value_that_overflows_float32_is_flagged_not_passed(bundle, torch_graph, rows):
    """3.3e38 is finite, so the input check lets it through, but inside the network it overflows
    to NaN (SiLU of -inf): a NaN score would compare False and pass as normal."""
    batch = rows.iloc[:3].copy()
    batch.loc[batch.index[1], "vibration"] = 3.3e38
    out = BundleScorer(bundle, device="cpu").score_frame(batch)
    with torch.no_grad():
        eager = torch_graph(*graph_inputs(bundle.preprocessor, batch, "rows"))
        raw = torch_graph.components(*graph_inputs(bundle.preprocessor, batch, "rows"))[0]
    assert torch.isnan(raw[1])  # what the network computes: the case this guards against
    for score, p_value, flagged in ((out["score"].to_numpy(), out["p_value"].to_numpy(), out["is_anomaly"].to_numpy()),
                                    (eager[0].numpy(), eager[3].numpy(), eager[4].numpy())):
        assert score[1] == np.inf and flagged[1] and p_value[1] == np.float32(1 / (bundle.calibration.n + 1))
        assert np.isfinite(score[[0, 2]]).all()


def _fitted_front(frame):
    """The preprocessor fitted on ``frame`` with the defaults, and its categorical front graph."""
    from pipeline.config import PreprocessConfig
    from pipeline.export import categorical_front
    from pipeline.preprocess import fit_preprocessor
    from pipeline.schema import infer_schema

    config = PreprocessConfig()
    pre = fit_preprocessor(frame, infer_schema(frame, source="t", config=config), config, "t")
    model = categorical_front(pre)
    onnx.checker.check_model(model, full_check=True)
    return pre, model


def _one_hot_in_graph(model, feeds: dict) -> np.ndarray:
    (block,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    return block


def test_a_boolean_columns_spellings_decide_alike_inside_the_graph():
    """Other runtimes feed raw strings: the graph itself must read a pandas CSV's 'True' as the
    'true' a Parquet bool column trained on (and as Preprocessor.one_hot reads it), not as unknown."""
    rng = np.random.default_rng(0)
    trained = (rng.random(300) > 0.5).astype(object)  # booleans with a few missing, as pandas holds them
    trained[::50] = None
    frame = pd.DataFrame({"flag": trained, "code": rng.choice(["a", "True"], 300)})
    pre, model = _fitted_front(frame)
    flags = np.array(["true", "True", "TRUE", "false", "False", "FALSE", "", "yes", "__unknown__", " true"], dtype=object)
    codes = np.array(["true", "True"] * 5, dtype=object)  # not boolean: verbatim, 'true' is unknown
    block = _one_hot_in_graph(model, {"cat_flag": flags, "cat_code": codes})
    np.testing.assert_array_equal(block, pre.onehot_block([flags, codes], len(flags)))
    flag = block[:, :len(pre.categorical[0].categories) + 1]
    assert (flag[:3] == flag[0]).all() and (flag[3:6] == flag[3]).all() and not (flag[0] == flag[3]).all()
    assert flag[0, -1] == 0 and flag[3, -1] == 0 and flag[6, -1] == 0  # true, false, missing: known
    assert (flag[7:, -1] == 1).all()  # any other text: the unknown bucket
    assert block[0, -1] == 1 and block[1, -1] == 0  # the text column keeps its spellings
    assert [n.op_type for n in model.graph.node].count("LabelEncoder") == 1


def test_an_integer_coded_columns_decimal_spelling_decides_alike_inside_the_graph():
    """A pandas CSV of a code column with a blank says '3.0' for 3; runtimes other than Python feed the
    graph that text, so the graph itself must read it as '3', as Preprocessor.one_hot does."""
    rng = np.random.default_rng(0)
    code = pd.array(rng.integers(1, 4, 300), dtype="Int64")
    code[::50] = pd.NA
    frame = pd.DataFrame({"code": code, "site": rng.choice(["3", "a"], 300)})
    pre, model = _fitted_front(frame)
    codes = np.array(["3", "3.0", "", "x", "1.0", "1", "3.00", " 3", "4.0", "__unknown__"], dtype=object)
    sites = np.array(["3", "3.0"] * 5, dtype=object)  # a text column, not integer-coded: verbatim
    block = _one_hot_in_graph(model, {"cat_code": codes, "cat_site": sites})
    np.testing.assert_array_equal(block, pre.onehot_block([codes, sites], len(codes)))
    width = len(pre.categorical[0].categories) + 1
    code_block, site_block = block[:, :width], block[:, width:]
    assert (code_block[0] == code_block[1]).all() and (code_block[4] == code_block[5]).all()
    assert code_block[[0, 2, 4], -1].sum() == 0  # 3, missing, 1: known
    assert (code_block[[3, 6, 7, 8, 9], -1] == 1).all()  # any other text: the unknown bucket
    assert site_block[0, -1] == 0 and site_block[1, -1] == 1
    assert [n.op_type for n in model.graph.node].count("LabelEncoder") == 1
