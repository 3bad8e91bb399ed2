import json
import shutil

import pytest

from pipeline.bundle import Bundle
from pipeline.errors import BundleError


@pytest.fixture
def bundle_copy(trained_bundle, tmp_path):
    return shutil.copytree(trained_bundle, tmp_path / "copy")


def test_manifest_records_the_contract(trained_bundle):
    manifest = Bundle.load(trained_bundle).manifest
    assert set(manifest["files"]) == {"encoder.onnx", "decoder.onnx", "scorer.onnx", "calibration_rows.parquet"}
    cal = manifest["calibration"]
    assert cal["target_fpr"] == 0.01 and cal["n_calibration"] == len(cal["scores"]) >= 99
    assert sorted(cal["scores"]) == cal["scores"]
    assert manifest["schema"]["id_columns"] == ["row_id"] and manifest["schema"]["label_column"] == "label"
    assert {"torch", "onnx", "onnxruntime-gpu"} <= set(manifest["versions"])
    assert 0.0 <= manifest["metrics"]["auroc"] <= 1.0 and manifest["created_at"]


def test_modified_file_fails_the_hash_check(bundle_copy):
    with open(bundle_copy / "scorer.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=r"scorer\.onnx: sha256 .* does not match the manifest"):
        Bundle.load(bundle_copy)


def test_missing_file_and_missing_manifest(bundle_copy, tmp_path):
    (bundle_copy / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="decoder.onnx is missing"):
        Bundle.load(bundle_copy)
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.load(tmp_path)


def test_foreign_manifest_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="expected format vaeguard-bundle v1"):
        Bundle.load(bundle_copy)


def test_publish_refuses_to_replace_what_is_not_a_bundle(tmp_path):
    """Something that appeared at the target while training ran is not swapped out and deleted."""
    from pipeline.bundle import publish_bundle
    from pipeline.errors import ConfigError

    staging = tmp_path / ".x.run-1" / "bundle"
    staging.mkdir(parents=True)
    (staging / "manifest.json").write_text("{}")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "important.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for name in ("folder", "file"):
        with pytest.raises(ConfigError, match="training would replace it"):
            publish_bundle(staging, tmp_path / name)
    assert (tmp_path / "folder" / "important.txt").read_text() == "keep"
    assert (tmp_path / "file").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.run-1", "file", "folder"]
    publish_bundle(staging, tmp_path / "new")  # a free target, and then a bundle, may be replaced
    assert (tmp_path / "new" / "manifest.json").is_file()
