"""Corpus specs: what `data.corpus` names, whether it exists, and its text.

A spec is one of: `shakespeare` (shipped with the package), `python` (the running
interpreter's standard library sources, read at run time), a text file, a folder of
text files, a `.bin` token file made by `plait prepare INPUT -o OUT.bin`, or a prepared
folder made by `plait prepare INPUT... -o DIR` (it holds a plait-corpus manifest.json). Built-in names win over a
file of the same name in the working directory (write `./python` for the file).

A user's text is decoded strictly in its `data.encoding` (UTF-8 unless told): never with
replacement characters. Binary files (NUL bytes, control characters) are refused, or skipped
inside a folder.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import lzma
import os
import sysconfig
import tokenize
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from plait.config import check_encoding
from plait.errors import DataError

SHAKESPEARE_SHA256 = "3237e33221e73615c677bd59fd69a76da38f9a2eb51d6efb7191f32f8cb9fa4c"
SHAKESPEARE_BYTES = 5_057_282
BUILTINS = ("shakespeare", "python")
_EXPECTED = "expected shakespeare, python, a text file, a folder of text files or a .bin from plait prepare"
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Text has almost no control characters (tab, newlines, form feed and escape aside); random
# bytes have about 11%. Counted in the first _SNIFF_CHARS characters only: binary is binary throughout.
_CONTROL_CHARS = [chr(c) for c in range(32) if chr(c) not in "\t\n\v\f\r\x1b"]
_BINARY_CONTROL_SHARE = 0.05
_SNIFF_CHARS = 1 << 20


@dataclass(frozen=True)
class Corpus:
    spec: str  # as the user wrote it, for messages and descriptions
    kind: str  # "shakespeare" | "python" | "file" | "folder" | "bin" | "prepared"
    path: Path | None  # absolute path of the file, folder or stdlib root
    field: str  # the setting that named it, e.g. "data.corpus", for error messages
    encoding: str = "utf-8"  # of a text file or folder (data.encoding); built-in corpora know their own

    def error(self, problem: str) -> DataError:
        return DataError(f"{self.field}: '{self.spec}' {problem}")


class NotText(Exception):
    """Why a source file cannot be read as text; `binary`: it is data, not text in another encoding."""

    def __init__(self, problem: str, binary: bool) -> None:
        super().__init__(problem)
        self.binary = binary


def resolve_corpus(spec: str, field: str = "data.corpus", encoding: str = "utf-8") -> Corpus:
    """Classify `spec`; raise DataError if it names nothing (ConfigError for an unknown encoding)."""
    check_encoding(encoding)
    if spec == "shakespeare":
        return Corpus(spec, "shakespeare", None, field)
    if spec == "python":
        return Corpus(spec, "python", Path(sysconfig.get_paths()["stdlib"]).resolve(), field)
    path = Path(spec).expanduser()
    if path.is_dir():
        return Corpus(spec, "prepared" if is_prepared_folder(path) else "folder", path.resolve(), field, encoding)
    if path.is_file():
        return Corpus(spec, "bin" if path.suffix == ".bin" else "file", path.resolve(), field, encoding)
    raise DataError(f"{field}: '{spec}' does not exist ({_EXPECTED})")


def is_prepared_folder(path: Path) -> bool:
    """Whether `path` is a folder written by `plait prepare -o DIR` (plait/data/prepared.py)."""
    if (path / "train.idx").is_file() and (path / "manifest.json").is_file():
        return True  # even with a damaged manifest: reading it then says what is wrong
    try:
        return json.loads((path / "manifest.json").read_bytes()).get("format") == "plait-corpus"
    except (OSError, ValueError, AttributeError):
        return False


def source_files(corpus: Corpus) -> list[Path]:
    """The files a python or folder corpus is made of, sorted by relative path."""
    assert corpus.path is not None
    if corpus.kind == "file":
        return [corpus.path]
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(corpus.path):
        if corpus.kind == "python":
            dirs[:] = [d for d in dirs if d not in _SKIPPED_STDLIB_DIRS]
            files = [f for f in files if f.endswith(".py")]
        else:
            # Hidden entries (.git, .DS_Store, editor swap files) are never corpus text.
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files = [f for f in files if not f.startswith(".")]
        for name in files:
            full = Path(folder) / name
            if full.is_file():
                found.append((full.relative_to(corpus.path).as_posix(), full))
    return [full for _, full in sorted(found)]


def _binary_reason(text: str) -> str | None:
    """Why `text` looks like binary data rather than text; None if it does not."""
    if "\0" in text:
        return "it contains NUL bytes"
    sample = text[:_SNIFF_CHARS]
    controls = sum(sample.count(c) for c in _CONTROL_CHARS)
    if controls > _BINARY_CONTROL_SHARE * len(sample):
        return f"{controls / len(sample):.0%} of it is control characters"
    return None


def decode_text(raw: bytes, encoding: str) -> str:
    """`raw` decoded strictly, never with replacement characters; NotText says why it cannot be."""
    hint = "if it is text in another encoding, set data.encoding (plait prepare: --encoding) to it"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        binary = _binary_reason(raw.decode("latin-1"))  # every byte as one character
        if binary:
            raise NotText(f"is not text ({binary})", binary=True) from None
        replaced = raw.decode(encoding, errors="replace")
        share = replaced.count("\ufffd") / len(replaced)
        if share > 0.5:
            raise NotText(f"is not text: {share:.0%} of it is not valid {encoding} ({hint})", binary=False) from None
        raise NotText(f"is not valid {encoding} text (byte 0x{raw[exc.start]:02x} at offset {exc.start:,}); "
                      f"{hint}, e.g. data.encoding=latin-1", binary=False) from None
    binary = _binary_reason(text)
    if binary:
        raise NotText(f"is not text ({binary})", binary=True)
    return text


def _python_source(raw: bytes) -> str | None:
    """A standard library file decoded as the interpreter does (PEP 263); None if it cannot be."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None  # the stdlib's own tests of undecodable source: Python cannot read them either


