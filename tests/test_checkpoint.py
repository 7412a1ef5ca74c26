"""Training checkpoints: exact resume after a kill (LoRA, AdaLoRA, ReLoRA), atomic writes, no pickle,
refusals; non-finite losses and gradients stop training naming the layer and keep the last good
checkpoint; `lorazoo train --checkpoint-every / --resume`."""
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lorazoo
from lorazoo import checkpoint as ckpt
from lorazoo.errors import LoadError, LorazooError
from lorazoo.train import NonFiniteError, Trainer
from tiny import TinyNet, TinyTask, tiny_data

F32 = torch.float32
KINDS = {
    # dropout and rank dropout draw from the global RNG every step: the resume must restore it
    "lora": dict(rank=4, dropout=0.1, rank_dropout=0.2),
    "adalora": dict(variant="adalora", rank=4, adalora_interval=2, adalora_warmup_steps=2,
                    adalora_final_steps=3, adalora_target_rank=2),
    "relora": dict(variant="relora", rank=4, relora_interval=4, relora_restart_warmup=2),
    "pissa": dict(variant="pissa", rank=4),  # a base shift from the init, re-made by the new adapt
}


class Killed(Exception):
    pass


def make(kind):
    model = TinyNet(dtype=F32)
    kw = dict(KINDS[kind])
    variant = kw.pop("variant", "lora")
    spec = lorazoo.AdapterSpec.preset(variant, targets=["fc1", "fc2"], **kw)
    return model, lorazoo.adapt(model, spec)


def epoch_batches(epoch, n=64, size=16):  # reshuffled every epoch, a function of the epoch only
    x, y = tiny_data(n, seed=1, dtype=F32)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch))
    x, y = x[order], y[order]
    return [{"x": x[i:i + size], "labels": y[i:i + size]} for i in range(0, n, size)]


def trainer(model, handle, folder=None, every=None, **kw):
    opts = dict(lr=2e-2, epochs=3, warmup=2, progress=False, checkpoint_dir=folder, checkpoint_every=every,
                evaluate=lambda m: {"loss": float(m(**epoch_batches(0)[0]).loss)})
    opts.update(kw)
    return Trainer(model, handle, **opts)


def kill_at(handle, step):
    """Make the run die inside optimizer step ``step`` (after its update, before any checkpoint)."""
    orig = handle.after_step

    def after(opt, s):
        orig(opt, s)
        if s == step:
            raise Killed(s)
    handle.after_step = after


def merges_survive_a_kill(tmp_path, make, kill, every):
    """``make()`` (-> model, handle) trained 3 epochs (12 steps) uninterrupted, and again killed at
    step ``kill`` with checkpoints every ``every`` and resumed in a "new process": the resumed run
    takes 12 steps and ends with the uninterrupted weights and adapter (the merge-into-base
    schedules). Returns (uninterrupted handle, resumed model, resumed handle)."""
    opts = dict(lr=2e-2, epochs=3, warmup=2, progress=False)
    torch.manual_seed(0)
    model, handle = make()
    Trainer(model, handle, **opts).fit(epoch_batches)
    ref = snapshot(model, handle)
    torch.manual_seed(0)
    model1, handle1 = make()
    run = Trainer(model1, handle1, checkpoint_dir=tmp_path, checkpoint_every=every, **opts)
    kill_at(handle1, kill)
    with pytest.raises(Killed):
        run.fit(epoch_batches)
    torch.manual_seed(1234)
    model2, handle2 = make()
    out = Trainer(model2, handle2, checkpoint_dir=tmp_path, checkpoint_every=every, **opts).fit(
        epoch_batches, resume=True)
    assert out["steps"] == 12
    assert max_diff(snapshot(model2, handle2), ref) <= 1e-5
    return handle, model2, handle2


