"""Sharded checkpoint files: every rank writes and reads only its own pieces, through
torch.distributed.checkpoint (DCP).

plait's pieces (plait/parallel/pieces.py) are boxes of full, named tensors, which is what DCP's
metadata describes (`ChunkStorageMetadata`: offsets and sizes), so a checkpoint is a plain DCP
checkpoint: `.metadata` plus one `__<rank>_0.distcp` per writing rank, keys `model/<name>` and
`optim/<name>/<state>`. Loading into another layout is DCP's resharding: each rank asks for its
own boxes and DCP reads the overlapping parts of the stored ones. Two planners adapt DCP's
default ones: they take a list of pieces instead of a state dict (a rank can hold several boxes of
one tensor, e.g. the pieces of a ZeRO shard, which DCP's tensor types cannot express).

DCP stores `.metadata` with pickle and reads it back with `pickle.load`, which would run code
from a hostile checkpoint. `SafeReader` reads it with an unpickler that only builds DCP's own
metadata classes (and torch sizes, dtypes, layouts); tensor data is read with
`torch.load(weights_only=True)` by DCP itself.

`write_sharded_checkpoint` serves both the synchronous path (the training thread, the world
group) and the background one (async_writer.py: a writer thread, staged copies of the pieces,
a process group of its own): the same files, checks and commit.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner import TensorWriteData
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from plait.comm import CHECKPOINT, Comm, Group
from plait.errors import CheckpointError, CollectiveOSError
from plait.parallel.pieces import Piece
from plait.train import checkpoint as ckpt

METADATA_FILE = ".metadata"


class UndecodableTensor(CheckpointError):
    """Stored tensor data that does not load (damaged, or not tensors at all)."""

    def __init__(self, message: str, error_type: str):
        super().__init__(message)
        self.error_type = error_type


class PieceSavePlanner(dcp.DefaultSavePlanner):
    """Saves the pieces this rank writes (`Piece.write`); the state dict passed to DCP is unused."""

    def __init__(self, pieces: list[Piece]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.by_index = {MetadataIndex(p.key, torch.Size(p.offsets)): p for p in pieces if p.write}

    def create_local_plan(self) -> SavePlan:
        items = []
        for index, piece in self.by_index.items():
            props = TensorProperties(dtype=piece.tensor.dtype)
            chunk = ChunkStorageMetadata(offsets=torch.Size(piece.offsets), sizes=torch.Size(piece.sizes))
            items.append(WriteItem(index=index, type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=chunk, properties=props,
                                                               size=torch.Size(piece.full_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        tensor = self.by_index[write_item.index].tensor.detach()
        if tensor.device.type != "cpu":
            return tensor.to("cpu", copy=True).contiguous()
        if tensor.is_contiguous() and tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.nbytes:
            return tensor  # a tensor of its own (an async checkpoint's staging buffer): no copy
        # torch.save of a view writes its whole storage (here: a whole bucket): copy the box out.
        return tensor.clone(memory_format=torch.contiguous_format)


class PieceLoadPlanner(dcp.DefaultLoadPlanner):
    """Reads each piece's box into the piece's tensor (a view of the rank's own state)."""

    def __init__(self, pieces: list[Piece]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.pieces = pieces
        self.by_index = {MetadataIndex(p.key, torch.Size(p.offsets)): p for p in pieces}

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata
        requests: list[ReadItem] = []
        for piece in self.pieces:
            entry = stored.get(piece.key)
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointError(f"the checkpoint has no tensor {piece.key}")
            if tuple(entry.size) != tuple(piece.full_shape):
                raise CheckpointError(f"{piece.key} has shape {list(entry.size)} in the checkpoint, "
                                      f"this model has {list(piece.full_shape)}")
            chunk = ChunkStorageMetadata(offsets=torch.Size(piece.offsets), sizes=torch.Size(piece.sizes))
            requests += create_read_items_for_chunk_list(piece.key, entry, [chunk])
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.by_index[MetadataIndex(index.fqn, index.offset)].tensor

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self.lookup_tensor(read_item.dest_index)
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        if target.device.type != "cpu" or not target.is_contiguous():
            return torch.empty(target.shape, dtype=target.dtype)  # filled here, copied in commit
        return target

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        target = self.lookup_tensor(read_item.dest_index)
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        if target.data_ptr() != tensor.data_ptr():
            target.copy_(tensor)


# What DCP's .metadata may contain: its own classes, torch sizes, dtypes and layouts, a path.
_SAFE_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
}
_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or module in _SAFE_MODULES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` unpickled safely (see the module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except OSError:
            raise  # the machine, not the checkpoint
        except Exception as exc:  # noqa: BLE001 - a damaged or hostile file fails in many ways
            raise CheckpointError(f"{METADATA_FILE} fails the safe load: {type(exc).__name__}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{METADATA_FILE} does not hold checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer, whose refused writes surface as the OSError behind them."""

    def write_data(self, plan: SavePlan, planner: dcp.SavePlanner) -> Any:
        try:
            return super().write_data(plan, planner)
        except (OSError, RuntimeError) as exc:
            # torch.save, after a failed write, fails again finishing its zip archive and raises
            # that RuntimeError instead; the OSError behind it says what the machine refused.
            refused = exc
            while refused is not None and not isinstance(refused, OSError):
                refused = refused.__context__
            if refused is None:
                raise
            raise OSError(refused.errno, refused.strerror, refused.filename or str(self.path)) from None


def save_pieces(directory: Path, pieces: list[Piece], group: dist.ProcessGroup | None) -> None:
    """Every rank of `group` (None: no process group, one process) writes its pieces to `directory`."""
    writer = _Writer(str(directory), single_file_per_rank=True, sync_files=True, thread_count=1)
    with _single_process_quiet():
        dcp.save({}, storage_writer=writer, planner=PieceSavePlanner(pieces), process_group=group,
                 no_dist=group is None)


def load_pieces(directory: Path, pieces: list[Piece], group: dist.ProcessGroup | None) -> None:
    """Fill every piece's tensor from the checkpoint in `directory` (collective over `group`).
    A checkpoint that does not fit the pieces raises CheckpointError on every rank."""
    try:
        with _single_process_quiet():
            dcp.load({}, storage_reader=SafeReader(str(directory)), planner=PieceLoadPlanner(pieces),
                     process_group=group, no_dist=group is None)
    except CheckpointException as exc:  # DCP gathers every rank's failure: report the first
        first = _failures(exc)[0]
        if isinstance(first, (CheckpointError, OSError)):
            raise first from None  # a checkpoint that does not fit; the machine's refusal (exit 1)
        # A stored tensor that does not decode: torch's own message suggests weights_only=False,
        # exactly what must not be done with a file of unknown origin, so it is not repeated.
        raise UndecodableTensor(f"a stored tensor of {directory.name} does not load: {type(first).__name__}",
                                type(first).__name__) from None


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns whenever it runs without a process group, which one process does on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def stored_tensors(directory: Path) -> dict[str, TensorStorageMetadata]:
    """Every tensor in the checkpoint: key -> its full shape, dtype and stored chunks."""
    metadata = SafeReader(str(directory)).read_metadata()
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def read_tensor(directory: Path, key: str, entry: TensorStorageMetadata | None = None) -> torch.Tensor:
    """One full tensor of the checkpoint, in this process alone (no process group): memory is
    that tensor (plus one stored chunk at a time)."""
    entry = entry or stored_tensors(directory)[key]
    full = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
    try:
        load_pieces(directory, [Piece(key, tuple(entry.size), (0,) * len(entry.size), full, False)], None)
    except UndecodableTensor as exc:
        raise CheckpointError(f"{key} does not load: {exc.error_type}") from None
    return full


def is_sharded(directory: Path) -> bool:
    return (directory / METADATA_FILE).is_file()



def write_sharded_checkpoint(root: Path, step: int, pieces: list[Piece], small_files: dict[str, Any],
                             comm: Comm, group: Group, own_files: dict[str, Any] | None = None) -> Path:
    """Every rank of `group` writes its pieces (and `own_files`, files of this rank alone, named
    apart from every other rank's) into the step's temporary folder; rank 0 then adds
    `small_files`, the manifest (with every rank's files' sizes and checksums) last, and commits.

    A failure on any rank (a full disk) fails the write on every rank, as an OSError naming the
    file where there is one; the temporary folder is removed and the committed checkpoints stay
    as they were."""
    is_main = group.rank == 0
    tmp = temp_folder(root, step, is_main, comm, group)
    path = root / ckpt.step_dir_name(step)
    try:
        entries = write_pieces(tmp, pieces, comm, group, own_files)
        if is_main:
            path = ckpt.commit_sharded(root, step, merged_entries(entries), small_files)
    finally:
        if is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    comm.barrier(group)  # nobody moves on (or exits) until the checkpoint is committed
    return path


def temp_folder(root: Path, step: int, owner: bool, comm: Comm, group: Group) -> Path:
    """The step's temporary folder under `root`, made by its `owner` (after removing what an
    interrupted write left there) before any rank of `group` writes into it (collective)."""
    tmp = ckpt.sharded_temp_dir(root, step)
    if owner:
        root.mkdir(parents=True, exist_ok=True)
        ckpt.remove_leftovers(root)
        tmp.mkdir()
    comm.barrier(group)
    return tmp


def write_pieces(tmp: Path, pieces: list[Piece], comm: Comm, group: Group,
                 own_files: dict[str, Any] | None = None) -> list[dict[str, dict[str, Any]]]:
    """Every rank of `group` writes its pieces and its `own_files` into `tmp` (collective);
    returns, per rank, the entries (size, sha256) of the files it wrote. A failure on any rank
    raises on every rank."""
    ckpt.pause_for_tests()
    failure = None
    try:
        save_pieces(tmp, pieces, group.process_group if group.size > 1 else None)
        own = {f.name: ckpt.file_entry(f) for f in tmp.glob(f"__{group.rank}_*.distcp")}
        for name, content in (own_files or {}).items():
            own[name] = ckpt.write_own_file(tmp, name, content)
        ckpt.pause_for_tests()
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - every rank must reach the gather below
        failure, own = exc, {}
    gathered = comm.all_gather_object((own, _describe(failure)), group, tag=CHECKPOINT)
    problems = [why for _, why in gathered if why is not None]
    if problems:
        raise _collective_error(problems[0])
    return [files for files, _ in gathered]


def merged_entries(per_rank: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {name: entry for files in per_rank for name, entry in files.items()}


def _describe(exc: BaseException | None) -> tuple | None:
    """What went wrong on this rank, in a form every rank can rebuild the same error from."""
    if exc is None:
        return None
    found = _as_os_error(exc)
    if isinstance(found, OSError) and found.errno is not None:
        return ("os", found.errno, found.strerror, found.filename)
    return ("other", f"{type(found).__name__}: {found}")


def _collective_error(description: tuple) -> BaseException:
    """The same error on every rank: the machine's refusal (said once, see CollectiveOSError),
    or a failure of the writer itself."""
    if description[0] == "os":
        return CollectiveOSError(*description[1:])
    return RuntimeError(f"writing a checkpoint failed: {description[1]}")


def _failures(exc: BaseException) -> list[BaseException]:
    """What went wrong: each rank's exception for DCP's CheckpointException (which wraps every
    failure it gathered as (exception, stack summary)), else `exc` itself."""
    if isinstance(exc, CheckpointException):
        return [v[0] for v in exc.failures.values() if isinstance(v, tuple) and v] or [exc]
    return [exc]


def _as_os_error(exc: BaseException) -> BaseException:
    """The machine's refusal behind a failed write (_Writer raises it as an OSError), else the first failure."""
    failures = _failures(exc)
    return next((f for f in failures if isinstance(f, OSError)), failures[0])
