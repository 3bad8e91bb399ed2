"""Finding, reading and preprocessing images, identically at training and at scoring time.

Every image, whether it comes from a file or from a row of a .npy array, goes through the same
PIL steps: convert to the spec's mode ("L" or "RGB"), resize to a square with bilinear
filtering, divide by 255. A model therefore sees the same numbers for the same pixels whatever
the source, the original size or the original mode.

A single unreadable image never stops a run: it is reported as (item, reason) and skipped, so
one corrupt upload cannot block scoring of a whole folder. Problems with the input as a whole
(a missing folder, a folder without images, a CSV without its path column, an array of the
wrong shape) raise, because no result could be right.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.errors import ConfigError, DataError, InputFileError, one_line
from pipeline.outputs import text_path  # noqa: F401  (also imported from here)
from pipeline.tables import SUPPORTED_SUFFIXES

log = logging.getLogger("vaeguard")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

_MODES = {1: "L", 3: "RGB"}
# Recorded in bundles so a scorer can check it preprocesses as training did; from_dict rejects
# other values rather than silently preprocessing differently.
_RESIZE = "bilinear"
_SCALE = "x / 255"
_LAYOUT = "NCHW float32 in [0, 1]"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class ImageSpec:
    """How images are turned into model input: a square side and a channel count."""

    size: int = 64  # square side after resizing
    channels: int = 1  # 1 = grayscale ("L"), 3 = RGB

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"image size must be a positive integer, got {self.size!r}; "
                              f"set the image size to e.g. 64")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels not in _MODES:
            raise ConfigError(f"image channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")

    @property
    def mode(self) -> str:
        return _MODES[self.channels]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def to_dict(self) -> dict:
        return {"size": self.size, "channels": self.channels, "mode": self.mode,
                "resize": _RESIZE, "scale": _SCALE, "layout": _LAYOUT}

    @classmethod
    def from_dict(cls, raw) -> "ImageSpec":
        if not isinstance(raw, dict):
            raise ConfigError(f"image spec must be a mapping with 'size' and 'channels', got {type(raw).__name__}")
        spec = cls(size=raw.get("size", cls.size), channels=raw.get("channels", cls.channels))
        expected = spec.to_dict()
        for key in ("mode", "resize", "scale", "layout"):
            if key in raw and raw[key] != expected[key]:
                raise ConfigError(
                    f"image spec {key!r} is {raw[key]!r} but this version preprocesses with {expected[key]!r} "
                    f"for {spec.channels} channel(s); retrain the bundle with this version or use the one that made it"
                )
        return spec


@dataclass(frozen=True)
class ImageSource:
    """Where images come from: a folder (recursive), a CSV with a path column, or a .npy array."""

    items: list[str]  # folder/CSV: file paths (sorted for folders, file order for CSV); .npy: "file.npy[i]"
    kind: str  # "folder", "csv" or "npy"
    origin: Path  # the folder, CSV or .npy file that was listed
    layout: str | None = None  # .npy only: "NHW", "NHWC" or "NCHW"

    def __len__(self) -> int:
        return len(self.items)

    def relative(self, item: str) -> str:
        """An item's name relative to the listed folder (shorter, for reports and map names)."""
        if self.kind == "folder":
            try:
                return Path(item).relative_to(self.origin).as_posix()
            except ValueError:
                return item
        if self.kind == "npy":
            return f"{self.origin.name}{item[len(str(self.origin)):]}"
        return item


@dataclass
class ImageNotes:
    """Warnings about images that were read and used, not skipped, gathered over a run.

    Each image's warning is one line naming it; a run logs one line per kind of warning, the
    first image's line when only one has it, else a count with an example (every image with
    --verbose), so a folder of thousands of camera JPEGs with broken EXIF is not thousands of lines.
    """

    found: dict[str, list[str]] = field(default_factory=dict)  # kind (a key of _NOTE_KINDS) -> lines

    def add(self, kind: str, line: str) -> None:
        self.found.setdefault(kind, []).append(line)

    def log(self, where: str) -> None:
        """Log what was gathered for the input ``where`` and forget it."""
        for kind, lines in self.found.items():
            if len(lines) == 1:
                log.warning("%s", lines[0])
                continue
            for line in lines:
                log.debug("%s", line)
            log.warning("%s: %s images %s (each with --verbose), e.g. %s", where, f"{len(lines):,}", _NOTE_KINDS[kind],
                        lines[0])
        self.found.clear()


_NOTE_KINDS = {"pixels": "over Pillow's pixel limit", "exif": "with corrupt EXIF data",
               "pillow": "that Pillow warned about"}


