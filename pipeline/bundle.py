"""The bundle on disk: manifest.json beside encoder.onnx, decoder.onnx and scorer.onnx.

The manifest is the contract with other runtimes: schema, preprocessing statistics, model
config, threshold and calibration table, metrics, export verification, sha256 of every file
and library versions. Loading a bundle checks every hash, so a modified or half-copied bundle
fails loudly instead of scoring with the wrong model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pipeline.calibrate import Calibration
from pipeline.errors import BundleError, ConfigError, one_line
from pipeline.outputs import file_above, write_atomic
from pipeline.signals import signals_held
from pipeline.preprocess import Preprocessor
from pipeline.schema import TableSchema

FORMAT = "vaeguard-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILES = ("encoder.onnx", "decoder.onnx", "scorer.onnx")
# The calibration inputs as the scorer takes them (tables: the raw rows; images: the float32
# array), kept so a reduced-precision variant can be recalibrated on its own scores later.
CALIBRATION_ROWS = "calibration_rows.parquet"
CALIBRATION_IMAGES = "calibration_images.npy"
CALIBRATION_FILES = (CALIBRATION_ROWS, CALIBRATION_IMAGES)
# Reduced-precision scorers that `vaeguard export BUNDLE --precision P` adds (pipeline.precision).
PRECISIONS = ("fp32", "fp16", "int8")
VARIANT_FILES = {"fp16": "scorer.fp16.onnx", "int8": "scorer.int8.onnx"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("vaeguard", "torch", "onnx", "onnxruntime-gpu", "onnxruntime", "numpy", "pandas", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(directory: Path, manifest: dict) -> Path:
    """Atomically: a published bundle's manifest is rewritten in place when a variant is added."""
    path = directory / MANIFEST
    write_atomic(path, json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return path


def write_new_manifest(directory: Path, manifest: dict) -> None:
    """A freshly exported bundle's manifest: adds the file hashes and library versions, with
    verification still to come (the verify step fills it in before publishing)."""
    names = MODEL_FILES + tuple(name for name in CALIBRATION_FILES if (directory / name).is_file())
    manifest |= {"verification": None,
                 "files": {name: sha256_file(directory / name) for name in names},
                 "versions": library_versions()}
    write_manifest(directory, manifest)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def schema(self) -> TableSchema:
        return TableSchema.from_dict(self.manifest["schema"])

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor.from_dict(self.manifest["preprocessing"])

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_dict(self.manifest["calibration"])

    @property
    def scorer_path(self) -> Path:
        return self.path / "scorer.onnx"

    def scorer_path_for(self, precision: str = "fp32") -> Path:
        """scorer.onnx for fp32, else the variant `vaeguard export --precision` added."""
        if precision not in PRECISIONS:
            raise BundleError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision == "fp32":
            return self.scorer_path
        name = VARIANT_FILES[precision]
        if name not in self.manifest.get("files", {}) or precision not in self.manifest.get("variants", {}):
            raise BundleError(f"{self.path}: bundle {self.name!r} has no {precision} scorer ({name}); "
                              f"add it with `vaeguard export {self.path} --precision {precision}`")
        return self.path / name

    def calibration_for(self, precision: str = "fp32") -> dict:
        """The manifest's calibration section of a scorer: each variant has its own threshold."""
        self.scorer_path_for(precision)
        if precision == "fp32":
            return self.manifest["calibration"]
        return self.manifest["variants"][precision]["calibration"]

    @classmethod
    def load(cls, path: str | Path, replacing: str | None = None) -> "Bundle":
        """``replacing``: a variant file the caller is about to make again (`vaeguard export`), left
        unchecked so that a deleted or damaged variant can be re-exported instead of blocking it."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if path.is_file() and (path.parent / MANIFEST).is_file():
            # A file of a bundle (its scorer.onnx, its manifest) named instead of the bundle's folder.
            raise BundleError(f"{path}: is a file of bundle folder {path.parent}; pass the folder itself")
        if not path.exists():
            # A bundle moved or deleted under a nightly job: "not a bundle" sent the user to check a
            # folder that is not there.
            where = "" if path.parent.is_dir() else f" (nor does its folder {path.parent})"
            raise BundleError(f"{path}: no such bundle folder{where}; pass the folder `vaeguard train` wrote "
                              f"(was it moved or deleted?)")
        if not manifest_path.is_file():
            raise BundleError(f"{path}: not a bundle (no {MANIFEST}); pass a folder written by `vaeguard train`")
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # a binary file is not JSON either
            raise BundleError(f"{manifest_path}: not valid JSON ({exc}); re-export the bundle") from exc
        if not isinstance(manifest, dict):
            raise BundleError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}; "
                              f"re-export the bundle")
        check_format(manifest, manifest_path)
        check_manifest(manifest, manifest_path)
        for name, expected in manifest["files"].items():
            if name == replacing and name in VARIANT_FILES.values():
                continue
            file_path = path / name
            if not file_path.is_file():
                again = "".join(f", or make it again with `vaeguard export {path} --precision {precision}`"
                                for precision, variant in VARIANT_FILES.items() if variant == name)
                raise BundleError(f"{path}: {name} is missing; copy the whole bundle folder{again}")
            actual = sha256_file(file_path)
            if actual != expected:
                raise BundleError(
                    f"{file_path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; "
                    f"the file was modified or corrupted: re-export or re-copy the bundle"
                )
        return cls(path, manifest)


def check_format(manifest: dict, manifest_path: Path) -> None:
    found, version = manifest.get("format"), manifest.get("format_version")
    if found == FORMAT and isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: bundle format v{version} was written by a newer vaeguard, this one "
                          f"reads v{FORMAT_VERSION}; upgrade vaeguard, or re-export the bundle with this version")
    if found != FORMAT or version != FORMAT_VERSION or isinstance(version, bool):
        raise BundleError(f"{manifest_path}: expected format {FORMAT} v{FORMAT_VERSION}, got format {found!r} "
                          f"version {version!r}; re-export with this version")


# Top-level entries every bundle of this format has, by modality, with their JSON types.
REQUIRED = {"name": str, "version": str, "created_at": str, "source": dict, "model": dict, "score": dict,
            "training": dict, "calibration": dict, "metrics": dict, "config": dict, "onnx": dict, "files": dict,
            "versions": dict}
REQUIRED_BY_MODALITY = {"table": {"schema": dict, "preprocessing": dict}, "image": {"image": dict}}
SHA256_DIGITS = set("0123456789abcdef")


def check_manifest(manifest: dict, manifest_path: Path) -> None:
    """The manifest holds what every reader of it relies on, before any of it is used: a
    hand-edited or half-written one fails here, in one line, instead of deep inside scoring."""
    def fail(what: str) -> None:
        raise BundleError(f"{manifest_path}: {what}; re-export the bundle, or restore its manifest.json")

    modality = manifest.get("modality", "table")
    if modality not in REQUIRED_BY_MODALITY:
        fail(f"modality must be one of {', '.join(REQUIRED_BY_MODALITY)}, got {modality!r}")
    for key, kind in (REQUIRED | REQUIRED_BY_MODALITY[modality]).items():
        if key not in manifest:
            fail(f"no {key!r} entry")
        if not isinstance(manifest[key], kind):
            fail(f"{key!r} must be a JSON {'object' if kind is dict else 'string'}, "
                 f"got {type(manifest[key]).__name__}")
    files = manifest["files"]
    for name, digest in files.items():
        # Plain names only: a path would make the hash check read (and trust) a file outside the bundle.
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            fail(f"files names {name!r}, expected a plain file name inside the bundle folder")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= SHA256_DIGITS):
            fail(f"files[{name!r}] must be a sha256 hex digest, got {digest!r}")
    # Every model file must be hash-checked: one left out of the list would be loaded unchecked.
    unlisted = [name for name in MODEL_FILES if name not in files]
    if unlisted:
        fail(f"files lists no sha256 for {', '.join(unlisted)}")
    sections = [("calibration", manifest["calibration"], Calibration.from_dict)]
    if modality == "table":
        sections += [("schema", manifest["schema"], TableSchema.from_dict),
                     ("preprocessing", manifest["preprocessing"], Preprocessor.from_dict)]
    variants = manifest.get("variants", {})
    if not isinstance(variants, dict):
        fail(f"'variants' must be a JSON object, got {type(variants).__name__}")
    for precision, entry in variants.items():
        if precision not in VARIANT_FILES or not isinstance(entry, dict) or entry.get("file") != VARIANT_FILES[precision]:
            fail(f"variants[{precision!r}] is not a {'/'.join(VARIANT_FILES)} scorer entry naming its file")
        if entry["file"] not in files:
            fail(f"variants[{precision!r}] names {entry['file']}, which files lists no sha256 for")
        # Shown by `score --precision` and `inspect`: a string warning was printed a letter a line.
        warnings = entry.get("warnings", [])
        if not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
            fail(f"variants[{precision!r}].warnings must be a JSON list of strings, got {warnings!r}")
        if not isinstance(entry.get("device"), str):
            fail(f"variants[{precision!r}].device must be the device it was checked on (cpu or cuda), "
                 f"got {entry.get('device')!r}")
        sections.append((f"variants[{precision!r}].calibration", entry.get("calibration"), Calibration.from_dict))
    for key, raw, parse in sections:
        try:
            parse(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            fail(f"{key} is incomplete or malformed ({type(exc).__name__}: {one_line(exc)})")


@contextlib.contextmanager
def bundle_lock(directory: Path):
    """An exclusive lock on a bundle folder, for rewriting its manifest: two exports adding
    variants at once would otherwise each write the manifest they read, and one variant would be
    dropped from it. flock on the folder itself, so the bundle gets no lock file."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def check_publish_target(target: Path) -> None:
    """Fail unless ``target`` (OUT/NAME) is free or holds a bundle that retraining may replace.

    Publishing swaps out whatever is at ``target`` and deletes it, so anything else there (a
    folder of the user's files, a plain file) must be refused, and before any training work.
    """
    out = target.parent
    # The nearest part of --out that exists must be a folder (--out itself, or a parent of a new one).
    blocking = out if out.exists() and not out.is_dir() else file_above(out)
    if blocking is not None:
        what = "is a file" if blocking == out else f"is inside {blocking}, which is a file"
        raise ConfigError(f"--out {out} {what}; expected a folder to write bundles into: pass a folder path "
                          f"(it is created if missing)")
    if target.is_symlink() or (target.exists() and not (target / MANIFEST).is_file()):
        # A symlink too: the swap would rename the link, not what it points at, and leave it behind.
        what = ("a symbolic link" if target.is_symlink() else
                "a folder that is not a vaeguard bundle (no manifest.json)" if target.is_dir() else "a file")
        raise ConfigError(f"{target} exists and is {what}; training would replace it: pick another --name "
                          f"or --out, or move it away")


def publish_bundle(staging: Path, target: Path) -> None:
    """Move a finished bundle into place; whatever was at ``target`` stays until the swap.

    ``staging`` must sit on the same filesystem as ``target`` (the training run works inside
    the output folder for that reason), so both renames are atomic.
    """
    check_publish_target(target)  # again: something may have appeared there while training ran
    retired = target.parent / f".{target.name}.retired-{uuid.uuid4().hex[:8]}"
    # A signal between the two renames left no bundle at ``target`` and the old one hidden aside.
    with signals_held():
        if target.exists():
            os.replace(target, retired)
        os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
