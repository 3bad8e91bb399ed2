"""Finding, reading and preprocessing images: every format converts, bad files are skipped, sources agree."""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from pipeline.config import CalibrationConfig, ImageTrainJob, PipelineConfig, TrainingConfig
from pipeline.errors import ConfigError, DataError, InputFileError
from pipeline.image_workflow import run_image_training
from pipeline.images import (IMAGE_SUFFIXES, ImageNotes, ImageSpec, is_image_input, iter_image_batches,
                             list_images, load_images, text_path, write_errors)
from tests.conftest import run_main


def _pixels(seed: int, height: int = 12, width: int = 10, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels == 3 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _save(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Every supported format and several awkward modes and sizes, nested."""
    root = tmp_path / "normal"
    _save(root / "a_gray.png", Image.fromarray(_pixels(1, channels=1), mode="L"))
    _save(root / "b_rgb.JPG", Image.fromarray(_pixels(2, 20, 30)), quality=90)
    _save(root / "sub" / "c.bmp", Image.fromarray(_pixels(3, 7, 9)))
    palette = Image.fromarray(_pixels(4, 16, 16)).quantize(colors=8)
    _save(root / "sub" / "d_palette.png", palette, transparency=0)
    wide = (_pixels(5, 9, 9, channels=1).astype(np.uint16) * 257)
    _save(root / "sub" / "deeper" / "e_16bit.png", Image.fromarray(wide))
    _save(root / "sub" / "deeper" / "f_rgba.png", Image.fromarray(_pixels(6, 40, 5)).convert("RGBA"))
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_every_format_and_size_loads_as_unit_floats(mixed_folder, channels):
    spec = ImageSpec(size=16, channels=channels)
    source = list_images(mixed_folder)
    images, names, errors = load_images(source, spec)
    assert errors == []
    assert names == source.items and len(names) == 6
    assert images.shape == (6, channels, 16, 16) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    # The 16-bit image is scaled into range, not clipped to white by PIL's own conversion.
    sixteen = images[names.index(str(mixed_folder / "sub" / "deeper" / "e_16bit.png"))]
    assert 0.2 < sixteen.mean() < 0.8


def test_sixteen_bit_matches_eight_bit_for_the_same_levels(tmp_path):
    levels = _pixels(7, 8, 8, channels=1)
    eight = _save(tmp_path / "f" / "a8.png", Image.fromarray(levels, mode="L"))
    _save(tmp_path / "f" / "b16.png", Image.fromarray(levels.astype(np.uint16) * 257))
    images, _, _ = load_images(list_images(eight.parent), ImageSpec(size=8))
    np.testing.assert_array_equal(images[0], images[1])


def test_a_large_image_warns_in_one_line_that_names_it(tmp_path, monkeypatch, caplog):
    """Pillow's warning (two lines, no file name) became one line naming the file; over twice the limit, skipped."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    large = _save(tmp_path / "large.png", Image.fromarray(_pixels(1, 12, 12, channels=1), mode="L"))  # 144 pixels
    _save(tmp_path / "huge.png", Image.fromarray(_pixels(2, 15, 15, channels=1), mode="L"))  # 225 > 2 x 100
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a Python warning fails the test
            images, names, errors = load_images(list_images(tmp_path), ImageSpec(size=8, channels=1))
    assert names == [str(large)] and images.shape == (1, 1, 8, 8)
    assert [(Path(item).name, reason.split(":")[0]) for item, reason in errors] == [("huge.png", "too many pixels")]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [str(large)]
    assert "12 x 12 pixels" in caplog.records[0].getMessage() and "\n" not in caplog.records[0].getMessage()


# A big-endian EXIF block whose entry count says 5 but whose bytes end inside the first entry
# (an orientation tag): Pillow warns "Corrupt EXIF data" and reads no tag at all.
CORRUPT_EXIF = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06"
# Two entries: a whole orientation tag (6: turn 90 degrees clockwise), then one cut short.
ORIENTATION_THEN_CORRUPT = (b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02"
                            b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x01\x1a\x00\x05")


def _no_python_warnings(record: list) -> None:
    assert [str(w.message) for w in record] == []


def test_corrupt_exif_is_one_line_naming_the_image_which_is_used(tmp_path, caplog, recwarn):
    """Pillow's warning (two lines naming Pillow's file, not the image) became one line naming the image,
    saying truthfully whether its orientation was applied; the image is still loaded."""
    pixels = _pixels(3, 16, 16, channels=1)
    bad = _save(tmp_path / "bad" / "a.jpg", Image.fromarray(pixels, mode="L"), exif=CORRUPT_EXIF)
    turned = _save(tmp_path / "turned" / "b.jpg", Image.fromarray(pixels, mode="L"), exif=ORIENTATION_THEN_CORRUPT)
    plain = _save(tmp_path / "plain" / "c.jpg", Image.fromarray(pixels, mode="L"))
    loaded, lines = [], []
    for path in (bad, turned, plain):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="vaeguard"):
            images, names, errors = load_images(list_images(path.parent), ImageSpec(size=16))
        assert names == [str(path)] and errors == []
        loaded.append(images[0, 0])
        lines.append([r.getMessage() for r in caplog.records])
    _no_python_warnings(recwarn.list)
    assert [len(said) for said in lines] == [1, 1, 0] and not any("\n" in said[0] for said in lines[:2])
    assert lines[0][0].startswith(f"{bad}: corrupt EXIF data (expecting to read 12 bytes but only got 10); no "
                                  f"orientation could be read from it, so it is used as stored, not rotated; ")
    assert lines[1][0].startswith(f"{turned}: corrupt EXIF data (expecting to read 12 bytes but only got 4); its "
                                  f"orientation (6) was read before the damage and applied; ")
    # What was said is what happened: the same JPEG pixels, as stored and turned clockwise.
    np.testing.assert_array_equal(loaded[0], loaded[2])
    np.testing.assert_array_equal(loaded[1], np.rot90(loaded[2], k=-1))


def test_many_images_with_corrupt_exif_are_one_warning_with_each_under_verbose(tmp_path, caplog, recwarn):
    for i in range(3):
        _save(tmp_path / "set" / f"{i}.jpg", Image.fromarray(_pixels(i, 8, 8, channels=1), mode="L"),
              exif=CORRUPT_EXIF)
    notes = ImageNotes()
    with caplog.at_level(logging.DEBUG, logger="vaeguard"):
        loaded = [names for _, names, _ in iter_image_batches(list_images(tmp_path / "set"), ImageSpec(size=8), 2,
                                                              notes)]
        assert caplog.records == []  # said once for the whole run, by its caller
        notes.log("set")
    _no_python_warnings(recwarn.list)
    assert sum(map(len, loaded)) == 3
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"set: 3 images with corrupt EXIF data (each with --verbose), e.g. "
                              f"{tmp_path / 'set' / '0.jpg'}: corrupt EXIF data")
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 3


def test_an_npy_of_python_objects_says_so_and_what_it_must_hold(tmp_path):
    """It said "could not be read as a .npy array: ...; save it with numpy.save", which is how it was saved."""
    path = tmp_path / "ragged.npy"
    np.save(path, np.array([np.zeros((4, 4)), np.zeros((5, 5))], dtype=object))
    with pytest.raises(DataError) as raised:
        list_images(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: holds Python objects (dtype object), not pixel values; save uint8 values in "
                              f"0..255 or floats in 0..1")
    assert "numpy.save" not in message and "\n" not in message


def test_hidden_and_other_files_are_ignored_and_order_is_sorted(tmp_path):
    root = tmp_path / "imgs"
    for name in ["b.png", "a.png", "z/c.png", "A.jpeg"]:
        _save(root / name, Image.fromarray(_pixels(8, channels=1), mode="L"))
    _save(root / ".hidden.png", Image.fromarray(_pixels(9, channels=1), mode="L"))
    _save(root / ".cache" / "x.png", Image.fromarray(_pixels(9, channels=1), mode="L"))
    (root / "notes.txt").write_text("not an image")
    (root / "z" / "readme.md").write_text("nor this")
    items = list_images(root).items
    assert [Path(i).relative_to(root).as_posix() for i in items] == ["A.jpeg", "a.png", "b.png", "z/c.png"]


def test_a_subfolder_that_cannot_be_listed_is_an_error_not_left_out(tmp_path, monkeypatch):
    """os.walk skipped a folder it could not open (no permission), silently: its images went unscored."""
    _save(tmp_path / "cam1" / "a.png", Image.fromarray(_pixels(1, channels=1), mode="L"))
    locked = tmp_path / "cam2"
    _save(locked / "b.png", Image.fromarray(_pixels(2, channels=1), mode="L"))
    scandir = os.scandir

    def refusing(path=".", *args):
        if os.fspath(path) == str(locked):  # as a folder with mode 000 does (for anyone but root)
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(InputFileError, match=r"cam2: could not be listed \(Permission denied\)") as caught:
        list_images(tmp_path)
    assert "\n" not in str(caught.value)


def test_a_folder_of_table_parts_says_a_table_trains_as_one_file(capsys, tmp_path):
    """A partitioned table (part-0.parquet, part-1.parquet) was told it held no images, as if the
    user had meant images."""
    parts = tmp_path / "ds"
    parts.mkdir()
    for i in range(2):
        pd.DataFrame({"x": [1.0, 2.0]}).to_parquet(parts / f"part-{i}.parquet")
    code, _, err = run_main(capsys, "train", parts, "--name", "ds", "--out", tmp_path / "out")
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith(f"error: no PNG, JPEG or BMP images in {parts}, but 2 table file(s) such as "
                           f"{parts / 'part-0.parquet'}: a table is read from a file, not a folder; `vaeguard train` "
                           f"takes one file (join the parts: python -c ")


@pytest.mark.parametrize("suffix, read", [(".parquet", pd.read_parquet), (".csv.gz", pd.read_csv)])
def test_the_join_a_folder_of_table_parts_is_told_runs_and_score_is_told_too(monkeypatch, tmp_path, suffix, read):
    """The join was `pandas.concat(map(pandas.read_parquet, parts))`, `parts` left to the reader and
    Parquet's for CSV parts too; and scoring an image bundle on the folder was told "a table is
    trained on as one file", a step of training."""
    parts = tmp_path / "ds"
    (parts / "day=2").mkdir(parents=True)  # a partitioned data set's nested parts
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0], "c": ["a", "b", "c"]})
    for i, part in enumerate((parts / f"part-0{suffix}", parts / "day=2" / f"part-1{suffix}")):
        write = frame.to_parquet if suffix == ".parquet" else lambda path: frame.to_csv(path, index=False)
        write(part)
    with pytest.raises(InputFileError) as caught:
        list_images(parts)
    message = str(caught.value)
    assert "`vaeguard score` takes the files themselves" in message and "trained on a table" in message
    command = message.split('python -c "', 1)[1].split('")', 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(command, {})
    joined = next(p for p in tmp_path.iterdir() if p.is_file())
    assert read(joined).shape == (6, 2) and joined.name == "ds" + (".parquet" if suffix == ".parquet" else ".csv")


def test_folder_without_images_names_the_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputFileError, match="no PNG, JPEG or BMP images in .*empty"):
        list_images(empty)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("x")
    with pytest.raises(InputFileError, match="texts .searched recursively"):
        list_images(texts)
    with pytest.raises(InputFileError, match="not found"):
        list_images(tmp_path / "missing")