def _read_source(corpus: Corpus, path: Path) -> str | None:
    """The text of one file of `corpus`; None for a binary file in a folder (images, archives)."""
    raw = path.read_bytes()
    if corpus.kind == "python":
        return _python_source(raw)
    try:
        return decode_text(raw, corpus.encoding)
    except NotText as exc:
        if corpus.kind == "file":
            raise corpus.error(str(exc)) from None
        if exc.binary:
            return None
        assert corpus.path is not None
        raise corpus.error(f"holds '{path.relative_to(corpus.path).as_posix()}', which {exc}") from None


def check_text_nonempty(corpus: Corpus) -> None:
    """Raise DataError if a text corpus (any kind but `bin`) holds no text (cheap: stops at
    the first text found). `plait.data.dataset.check_nonempty` covers token files too."""
    assert corpus.kind != "bin", "a token file's size is in its sidecar (plait.data.tokenfile)"
    if corpus.kind == "shakespeare":
        return
    if corpus.kind == "file":
        if corpus.path.stat().st_size == 0:  # type: ignore[union-attr]
            raise corpus.error("is empty")
        return
    for path in source_files(corpus):
        if path.stat().st_size and _read_source(corpus, path):
            return
    what = "no .py files" if corpus.kind == "python" else "no non-empty text files"
    raise corpus.error(f"is empty ({what} in it)")


def read_text(corpus: Corpus) -> str:
    """The whole corpus as one string: files joined by a blank line."""
    if corpus.kind == "shakespeare":
        packed = resources.files("plait.data").joinpath("shakespeare.txt.xz").read_bytes()
        raw = lzma.decompress(packed)
        if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
            raise DataError("data.corpus: the built-in shakespeare text is corrupt (sha256 mismatch); reinstall plait")
        return raw.decode("ascii")
    texts = (_read_source(corpus, p) for p in source_files(corpus))
    return "\n\n".join(t for t in texts if t is not None)


def fingerprint(corpus: Corpus) -> str:
    """A cheap stand-in for the content hash: paths, sizes and mtimes of every source file.

    It only decides whether the cached content hash can be trusted; the caches themselves
    are keyed by the content hash, so touching a file costs a re-read, never a re-tokenise.
    """
    if corpus.kind == "shakespeare":
        return SHAKESPEARE_SHA256  # fixed by the package; checked whenever it is decompressed
    # The encoding is part of it: the same bytes read another way are another text.
    entries = [[corpus.kind, str(corpus.path), codecs.lookup(corpus.encoding).name]]
    for path in source_files(corpus):
        st = path.stat()
        entries.append([str(path), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