def is_image_input(path: Path, path_column: str = "path") -> bool:
    """True for a directory, a .npy file, or a .csv whose header has a ``path_column`` column."""
    path = Path(path)
    if path.is_dir():
        return True
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return True
    if suffix == ".csv" and path.is_file():
        return path_column in _csv_header(path)
    return False


def list_images(path: Path, path_column: str = "path") -> ImageSource:
    """List the images of a folder (recursively), of a CSV's path column, or of a .npy array."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: not found; expected a folder of images, a .csv with a "
                             f"{path_column!r} column or a .npy array; check the path")
    if path.is_dir():
        return _list_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _list_csv(path, path_column)
    if suffix == ".npy":
        return _list_npy(path)
    raise InputFileError(
        f"{path}: unsupported image input {suffix or '(no suffix)'!r}; expected a folder of images, "
        f"a .csv with a {path_column!r} column or a .npy array; put single images in a folder"
    )


def searched_by(folder: Path, path: Path) -> bool:
    """True when listing ``folder`` would look inside ``path`` (an existing one or one to come):
    it lies within the folder, links resolved, and under no hidden folder, which listing skips."""
    root, target = os.path.realpath(folder), os.path.realpath(path)
    if not os.path.isdir(root) or os.path.commonpath([root, target]) != root:
        return False
    return not any(part.startswith(".") for part in Path(os.path.relpath(target, root)).parts)


def _tables_not_images(folder: Path, example: Path, count: int) -> str:
    """What to do with a folder of table files (a table written in parts) given where images are
    read: said for `train` and `score` alike, since both list a folder this way. The join is a
    command to run as it is, for the kind of file found."""
    suffix = next(s for s in SUPPORTED_SUFFIXES[::-1] if example.name.lower().endswith(s))  # .csv.gz before .csv
    suffix = example.name[-len(suffix):]  # as written: the glob below tells case apart
    kind = "parquet" if suffix.lower() in (".parquet", ".pq") else "csv"
    write = "to_parquet('{}.parquet')" if kind == "parquet" else "to_csv('{}.csv', index=False)"
    join = (f"python -c \"import glob, pandas as pd; pd.concat(map(pd.read_{kind}, sorted(glob.glob("
            f"{str(folder / '**' / ('*' + suffix))!r}, recursive=True)))).{write.format(folder.name or 'all')}\"")
    return (f"no PNG, JPEG or BMP images in {folder}, but {count:,} table file(s) such as {example}: a table is read "
            f"from a file, not a folder; `vaeguard train` takes one file (join the parts: {join}) and `vaeguard "
            f"score` takes the files themselves ({folder / ('*' + suffix)}) with a bundle trained on a table; for "
            f"images, pass a folder of them")


def _list_folder(folder: Path) -> ImageSource:
    found: list[Path] = []
    tables: list[Path] = []  # said when no image is found: a partitioned table is a folder too
    # Linked folders are followed (data sets are often assembled from links), each real folder
    # once, so a link back up the tree cannot loop.
    seen = {os.path.realpath(folder)}

    def unlistable(error: OSError) -> None:
        # os.walk skips a folder it cannot list, silently: its images would be missing from the results.
        raise InputFileError(f"{error.filename}: could not be listed ({error.strerror or one_line(error)}), so its "
                             f"images would be left out; fix its permissions, or move it out of {folder}") from error

    for root, dirs, files in os.walk(folder, onerror=unlistable, followlinks=True):
        # Hidden folders hold tool state (.git, .ipynb_checkpoints), hidden files are OS
        # droppings (._x.png from macOS looks like an image but is not one).
        kept = []
        for name in sorted(dirs):  # sorted, so which of two links to one folder wins never varies
            real = os.path.realpath(os.path.join(root, name))
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
        found.extend(Path(root) / name for name in files
                     if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES))
        tables.extend(Path(root) / name for name in files
                      if not name.startswith(".") and name.lower().endswith(SUPPORTED_SUFFIXES))
    if not found and tables:
        raise InputFileError(_tables_not_images(folder, min(tables), len(tables)))
    if not found:
        raise InputFileError(f"no PNG, JPEG or BMP images in {folder} (searched recursively); "
                             f"expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    # Sorting by path parts keeps a folder's files together and is the same on every machine,
    # so training splits and output rows do not depend on directory listing order.
    return ImageSource(items=[str(p) for p in sorted(found)], kind="folder", origin=folder)


def _csv_header(path: Path) -> list[str]:
    # Only the first line: deciding whether a CSV lists images must not parse a large table.
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError):
        return []
    rows = list(csv.reader(io.StringIO(first)))
    return rows[0] if rows else []


def _check_path_column(path: Path, header: list[str], path_column: str) -> int:
    if path_column not in header:
        # Most often a table given to an image bundle: say how images read a CSV, and show enough of
        # its header to recognise it (the first ten names only said neither).
        shown = ", ".join(map(repr, header[:10])) + (f", ... ({len(header)} in all)" if len(header) > 10 else "")
        raise DataError(f"{path}: no {path_column!r} column (columns: {shown}); images are read from a CSV as a "
                        f"list of image paths: add a column named {path_column!r} with one image path per row, "
                        f"or score a table with a bundle trained on tables")
    if header.count(path_column) > 1:
        raise DataError(f"{path}: the header names {path_column!r} {header.count(path_column)} times; "
                        f"keep one column of image paths with that name")
    return header.index(path_column)


def _list_csv(path: Path, path_column: str) -> ImageSource:
    values: list[str] = []
    lines: list[int] = []
    started = 2  # the line the row being read starts on (a quoted path may span lines)
    # The csv module, not pandas: pandas reads a row with one field too many (a comma in an
    # unquoted path, a trailing comma) as an index column and silently takes the wrong field as
    # the path; here such a row is an error that names its line.
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, strict=True)
            header = next(reader, [])
            column = _check_path_column(path, header, path_column)
            for row in reader:
                if not row:  # a blank line, skipped as by every CSV reader
                    started = reader.line_num + 1
                    continue
                if len(row) > len(header):
                    raise DataError(f"{path}: line {started} has {len(row)} fields but the header has "
                                    f"{len(header)}; quote paths that contain commas, or fix the row")
                values.append(row[column] if column < len(row) else "")
                lines.append(started)
                started = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}: not a valid CSV from line {started}: {one_line(exc)}; "
                        f"check the quotes on that line") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({one_line(exc)}); save the CSV as UTF-8") from exc
    if not values:
        raise DataError(f"{path}: the {path_column!r} column has no rows; expected one image path per row")
    blank = [i for i, v in enumerate(values) if not v.strip()]
    if blank:
        raise DataError(f"{path}: column {path_column!r} is empty in row {blank[0] + 1} "
                        f"(line {lines[blank[0]]}); fill in an image path or remove the row")
    # Relative paths mean "next to the CSV", so a folder with its index can be moved as a whole.
    items = [v if Path(v).is_absolute() else str(path.parent / v) for v in values]
    return ImageSource(items=items, kind="csv", origin=path)


def _list_npy(path: Path) -> ImageSource:
    array = _open_npy(path)
    shape = array.shape
    if array.ndim == 3:
        layout = "NHW"
    elif array.ndim == 4 and shape[3] in (1, 3):
        layout = "NHWC"
    elif array.ndim == 4 and shape[1] in (1, 3):
        layout = "NCHW"
    else:
        raise DataError(f"{path}: array of shape {shape} is not a stack of images; expected (N, H, W), "
                        f"(N, H, W, C) or (N, C, H, W) with C = 1 or 3")
    if array.dtype.kind not in "uif":
        raise DataError(f"{path}: array of dtype {array.dtype} is not pixel data; {_PIXEL_DTYPES}")
    if shape[0] == 0:
        raise DataError(f"{path}: the array holds no images (shape {shape}); expected at least one")
    # Zero-sized images would load as all-black ones (PIL resizes nothing to zeros), not fail.
    if 0 in shape[1:]:
        raise DataError(f"{path}: array of shape {shape} holds images with no pixels (a side of 0); "
                        f"expected images at least 1 pixel wide and high")
    return ImageSource(items=[f"{path}[{i}]" for i in range(shape[0])], kind="npy", origin=path, layout=layout)


_PIXEL_DTYPES = "save uint8 values in 0..255 or floats in 0..1 (any integer or float dtype, in those ranges)"


def _open_npy(path: Path) -> np.ndarray:
    # Memory-mapped so a large array is read one batch at a time, not whole.
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        # numpy.save writes arrays of Python objects too (pickled), which cannot be memory-mapped;
        # "save it with numpy.save" would then be no help to someone who did.
        dtype = _npy_dtype(path)
        if dtype is not None and dtype.hasobject:
            # Most often images of different sizes put in one array, which numpy can only hold as objects.
            raise DataError(f"{path}: holds Python objects (dtype {dtype}), not pixel values; {_PIXEL_DTYPES}; "
                            f"images of different sizes can't make one such array: save them as image files in a "
                            f"folder, or resize them to one size and numpy.stack them") from exc
        raise InputFileError(f"{path}: could not be read as a .npy array: {one_line(exc)}; "
                             f"save it with numpy.save") from exc


def _npy_dtype(path: Path) -> np.dtype | None:
    """The dtype a .npy file's header declares, or None where the header can't be read."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return read(handle)[2]
    except (ValueError, OSError, EOFError):
        return None


