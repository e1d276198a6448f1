"""A ``torch.distributed.checkpoint`` (DCP) folder: written by DCP, read back without unpickling
arbitrary objects, and checked before any tensor is read.

DCP writes one data file per rank (``__<rank>_0.distcp``: tensors saved by ``torch.save``, read
back by weights-only ``torch.load``) and then, on rank 0 once every rank's data is on disk, a
``.metadata`` file (through a temporary file and a rename): a folder without ``.metadata`` is a
save that did not finish. DCP itself reads ``.metadata`` with plain ``pickle.load``, so a crafted
file would run code when loaded. Here:

- ``SafeFileSystemReader`` reads it with an unpickler whose ``find_class`` admits exactly the
  classes DCP's metadata is made of (``METADATA_GLOBALS``, plus torch's dtypes), and refuses
  anything else naming the file and the global;
- ``check_folder`` verifies, before any data is read, that every data file the metadata names
  exists and is as long as the metadata says, so that a missing or truncated shard is an error
  naming that file, not a deserialisation traceback half-way through a load;
- ``load_into`` checks that every requested key is in the checkpoint with the requested shape and
  dtype, then lets DCP fill the given tensors in place (each process reads only the entries it
  asks for).

What this adds to DCP: the restricted metadata unpickler and the checks; saving and loading are
DCP's. Plain torch; no fairseq.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata

from ..checkpoint_fields import CheckpointError

METADATA_FILE = ".metadata"


class ShardedCheckpointError(CheckpointError):
    """A sharded checkpoint that cannot be read or written, with the file and the reason."""


def _metadata_globals() -> dict[tuple[str, str], object]:
    classes = [
        dcp_metadata.Metadata,
        dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta,
        dcp_metadata.TensorProperties,
        dcp_metadata.TensorStorageMetadata,
        dcp_metadata.ChunkStorageMetadata,
        dcp_metadata.BytesStorageMetadata,
        dcp_metadata._MEM_FORMAT_ENCODING,
        dcp_filesystem._StorageInfo,
        torch.Size,
        torch.serialization._get_layout,  # maps a layout's name to the torch.layout
        Path,
        type(Path()),  # PosixPath: DCP records the folder it was written to
    ]
    return {(c.__module__, c.__qualname__): c for c in classes}


METADATA_GLOBALS = _metadata_globals()


class _RefusedGlobal(pickle.UnpicklingError):
    """The metadata names a global outside ``METADATA_GLOBALS``."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        found = METADATA_GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _RefusedGlobal(
            f"{self._path}: the checkpoint metadata names {module}.{name}, which is not one of "
            "the classes DCP metadata is made of; refused (it could run code when loaded)"
        )


def read_metadata(folder: Path) -> dcp_metadata.Metadata:
    """The DCP metadata of ``folder``, unpickled with ``METADATA_GLOBALS`` only."""
    path = Path(folder) / METADATA_FILE
    if not Path(folder).is_dir():
        raise ShardedCheckpointError(f"shard folder {folder} does not exist")
    if not path.is_file():
        raise ShardedCheckpointError(
            f"shard folder {folder} has no {METADATA_FILE}: the save that wrote it did not "
            "finish (a process stopped during the save?)"
        )
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read()), path).load()
    except _RefusedGlobal as err:
        raise ShardedCheckpointError(str(err)) from err
    except Exception as err:  # a truncated or foreign file
        raise ShardedCheckpointError(
            f"{path} is not DCP checkpoint metadata: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(metadata, dcp_metadata.Metadata) or metadata.storage_data is None:
        raise ShardedCheckpointError(f"{path} is not DCP checkpoint metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader, reading ``.metadata`` with ``read_metadata``."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_folder(folder: Path) -> dcp_metadata.Metadata:
    """``folder``'s metadata, after checking that every data file it names exists and holds at
    least the bytes the metadata places in it."""
    folder = Path(folder)
    metadata = read_metadata(folder)
    needed: dict[str, int] = defaultdict(int)
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed[info.relative_path], info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            raise ShardedCheckpointError(
                f"shard file {path} is missing: the checkpoint's metadata places "
                f"{size} bytes of tensors in it"
            )
        have = path.stat().st_size
        if have < size:
            raise ShardedCheckpointError(
                f"shard file {path} is truncated: it has {have} bytes, the checkpoint's "
                f"metadata places {size} in it"
            )
    return metadata


def tensor_spec(metadata: dcp_metadata.Metadata, key: str) -> tuple[torch.Size, torch.dtype]:
    """(size, dtype) of the tensor saved as ``key``."""
    entry = metadata.state_dict_metadata.get(key)
    if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
        raise KeyError(key)
    return entry.size, entry.properties.dtype


def load_into(folder: Path, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    """Fill ``tensors`` (DCP key -> a tensor or view of the saved size and dtype) from
    ``folder``, reading only those entries; no collective (every process reads on its own)."""
    folder = Path(folder)
    metadata = check_folder(folder) if metadata is None else metadata
    for key, tensor in tensors.items():
        try:
            size, dtype = tensor_spec(metadata, key)
        except KeyError:
            raise ShardedCheckpointError(f"shard folder {folder} holds no tensor {key!r}") from None
        if tuple(size) != tuple(tensor.shape) or dtype != tensor.dtype:
            raise ShardedCheckpointError(
                f"shard folder {folder}: {key!r} is {tuple(size)} {dtype} there, "
                f"{tuple(tensor.shape)} {tensor.dtype} here"
            )
    if not tensors:
        return
    try:
        with warnings.catch_warnings():  # no_dist is meant: every process reads on its own
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a")
            dcp.load(tensors, storage_reader=SafeFileSystemReader(folder), no_dist=True)
    except ShardedCheckpointError:
        raise
    except Exception as err:
        raise ShardedCheckpointError(
            f"cannot read the tensors of shard folder {folder}: {type(err).__name__}: {err}"
        ) from err


def save_folder(folder: Path, tensors: dict[str, torch.Tensor], process_group=None) -> None:
    """Write ``tensors`` into ``folder`` with DCP: a collective over ``process_group`` (default:
    the world) when torch.distributed is initialised, each rank writing its own entries and a
    tensor that several ranks hold under one key once; one process otherwise. The data files
    are fsync'ed, and rank 0 writes ``.metadata`` last."""
    distributed = dist.is_available() and dist.is_initialized()
    writer = FileSystemWriter(os.fspath(folder), single_file_per_rank=True, sync_files=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single")
        dcp.save(tensors, storage_writer=writer, process_group=process_group,
                 no_dist=not distributed)  # fmt: skip
