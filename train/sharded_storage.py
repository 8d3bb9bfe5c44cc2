"""Sharded (FSDP2) checkpoint storage for torch.distributed.checkpoint that holds only safetensors and JSON.

DCP's default `FileSystemWriter` / `FileSystemReader` pickle the global metadata (`.metadata`) and any non-tensor
value, and the reader unpickles them: loading such a folder runs whatever code its author put there, and a sha256
manifest does not help, since whoever ships the folder ships its manifest. This storage layer plugs into DCP's
`StorageWriter` / `StorageReader` interface (torch/distributed/checkpoint/storage.py) so DCP still plans the save
and the load, which is what makes resharding to another world size work, but its files are:

    <dir>/shard-00000.safetensors   the tensor chunks rank 0 wrote (one entry per chunk)
    <dir>/shard-00001.safetensors   ... one file per rank that wrote something
    <dir>/metadata.json             every tensor: dtype, global size, and its chunks (offsets, sizes, file, key)

Only tensors are stored; a non-tensor value is refused when saving (callers keep those in JSON), and a load plan
that asks for one is refused. Reading validates the JSON (dtypes from a fixed list, integer shapes, chunks inside
their tensor, file names of the fixed form, so never a path) and each tensor's shape in its safetensors header
before copying it. torch's own `HuggingFaceStorageReader` (torch/distributed/checkpoint/hf_storage.py) reads
safetensors the same way; this one keeps the chunk table in one JSON file and needs no torch-version-specific
helpers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from model.checkpoint import CheckpointError

METADATA = "metadata.json"
FORMAT = "qwen3vl-lab-sharded-v1"
_SHARD_RE = re.compile(r"shard-\d{5}\.safetensors")
_DTYPES = {name: getattr(torch, name) for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32",
                                                    "int16", "int8", "uint8", "bool")}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


def _key(index: MetadataIndex) -> str:
    """Name of one chunk inside its safetensors file: fqn@offsets (a rank may hold several chunks of a tensor)."""
    return f"{index.fqn}@{','.join(str(int(o)) for o in index.offset or ())}"


class SafetensorsWriter(StorageWriter):
    """DCP storage writer: one safetensors file per rank and a JSON chunk table (see the module docstring).

    Args:
        path: the checkpoint's sharded-state folder (created).
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=f"shard-{i:05d}.safetensors") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        tensors, results = {}, []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise CheckpointError(f"sharded checkpoint: {item.index.fqn} is not a tensor; only tensors are "
                                      f"stored here (keep other values in JSON)")
            t = planner.resolve_data(item).detach()
            # a copy: FSDP's local shards can be views into shared flat buffers, which safetensors refuses
            t = t.to("cpu", copy=True).contiguous()
            key = _key(item.index)
            tensors[key] = t
            results.append(WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(),
                                       storage_data={"file": plan.storage_data, "key": key}))
        if tensors:
            save_file(tensors, str(self.path / plan.storage_data))
        return _done(results)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        where = {(r.index.fqn, tuple(int(o) for o in r.index.offset)): r.storage_data for rs in results for r in rs}
        table = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"sharded checkpoint: {fqn} is not a tensor")
            chunks = []
            for c in md.chunks:
                offsets = [int(o) for o in c.offsets]
                chunks.append({"offsets": offsets, "sizes": [int(s) for s in c.sizes],
                               **where[(fqn, tuple(offsets))]})
            table[fqn] = {"dtype": _DTYPE_NAMES[md.properties.dtype], "size": [int(s) for s in md.size],
                          "chunks": chunks}
        tmp = self.path / (METADATA + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "tensors": table}, indent=1))
        os.replace(tmp, self.path / METADATA)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def storage_meta(self):
        return None


def _ints(value, what: str, n: int | None = None) -> list[int]:
    if (not isinstance(value, list) or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value)
            or (n is not None and len(value) != n)):
        raise CheckpointError(f"{what}: expected a list of {n if n is not None else ''} non-negative integers, "
                              f"got {value!r}"[:300])
    return value


