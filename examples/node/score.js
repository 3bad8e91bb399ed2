#!/usr/bin/env node
// Score a CSV with a vaeguard bundle's scorer.onnx from Node.js, without Python.
//
//   node score.js BUNDLE_DIR INPUT.csv OUTPUT.csv [--chunk-rows N]
//
// Reads BUNDLE_DIR/manifest.json, checks scorer.onnx against the sha256 the manifest records and
// the manifest against scorer.onnx's own metadata and inputs (numeric column order, threshold,
// target FPR, calibration size), as `vaeguard score` does, feeds the CSV's feature columns to the
// graph in chunks and writes one row per input row:
// the id columns the manifest names (required, as the features are), then score, recon, kl,
// p_value and is_anomaly, the same columns `vaeguard score ... -o OUTPUT.csv` writes.
// The threshold is baked into scorer.onnx, so is_anomaly needs no extra step. A categorical
// column whose values are mostly ones the bundle never saw, and a numeric column blank far more
// often than in training, get `vaeguard score`'s warnings on stderr.
//
// The CSV is read the way the Python pipeline reads it (pyarrow's defaults), so both give the
// same decisions: the usual null markers ("", "NA", "null", "NaN", ...) are missing in every
// feature and label column (an id column keeps them as written), numeric cells are parsed as
// float64 then rounded to float32, and categorical cells are passed verbatim as strings (missing -> ""). Text that is not UTF-8 is refused in the
// header and in the columns read (ids, features, label), and ignored in the others, as pyarrow
// does; a label column, when the input has one, must hold 0/1 or true/false, as `vaeguard score` reads it.
// Input names are those `vaeguard score` reads as CSV: .csv or .csv.gz in any case; a .gz input
// is decompressed as it streams. The header is checked as `vaeguard score` checks it:
// a single column holding ;, | or a tab (another separator) and a column named twice are refused.
// Before the CSV is parsed, a file whose first bytes show it is no UTF-8 text (Parquet, a
// workbook, gzip data, UTF-16 or UTF-32) is refused, named for what it is, as `vaeguard score` does.
//
// Exit status: 0 on success, 2 when the command line or the input CSV is wrong (missing
// column, non-numeric value, malformed CSV), 1 when the bundle is unusable (bad manifest,
// sha256 mismatch, a manifest that disagrees with the graph) or scoring fails. Errors are one line
// on stderr; the output file is written to a temporary name and renamed into place only when every
// row has been scored. OUTPUT is checked before any work, as `vaeguard score` checks --output: it
// must be named .csv, and may not be the input, an existing folder or inside the bundle; folders
// above it that are missing are created (and removed again if the run fails).

'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const zlib = require('node:zlib');
const { isUtf8 } = require('node:buffer');
const ort = require('onnxruntime-node');

const BUNDLE_FORMAT = 'vaeguard-bundle';
const BUNDLE_FORMAT_VERSION = 1;
const OUTPUT_NAMES = ['score', 'recon', 'kl', 'p_value', 'is_anomaly'];
const DEFAULT_CHUNK_ROWS = 65536;

// pyarrow.csv.ConvertOptions().null_values: a cell equal to one of these (exactly, before any
// trimming, quoted or not) is missing, in numeric and text columns alike.
const NULL_VALUES = new Set([
  '', '#N/A', '#N/A N/A', '#NA', '-1.#IND', '-1.#QNAN', '-NaN', '-nan', '1.#IND', '1.#QNAN',
  'N/A', 'NA', 'NULL', 'NaN', 'n/a', 'nan', 'null',
]);

const USAGE = 'usage: node score.js BUNDLE_DIR INPUT.csv OUTPUT.csv [--chunk-rows N]';

/** An error shown as one line; `status` is the process exit status. */
class UserError extends Error {
  constructor(message, status = 1) {
    super(message);
    this.status = status;
  }
}
// The input or the command line is wrong: exit status 2.
const inputError = (message) => new UserError(message, 2);

// ---------------------------------------------------------------------------------------------
// The bundle

function readManifest(bundleDir) {
  const manifestPath = path.join(bundleDir, 'manifest.json');
  let text;
  try {
    text = fs.readFileSync(manifestPath, 'utf8');
  } catch {
    throw new UserError(`${bundleDir}: not a bundle (no manifest.json); pass a folder written by \`vaeguard train\``);
  }
  let manifest;
  try {
    manifest = JSON.parse(text);
  } catch (err) {
    throw new UserError(`${manifestPath}: not valid JSON (${err.message})`);
  }
  if (manifest.format !== BUNDLE_FORMAT || manifest.format_version !== BUNDLE_FORMAT_VERSION) {
    throw new UserError(`${manifestPath}: expected format ${BUNDLE_FORMAT} v${BUNDLE_FORMAT_VERSION}, ` +
      `got ${manifest.format} v${manifest.format_version}`);
  }
  return manifest;
}

/**
 * scorer.onnx's bytes, refused unless they are the file the manifest was written for. The session
 * is made from these same bytes, so the file checked is the file scored with.
 */
function readScorer(bundleDir, manifest) {
  if (!(manifest.files || {})['scorer.onnx']) {
    throw new UserError(`${bundleDir}/manifest.json: no sha256 recorded for scorer.onnx`);
  }
  const { file, bytes } = readChecked(bundleDir, manifest, 'scorer.onnx');
  return { scorerPath: file, bytes };
}

/** A file of the bundle that the manifest lists, refused unless its sha256 is the manifest's (as Bundle.load). */
function readChecked(bundleDir, manifest, name) {
  const file = path.join(bundleDir, name);
  if (!fs.existsSync(file)) throw new UserError(`${file}: missing; copy the whole bundle folder`);
  const bytes = fs.readFileSync(file);
  const actual = crypto.createHash('sha256').update(bytes).digest('hex');
  const expected = manifest.files[name];
  if (actual !== expected) {
    throw new UserError(`${file}: sha256 ${actual.slice(0, 12)}... does not match the manifest's ` +
      `${String(expected).slice(0, 12)}...; the file was modified or corrupted: re-export or re-copy the bundle`);
  }
  return { file, bytes };
}

/**
 * Training's share of blank rows per numeric column, as `vaeguard score` takes it
 * (pipeline.unseen.training_missing_shares): the manifest's `missing_share` of each
 * preprocessing.numeric entry. A bundle exported before it was recorded says only whether training
 * had a blank (`has_indicator`): 0 where it had none, otherwise null (unknown: never warns). Python
 * reads such a bundle's share from its calibration rows, Parquet, which this example does not read.
 */
function trainingBlankShares(manifest) {
  const numeric = (manifest.preprocessing || {}).numeric || [];
  return new Map(numeric.map((stats) => [stats.name,
    typeof stats.missing_share === 'number' ? stats.missing_share : stats.has_indicator ? null : 0]));
}

/**
 * The custom metadata of an ONNX file (ModelProto.metadata_props, field 14: repeated key = 1,
 * value = 2), which onnxruntime-node does not expose (only input and output names and types).
 * The file's top-level fields are walked and skipped; only those entries are decoded.
 */
function onnxMetadata(bytes, file) {
  const entries = new Map();
  for (const [field, entry] of lengthDelimitedFields(bytes, file)) {
    if (field !== 14) continue;
    let key = '';
    let value = '';
    for (const [part, text] of lengthDelimitedFields(entry, file)) {
      if (part === 1) key = text.toString('utf8');
      else if (part === 2) value = text.toString('utf8');
    }
    entries.set(key, value);
  }
  return entries;
}