def allocation_survives_a_kill(tmp_path, make, kill=7, every=4):
    """Train ``make()`` (-> model, handle) 12 steps uninterrupted; again, killed at step ``kill``
    with checkpoints every ``every``; resume in a "new process". The resumed adapter equals the
    uninterrupted one, its rank masks exactly, and its schedule reports the same allocation.
    Returns (uninterrupted handle, resumed handle, the uninterrupted state)."""
    torch.manual_seed(0)
    model, handle = make()
    trainer(model, handle).fit(epoch_batches)  # 12 steps
    ref = {k: v.detach().clone() for k, v in handle.state_dict().items()}
    torch.manual_seed(0)
    model1, handle1 = make()
    run = trainer(model1, handle1, tmp_path, every)
    kill_at(handle1, kill)
    with pytest.raises(Killed):
        run.fit(epoch_batches)
    torch.manual_seed(1234)  # a new process: other RNG state, fresh model and adapter
    model2, handle2 = make()
    trainer(model2, handle2, tmp_path, every).fit(epoch_batches, resume=True)
    out = handle2.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v, rtol=1e-5, atol=1e-6)
        if k.endswith("_mask"):
            assert torch.equal(out[k], v), k  # the allocation came back exactly
    assert handle2.schedule.summary(handle2) == handle.schedule.summary(handle)
    return handle, handle2, ref


def snapshot(model, handle):
    return {**{k: v.detach().clone() for k, v in handle.state_dict().items() if not k.endswith(("shift_A", "shift_B"))},
            **{f"base.{n}": w.detach().clone() for n, w in
               ((p, layer.linear_weight()) for p, layer in handle.layers().items())}}


_REFERENCE: dict = {}


def uninterrupted(kind, **kw):
    """The adapter (and base weights) after an uninterrupted run, and fit's output (cached)."""
    key = (kind, tuple(sorted(kw.items())))
    if key not in _REFERENCE:
        torch.manual_seed(0)
        model, handle = make(kind)
        out = trainer(model, handle, **kw).fit(epoch_batches)
        _REFERENCE[key] = snapshot(model, handle), json.loads(json.dumps(out))
    snap, out = _REFERENCE[key]
    return {k: v.clone() for k, v in snap.items()}, out


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0) for k in a)


# --- exact resume ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, every, kill", [(k, *ek) for k in ("lora", "adalora", "relora")
                                                for ek in ((3, 8), (4, 9))] + [("pissa", 4, 9)])  # mid-epoch checkpoint; epoch-boundary one
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, kind, every, kill):
    ref, ref_out = uninterrupted(kind)
    assert ref_out["steps"] == 12

    torch.manual_seed(0)
    model, handle = make(kind)
    tr = trainer(model, handle, tmp_path, every)
    kill_at(handle, kill)
    with pytest.raises(Killed):
        tr.fit(epoch_batches)
    last = ckpt.latest_checkpoint(tmp_path)
    assert last.name == f"step-{(kill // every) * every:08d}"

    torch.manual_seed(1234)  # a new process: other RNG states, a fresh model and adapter
    random.seed(99)
    model2, handle2 = make(kind)
    tr2 = trainer(model2, handle2, tmp_path, every)
    out = tr2.fit(epoch_batches, resume=True)
    assert tr2.resumed_from == last and out["steps"] == 12
    diff = max_diff(snapshot(model2, handle2), ref)
    print(f"{kind}: resumed vs uninterrupted, max abs diff {diff:.3g}")
    assert diff <= 1e-5
    for k, v in ref.items():
        torch.testing.assert_close(snapshot(model2, handle2)[k], v, rtol=1e-5, atol=1e-6)
    assert out["losses"] == pytest.approx(ref_out["losses"], rel=1e-5)
    assert out["lrs"] == pytest.approx(ref_out["lrs"], rel=1e-12)
    assert [m["epoch"] for m in out["metrics_per_epoch"]] == [1, 2, 3]
    assert [m["loss"] for m in out["metrics_per_epoch"]] == pytest.approx(
        [m["loss"] for m in ref_out["metrics_per_epoch"]], rel=1e-5)
    if kind == "adalora":  # the masking pattern came back too
        masks = [ad.form.rank_mask for ad in handle2.adapters().values()]
        assert sum(int(m.sum()) for m in masks) < sum(m.numel() for m in masks)


def test_resume_with_accumulation_and_a_partial_epoch(tmp_path):
    kw = dict(epochs=2.5, accumulation=3)  # 4 batches an epoch: steps of 3+1 batches, then 2 (half epoch)
    ref, ref_out = uninterrupted("lora", **kw)
    assert ref_out["steps"] == 5
    for kill in (2, 3, 4, 5):
        torch.manual_seed(0)
        model, handle = make("lora")
        tr = trainer(model, handle, tmp_path / str(kill), 1, **kw)
        kill_at(handle, kill)
        with pytest.raises(Killed):
            tr.fit(epoch_batches)
        model2, handle2 = make("lora")
        out = trainer(model2, handle2, tmp_path / str(kill), 1, **kw).fit(epoch_batches, resume=True)
        assert out["losses"] == pytest.approx(ref_out["losses"], rel=1e-6)
        assert max_diff(snapshot(model2, handle2), ref) <= 1e-6


