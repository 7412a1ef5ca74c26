"""lorazoo.integrations.hf: transformers.Trainer runs lorazoo adapters as lorazoo's own Trainer does.

Fast tests: the tiny net (float64), one variant per hook, each compared step by step with
lorazoo.train.Trainer on the same data order, optimizer, schedule and RNG stream. Slow tests: the
real MiniLM sentiment task (float32) for LoRA, LoRA+, AdaLoRA and ReLoRA, the example script in two
DDP processes under ``accelerate launch`` and ``torchrun``, and the tiny net in two launched processes
against one.

The RNG: HF's DataLoader draws a seed from torch's global generator when an epoch's iterator is
made, so each comparison takes the generator's state at HF's first step and starts lorazoo's run
from it (then dropout masks match draw for draw, within one epoch).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

import lorazoo
from lorazoo.errors import LorazooError
from lorazoo.integrations.hf import STATE_FILE, LorazooTrainer, lr_lambda
from lorazoo.train import Trainer
from lorazoo.run import with_task_defaults
from lorazoo.tasks.base import get_task
from tiny import TinyNet, tiny_data

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_trainer.py"


class DictNet(TinyNet):
    """TinyNet returning a ModelOutput (HF's Trainer reads ``outputs["loss"]``, lorazoo's ``.loss``)."""

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        return SequenceClassifierOutput(loss=out.loss, logits=out.logits)


def tiny_adapted(variant: str, **overrides):
    model = DictNet()
    spec = lorazoo.AdapterSpec.preset(variant, **{"targets": ["fc1", "fc2"], **overrides})
    return model, lorazoo.adapt(model, spec)


def examples(n: int = 192):
    x, y = tiny_data(n)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def collate(items):
    return {"x": torch.stack([e["x"] for e in items]), "labels": torch.stack([e["labels"] for e in items])}


class RngAtFirstStep(TrainerCallback):
    """Keeps torch's RNG state at the start of the first optimizer step (after HF's own draws)."""

    state = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.state is None:
            self.state = torch.get_rng_state()


def hf_args(out, *, lr, batch_size, accumulation=1, warmup=2, epochs=1, **kw):
    return TrainingArguments(**{
        "output_dir": str(out), "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": accumulation, "num_train_epochs": epochs, "learning_rate": lr,
        "warmup_steps": warmup, "weight_decay": 0.0, "max_grad_norm": 1.0, "optim": "adamw_torch",
        "train_sampling_strategy": "sequential", "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "disable_tqdm": True, "log_level": "error", "use_cpu": True, "seed": 0, **kw})


def hf_history(trainer) -> tuple[list[float], list[float]]:
    """(task loss, lr) per step from the Trainer's logs: HF's loss includes the auxiliary loss."""
    logs = [h for h in trainer.state.log_history if "loss" in h and "learning_rate" in h]
    return [h["loss"] - h.get("aux_loss", 0.0) for h in logs], [h["learning_rate"] for h in logs]


def compare(variant, *, lr=1e-2, batch_size=8, accumulation=1, n=192, tol=1e-10, tmp_path, **overrides):
    """Train the tiny net with LorazooTrainer and with lorazoo's Trainer; assert equal curves and adapters."""
    data = examples(n)
    model, handle = tiny_adapted(variant, **overrides)
    rng = RngAtFirstStep()
    hf = LorazooTrainer(model=model, args=hf_args(tmp_path, lr=lr, batch_size=batch_size, accumulation=accumulation),
                        train_dataset=data, data_collator=collate, callbacks=[rng], lr_schedule="linear")
    hf.train()
    hf_losses, hf_lrs = hf_history(hf)

    model2, handle2 = tiny_adapted(variant, **overrides)
    batches = [collate(data[i:i + batch_size]) for i in range(0, n, batch_size)]
    torch.set_rng_state(rng.state)
    own = Trainer(model2, handle2, lr=lr, epochs=1, accumulation=accumulation, lr_schedule="linear", warmup=2,
                  weight_decay=0.0, max_grad_norm=1.0, progress=False)
    hist = own.fit(batches)
    assert len(hf_losses) == hist["steps"] == n // batch_size // accumulation
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(f64(hf_lrs), f64(hist["lrs"]), rtol=1e-12, atol=0)
    # HF sums the logged loss in a float32 tensor (Trainer._tr_loss): equal within float32 rounding
    torch.testing.assert_close(f64(hf_losses), f64(hist["losses"]), rtol=3e-7, atol=1e-7)
    sd, sd2 = handle.state_dict(), handle2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], sd2[k], rtol=tol, atol=tol, msg=k)
    return hf, own, handle, handle2