def read_table(path: str | os.PathLike) -> dict:
    """Parse and validate `<path>/metadata.json`; returns {fqn: {"dtype", "size", "chunks"}} (CheckpointError)."""
    mpath = Path(path) / METADATA
    where = str(mpath)
    try:
        doc = json.loads(mpath.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{where} is missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tensors"), dict):
        raise CheckpointError(f"{where}: not a {FORMAT} chunk table")
    for fqn, t in doc["tensors"].items():
        what = f"{where}: {fqn}"
        if not isinstance(t, dict) or t.get("dtype") not in _DTYPES or not isinstance(t.get("chunks"), list):
            raise CheckpointError(f"{what}: needs a dtype in {sorted(_DTYPES)} and a chunk list")
        size = _ints(t.get("size"), f"{what}.size")
        for c in t["chunks"]:
            if not isinstance(c, dict):
                raise CheckpointError(f"{what}: chunk {c!r} is not an object")
            offsets = _ints(c.get("offsets"), f"{what}.offsets", len(size))
            sizes = _ints(c.get("sizes"), f"{what}.sizes", len(size))
            if any(o + s > n for o, s, n in zip(offsets, sizes, size)):
                raise CheckpointError(f"{what}: chunk at {offsets} of size {sizes} lies outside the tensor {size}")
            if not isinstance(c.get("file"), str) or not _SHARD_RE.fullmatch(c["file"]) \
                    or not isinstance(c.get("key"), str):
                # a file name of the fixed form, never a path: nothing outside this folder is opened
                raise CheckpointError(f"{what}: chunk file {c.get('file')!r} is not a shard-NNNNN.safetensors name")
    return doc["tensors"]


class SafetensorsReader(StorageReader):
    """DCP storage reader for `SafetensorsWriter`'s folders: JSON metadata, safetensors data, nothing unpickled.

    Args:
        path: the checkpoint's sharded-state folder.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self.storage: dict = {}

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        state, storage = {}, {}
        for fqn, t in read_table(self.path).items():
            chunks = []
            for c in t["chunks"]:
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"])))
                storage[MetadataIndex(fqn=fqn, offset=torch.Size(c["offsets"]))] = {
                    "file": c["file"], "key": c["key"], "sizes": c["sizes"], "dtype": t["dtype"]}
            state[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=_DTYPES[t["dtype"]]),
                                               size=torch.Size(t["size"]), chunks=chunks)
        return Metadata(state_dict_metadata=state, storage_data=storage)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        per_file = defaultdict(list)
        for req in plan.items:
            if req.type == LoadItemType.BYTE_IO:
                raise CheckpointError(f"{self.path}: {req.storage_index.fqn} is not stored as a tensor; refusing "
                                      f"to deserialise anything else")
            per_file[self.storage[req.storage_index]["file"]].append(req)
        for fname, reqs in per_file.items():
            fpath = self.path / fname
            try:
                f = safe_open(str(fpath), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError is not a public class in every version
                raise CheckpointError(f"{fpath}: not a readable safetensors file ({type(e).__name__}: {e})") from e
            with f:
                for req in reqs:
                    info = self.storage[req.storage_index]
                    try:
                        sl = f.get_slice(info["key"])
                    except Exception as e:
                        raise CheckpointError(f"{fpath}: has no tensor {info['key']!r}") from e
                    if list(sl.get_shape()) != info["sizes"]:
                        raise CheckpointError(f"{fpath}: {info['key']} has shape {sl.get_shape()}, metadata.json "
                                              f"says {info['sizes']}")
                    if req.lengths:
                        t = sl[tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths))]
                    else:  # 0-d tensor (e.g. the optimizer's step)
                        t = f.get_tensor(info["key"])
                    target = planner.resolve_tensor(req).detach()
                    if target.shape != t.shape:
                        raise CheckpointError(f"{fpath}: {info['key']} gives {tuple(t.shape)} for a "
                                              f"{tuple(target.shape)} slot")
                    target.copy_(t)
                    planner.commit_tensor(req, target)
        return _done(None)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))