def test_a_base_shift_that_is_not_a_prefix_is_redone(tmp_path):
    torch.manual_seed(0)
    model, handle = make("pissa")
    tr = trainer(model, handle, tmp_path, 4)
    kill_at(handle, 5)
    with pytest.raises(Killed):
        tr.fit(epoch_batches)
    model2, handle2 = make("pissa")
    pristine = {p: layer.linear_weight() - ad.shift_B @ ad.shift_A
                for (p, layer), ad in zip(handle2.layers().items(), handle2.adapters().values())}
    for layer, ad in zip(handle2.layers().values(), handle2.adapters().values()):
        # a shift the checkpoint's does not start with (it adds zero to the weight)
        ad.shift_base(layer.linear_weight(), torch.zeros_like(ad.shift_B[:, :1]), torch.full_like(ad.shift_A[:1], 0.5))
    ckpt.restore_adapter(handle2, ckpt.latest_checkpoint(tmp_path))
    for (p, layer), ad in zip(handle2.layers().items(), handle2.adapters().values()):
        assert ad.shift_A.shape[0] == 4
        torch.testing.assert_close(layer.linear_weight() - ad.shift_B @ ad.shift_A, pristine[p])


def test_state_is_restored_on_the_same_objects_the_caller_holds(tmp_path):
    torch.manual_seed(0)
    model, handle = make("relora")
    tr = trainer(model, handle, tmp_path, 5, epochs=2)
    kill_at(handle, 6)
    with pytest.raises(Killed):
        tr.fit(epoch_batches)
    model2, handle2 = make("relora")
    params = handle2.trainable_parameters()
    tr2 = trainer(model2, handle2, tmp_path, 5, epochs=2)
    tr2.fit(epoch_batches, resume=True)
    assert [id(p) for p in handle2.trainable_parameters()] == [id(p) for p in params]
    assert all(id(p) in {id(q) for g in tr2.optimizer.param_groups for q in g["params"]} for p in params)
    # ReLoRA merged at steps 4 and 8: the base shift holds both merges (rank 4 each)
    assert all(ad.shift_A.shape[0] == 8 for ad in handle2.adapters().values())