# --- one variant per hook, step by step against lorazoo's Trainer ----------------------------------
def test_lora_with_dropout_matches_lorazoo_trainer(tmp_path):
    hf, own, _, _ = compare("lora", dropout=0.2, tmp_path=tmp_path)
    assert own.losses[-1] < own.losses[0]


def test_param_groups_loraplus(tmp_path):
    hf, own, _, _ = compare("loraplus", lr=2e-3, tmp_path=tmp_path)
    rates = sorted(g["initial_lr"] for g in hf.optimizer.param_groups)
    assert rates == pytest.approx([2e-3, 2e-3 * 16])  # B learns 16x faster, through the schedule


def test_gradient_rule_lora_pro_before_step(tmp_path):
    compare("lora_pro", tmp_path=tmp_path, tol=1e-8)


def test_plan_and_masking_adalora(tmp_path):
    _, _, handle, _ = compare("adalora", tmp_path=tmp_path, adalora_interval=4)
    kept = sum(int(ad.form.rank_mask.sum()) for ad in handle.adapters().values())
    sched = handle.schedule
    assert sched.total == 24  # planned from the Trainer's run length
    assert kept == sched.target_rank * 2  # the final budget, over the two layers


def test_merges_and_jagged_lr_relora(tmp_path):
    hf, _, handle, _ = compare("relora", tmp_path=tmp_path, relora_restart_warmup=3)
    assert handle.schedule.interval == 6  # a quarter of the 24 steps
    assert all(ad.shift_A.shape[0] > 0 for ad in handle.adapters().values())  # merged into the base
    lrs = [h["learning_rate"] for h in hf.state.log_history if "learning_rate" in h]
    assert lrs[6] < lrs[7] < lrs[8] and lrs[6] < lrs[5] / 2  # re-warm over steps 7-9 after the first merge


def test_aux_loss_router_loramoe_with_accumulation(tmp_path):
    hf, _, _, _ = compare("loramoe", accumulation=2, tmp_path=tmp_path, targets=["fc1"])
    aux = [h["aux_loss"] for h in hf.state.log_history if "aux_loss" in h]
    assert len(aux) == 12 and all(a > 0 for a in aux)


def test_hf_scheduler_times_lr_factor(tmp_path):
    """lr_schedule=None keeps TrainingArguments' schedule (cosine here), times ReLoRA's factor."""
    model, handle = tiny_adapted("relora", relora_restart_warmup=3)
    args = hf_args(tmp_path, lr=1e-2, batch_size=8, lr_scheduler_type="cosine")
    hf = LorazooTrainer(model=model, args=args, train_dataset=examples(), data_collator=collate)
    hf.train()
    from transformers import get_cosine_schedule_with_warmup

    ref = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1.0), 2, 24).lr_lambdas[0]
    expect = [1e-2 * ref(s) * handle.lr_factor(s + 1) for s in range(24)]
    assert expect[6] < expect[5] / 2  # ReLoRA's re-warmup is in it
    torch.testing.assert_close(torch.tensor(hf_history(hf)[1]), torch.tensor(expect), rtol=1e-12, atol=0)


