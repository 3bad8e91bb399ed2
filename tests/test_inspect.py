"""How a bundle's facts read (pipeline/inspect.py); `vaeguard inspect` itself is run in tests/test_cli.py."""

import shutil

from pipeline.bundle import Bundle
from pipeline.inspect import describe_manifest, parity_of_decisions
from tests.conftest import run_main
from tests.test_bundle import _with_a_variant
from tests.test_runtime import _truncated_with_its_hash


def test_a_difference_at_the_threshold_reads_as_what_it_is():
    """A sound bundle printed "decisions agree on 99.80% of 499 rows", which reads as a fault: the
    one other row scores at the threshold, where float rounding decides. The threshold is a score of
    scorer.onnx, which decides; PyTorch's decisions are the export check's."""
    at_threshold = {"rows": 499, "decision_agreement": 498 / 499, "differ_at_threshold": 1}
    assert parity_of_decisions(at_threshold) == ("agree on 498 of 499 rows (the other 1 at the threshold, "
                                                 "where float rounding decides; the bundle decides as scorer.onnx)")
    assert parity_of_decisions({"rows": 499, "decision_agreement": 1.0, "differ_at_threshold": 0}) == \
        "agree on 499 of 499 rows"
    # A bundle from before the count: the plain count, no claim about where the difference is.
    assert parity_of_decisions({"rows": 20_000, "decision_agreement": 19_999 / 20_000}) == \
        "agree on 19,999 of 20,000 rows"


def test_inspect_says_the_scorer_flags_its_own_calibration_rows_as_calibrated(trained_bundle):
    manifest = Bundle.load(trained_bundle).manifest
    calibration, lines = manifest["calibration"], describe_manifest(manifest).splitlines()
    own = [line.split(None, 2)[2] for line in lines if line.strip().startswith("own calibration")]
    assert own == [f"scorer.onnx flags {calibration['rank'] - 1} of its {calibration['n_calibration']} calibration "
                   f"inputs, those above the threshold"]


def test_inspect_warns_of_a_variant_onnxruntime_cannot_load(capsys, trained_bundle, tmp_path):
    """Before: inspect printed the whole description, then failed with `error: unexpected
    InvalidProtobuf`; it warns of a broken variant as of one whose manifest disagrees."""
    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    _with_a_variant(bundle)
    _truncated_with_its_hash(bundle, "scorer.int8.onnx")
    code, out, err = run_main(capsys, "inspect", bundle)
    assert code == 0 and out.startswith("bundle sensors") and "files (sha256):" in out
    variant = bundle / "scorer.int8.onnx"
    # onnxruntime's own words between the parentheses (they differ as it loads a file or bytes).
    assert err.startswith(f"warning: {variant}: not a loadable ONNX model ([ONNXRuntimeError] : 7 : INVALID_PROTOBUF : ")
    assert err.endswith(f"); re-export the bundle, or make it again with `vaeguard export {bundle} --precision int8` "
                        f"(`vaeguard score` refuses the bundle until then)\n") and err.count("\n") == 1
