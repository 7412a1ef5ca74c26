"""Two processes (gloo, CPU) train an adapted model with DDP or FSDP2 to what one process computes on
the same global batch: LoRA, DoRA, VeRA (shared bank), AdaLoRA (masks and budget), ReLoRA (merges)
and LoRA-GA (calibration statistics reduced over the ranks). Files are written once, by rank 0;
under FSDP2 from the gathered shards (AdaLoRA's rank masks and ReLoRA's merged base shifts too)."""
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


ENGINES = {"ddp": list(SPECS), "fsdp2": list(SPECS)}


def build(name):
    model = TinyNet()
    spec = lorazoo.AdapterSpec(targets=["fc1", "fc2"], **SPECS[name])
    return model, spec


def train(name, rank=0, world=1, wrap=None):
    """STEPS steps on the global batch of 64, this rank's 64/world rows; calibration batches likewise.
    Returns the model, the handle and the loss of every step on the global batch (the mean over
    the ranks' equal shares)."""
    model, spec = build(name)
    cal = calibration_batches()
    per = len(cal) // world
    handle = lorazoo.adapt(model, spec, calibration=cal[rank * per:(rank + 1) * per])
    net = wrap(model) if wrap else model
    handle.plan(STEPS)
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    x, y = tiny_data(64)
    rows = slice(rank * 64 // world, (rank + 1) * 64 // world)
    losses = []
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        loss = net(x[rows], y[rows]).loss
        (loss + handle.aux_loss()).backward()
        handle.before_step(opt)
        opt.step()
        handle.after_step(opt, step)
        losses.append(loss.detach())
    losses = torch.stack(losses)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(losses)
        losses /= world
    return model, handle, losses.tolist()


def _worker(rank, world, init_file, out, engine):
    import json

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import lorazoo.handle

    real_write = lorazoo.handle.write_adapter

    def write_adapter(path, *a, **kw):  # who writes adapter files: rank 0 alone
        with open(os.path.join(out, f"writes-{rank}"), "a") as f:
            f.write(f"{path}\n")
        return real_write(path, *a, **kw)
    lorazoo.handle.write_adapter = write_adapter
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
            model, handle, losses = train(name, rank, world, wrap)
            # FSDP2 shards the adapter's own tensors, so the schedules and the save really see shards
            assert all(isinstance(p, DTensor) for p in handle.trainable_parameters()) == (engine == "fsdp2")
            handle.save(os.path.join(out, name))
            assert os.path.isdir(os.path.join(out, name)) or rank != 0
            if rank == 0:
                with open(os.path.join(out, f"{name}.losses.json"), "w") as f:
                    json.dump(losses, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_train_like_one(engine, tmp_path):
    import json

    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(out), engine), nprocs=2,
                       start_method="spawn", join=True)
    assert not (out / "writes-1").exists()
    assert (out / "writes-0").read_text().split() == [str(out / name) for name in ENGINES[engine]]
    x, _ = tiny_data()
    for name in ENGINES[engine]:
        ref_model, ref, ref_losses = train(name)
        losses = json.loads((out / f"{name}.losses.json").read_text())
        torch.testing.assert_close(losses, ref_losses, rtol=1e-7, atol=1e-9, msg=lambda m: f"{name} loss: {m}")
        if name == "adalora":  # the budget pruned: 4 of the 6 triplets per layer kept (b_T = 8 of 12)
            assert sum(int(ad.form.rank_mask.sum()) for ad in ref.adapters().values()) == 8
        if name == "relora":  # merged after steps 3, 6, 9 and 12, rank 4 each
            assert all(ad.shift_A.shape[0] == 16 for ad in ref.adapters().values())
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


# --- lorazoo's own Trainer and `lorazoo train --nproc N` ------------------------------------------
from tiny import TinyTask  # noqa: E402


class Tiny64Task(TinyTask):
    """TinyTask in float64, importable by name (the --nproc workers register it from the parent).
    Each process logs the files it moves into place (os.replace: atomic writes and checkpoints)
    into <LORAZOO_TEST_WRITES>-<pid>, to show that only one process writes the output folder."""

    name = "tiny64_nproc"

    def build_model(self):
        log = os.environ.get("LORAZOO_TEST_WRITES")
        if log and not getattr(os.replace, "_logged", False):
            real = os.replace

            def replace(src, dst, *a, **kw):
                with open(f"{log}-{os.getpid()}", "a") as f:
                    f.write(f"{dst}\n")
                return real(src, dst, *a, **kw)
            replace._logged = True
            os.replace = replace
        return TinyNet(dtype=torch.float64)

    def train_batches(self, batch_size, epoch=0):
        x, y = tiny_data(self.opts["n"], seed=1)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        return [{"x": x[order[i:i + batch_size]], "labels": y[order[i:i + batch_size]]}
                for i in range(0, len(x), batch_size)]

    def evaluate(self, model):
        x, y = tiny_data(64, seed=2)
        with torch.no_grad():
            out = model(x=x, labels=y)
        return {"accuracy": float((out.logits.argmax(-1) == y).double().mean()), "loss": float(out.loss)}