def test_real_sigkill_and_resume_in_new_processes(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, torch, lorazoo
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import make, trainer, epoch_batches
        torch.manual_seed(0)
        model, handle = make("lora")
        tr = trainer(model, handle, sys.argv[1], 2)
        if sys.argv[2] == "kill":
            orig = handle.after_step
            def after(opt, s):
                orig(opt, s)
                if s == 7:
                    os.kill(os.getpid(), signal.SIGKILL)
            handle.after_step = after
        tr.fit(epoch_batches)
    """)
    f = tmp_path / "job.py"
    f.write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    d = tmp_path / "ck"
    killed = subprocess.run([sys.executable, str(f), str(d), "kill"], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert ckpt.latest_checkpoint(d).name == "step-00000006"
    torch.manual_seed(77)
    model, handle = make("lora")
    trainer(model, handle, d, 2).fit(epoch_batches, resume=True)
    ref, _ = uninterrupted("lora")
    assert max_diff(snapshot(model, handle), ref) <= 1e-5


def test_resume_without_a_checkpoint_starts_from_the_beginning(tmp_path):
    ref, _ = uninterrupted("lora")
    torch.manual_seed(0)
    model, handle = make("lora")
    out = trainer(model, handle, tmp_path, 5).fit(epoch_batches, resume=True)
    assert out["steps"] == 12 and max_diff(snapshot(model, handle), ref) == 0


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    torch.manual_seed(0)
    model, handle = make("lora")
    out = trainer(model, handle, tmp_path, 5).fit(epoch_batches)
    assert [p.name for p in ckpt.checkpoint_folders(tmp_path)] == ["step-00000012"]  # the end is kept
    before = snapshot(model, handle)
    model2, handle2 = make("lora")
    out2 = trainer(model2, handle2, tmp_path, 5).fit(epoch_batches, resume=True)
    assert out2["losses"] == out["losses"] and max_diff(snapshot(model2, handle2), before) == 0


# --- the files -----------------------------------------------------------------------------------
def test_checkpoint_files_are_safetensors_and_json_and_the_adapter_loads(tmp_path):
    torch.manual_seed(0)
    model, handle = make("adalora")
    tr = trainer(model, handle, tmp_path, 4, keep_checkpoints=2)
    kill_at(handle, 9)
    with pytest.raises(Killed):
        tr.fit(epoch_batches)
    folders = ckpt.checkpoint_folders(tmp_path)
    assert [p.name for p in folders] == ["step-00000004", "step-00000008"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    for folder in folders:
        assert {p.suffix for p in folder.iterdir()} == {".safetensors", ".json"}
    tensors, state = ckpt.read_checkpoint(folders[-1])
    assert state["step"] == 8 and state["position"] == [2, 0]
    assert {"rng.torch", "schedule.ema_i.0", "optimizer.0.exp_avg"} <= set(tensors)
    assert tensors["rng.torch"].dtype == torch.uint8
    assert state["schedule"]["ema_keys"] and state["rng"]["python"] and state["optimizer"]["param_groups"]
    model2 = TinyNet(dtype=F32)
    lorazoo.load(model2, folders[-1])  # a checkpoint's adapter is an ordinary saved adapter


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, handle = make("lora")
    tr = trainer(model, handle, tmp_path, 3)
    calls = []

    def dying_save_file(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise Killed("disk full")
        return real(*a, **k)
    real = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", dying_save_file)
    with pytest.raises(Killed):
        tr.fit(epoch_batches)
    assert [p.name for p in ckpt.checkpoint_folders(tmp_path)] == ["step-00000003"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    (tmp_path / ".tmp-step-killed").mkdir()  # what a SIGKILL would leave: ignored, then cleaned
    (tmp_path / "step-00000009").mkdir()    # a half-written folder under the final name: not complete
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000003"
    monkeypatch.setattr(ckpt, "save_file", real)
    model2, handle2 = make("lora")
    trainer(model2, handle2, tmp_path, 3).fit(epoch_batches, resume=True)
    assert not (tmp_path / ".tmp-step-killed").exists()


def test_part_state_round_trips():
    from lorazoo.schedules.adalora import AdaLoRASchedule
    from lorazoo.schedules.relora import ReLoRA

    spec = lorazoo.AdapterSpec.preset("relora", targets=["fc1"], relora_interval=0.25)
    a, b = ReLoRA(spec), ReLoRA(spec)
    a.plan(40)
    b.plan(100)  # a later plan does not change the resumed phase
    b.load_state_dict(a.state_dict())
    assert (b.interval, b.rewarm) == (a.interval, a.rewarm) == (10, 1)
    spec = lorazoo.AdapterSpec.preset("adalora", rank=4, targets=["fc1"])
    a = AdaLoRASchedule(spec)
    a.plan(50)
    a.ema[("fc1", "lam")] = (torch.rand(4), torch.rand(4))
    a.step = 7
    b = AdaLoRASchedule(spec)
    b.load_state_dict(a.state_dict())
    assert b.step == 7 and (b.total, b.t_init, b.t_final) == (a.total, a.t_init, a.t_final)
    torch.testing.assert_close(b.ema[("fc1", "lam")][1], a.ema[("fc1", "lam")][1])
    from lorazoo.parts import Optim, Schedule
    assert Schedule(spec).state_dict() == {} and Optim(spec).state_dict() == {}


# --- refusals ------------------------------------------------------------------------------------
@pytest.fixture
def killed_run(tmp_path):
    torch.manual_seed(0)
    model, handle = make("lora")
    tr = trainer(model, handle, tmp_path, 3)
    kill_at(handle, 5)
    with pytest.raises(Killed):
        tr.fit(epoch_batches)
    return tmp_path


@pytest.mark.parametrize("change, msg", [
    (dict(lr=1e-2), "lr=0.02"), (dict(accumulation=2), "accumulation"), (dict(epochs=2), "epochs"),
])
def test_resume_refuses_other_options(killed_run, change, msg):
    model, handle = make("lora")
    with pytest.raises(LorazooError, match=msg):
        trainer(model, handle, killed_run, 3, **change).fit(epoch_batches, resume=True)


def test_resume_refuses_other_data_spec_or_base(killed_run):
    model, handle = make("lora")
    with pytest.raises(LorazooError, match="same data"):
        trainer(model, handle, killed_run, 3).fit(lambda e: epoch_batches(e, n=48), resume=True)
    model = TinyNet(dtype=F32)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(rank=2, targets=["fc1", "fc2"]))
    with pytest.raises(LoadError, match="another adapter spec"):
        trainer(model, handle, killed_run, 3).fit(epoch_batches, resume=True)
    model = TinyNet(seed=5, dtype=F32)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("lora", targets=["fc1", "fc2"], **KINDS["lora"]))
    with pytest.raises(LoadError, match="different base model"):
        trainer(model, handle, killed_run, 3).fit(epoch_batches, resume=True)
    with pytest.raises(LoadError, match="no training checkpoint"):
        trainer(model, handle).fit(epoch_batches, resume=killed_run / "nothing")
    with pytest.raises(LorazooError, match="checkpoint_dir"):
        trainer(model, handle, None, 3)


def test_resume_accepts_the_base_summed_in_another_order(killed_run):
    """A base's fingerprint sums millions of weights: another thread count rounds the last digit apart
    (seen on BERT's word embeddings); that is the same base and resumes."""
    model, handle = make("lora")
    for path, (shape, stats) in handle.fingerprint.items():
        handle.fingerprint[path] = [shape, [v * (1 + 4e-16) for v in stats]]
    trainer(model, handle, killed_run, 3).fit(epoch_batches, resume=True)
    model, handle = make("lora")
    shape, stats = handle.fingerprint["fc1"]
    handle.fingerprint["fc1"] = [shape, [stats[0] * 1.01, *stats[1:]]]
    with pytest.raises(LoadError, match="different base model.*differ at fc1"):
        trainer(model, handle, killed_run, 3).fit(epoch_batches, resume=True)


# --- non-finite values ---------------------------------------------------------------------------
def test_nan_data_names_the_first_layer_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model, handle = make("lora")
    data = epoch_batches(0) + epoch_batches(1)
    data[5] = {"x": data[5]["x"].clone(), "labels": data[5]["labels"]}
    data[5]["x"][3, 2] = float("nan")
    tr = trainer(model, handle, tmp_path, 2, epochs=1, evaluate=None)
    with pytest.raises(NonFiniteError, match="lower the learning rate") as e:
        tr.fit(data)
    msg = str(e.value)
    assert "step 6" in msg and "'fc1'" in msg and "input was already non-finite" in msg
    assert "step-00000004" in msg and e.value.layer == "fc1" and e.value.step == 6
    assert [p.name for p in ckpt.checkpoint_folders(tmp_path)] == ["step-00000004"]
    # the kept checkpoint is good and resumable; the in-memory adapter was not stepped on NaN
    model2 = TinyNet(dtype=F32)
    saved = lorazoo.load(model2, e.value.checkpoint)
    assert all(torch.isfinite(v).all() for v in saved.state_dict().values())
    data[5] = epoch_batches(1)[1]
    model3, handle3 = make("lora")
    trainer(model3, handle3, tmp_path, 2, epochs=1, evaluate=None).fit(data, resume=True)


def test_a_layer_going_non_finite_is_named(tmp_path):
    model, handle = make("lora")
    with torch.no_grad():
        handle.adapters()["fc2"].form.A.fill_(float("inf"))  # fc2's output: 0·inf = NaN
    tr = trainer(model, handle, tmp_path, 2, evaluate=None)
    with pytest.raises(NonFiniteError) as e:
        tr.fit(epoch_batches)
    assert e.value.layer == "fc2" and "'fc2'" in str(e.value) and "input was finite" in str(e.value)
    assert e.value.step == 1 and e.value.checkpoint is None and "No checkpoint was written" in str(e.value)
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_parameters_gone_non_finite_are_never_checkpointed(tmp_path):
    model, handle = make("lora")
    orig = handle.after_step

    def after(opt, step):
        orig(opt, step)
        if step == 2:  # an update that overflowed
            with torch.no_grad():
                handle.adapters()["fc2"].form.B[0, 0] = float("inf")
    handle.after_step = after
    with pytest.raises(NonFiniteError, match="fc2") as e:
        trainer(model, handle, tmp_path, 1, evaluate=None).fit(epoch_batches)
    assert e.value.layer == "fc2" and "step-00000001" in str(e.value)
    assert [p.name for p in ckpt.checkpoint_folders(tmp_path)] == ["step-00000001"]


class SqrtHead(TinyNet):
    """A finite loss whose gradient is NaN: d sqrt(u)/du at u = 0 is infinite."""

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        out.loss = out.loss + torch.sqrt((out.logits * 0).sum().abs())
        return out


@pytest.mark.parametrize("clip", [1.0, None])
def test_a_non_finite_gradient_with_a_finite_loss_stops_training(clip):
    model = SqrtHead(dtype=F32)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(rank=2, targets=["fc1", "fc2"]))
    before = {k: v.clone() for k, v in handle.state_dict().items()}
    with pytest.raises(NonFiniteError, match="gradient norm is nan") as e:
        trainer(model, handle, max_grad_norm=clip).fit(epoch_batches)
    assert e.value.layer == "fc2" and "backward order" in str(e.value)
    assert max_diff(handle.state_dict(), before) == 0  # no step was taken on it


def test_healthy_training_is_not_slowed_by_replays(monkeypatch):
    import lorazoo.train as train_mod

    monkeypatch.setattr(train_mod, "locate_non_finite", lambda *a: pytest.fail("replayed a healthy step"))
    model, handle = make("lora")
    trainer(model, handle, epochs=1).fit(epoch_batches)


# --- lorazoo train --checkpoint-every / --resume --------------------------------------------------
@pytest.fixture
def tiny_task():
    from lorazoo.tasks.base import TASKS

    TASKS[TinyTask.name] = TinyTask
    yield TinyTask.name
    del TASKS[TinyTask.name]


def test_cli_resume_after_a_kill_matches_an_uninterrupted_run(tiny_task, tmp_path, monkeypatch, capsys):
    from lorazoo.cli import main

    flags = ["train", "--task", tiny_task, "--rank", "4", "--lr", "0.02", "--epochs", "2", "--batch-size", "16",
             "--option", "rank_dropout=0.2", "--no-progress", "--checkpoint-every", "4"]
    assert main([*flags, "--out", str(tmp_path / "ref")]) == 0
    ref = json.loads((tmp_path / "ref" / "result.json").read_text())
    assert ref["steps"] == 12

    real_step = Trainer._step

    def dying(self, *a):
        if self.step == 9:
            raise Killed()
        return real_step(self, *a)
    monkeypatch.setattr(Trainer, "_step", dying)
    with pytest.raises(Killed):
        main([*flags, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "result.json").exists()
    monkeypatch.setattr(Trainer, "_step", real_step)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().err
    got = json.loads((tmp_path / "run" / "result.json").read_text())
    assert got["steps"] == 12 and got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert got["metric_before"] == ref["metric_before"] and got["metric"] == pytest.approx(ref["metric"])
    a = TinyNet(dtype=F32)
    b = TinyNet(dtype=F32)
    ha, hb = lorazoo.load(a, tmp_path / "ref"), lorazoo.load(b, tmp_path / "run")
    assert max_diff(ha.state_dict(), hb.state_dict()) <= 1e-5
    # resuming the finished run gives its result back
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress", "--json"]) == 0


def test_cli_resume_refuses_other_flags_and_unresumable_folders(tiny_task, tmp_path, capsys):
    from lorazoo.cli import main

    assert main(["train", "--resume", str(tmp_path), "--lr", "0.1", "--no-progress"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "only runs started with --checkpoint-every" in capsys.readouterr().err
    assert main(["train", "--task", tiny_task, "--checkpoint-every", "0", "--no-progress",
                 "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint_every" in capsys.readouterr().err


def test_run_refuses_resume_with_other_arguments(tiny_task, tmp_path):
    from lorazoo.run import run

    spec = lorazoo.AdapterSpec(rank=2)
    run(tiny_task, spec, lr=0.01, epochs=0.5, out_dir=tmp_path, checkpoint_every=2, progress=False)
    with pytest.raises(LorazooError, match="lr"):
        run(tiny_task, spec, lr=0.02, epochs=0.5, out_dir=tmp_path, checkpoint_every=2, progress=False, resume=True)
    with pytest.raises(LorazooError, match="need out_dir"):
        run(tiny_task, spec, lr=0.02, checkpoint_every=2)