def test_corrupt_files_are_skipped_with_reasons_and_order_kept(tmp_path):
    root = tmp_path / "mixed"
    buffer = io.BytesIO()
    Image.fromarray(_pixels(10, 32, 32)).save(buffer, format="PNG")
    whole = buffer.getvalue()
    _save(root / "1_good.png", Image.fromarray(_pixels(11)))
    (root / "2_truncated.png").write_bytes(whole[: len(whole) // 2])
    _save(root / "3_good.png", Image.fromarray(_pixels(12)))
    (root / "4_random.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "5_empty.png").write_bytes(b"")
    _save(root / "6_good.bmp", Image.fromarray(_pixels(13)))

    images, names, errors = load_images(list_images(root), ImageSpec(size=8))
    assert [Path(n).name for n in names] == ["1_good.png", "3_good.png", "6_good.bmp"]
    assert images.shape == (3, 1, 8, 8)
    reasons = {Path(item).name: reason for item, reason in errors}
    assert list(reasons) == ["2_truncated.png", "4_random.jpg", "5_empty.png"]
    assert "truncated" in reasons["2_truncated.png"]
    assert reasons["4_random.jpg"] == "cannot identify image file"
    assert "empty" in reasons["5_empty.png"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_csv_and_npy_give_the_same_array_as_the_folder(tmp_path):
    gray = [_pixels(20 + i, 12, 10, channels=1) for i in range(3)]
    root = tmp_path / "set"
    for i, pixels in enumerate(gray):
        _save(root / f"img{i}.png", Image.fromarray(pixels, mode="L"))
    spec = ImageSpec(size=8, channels=1)
    from_folder, _, _ = load_images(list_images(root), spec)

    index = tmp_path / "index.csv"
    pd.DataFrame({"id": [0, 1, 2], "path": [f"set/img{i}.png" for i in range(3)]}).to_csv(index, index=False)
    assert is_image_input(index)
    csv_source = list_images(index)
    assert csv_source.items == [str(tmp_path / "set" / f"img{i}.png") for i in range(3)]
    from_csv, _, _ = load_images(csv_source, spec)

    uint8_nhw = tmp_path / "u8.npy"
    np.save(uint8_nhw, np.stack(gray))
    float_nchw = tmp_path / "f.npy"
    np.save(float_nchw, (np.stack(gray)[:, None] / 255.0).astype(np.float32))
    from_u8, names, _ = load_images(list_images(uint8_nhw), spec)
    from_float, _, _ = load_images(list_images(float_nchw), spec)

    assert names == [f"{uint8_nhw}[{i}]" for i in range(3)]
    for other in (from_csv, from_u8, from_float):
        np.testing.assert_array_equal(from_folder, other)


def test_rgb_npy_nhwc_matches_rgb_files(tmp_path):
    colour = [_pixels(30 + i, 9, 11) for i in range(2)]
    for i, pixels in enumerate(colour):
        _save(tmp_path / "rgb" / f"{i}.png", Image.fromarray(pixels))
    np.save(tmp_path / "rgb.npy", np.stack(colour))
    for spec in (ImageSpec(size=6, channels=3), ImageSpec(size=6, channels=1)):
        files, _, _ = load_images(list_images(tmp_path / "rgb"), spec)
        array, _, _ = load_images(list_images(tmp_path / "rgb.npy"), spec)
        np.testing.assert_array_equal(files, array)


def test_bad_csv_and_npy_inputs_raise(tmp_path):
    no_column = tmp_path / "t.csv"
    no_column.write_text("file,label\na.png,0\n")
    assert not is_image_input(no_column)
    with pytest.raises(DataError, match=r"no 'path' column \(columns: 'file', 'label'\); images are read from a CSV "
                                        r"as a list of image paths"):
        list_images(no_column)
    # A table given to an image bundle: its header shown in part, with how many columns it has.
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(12)) + "\n" + ",".join("1" * 12) + "\n")
    with pytest.raises(DataError, match=r"\(columns: 'c0', .*'c9', \.\.\. \(12 in all\)\); .* or score a table "
                                        r"with a bundle trained on tables$"):
        list_images(wide)
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((4, 10)))
    with pytest.raises(DataError, match=r"shape \(4, 10\)"):
        list_images(flat)
    out_of_range = tmp_path / "big.npy"
    np.save(out_of_range, np.full((2, 4, 4), 200.0))
    with pytest.raises(DataError, match="outside 0..1"):
        load_images(list_images(out_of_range), ImageSpec(size=4))
    with pytest.raises(InputFileError, match="unsupported image input"):
        list_images(_save(tmp_path / "one.png", Image.fromarray(_pixels(1))))


def test_same_pixels_give_identical_arrays_and_rgb_converts_for_gray_spec(tmp_path):
    pixels = _pixels(40, 28, 28)
    first = _save(tmp_path / "train" / "x.png", Image.fromarray(pixels))
    _save(tmp_path / "score" / "deep" / "y.png", Image.fromarray(pixels))
    spec = ImageSpec(size=16, channels=1)
    at_training, _, _ = load_images(list_images(first.parent), spec)
    at_scoring, _, errors = load_images(list_images(tmp_path / "score"), spec)
    assert errors == []
    np.testing.assert_array_equal(at_training, at_scoring)
    assert at_scoring.shape == (1, 1, 16, 16)


def test_batches_are_bounded_and_cover_every_item_once(tmp_path):
    root = tmp_path / "many"
    for i in range(7):
        _save(root / f"{i}.png", Image.fromarray(_pixels(i, 5, 5, channels=1), mode="L"))
    (root / "7_bad.png").write_bytes(b"nope")
    source = list_images(root)
    seen, failed = [], []
    for images, names, errors in iter_image_batches(source, ImageSpec(size=4), batch_size=3):
        assert images.shape[0] == len(names) <= 3 and len(names) + len(errors) <= 3
        seen += names
        failed += [item for item, _ in errors]
    assert seen + failed == source.items
    with pytest.raises(ConfigError):
        next(iter_image_batches(source, ImageSpec(size=4), batch_size=0))


def test_write_errors_only_when_there_are_some(tmp_path):
    target = tmp_path / "out" / "errors.csv"
    write_errors([], target)
    assert not target.exists()
    write_errors([("a, b.png", "cannot identify image file"), ("c.png", "empty file (0 bytes)")], target)
    frame = pd.read_csv(target)
    assert list(frame.columns) == ["path", "reason"]
    assert frame["path"].tolist() == ["a, b.png", "c.png"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_names_that_are_not_utf8_are_written_escaped(tmp_path):
    name = os.fsdecode(b"dir/caf\xe9.png")  # how Python lists such a file: with a lone surrogate
    assert text_path(name) == "dir/caf\\xe9.png" and text_path("ünï.png") == "ünï.png"
    target = tmp_path / "errors.csv"
    write_errors([(name, f"cannot open {name}")], target)
    assert pd.read_csv(target).values.tolist() == [["dir/caf\\xe9.png", "cannot open dir/caf\\xe9.png"]]


def test_spec_round_trips_and_rejects_other_preprocessing():
    spec = ImageSpec(size=28, channels=3)
    assert spec.to_dict() == {"size": 28, "channels": 3, "mode": "RGB", "resize": "bilinear",
                              "scale": "x / 255", "layout": "NCHW float32 in [0, 1]"}
    assert ImageSpec.from_dict(spec.to_dict()) == spec
    assert ImageSpec.from_dict({}) == ImageSpec()
    with pytest.raises(ConfigError, match="resize"):
        ImageSpec.from_dict({**spec.to_dict(), "resize": "bicubic"})
    with pytest.raises(ConfigError, match="channels"):
        ImageSpec(channels=2)
    assert ".png" in IMAGE_SUFFIXES and is_image_input(Path("whatever.npy"))


# --- CSV and .npy inputs a user gets slightly wrong ------------------------------------------


def test_csv_row_with_a_field_too_many_is_an_error_not_a_shifted_path(tmp_path):
    # pandas read "1,a.png,extra" under "id,path" as index 1, id a.png, path "extra": a wrong file.
    index = tmp_path / "index.csv"
    index.write_text("id,path\n1,imgs/a.png,extra\n2,imgs/b.png,extra\n")
    with pytest.raises(DataError, match=r"index.csv: line 2 has 3 fields but the header has 2; quote paths"):
        list_images(index)


def test_csv_paths_with_commas_spaces_and_blank_lines_are_read_as_written(tmp_path):
    index = tmp_path / "index.csv"
    index.write_text('path,label\n"imgs/a b,c.png",0\n\nimgs/d.png\n')
    assert list_images(index).items == [str(tmp_path / "imgs" / "a b,c.png"), str(tmp_path / "imgs" / "d.png")]
    index.write_text("path,label\nimgs/a.png,0\n\n,1\n")
    with pytest.raises(DataError, match=r"empty in row 2 \(line 4\)"):
        list_images(index)


@pytest.mark.parametrize("content, message", [
    (b'path\n"imgs/a.png"\n"imgs/b.png\n', r"not a valid CSV from line 3: .*check the quotes"),
    (b"path\nimgs/caf\xe9.png\n", r"not UTF-8 text .*save the CSV as UTF-8"),
    (b"path,path\na.png,b.png\n", r"header names 'path' 2 times"),
])
def test_malformed_csv_is_a_one_line_data_error(tmp_path, content, message):
    index = tmp_path / "index.csv"
    index.write_bytes(content)
    with pytest.raises(DataError, match=message):  # was pandas' ParserError, or "no 'path' column"
        list_images(index)


def test_npy_with_zero_sized_images_is_refused(tmp_path):
    empty_rows = tmp_path / "flat.npy"
    np.save(empty_rows, np.zeros((5, 0, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"shape \(5, 0, 8\) holds images with no pixels"):
        list_images(empty_rows)  # loaded as five black images before


def test_npy_bad_value_is_named_in_the_error(tmp_path):
    array = np.full((40, 4, 4), 0.5, dtype=np.float32)
    array[33, 1, 2] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=r"image 33 has value nan, outside 0..1 for dtype float32"):
        load_images(list_images(path), ImageSpec(size=4))


def test_linked_folders_are_followed_once_and_loops_end(tmp_path):
    real = tmp_path / "elsewhere"
    _save(real / "a.png", Image.fromarray(_pixels(50, channels=1), mode="L"))
    _save(real / "sub" / "b.png", Image.fromarray(_pixels(51, channels=1), mode="L"))
    root = tmp_path / "set"
    _save(root / "c.png", Image.fromarray(_pixels(52, channels=1), mode="L"))
    (root / "linked").symlink_to(real, target_is_directory=True)
    (root / "same_again").symlink_to(real, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    items = [Path(i).relative_to(root).as_posix() for i in list_images(root).items]
    assert items == ["c.png", "linked/a.png", "linked/sub/b.png"]


# --- training on images ----------------------------------------------------------------------

ENOUGH = 80  # images the splits need at target FPR 0.05 (79) and one more


def _train(data: Path, out: Path, **job) -> dict:
    """One epoch on 8x8 images, 2 threads: seconds, not minutes."""
    training = TrainingConfig(max_epochs=1, patience=1, batch_size=32, threads=2, progress=False)
    config = PipelineConfig(training=training, calibration=CalibrationConfig(target_fpr=0.05))
    return run_image_training(ImageTrainJob(data=data, name="parts", out_dir=out, image_size=8,
                                            config=config, **job))


def _gray_folder(root: Path, n: int, offset: int = 0) -> Path:
    for i in range(n):
        _save(root / f"img_{i + offset:03d}.png", Image.fromarray(_pixels(100 + i + offset, channels=1), mode="L"))
    return root


def test_too_few_images_fail_before_any_is_decoded_and_say_images(tmp_path, monkeypatch):
    import pipeline.image_workflow as workflow

    folder = _gray_folder(tmp_path / "few", 30)
    monkeypatch.setattr(workflow, "iter_image_batches", lambda *a: pytest.fail("images decoded"))
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match=r"few: too few images to train and calibrate: 30 listed, need at least 79 "
                                        r"for target FPR 0.05 .*add images or raise --target-fpr"):
        _train(folder, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # no staging folder left


def test_unreadable_images_are_listed_with_verbose_and_too_few_readable_says_why(tmp_path, caplog):
    folder = _gray_folder(tmp_path / "set", 75)
    for i in range(6):
        (folder / f"zz_bad{i}.png").write_bytes(b"not a png")
    (tmp_path / "out").mkdir()
    with caplog.at_level(logging.DEBUG, logger="vaeguard"), pytest.raises(
            DataError, match=r"75 of 81 could be read \(6 skipped, e.g. .*zz_bad0.png: cannot identify image file; "
                             r"all with --verbose\), need at least 79"):
        _train(folder, tmp_path / "out")
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "skipped" in r.getMessage()]
    assert len(skipped) == 6 and all("cannot identify image file" in m for m in skipped)
    assert list((tmp_path / "out").iterdir()) == []


def test_skipped_files_leave_the_same_bundle_as_a_folder_without_them(tmp_path):
    clean = _gray_folder(tmp_path / "clean", ENOUGH)
    dirty = _gray_folder(tmp_path / "dirty", ENOUGH)
    (dirty / "img_040_truncated.png").write_bytes((clean / "img_040.png").read_bytes()[:60])
    (dirty / "zz_empty.jpg").write_bytes(b"")
    facts = [_train(folder, tmp_path / name) for folder, name in ((clean, "a"), (dirty, "b"))]
    assert facts[1]["load_images"] == {"images": ENOUGH, "skipped": 2}
    thresholds = [json.loads((Path(f["bundle"]) / "manifest.json").read_text())["calibration"]["threshold"]
                  for f in facts]
    assert thresholds[0] == thresholds[1]


def test_colour_images_with_channels_1_warn_and_gray_ones_do_not(tmp_path, caplog):
    colour = tmp_path / "colour"
    for i in range(ENOUGH):
        _save(colour / f"{i:03d}.png", Image.fromarray(_pixels(200 + i, 8, 8)))
    gray_as_rgb = tmp_path / "gray.npy"
    np.save(gray_as_rgb, np.repeat(np.stack([_pixels(i, 8, 8, channels=1) for i in range(ENOUGH)])[..., None], 3, -1))
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        _train(colour, tmp_path / "a")
        _train(gray_as_rgb, tmp_path / "b")
    warnings = [r.getMessage() for r in caplog.records if "--channels 3" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{colour}: 16 of 16 images checked are in colour")


def test_csv_listing_an_image_twice_warns(tmp_path, caplog):
    _gray_folder(tmp_path / "imgs", ENOUGH)
    index = tmp_path / "index.csv"
    paths = [f"imgs/img_{i:03d}.png" for i in range(ENOUGH)] + ["imgs/img_007.png", "./imgs/img_007.png"]
    pd.DataFrame({"path": paths}).to_csv(index, index=False)
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        _train(index, tmp_path / "out", path_column="path")
    [warning] = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert "1 image(s) listed more than once, e.g. " in warning and "img_007.png" in warning


def test_training_warns_once_about_images_with_corrupt_exif_and_trains_on_them(tmp_path, caplog, recwarn):
    """Training printed Pillow's two-line warning twice (loading, then the colour check)."""
    folder = _gray_folder(tmp_path / "set", ENOUGH - 2)
    for name in ("zz_a.jpg", "zz_b.jpg"):
        _save(folder / name, Image.fromarray(_pixels(7, channels=1), mode="L"), exif=CORRUPT_EXIF)
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        facts = _train(folder, tmp_path / "out")
    _no_python_warnings(recwarn.list)
    assert facts["load_images"] == {"images": ENOUGH, "skipped": 0}
    [warning] = [r.getMessage() for r in caplog.records if "EXIF" in r.getMessage()]
    assert warning.startswith(f"{folder}: 2 images with corrupt EXIF data (each with --verbose), e.g. {folder}/zz_a.jpg")


def test_an_image_set_larger_than_memory_fails_before_loading(tmp_path, monkeypatch):
    import pipeline.image_workflow as workflow

    folder = _gray_folder(tmp_path / "set", ENOUGH)
    monkeypatch.setattr(workflow, "_physical_memory", lambda: 2**30)
    monkeypatch.setattr(workflow, "iter_image_batches", lambda *a: pytest.fail("images decoded"))
    with pytest.raises(ConfigError, match=r"80 images at 2000x2000 with 1 channel\(s\) need 1.2 GiB as float32, "
                                          r"more than this machine's 1.0 GiB of memory; use a smaller --image-size"):
        run_image_training(ImageTrainJob(data=folder, name="big", out_dir=tmp_path / "out", image_size=2000,
                                         config=PipelineConfig(calibration=CalibrationConfig(target_fpr=0.05))))


def test_float_tiff_from_a_csv_is_skipped_not_loaded_black(tmp_path):
    Image.fromarray(np.full((8, 8), 0.7, dtype=np.float32)).save(tmp_path / "float.tif")
    _save(tmp_path / "ok.png", Image.fromarray(_pixels(60, 8, 8, channels=1), mode="L"))
    index = tmp_path / "index.csv"
    index.write_text("path\nfloat.tif\nok.png\n")
    images, names, errors = load_images(list_images(index), ImageSpec(size=8))
    assert names == [str(tmp_path / "ok.png")] and images.shape == (1, 1, 8, 8)
    assert errors == [(str(tmp_path / "float.tif"), "32-bit float pixels (mode F) have no fixed range; "
                                                    "save the image as 8-bit or 16-bit")]


def test_a_32_bit_integer_image_is_skipped_and_a_16_bit_pgm_is_read(tmp_path):
    """Mode I was taken as 16-bit: a 32-bit TIFF holding 0..255 came out almost black, and one
    holding more than 65535 white, with no word; a 16-bit PGM, which Pillow also opens as mode I,
    must still read as the same picture in 16 bits."""
    pixels = _pixels(60, 8, 8, channels=1)
    Image.fromarray(pixels.astype(np.int32)).save(tmp_path / "small.tif")  # mode I, 0..255
    Image.fromarray((pixels.astype(np.uint16) * 257)).save(tmp_path / "wide.pgm")  # mode I, 16-bit
    _save(tmp_path / "ok.png", Image.fromarray(pixels, mode="L"))
    index = tmp_path / "index.csv"
    index.write_text("path\nsmall.tif\nwide.pgm\nok.png\n")
    assert Image.open(tmp_path / "small.tif").mode == Image.open(tmp_path / "wide.pgm").mode == "I"
    images, names, errors = load_images(list_images(index), ImageSpec(size=8))
    assert names == [str(tmp_path / "wide.pgm"), str(tmp_path / "ok.png")]
    np.testing.assert_array_equal(images[0], images[1])
    assert errors == [(str(tmp_path / "small.tif"), "32-bit integer pixels (mode I) have no fixed range; "
                                                    "save the image as 8-bit or 16-bit")]


def test_a_broken_link_is_skipped_with_where_it_points(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "a.png", Image.fromarray(_pixels(1, channels=1), mode="L"))
    (root / "b.png").symlink_to(tmp_path / "moved" / "b.png")
    _, names, errors = load_images(list_images(root), ImageSpec(size=8))
    assert names == [str(root / "a.png")]
    assert errors == [(str(root / "b.png"), f"a link to {tmp_path / 'moved' / 'b.png'}, which does not exist")]


def test_a_bundle_published_inside_the_image_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """`vaeguard train .` with the default --out put the bundle's report PNGs among the images, so the
    next training of the folder trained on them, and its scoring scored them."""
    import pipeline.image_workflow as workflow

    folder = _gray_folder(tmp_path / "set", ENOUGH)
    monkeypatch.setattr(workflow, "iter_image_batches", lambda *a: pytest.fail("images decoded"))
    with pytest.raises(ConfigError, match=r"--out .*set/exported: the bundle would go to .*set/exported/parts, "
                                          r"inside the image folder .*set, whose next training or scoring would take "
                                          r"its report figures for images; pass an --out outside"):
        _train(folder, folder / "exported")
    assert sorted(p.name for p in folder.iterdir()) == [f"img_{i:03d}.png" for i in range(ENOUGH)]


def test_a_hidden_out_folder_inside_the_image_folder_is_not_listed_so_is_allowed(tmp_path):
    folder = _gray_folder(tmp_path / "set", ENOUGH)
    facts = _train(folder, folder / ".exported")
    assert facts["load_images"] == {"images": ENOUGH, "skipped": 0}
    assert list_images(folder).items == [str(folder / f"img_{i:03d}.png") for i in range(ENOUGH)]


def test_a_link_to_an_image_of_the_same_folder_warns_as_listed_twice(tmp_path, caplog):
    folder = _gray_folder(tmp_path / "set", ENOUGH)
    (folder / "zz_link.png").symlink_to(folder / "img_007.png")
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        _train(folder, tmp_path / "out")
    [warning] = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert f"1 image(s) listed more than once, e.g. {folder / 'img_007.png'} and {folder / 'zz_link.png'};" in warning