/** [field number, bytes] of each length-delimited field of one protobuf message; other fields are skipped. */
function* lengthDelimitedFields(bytes, file) {
  const malformed = () => new UserError(`${file}: not a readable ONNX file (protobuf ends early or is malformed); ` +
    're-export or re-copy the bundle');
  let at = 0;
  const varint = () => {
    let value = 0;
    for (let scale = 1; scale < 2 ** 64; scale *= 128) {
      if (at >= bytes.length) throw malformed();
      const b = bytes[at++];
      value += (b & 0x7f) * scale; // a Number: exact for any length a file can have
      if (b < 0x80) return value;
    }
    throw malformed();
  };
  while (at < bytes.length) {
    const tag = varint();
    const field = Math.floor(tag / 8);
    const wire = tag % 8;
    if (wire === 0) varint();
    else if (wire === 1) at += 8;
    else if (wire === 5) at += 4;
    else if (wire === 2) {
      const n = varint();
      if (at + n > bytes.length) throw malformed();
      yield [field, bytes.subarray(at, at + n)];
      at += n;
    } else throw malformed(); // groups (3, 4) are not in ONNX's schema
    if (at > bytes.length) throw malformed();
  }
}

/**
 * The manifest says which column goes into which slot and what the threshold is, but only
 * scorer.onnx is hash-checked: a hand-edited manifest (numeric columns reordered, a threshold
 * "adjusted") fed columns into the wrong slots, or reported a rate the graph does not flag at,
 * with exit status 0. The scorer's own metadata and inputs, covered by its hash, are the
 * reference, as `vaeguard score` holds them (pipeline.runtime.check_scorer_agrees, same words).
 * Returns the graph's threshold as its metadata writes it.
 */
function checkScorerAgrees(scorerPath, manifest, inputs, metadata, session) {
  const refuse = (what) => new UserError(`${scorerPath}: ${what}; the manifest was edited or belongs to another ` +
    'bundle: restore manifest.json or re-export the bundle');
  const calibration = manifest.calibration;
  if (!calibration || typeof calibration.threshold !== 'number') {
    throw new UserError(`${path.dirname(scorerPath)}/manifest.json: no calibration.threshold; restore manifest.json ` +
      'or re-export the bundle');
  }
  const baked = (key) => (metadata.has(`vaeguard.${key}`) ? metadata.get(`vaeguard.${key}`) : null);
  const threshold = baked('threshold');
  if (threshold !== null && Number(threshold) !== calibration.threshold) {
    throw refuse(`its threshold is ${threshold}, the manifest's ${calibration.threshold} (the threshold is baked ` +
      'into the graph; to flag at another rate, use p_value <= that rate)');
  }
  // The line at the end states the target FPR from the manifest: edited, a run flagging at 1%
  // reported itself against 5%.
  for (const [key, what] of [['target_fpr', 'target FPR'], ['n_calibration', 'number of calibration inputs']]) {
    const value = baked(key);
    if (value !== null && Number(value) !== calibration[key]) {
      throw refuse(`its ${what} is ${value}, the manifest's ${calibration[key]}`);
    }
  }
  if (calibration.expected_fpr !== calibration.rank / (calibration.n_calibration + 1)) {
    throw refuse(`the manifest's expected FPR ${calibration.expected_fpr} is not its rank / (n_calibration + 1) ` +
      `= ${calibration.rank} / ${calibration.n_calibration + 1}`);
  }
  const numeric = inputs.find((input) => input.kind === 'numeric');
  const columns = baked('numeric_columns');
  if (columns !== null) {
    const graph = JSON.parse(columns);
    const fed = numeric ? numeric.columns : [];
    if (JSON.stringify(graph) !== JSON.stringify(fed)) {
      throw refuse(`its numeric columns are ${pyList(graph)}, the manifest's ${pyList(fed)}`);
    }
  }
  const graphInputs = [...session.inputNames].sort();
  const declared = inputs.map((input) => input.name).sort();
  if (JSON.stringify(graphInputs) !== JSON.stringify(declared)) {
    throw refuse(`its inputs are ${pyList(graphInputs)}, the manifest's onnx.scorer_inputs ${pyList(declared)}`);
  }
  const shape = numeric && (session.inputMetadata.find((m) => m.name === 'numeric') || {}).shape;
  if (shape && typeof shape[1] === 'number' && shape[1] !== numeric.columns.length) {
    throw refuse(`its numeric input takes ${shape[1]} columns, the manifest's onnx.scorer_inputs names ` +
      `${numeric.columns.length}`);
  }
  return threshold !== null ? threshold : String(calibration.threshold);
}

/** Python's repr() of a list of str, as `vaeguard score`'s messages write one. */
function pyList(names) {
  return `[${names.map(pyRepr).join(', ')}]`;
}

/**
 * The graph's inputs from manifest.onnx.scorer_inputs: `numeric` (float32 [N, n], one column
 * per entry of `columns`, NaN for missing) and one string [N] input per categorical column.
 */
function scorerInputs(manifest) {
  const declared = (manifest.onnx || {}).scorer_inputs;
  if (!Array.isArray(declared) || declared.length === 0) {
    throw new UserError('manifest.json: no onnx.scorer_inputs; re-export the bundle with a newer vaeguard');
  }
  const preprocessing = manifest.preprocessing || {};
  return declared.map((input) => {
    if (input.dtype === 'float32' && Array.isArray(input.columns)) {
      // Per column, the manifest's entry (its median is what the graph gives a blank, which a warning names).
      const stats = input.columns.map((name) => (preprocessing.numeric || []).find((s) => s.name === name) || { name });
      return { name: input.name, kind: 'numeric', columns: input.columns, stats };
    }
    if (input.dtype === 'string' && typeof input.column === 'string') {
      // The graph's inputs are hash-checked (checkScorerAgrees), this pairing is not: two columns
      // swapped here would feed each one's values to the other's input.
      if (input.name !== `cat_${input.column}`) {
        throw new UserError(`manifest.json: scorer input ${JSON.stringify(input.name)} is given column ` +
          `${JSON.stringify(input.column)}, but a categorical column's input is named cat_<column>; the manifest was ` +
          'edited: restore manifest.json or re-export the bundle');
      }
      // onnxruntime-node hands strings to the graph as C strings, cut at the first NUL: "A\0x"
      // would score as the known "A", while `vaeguard score` passes it whole, an unseen value.
      // Such a cell is fed as a string the graph does not know (`unseen`) instead.
      const found = (preprocessing.categorical || []).find((c) => c.name === input.column);
      const stats = found && Array.isArray(found.categories) ? found : { name: input.column, categories: [] };
      const known = new Set(stats.categories);
      let unseen = preprocessing.unknown_category || '__unknown__';
      while (known.has(unseen)) unseen += '_';
      // `stats`, the manifest's entry for the column, is also what the count of unseen values reads.
      return {
        name: input.name, kind: 'string', column: input.column, missing: input.missing ?? '', known, unseen, stats,
      };
    }
    throw new UserError(`manifest.json: scorer input ${JSON.stringify(input.name)} is not a table column ` +
      `(image bundles are not supported by this example)`);
  });
}

