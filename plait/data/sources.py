"""The inputs of `plait prepare INPUT... -o DIR`: which files they name, and their documents.

An INPUT is a file, a folder (searched recursively, hidden entries skipped) or a glob. A file's
format follows its name: `.txt` / `.md` (the whole file is one document), `.jsonl` / `.json`
(one record per line, its `--text-field` the document; a `.json` holding one array is read
whole), `.parquet` and `.arrow` (the text column), each of the line formats optionally
`.gz` or `.zst` compressed. A folder made by Hugging Face `datasets`' `save_to_disk` (it holds
`state.json`) is one source: its Arrow files, read with pyarrow, never with `datasets`.

Every reader streams: one line, one record batch or one file's text at a time. Bad records
(malformed JSON, a missing or non-string text field) raise DataError naming `file:line`, or
with `skip_bad` are counted in the source's `skipped`.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from plait.data.corpus import NotText, decode_text
from plait.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
LINE_SUFFIXES = (".jsonl", ".json", ".ndjson")
TABLE_SUFFIXES = (".parquet", ".arrow")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
KNOWN = "expected .txt, .md, .jsonl, .json (each optionally .gz or .zst), .parquet, .arrow or a datasets folder"
_ARROW_BATCH_ROWS = 1024


@dataclass
class Source:
    path: Path
    kind: str  # "text" | "jsonl" | "json" | "parquet" | "arrow" | "datasets"
    compression: str | None = None  # "gzip" | "zstd"
    files: list[Path] = field(default_factory=list)  # a datasets folder's Arrow files, in order
    documents: int = 0  # read so far
    skipped: int = 0  # bad records skipped (skip_bad)
    empty: int = 0  # documents with no text, left out
    done_bytes: float = 0.0  # how far through the file(s) the reader is, in bytes on disk

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in (self.files or [self.path]))

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "compression": self.compression}


def classify(path: Path, field_name: str = "INPUT") -> Source:
    """The Source a file or datasets folder is; DataError for an extension plait cannot read."""
    if path.is_dir():
        return _datasets_folder(path, field_name)
    name = path.name.lower()
    suffix = Path(name).suffix
    compression = COMPRESSIONS.get(suffix)
    if compression:
        suffix = Path(name[: -len(suffix)]).suffix
    if suffix in TEXT_SUFFIXES:
        return Source(path, "text", compression)
    if suffix in LINE_SUFFIXES:
        return Source(path, "json" if suffix == ".json" else "jsonl", compression)
    if suffix in TABLE_SUFFIXES and not compression:
        return Source(path, suffix[1:])
    raise DataError(f"{field_name}: '{path}' has an extension plait prepare does not read ({KNOWN})")


def _datasets_folder(path: Path, field_name: str) -> Source:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{field_name}: '{path}' holds several splits ({', '.join(splits)}); "
                        f"name the one to prepare, e.g. {path / (splits[0] if splits else 'train')}")
    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{field_name}: '{path / 'state.json'}' is not a datasets save_to_disk state") from None
    if any(f.resolve().parent != path.resolve() for f in files):
        raise DataError(f"{field_name}: '{path / 'state.json'}' names a file outside its folder")
    return Source(path, "datasets", files=files)


def expand_inputs(specs: list[str]) -> list[Source]:
    """Every source the INPUTs name, each once, in the order given (a folder's or glob's sorted)."""
    sources: list[Source] = []
    seen: set[Path] = set()
    for spec in specs:
        path = Path(spec).expanduser()
        if path.exists():
            found = _walk(path) if path.is_dir() and not (path / "state.json").is_file() else [path]
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
            if not found:
                raise DataError(f"INPUT: '{spec}' matches no file")
            found = [f for p in found for f in (_walk(p) if p.is_dir() and not (p / "state.json").is_file() else [p])]
        else:
            raise DataError(f"INPUT: '{spec}' does not exist")
        for p in found:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                sources.append(classify(p))
    return sources


def _walk(folder: Path) -> list[Path]:
    """A folder's files and datasets folders, sorted by relative path; hidden entries skipped."""
    found: list[tuple[str, Path]] = []
    for parent, dirs, files in os.walk(folder):
        here = Path(parent)
        if here != folder and (here / "state.json").is_file():
            found.append((here.relative_to(folder).as_posix(), here))
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [((here / f).relative_to(folder).as_posix(), here / f) for f in files if not f.startswith(".")]
    return [p for _, p in sorted(found)]


def sha256_of(source: Source) -> str:
    """sha256 of the source's bytes on disk (a datasets folder: of its Arrow files in order)."""
    digest = hashlib.sha256()
    for f in source.files or [source.path]:
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


class _Counting(io.RawIOBase):
    """A raw file that tells its Source how many bytes on disk have been read."""

    def __init__(self, raw: BinaryIO, source: Source) -> None:
        self.raw, self.source = raw, source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.source.done_bytes += n or 0
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open_binary(source: Source) -> BinaryIO:
    raw = io.BufferedReader(_Counting(open(source.path, "rb", buffering=0), source), 1 << 20)
    if source.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if source.compression == "zstd":
        import zstandard  # here, not at the top: only zstd input needs it

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return raw


