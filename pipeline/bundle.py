"""The bundle on disk: manifest.json beside encoder.onnx, decoder.onnx and scorer.onnx.

The manifest is the contract with other runtimes: schema, preprocessing statistics, model
config, threshold and calibration table, metrics, export verification, sha256 of every file
and library versions. Loading a bundle checks every hash, so a modified or half-copied bundle
fails loudly instead of scoring with the wrong model.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

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
SCORER_FILES = ("scorer.onnx", *VARIANT_FILES.values())
AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
# How often Bundle.load reads a bundle again that a retrain replaced while it was read.
LOAD_ATTEMPTS = 5
# The folder is opened without reading it (O_PATH): its files are opened relative to it by name.
FOLDER_FLAGS = os.O_DIRECTORY | getattr(os, "O_PATH", os.O_RDONLY)
# O_NONBLOCK: opening a FIFO put in a file's place must not wait for a writer; it is refused as
# not a regular file. O_NOFOLLOW: a named file that is a symbolic link is refused, never followed.
FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK
NAMED_FILE_FLAGS = FILE_FLAGS | os.O_NOFOLLOW


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remake_hint(directory: Path, name: str) -> str:
    """How to make a variant file again, for messages about one that is missing or unreadable."""
    return "".join(f", or make it again with `vaeguard export {directory} --precision {precision}`"
                   for precision, variant in VARIANT_FILES.items() if variant == name)


class BundleFolder:
    """A bundle folder opened once, its files opened relative to it by name (openat): one load
    reads one folder, even where a retrain swaps another one into its path meanwhile."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, FOLDER_FLAGS)
        except OSError as exc:
            raise self._unopened(exc) from exc
        try:
            info = os.fstat(self.fd)
            self.manifest_error: OSError | None = None
            try:
                with self.open(MANIFEST, FILE_FLAGS) as handle:
                    self.manifest_bytes: bytes | None = handle.read()
            except OSError as exc:
                self.manifest_bytes, self.manifest_error = None, exc
        except BaseException:
            os.close(self.fd)
            raise
        # What a retrain's swap changes: the folder at the path, and the manifest in it.
        self.identity = (info.st_dev, info.st_ino, self.manifest_bytes)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "BundleFolder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _unopened(self, exc: OSError) -> BundleError:
        path = self.path
        if exc.errno == errno.ENOENT:
            # A bundle moved or deleted under a nightly job: "not a bundle" sent the user to check a
            # folder that is not there.
            where = "" if path.parent.is_dir() else f" (nor does its folder {path.parent})"
            return BundleError(f"{path}: no such bundle folder{where}; pass the folder `vaeguard train` wrote "
                               f"(was it moved or deleted?)")
        if exc.errno == errno.ENOTDIR:
            if path.is_file() and (path.parent / MANIFEST).is_file():
                # A file of a bundle (its scorer.onnx, its manifest) named instead of the bundle's folder.
                return BundleError(f"{path}: is a file of bundle folder {path.parent}; pass the folder itself")
            return BundleError(f"{path}: not a bundle (no {MANIFEST}); pass a folder written by `vaeguard train`")
        return BundleError(f"{path}: cannot open the bundle folder ({exc.strerror or exc}); make it readable: "
                           f"chmod -R u+rX {path}")

    def open(self, name: str, flags: int = NAMED_FILE_FLAGS) -> BinaryIO:
        """A regular file of the folder, open for reading; OSError as os.open raises it, EISDIR for
        a folder and EINVAL for a FIFO or device in its place."""
        descriptor = os.open(name, flags, dir_fd=self.fd)
        try:
            mode = os.fstat(descriptor).st_mode
            if stat.S_ISDIR(mode):
                raise OSError(errno.EISDIR, "is a folder")
            if not stat.S_ISREG(mode):
                raise OSError(errno.EINVAL, "not a regular file: a pipe, socket or device")
            return os.fdopen(descriptor, "rb")
        except BaseException:
            os.close(descriptor)
            raise

    def hashed(self, name: str, keep: bool = False) -> tuple[str, bytes | None]:
        """The sha256 of a file the manifest names, and its bytes where ``keep``; a link or a folder
        in its place is refused, never followed. Unkept files are hashed in blocks, not held (an
        image bundle's calibration inputs can be large)."""
        try:
            with self.open(name) as handle:
                if keep:
                    contents = handle.read()
                    return hashlib.sha256(contents).hexdigest(), contents
                return hashlib.file_digest(handle, "sha256").hexdigest(), None
        except OSError as exc:
            raise self.unreadable(name, exc) from exc

    def unreadable(self, name: str, exc: OSError) -> BundleError:
        """A file the manifest names, unreadable, in one line: what it is, and how to fix it."""
        path, file_path, again = self.path, self.path / name, remake_hint(self.path, name)
        if exc.errno == errno.ENOENT:
            return BundleError(f"{path}: {name} is missing; copy the whole bundle folder{again}")
        if exc.errno == errno.ELOOP:
            return BundleError(f"{file_path}: is a symbolic link; every file a bundle's manifest names must be a "
                               f"plain file inside the bundle folder, and a link is never followed: put a copy of "
                               f"the file itself there (`cp -rL` copies a bundle with links resolved){again}")
        if exc.errno == errno.EISDIR:
            return BundleError(f"{file_path}: is a folder, the manifest names a file of that name; copy the whole "
                               f"bundle folder again{again}")
        if exc.errno == errno.ENAMETOOLONG:
            return BundleError(f"{path / MANIFEST}: files names a file of {len(name)} characters, too long for a file "
                               f"name here; re-export the bundle, or restore its manifest.json")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return BundleError(f"{file_path}: cannot read it ({exc.strerror}); make the bundle readable: "
                               f"chmod -R u+rX {path}{again}")
        return BundleError(f"{file_path}: cannot read it ({exc.strerror or exc}); copy the whole bundle folder "
                           f"again{again}")