// ---------------------------------------------------------------------------------------------
// CSV reading: RFC 4180 with the same leniency as pyarrow's reader (\n, \r\n or \r line ends,
// empty lines skipped, a leading UTF-8 byte order mark ignored).

const COMMA = 44;
const QUOTE = 34;
const LF = 10;
const CR = 13;

// Parser states.
const FIELD_START = 0; // nothing read of the current field yet
const UNQUOTED = 1;    // inside a plain field
const QUOTED = 2;      // inside "...", where commas and line ends are data
const QUOTE_SEEN = 3;  // a quote inside a quoted field: "" (a literal quote) or the closing one

/** A streaming parser: push() text chunks of any size, get back complete records. */
class CsvParser {
  constructor(file = 'input') {
    this.file = file;      // for messages
    this.state = FIELD_START;
    this.field = '';
    this.record = [];
    this.fieldWasQuoted = false;
    this.skipLF = false;   // the last character was a CR: a following LF belongs to it
    this.line = 1;         // physical line the parser is on
    this.recordLine = 1;   // physical line the current record started on
    this.quoteLine = 1;    // physical line the last quoted field opened on
  }

  push(text) {
    const records = [];
    const n = text.length;
    let i = 0;
    while (i < n) {
      const c = text.charCodeAt(i);
      if (this.state === QUOTED) {
        const q = text.indexOf('"', i);
        const end = q === -1 ? n : q;
        this.countLines(text, i, end);
        this.field += text.slice(i, end);
        if (q === -1) break;
        this.skipLF = false; // a CR inside the quotes does not swallow a line feed after them
        this.state = QUOTE_SEEN;
        i = q + 1;
        continue;
      }
      if (this.state === QUOTE_SEEN) {
        if (c === QUOTE) { // "" inside quotes is one literal quote
          this.field += '"';
          this.state = QUOTED;
          i += 1;
          continue;
        }
        this.state = UNQUOTED; // that was the closing quote; c is handled below
      }
      if (this.skipLF) {
        this.skipLF = false;
        if (c === LF) { i += 1; continue; }
      }
      if (c === COMMA) {
        this.endField();
        i += 1;
      } else if (c === LF || c === CR) {
        this.endRecord(records);
        this.line += 1;
        this.recordLine = this.line;
        this.skipLF = c === CR;
        i += 1;
      } else if (c === QUOTE && this.state === FIELD_START) {
        this.state = QUOTED;
        this.fieldWasQuoted = true;
        this.quoteLine = this.line;
        i += 1;
      } else { // a run of plain characters, up to the next comma or line end
        let j = i + 1;
        while (j < n) {
          const d = text.charCodeAt(j);
          if (d === COMMA || d === LF || d === CR) break;
          j += 1;
        }
        this.field += text.slice(i, j);
        this.state = UNQUOTED;
        i = j;
      }
    }
    return records;
  }

  /** Call once after the last chunk: returns the last record if the file did not end in a newline. */
  end() {
    // pyarrow (`vaeguard score`) takes the rest of the file as that one value: the rows after it
    // vanish without a word. Refused here, with where to look.
    if (this.state === QUOTED) {
      throw inputError(`${this.file}: line ${this.quoteLine} opens a quoted field that is never closed, so the ` +
        'rest of the file would be one value; close that quote, or write a quote inside a value as ""');
    }
    const records = [];
    this.endRecord(records);
    return records;
  }

  countLines(text, from, to) {
    // Line ends inside quoted fields still advance the line count used in messages.
    for (let k = from; k < to; k++) {
      const d = text.charCodeAt(k);
      if (d === LF) {
        if (!this.skipLF) this.line += 1;
        this.skipLF = false;
      } else if (d === CR) {
        this.line += 1;
        this.skipLF = true;
      } else {
        this.skipLF = false;
      }
    }
  }

  endField() {
    this.record.push(this.field);
    this.field = '';
    this.fieldWasQuoted = false;
    this.state = FIELD_START;
  }

  endRecord(records) {
    const empty = this.record.length === 0 && this.field === '' && !this.fieldWasQuoted && this.state === FIELD_START;
    if (!empty) { // empty lines are skipped, as pyarrow does
      this.endField();
      records.push({ fields: this.record, line: this.recordLine });
    }
    this.record = [];
    this.field = '';
    this.fieldWasQuoted = false;
    this.state = FIELD_START;
  }
}

// Bytes that are not UTF-8. pyarrow refuses them in the columns it reads as text (ids,
// categories) and as numbers, and ignores them in columns it does not read; `vaeguard score`
// then fails with "holds text that is not UTF-8". A plain utf8 decode would turn them into
// U+FFFD and score the row. So each invalid byte is decoded to a lone surrogate (U+DC80 to
// U+DCFF, which no valid UTF-8 decodes to, as Python's surrogateescape does), and the cells the
// scorer uses are checked with isWellFormed().
function decodeEscaped(bytes) {
  let text = '';
  let start = 0; // start of the run of valid bytes not yet decoded
  let i = 0;
  while (i < bytes.length) {
    const b = bytes[i];
    if (b < 0x80) { i += 1; continue; }
    const need = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1;
    if (need > 1 && i + need <= bytes.length && isUtf8(bytes.subarray(i, i + need))) { i += need; continue; }
    text += bytes.toString('utf8', start, i) + String.fromCharCode(0xdc00 + b);
    i += 1;
    start = i;
  }
  return text + bytes.toString('utf8', start);
}

/** Where a chunk's last complete character ends: a sequence cut by the chunk's end waits for the next. */
function completeEnd(bytes) {
  for (let i = bytes.length - 1; i >= Math.max(0, bytes.length - 3); i--) {
    const b = bytes[i];
    if (b < 0x80) break;
    if (b >= 0xc0) {
      const need = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : 2;
      return bytes.length - i < need ? i : bytes.length;
    }
  }
  return bytes.length;
}

/** UTF-8 text of a byte stream, invalid bytes as lone surrogates (see decodeEscaped). */
async function* decodeUtf8(stream) {
  let carry = Buffer.alloc(0);
  for await (const chunk of stream) {
    const bytes = carry.length ? Buffer.concat([carry, chunk]) : chunk;
    const end = completeEnd(bytes);
    const part = bytes.subarray(0, end);
    carry = Buffer.from(bytes.subarray(end));
    yield isUtf8(part) ? part.toString('utf8') : decodeEscaped(part);
  }
  if (carry.length) yield decodeEscaped(carry); // a character cut short by the end of the file
}

/** The file is one Python reads as CSV: .csv or .csv.gz in any case (pipeline.tables.table_format). */
function checkInputName(file) {
  const name = path.basename(file).toLowerCase();
  if (name.endsWith('.csv') || name.endsWith('.csv.gz')) return;
  const suffix = path.extname(name);
  throw inputError(`${file}: unsupported file type ${suffix ? JSON.stringify(suffix) : '(none)'}; expected .csv or ` +
    `.csv.gz${suffix === '.parquet' || suffix === '.pq' ? ' (this example reads CSV only: score Parquet with `vaeguard score`)' : ''}`);
}

