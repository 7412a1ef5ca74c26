"""Train a lorazoo adapter on the sentiment task with Hugging Face's Trainer, under accelerate.

    accelerate launch examples/hf_trainer.py --variant adalora --limit 2000 --out /tmp/hf_adalora
    accelerate launch --cpu --num_processes 1 examples/hf_trainer.py --cpu --limit 64 --out /tmp/hf_smoke
    torchrun --nproc_per_node 2 examples/hf_trainer.py --cpu --limit 64 --batch-size 4 --out /tmp/hf_ddp  # DDP
    python examples/hf_trainer.py ...             # the same, in this process

The data is the task's training split as single examples, in the order lorazoo's own trainer reads
them (``train_sampling_strategy="sequential"``), padded per batch by ``DataCollatorWithPadding``, which
gives the batches ``task.train_batches`` gives; so with ``lr_schedule="linear"`` and the same seed the
loss curve is lorazoo's (``tests/test_hf_trainer.py``). Over several epochs HF repeats that order
where lorazoo reshuffles each epoch; use the default random sampling for a plain HF run.

The adapter lands in ``--out`` (and every ``--save-steps`` in ``--out/checkpoint-N``) in lorazoo's
format: ``lorazoo.load(task.build_model(), out)``. The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import json

import torch
from transformers import DataCollatorWithPadding, TrainingArguments

import lorazoo
from lorazoo.integrations.hf import LorazooTrainer
from lorazoo.run import with_task_defaults
from lorazoo.tasks._util import shuffled
from lorazoo.tasks.base import get_task
from lorazoo.tasks.text_classification import encoded, tokenizer


class TaskExamples(torch.utils.data.Dataset):
    """One epoch of a lorazoo text-classification task's training examples, in lorazoo's order."""

    def __init__(self, task, epoch: int = 0):
        self.ids = encoded(task.load_examples, int(task.opts["max_length"]))
        self.labels = task.load_examples()[1]
        self.order = shuffled(task.train_indices, task.seed, epoch).tolist()

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        j = self.order[i]
        return {"input_ids": self.ids[j], "labels": int(self.labels[j])}


def collator():
    """Pads each batch to its longest text, as the task's own batches are."""
    return DataCollatorWithPadding(tokenizer())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="lora", help="a lorazoo preset (lorazoo variants)")
    p.add_argument("--limit", type=int, default=512, help="training examples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--warmup", type=float, default=0.1, help="steps, or below 1 a fraction of them")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU (with torchrun: DDP over gloo)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    task = get_task("sentiment", limit=a.limit, seed=a.seed,
                    options={"max_length": a.max_length, "test_size": a.test_size})
    spec = with_task_defaults(lorazoo.AdapterSpec.preset(a.variant), task)  # + the fresh head
    torch.manual_seed(a.seed)
    model = task.build_model()
    lorazoo.adapt(model, spec)

    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.accumulation,
        num_train_epochs=a.epochs, learning_rate=a.lr, warmup_steps=a.warmup, optim="adamw_torch",
        train_sampling_strategy="sequential", logging_steps=1, report_to="none", disable_tqdm=True, seed=a.seed, use_cpu=a.cpu,
        save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500)
    trainer = LorazooTrainer(model=model, args=args, train_dataset=TaskExamples(task), data_collator=collator(),
                             lr_schedule="linear")
    trainer.train()
    trainer.save_model(a.out)  # adapter.safetensors + adapter_config.json (+ tokenizer, training_args.bin)

    result = {"variant": a.variant, "steps": trainer.state.global_step,
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h and "learning_rate" in h],
              "distributed_type": str(trainer.accelerator.distributed_type).rpartition(".")[2],
              "num_processes": trainer.accelerator.num_processes}
    if trainer.is_world_process_zero():
        result["metrics"] = task.evaluate(trainer.model)
        print(json.dumps(result))
    trainer.accelerator.end_training()  # destroys the process group: a launched gloo process exiting without it can abort
    return result


if __name__ == "__main__":
    main()