def test_hooks_in_lorazoo_order(tmp_path, monkeypatch):
    model, handle = tiny_adapted("lora")
    calls = []
    aux = handle.aux_loss
    monkeypatch.setattr(handle, "aux_loss", lambda: calls.append("aux") or aux())
    monkeypatch.setattr(handle, "before_step", lambda opt: calls.append("before"))
    monkeypatch.setattr(handle, "after_step", lambda opt, step: calls.append(("after", step)))
    monkeypatch.setattr(handle, "plan", lambda total: calls.append(("plan", total)))

    class Step(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            calls.append("step")

    hf = LorazooTrainer(model=model, args=hf_args(tmp_path, lr=1e-2, batch_size=8, accumulation=2),
                        train_dataset=examples(32), data_collator=collate, callbacks=[Step()])
    hf.train()
    one = lambda s: ["aux", "aux", "before", "step", ("after", s)]  # noqa: E731
    assert calls == [("plan", 2)] + one(1) + one(2)  # as lorazoo.train.Trainer._step


# --- saving, loading, resuming -----------------------------------------------------------------
def test_checkpoints_are_lorazoo_adapters_and_resume_exactly(tmp_path):
    data = examples()

    def trainer(out, model):
        args = hf_args(out, lr=1e-2, batch_size=8, save_strategy="steps", save_steps=8)
        return LorazooTrainer(model=model, args=args, train_dataset=data, data_collator=collate)

    model, handle = tiny_adapted("adalora", adalora_interval=4)
    full = trainer(tmp_path / "a", model)
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-8"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter.safetensors", "adapter_config.json", STATE_FILE, "optimizer.pt"} <= files
    assert not any(f.startswith("model") for f in files)  # the adapter only, not the whole model
    full.save_model(tmp_path / "final")
    fresh = DictNet()
    lorazoo.load(fresh, tmp_path / "final")
    x, _ = tiny_data(8, seed=5)
    model.eval()
    torch.testing.assert_close(fresh(x)["logits"], model(x)["logits"], rtol=1e-12, atol=1e-12)

    model2, handle2 = tiny_adapted("adalora", adalora_interval=4)  # a new process, from step 8
    resumed = trainer(tmp_path / "b", model2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 24
    sd, sd2 = handle.state_dict(), handle2.state_dict()
    for k in sd:  # masks at steps 12, 16 and 17 depend on the restored importance averages
        torch.testing.assert_close(sd2[k], sd[k], rtol=1e-10, atol=1e-12, msg=k)


def test_resume_without_part_state_is_refused(tmp_path):
    model, _ = tiny_adapted("adalora", adalora_interval=4)
    args = hf_args(tmp_path / "a", lr=1e-2, batch_size=8, save_strategy="steps", save_steps=8, max_steps=8)
    LorazooTrainer(model=model, args=args, train_dataset=examples(), data_collator=collate).train()
    (tmp_path / "a" / "checkpoint-8" / STATE_FILE).unlink()
    model2, _ = tiny_adapted("adalora", adalora_interval=4)
    again = LorazooTrainer(model=model2, args=hf_args(tmp_path / "b", lr=1e-2, batch_size=8, max_steps=8),
                           train_dataset=examples(), data_collator=collate)
    with pytest.raises(lorazoo.LoadError, match=STATE_FILE):
        again.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))


# --- refusals ------------------------------------------------------------------------------------
def test_refuses_ambiguous_or_missing_adapter(tmp_path):
    args = hf_args(tmp_path, lr=1e-2, batch_size=8)
    with pytest.raises(LorazooError, match="0 lorazoo adapters"):
        LorazooTrainer(model=DictNet(), args=args, train_dataset=examples())
    model = DictNet()
    lorazoo.adapt(model, lorazoo.AdapterSpec(targets=["fc1"]), name="a")
    lorazoo.adapt(model, lorazoo.AdapterSpec(targets=["fc2"]), name="b")
    with pytest.raises(LorazooError, match="2 lorazoo adapters"):
        LorazooTrainer(model=model, args=args, train_dataset=examples())
    with pytest.raises(LorazooError, match="unknown lr_schedule"):
        LorazooTrainer(model=model, args=args, handle=lorazoo.handles_of(model)["a"], lr_schedule="steps")
    with pytest.raises(LorazooError, match="another model"):
        LorazooTrainer(model=DictNet(), args=args, handle=lorazoo.handles_of(model)["a"])
    with pytest.raises(LorazooError, match="model_init"):
        LorazooTrainer(model=model, args=args, handle=lorazoo.handles_of(model)["a"], model_init=DictNet)


def test_refuses_parameters_outside_the_adapter(tmp_path):
    model, _ = tiny_adapted("lora")
    model.head.weight.requires_grad_(True)
    hf = LorazooTrainer(model=model, args=hf_args(tmp_path, lr=1e-2, batch_size=8), train_dataset=examples(),
                        data_collator=collate)
    with pytest.raises(LorazooError, match="head.weight"):
        hf.train()


