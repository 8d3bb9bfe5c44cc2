"""Training checkpoints: atomic, verified, exactly resumable (model, optimizer, step, data position, RNG).

Layout under `<out_dir>/checkpoints/`:
    step-00000100/          one checkpoint
        model.safetensors       trainable parameters + buffers (single process)
        optim.safetensors       optimizer tensors, keys `state.<param index>.<name>`
        state.json              step, data position, optimizer param_groups and scalars, RNG states, config
        sharded/                instead of the two .safetensors files under FSDP2: torch.distributed.checkpoint
                                planned, stored as one safetensors file per rank + metadata.json
                                (train/sharded_storage.py); optimizer scalars and param_groups go to state.json
        manifest.json           size + sha256 of every other file (written last inside the folder)
    latest                  text file naming the newest complete checkpoint (replaced last, atomically)

A checkpoint is written into a hidden temp folder, every file fsync'ed, the folder renamed into place, then
`latest` replaced with os.replace; a crash at any point leaves the previous checkpoint and pointer intact.
Loading checks the manifest first, so a truncated or corrupted file fails with a `CheckpointError` naming it.
No pickle anywhere: tensors in safetensors, metadata in JSON; nothing read from a checkpoint folder is unpickled
(DCP's default storage would unpickle its `.metadata`, so sharded state uses train/sharded_storage.py instead).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError  # one error class for model and training checkpoints

MANIFEST = "manifest.json"
LATEST = "latest"
SHARDED = "sharded"  # FSDP2 state: train/sharded_storage.py


# ----------------------------------------------------------------------------------------------- integrity
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(folder: Path):
    """Hash every file under `folder` into manifest.json and fsync everything (files, then folders)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {}
    for p in files:
        _fsync_file(p)
        entries[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    _fsync_file(tmp)
    os.replace(tmp, folder / MANIFEST)
    for d in sorted({p.parent for p in files} | {folder}, key=lambda x: -len(str(x))):
        _fsync_dir(d)


def verify_checkpoint(folder: str | Path):
    """Raise CheckpointError unless every file in `folder`'s manifest exists with the recorded size and sha256.

    Args:
        folder: one checkpoint directory (e.g. .../checkpoints/step-00000100).
    """
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {folder}: no {MANIFEST} (incomplete save or not a checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is unreadable ({e})") from e
    for rel, meta in manifest.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder}: file {rel} is missing")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint {folder}: file {rel} has {size} bytes, manifest says {meta['size']} "
                                  f"(truncated or overwritten)")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: file {rel} fails its sha256 check (corrupted)")


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint named by `<ckpt_root>/latest`, or None when there is none yet."""
    ptr = Path(ckpt_root) / LATEST
    if not ptr.is_file():
        return None
    name = ptr.read_text().strip()
    path = Path(ckpt_root) / name
    if not path.is_dir():
        raise CheckpointError(f"{ptr} names {name!r}, which does not exist")
    return path


def resume_checkpoint(ckpt_root: str | Path, log=print) -> Path | None:
    """The newest checkpoint under `ckpt_root` that passes `verify_checkpoint`, or None when there is none.

    `latest` names the first candidate, then every other step-* folder, newest first: a checkpoint corrupted after
    it was written (a flipped bit, a truncated copy, a lost file) is reported through `log` and skipped, so the run
    continues from the previous good one instead of stopping.
    """
    root = Path(ckpt_root)
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    try:
        latest = latest_checkpoint(root)
    except CheckpointError as e:
        log(f"warning: {e}; looking for an older checkpoint")
        latest = None
    if latest is not None:
        candidates = [latest] + [p for p in candidates if p != latest]
    for p in candidates:
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            log(f"warning: skipping checkpoint {p.name}: {e}")
    if candidates:
        raise CheckpointError(f"{root}: none of the {len(candidates)} checkpoint(s) passes its integrity check; "
                              f"set train.resume=none to start over")
    return None


# ----------------------------------------------------------------------------------------------- state <-> files
def _rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict):
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters + persistent buffers, by name (tied parameters appear once)."""
    out = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    persistent = {n for n, _ in model.named_buffers()} & set(model.state_dict().keys())
    out.update({n: b.detach() for n, b in model.named_buffers() if n in persistent})
    return out


def _optim_to_files(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_from_files(opt: torch.optim.Optimizer, tensors: dict, meta: dict):
    state: dict = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = meta["param_groups"]
    for g, g0 in zip(groups, opt.param_groups):
        for k, v in g.items():  # JSON turned tuples into lists
            if isinstance(g0.get(k), tuple):
                g[k] = tuple(v)
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(ckpt_root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, keep_last: int = 2, distributed: bool = False) -> Path:
    """Write one checkpoint atomically and point `latest` at it; prune to the newest `keep_last`.

    Args:
        ckpt_root: folder holding step-* checkpoints and the `latest` pointer.
        step: optimizer steps done (names the folder).
        model, optimizer: their state is saved (FSDP2 sharded through torch.distributed.checkpoint when
            `distributed`; every rank must call then).
        trainer_state: JSON-able dict (step, data position, config, ...).
        keep_last: how many checkpoints to keep (0 keeps all).
    Returns:
        the checkpoint folder.
    """
    root = Path(ckpt_root)
    rank = torch.distributed.get_rank() if distributed else 0
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    rng_tensors, rng_meta = _rng_state()
    if distributed:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from .sharded_storage import SafetensorsWriter

        dist.barrier()
        msd, osd = get_state_dict(model, optimizer)
        msd = {k: v for k, v in msd.items() if k in _trainable_or_buffer_names(model)}
        o_tensors, optim_meta = _split_sharded_optim(osd)
        dcp.save({"model": msd, "optim": o_tensors}, checkpoint_id=str(tmp / SHARDED),
                 storage_writer=SafetensorsWriter(tmp / SHARDED))
        dist.barrier()
    else:
        save_file({k: v.contiguous().cpu() for k, v in model_state(model).items()}, str(tmp / "model.safetensors"))
        o_tensors, optim_meta = _optim_to_files(optimizer)
        save_file(o_tensors, str(tmp / "optim.safetensors"))
    if rank == 0:
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"format": "qwen3vl-lab-train-v1", "step": step, "trainer": trainer_state, "optim": optim_meta,
                 "rng": rng_meta, "distributed": distributed}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        ptr_tmp = root / (LATEST + ".tmp")
        ptr_tmp.write_text(name + "\n")
        _fsync_file(ptr_tmp)
        os.replace(ptr_tmp, root / LATEST)
        _fsync_dir(root)
        if keep_last > 0:
            old = sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep_last]
            for p in old:
                if p != final:
                    shutil.rmtree(p, ignore_errors=True)
    if distributed:
        torch.distributed.barrier()
    return final


