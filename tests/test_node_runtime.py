"""examples/node scores a bundle's scorer.onnx with onnxruntime-node, without Python, and agrees
with `vaeguard score` row for row: same rows in the same order, same decisions, same scores."""

import csv
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.batch_score import score_files
from pipeline.config import ScoreJob, TrainJob
from pipeline.errors import PipelineError
from pipeline.unseen import percent
from pipeline.workflow import run_training
from tests.conftest import NOT_CSV_TEXT, not_csv_text, quiet_config, run_main

pytestmark = pytest.mark.skipif(not (shutil.which("node") and shutil.which("npm")), reason="needs node and npm")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"
# onnxruntime-node's postinstall fetches CUDA provider libraries from NuGet on linux/x64; the CPU
# runtime the example uses ships in the npm package. npm versions that run dependency install
# scripts (package.json's allowScripts denies it to those that read that field) skip it on this.
NPM_ENV = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}


def _installed() -> bool:
    """node_modules already holds exactly what package-lock.json pins (npm's own record of it)."""
    hidden = EXAMPLE / "node_modules" / ".package-lock.json"
    if not hidden.is_file():
        return False
    wanted = {k: v for k, v in json.loads((EXAMPLE / "package-lock.json").read_text())["packages"].items() if k}
    return json.loads(hidden.read_text()).get("packages") == wanted


@pytest.fixture(scope="module")
def node_example() -> Path:
    if not _installed():
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, env=NPM_ENV,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci failed in {EXAMPLE}:\n{done.stdout}\n{done.stderr}"
    return EXAMPLE / "score.js"


def run_node(script: Path, bundle: Path, source: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(script), str(bundle), str(source), str(out), *options],
                          capture_output=True, text=True, timeout=120)