def test_refuses_a_scheduler_that_cannot_carry_lr_factor(tmp_path):
    model, _ = tiny_adapted("relora")
    args = hf_args(tmp_path, lr=1e-2, batch_size=8, lr_scheduler_type="reduce_lr_on_plateau",
                   eval_strategy="steps", eval_steps=4)
    hf = LorazooTrainer(model=model, args=args, train_dataset=examples(), eval_dataset=examples(16),
                        data_collator=collate)
    with pytest.raises(LorazooError, match="lr_factor"):
        hf.train()


def test_lr_lambda_is_not_pickled_into_scheduler_state():
    model, handle = tiny_adapted("relora")
    handle.plan(24)
    opt = torch.optim.SGD(handle.trainable_parameters(), lr=1.0)
    sched = LambdaLR(opt, lr_lambda(handle, lambda s: 1.0))
    assert sched.state_dict()["lr_lambdas"] == [None]  # no handle inside HF's scheduler.pt


# --- the real task ---------------------------------------------------------------------------------
def _example_module():
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "loraplus", "adalora", "relora"])
def test_minilm_sentiment_same_curve_as_lorazoo_trainer(variant, tmp_path):
    """MiniLM (with its dropout) on 160 sentiment examples, 20 steps of 8, float32."""
    ex = _example_module()
    lr, batch_size, limit, options = 1e-3, 8, 160, {"max_length": 32, "test_size": 200}
    task = get_task("sentiment", limit=limit, seed=0, options=options)
    extra = {"adalora_interval": 5} if variant == "adalora" else {}  # 20 steps: masks at 5, 10 and 14
    spec = with_task_defaults(lorazoo.AdapterSpec.preset(variant, **extra), task)
    torch.manual_seed(0)
    base = task.build_model()

    model = copy.deepcopy(base)
    handle = lorazoo.adapt(model, spec)
    rng = RngAtFirstStep()
    args = hf_args(tmp_path, lr=lr, batch_size=batch_size, warmup=3)
    hf = LorazooTrainer(model=model, args=args, train_dataset=ex.TaskExamples(task), data_collator=ex.collator(),
                        callbacks=[rng], lr_schedule="linear")
    hf.train()
    hf_losses, hf_lrs = hf_history(hf)

    model2 = base
    handle2 = lorazoo.adapt(model2, spec)
    torch.set_rng_state(rng.state)
    own = Trainer(model2, handle2, lr=lr, epochs=1, lr_schedule="linear", warmup=3, progress=False)
    hist = own.fit(task.train_batches(batch_size, 0))
    assert hist["steps"] == len(hf_losses) == limit // batch_size
    torch.testing.assert_close(torch.tensor(hf_lrs), torch.tensor(hist["lrs"]), rtol=1e-6, atol=0)
    # measured: equal for LoRA, LoRA+, ReLoRA; AdaLoRA's 2e-6 is HF's loss minus the logged aux_loss (~37)
    torch.testing.assert_close(torch.tensor(hf_losses), torch.tensor(hist["losses"]), rtol=1e-5, atol=1e-6)
    assert hist["losses"][-1] < hist["losses"][0]
    sd, sd2 = handle.state_dict(), handle2.state_dict()
    for k in sd:
        torch.testing.assert_close(sd[k], sd2[k], rtol=1e-5, atol=1e-7, msg=k)
    if variant == "adalora":
        masks = [ad.form.rank_mask for ad in handle.adapters().values()]
        masks2 = [ad.form.rank_mask for ad in handle2.adapters().values()]
        assert all(torch.equal(a, b) for a, b in zip(masks, masks2))
        assert sum(int(m.sum()) for m in masks) == handle.schedule.target_rank * len(masks)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_prefix(launcher: str, processes: int, tmp_path) -> list[str]:
    """The interpreter arguments that start a script in ``processes`` local CPU processes (DDP over
    gloo when 2). accelerate 1.15 starts several local CPU processes only through torch's launcher:
    ``--cpu`` (or a ``distributed_type: MULTI_CPU`` config) goes to its simple launcher, which runs
    ONE process unless mpirun is given a hostfile; a MULTI_GPU config with ``use_cpu: true`` goes
    through torch.distributed.run, and each process (the script's ``use_cpu``) runs MULTI_CPU."""
    port = str(free_port())
    if launcher == "torchrun":
        return ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", port]
    if processes == 1:
        return ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    config = tmp_path / "accelerate.yaml"
    config.write_text("\n".join([
        "compute_environment: LOCAL_MACHINE", "distributed_type: MULTI_GPU", f"num_processes: {processes}",
        "num_machines: 1", "machine_rank: 0", "main_process_ip: 127.0.0.1", f"main_process_port: {port}",
        "rdzv_backend: static", "same_network: true", "gpu_ids: all", "use_cpu: true", "mixed_precision: 'no'",
        "dynamo_config: {dynamo_backend: 'NO'}", ""]))
    return ["-m", "accelerate.commands.launch", "--config_file", str(config)]


