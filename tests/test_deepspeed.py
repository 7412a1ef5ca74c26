"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (DS_ACCELERATOR=cpu, reductions through gloo; its optional
shared-memory allreduce, compiled with g++ at first use, is left out): two processes train LoRA, DoRA
and VeRA adapters through ``deepspeed.initialize`` to what one process computes with plain AdamW on
the same global batch. Under ZeRO-3 every
parameter, the adapter's included, is partitioned (persistence threshold 0); the adapter is saved
inside ``GatheredParameters`` on every rank, and rank 0 writes it. Slow: needs ``pip install
deepspeed`` (not a lorazoo dependency)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import lorazoo
from tiny import TinyNet, tiny_data

SPECS = {"lora": dict(rank=4), "dora": dict(form="dora", rank=4),
         "vera": dict(form="vera", rank=8, scale="constant", alpha=1)}
STEPS = 5


def build(name):
    model = TinyNet(dtype=torch.float32)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(targets=["fc1", "fc2"], **SPECS[name]))
    return model, handle


def _worker(rank, world, port, stage, out):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed
    import deepspeed.comm.torch as ds_comm
    from deepspeed.runtime.zero import GatheredParameters

    # DeepSpeed's CPU shared-memory allreduce is a speed-up compiled with g++ at first use (about 2 minutes,
    # again whenever the install path changes); without it the reductions go through gloo, the same sums
    ds_comm.build_shm_op = lambda: None

    x, y = tiny_data(64, dtype=torch.float32)
    rows = slice(rank * 64 // world, (rank + 1) * 64 // world)
    for name in SPECS:
        model, handle = build(name)
        config = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 64 // world,
                  "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(handle.param_groups(1e-2)),
                                          config=config)
        if stage == 3:  # really partitioned: outside a forward this rank holds no full tensor
            assert all(p.data.numel() == 0 for p in model.parameters())
        for _ in range(STEPS):
            engine.backward(engine(x[rows], y[rows]).loss)
            engine.step()
        with GatheredParameters(list(model.parameters())) if stage == 3 else torch.no_grad():
            handle.save(os.path.join(out, name))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_train_like_one(stage, tmp_path):
    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, stage, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    x, y = tiny_data(64, dtype=torch.float32)
    for name in SPECS:
        model, handle = build(name)
        opt = torch.optim.AdamW(handle.param_groups(1e-2))
        for _ in range(STEPS):
            opt.zero_grad()
            model(x, y).loss.backward()
            opt.step()
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["adapter.safetensors", "adapter_config.json"]
        got, want = lorazoo.load(TinyNet(dtype=torch.float32), tmp_path / name).state_dict(), handle.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")
