"""Input and output: stage any CSV / JSONL / Parquet input into numbered shards, write results.

Staging streams the input once (never whole into memory) and writes Parquet shards of
``shard_rows`` rows under ``<run_dir>/input/``. Each staged row has a global ``row`` number, an
``id`` (the id column's value, or the row number when there is none: stable for the same file),
the decoded ``text``, the optional ``gold`` label, a ``skip_reason`` for rows that cannot be voted
on (empty text) and a ``note`` (e.g. undecodable bytes replaced). Other input columns pass through.
Shards are the unit of resumption: a killed run re-stages nothing when the input is unchanged, and
re-labels only the shards whose output part is missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from labelwright.specialists.errors import InputDataError

# Columns that labelwright writes itself; an input column of the same name passes through as input_<name>.
RESERVED = {
    "row", "id", "text", "gold", "note", "skip_reason", "shard", "label", "decided_by", "reason",
    "confidence", "specialists_label", "controller_label", "controller_answer", "controller_confidence", "prompt_tokens",
    "completion_tokens", "llm_calls", "cached", "seed", "reference", "candidates", "student_label", "stage",
}
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_CHUNK_ROWS = 10_000


@dataclass(frozen=True)
class Shard:
    index: int
    path: Path
    first_row: int
    n_rows: int


@dataclass(frozen=True)
class StagedInput:
    shards: list[Shard]
    n_rows: int
    passthrough: list[str]  # input columns carried to the output (renamed when reserved)


def input_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputDataError(
            f"cannot tell the format of {path}: use a .csv, .jsonl or .parquet file (or a folder of them)"
        )
    return fmt


def _source_files(source: Path) -> list[Path]:
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in FORMATS and p.is_file())
        if not files:
            raise InputDataError(f"folder {source} holds no .csv, .jsonl or .parquet files")
        if len({input_format(p) for p in files}) > 1:
            raise InputDataError(f"folder {source} mixes file formats; keep one format per folder")
        return files
    if not source.is_file():
        raise InputDataError(f"input {source} does not exist")
    input_format(source)
    return [source]


# ---------------------------------------------------------------- readers (yield pyarrow tables)


# Arrow reads CSV in blocks, and a row must fit in one: a block this large first, larger ones for a file that has
# longer rows (a 10 MB review).
_CSV_BLOCKS = (1 << 22, 1 << 26, 1 << 30)


def _iter_csv(path: Path) -> Iterator[pa.Table]:
    done = 0  # rows already yielded: a retry with larger blocks goes on after them
    for block in _CSV_BLOCKS:
        seen = 0
        try:
            for table in _csv_tables(path, block):
                if seen + table.num_rows > done:
                    yield table.slice(max(0, done - seen))
                    done = seen + table.num_rows
                seen += table.num_rows
            return
        except pa.ArrowInvalid as exc:
            if "straddl" in str(exc) and block != _CSV_BLOCKS[-1]:
                continue  # a row longer than the block: again with larger blocks
            message = " ".join(str(exc).split())  # Arrow quotes the rows it choked on, newlines and all
            message = message if len(message) <= 200 else message[:200] + "..."
            where = f" after its first {done} rows" if done else ""
            raise InputDataError(
                f"cannot read {path} as CSV{where}: {message} (a quote left open makes the rest of the file one "
                "value: fix the quoting, or give the data as JSONL or Parquet)") from None


def _csv_tables(path: Path, block: int) -> Iterator[pa.Table]:
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(newlines_in_values=True)
    probe = pacsv.open_csv(path, parse_options=parse, read_options=pacsv.ReadOptions(block_size=block))
    names = probe.schema.names
    probe.close()
    # Every column as raw bytes: later blocks can never disagree with inferred types, and text that is not
    # valid UTF-8 is decoded row by row (with a note) instead of failing the file.
    convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names}, strings_can_be_null=False)
    reader = pacsv.open_csv(path, parse_options=parse, convert_options=convert,
                            read_options=pacsv.ReadOptions(block_size=block))
    for batch in reader:
        yield pa.Table.from_batches([batch])


def _iter_jsonl(path: Path) -> Iterator[pa.Table]:
    rows: list[dict] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
            except json.JSONDecodeError as exc:
                raise InputDataError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix or remove it") from None
            if not isinstance(obj, dict):
                raise InputDataError(f"{path} line {lineno} is not a JSON object; each line must be one record")
            rows.append(obj)
            if len(rows) >= _CHUNK_ROWS:
                yield _jsonl_table(rows)
                rows = []
    if rows:
        yield _jsonl_table(rows)


def _jsonl_table(rows: list[dict]) -> pa.Table:
    """Every field as raw bytes, like CSV: types never disagree between chunks, and text holding
    undecodable bytes (kept as surrogates by the reader) is decoded row by row with a note."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return pa.table({c: pa.array([_as_bytes(row.get(c)) for row in rows], type=pa.binary()) for c in columns})