def _split_sharded_optim(osd: dict) -> tuple[dict, dict]:
    """An FSDP optimizer state dict -> ({"state": {fqn: {name: tensor}}} for DCP, JSON: param_groups and scalars)."""
    tensors, scalars = {}, {}
    for fqn, st in osd.get("state", {}).items():
        for k, v in st.items():
            (tensors if torch.is_tensor(v) else scalars).setdefault(fqn, {})[k] = v
    return {"state": tensors}, {"param_groups": osd.get("param_groups", []), "scalars": scalars}


def _join_sharded_optim(tensors: dict, meta: dict, current: dict) -> dict:
    """Inverse of `_split_sharded_optim`; `current` (the live optimizer's state dict) restores JSON's lost tuples."""
    state = {fqn: dict(st) for fqn, st in tensors["state"].items()}
    for fqn, st in meta["scalars"].items():
        state.setdefault(fqn, {}).update(st)
    groups = [dict(g) for g in meta["param_groups"]]
    for g, g0 in zip(groups, current.get("param_groups", [])):
        for k, v in g.items():
            if isinstance(g0.get(k), tuple):
                g[k] = tuple(v)
    return {"state": state, "param_groups": groups}


def _trainable_or_buffer_names(model) -> set[str]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return names | {n for n, _ in model.named_buffers()}


def load_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    distributed: bool = False, restore_rng: bool = True, verify: bool = True) -> dict:
    """Verify then restore a checkpoint written by `save_checkpoint`; returns its trainer_state dict.

    Args:
        folder: one checkpoint directory.
        model, optimizer: restored in place (optimizer may be None: weights only).
        distributed: FSDP2 model (sharded load through torch.distributed.checkpoint).
        restore_rng: also restore torch / CUDA / python / numpy RNG states.
        verify: check the manifest first (False only right after `resume_checkpoint` verified this folder).
    Raises:
        CheckpointError for missing, truncated or corrupted files, or parameters that do not match the model.
    """
    folder = Path(folder)
    if verify:
        verify_checkpoint(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: state.json is not valid JSON ({e})") from e
    if state.get("format") != "qwen3vl-lab-train-v1":
        raise CheckpointError(f"checkpoint {folder}: unknown format {state.get('format')!r}")
    if bool(state["distributed"]) != bool(distributed):
        raise CheckpointError(f"checkpoint {folder} was saved with distributed={state['distributed']}, "
                              f"loading with distributed={distributed}; use the same parallel.strategy")
    if distributed:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                           set_model_state_dict, set_state_dict)

        from .sharded_storage import SafetensorsReader

        if not (folder / SHARDED).is_dir():
            raise CheckpointError(f"checkpoint {folder}: no {SHARDED}/ folder" + (
                " (its dcp/ folder is the old layout, whose metadata is a pickle; it is not loaded: nothing read "
                "from a checkpoint is unpickled)" if (folder / "dcp").exists() else ""))
        if optimizer is not None:
            msd, osd = get_state_dict(model, optimizer)
        else:
            msd, osd = get_model_state_dict(model), {}
        msd = {k: v for k, v in msd.items() if k in _trainable_or_buffer_names(model)}
        o_tensors, _ = _split_sharded_optim(osd)
        sd = {"model": msd, "optim": o_tensors} if optimizer is not None else {"model": msd}
        # DCP plans which saved chunks each rank's shards need (any world size); the reader copies them from
        # safetensors. Raises if a requested key is not in the checkpoint.
        dcp.load(sd, checkpoint_id=str(folder / SHARDED), storage_reader=SafetensorsReader(folder / SHARDED))
        # non-strict: frozen parameters (and a tied lm_head alias) are not in the checkpoint by design
        options = StateDictOptions(strict=False)
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=sd["model"], options=options,
                           optim_state_dict=_join_sharded_optim(sd["optim"], state["optim"], osd))
        else:
            set_model_state_dict(model, sd["model"], options=options)
    else:
        tensors = load_file(str(folder / "model.safetensors"))
        expected = model_state(model)
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {folder}: parameters do not match the model; missing {missing[:8]}, "
                                  f"unexpected {unexpected[:8]} (different model config, LoRA or freezing?)")
        with torch.no_grad():
            for k, v in expected.items():
                if v.shape != tensors[k].shape:
                    raise CheckpointError(f"checkpoint {folder}: {k} has shape {tuple(tensors[k].shape)}, "
                                          f"model has {tuple(v.shape)}")
                v.copy_(tensors[k])
        if optimizer is not None:
            _optim_from_files(optimizer, load_file(str(folder / "optim.safetensors")), state["optim"])
    if restore_rng:
        _set_rng_state(load_file(str(folder / "rng.safetensors")), state["rng"])
    return state["trainer"]
