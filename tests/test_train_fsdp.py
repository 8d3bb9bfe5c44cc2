"""FSDP2 on CPU (gloo, 2 processes via torch.multiprocessing spawn) matches the single-process run: same global
batch (2 ranks x 1 micro-batch vs 1 process x 2 accumulated micro-batches), sharded DCP checkpoint and resume."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.config import config_from_dict, config_to_dict
from train.trainer import train

from .test_train_common import ocr_set, one_thread, small_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfgs: list, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    losses = []
    for c in cfgs:
        res = train(config_from_dict(c))
        losses += [h["loss"] for h in res["history"]]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(losses, f)
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fsdp2_two_processes_match_single_process(tmp_path):
    data = ocr_set(tmp_path / "ocr", n_train=32)
    common = {"steps": 4, "export": False, "save_every": 2}
    with one_thread():
        single = train(small_config(data, tmp_path / "single", train={**common, "grad_accum": 2}))
    ref = [h["loss"] for h in single["history"]]

    fsdp = {"parallel": {"strategy": "fsdp"}}
    first = small_config(data, tmp_path / "fsdp", train={**common, "grad_accum": 1, "stop_after_steps": 2}, **fsdp)
    # resumes at 2, with activation checkpointing (composable hooks under fully_shard): the same losses
    second = small_config(data, tmp_path / "fsdp", train={**common, "grad_accum": 1, "activation_checkpointing": True},
                          **fsdp)
    out = str(tmp_path / "losses.json")
    mp.start_processes(_worker, args=(2, _free_port(), [config_to_dict(first), config_to_dict(second)], out),
                       nprocs=2, join=True, start_method="spawn")
    got = json.load(open(out))
    assert len(got) == 4
    # fp32; the sharded run reduces gradients across ranks in another order: 1e-4 relative on the loss
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5), (got, ref)
    assert got[-1] < got[0] - 0.5
    assert (tmp_path / "fsdp" / "checkpoints" / "step-00000004" / "dcp").is_dir()