def load_images(source: ImageSource, spec: ImageSpec, start: int = 0, stop: int | None = None,
                notes: ImageNotes | None = None) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Load ``source.items[start:stop]`` as float32 [n_ok, channels, size, size] in [0, 1].

    Returns the images, the names of the items that loaded, and (item, reason) for those that
    did not; those are skipped, never raised. Other sizes or modes than the spec's are
    converted, never an error. Warnings about images that loaded go to ``notes`` for the caller
    to log once for a whole run; without it they are logged for these items before returning.
    """
    # A truncated image must be reported, not padded with grey: that flag makes PIL hide it.
    # This module never sets it; refuse to run if other code in the process did.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ConfigError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code in this process), "
                          "so truncated images would load half grey instead of being reported; set it to False")
    items = source.items[start:stop]
    out = np.empty((len(items), *spec.shape), dtype=np.float32)
    ok: list[str] = []
    errors: list[tuple[str, str]] = []
    own_notes = notes is None
    notes = ImageNotes() if notes is None else notes
    if source.kind == "npy":
        pictures = _npy_pictures(source, start, stop)
    else:
        pictures = (_read_file(item, notes) for item in items)
    for item, picture in zip(items, pictures):
        if isinstance(picture, str):
            errors.append((item, picture))
            continue
        out[len(ok)] = _to_array(picture, spec)
        ok.append(item)
    if own_notes:
        notes.log(text_path(str(source.origin)))
    return out[:len(ok)], ok, errors


def iter_image_batches(source: ImageSource, spec: ImageSpec, batch_size: int, notes: ImageNotes | None = None
                       ) -> Iterator[tuple[np.ndarray, list[str], list[tuple[str, str]]]]:
    """``load_images`` over consecutive slices of ``batch_size`` items, so memory stays bounded.

    A batch holds at most ``batch_size`` images, fewer where items were skipped (possibly none).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"image batch size must be a positive integer, got {batch_size!r}")
    for start in range(0, len(source.items), batch_size):
        yield load_images(source, spec, start, start + batch_size, notes)