def documents(source: Source, text_field: str, encoding: str, skip_bad: bool) -> Iterator[str]:
    """The source's documents in order, empty ones left out (counted in `source.empty`)."""
    readers = {"text": _text_documents, "jsonl": _jsonl_documents, "json": _jsonl_documents,
               "parquet": _table_documents, "arrow": _table_documents, "datasets": _table_documents}
    for text in readers[source.kind](source, text_field, encoding, skip_bad):
        if text:
            source.documents += 1
            yield text
        else:
            source.empty += 1


def _text_documents(source: Source, text_field: str, encoding: str, skip_bad: bool) -> Iterator[str]:
    with _open_binary(source) as f:
        try:
            raw = f.read()
        except (OSError, EOFError) as exc:
            raise DataError(f"INPUT: '{source.path}' cannot be decompressed ({exc})") from None
    try:
        yield decode_text(raw, encoding)
    except NotText as exc:
        if not skip_bad:
            raise DataError(f"INPUT: '{source.path}' {exc}") from None
        source.skipped += 1


def _bad(source: Source, where: str, problem: str, skip_bad: bool) -> None:
    if not skip_bad:
        raise DataError(f"{source.path}:{where}: {problem} (--skip-bad skips such records)")
    source.skipped += 1


def _record_text(record: object, text_field: str) -> tuple[str | None, str]:
    """(the record's text, or None and why not)."""
    if not isinstance(record, dict):
        return None, f"a record must be a JSON object, not {type(record).__name__}"
    if text_field not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        return None, f"no '{text_field}' field (its fields: {keys}; --text-field picks another)"
    value = record[text_field]
    if not isinstance(value, str):
        return None, f"'{text_field}' is {type(value).__name__}, not a string"
    return value, ""


def _jsonl_documents(source: Source, text_field: str, encoding: str, skip_bad: bool) -> Iterator[str]:
    with _open_binary(source) as f:
        stream = io.TextIOWrapper(f, encoding="utf-8", errors="strict", newline="\n")
        try:
            first = stream.read(1)
            while first.isspace():
                first = stream.read(1)
            if source.kind == "json" and first == "[":
                yield from _json_array(source, first + stream.read(), text_field, skip_bad)
                return
            lines = _chain_first(first, stream)
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    _bad(source, str(number), f"not valid JSON ({exc.args[0].split(':')[0]})", skip_bad)
                    continue
                text, problem = _record_text(record, text_field)
                if text is None:
                    _bad(source, str(number), problem, skip_bad)
                    continue
                yield text
        except UnicodeDecodeError as exc:
            raise DataError(f"INPUT: '{source.path}' is not UTF-8 ({exc.reason}), as JSON must be") from None
        except (OSError, EOFError) as exc:
            raise DataError(f"INPUT: '{source.path}' cannot be decompressed ({exc})") from None


def _chain_first(first: str, stream: io.TextIOWrapper) -> Iterator[str]:
    """The stream's lines, `first` (a character read ahead) put back in front."""
    if not first:
        return
    line = stream.readline()
    yield first + line
    yield from stream


def _json_array(source: Source, text: str, text_field: str, skip_bad: bool) -> Iterator[str]:
    """A .json file holding one array of records (read whole: JSON arrays do not stream)."""
    try:
        records = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{source.path}: not valid JSON ({exc})") from None
    for number, record in enumerate(records, 1):
        text_value, problem = _record_text(record, text_field)
        if text_value is None:
            _bad(source, f"record {number}", problem, skip_bad)
            continue
        yield text_value


def _table_documents(source: Source, text_field: str, encoding: str, skip_bad: bool) -> Iterator[str]:
    """Parquet, Arrow and datasets folders: the text column, one record batch at a time."""
    import pyarrow as pa  # here, not at the top: text and JSON input never need it
    import pyarrow.parquet as pq

    files = source.files or [source.path]
    for path in files:
        size = path.stat().st_size
        base = source.done_bytes
        try:
            if source.kind == "parquet":
                table = pq.ParquetFile(path)
                columns, total = table.schema_arrow.names, table.metadata.num_rows
                batches = table.iter_batches(batch_size=_ARROW_BATCH_ROWS, columns=[text_field]) \
                    if text_field in columns else iter(())
            else:
                schema, batches = _arrow_batches(pa, path)
                columns, total = schema.names, None
            if text_field not in columns:
                raise DataError(f"{path}: no '{text_field}' column (its columns: {', '.join(columns[:8])}; "
                                "--text-field picks another)")
            row = 0
            for batch in batches:
                column = batch.column(batch.schema.get_field_index(text_field))
                if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                    raise DataError(f"{path}: column '{text_field}' holds {column.type}, not strings")
                for value in column.to_pylist():
                    row += 1
                    if value is None:
                        _bad(source, f"row {row}", f"'{text_field}' is null", skip_bad)
                        continue
                    yield value
                source.done_bytes = base + (size * row / total if total else 0)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
            raise DataError(f"INPUT: '{path}' cannot be read as {source.kind} ({str(exc).splitlines()[0]})") from None
        source.done_bytes = base + size


def _arrow_batches(pa, path: Path):
    """(schema, record batches) of an Arrow IPC stream (what `datasets` writes) or file, memory-mapped."""
    import pyarrow.ipc  # noqa: F401  (the submodule; pyarrow does not always import it)

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
