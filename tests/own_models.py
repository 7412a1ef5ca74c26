"""Tiny Hugging Face model folders (random weights, hidden 32, a 20-word tokenizer) and tiny data files
for the own-data tests (tests/test_own_data.py, tests/test_config.py)."""
from __future__ import annotations

import random
from pathlib import Path

POSITIVE, NEGATIVE = ("good", "great"), ("bad", "awful")
FILLER = ("the", "a", "movie", "film", "plot", "acting", "was", "is", "very", "quite", "really", "story")
ANSWERS = {"pos": "yes", "neg": "no"}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", *POSITIVE, *NEGATIVE, *FILLER, *ANSWERS.values(), "answer", ":"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _save(model, folder: Path) -> Path:
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    return folder


def tiny_bert(folder: Path) -> Path:
    """A BertModel (no head: lorazoo adds a fresh classifier) with random weights."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, pad_token_id=0)
    return _save(BertModel(cfg), Path(folder))


def tiny_llama(folder: Path) -> Path:
    """A LlamaForCausalLM with random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=None,
                      eos_token_id=2, initializer_range=0.2)  # a frozen lm_head of std 0.02 caps the logits
    return _save(LlamaForCausalLM(cfg), Path(folder))


def rows(n: int, seed: int = 0, labels=("neg", "pos")) -> list[dict]:
    """Texts whose label is set by their first word (a sentiment word before 4 fillers), with prompt and
    response columns too."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        y = i % 2
        # the label's word comes first: a tiny random encoder pools the first token, LoRA learns it in a few steps
        text = " ".join([rng.choice(POSITIVE if y else NEGATIVE), *rng.sample(FILLER, 4)])
        out.append({"text": text, "label": labels[y], "prompt": text + " answer :",
                    "response": ANSWERS["pos" if y else "neg"]})
    return out


def write(table: list[dict], path: Path) -> Path:
    """``table`` as CSV, TSV, JSONL, Parquet (by suffix) or a save_to_disk folder (no suffix)."""
    import pandas as pd

    path = Path(path)
    df = pd.DataFrame(table)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        import datasets

        datasets.disable_progress_bars()
        datasets.Dataset.from_pandas(df, preserve_index=False).save_to_disk(str(path))
    return path
