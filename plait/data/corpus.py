"""Corpus specs: what `data.corpus` names, whether it exists, and its text.

A spec is one of: `shakespeare` (shipped with the package), `python` (the running
interpreter's standard library sources, read at run time), a text file, a folder of
text files, or a `.bin` token file made by `plait prepare`. Built-in names win over a
file of the same name in the working directory (write `./python` for the file).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from plait.errors import DataError

SHAKESPEARE_SHA256 = "3237e33221e73615c677bd59fd69a76da38f9a2eb51d6efb7191f32f8cb9fa4c"
SHAKESPEARE_BYTES = 5_057_282
BUILTINS = ("shakespeare", "python")
_EXPECTED = "expected shakespeare, python, a text file, a folder of text files or a .bin from plait prepare"
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    spec: str  # as the user wrote it, for messages and descriptions
    kind: str  # "shakespeare" | "python" | "file" | "folder" | "bin"
    path: Path | None  # absolute path of the file, folder or stdlib root
    field: str  # the setting that named it, e.g. "data.corpus", for error messages

    def error(self, problem: str) -> DataError:
        return DataError(f"{self.field}: '{self.spec}' {problem}")


def resolve_corpus(spec: str, field: str = "data.corpus") -> Corpus:
    """Classify `spec`; raise DataError if it names nothing."""
    if spec == "shakespeare":
        return Corpus(spec, "shakespeare", None, field)
    if spec == "python":
        return Corpus(spec, "python", Path(sysconfig.get_paths()["stdlib"]).resolve(), field)
    path = Path(spec).expanduser()
    if path.is_dir():
        return Corpus(spec, "folder", path.resolve(), field)
    if path.is_file():
        return Corpus(spec, "bin" if path.suffix == ".bin" else "file", path.resolve(), field)
    raise DataError(f"{field}: '{spec}' does not exist ({_EXPECTED})")


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


def _read_source(path: Path, skip_binary: bool) -> str | None:
    raw = path.read_bytes()
    if skip_binary and b"\0" in raw:
        return None  # images, archives and other binaries in a folder of text
    return raw.decode("utf-8", errors="replace")


def check_nonempty(corpus: Corpus) -> None:
    """Raise DataError if the corpus holds no text (cheap: stops at the first text found)."""
    if corpus.kind == "shakespeare":
        return
    if corpus.kind == "bin":
        from plait.data.tokenfile import read_sidecar

        if read_sidecar(corpus)["n_tokens"] == 0:
            raise corpus.error("is empty")
        return
    if corpus.kind == "file":
        if corpus.path.stat().st_size == 0:  # type: ignore[union-attr]
            raise corpus.error("is empty")
        return
    for path in source_files(corpus):
        if path.stat().st_size and _read_source(path, skip_binary=corpus.kind == "folder"):
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
    texts = (_read_source(p, skip_binary=corpus.kind == "folder") for p in source_files(corpus))
    return "\n\n".join(t for t in texts if t is not None)


def fingerprint(corpus: Corpus) -> str:
    """A cheap stand-in for the content hash: paths, sizes and mtimes of every source file.

    It only decides whether the cached content hash can be trusted; the caches themselves
    are keyed by the content hash, so touching a file costs a re-read, never a re-tokenise.
    """
    if corpus.kind == "shakespeare":
        return SHAKESPEARE_SHA256  # fixed by the package; checked whenever it is decompressed
    entries = [[corpus.kind, str(corpus.path)]]
    for path in source_files(corpus):
        st = path.stat()
        entries.append([str(path), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