// Files that are no CSV text, told by their first bytes, as `vaeguard score` tells them
// (pipeline.csv_errors.not_csv_text_error, same rules and words): read as CSV, a Parquet file,
// a workbook or gzip data named .csv was "text that is not UTF-8 (header, column 1)", and UTF-16
// text without a byte-order mark was "missing column(s)" that are plainly there (their letters
// hold NUL bytes): messages that sent the user to fix the wrong thing. Per format: its first
// bytes, what the file is, how to make it CSV. No header starts so (control bytes, or bytes no
// UTF-8 text starts with), except Parquet's, which a NUL byte after it tells from a column
// named "PAR1...". This example reads no Parquet, so its fix points to `vaeguard score`.
const GZIP_MAGIC = Buffer.from([0x1f, 0x8b]);
const PARQUET_MAGIC = Buffer.from('PAR1');
const OTHER_FORMATS = [
  [PARQUET_MAGIC, "a Parquet file (it starts with Parquet's PAR1 marker)",
    'name it .parquet and score it with `vaeguard score` (this example reads CSV only)'],
  [Buffer.from('PK\x03\x04', 'latin1'), 'a zip archive, as an Excel .xlsx workbook is',
    'export the sheet as CSV UTF-8, or unzip it'],
  [Buffer.from([0xd0, 0xcf, 0x11, 0xe0, 0xa1, 0xb1, 0x1a, 0xe1]), 'an Excel 97-2003 (.xls) workbook',
    'export the sheet as CSV UTF-8'],
  [GZIP_MAGIC, 'gzip-compressed data', 'name it .csv.gz, which vaeguard decompresses'],
];
// UTF-32's little-endian mark starts with UTF-16's, so it is looked for first.
const UTF_BOMS = [
  [Buffer.from([0xff, 0xfe, 0, 0]), 'UTF-32'], [Buffer.from([0, 0, 0xfe, 0xff]), 'UTF-32'],
  [Buffer.from([0xff, 0xfe]), 'UTF-16'], [Buffer.from([0xfe, 0xff]), 'UTF-16'],
];
const HEAD_BYTES = 4096;

const isGzipName = (file) => file.toLowerCase().endsWith('.gz');

/**
 * The first HEAD_BYTES bytes of the file's text (decompressed for a .gz), fewer in a shorter file;
 * null where a .gz fails to decompress before that: csvRecords then names its gzip error.
 */
async function textHead(file) {
  const source = fs.createReadStream(file, { highWaterMark: HEAD_BYTES });
  const stream = isGzipName(file) ? source.pipe(zlib.createGunzip()) : source;
  const chunks = [];
  let size = 0;
  try {
    for await (const chunk of stream) {
      chunks.push(chunk);
      size += chunk.length;
      if (size >= HEAD_BYTES) break; // a few KiB tell; the rest of the file is not read twice
    }
  } catch {
    return null;
  } finally {
    source.destroy(); // piped, it would stay open once the gunzip stream is left
  }
  return Buffer.concat(chunks).subarray(0, HEAD_BYTES);
}

/** The one-line error for a .csv (.csv.gz) that its first bytes show is no UTF-8 text, or null. */
async function notCsvTextError(file) {
  const head = await textHead(file);
  if (head === null) return null;
  const compressed = isGzipName(file);
  const inside = compressed ? 'its gzip data is' : 'is';
  for (const [magic, what, fix] of OTHER_FORMATS) {
    if (!head.subarray(0, magic.length).equals(magic) || (magic === PARQUET_MAGIC && !head.includes(0))) continue;
    if (compressed && magic === GZIP_MAGIC) {
      return inputError(`${file}: ${inside} gzip-compressed again, not CSV text; decompress it once (gunzip)`);
    }
    const how = compressed ? `decompress it (gunzip), then ${fix}` : fix;
    return inputError(`${file}: ${inside} ${what}, not CSV text; ${how}`);
  }
  const encoding = wideEncoding(head);
  if (!encoding) return null;
  return inputError(`${file}: ${inside} not UTF-8 text (it looks ${encoding}); save it as CSV in UTF-8`);
}

/**
 * How `head` looks encoded when it is UTF-16 or UTF-32 rather than UTF-8, with why; or null.
 * Without a byte-order mark, UTF-16 shows as NUL bytes at every other position: a CSV's commas,
 * digits and line ends are ASCII, one NUL byte beside each (three in UTF-32). A stray NUL in
 * UTF-8 text is no sign, hence a share of a quarter of the even or odd bytes.
 */
function wideEncoding(head) {
  for (const [bom, encoding] of UTF_BOMS) {
    if (head.subarray(0, bom.length).equals(bom)) return `${encoding}: it starts with a ${encoding} byte-order mark`;
  }
  if (head.length < 8) return null;
  const nuls = [0, 0]; // NUL bytes at even and at odd positions
  for (let i = 0; i < head.length; i++) if (head[i] === 0) nuls[i % 2] += 1;
  const even = nuls[0] / Math.ceil(head.length / 2);
  const odd = nuls[1] / Math.floor(head.length / 2);
  if (Math.min(even, odd) > 0.25) return 'UTF-32: it has three NUL bytes beside each character';
  if (Math.max(even, odd) > 0.25) return 'UTF-16: it has NUL bytes between its characters';
  return null;
}

