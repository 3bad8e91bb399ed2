import builtins
import errno
import hashlib
import io
import json
import os
import re
import shutil

import pytest

from pipeline.bundle import Bundle, sha256_file
from pipeline.cli import main
from pipeline.errors import BundleError
from pipeline.inspect import describe_manifest
from pipeline.unseen import percent


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


def test_a_bundle_folder_that_is_not_there_says_so(tmp_path):
    """A bundle moved or deleted under a nightly job was "not a bundle (no manifest.json)"."""
    with pytest.raises(BundleError, match=r"/gone: no such bundle folder; pass the folder `vaeguard train` wrote "
                                          r"\(was it moved or deleted\?\)$"):
        Bundle.load(tmp_path / "gone")
    with pytest.raises(BundleError, match=r"/m: no such bundle folder \(nor does its folder .*/exported\)"):
        Bundle.load(tmp_path / "exported" / "m")


def edit_manifest(bundle, edit) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["manifest.json", "scorer.onnx"])
def test_a_file_of_a_bundle_is_pointed_at_its_folder(bundle_copy, name):
    with pytest.raises(BundleError, match=f"{name}: is a file of bundle folder {bundle_copy}; pass the folder itself"):
        Bundle.load(bundle_copy / name)


@pytest.mark.parametrize("format_, version", [("vaeguard-bundle", "1"), ("vaeguard-bundle", True),
                                              ("someone-elses", 1), (None, None)])
def test_foreign_manifest_is_refused(bundle_copy, format_, version):
    edit_manifest(bundle_copy, lambda m: m.update(format=format_, format_version=version))
    with pytest.raises(BundleError, match=f"expected format vaeguard-bundle v1, got format {format_!r} "
                                          f"version {version!r}; re-export"):
        Bundle.load(bundle_copy)


def test_a_bundle_from_a_newer_vaeguard_says_to_upgrade(bundle_copy):
    """Re-exporting with this (older) version is not what its owner wants to hear first."""
    edit_manifest(bundle_copy, lambda m: m.update(format_version=2))
    with pytest.raises(BundleError, match="format v2 was written by a newer vaeguard, this one reads v1; "
                                          "upgrade vaeguard"):
        Bundle.load(bundle_copy)


def _drop(*keys):
    def edit(manifest):
        section = manifest
        for key in keys[:-1]:
            section = section[key]
        del section[keys[-1]]
    return edit


BROKEN_MANIFESTS = {
    "no files": (_drop("files"), "no 'files' entry"),
    "files a list": (lambda m: m.update(files=list(m["files"])), "'files' must be a JSON object, got list"),
    "no calibration": (_drop("calibration"), "no 'calibration' entry"),
    "no threshold": (_drop("calibration", "threshold"), r"calibration is incomplete or malformed \(KeyError"),
    "no schema": (_drop("schema"), "no 'schema' entry"),
    "schema without numeric": (_drop("schema", "numeric"), "schema is incomplete or malformed"),
    "name a number": (lambda m: m.update(name=5), "'name' must be a JSON string, got int"),
    "digest not hex": (lambda m: m["files"].update({"encoder.onnx": 42}), r"files\['encoder.onnx'\] must be a sha256"),
    "unknown modality": (lambda m: m.update(modality="audio"), "modality must be one of table, image"),
    "variant without file": (lambda m: m.update(variants={"fp16": {"calibration": m["calibration"]}}),
                             r"variants\['fp16'\] is not a fp16/int8 scorer entry"),
    # Before: `score --precision fp16` printed a string warning one letter a line; inspect showed "checked on None".
    "variant warnings a string": (lambda m: _add_variant(m, warnings="oops"),
                                  r"variants\['fp16'\]\.warnings must be a JSON list of strings, got 'oops'"),
    "variant device null": (lambda m: _add_variant(m, device=None), r"variants\['fp16'\]\.device must be the device"),
}


def _add_variant(manifest, **entry):
    manifest["files"]["scorer.fp16.onnx"] = "0" * 64
    manifest["variants"] = {"fp16": {"file": "scorer.fp16.onnx", "calibration": manifest["calibration"],
                                     "warnings": [], "device": "cpu", **entry}}