def _as_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        value = json.dumps(value, ensure_ascii=False)
    elif not isinstance(value, str):
        return str(value).encode()
    try:  # bytes the reader could not decode come back as they were
        return value.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate written as a JSON escape ("\ud800"): invalid UTF-8, so the
        return value.encode("utf-8", errors="surrogatepass")  # row is decoded with U+FFFD and a note


def _iter_parquet(path: Path) -> Iterator[pa.Table]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputDataError(f"cannot read {path} as Parquet: {exc}") from None
    for batch in pf.iter_batches(batch_size=_CHUNK_ROWS):
        yield pa.Table.from_batches([batch])


_READERS: dict[str, Callable[[Path], Iterator[pa.Table]]] = {
    "csv": _iter_csv, "jsonl": _iter_jsonl, "parquet": _iter_parquet,
}


def read_frame(path: str | Path) -> pd.DataFrame:
    """Read a small CSV / JSONL / Parquet file whole (seed files, gold files), strings decoded."""
    path = Path(path)
    tables = list(_READERS[input_format(path)](path))
    if not tables:
        return pd.DataFrame()
    df = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = [_decode(v)[0] if isinstance(v, (bytes, bytearray)) else v for v in df[col]]
    return df


def iter_texts(source: str | Path, text_column: str) -> Iterator[list[str]]:
    """The texts of a CSV / JSONL / Parquet file (or a folder of them) a block at a time, decoded as staging
    decodes them, without staging anything (what the estimate reads)."""
    for file in _source_files(Path(source)):
        for table in _READERS[input_format(file)](file):
            if text_column not in table.column_names:
                raise InputDataError(f"{file} has no column {text_column!r}; its columns are {table.column_names}; "
                                     "pass --text-column")
            yield [_decode(v)[0] for v in table.column(text_column).to_pylist()]


# ---------------------------------------------------------------- staging


def _decode(value) -> tuple[str, str | None]:
    if value is None:
        return "", None
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError as exc:
            return (
                bytes(value).decode("utf-8", errors="replace"),
                f"text was not valid UTF-8 (byte {exc.start}); undecodable bytes replaced with U+FFFD",
            )
    if isinstance(value, float) and value != value:  # NaN from pandas
        return "", None
    return str(value), None


