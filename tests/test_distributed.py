"""Two processes (gloo, CPU) train an adapted model with DDP or FSDP2 to what one process computes on
the same global batch: LoRA, DoRA, VeRA (shared bank), AdaLoRA (masks and budget), ReLoRA (merges)
and LoRA-GA (calibration statistics reduced over the ranks). Files are written once, by rank 0."""
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

import lorazoo
from tiny import TinyNet, calibration_batches, tiny_data

STEPS = 12
SPECS = {
    "lora": dict(rank=4),
    "dora": dict(form="dora", rank=4),
    "vera": dict(form="vera", rank=8, scale="constant", alpha=1),
    "adalora": dict(form="adalora", schedule="adalora", scale="adalora", rank=6),
    "relora": dict(schedule="relora", rank=4),
    "lora_ga": dict(init="lora_ga", scale="rslora", rank=2),
}


ENGINES = {"ddp": list(SPECS), "fsdp2": ["lora", "dora", "vera", "lora_ga"]}


def build(name):
    model = TinyNet()
    spec = lorazoo.AdapterSpec(targets=["fc1", "fc2"], **SPECS[name])
    return model, spec


def train(name, rank=0, world=1, wrap=None):
    """STEPS steps on the global batch of 64, this rank's 64/world rows; calibration batches likewise."""
    model, spec = build(name)
    cal = calibration_batches()
    per = len(cal) // world
    handle = lorazoo.adapt(model, spec, calibration=cal[rank * per:(rank + 1) * per])
    net = wrap(model) if wrap else model
    handle.plan(STEPS)
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    x, y = tiny_data(64)
    rows = slice(rank * 64 // world, (rank + 1) * 64 // world)
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        (net(x[rows], y[rows]).loss + handle.aux_loss()).backward()
        handle.before_step(opt)
        opt.step()
        handle.after_step(opt, step)
    return model, handle


def _worker(rank, world, init_file, out, engine):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in ENGINES[engine]:
            if engine == "ddp":
                from torch.nn.parallel import DistributedDataParallel as DDP

                wrap = DDP
            else:
                from torch.distributed.fsdp import fully_shard

                def wrap(model):
                    for m in (model.fc1, model.fc2):
                        fully_shard(m)
                    return fully_shard(model)
            model, handle = train(name, rank, world, wrap)
            handle.save(os.path.join(out, name))
            assert os.path.isdir(os.path.join(out, name)) or rank != 0
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_train_like_one(engine, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out), engine), nprocs=2,
                       start_method="spawn", join=True)
    x, _ = tiny_data()
    for name in ENGINES[engine]:
        ref_model, ref = train(name)
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
        fresh = TinyNet()
        loaded = lorazoo.load(fresh, folder)
        got, want = loaded.state_dict(), ref.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-7, atol=1e-9, msg=lambda m: f"{name} {k}: {m}")
        with torch.no_grad():
            torch.testing.assert_close(fresh(x).logits, ref_model(x).logits, rtol=1e-7, atol=1e-9)


def test_calibration_statistics_are_summed_over_ranks(monkeypatch):
    """reduce_across_ranks on a fake 2-rank group doubles every sum and the batch count."""
    import torch.distributed as dist

    from lorazoo.inits.calibration import LayerStats, reduce_across_ranks

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(2))
    s = LayerStats(grad=torch.ones(2, 3), cov=torch.eye(3), rows=5)
    assert reduce_across_ranks({"fc1": s}, 3) == 6
    assert s.rows == 10 and torch.equal(s.grad, 2 * torch.ones(2, 3)) and torch.equal(s.cov, 2 * torch.eye(3))