@pytest.mark.parametrize("case", BROKEN_MANIFESTS)
def test_an_incomplete_manifest_is_a_one_line_bundle_error(capsys, bundle_copy, tmp_path, case):
    """Before: KeyError / AttributeError from deep inside inspect, score or export."""
    edit, message = BROKEN_MANIFESTS[case]
    edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        Bundle.load(bundle_copy)
    for argv in (["inspect", bundle_copy], ["score", bundle_copy, tmp_path / "in.csv", "--output", tmp_path / "o.csv"],
                 ["export", bundle_copy, "--precision", "int8"]):
        assert main([str(a) for a in argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bundle_copy / 'manifest.json'}: ") and err.count("\n") == 1, err
        assert "unexpected" not in err


@pytest.mark.parametrize("content", [b"[1, 2]", b"\x80\x81 not text", b"", b'{"format": "vaeguard-bundle", '])
def test_a_manifest_that_is_not_a_json_object_is_refused(bundle_copy, content):
    (bundle_copy / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match=r"manifest\.json: (not valid JSON|expected a JSON object, got list)"):
        Bundle.load(bundle_copy)


def test_every_model_file_is_hash_checked(bundle_copy):
    """A model file left out of files would be loaded and scored with, unchecked."""
    edit_manifest(bundle_copy, lambda m: m["files"].pop("scorer.onnx"))
    (bundle_copy / "scorer.onnx").write_bytes(b"not the model that was trained")
    with pytest.raises(BundleError, match="files lists no sha256 for scorer.onnx"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize("name", ["../outside.txt", "/tmp/outside.txt", "..", "sub/../../outside.txt"])
def test_files_of_the_manifest_stay_inside_the_bundle(bundle_copy, tmp_path, name):
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the bundle")
    edit_manifest(bundle_copy, lambda m: m["files"].update({name: sha256_file(outside)}))
    with pytest.raises(BundleError, match="expected a plain file name inside the bundle folder"):
        Bundle.load(bundle_copy)


def test_stray_files_beside_the_bundle_are_no_error(bundle_copy):
    (bundle_copy / "notes.txt").write_text("mine")
    assert Bundle.load(bundle_copy).name == "sensors"


def test_inspect_of_a_manifest_missing_a_shown_entry_is_one_line(capsys, bundle_copy):
    edit_manifest(bundle_copy, _drop("training", "epochs"))
    with pytest.raises(BundleError, match=r"bundle 'sensors': manifest.json is incomplete or malformed "
                                          r"\(KeyError: 'epochs'\)"):
        describe_manifest(Bundle.load(bundle_copy).manifest)
    assert main(["inspect", str(bundle_copy)]) == 1
    assert capsys.readouterr().err.startswith("error: bundle 'sensors'")
    assert main(["inspect", str(bundle_copy), "--json"]) == 0  # the raw manifest is still there to read


def test_inspect_shows_each_categorical_columns_unknown_share_in_training(bundle_copy):
    """Scoring warns on unseen values against training's share of them; inspect did not show it."""
    def shares(manifest):
        for i, entry in enumerate(manifest["preprocessing"]["categorical"]):
            entry["unknown_share"] = 0.034 if i == 0 else 0.0

    edit_manifest(bundle_copy, shares)
    categorical = Bundle.load(bundle_copy).manifest["preprocessing"]["categorical"]
    shown = describe_manifest(Bundle.load(bundle_copy).manifest).splitlines()
    names = [e["name"] for e in categorical]
    rows = [line for line in shown if line.strip().split(" ")[0] in names]
    assert [row.split()[0] for row in rows] == names and len(names) >= 2
    assert "unknown in training 3.4%" in rows[0]
    assert all("unknown in training 0.0%" in row for row in rows[1:])

    def unrecorded(manifest):  # a bundle exported before the share was recorded
        for entry in manifest["preprocessing"]["categorical"]:
            entry.pop("unknown_share")

    edit_manifest(bundle_copy, unrecorded)
    assert "unknown in training" not in describe_manifest(Bundle.load(bundle_copy).manifest)


def test_inspect_shows_each_numeric_columns_blank_share_in_training(bundle_copy):
    """Scoring warns on blank numeric columns against training's share of blanks; inspect did not show it."""
    numeric = Bundle.load(bundle_copy).manifest["preprocessing"]["numeric"]
    shown = describe_manifest(Bundle.load(bundle_copy).manifest).splitlines()
    rows = {line.split()[0]: line for line in shown if line.strip() and line.split()[0] in {e["name"] for e in numeric}}
    assert len(rows) == len(numeric) >= 2
    assert any(e["missing_share"] > 0 for e in numeric)  # the sensor table has blanks in some column
    for entry in numeric:
        assert f"blank in training {percent(entry['missing_share'])}" in rows[entry["name"]]

    def unrecorded(manifest):  # a bundle exported before the share was recorded
        for entry in manifest["preprocessing"]["numeric"]:
            entry.pop("missing_share")

    edit_manifest(bundle_copy, unrecorded)
    assert "blank in training" not in describe_manifest(Bundle.load(bundle_copy).manifest)


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


def test_a_signal_between_the_renames_of_a_publish_leaves_the_new_bundle_in_place(tmp_path, monkeypatch):
    """The old bundle was renamed aside, then the new one into place: Ctrl-C between them left no
    bundle at the target, and the old one hidden in .NAME.retired-*."""
    import os
    import signal

    from pipeline.bundle import publish_bundle
    from pipeline.signals import StoppedAfterCommit

    target, staging = tmp_path / "machines", tmp_path / ".machines.run"
    target.mkdir()
    (target / "manifest.json").write_text("old")
    staging.mkdir()
    (staging / "manifest.json").write_text("new")
    real_replace = os.replace

    def interrupted(source, destination):
        real_replace(source, destination)
        if ".retired-" in str(destination):  # the old bundle moved aside
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", interrupted)
    monkeypatch.setattr("pipeline.bundle.check_publish_target", lambda target: None)
    monkeypatch.setattr("pipeline.bundle.exchange", lambda first, second: False)  # where no swap in one step is
    with pytest.raises(StoppedAfterCommit):
        publish_bundle(staging, target)
    assert (target / "manifest.json").read_text() == "new"


def _link_to_a_copy_outside(bundle, name, outside):
    """``name`` in the bundle made a symbolic link to ``outside`` (holding the file's very bytes)."""
    shutil.copyfile(bundle / name, outside)
    (bundle / name).unlink()
    (bundle / name).symlink_to(outside)


@pytest.mark.parametrize("name", ["scorer.onnx", "calibration_rows.parquet"])
def test_a_named_file_that_is_a_symbolic_link_is_refused(capsys, bundle_copy, tmp_path, name):
    """Before: a link was followed out of the bundle: scorer.onnx linked to an identical file outside
    was accepted, and calibration_rows.parquet linked to /etc/passwd had the start of its sha256 printed."""
    _link_to_a_copy_outside(bundle_copy, name, tmp_path / "outside")
    message = f"{bundle_copy / name}: is a symbolic link; every file a bundle's manifest names must be a plain file"
    with pytest.raises(BundleError, match=re.escape(message)):
        Bundle.load(bundle_copy)
    (bundle_copy / name).unlink()
    (bundle_copy / name).symlink_to("/etc/passwd")
    assert main(["inspect", str(bundle_copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "sha256" not in err


def test_a_bundle_folder_that_is_a_symbolic_link_loads(bundle_copy, tmp_path):
    (tmp_path / "link").symlink_to(bundle_copy)
    assert Bundle.load(tmp_path / "link").manifest == Bundle.load(bundle_copy).manifest


def _with_a_variant(bundle):
    """An int8 entry whose file is a copy of scorer.onnx: enough for a load and for inspect."""
    shutil.copyfile(bundle / "scorer.onnx", bundle / "scorer.int8.onnx")

    def add(manifest):
        _add_variant(manifest)
        manifest["files"].pop("scorer.fp16.onnx")
        manifest["files"]["scorer.int8.onnx"] = sha256_file(bundle / "scorer.int8.onnx")
        shown = {"decision_agreement": 1.0, "decisions_differ": 0, "median_rel_score_error": 0.0, "speed_ratio": 1.0}
        manifest["variants"] = {"int8": dict(manifest["variants"]["fp16"], file="scorer.int8.onnx", **shown)}

    edit_manifest(bundle, add)


def _refuse_to_open(monkeypatch, refused: str) -> None:
    """Opening a file named ``refused`` fails as for a file of mode 000 (as root, chmod 000 does not
    bite), whichever way it is opened."""
    def refusing(real):
        def open_(path, *args, **kwargs):
            if not isinstance(path, int) and os.path.basename(os.fspath(path)) == refused:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)
        return open_

    for module in (os, io, builtins):
        monkeypatch.setattr(module, "open", refusing(module.open))


UNREADABLE = {
    "manifest.json": "manifest.json: cannot read it (Permission denied); make the bundle readable: chmod -R u+rX {b}",
    "encoder.onnx": "encoder.onnx: cannot read it (Permission denied); make the bundle readable: chmod -R u+rX {b}",
    # An unused variant: fp32 scoring does not use it, but the bundle's files are checked whole.
    "scorer.int8.onnx": "scorer.int8.onnx: cannot read it (Permission denied); make the bundle readable: chmod -R "
                        "u+rX {b}, or make it again with `vaeguard export {b} --precision int8`",
}


@pytest.mark.parametrize("name", UNREADABLE)
def test_an_unreadable_file_is_a_one_line_error_with_the_fix(capsys, monkeypatch, bundle_copy, tmp_path, name):
    """Before: `error: unexpected PermissionError: [Errno 13] ... (run with --verbose ...)`."""
    _with_a_variant(bundle_copy)
    _refuse_to_open(monkeypatch, name)
    code = main(["score", str(bundle_copy), str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err
    assert code == 1 and err == f"error: {bundle_copy / UNREADABLE[name].format(b=bundle_copy)}\n"


def test_a_files_name_too_long_for_a_file_name_is_a_one_line_error(capsys, bundle_copy, tmp_path):
    edit_manifest(bundle_copy, lambda m: m["files"].update({"x" * 300: "0" * 64}))
    with pytest.raises(BundleError, match=r"manifest\.json: files names a file of 300 characters, too long for a "
                                          r"file name here; re-export the bundle, or restore its manifest\.json$"):
        Bundle.load(bundle_copy)


def test_a_folder_or_a_pipe_in_a_files_place_says_what_it_is(bundle_copy):
    """Before: a folder was "missing; copy the whole bundle folder", and a FIFO made the load wait forever."""
    (bundle_copy / "decoder.onnx").unlink()
    (bundle_copy / "decoder.onnx").mkdir()
    with pytest.raises(BundleError, match=r"decoder\.onnx: is a folder, the manifest names a file of that name"):
        Bundle.load(bundle_copy)
    (bundle_copy / "decoder.onnx").rmdir()
    os.mkfifo(bundle_copy / "decoder.onnx")
    with pytest.raises(BundleError, match=r"decoder\.onnx: cannot read it \(not a regular file: a pipe, socket or "
                                          r"device\)"):
        Bundle.load(bundle_copy)


def _retrained(bundle, other):
    """``other``: a copy of ``bundle`` as a retrain would publish it, with other bytes in its files."""
    import onnx

    shutil.copytree(bundle, other)
    for name in ("encoder.onnx", "scorer.onnx"):
        model = onnx.load(str(other / name))
        model.doc_string = "retrained"
        onnx.save(model, str(other / name))
    edit_manifest(other, lambda m: m.update(version="retrained", files={**m["files"], **{
        name: sha256_file(other / name) for name in ("encoder.onnx", "scorer.onnx")}}))
    return other


def test_publishing_swaps_the_folders_in_one_step(bundle_copy, tmp_path, monkeypatch):
    """Before: the old bundle was renamed aside, then the new one into place: a nightly score in
    between found no bundle folder."""
    from pipeline.bundle import exchange, publish_bundle

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, name in ((first, "f"), (second, "s")):
        folder.mkdir()
        (folder / name).write_text(name)
    if not exchange(first, second):
        pytest.skip("this system or filesystem cannot exchange two paths in one step")
    assert [p.name for p in first.iterdir()] == ["s"] and [p.name for p in second.iterdir()] == ["f"]

    staging = _retrained(bundle_copy, tmp_path / ".copy.run-1")

    def no_rename(*args):
        raise AssertionError("a rename left a moment with no bundle at the target")

    monkeypatch.setattr(os, "replace", no_rename)
    monkeypatch.setattr(os, "rename", no_rename)
    publish_bundle(staging, bundle_copy)
    assert Bundle.load(bundle_copy).manifest["version"] == "retrained"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "first", "second"]  # the old one deleted


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_a_bundle_replaced_while_it_is_loaded_is_read_again(bundle_copy, tmp_path, monkeypatch, swap):
    """A retrain publishing between the manifest read and the files hashed: before, the new files
    failed the old manifest's hashes ("sha256 ... does not match"), a false alarm in a nightly score."""
    from pipeline import bundle as bundle_module

    staging = _retrained(bundle_copy, tmp_path / ".copy.run-1")
    if swap == "two renames":
        monkeypatch.setattr(bundle_module, "exchange", lambda first, second: False)
    real, pending = json.loads, [staging]

    def publish_after_the_manifest_is_read(*args, **kwargs):
        parsed = real(*args, **kwargs)
        if pending and isinstance(parsed, dict) and parsed.get("format") == "vaeguard-bundle":
            bundle_module.publish_bundle(pending.pop(), bundle_copy)
        return parsed

    monkeypatch.setattr(json, "loads", publish_after_the_manifest_is_read)
    loaded = Bundle.load(bundle_copy)
    assert not pending and loaded.manifest["version"] == "retrained"
    assert hashlib.sha256(loaded.scorer_bytes()).hexdigest() == loaded.manifest["files"]["scorer.onnx"]


def test_a_failure_where_nothing_changed_is_not_read_again(bundle_copy, monkeypatch):
    from pipeline import bundle as bundle_module

    with open(bundle_copy / "decoder.onnx", "ab") as handle:
        handle.write(b"\0")
    hashed, real = [], bundle_module.BundleFolder.hashed
    monkeypatch.setattr(bundle_module.BundleFolder, "hashed",
                        lambda self, name, keep=False: hashed.append(name) or real(self, name, keep))
    with pytest.raises(BundleError, match=r"decoder\.onnx: sha256 .* does not match the manifest"):
        Bundle.load(bundle_copy)
    assert hashed.count("decoder.onnx") == 1