def score_both(script: Path, bundle: Path, source: Path, tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same CSV scored by the Python pipeline (the `vaeguard score` code path) and by Node."""
    score_files(ScoreJob(bundle, (source,), tmp_path / f"{source.stem}.py.parquet", device="cpu"))
    python = pd.read_parquet(tmp_path / f"{source.stem}.py.parquet")
    done = run_node(script, bundle, source, tmp_path / f"{source.stem}.node.csv")
    assert done.returncode == 0, done.stderr
    node = pd.read_csv(tmp_path / f"{source.stem}.node.csv", dtype={"row_id": str}, keep_default_na=False)
    return python, node


def assert_same_results(python: pd.DataFrame, node: pd.DataFrame) -> None:
    assert list(node.columns) == list(python.columns) == ["row_id", "score", "recon", "kl", "p_value", "is_anomaly"]
    assert len(node) == len(python)
    assert node["row_id"].tolist() == python["row_id"].fillna("").tolist()  # same rows, same order
    assert node["is_anomaly"].dtype == bool
    assert node["is_anomaly"].tolist() == python["is_anomaly"].tolist()
    for name in ("score", "recon", "kl", "p_value"):
        # Only float noise apart: the two runs batch rows differently, so sums run in another order.
        np.testing.assert_allclose(node[name], python[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_node_matches_python_on_a_generated_batch(trained_bundle, incoming_csv, node_example, tmp_path):
    python, node = score_both(node_example, trained_bundle, incoming_csv, tmp_path)
    assert_same_results(python, node)
    # Not vacuous: anomalies are flagged, normal rows are not, and rows with missing values
    # (numeric and categorical) were scored.
    assert 0 < python["is_anomaly"].sum() < len(python) // 2
    source = pd.read_csv(incoming_csv)
    assert source.drop(columns=["label"]).isna().any(axis=1).sum() > 20
    assert source["shift"].isna().any()


def test_node_matches_python_on_parsing_edge_cases(trained_bundle, incoming_csv, node_example, tmp_path):
    rows = list(csv.reader(incoming_csv.open(newline="")))
    header, rows = rows[0], rows[1:13]
    at = {name: i for i, name in enumerate(header)}
    rows[0][at["line"]] = "Q"                          # a category never seen in training
    rows[1][at["shift"]] = ""                          # an empty categorical cell
    rows[2][at["temperature"]] = "NA"                  # a null marker in a numeric column
    rows[3][at["row_id"]] = 'id,with "quotes"'         # quoted, with a comma and doubled quotes
    rows[4][at["humidity"]] = " 45.5 "                 # spaces around a number
    rows[5][at["shift"]] = "null"                      # a null marker in a text column
    rows[6][at["pressure"]] = "1e1"                    # exponent notation
    rows[7][at["row_id"]] = "NA"                       # an id spelled like a null marker: kept as written
    rows[8][at["temperature"]] = "500"                 # far out: an anomaly
    rows[9][at["rpm"]] = ""                            # an empty numeric cell
    rows[10][at["row_id"]] = ""                        # an empty id: "", as a CSV holds no null
    source = tmp_path / "edge.csv"
    with source.open("w", newline="") as handle:        # csv's default line end is CRLF
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows[:6])
        handle.write("\r\n")                            # an empty line, skipped by both
        writer.writerows(rows[6:])
    python, node = score_both(node_example, trained_bundle, source, tmp_path)
    assert_same_results(python, node)
    assert len(node) == 12 and node["row_id"][3] == 'id,with "quotes"'
    assert node["row_id"][7] == "NA" and node["row_id"][10] == ""
    assert node["is_anomaly"][8]


def test_a_tampered_scorer_is_refused(trained_bundle, incoming_csv, node_example, tmp_path):
    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    scorer = bundle / "scorer.onnx"
    data = bytearray(scorer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    scorer.write_bytes(bytes(data))
    out = tmp_path / "out.csv"
    done = run_node(node_example, bundle, incoming_csv, out)
    assert done.returncode != 0
    assert "sha256" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [bundle]  # no output, no temp file


def test_a_missing_column_exits_2_naming_it(trained_bundle, incoming_csv, node_example, tmp_path):
    column = json.loads((trained_bundle / "manifest.json").read_text())["schema"]["numeric"][1]
    source = tmp_path / "no_column.csv"
    pd.read_csv(incoming_csv).drop(columns=[column]).to_csv(source, index=False)
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2
    assert f'"{column}"' in done.stderr and str(source) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_non_numeric_value_names_column_and_row(trained_bundle, incoming_csv, node_example, tmp_path):
    frame = pd.read_csv(incoming_csv).astype({"temperature": object})
    frame.loc[41, "temperature"] = "broken"
    source = tmp_path / "bad.csv"
    frame.to_csv(source, index=False)
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2
    assert 'column "temperature" must be numeric but row 42 (line 43) holds "broken"' in done.stderr
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("value", ["inf", "1e300"])
def test_a_value_beyond_float32_names_column_and_row(trained_bundle, incoming_csv, node_example, tmp_path, value):
    """As in `vaeguard score`: in float32 such a value is an infinity, and its row would score NaN."""
    frame = pd.read_csv(incoming_csv).astype({"temperature": object})
    frame.loc[41, "temperature"] = value
    source = tmp_path / "beyond.csv"
    frame.to_csv(source, index=False)
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2
    assert f'column "temperature" holds {value} at row 42 (line 43); expected finite numbers within float32' in done.stderr
    assert not (tmp_path / "out.csv").exists()


# pipeline.tables reads ".CSV.GZ" as gzip too; Node matched ".gz" only and parsed the compressed bytes.
@pytest.mark.parametrize("name", ["incoming.csv.gz", "INCOMING.CSV.GZ"])
def test_a_gzipped_csv_scores_as_python_scores_it(trained_bundle, incoming_csv, node_example, tmp_path, name):
    source = tmp_path / name
    source.write_bytes(gzip.compress(incoming_csv.read_bytes()))
    python, node = score_both(node_example, trained_bundle, source, tmp_path)
    assert_same_results(python, node)
    assert len(node) == 2000


def test_a_corrupt_gzip_exits_2_on_one_line(trained_bundle, incoming_csv, node_example, tmp_path):
    source = tmp_path / "broken.csv.gz"
    source.write_bytes(gzip.compress(incoming_csv.read_bytes())[:-400] + b"garbage")
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2, done.stderr
    assert "not a readable gzip file" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("header, expected", [
    ("temperature;pressure;flow_rate", "looks separated by \";\", but vaeguard reads comma-separated files"),
    ("row_id,temperature,temperature", 'column "temperature" appears twice in the header (columns 2 and 3)'),
])
def test_header_problems_fail_as_in_python(trained_bundle, node_example, tmp_path, header, expected):
    source = tmp_path / "header.csv"
    source.write_text(header + "\n" + ",".join(["1"] * (header.count(",") + 1)) + "\n")
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.csv").exists()


def python_error(bundle: Path, source: Path, tmp_path: Path) -> str:
    """The message `vaeguard score` fails with on ``source`` (the test fails if it scores it)."""
    with pytest.raises(PipelineError) as failure:
        score_files(ScoreJob(bundle, (source,), tmp_path / "refused.py.parquet", device="cpu"))
    return str(failure.value)


def edited_rows(incoming_csv: Path, edit, rows: int = 12) -> tuple[list[str], list[list[str]]]:
    """The header and the first rows of the incoming batch as text, after ``edit(at, rows)``."""
    table = list(csv.reader(incoming_csv.open(newline="")))
    header, body = table[0], table[1:rows + 1]
    edit({name: i for i, name in enumerate(header)}, body)
    return header, body


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows([header, *rows])
    return path


@pytest.mark.parametrize("name", ["incoming.txt", "incoming.tsv.gz", "incoming", "incoming.parquet"])
def test_a_file_python_would_not_read_as_csv_is_refused(trained_bundle, incoming_csv, node_example, tmp_path, name):
    # `vaeguard score` takes .csv and .csv.gz (any case) as CSV and refuses other names before
    # reading; Node scored a .txt or .tsv.gz, and parsed a Parquet file's bytes as CSV.
    source = tmp_path / name
    data = incoming_csv.read_bytes()
    source.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    if name.endswith(".parquet"):
        pd.read_csv(incoming_csv).to_parquet(source)
    else:
        assert "unsupported file type" in python_error(trained_bundle, source, tmp_path)
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2, done.stderr
    assert f"{source}: unsupported file type" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.csv").exists()


def test_an_empty_gz_file_is_empty_not_corrupt(trained_bundle, node_example, tmp_path):
    # Python checks the size before decompressing; Node called a zero-byte .csv.gz unreadable gzip.
    source = tmp_path / "empty.csv.gz"
    source.write_bytes(b"")
    assert "the file is empty" in python_error(trained_bundle, source, tmp_path)
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2
    assert f"{source}: the file is empty" in done.stderr


@pytest.mark.parametrize("name, kind", [
    *[("t.csv", kind) for kind in NOT_CSV_TEXT],
    ("t.csv", "utf-32-be"),       # no byte-order mark: three NUL bytes beside each character
    ("t.csv.gz", "utf-16"),       # the gzip data is what is looked at
    ("t.csv.gz", "gzip"),         # compressed twice
    ("t.csv.gz", "parquet"),
])
def test_a_csv_that_is_another_format_or_encoding_is_refused_as_python_refuses_it(trained_bundle, node_example,
                                                                                  tmp_path, name, kind):
    # Node parsed such bytes as CSV text: Parquet, a workbook or gzip data was "text that is not
    # UTF-8 (header, column 1)", UTF-16 without a byte-order mark "missing column(s) "row_id", ...".
    made = tmp_path / "made"
    made.mkdir()
    data = not_csv_text(kind, made)
    source = tmp_path / name
    source.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    out = tmp_path / "out.csv"
    out.write_bytes(b"earlier scores\n")
    python = python_error(trained_bundle, source, tmp_path)
    assert "not CSV text; " in python or "not UTF-8 text (it looks UTF-" in python, python
    done = run_node(node_example, trained_bundle, source, out)
    assert done.returncode == 2, done.stderr
    if "Parquet" in python:  # the same words up to the fix: this example reads no Parquet
        what = python.split("; ")[0]
        assert done.stderr.startswith(f"error: {what}; ") and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.endswith("name it .parquet and score it with `vaeguard score` (this example reads CSV "
                                    "only)\n")
    else:
        assert done.stderr == f"error: {python}\n"
    assert out.read_bytes() == b"earlier scores\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["made", name, "out.csv"])  # no temp file left


@pytest.mark.parametrize("first, value", [
    ("PAR1", "x"),         # a column named like Parquet's marker: no NUL byte follows it
    ("note", "a\0b"),      # a stray NUL in a value the bundle does not read
])
def test_csv_text_that_starts_like_another_format_is_scored_as_python_scores_it(trained_bundle, incoming_csv,
                                                                               node_example, tmp_path, first, value):
    header, rows = edited_rows(incoming_csv, lambda at, rows: None)
    source = write_rows(tmp_path / "looks.csv", [first, *header], [["MARK", *row] for row in rows])
    source.write_bytes(source.read_bytes().replace(b"MARK", value.encode()))
    python, node = score_both(node_example, trained_bundle, source, tmp_path)
    assert_same_results(python, node)
    assert len(node) == 12


def test_a_missing_id_column_is_refused_as_python_refuses_it(trained_bundle, incoming_csv, node_example, tmp_path):
    # `vaeguard score` requires the bundle's id columns (pipeline.batch_score.required_columns);
    # Node wrote scores without them, rows nobody could match back to their input.
    source = tmp_path / "no_id.csv"
    pd.read_csv(incoming_csv).drop(columns=["row_id"]).to_csv(source, index=False)
    assert "'row_id'" in python_error(trained_bundle, source, tmp_path)
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2
    assert 'missing column(s) "row_id"' in done.stderr and not (tmp_path / "out.csv").exists()


def test_a_label_that_is_not_0_1_or_true_false_is_refused_as_python_refuses_it(trained_bundle, incoming_csv,
                                                                                node_example, tmp_path):
    # The label is not scored, but `vaeguard score` reads it (for AUROC) when the input has it.
    def edit(at, rows):
        rows[4][at["label"]] = "yes"
    source = write_rows(tmp_path / "label.csv", *edited_rows(incoming_csv, edit))
    assert "label column 'label' must be 0 (normal) or 1 (anomaly) but row 5 holds 'yes'" in \
        python_error(trained_bundle, source, tmp_path)
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2
    assert 'label column "label" must be 0 (normal) or 1 (anomaly) but row 5 (line 6) holds "yes"' in done.stderr


def test_labels_python_takes_node_takes_too(trained_bundle, incoming_csv, node_example, tmp_path):
    """true/false in any of its usual cases, 1.0, and blanks: `vaeguard score` takes them since labels
    are read as text; Node refused all but numbers."""
    spellings = ["true", "False", "TRUE", "1.0", " 0 ", "", "NA"]

    def edit(at, rows):
        for i, spelling in enumerate(spellings):
            rows[i][at["label"]] = spelling
    source = write_rows(tmp_path / "labels.csv", *edited_rows(incoming_csv, edit))
    python, node = score_both(node_example, trained_bundle, source, tmp_path)
    assert len(node) == len(python) == 12
    assert node["row_id"].tolist() == python["row_id"].tolist()


@pytest.mark.parametrize("column", ["line", "row_id"])
def test_bytes_that_are_not_utf8_in_a_used_column_are_refused(trained_bundle, incoming_csv, node_example, tmp_path,
                                                             column):
    # pyarrow refuses them in text columns; Node decoded them to U+FFFD and scored the row.
    def edit(at, rows):
        rows[6][at[column]] = "MARK"
    source = write_rows(tmp_path / "latin1.csv", *edited_rows(incoming_csv, edit))
    source.write_bytes(source.read_bytes().replace(b"MARK", b"caf\xe9"))
    assert "not UTF-8" in python_error(trained_bundle, source, tmp_path)
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2
    assert f'holds text that is not UTF-8 (column "{column}", row 7, line 8)' in done.stderr
    assert not (tmp_path / "out.csv").exists()


def test_bytes_that_are_not_utf8_in_an_unused_column_are_ignored_as_in_python(trained_bundle, incoming_csv,
                                                                             node_example, tmp_path):
    # pyarrow does not read the columns the bundle does not use: the file scores on both sides.
    def edit(at, rows):
        for i, row in enumerate(rows):
            row.append("caf\u00e9" if i != 3 else "MARK")
    header, rows = edited_rows(incoming_csv, edit)
    source = write_rows(tmp_path / "note.csv", header + ["note"], rows)
    source.write_bytes(source.read_bytes().replace(b"MARK", b"caf\xe9"))
    python, node = score_both(node_example, trained_bundle, source, tmp_path)
    assert_same_results(python, node)
    assert len(node) == 12


def test_a_header_that_is_not_utf8_is_refused(trained_bundle, incoming_csv, node_example, tmp_path):
    # `vaeguard score` cannot read such a header either (it stops on a UnicodeDecodeError).
    source = tmp_path / "header.csv"
    source.write_bytes(incoming_csv.read_bytes().replace(b"label", b"caf\xe9", 1))
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2
    assert "holds text that is not UTF-8 (header, column 12)" in done.stderr


def test_utf8_decoding_does_not_depend_on_where_chunks_end(node_example):
    # A file arrives in 1 MiB reads (gzip: smaller pieces), so a character, valid or not, can be
    # split between two: every split must decode as the whole does, invalid bytes marked the same.
    program = """
    const { decodeUtf8 } = require(process.argv[1]);
    const bytes = Buffer.from([0x61, 0xc3, 0xa9, 0xe2, 0x82, 0xac, 0xf0, 0x9f, 0x98, 0x80, 0xe2, 0x82, 0x62, 0xff,
                               0xc0, 0xaf, 0xed, 0xa0, 0x80, 0xf0, 0x9f]);
    const decode = async (parts) => { let t = ''; for await (const s of decodeUtf8(parts)) t += s; return t; };
    (async () => {
      const whole = await decode([bytes]);
      for (let i = 0; i <= bytes.length; i++) {
        for (let j = i; j <= bytes.length; j++) {
          const split = await decode([bytes.subarray(0, i), bytes.subarray(i, j), bytes.subarray(j)]);
          if (split !== whole) throw new Error(`split at ${i}, ${j}: ${JSON.stringify(split)}`);
        }
      }
      process.stdout.write(JSON.stringify(whole));
    })().catch((err) => { console.error(err.message); process.exit(1); });
    """
    done = subprocess.run(["node", "-e", program, str(node_example)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Valid characters intact; each invalid byte a lone surrogate, so no cell can pass as valid text.
    assert json.loads(done.stdout) == "a\u00e9\u20ac\U0001F600" + "\udce2\udc82b\udcff\udcc0\udcaf\udced\udca0\udc80\udcf0\udc9f"


def test_a_nul_inside_a_category_scores_as_in_python(trained_bundle, incoming_csv, node_example, tmp_path):
    # onnxruntime-node passes strings to the graph as C strings, cut at a NUL: "A\0x" scored as the
    # known "A", while Python passes the whole string, a category never seen in training.
    def edit(at, rows):
        rows[2][at["line"]] = rows[2][at["line"]] + "\0x"
        rows[5][at["shift"]] = "\0"
    source = write_rows(tmp_path / "nul.csv", *edited_rows(incoming_csv, edit))
    python, node = score_both(node_example, trained_bundle, source, tmp_path)
    assert_same_results(python, node)
    # Not vacuous: the NUL changes the score, as an unseen category does.
    def unseen(at, rows):
        rows[2][at["line"]] = "never-seen"
        rows[5][at["shift"]] = "never-seen"
    plain = write_rows(tmp_path / "unseen.csv", *edited_rows(incoming_csv, unseen))
    unseen_python, _ = score_both(node_example, trained_bundle, plain, tmp_path)
    np.testing.assert_allclose(python["score"], unseen_python["score"], rtol=1e-6)


def unseen_warnings_of_both(capsys, script: Path, bundle: Path, source: Path, tmp_path: Path,
                            marker: str = "never saw") -> tuple[list[str], list[str]]:
    """The lines on values the bundle never saw (with ``marker``, other warnings on the input) that
    `vaeguard score` and Node print on stderr for ``source``."""
    code, _, err = run_main(capsys, "score", bundle, source, "--output", tmp_path / f"{source.stem}.py.parquet",
                            "--device", "cpu")
    assert code == 0, err
    done = run_node(script, bundle, source, tmp_path / f"{source.stem}.node.csv")
    assert done.returncode == 0, done.stderr
    return ([line for line in err.splitlines() if marker in line],
            [line for line in done.stderr.splitlines() if marker in line])


def respelled(at, rows):
    """A night whose export spells things anew: lines 'a' and 'b' for 'A' and 'B', shift 'N' for
    'night', and 30 lines blank, 5 of them as "NA" (training had none, so a blank is unseen too)."""
    for i, row in enumerate(rows):
        line = row[at["line"]]
        row[at["line"]] = "" if i < 25 else "NA" if i < 30 else {"A": "a", "B": "b"}.get(line, line)
        row[at["shift"]] = "N" if row[at["shift"]] == "night" else row[at["shift"]]


@pytest.mark.parametrize("training_share, warned", [
    (0.0, {"line": "(81%)", "shift": "(40%)"}),       # as exported: training sent no row to the bucket
    (None, {"line": "(81%)"}),                          # a bundle from before the share: warns from half the rows
    (0.3, {"line": "(81%; 30% in training)"}),          # 30% rare values in training: warns above 65%
])
def test_a_column_spelled_anew_warns_as_vaeguard_score_does(trained_bundle, incoming_csv, node_example, tmp_path,
                                                           capsys, training_share, warned):
    # `vaeguard score` warns when a column's values are mostly ones the bundle never saw
    # (pipeline.unseen); Node scored such a night, every row higher, without a word.
    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["preprocessing"]["categorical"]:
        assert entry.pop("unknown_share") == 0.0
        if training_share is not None:
            entry["unknown_share"] = training_share
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    source = write_rows(tmp_path / "night.csv", *edited_rows(incoming_csv, respelled, rows=2000))
    python, node = unseen_warnings_of_both(capsys, node_example, bundle, source, tmp_path)
    assert node == python
    assert [line.split(": column ")[1].split("'")[1] for line in python] == list(warned)
    for line, (column, share) in zip(python, warned.items()):
        assert line.startswith(f"warning: {source}: column '{column}': ") and share in line
    assert "1,616 of 2,000 rows" in python[0] and "(e.g. 'a', 'b', '' (blank)); it knows 'A', 'B', 'C';" in python[0]
    # Counts and examples add up alike over chunks of a few rows (Node) and one batch (Python).
    chunked = run_node(node_example, bundle, source, tmp_path / "chunked.csv", "--chunk-rows", "7")
    assert [line for line in chunked.stderr.splitlines() if "never saw" in line] == python


def left_blank(at, rows):
    """A night whose export left 'temperature' (never blank in training) and 'vibration' (a few percent
    blank in training) empty, spelled as pyarrow's null markers, and 'pressure' blank in 3 rows only."""
    for i, row in enumerate(rows):
        row[at["temperature"]] = ("", "NA", "nan", "NULL")[i % 4]
        row[at["vibration"]] = "" if i % 2 else "NaN"
        if i < 3:
            row[at["pressure"]] = ""


def test_a_numeric_column_left_blank_warns_as_vaeguard_score_does(trained_bundle, incoming_csv, node_example,
                                                                  tmp_path, capsys):
    # `vaeguard score` warns when a numeric column is blank far more often than in training (every such
    # row gets training's median, so the column can flag none of them); Node scored it without a word.
    source = write_rows(tmp_path / "night.csv", *edited_rows(incoming_csv, left_blank, rows=2000))
    python, node = unseen_warnings_of_both(capsys, node_example, trained_bundle, source, tmp_path, "are blank")
    assert node == python
    numeric = {s["name"]: s for s in
               json.loads((trained_bundle / "manifest.json").read_text())["preprocessing"]["numeric"]}
    assert python[0] == (f"warning: {source}: column 'temperature': 2,000 of 2,000 rows (100%; none in training) are "
                         f"blank; scoring gives a blank training's median ({numeric['temperature']['median']:.6g}), so "
                         f"no value of this column can flag those rows: fill the column, or check the export that "
                         f"wrote the file")
    # Training's share of a column it saw blank is the manifest's, for both: the same words.
    training = percent(numeric["vibration"]["missing_share"])
    assert len(python) == 2 and python[1].startswith(f"warning: {source}: column 'vibration': 2,000 of 2,000 rows "
                                                     f"(100%; {training} in training) are blank;")
    # Counts add up alike over chunks of a few rows (Node) and one batch (Python).
    chunked = run_node(node_example, trained_bundle, source, tmp_path / "chunked.csv", "--chunk-rows", "7")
    assert [line for line in chunked.stderr.splitlines() if "are blank" in line] == python


def _new_values(count: int):
    """Some lines of the batch are 'D', never seen in training; more become 'E' until ``count`` are new."""
    def edit(at, rows):
        new = sum(row[at["line"]] not in ("A", "B", "C") for row in rows)
        assert 10 <= new < count
        for row in [row for row in rows if row[at["line"]] == "A"][:count - new]:
            row[at["line"]] = "E"
    return edit


def _blank_cells(count: int):
    """'temperature', never blank in training, blank in ``count`` rows."""
    def edit(at, rows):
        assert all(row[at["temperature"]] for row in rows)
        for row in rows[:count]:
            row[at["temperature"]] = ""
    return edit


@pytest.mark.parametrize("count", [20, 21])
@pytest.mark.parametrize("edit, said, warning", [
    (_new_values, "never saw", "column 'line': 21 of 2,000 rows (1.1%) hold values the bundle never saw"),
    (_blank_cells, "are blank", "column 'temperature': 21 of 2,000 rows (1.1%; none in training) are blank"),
], ids=["unseen", "blank"])
def test_a_few_new_values_or_blank_cells_warn_for_neither_and_the_limit_is_the_same(
        trained_bundle, incoming_csv, node_example, tmp_path, capsys, count, edit, said, warning):
    # 20 rows of 2,000 are 1.0%, not above the 1% a warning needs; 21 are.
    source = write_rows(tmp_path / "few.csv", *edited_rows(incoming_csv, edit(count), rows=2000))
    python, node = unseen_warnings_of_both(capsys, node_example, trained_bundle, source, tmp_path, said)
    assert node == python
    assert len(python) == (count == 21)
    assert not python or warning in python[0]


def node_blank_shares(script: Path, bundle: Path) -> dict:
    """Node's trainingBlankShares for the bundle's manifest."""
    program = """
    const { trainingBlankShares } = require(process.argv[1]);
    const manifest = JSON.parse(require('node:fs').readFileSync(`${process.argv[2]}/manifest.json`, 'utf8'));
    process.stdout.write(JSON.stringify(Object.fromEntries(trainingBlankShares(manifest))));
    """
    done = subprocess.run(["node", "-e", program, str(script), str(bundle)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_training_blank_shares_are_python_s(trained_bundle, incoming_csv, node_example, tmp_path, capsys):
    """Both take training's share of blank rows from the manifest (preprocessing.numeric[].missing_share),
    where Node decoded the calibration rows' Parquet footer, and Python read the rows, for the share of
    other rows. A bundle exported before it: 0 where training had no blank, else unknown to Node (it
    never warns there), while Python still reads the calibration rows."""
    from pipeline.bundle import Bundle
    from pipeline.unseen import training_missing_shares

    python = training_missing_shares(Bundle.load(trained_bundle))
    assert node_blank_shares(node_example, trained_bundle) == python
    assert 0 < python["vibration"] < 0.1 and python["temperature"] == 0.0  # not vacuous: both kinds of column
    # The manifest's number, whatever it is: neither program computes its own.
    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    vibration = next(e for e in manifest["preprocessing"]["numeric"] if e["name"] == "vibration")
    vibration["missing_share"] = 0.25
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert node_blank_shares(node_example, bundle) == training_missing_shares(Bundle.load(bundle)) == {
        **python, "vibration": 0.25}
    # A bundle exported before the share was recorded.
    has_indicator = {}
    for entry in manifest["preprocessing"]["numeric"]:
        del entry["missing_share"]
        has_indicator[entry["name"]] = entry["has_indicator"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    node = node_blank_shares(node_example, bundle)
    assert node == {name: None if indicator else 0.0 for name, indicator in has_indicator.items()}
    old = training_missing_shares(Bundle.load(bundle))
    assert all(old[name] == 0.0 for name, indicator in has_indicator.items() if not indicator)
    assert 0 < old["vibration"] < 0.1  # Python: the calibration rows' share
    source = write_rows(tmp_path / "night.csv", *edited_rows(incoming_csv, left_blank, rows=2000))
    python_lines, node_lines = unseen_warnings_of_both(capsys, node_example, bundle, source, tmp_path, "are blank")
    assert [line.split("'")[1] for line in python_lines] == ["temperature", "vibration"]
    assert node_lines == python_lines[:1]  # as documented: unknown, so no warning on 'vibration' from Node


def test_a_median_is_written_as_python_writes_it(node_example):
    """The warning's median, f"{median:.6g}": Python rounds an exact half to even and writes an exponent
    below 1e-4 and from 1e6 up, where JS's toPrecision rounds up and writes others."""
    rng = np.random.default_rng(5)
    values = [0.0, -0.0, 1.0, 0.5, -2.5, 123456.5, 123457.5, 1234565.0, 999999.5, 9999995.0, 1e-4, 9.999995e-5,
              1e-5, 1.234565e-5, 100000.0, 1e6, 1e16, 1e22, 5e-324, 1.7976931348623157e308, 2.675, 69.85539245605469]
    values += [float(v) for v in rng.normal(size=300) * 10.0 ** rng.integers(-9, 10, size=300)]
    values += [float(np.float32(v)) for v in rng.uniform(-1e4, 1e4, size=300)]
    values += [int(v) / 2 ** int(k) for v, k in zip(rng.integers(-10**9, 10**9, size=300), rng.integers(0, 12, size=300))]
    program = """
    const { general } = require(process.argv[1]);
    const values = JSON.parse(require('node:fs').readFileSync(0, 'utf8'));
    process.stdout.write(JSON.stringify(values.map((v) => general(v === 'negative zero' ? -0 : v))));
    """
    done = subprocess.run(["node", "-e", program, str(node_example)], capture_output=True, text=True, timeout=60,
                          input=json.dumps(["negative zero" if v == 0 and np.signbit(v) else v for v in values]))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [f"{v:.6g}" for v in values]
    assert f"{123456.5:.6g}" == "123456" and f"{1e-5:.6g}" == "1e-05"  # not vacuous: a half to even, an exponent


def test_percentages_and_values_are_written_as_python_writes_them(node_example):
    """The warning's parts that differ between the languages: rounding an exact half (Python to even,
    toFixed up) and Python's repr() of a value (quotes, escapes, a cut at 40 characters)."""
    from pipeline.unseen import _shown, percent

    shares = sorted({i / n for n in (8, 16, 40, 80, 160, 200, 2000, 3) for i in range(n + 1)} | {0.0995, 0.999, 0.105})
    values = ["Y", "it's", 'say "hi"', "both ' and \"", "tab\there", "new\nline\r", "nul\0", "bell\x07", "del\x7f",
              "nbsp\xa0", "zero\u200bwidth", "para\u2029", "café", "日本", "smile \U0001F600", "tag \U000E0041",
              "back\\slash", " ", "private \ue000", "x" * 40, "x" * 41, "\U0001F600" * 41, "é" * 45, ""]
    program = """
    const { percent, shown } = require(process.argv[1]);
    const { shares, values } = JSON.parse(require('node:fs').readFileSync(0, 'utf8'));
    process.stdout.write(JSON.stringify({ percents: shares.map(percent), shown: values.map(shown) }));
    """
    done = subprocess.run(["node", "-e", program, str(node_example)], capture_output=True, text=True, timeout=60,
                          input=json.dumps({"shares": shares, "values": values}))
    assert done.returncode == 0, done.stderr
    node = json.loads(done.stdout)
    assert node["percents"] == [percent(share) for share in shares]
    assert node["shown"] == [_shown(value) for value in values]
    assert percent(0.125) == "12%" and percent(1 / 16) == "6.2%"  # not vacuous: exact halves are among them


@pytest.mark.slow
def test_boolean_and_integer_code_columns_score_alike_in_any_spelling(node_example, tmp_path, capsys):
    """The graph maps a boolean column's true/True/TRUE (false...) and an integer code's 3.0 itself: Node
    feeds the CSV's text as written, and a pandas CSV's True/False must score as the Parquet bool the
    bundle trained on, and the 2.0 pandas writes for a code column with a blank as the 2 it trained on."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=600)
    frame = pd.DataFrame({"row_id": [f"r{i}" for i in range(600)], "a": a, "b": 2 * a + rng.normal(scale=0.1, size=600),
                          "flag": a + rng.normal(scale=0.3, size=600) > 0,
                          "code": np.digitize(a + rng.normal(scale=0.3, size=600), [-0.5, 0.5]) + 1})
    frame.to_parquet(tmp_path / "train.parquet")
    job = TrainJob(data=tmp_path / "train.parquet", name="flags", out_dir=tmp_path / "out", id_columns=("row_id",),
                   config=quiet_config(max_epochs=3))
    bundle = Path(run_training(job)["bundle"])
    frame.to_csv(tmp_path / "pandas.csv", index=False)  # True/False
    frame.assign(flag=frame["flag"].map({True: "true", False: "FALSE"})).to_csv(tmp_path / "lower.csv", index=False)
    python, node = score_both(node_example, bundle, tmp_path / "pandas.csv", tmp_path)
    assert_same_results(python, node)
    _, lower = score_both(node_example, bundle, tmp_path / "lower.csv", tmp_path)
    assert_same_results(python, lower)
    frame.assign(flag="maybe").to_csv(tmp_path / "unknown.csv", index=False)
    _, unknown = score_both(node_example, bundle, tmp_path / "unknown.csv", tmp_path)
    assert (unknown["score"] > node["score"] + 1e-3).mean() > 0.9  # not vacuous: the flag is read, not ignored
    frame.assign(code=frame["code"].where(frame.index != 7)).to_csv(tmp_path / "decimal.csv", index=False)
    assert ",2.0\n" in (tmp_path / "decimal.csv").read_text()
    python_decimal, decimal = score_both(node_example, bundle, tmp_path / "decimal.csv", tmp_path)
    assert_same_results(python_decimal, decimal)
    assert_same_results(python.drop(index=7).reset_index(drop=True), decimal.drop(index=7).reset_index(drop=True))
    # Those spellings are no values the bundle never saw, for Node either (counted verbatim, every row
    # of True/False or 2.0 would be); 'maybe' is, and both say so in the same words.
    for name in ("pandas", "lower", "decimal"):
        assert unseen_warnings_of_both(capsys, node_example, bundle, tmp_path / f"{name}.csv", tmp_path) == ([], [])
    python_unknown, node_unknown = unseen_warnings_of_both(capsys, node_example, bundle, tmp_path / "unknown.csv",
                                                           tmp_path)
    assert node_unknown == python_unknown and len(python_unknown) == 1
    assert "column 'flag': 600 of 600 rows (100%) hold values the bundle never saw (e.g. 'maybe'); it knows " \
        in python_unknown[0]


def _row_as_missing(at, rows):
    rows[3][at["temperature"]] = ""


# Found by a differential fuzz of Node against `vaeguard score` on CSV cells (edge spellings of
# numbers, labels, quoting): the cells where the two read a file differently before.
@pytest.mark.parametrize("column, value, outcome", [
    # C's NaN with a payload (MSVC's printf writes "-nan(ind)"): pyarrow reads it as NaN, missing
    # like "nan"; Node refused the file as "must be numeric".
    ("temperature", "nan(123)", "missing"),
    ("temperature", " -nan(ind) ", "missing"),
    ("temperature", "NaN(0x7ff8)", "missing"),
    # A byte order mark is no white space to Python, which refuses the label; JS's trim() removed
    # it, and Node scored the file.
    ("label", "\ufeff1", "refused"),
    ("label", "0\ufeff", "refused"),
])
def test_cells_that_python_and_node_read_alike(trained_bundle, incoming_csv, node_example, tmp_path,
                                              column, value, outcome):
    def edit(at, rows):
        rows[3][at[column]] = value
    source = write_rows(tmp_path / "cell.csv", *edited_rows(incoming_csv, edit))
    if outcome == "refused":
        assert "must be 0 (normal) or 1 (anomaly) but row 4" in python_error(trained_bundle, source, tmp_path)
        done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
        assert done.returncode == 2, done.stderr
        shown = json.dumps(value, ensure_ascii=False)
        assert f"must be 0 (normal) or 1 (anomaly) but row 4 (line 5) holds {shown}" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.csv").exists()
        return
    python, node = score_both(node_example, trained_bundle, source, tmp_path)
    assert_same_results(python, node)
    # Read as missing, not as some number: the row scores as it does with the cell left empty.
    blank = write_rows(tmp_path / "blank.csv", *edited_rows(incoming_csv, _row_as_missing))
    _, node_blank = score_both(node_example, trained_bundle, blank, tmp_path)
    assert node["score"].tolist() == node_blank["score"].tolist()


def test_a_quote_never_closed_is_refused_naming_file_and_line(trained_bundle, incoming_csv, node_example, tmp_path):
    # pyarrow takes the rest of the file as that one value (the rows after it are lost without a
    # word when it sits in the last column); Node refused, but without the file or a fix.
    header, rows = edited_rows(incoming_csv, lambda at, rows: None)
    source = write_rows(tmp_path / "quote.csv", header + ["note"], [row + ["ok"] for row in rows])
    lines = source.read_text().splitlines(keepends=True)
    lines[5] = lines[5].replace(",ok\n", ',"never closed\n')
    source.write_text("".join(lines))
    done = run_node(node_example, trained_bundle, source, tmp_path / "out.csv")
    assert done.returncode == 2, done.stderr
    assert f"{source}: line 6 opens a quoted field that is never closed" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.csv").exists()


def bad_value_at_row_42(incoming_csv: Path, tmp_path: Path) -> Path:
    """The incoming batch with a value Node refuses at row 42: an output error that names the output
    instead of this shows the output was checked before any row was read."""
    frame = pd.read_csv(incoming_csv).astype({"temperature": object})
    frame.loc[41, "temperature"] = "broken"
    source = tmp_path / "bad.csv"
    frame.to_csv(source, index=False)
    return source


@pytest.mark.parametrize("link", ["same", "dot", "hard", "symbolic"])
def test_an_output_that_is_the_input_is_refused_before_any_work(trained_bundle, incoming_csv, node_example, tmp_path,
                                                                link):
    # `vaeguard score` refuses it (pipeline.outputs.check_not_an_input); Node scored the file and
    # renamed the scores over it, exit 0.
    source = tmp_path / "t.csv"
    shutil.copy(incoming_csv, source)
    out = {"same": str(source), "dot": f"{tmp_path}/./t.csv", "hard": tmp_path / "hard.csv",
           "symbolic": tmp_path / "link.csv"}[link]
    if link == "hard":
        os.link(source, out)
    elif link == "symbolic":
        os.symlink(source, out)
    done = run_node(node_example, trained_bundle, source, out)  # "/./" kept as written
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: output {out}: is the input {source}, which the scores would replace; " \
        "write the scores to another file\n"
    assert source.read_bytes() == incoming_csv.read_bytes()


@pytest.mark.parametrize("output, expected", [
    ("folder.csv", "is an existing directory; expected a path for a file, or move that directory away"),
    ("scores.parquet", 'unsupported extension ".parquet"; this example writes CSV: name the output .csv'),
    ("file.csv/scores.csv", "TMP/file.csv is a file, not a directory; write into a directory, or move that file away"),
    ("BUNDLE/scores.csv", "is inside the bundle"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(trained_bundle, incoming_csv, node_example,
                                                                     tmp_path, output, expected):
    # Node scored every row first and then failed on a raw EISDIR, wrote CSV text into a .parquet
    # file, and wrote scores into the bundle folder a retrain replaces whole.
    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "file.csv").write_text("x\n")
    out = tmp_path / output.replace("BUNDLE", "bundle")
    done = run_node(node_example, bundle, bad_value_at_row_42(incoming_csv, tmp_path), out)
    assert done.returncode == 2, done.stderr
    expected = expected.replace("TMP", str(tmp_path))
    assert done.stderr.startswith(f"error: output {out}: {expected}") and done.stderr.count("\n") == 1
    assert not out.is_file() and sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in trained_bundle.iterdir())


def test_missing_output_folders_are_created_and_removed_again_on_failure(trained_bundle, incoming_csv, node_example,
                                                                        tmp_path):
    # As `vaeguard score` does; Node failed on a raw "ENOENT ... '.o.csv.tmp-<pid>'".
    out = tmp_path / "new" / "deeper" / "scores.csv"
    done = run_node(node_example, trained_bundle, bad_value_at_row_42(incoming_csv, tmp_path), out)
    assert done.returncode == 2 and 'must be numeric but row 42' in done.stderr
    assert not (tmp_path / "new").exists()  # a failed run leaves no folder it made
    done = run_node(node_example, trained_bundle, incoming_csv, out)
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(out)) == len(pd.read_csv(incoming_csv))


def reverse_numeric(manifest: dict) -> None:
    for columns in (manifest["schema"]["numeric"], manifest["onnx"]["scorer_inputs"][0]["columns"],
                    manifest["preprocessing"]["numeric"]):
        columns.reverse()


def raise_threshold(manifest: dict) -> None:
    manifest["calibration"]["threshold"] *= 1.5


def another_target(manifest: dict) -> None:
    manifest["calibration"]["target_fpr"] = 0.05


@pytest.mark.parametrize("edit, expected", [
    (reverse_numeric, "its numeric columns are ['"),
    (raise_threshold, "its threshold is "),
    (another_target, "its target FPR is 0.01, the manifest's 0.05"),
])
def test_a_manifest_edited_by_hand_is_refused_as_python_refuses_it(trained_bundle, incoming_csv, node_example,
                                                                   tmp_path, edit, expected):
    # Only scorer.onnx is hash-checked: with the numeric order reversed Node fed each column into
    # another's slot, and with the threshold raised it reported one the graph does not flag at,
    # exit 0. `vaeguard score` checks the manifest against the graph's own metadata; Node too now.
    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    python = python_error(bundle, incoming_csv, tmp_path)
    assert expected in python
    done = run_node(node_example, bundle, incoming_csv, tmp_path / "out.csv")
    assert done.returncode == 1
    assert done.stderr == f"error: {python}\n"
    assert not (tmp_path / "out.csv").exists()


def test_categorical_inputs_swapped_in_the_manifest_are_refused(trained_bundle, incoming_csv, node_example, tmp_path):
    # Python feeds cat_<column> by the schema's names; Node reads the pairing from
    # onnx.scorer_inputs, where two swapped columns fed each one's values to the other's input.
    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    first, second = [entry for entry in manifest["onnx"]["scorer_inputs"] if entry["dtype"] == "string"][:2]
    first["column"], second["column"] = second["column"], first["column"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    done = run_node(node_example, bundle, incoming_csv, tmp_path / "out.csv")
    assert done.returncode == 1
    assert f'scorer input "{first["name"]}" is given column "{first["column"]}"' in done.stderr


def test_onnx_metadata_reads_as_onnx_reads_it(trained_bundle, node_example):
    """onnxruntime-node exposes no custom metadata: score.js reads ModelProto.metadata_props itself."""
    import onnx

    program = """
    const { onnxMetadata } = require(process.argv[1]);
    const files = process.argv.slice(2);
    const read = (f) => Object.fromEntries(onnxMetadata(require('node:fs').readFileSync(f), f));
    process.stdout.write(JSON.stringify(files.map(read)));
    """
    files = [trained_bundle / name for name in ("scorer.onnx", "encoder.onnx", "decoder.onnx")]
    done = subprocess.run(["node", "-e", program, str(node_example), *map(str, files)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    expected = [{p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props} for f in files]
    assert json.loads(done.stdout) == expected
    assert "vaeguard.numeric_columns" in expected[0] and "vaeguard.threshold" in expected[0]