def launch(launcher, processes, tmp_path, script, *args) -> dict:
    """Run ``script args`` under the launcher; the JSON summary its rank 0 prints last."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, *launch_prefix(launcher, processes, tmp_path), str(script), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


LAUNCHERS = {"accelerate": 2, "torchrun": 2}  # the example in two DDP processes (gloo) under each launcher


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launchers_run_the_example(launcher, tmp_path):
    out = tmp_path / "run"
    processes = LAUNCHERS[launcher]
    result = launch(launcher, processes, tmp_path, EXAMPLE, "--cpu", "--variant", "adalora", "--limit", "64",
                    "--batch-size", 8 // processes, "--max-length", "32", "--test-size", "64", "--out", out,
                    "--save-steps", "4")
    kind = "MULTI_CPU" if processes > 1 else "NO"
    assert (result["steps"], result["num_processes"], result["distributed_type"]) == (8, processes, kind)
    assert len(result["losses"]) == 8 and all(math.isfinite(v) for v in result["losses"])
    assert (out / "checkpoint-4" / STATE_FILE).is_file() and (out / "adapter.safetensors").is_file()
    task = get_task("sentiment", limit=64, seed=0, options={"max_length": 32, "test_size": 64})
    model = task.build_model()
    lorazoo.load(model, out)
    assert task.evaluate(model)["accuracy"] == pytest.approx(result["metrics"]["accuracy"], abs=1e-6)


def launched_tiny(out, variant: str, batch_size: int):
    """LorazooTrainer on the tiny net (float64, no dropout), 64 examples in order, ``batch_size`` per
    process, in this process or as one of a launched group; rank 0 saves the adapter into ``out``
    and prints a JSON summary (the launched scripts' last line)."""
    model, handle = tiny_adapted(variant)
    hf = LorazooTrainer(model=model, args=hf_args(out, lr=1e-2, batch_size=batch_size), train_dataset=examples(64),
                        data_collator=collate, lr_schedule="linear")
    hf.train()
    hf.save_model(str(out))
    losses, lrs = hf_history(hf)
    result = {"losses": losses, "lrs": lrs, "steps": hf.state.global_step,
              "num_processes": hf.accelerator.num_processes,
              "distributed_type": str(hf.accelerator.distributed_type).rpartition(".")[2]}
    if hf.is_world_process_zero():
        print(json.dumps(result))
    hf.accelerator.end_training()  # a gloo process exiting with its group alive can abort (SIGABRT) at exit
    return result, handle


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_launched_processes_train_like_one(launcher, tmp_path):
    """AdaLoRA on the tiny net: two DDP processes (4 rows each) under the launcher train as one
    process on batches of 8: the same losses (HF logs them in float32), learning rates, rank masks
    (the budget pruned on every rank) and adapter; rank 0 alone writes it."""
    script = tmp_path / "tiny_hf.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      f"from test_hf_trainer import launched_tiny\nlaunched_tiny(sys.argv[1], 'adalora', 4)\n")
    two = launch(launcher, 2, tmp_path, script, tmp_path / "two")
    one, handle = launched_tiny(tmp_path / "one", "adalora", 8)
    assert (two["steps"], two["num_processes"], two["distributed_type"]) == (8, 2, "MULTI_CPU")
    assert (one["steps"], one["num_processes"], one["distributed_type"]) == (8, 1, "NO")
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(f64(two["lrs"]), f64(one["lrs"]), rtol=1e-12, atol=0)
    torch.testing.assert_close(f64(two["losses"]), f64(one["losses"]), rtol=3e-7, atol=1e-7)
    got, want = lorazoo.load(DictNet(), tmp_path / "two").state_dict(), handle.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)
    masks = [ad.form.rank_mask for ad in handle.adapters().values()]
    assert sum(int(m.sum()) for m in masks) == handle.schedule.target_rank * 2 < sum(m.numel() for m in masks)