def write_errors(errors: list[tuple[str, str]], path: Path) -> None:
    """Write skipped items as a CSV (path,reason), atomically; nothing at all when there are none."""
    if not errors:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows((text_path(item), text_path(reason)) for item, reason in errors)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _read_file(item: str, notes: ImageNotes) -> Image.Image | str:
    """The decoded image, or a short reason why it could not be decoded; warnings about an image
    that was decoded go to ``notes``."""
    try:
        if os.path.getsize(item) == 0:
            return "empty file (0 bytes)"
        # Pillow's own warnings (a large image, corrupt EXIF) span two lines, name a file of Pillow's
        # and not the image, and come once per image: caught here, they become notes naming the image.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said below, with the sizes
            with Image.open(item) as opened:
                # load() decodes every pixel now, so a truncated file fails here and not later.
                opened.load()
                if opened.mode == "F":
                    # Float pixels have no agreed range (0..1? 0..255?); guessing turns a whole set black.
                    return "32-bit float pixels (mode F) have no fixed range; save the image as 8-bit or 16-bit"
                if opened.mode == "I" and _wider_than_16_bits(opened):
                    # Mode I is also how Pillow opens a 16-bit PGM, which is scaled as 16-bit; a 32-bit
                    # TIFF holding 0..255 was scaled so too, and came out almost black, with no word.
                    return "32-bit integer pixels (mode I) have no fixed range; save the image as 8-bit or 16-bit"
                # Camera JPEGs store rotation as a tag; apply it so the model sees what viewers show.
                orientation = opened.getexif().get(ExifTags.Base.Orientation)
                picture = ImageOps.exif_transpose(opened)
                if Image.MAX_IMAGE_PIXELS and opened.width * opened.height > Image.MAX_IMAGE_PIXELS:
                    notes.add("pixels", f"{text_path(item)}: {opened.width} x {opened.height} pixels, more than "
                                        f"Pillow's limit of {Image.MAX_IMAGE_PIXELS:,}; decoded, but an image over "
                                        f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels is skipped")
        _note_pillow_warnings(item, [str(w.message) for w in caught], orientation, notes)
        return picture
    except FileNotFoundError:
        try:  # a broken link: `ls` shows it, so "file not found" alone would puzzle
            return f"a link to {text_path(os.readlink(item))}, which does not exist"
        except OSError:  # not a link (or gone meanwhile)
            return "file not found"
    except IsADirectoryError:
        return "is a directory, not an image"
    except PermissionError:
        return "permission denied"
    except UnidentifiedImageError:
        return "cannot identify image file"
    except Image.DecompressionBombError as exc:
        return f"too many pixels: {one_line(exc)}"
    # Decoders raise many types on corrupt data (OSError, SyntaxError, struct.error, ...); any of
    # them means "this one file is bad", which must not stop the run.
    except Exception as exc:  # noqa: BLE001
        return one_line(exc)


def _note_pillow_warnings(item: str, messages: list[str], orientation: object, notes: ImageNotes) -> None:
    """One note per kind for what Pillow warned about while reading ``item`` (often several warnings)."""
    exif = [m for m in messages if "exif" in m.lower()]
    if exif:
        # Pillow keeps the EXIF tags read before the damage and drops the rest, so the orientation
        # (what exif_transpose applies) may have been read or lost.
        detail = re.sub(r"^(possibly )?corrupt exif( makernote)? data\.\s*", "", " ".join(exif[0].split()),
                        flags=re.IGNORECASE).rstrip(". ")
        detail = detail[:1].lower() + detail[1:]
        applied = (f"its orientation ({orientation}) was read before the damage and applied" if orientation is not None
                   else "no orientation could be read from it, so it is used as stored, not rotated")
        notes.add("exif", f"{text_path(item)}: corrupt EXIF data ({detail}); {applied}; to repair it, save it "
                          f"again without EXIF, turned as it should appear")
    other = [m for m in messages if m not in exif]
    if other:
        notes.add("pillow", f"{text_path(item)}: Pillow warned while reading it: {' '.join(other[0].split())}; "
                            f"it is used as decoded: check that it looks right, or save it again")


def _wider_than_16_bits(picture: Image.Image) -> bool:
    """A mode I image that is not 16-bit data: a TIFF stored with more than 16 bits per sample, or
    any pixel outside 0..65535."""
    bits = getattr(picture, "tag_v2", {}).get(258)  # TIFF's BitsPerSample
    if bits is not None and max(bits if isinstance(bits, tuple) else (bits,)) > 16:
        return True
    low, high = picture.getextrema()
    return low < 0 or high > 65535


def _npy_pictures(source: ImageSource, start: int, stop: int | None) -> Iterator[Image.Image | str]:
    block = np.asarray(_open_npy(source.origin)[start:stop])
    if source.layout == "NCHW":
        block = block.transpose(0, 2, 3, 1)
    if block.ndim == 4 and block.shape[3] == 1:
        block = block[..., 0]
    is_float = block.dtype.kind == "f"
    high = 1 if is_float else 255
    bad = ~np.isfinite(block) | (block < 0) | (block > high) if is_float else (block < 0) | (block > high)
    if bad.any():
        where = tuple(np.argwhere(bad)[0])
        raise DataError(f"{source.origin}: image {start + int(where[0])} has value {block[where].item():.6g}, outside "
                        f"0..{high} for dtype {block.dtype}; {_PIXEL_DTYPES}")
    # Back to 8-bit pixels so an array and the files it was made from go through PIL identically;
    # floats that came from x / 255 round-trip exactly.
    pixels = np.rint(block * 255.0).astype(np.uint8) if is_float else block.astype(np.uint8)
    mode = "L" if pixels.ndim == 3 else "RGB"
    for picture in pixels:
        yield Image.fromarray(np.ascontiguousarray(picture), mode=mode)


def _to_array(picture: Image.Image, spec: ImageSpec) -> np.ndarray:
    picture = _convert(picture, spec.mode)
    if picture.size != (spec.size, spec.size):
        picture = picture.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    pixels = np.asarray(picture, dtype=np.float32) / np.float32(255)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _convert(picture: Image.Image, mode: str) -> Image.Image:
    if picture.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L conversion clips at 255 (almost every pixel turns white); scale instead.
        wide = np.asarray(picture).astype(np.float64)
        picture = Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257).astype(np.uint8), mode="L")
    elif picture.mode == "P":
        # Converting a palette image with a transparent index straight to RGB warns; go via RGBA.
        picture = picture.convert("RGBA" if "transparency" in picture.info else "RGB")
    if picture.mode not in ("L", "RGB", "RGBA", "LA", "1"):
        picture = picture.convert("RGB")  # CMYK, YCbCr, ...: via RGB, the one path every mode has
    # Alpha is dropped, not composited: the colour under transparent pixels is kept as stored.
    return picture if picture.mode == mode else picture.convert(mode)