@pytest.fixture
def tiny64():
    from lorazoo.tasks.base import TASKS

    TASKS[Tiny64Task.name] = Tiny64Task
    yield Tiny64Task.name
    del TASKS[Tiny64Task.name]


def _adapter(folder):
    return lorazoo.load(TinyNet(), folder).state_dict()


def test_trainer_in_two_processes_equals_one(tiny64, tmp_path, monkeypatch, capsys):
    """`lorazoo train --nproc 2` (DDP, each rank half of every batch of 13: uneven shards, with
    accumulation 2) gives one process's adapter, losses and metrics; only one process writes the
    output folder; and a one-process run killed before step 7 resumes in two processes from its
    step-4 checkpoint to the same end."""
    import json

    from lorazoo.cli import main
    from lorazoo.train import Trainer

    flags = ["train", "--task", tiny64, "--rank", "4", "--lr", "0.02", "--epochs", "2", "--batch-size", "13",
             "--accumulation", "2", "--no-progress", "--checkpoint-every", "4"]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    assert one["steps"] == 8

    monkeypatch.setenv("LORAZOO_TEST_WRITES", str(tmp_path / "writes"))
    assert main([*flags, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    monkeypatch.delenv("LORAZOO_TEST_WRITES")
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["steps"] == 8
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-12)
    assert [m["loss"] for m in two["metrics_per_epoch"]] == pytest.approx(
        [m["loss"] for m in one["metrics_per_epoch"]], rel=1e-12)
    want, got = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
    listing = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert listing == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-00000008"]
    logs = sorted(tmp_path.glob("writes-*"))  # one file per process that moved a file into place
    assert len(logs) == 1, [p.read_text() for p in logs]
    written = logs[0].read_text().split()
    assert any(w.endswith("result.json") for w in written) and any("step-00000004" in w for w in written)

    # killed before step 7 in one process, resumed in two from the step-4 checkpoint
    real_step = Trainer._step

    class Killed(Exception):
        pass

    def dying(self, *a):
        if self.step == 6:
            raise Killed()
        return real_step(self, *a)
    monkeypatch.setattr(Trainer, "_step", dying)
    with pytest.raises(Killed):
        main([*flags, "--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(Trainer, "_step", real_step)
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--nproc", "2", "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert resumed["steps"] == 8 and resumed["losses"] == pytest.approx(one["losses"], rel=1e-12)
    got = _adapter(tmp_path / "resumed")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_shard_batch_splits_rows_by_rank():
    """Contiguous slices covering every row once (uneven sizes too); a rank left without rows runs
    one row with weight 0; values that are not per-example tensors are kept whole."""
    from lorazoo.launch import shard_batch

    x, y = tiny_data(13)
    batch = {"x": x, "labels": y, "scale": torch.tensor(2.0), "name": "b"}
    parts = [shard_batch(batch, 13, r, 3) for r in range(3)]
    assert [n for _, n in parts] == [4, 4, 5]
    assert torch.equal(torch.cat([p["x"] for p, _ in parts]), x)
    assert torch.equal(torch.cat([p["labels"] for p, _ in parts]), y)
    assert all(p["name"] == "b" and p["scale"].dim() == 0 for p, _ in parts)
    small = [shard_batch({"x": x[:1], "labels": y[:1]}, 1, r, 2) for r in range(2)]
    assert [n for _, n in small] == [0, 1] and small[0][0]["x"].shape[0] == 1


def test_trainer_distributed_option():
    from lorazoo.errors import LorazooError
    from lorazoo.train import Trainer

    model, spec = build("lora")
    handle = lorazoo.adapt(model, spec)
    assert Trainer(model, handle, lr=1e-2, distributed=False, progress=False).net is model
    assert Trainer(model, handle, lr=1e-2, progress=False).world == 1  # no process group: one process
    with pytest.raises(LorazooError, match="distributed must be"):
        Trainer(model, handle, lr=1e-2, distributed=True)