def folder_identity(path: Path) -> tuple | None:
    """BundleFolder.identity of the folder at ``path`` now; None where none can be opened."""
    try:
        with BundleFolder(path) as folder:
            return folder.identity
    except BundleError:
        return None


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
    # File name -> bytes of the scorers load hash-checked (see scorer_bytes).
    scorers: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

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

    def scorer_bytes(self, precision: str = "fp32") -> bytes:
        """The scorer's file as load read and hash-checked it. A session is built from these bytes,
        not by opening the path again, which a retrain may have given another bundle's scorer since."""
        return self.scorers[self.scorer_path_for(precision).name]

    @contextlib.contextmanager
    def open_checked(self, name: str) -> Iterator[BinaryIO]:
        """A file of the bundle, open at its start, which must still be the one load hash-checked: a
        retrain may have replaced the bundle since. What is read from it is what was hashed."""
        with BundleFolder(self.path) as folder:
            try:
                handle = folder.open(name)
            except OSError as exc:
                raise folder.unreadable(name, exc) from exc
        with handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != self.manifest["files"][name]:
                raise BundleError(f"{self.path / name}: changed since bundle {self.name!r} was loaded (its sha256 is "
                                  f"no longer the manifest's): was the bundle replaced meanwhile, by a retrain? run "
                                  f"the command again")
            handle.seek(0)
            yield handle

    @classmethod
    def load(cls, path: str | Path, replacing: str | None = None) -> "Bundle":
        """``replacing``: a variant file the caller is about to make again (`vaeguard export`), left
        unchecked so that a deleted or damaged variant can be re-exported instead of blocking it.

        A retrain publishing while the bundle is read swaps the folder (publish_bundle), and an export
        rewrites the manifest: a check that fails while the folder or its manifest changed under it
        is that moment's, not the bundle's, so the bundle is read again (the one now there)."""
        path, attempts = Path(path), 1
        while True:
            seen = None
            try:
                with BundleFolder(path) as folder:
                    seen = folder.identity
                    return cls._read(folder, replacing)
            except BundleError:
                if attempts == LOAD_ATTEMPTS or folder_identity(path) == seen:
                    raise
                attempts += 1

    @classmethod
    def _read(cls, folder: BundleFolder, replacing: str | None) -> "Bundle":
        path, manifest_path = folder.path, folder.path / MANIFEST
        if folder.manifest_bytes is None:
            exc = folder.manifest_error
            if exc.errno in (errno.ENOENT, errno.EISDIR):
                raise BundleError(f"{path}: not a bundle (no {MANIFEST}); pass a folder written by `vaeguard train`")
            fix = (f"make the bundle readable: chmod -R u+rX {path}" if exc.errno in (errno.EACCES, errno.EPERM)
                   else "copy the whole bundle folder again")
            raise BundleError(f"{manifest_path}: cannot read it ({exc.strerror or exc}); {fix}")
        try:
            manifest = json.loads(folder.manifest_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # a binary file is not JSON either
            raise BundleError(f"{manifest_path}: not valid JSON ({exc}); re-export the bundle") from exc
        if not isinstance(manifest, dict):
            raise BundleError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}; "
                              f"re-export the bundle")
        check_format(manifest, manifest_path)
        check_manifest(manifest, manifest_path)
        scorers = {}
        for name, expected in manifest["files"].items():
            if name == replacing and name in VARIANT_FILES.values():
                continue
            actual, contents = folder.hashed(name, keep=name in SCORER_FILES)
            if actual != expected:
                raise BundleError(
                    f"{path / name}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; "
                    f"the file was modified or corrupted: re-export or re-copy the bundle"
                )
            if contents is not None:
                scorers[name] = contents
        return cls(path, manifest, scorers)


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


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE), so that a reader of
    either always finds something there; False where the system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28 has no wrapper for it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL):  # a kernel before 3.15, a filesystem without it
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def publish_bundle(staging: Path, target: Path) -> None:
    """Move a finished bundle into place; whatever was at ``target`` stays until the swap.

    ``staging`` must sit on the same filesystem as ``target`` (the training run works inside
    the output folder for that reason). The two folders are exchanged in one step where the
    system can (Linux), so a nightly score never finds no bundle there; elsewhere the old one
    is renamed aside and the new one into place, each rename atomic, and a score that reads the
    bundle across them fails only if it looks again within the moment between the two.
    """
    check_publish_target(target)  # again: something may have appeared there while training ran
    retired = target.parent / f".{target.name}.retired-{uuid.uuid4().hex[:8]}"
    # A signal between the two renames left no bundle at ``target`` and the old one hidden aside.
    with signals_held():
        if target.exists() and exchange(staging, target):
            retired = staging  # which now holds the old bundle
        else:
            if target.exists():
                os.replace(target, retired)
            os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
