"""The bundle on disk: manifest.json beside encoder.onnx, decoder.onnx and scorer.onnx.

The manifest is the contract with other runtimes: schema, preprocessing statistics, model
config, threshold and calibration table, metrics, export verification, sha256 of every file
and library versions. Loading a bundle checks every hash, so a modified or half-copied bundle
fails loudly instead of scoring with the wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pipeline.calibrate import Calibration
from pipeline.errors import BundleError, ConfigError
from pipeline.outputs import file_above, write_atomic
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
    def load(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{path}: not a bundle (no {MANIFEST}); pass a folder written by `vaeguard train`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"{manifest_path}: not valid JSON ({exc}); re-export the bundle") from exc
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{manifest_path}: expected format {FORMAT} v{FORMAT_VERSION}, got "
                f"{manifest.get('format')} v{manifest.get('format_version')}; re-export with this version"
            )
        for name, expected in manifest["files"].items():
            file_path = path / name
            if not file_path.is_file():
                raise BundleError(f"{path}: {name} is missing; copy the whole bundle folder")
            actual = sha256_file(file_path)
            if actual != expected:
                raise BundleError(
                    f"{file_path}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; "
                    f"the file was modified or corrupted: re-export or re-copy the bundle"
                )
        return cls(path, manifest)


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
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