async function* csvRecords(file) {
  const parser = new CsvParser(file);
  let first = true;
  // A .gz file is decompressed as it streams, as pyarrow does for `vaeguard score`, which
  // recognises ".gz" in any case ("X.CSV.GZ" too).
  let stream = fs.createReadStream(file, { highWaterMark: 1 << 20 });
  if (isGzipName(file)) stream = stream.pipe(zlib.createGunzip());
  try {
    for await (let text of decodeUtf8(stream)) {
      if (first && text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      first = first && text.length === 0;
      yield* parser.push(text);
    }
  } catch (err) {
    if (err && err.code && err.code.startsWith('Z_')) {
      throw inputError(`${file}: not a readable gzip file (${err.message}); compress it with gzip or pass the plain CSV`);
    }
    throw err;
  }
  yield* parser.end();
}

/** The header checks of `vaeguard score` (pipeline.tables.check_header), in the same words. */
function checkHeader(file, names) {
  // pyarrow cannot decode such a header: `vaeguard score` stops there too.
  const unreadable = names.findIndex((name) => !name.isWellFormed());
  if (unreadable !== -1) {
    throw inputError(`${file}: holds text that is not UTF-8 (header, column ${unreadable + 1}); save the file as UTF-8`);
  }
  if (names.length === 1) {
    const separator = [';', '\t', '|'].find((s) => names[0].includes(s));
    if (separator) {
      throw inputError(`${file}: the header is a single column, ${JSON.stringify(names[0].slice(0, 60))}; the file ` +
        `looks separated by ${JSON.stringify(separator)}, but vaeguard reads comma-separated files; save it with commas`);
    }
  }
  const first = new Map();
  names.forEach((name, i) => {
    if (first.has(name)) {
      throw inputError(`${file}: column ${JSON.stringify(name)} appears twice in the header (columns ` +
        `${first.get(name)} and ${i + 1}); rename or drop one, so that each column means one thing`);
    }
    first.set(name, i + 1);
  });
}

// A number as pyarrow parses it: surrounding spaces/tabs ignored, an optional sign, decimal
// digits with an optional exponent, or nan / inf / infinity in any case. Anything else
// (hex, "1_000", "1,5", ...) is not a number. JS's Number() is more lenient, hence the regex.
// A NaN may carry C's payload, "nan(...)": MSVC's printf writes "-nan(ind)", and pyarrow reads
// it as NaN (missing), as it does "nan".
const DECIMAL = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;
const SPECIAL = /^([+-]?)(?:(nan)(?:\([0-9A-Za-z_]*\))?|inf|infinity)$/i;
const FLOAT32_MAX = 3.4028234663852886e38;

// The label spellings `vaeguard score` takes (pipeline.schema.scored_labels): 0 or 1 as any
// number, or true/false as pandas, spreadsheets and databases write them; a missing one leaves
// the row unlabelled.
const LABEL_WORDS = new Set(['0', '1', 'false', 'False', 'FALSE', 'true', 'True', 'TRUE']);
// The white space around a label that Python's str.strip() and JS's trim() both remove. trim()
// also removes U+FEFF, which Python keeps, and refuses the label: "\uFEFF1" scored here only.
// Python's also removes control characters (\x1c-\x1f, \x85), and its float() reads "0_1" and
// non-ASCII digits ("１") as numbers: such labels are refused here, a clear error over a guess.
const LABEL_SPACE_CHARS = '\\t\\n\\v\\f\\r \\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const LABEL_SPACE = new RegExp(`^[${LABEL_SPACE_CHARS}]+|[${LABEL_SPACE_CHARS}]+$`, 'g');

function isLabel(raw) {
  if (NULL_VALUES.has(raw)) return true;
  const text = raw.replace(LABEL_SPACE, '');
  if (LABEL_WORDS.has(text)) return true;
  const number = parseNumber(text);
  return number === 0 || number === 1;
}

/** float64 value of a numeric cell, NaN when missing; undefined when it is not a number. */
function parseNumber(raw) {
  if (NULL_VALUES.has(raw)) return NaN;
  const text = raw.replace(/^[ \t]+|[ \t]+$/g, '');
  if (DECIMAL.test(text)) return Number(text);
  const special = SPECIAL.exec(text);
  if (special) {
    if (special[2]) return NaN;
    return special[1] === '-' ? -Infinity : Infinity;
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Output

/** A float32 in as few digits as read back to the same float32 (what pyarrow writes). */
function formatFloat32(x) {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? 'nan' : (x > 0 ? 'inf' : '-inf');
  for (let digits = 1; digits < 9; digits++) {
    const text = x.toPrecision(digits);
    if (Math.fround(Number(text)) === x) return String(Number(text));
  }
  return String(Number(x.toPrecision(9))); // 9 significant digits always round-trip a float32
}

/** An id value as pyarrow's CSV writer writes strings: quoted, "" for a quote, empty when null. */
function formatId(value) {
  if (value === null) return '';
  return `"${value.replace(/"/g, '""')}"`;
}

// ---------------------------------------------------------------------------------------------
// Values the bundle never saw (pipeline/unseen.py, by the same rule and in the same words)
//
// An unseen category goes to its column's unknown bucket, silently: right for the odd new value.
// A whole column there is most likely the same data spelled differently ('Y' for 'yes', a prefix
// on codes): every such row scores higher, and a night of false alarms needs a line saying why.

// A run warns for a column when at least UNSEEN_MIN_ROWS rows went to its unknown bucket and
// their share is above unseenLimit(training's share).
const UNSEEN_MIN_ROWS = 10;
const UNSEEN_MIN_SHARE = 0.01;
const UNSEEN_FACTOR = 5;
// A bundle exported before training's share was recorded: only a majority is a changed format.
const UNSEEN_WITHOUT_BASELINE = 0.5;
// Unseen values kept as examples, per chunk and per run: enough that a run's most frequent ones
// survive the per-chunk cut, few enough that a column of a new id per row costs no memory.
const EXAMPLES_PER_CHUNK = 20;
const EXAMPLES_KEPT = 100;
// pipeline.preprocess.BOOLEAN_TEXT: a boolean column's spellings and the category each means.
const BOOLEAN_TEXT = new Map([
  ['false', 'false'], ['False', 'false'], ['FALSE', 'false'],
  ['true', 'true'], ['True', 'true'], ['TRUE', 'true'], ['', ''],
]);

/**
 * Every text the graph takes as a kept category of a column (CategoricalStats.known_texts): a
 * boolean's spellings, an integer code's '3.0' for '3', and missing ("") where training kept it.
 */
function knownTexts(stats) {
  const kept = new Set(stats.categories);
  if (stats.boolean === true) return new Set([...BOOLEAN_TEXT].filter(([, c]) => kept.has(c)).map(([text]) => text));
  const known = new Set(kept);
  if (stats.integer === true) for (const c of kept) if (c) known.add(`${c}.0`);
  return known;
}

/** One categorical column over a run: rows, rows its unknown bucket took, most frequent such values. */
class UnseenCounts {
  constructor(stats) {
    this.stats = stats;
    this.known = knownTexts(stats);
    this.rows = 0;
    this.unseen = 0;
    this.examples = new Map();   // value -> rows, over the run (approximately, as in Python)
    this.inChunk = new Map();    // value -> rows, in the chunk being read
  }

  /** A cell's text as the graph gets it (missing as ""). */
  add(value) {
    if (!this.known.has(value)) this.inChunk.set(value, (this.inChunk.get(value) || 0) + 1);
  }

  endChunk(rows) {
    this.rows += rows;
    for (const n of this.inChunk.values()) this.unseen += n;
    for (const [value, n] of mostCommon(this.inChunk, EXAMPLES_PER_CHUNK)) {
      this.examples.set(value, (this.examples.get(value) || 0) + n);
    }
    if (this.examples.size > EXAMPLES_KEPT) this.examples = new Map(mostCommon(this.examples, EXAMPLES_KEPT));
    this.inChunk.clear();
  }

  /** The line `vaeguard score` warns with for this column (pipeline.unseen._unseen_warning), or null. */
  warning(where) {
    const { stats, rows, unseen } = this;
    const share = rows ? unseen / rows : 0;
    const trainingShare = typeof stats.unknown_share === 'number' ? stats.unknown_share : null;
    if (unseen < UNSEEN_MIN_ROWS || !(share > unseenLimit(trainingShare))) return null;
    const training = trainingShare ? `; ${percent(trainingShare)} in training` : '';
    const examples = mostCommon(this.examples, 3).map(([value]) => shown(value)).join(', ');
    const categories = stats.categories;
    const known = categories.slice(0, 8).map(shown).join(', ') +
      (categories.length > 8 ? ` and ${categories.length - 8} more` : '');
    return `${where}column ${pyRepr(stats.name)}: ${thousands(unseen)} of ${thousands(rows)} rows (${percent(share)}` +
      `${training}) hold values the bundle never saw (e.g. ${examples}); it knows ${known}; a changed spelling or ` +
      'format sends every such row to the unknown bucket and raises its score';
  }
}

/** Five times training's share, at least 1%, at most halfway from training's share to every row. */
function unseenLimit(trainingShare) {
  if (trainingShare === null) return UNSEEN_WITHOUT_BASELINE;
  return Math.max(UNSEEN_MIN_SHARE, Math.min(UNSEEN_FACTOR * trainingShare, (1 + trainingShare) / 2));
}

/** The n most frequent entries, ties in insertion order: Python's Counter.most_common(n). */
function mostCommon(counts, n) {
  return [...counts].sort((a, b) => b[1] - a[1]).slice(0, n); // Array.prototype.sort is stable
}

/** As Python's f"{n:,}". */
function thousands(n) {
  return String(n).replace(/\B(?=(\d{3})+$)/g, ',');
}

/** As Python's f"{share:.0%}" from 10% up, f"{share:.1%}" below (pipeline.unseen.percent). */
function percent(share) {
  return `${fixed(share * 100, share >= 0.1 ? 0 : 1)}%`; // Python multiplies the float by 100 too
}

/**
 * x (>= 0) with `digits` decimals as Python's format() writes it. Both round the float's exact
 * value, but toFixed rounds an exact half up and Python to even ("12%" for 12.5, "6.2%" for 6.25).
 */
function fixed(x, digits) {
  // Every digit of x, where a half can be (x >= 0.05: its exact value ends within 60 decimals).
  const exact = x.toFixed(60);
  const cut = exact.indexOf('.') + (digits ? digits + 1 : 0);
  const isHalf = /^\.?50*$/.test(exact.slice(cut));
  return isHalf && Number(exact[cut - 1]) % 2 === 0 ? exact.slice(0, cut) : x.toFixed(digits);
}

// Characters Python's str.isprintable() rejects (categories C* and Z*, the space aside): repr()
// and the CLI's one-line messages (pipeline.cli.control_escaped) write them as escapes.
const NOT_PRINTABLE = /[\p{C}\p{Z}]/gu;
const NAMED_ESCAPES = { '\t': '\\t', '\n': '\\n', '\r': '\\r' };

function pyEscape(c) {
  if (c === ' ') return c;
  if (NAMED_ESCAPES[c]) return NAMED_ESCAPES[c];
  const code = c.codePointAt(0);
  const [prefix, width] = code < 0x100 ? ['\\x', 2] : code < 0x10000 ? ['\\u', 4] : ['\\U', 8];
  return prefix + code.toString(16).padStart(width, '0');
}

/** Python's repr() of a str. */
function pyRepr(text) {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  const body = text.replace(/\\/g, '\\\\').replace(NOT_PRINTABLE, pyEscape);
  return quote + (quote === "'" ? body.replace(/'/g, "\\'") : body) + quote;
}

/** A value as the warning shows it (pipeline.unseen._shown): repr, cut at 40 characters. */
function shown(value) {
  if (value === '') return "'' (blank)";
  const chars = Array.from(value); // code points, as Python counts them
  return pyRepr(chars.length <= 40 ? value : `${chars.slice(0, 40).join('')}...`);
}

// ---------------------------------------------------------------------------------------------
// Numeric columns blank far more often than in training (pipeline/unseen.py, same rule and words)
//
// The graph gives a blank number training's median, silently: such a row looks normal in that
// column, so a column an export left empty hides every anomaly in it and the night reads as calm.

// A column blank in more than this share of training's rows is sparse by nature: it never warns.
const MISSING_SPARSE_SHARE = 0.5;

/**
 * The line `vaeguard score` warns with for a numeric column (pipeline.unseen.missing_entries and
 * _missing_warning), or null: at least UNSEEN_MIN_ROWS of `rows` blank, a share above
 * unseenLimit(training's share); never where training's share is unknown (null) or sparse.
 */
function blankWarning(where, stats, blank, rows, trainingShare) {
  if (blank < UNSEEN_MIN_ROWS || !rows || trainingShare === null || trainingShare > MISSING_SPARSE_SHARE) return null;
  const share = blank / rows;
  if (!(share > unseenLimit(trainingShare))) return null;
  const training = trainingShare === 0 ? 'none in training' : `${percent(trainingShare)} in training`;
  return `${where}column ${pyRepr(stats.name)}: ${thousands(blank)} of ${thousands(rows)} rows (${percent(share)}; ` +
    `${training}) are blank; scoring gives a blank training's median (${general(stats.median)}), so no value of ` +
    'this column can flag those rows: fill the column, or check the export that wrote the file';
}

/**
 * As Python's f"{x:.6g}" (`digits` significant digits, trailing zeros dropped, an exponent below
 * 1e-4 and from 10**digits up). toPrecision rounds an exact half up and Python to even, and writes
 * other exponents, so the float's exact decimal value is rounded here.
 */
function general(x, digits = 6) {
  if (Number.isNaN(x)) return 'nan';
  const sign = x < 0 || Object.is(x, -0) ? '-' : '';
  const magnitude = Math.abs(x);
  if (magnitude === Infinity) return `${sign}inf`;
  if (magnitude === 0) return `${sign}0`;
  // magnitude = m * 2**e exactly, m an integer of at most 53 bits; as a decimal, its digits * 10**scale.
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, magnitude);
  const biased = view.getUint16(0) >> 4;
  let m = (BigInt(view.getUint32(0) & 0xfffff) << 32n) | BigInt(view.getUint32(4));
  if (biased) m |= 1n << 52n;
  const e = (biased || 1) - 1075;
  const exact = e >= 0 ? (m << BigInt(e)).toString() : (m * 5n ** BigInt(-e)).toString();
  let exponent = exact.length - 1 + Math.min(e, 0);
  let kept = exact.slice(0, digits).padEnd(digits, '0');
  const rest = exact.slice(digits).replace(/0+$/, ''); // the digits cut: above half, a half, or below
  if (rest > '5' || (rest === '5' && Number(kept[digits - 1]) % 2 === 1)) {
    kept = (BigInt(kept) + 1n).toString();
    if (kept.length > digits) {
      kept = kept.slice(0, digits);
      exponent += 1;
    }
  }
  if (exponent < -4 || exponent >= digits) {
    const fraction = kept.slice(1).replace(/0+$/, '');
    const power = `${exponent < 0 ? '-' : '+'}${String(Math.abs(exponent)).padStart(2, '0')}`;
    return `${sign}${kept[0]}${fraction ? `.${fraction}` : ''}e${power}`;
  }
  const whole = exponent >= 0 ? kept.slice(0, exponent + 1) : '0';
  const fraction = (exponent >= 0 ? kept.slice(exponent + 1) : '0'.repeat(-exponent - 1) + kept).replace(/0+$/, '');
  return `${sign}${whole}${fraction ? `.${fraction}` : ''}`;
}

// ---------------------------------------------------------------------------------------------
// Scoring

class ChunkScorer {
  // `blankShares`: training's share of blank rows per numeric column (trainingBlankShares).
  constructor(session, inputs, header, schema, chunkRows, inputPath, blankShares = new Map()) {
    this.session = session;
    this.blankShares = blankShares;
    this.inputs = inputs;
    this.chunkRows = chunkRows;
    this.inputPath = inputPath;
    const position = new Map(header.map((name, i) => [name, i]));
    // The id columns are required as the features are: `vaeguard score` refuses an input
    // without them (pipeline.batch_score.required_columns), rather than write unlabelled scores.
    const idColumns = schema.id_columns || [];
    const required = [...idColumns];
    for (const input of inputs) required.push(...(input.kind === 'numeric' ? input.columns : [input.column]));
    const missing = required.filter((name) => !position.has(name));
    if (missing.length) {
      throw inputError(`${inputPath}: missing column(s) ${missing.map((c) => JSON.stringify(c)).join(', ')} ` +
        `that the bundle was trained on; add them (empty values are allowed)`);
    }
    this.header = header;
    this.ids = idColumns.map((name) => ({ name, at: position.get(name) }));
    // `vaeguard score` reads the label column, when the input has it, for AUROC, and refuses a
    // file whose label is neither 0/1 nor true/false: checked here too, though not used.
    this.label = schema.label_column && position.has(schema.label_column)
      ? { name: schema.label_column, at: position.get(schema.label_column) } : null;
    // Per input: where its columns sit in a CSV record, and a buffer for one chunk.
    this.feeds = inputs.map((input) => (input.kind === 'numeric'
      ? { input, at: input.columns.map((c) => position.get(c)), values: new Float32Array(chunkRows * input.columns.length),
        blanks: input.columns.map(() => 0) } // per column, the rows blank (NaN as read) over the run
      : { input, at: position.get(input.column), values: new Array(chunkRows),
        unseenCounts: new UnseenCounts(input.stats) }));
    this.idValues = this.ids.map(() => new Array(chunkRows));
    this.rows = 0;        // rows in the current chunk
    this.rowsBefore = 0;  // rows in earlier chunks
    this.anomalies = 0;
  }

  /** Add one CSV record to the chunk; true when the chunk is full. */
  add(record) {
    const { fields, line } = record;
    const row = this.rowsBefore + this.rows + 1; // 1-based data row, as the Python messages count
    if (fields.length !== this.header.length) {
      throw inputError(`${this.inputPath}: line ${line} has ${fields.length} field(s), the header has ` +
        `${this.header.length}; check the quoting and delimiters on that line`);
    }
    const r = this.rows;
    for (const feed of this.feeds) {
      if (feed.input.kind === 'numeric') {
        const width = feed.at.length;
        for (let j = 0; j < width; j++) {
          const raw = fields[feed.at[j]];
          const value = parseNumber(raw);
          // Beyond float32's range (1e300, inf) a value becomes an infinity in the Float32Array
          // and its row's score NaN, which no threshold flags: refused, as `vaeguard score` does.
          if (value === undefined || Math.abs(value) > FLOAT32_MAX) {
            const column = JSON.stringify(feed.input.columns[j]);
            throw inputError(value === undefined
              ? `${this.inputPath}: column ${column} must be numeric but row ${row} (line ${line}) holds ` +
                `${JSON.stringify(raw)}; fix or blank out that value`
              : `${this.inputPath}: column ${column} holds ${raw.trim()} at row ${row} (line ${line}); ` +
                `expected finite numbers within float32's range (|x| <= 3.4e+38): replace it with a number ` +
                `in range or leave the cell empty`);
          }
          if (value !== value) feed.blanks[j] += 1; // NaN: a null marker or a nan spelling, as Python counts it
          feed.values[r * width + j] = value; // a Float32Array store rounds to nearest, as numpy's cast does
        }
      } else {
        const raw = fields[feed.at];
        this.checkText(raw, feed.input.column, row, line);
        const value = NULL_VALUES.has(raw) ? feed.input.missing : raw;
        feed.unseenCounts.add(value); // the text itself, not the stand-in below: a warning shows it
        if (!value.includes('\0')) feed.values[r] = value;
        else if (!feed.input.known.has(value)) feed.values[r] = feed.input.unseen; // see scorerInputs
        else {
          throw inputError(`${this.inputPath}: column ${JSON.stringify(feed.input.column)} holds a NUL character ` +
            `at row ${row} (line ${line}), in a category the bundle knows; onnxruntime-node cannot pass it`);
        }
      }
    }
    this.ids.forEach((id, k) => {
      const raw = fields[id.at];
      this.checkText(raw, id.name, row, line);
      this.idValues[k][r] = raw; // verbatim, null markers included: ids join the scores back to rows
    });
    if (this.label && !isLabel(fields[this.label.at])) {
      throw inputError(`${this.inputPath}: label column ${JSON.stringify(this.label.name)} must be 0 (normal) or ` +
        `1 (anomaly) but row ${row} (line ${line}) holds ${JSON.stringify(fields[this.label.at])}; recode it to 0/1, ` +
        'blank it out, or leave the column out');
    }
    this.rows += 1;
    return this.rows === this.chunkRows;
  }

  /** A text cell with bytes that are not UTF-8 (decoded as lone surrogates) is refused, as pyarrow does. */
  checkText(raw, column, row, line) {
    if (!raw.isWellFormed()) {
      throw inputError(`${this.inputPath}: holds text that is not UTF-8 (column ${JSON.stringify(column)}, row ${row}, ` +
        `line ${line}); save the file as UTF-8`);
    }
  }

  /** Score the rows collected so far; returns their output CSV lines, and starts a new chunk. */
  async flush() {
    const n = this.rows;
    if (n === 0) return '';
    const feeds = {};
    for (const feed of this.feeds) {
      if (feed.input.kind === 'numeric') {
        const width = feed.input.columns.length;
        const data = n === this.chunkRows ? feed.values : feed.values.slice(0, n * width);
        feeds[feed.input.name] = new ort.Tensor('float32', data, [n, width]);
      } else {
        feeds[feed.input.name] = new ort.Tensor('string', feed.values.slice(0, n), [n]);
      }
    }
    const results = await this.session.run(feeds);
    const [score, recon, kl, pValue, isAnomaly] = OUTPUT_NAMES.map((name) => results[name].data);
    const lines = new Array(n);
    for (let r = 0; r < n; r++) {
      const anomalous = Boolean(isAnomaly[r]); // bool tensors come back as a Uint8Array
      if (anomalous) this.anomalies += 1;
      const cells = this.idValues.map((values) => formatId(values[r]));
      cells.push(formatFloat32(score[r]), formatFloat32(recon[r]), formatFloat32(kl[r]),
        formatFloat32(pValue[r]), anomalous ? 'true' : 'false');
      lines[r] = cells.join(',');
    }
    for (const feed of this.feeds) if (feed.unseenCounts) feed.unseenCounts.endChunk(n);
    this.rowsBefore += n;
    this.rows = 0;
    return lines.join('\n') + '\n';
  }

  /**
   * The warnings on the input, one per column at most, in `vaeguard score`'s order: values the bundle
   * never saw, per categorical column, then blanks far above training's, per numeric column.
   */
  inputWarnings() {
    const where = `${this.inputPath}: `;
    const unseen = this.feeds.filter((feed) => feed.unseenCounts).map((feed) => feed.unseenCounts.warning(where));
    const blank = this.feeds.filter((feed) => feed.blanks).flatMap((feed) => feed.input.stats.map((stats, j) => (
      blankWarning(where, stats, feed.blanks[j], this.rowsBefore, this.blankShares.get(stats.name) ?? null))));
    return [...unseen, ...blank].filter((line) => line !== null);
  }

  outputHeader() {
    return [...this.ids.map((id) => id.name), ...OUTPUT_NAMES].map((name) => `"${name}"`).join(',') + '\n';
  }
}

function parseArgs(argv) {
  const positional = [];
  let chunkRows = DEFAULT_CHUNK_ROWS;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    } else if (arg === '--chunk-rows' || arg.startsWith('--chunk-rows=')) {
      const value = arg.includes('=') ? arg.split('=')[1] : argv[++i];
      chunkRows = Number(value);
      if (!Number.isInteger(chunkRows) || chunkRows < 1) {
        throw inputError(`--chunk-rows must be a positive number of rows, got ${JSON.stringify(value)}`);
      }
    } else if (arg.startsWith('-') && arg !== '-') {
      throw inputError(`unknown option ${arg}; ${USAGE}`);
    } else {
      positional.push(arg);
    }
  }
  if (positional.length !== 3) throw inputError(USAGE);
  const [bundleDir, inputPath, outputPath] = positional;
  return { bundleDir, inputPath, outputPath, chunkRows };
}

// ---------------------------------------------------------------------------------------------
// The output file, checked before any work as `vaeguard score` checks its --output
// (pipeline.outputs.check_scores_target): otherwise every row was scored first and the last
// step failed, or the scores replaced the input or landed in the bundle.

/**
 * The path with symbolic links and '..' resolved, existing or not (Python's os.path.realpath):
 * the deepest part that exists is resolved by the system, the rest appended.
 */
function realPath(file) {
  const absolute = path.resolve(file);
  const rest = [];
  for (let at = absolute; ; at = path.dirname(at)) {
    try {
      return path.join(fs.realpathSync.native(at), ...rest.reverse());
    } catch {
      if (path.dirname(at) === at) return absolute;
      rest.push(path.basename(at));
    }
  }
}

/** Two names of one file: the same real path, or (hard links) the same device and inode. */
function sameFile(a, b) {
  if (realPath(a) === realPath(b)) return true;
  try {
    const [x, y] = [fs.statSync(a), fs.statSync(b)];
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false; // one of them does not exist (yet)
  }
}

function checkOutput(outputPath, inputPath, bundleDir) {
  const fail = (what) => inputError(`output ${outputPath}: ${what}`);
  // The output is CSV text whatever it is named: a .parquet holding CSV is unreadable as Parquet.
  const suffix = path.extname(outputPath).toLowerCase();
  if (suffix !== '.csv') {
    throw fail(`unsupported extension ${suffix ? JSON.stringify(suffix) : '(none)'}; this example writes CSV: ` +
      'name the output .csv (`vaeguard score` writes Parquet)');
  }
  let status = null;
  try { status = fs.statSync(outputPath); } catch { /* not there yet */ }
  if (status && status.isDirectory()) {
    throw fail('is an existing directory; expected a path for a file, or move that directory away');
  }
  let above = path.dirname(outputPath); // as given, so the message names it as the user wrote it
  while (!fs.existsSync(above) && path.dirname(above) !== above) above = path.dirname(above);
  if (!fs.statSync(above).isDirectory()) {
    throw fail(`${above} is a file, not a directory; write into a directory, or move that file away`);
  }
  if (sameFile(outputPath, inputPath)) {
    throw fail(`is the input ${inputPath}, which the scores would replace; write the scores to another file`);
  }
  // A file the manifest lists would break the bundle's hashes, anything else is lost when a
  // retrain replaces the folder whole.
  const root = realPath(bundleDir);
  const relative = path.relative(root, realPath(outputPath));
  if (relative === '' || !(relative === '..' || relative.startsWith(`..${path.sep}`) || path.isAbsolute(relative))) {
    throw fail(`is inside the bundle ${bundleDir}, which a retrain replaces whole and whose files are hash-checked; ` +
      'write it outside the bundle folder');
  }
}

/** Create the folders above `file` that are missing, as `vaeguard score` does; returns them, deepest first. */
function makeParents(file) {
  const missing = [];
  for (let at = path.dirname(path.resolve(file)); !fs.existsSync(at); at = path.dirname(at)) missing.push(at);
  if (missing.length) {
    try {
      fs.mkdirSync(missing[0], { recursive: true });
    } catch (err) {
      removeEmptyFolders(missing);
      throw new UserError(`output ${file}: cannot create its folder (${err.code || err.message}); check the path ` +
        'and its permissions');
    }
  }
  return missing;
}

/** Remove `folders` (deepest first) while they are empty: a failed run leaves no folder it made. */
function removeEmptyFolders(folders) {
  for (const folder of folders) {
    try { fs.rmdirSync(folder); } catch { return; }
  }
}

async function main(argv) {
  const { bundleDir, inputPath, outputPath, chunkRows } = parseArgs(argv);
  checkInputName(inputPath);
  checkOutput(outputPath, inputPath, bundleDir);
  const manifest = readManifest(bundleDir);
  const inputs = scorerInputs(manifest);
  const { scorerPath, bytes } = readScorer(bundleDir, manifest);
  const blankShares = trainingBlankShares(manifest);
  if (!fs.existsSync(inputPath) || !fs.statSync(inputPath).isFile()) {
    throw inputError(`${inputPath}: file not found; check the path`);
  }
  // Checked before reading, as `vaeguard score` does: an empty .csv.gz is not a gzip error.
  if (fs.statSync(inputPath).size === 0) {
    throw inputError(`${inputPath}: the file is empty; expected a header row and data rows`);
  }
  const notText = await notCsvTextError(inputPath);
  if (notText) throw notText;
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ['cpu'] });
  const threshold = checkScorerAgrees(scorerPath, manifest, inputs, onnxMetadata(bytes, scorerPath), session);

  // Write beside the target and rename at the end: a failed run leaves no partial output.
  const folders = makeParents(outputPath);
  const temp = path.join(path.dirname(outputPath), `.${path.basename(outputPath)}.tmp-${process.pid}`);
  let out = null;
  try {
    try {
      out = fs.openSync(temp, 'w');
    } catch (err) {
      throw new UserError(`output ${outputPath}: cannot write in its folder (${err.code || err.message}); check its ` +
        'permissions, or write elsewhere');
    }
    let scorer = null;
    for await (const record of csvRecords(inputPath)) {
      if (scorer === null) { // the first record is the header
        checkHeader(inputPath, record.fields);
        scorer = new ChunkScorer(session, inputs, record.fields, manifest.schema || {}, chunkRows, inputPath,
          blankShares);
        fs.writeSync(out, scorer.outputHeader());
      } else if (scorer.add(record)) {
        fs.writeSync(out, await scorer.flush());
      }
    }
    if (scorer === null) throw inputError(`${inputPath}: the file is empty; expected a header row and data rows`);
    fs.writeSync(out, await scorer.flush());
    if (scorer.rowsBefore === 0) throw inputError(`${inputPath}: has a header but no data rows`);
    fs.closeSync(out);
    fs.renameSync(temp, outputPath);
    // As `vaeguard score` prints them: "warning: " and the line, its control characters escaped.
    for (const line of scorer.inputWarnings()) {
      process.stderr.write(`warning: ${line.replace(NOT_PRINTABLE, pyEscape)}\n`);
    }
    // The threshold the graph flags with (its metadata; the manifest's agrees, checked above).
    process.stderr.write(`${outputPath}: ${scorer.rowsBefore} rows, ${scorer.anomalies} anomalies ` +
      `(threshold ${threshold}, target FPR ${manifest.calibration.target_fpr})\n`);
  } catch (err) {
    if (out !== null) try { fs.closeSync(out); } catch { /* already closed */ }
    fs.rmSync(temp, { force: true });
    removeEmptyFolders(folders);
    throw err;
  }
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((err) => {
    if (err instanceof UserError) {
      process.stderr.write(`error: ${err.message}\n`);
    } else { // onnxruntime or I/O failures: keep them on one line too
      process.stderr.write(`error: ${String(err && err.message || err).replace(/\s+/g, ' ').trim()}\n`);
    }
    process.exitCode = err instanceof UserError ? err.status : 1;
  });
}

module.exports = {
  CsvParser, parseNumber, formatFloat32, decodeUtf8, percent, shown, general, onnxMetadata, trainingBlankShares,
};