def _fingerprint(files: list[Path], options: dict) -> dict:
    return {
        "files": [{"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files],
        "options": options,
    }


def stage_input(
    source: str | Path,
    *,
    run_dir: str | Path,
    text_column: str,
    id_column: str | None = None,
    gold_column: str | None = None,
    labels: list[str] | None = None,
    shard_rows: int = 1000,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> StagedInput:
    """Validate and shard the input. Raises :class:`InputDataError` naming the file, row and column."""
    source = Path(source)
    files = _source_files(source)
    stage_dir = Path(run_dir) / "input"
    manifest_path = stage_dir / "manifest.json"
    options = {"text_column": text_column, "id_column": id_column, "gold_column": gold_column,
               "labels": labels, "shard_rows": shard_rows, "limit": limit}
    fingerprint = _fingerprint(files, options)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint:
            shards = [Shard(s["index"], stage_dir / s["file"], s["first_row"], s["n_rows"]) for s in manifest["shards"]]
            if all(s.path.is_file() for s in shards):
                return StagedInput(shards, manifest["n_rows"], manifest["passthrough"])
    stage_dir.mkdir(parents=True, exist_ok=True)
    for old in stage_dir.glob("shard-*.parquet"):
        old.unlink()

    allowed = set(labels) if labels is not None else None
    seen_ids: dict[str, int] = {}
    shards: list[Shard] = []
    pending: list[pd.DataFrame] = []
    pending_rows = 0
    row = 0
    passthrough: list[str] | None = None

    def flush(final: bool) -> None:
        nonlocal pending, pending_rows
        while pending_rows >= shard_rows or (final and pending_rows > 0):
            df = pd.concat(pending, ignore_index=True)
            head, rest = df.iloc[:shard_rows], df.iloc[shard_rows:]
            idx = len(shards)
            path = stage_dir / f"shard-{idx:05d}.parquet"
            tmp = path.with_suffix(".tmp")
            head.to_parquet(tmp, index=False)
            os.replace(tmp, path)
            shards.append(Shard(idx, path, int(head["row"].iloc[0]), len(head)))
            pending = [rest] if len(rest) else []
            pending_rows = len(rest)

    for file in files:
        for table in _READERS[input_format(file)](file):
            if limit is not None and row >= limit:
                break
            if limit is not None and row + table.num_rows > limit:
                table = table.slice(0, limit - row)
            names = table.schema.names
            if text_column not in names:
                raise InputDataError(
                    f"text column {text_column!r} is not in {file}; its columns are {names}. "
                    "Pass the right one with --text-column (or text_column: in the task file)"
                )
            for col, flag in ((id_column, "--id-column"), (gold_column, "--gold-column")):
                if col is not None and col not in names:
                    raise InputDataError(f"column {col!r} ({flag}) is not in {file}; its columns are {names}")
            if passthrough is None:
                passthrough = [n for n in names if n not in {text_column, id_column, gold_column}]
            chunk = _stage_chunk(table, file, row, text_column, id_column, gold_column, allowed, seen_ids, passthrough)
            row += len(chunk)
            pending.append(chunk)
            pending_rows += len(chunk)
            flush(final=False)
            if progress:
                progress(row)
    flush(final=True)
    if row == 0:
        raise InputDataError(f"input {source} holds no rows")
    passthrough = passthrough or []
    manifest = {
        "fingerprint": fingerprint,
        "n_rows": row,
        "passthrough": passthrough,
        "shards": [{"index": s.index, "file": s.path.name, "first_row": s.first_row, "n_rows": s.n_rows} for s in shards],
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    return StagedInput(shards, row, passthrough)


def _stage_chunk(table, file, first_row, text_column, id_column, gold_column, allowed, seen_ids, passthrough):
    n = table.num_rows
    rows = list(range(first_row, first_row + n))
    texts, notes, skips = [], [], []
    kind = table.schema.field(text_column).type
    odd = None if pa.types.is_binary(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind) else (
        f"column {text_column!r} holds {kind} values, not text: labelled as written")
    for value in table.column(text_column).to_pylist():
        text, note = _decode(value)
        note = note or (odd if value is not None else None)
        texts.append(text)
        notes.append(note)
        skips.append("empty text" if not text.strip() else None)
    if id_column is not None:
        ids = []
        for r, value in zip(rows, table.column(id_column).to_pylist()):
            ident, _ = _decode(value)
            ident = ident.strip()
            if not ident:
                raise InputDataError(f"{file}: row {r} has an empty id in column {id_column!r}; every row needs an id")
            if ident in seen_ids:
                raise InputDataError(
                    f"{file}: duplicate id {ident!r} in column {id_column!r} at rows {seen_ids[ident]} and {r}; "
                    "ids must be unique (fix the file, or leave out --id-column to number the rows)"
                )
            seen_ids[ident] = r
            ids.append(ident)
    else:
        ids = [str(r) for r in rows]
    data = {"row": pd.array(rows, dtype="int64"), "id": ids, "text": texts,
            "note": notes, "skip_reason": skips}
    if gold_column is not None:
        golds = []
        for r, value in zip(rows, table.column(gold_column).to_pylist()):
            g, _ = _decode(value)
            g = g.strip()
            if g and allowed is not None and g not in allowed:
                raise InputDataError(
                    f"{file}: row {r} has gold label {g!r} in column {gold_column!r}, which is not in the label set "
                    f"{sorted(allowed)}; fix the gold column or add the label to --labels"
                )
            golds.append(g or None)
        data["gold"] = golds
    for col in passthrough:
        if col in table.schema.names:
            values = table.column(col).to_pylist()
            if pa.types.is_binary(table.schema.field(col).type):
                values = [None if v is None else _decode(v)[0] for v in values]
        else:
            values = [None] * n
        data[f"input_{col}" if col in RESERVED else col] = values
    return pd.DataFrame(data)


# ---------------------------------------------------------------- output


def _plain_lists(df: pd.DataFrame, *, as_json: bool) -> pd.DataFrame:
    """List columns as plain Python lists (Ray Data hands them over as Arrow-backed columns, whose pandas
    metadata pandas cannot read back from Parquet), or as JSON text."""
    lists = [c for c in df.columns if isinstance(df[c].dtype, pd.ArrowDtype) and pa.types.is_list(df[c].dtype.pyarrow_dtype)]
    lists += [c for c in df.columns if df[c].dtype == object and c not in lists
              and df[c].map(lambda v: isinstance(v, (list, np.ndarray))).any()]
    if not lists:
        return df
    df = df.copy()
    for c in lists:
        plain = [v.tolist() if isinstance(v, np.ndarray) else list(v) if isinstance(v, list) else None
                 for v in df[c].astype(object)]
        df[c] = pd.Series([json.dumps(v) if as_json and v is not None else v for v in plain], index=df.index,
                          dtype=object)
    return df


def write_frame(df: pd.DataFrame, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``df`` as Parquet, CSV or JSONL (from ``fmt`` or the file suffix), atomically.

    Columns of lists (the candidate sets) stay lists in Parquet and JSONL, and are JSON arrays in CSV
    (``json.loads`` reads them back)."""
    path = Path(path)
    fmt = fmt or FORMATS.get(path.suffix.lower(), "parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df = _plain_lists(df, as_json=fmt == "csv")
    if fmt == "parquet":
        df.to_parquet(tmp, index=False)
    elif fmt == "csv":
        df.to_csv(tmp, index=False)
    elif fmt == "jsonl":
        df.to_json(tmp, orient="records", lines=True, force_ascii=False)
    else:
        raise InputDataError(f"output format {fmt!r} is unknown; use parquet, csv or jsonl")
    os.replace(tmp, path)
    return path
