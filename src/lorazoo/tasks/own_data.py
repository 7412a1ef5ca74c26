"""Your own model and data: task ``own`` (what ``lorazoo train --model DIR --data FILE`` runs).

Model: any Hugging Face folder (``config.json``, weights as safetensors or a PyTorch bin, a
tokenizer), or a ``.gguf`` file (dequantized to float32 by transformers; needs ``gguf``). The task
type comes from ``task_type`` or, when that is unset, from the folder's ``architectures``: a
``...ForCausalLM`` / ``...LMHeadModel`` (or a GGUF file) is fine-tuned as a causal LM, anything else (an encoder
such as ``BertModel``, a ``...ForSequenceClassification``) becomes a sequence classifier with a
fresh head (``classifier`` or ``score``, trained and saved with the adapter).

Data: CSV, TSV, JSON Lines (``.jsonl``/``.json``), Parquet or a folder written by
``datasets.Dataset.save_to_disk``, read with ``datasets`` (a saved ``DatasetDict`` gives its
``train`` split, or ``eval_data``'s ``test``/``validation`` one). Columns:

- classification: ``text_column`` (default ``text``) and ``label_column`` (default ``label``).
  Labels are strings or integers; head output ``i`` is ``labels[i]``, the sorted distinct labels of
  the training data unless the ``labels`` option fixes them (the head's ``num_labels`` is their
  number). The resolved list is stored in task.json, so ``lorazoo eval`` maps new data the same way.
  Metrics: ``accuracy`` (primary), ``macro_f1``, ``loss``.
- causal LM: ``prompt_column`` + ``response_column`` (the loss covers the response tokens, which
  end with the tokenizer's EOS token) or ``text_column`` alone (the loss covers every token). The
  prompt gets the tokenizer's special tokens (a BOS where it adds one), the response none; no chat
  template is applied, so the prompt column holds the exact text the model sees.
  A sequence longer than ``max_length`` keeps the end of the prompt and the start of the response
  (at least half of ``max_length`` of it). Metrics: ``token_accuracy`` (primary: the share of loss
  tokens the model predicts exactly, greedy, teacher-forced; higher is better as every task's
  primary metric must be), ``loss`` (mean cross-entropy per loss token), ``perplexity``.

Texts are cut to ``max_length`` tokens (default 128), and to the model's ``max_position_embeddings``
when it has fewer. When the folder already holds a sequence classifier whose label names are
exactly the data's labels, its order is kept (and with it the trained head); a head of another size
is replaced by a fresh one.

Splits: ``eval_data`` is the test split when given; otherwise ``eval_split`` (a fraction, default
0.1) of ``data`` is held out, fixed by ``split_seed``. Training takes the first ``limit`` of the
rest in that seeded order. Every problem (missing column: the columns found are named; empty data;
labels that are missing, fractional, a single class or unknown to the head; a model folder without
weights or tokenizer; a file type ``datasets`` cannot read) raises a LorazooError when the task is
built, before any model is loaded for training.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import torch
from torch import nn

from ..errors import LorazooError
from ._util import check_batch_size, macro_f1, quiet_transformers, seeded_split, shuffled
from .base import Task, register_task
from .nlg import lm_batch
from .text_classification import collate

TASK_TYPES = ("classification", "causal-lm")
# file suffix -> the `datasets` builder that reads it
READERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
           ".pq": "parquet"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HEAD_NAMES = ("classifier", "score")  # where Hugging Face sequence classifiers keep their fresh head


# --- reading data --------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become ours
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was:
            datasets.enable_progress_bars()


def read_table(path: str, what: str = "data", splits: tuple[str, ...] = ("train",)):
    """A data file or ``save_to_disk`` folder as an in-memory ``datasets.Dataset`` (a saved
    DatasetDict gives the first of ``splits`` it has, or its only split); LorazooError when it is
    missing, empty, of an unknown type or unreadable."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise LorazooError(f"{what} {path!r} does not exist")
    st = os.stat(path)
    return _read_table(path, tuple(splits), st.st_mtime_ns, st.st_size, what)


@functools.lru_cache(maxsize=4)  # the task is built twice per run (checked by the CLI, then by run())
def _read_table(path: str, splits: tuple[str, ...], _mtime: int, _size: int, what: str):
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            raise LorazooError(f"{what} {path!r} is a folder but not one written by datasets' save_to_disk "
                               f"(no dataset_info.json or dataset_dict.json)")
        with _quiet_datasets() as datasets:
            try:
                ds = datasets.load_from_disk(path, keep_in_memory=True)
            except Exception as e:  # noqa: BLE001 - datasets raises many kinds
                raise LorazooError(f"cannot read {what} {path!r} with datasets.load_from_disk: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            pick = next((s for s in splits if s in ds), None) or (next(iter(ds)) if len(ds) == 1 else None)
            if pick is None:
                raise LorazooError(f"{what} {path!r} holds the splits {', '.join(ds)}; lorazoo reads "
                                   f"{' or '.join(splits)} there (save the split you mean on its own)")
            ds = ds[pick]
    else:
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in READERS:
            raise LorazooError(f"cannot read {what} {path!r}: unknown file type {suffix or '(no suffix)'!r}; "
                               f"lorazoo reads {', '.join(sorted(READERS))} files and save_to_disk folders")
        if os.path.getsize(path) == 0:
            raise LorazooError(f"{what} {path!r} is empty")
        kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
        with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="lorazoo-data-") as cache:
            try:
                ds = datasets.load_dataset(READERS[suffix], data_files=path, split="train", cache_dir=cache,
                                           keep_in_memory=True, **kwargs)
            except Exception as e:  # noqa: BLE001
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if "corresponds to no data" in msg:  # a CSV with a header and no rows
                    raise LorazooError(f"{what} {path!r} holds no rows") from None
                raise LorazooError(f"cannot read {what} {path!r} as {READERS[suffix]}: {msg}") from None
    if len(ds) == 0:
        raise LorazooError(f"{what} {path!r} holds no rows (columns: {', '.join(ds.column_names) or 'none'})")
    return ds


def need_columns(ds, columns: dict[str, str], path: str) -> dict[str, list]:
    """The columns a task needs (``{flag: column name}``) of the Dataset ``ds`` as ``{name: list}``;
    LorazooError naming the columns found when one is missing, or when a value is missing."""
    for flag, col in columns.items():
        if col not in ds.column_names:
            raise LorazooError(f"{path!r} has no column {col!r} (--{flag.replace('_', '-')}); "
                               f"its columns are: {', '.join(map(str, ds.column_names))}")
    table = ds.select_columns(sorted(set(columns.values()))).to_dict()
    for flag, col in columns.items():
        bad = [i for i, v in enumerate(table[col]) if v is None or (isinstance(v, float) and math.isnan(v))]
        if bad:
            raise LorazooError(f"{path!r}: column {col!r} has no value in {len(bad)} row(s), the first "
                               f"row {bad[0]} (0-based)")
    return table


def label_values(values: list, path: str, col: str) -> list:
    """Labels as ints or strings (integral floats from a CSV become ints); others refused."""
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or isinstance(v, int) or isinstance(v, str):
            out.append(v)
        elif isinstance(v, float) and v.is_integer():
            out.append(int(v))
        else:
            raise LorazooError(f"{path!r}: label {v!r} in row {i} (column {col!r}) is neither a string nor an "
                               f"integer; lorazoo trains classifiers on class labels (no regression)")
    if len({type(v) for v in out}) > 1:
        raise LorazooError(f"{path!r}: column {col!r} mixes strings and integers; use one kind of label")
    return out


# --- the model folder ----------------------------------------------------------------------------
def model_source(path: str) -> tuple[str, dict]:
    """(folder, extra from_pretrained keywords) of a model folder or .gguf file; LorazooError when
    it has no config or weights."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    if not os.path.isdir(path):
        raise LorazooError(f"model {path!r} is neither a Hugging Face model folder nor a .gguf file")
    files = set(os.listdir(path))
    if "config.json" not in files:
        raise LorazooError(f"model folder {path!r} has no config.json; it must be a Hugging Face model folder "
                           f"(save_pretrained), found: {', '.join(sorted(files)) or 'nothing'}")
    if not (files & set(WEIGHT_FILES) or any(f.endswith(".safetensors") for f in files)):
        raise LorazooError(f"model folder {path!r} holds no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                           f"found: {', '.join(sorted(files))}")
    return path, {}


@functools.lru_cache(maxsize=4)
def model_config(path: str):
    from transformers import AutoConfig

    folder, extra = model_source(path)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(folder, **extra)
    except Exception as e:  # noqa: BLE001
        raise LorazooError(f"cannot read the config of model {path!r}: {e}") from None


@functools.lru_cache(maxsize=4)
def model_tokenizer(path: str):
    from transformers import AutoTokenizer

    folder, extra = model_source(path)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(folder, **extra)
    except Exception as e:  # noqa: BLE001
        raise LorazooError(f"cannot load a tokenizer from model {path!r} (it needs tokenizer files beside "
                           f"the weights): {e}") from None


def infer_task_type(config, gguf: bool = False) -> str:
    """causal-lm for a ...ForCausalLM / ...LMHeadModel architecture or a GGUF file (whose config
    names no architecture; GGUF holds language models), else classification."""
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (gguf and not archs):
        return "causal-lm"
    return "classification"


def pad_id(tok) -> int:
    for v in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
        if v is not None:
            return int(v)
    return 0


@register_task
class OwnDataTask(Task):
    """A Hugging Face model folder fine-tuned on a data file (see the module docstring)."""

    name = "own"
    description = "your Hugging Face model on your data file (lorazoo train --model DIR --data FILE)"
    metric = "accuracy"
    targets = "all-linear"
    options = {"model": None, "data": None, "eval_data": None, "eval_split": 0.1, "split_seed": 0,
               "task_type": None, "text_column": None, "label_column": "label", "prompt_column": None,
               "response_column": None, "labels": None, "max_length": 128, "eval_batch_size": 32}
    run_defaults = {"limit": 0}  # all of the data

    # --- building and checking ------------------------------------------------------------------
    def validate(self) -> None:
        o = self.opts
        if not o["model"]:
            raise LorazooError("the own-data task needs a model (--model DIR)")
        if not o["data"] and not o["eval_data"]:
            raise LorazooError("the own-data task needs data (--data FILE)")
        if o["max_length"] < 4:
            raise LorazooError(f"max_length must be >= 4, got {o['max_length']}")
        if o["eval_batch_size"] < 1:
            raise LorazooError("eval_batch_size must be >= 1")
        if not 0 < o["eval_split"] < 1:
            raise LorazooError(f"eval_split must be a fraction in (0, 1), got {o['eval_split']}")
        for key in ("model", "data", "eval_data"):
            if o[key]:
                o[key] = os.path.abspath(os.path.expanduser(str(o[key])))
        source = model_source(o["model"])  # raises on a folder without config or weights
        config = model_config(o["model"])
        if o["task_type"] is None:
            o["task_type"] = infer_task_type(config, gguf="gguf_file" in source[1])
        if o["task_type"] not in TASK_TYPES:
            raise LorazooError(f"unknown task_type {o['task_type']!r}; known: {', '.join(TASK_TYPES)}")
        lm = o["task_type"] == "causal-lm"
        if lm and (o["prompt_column"] is None) != (o["response_column"] is None):
            raise LorazooError("give both --prompt-column and --response-column (or --text-column alone)")
        if lm and o["prompt_column"] is not None and o["text_column"] is not None:
            raise LorazooError("--text-column and --prompt-column/--response-column exclude each other")
        if not lm and (o["prompt_column"] or o["response_column"]):
            raise LorazooError(f"--prompt-column/--response-column are for causal-LM fine-tuning; model "
                               f"{o['model']!r} is trained as a classifier (architectures: "
                               f"{getattr(config, 'architectures', None)}); set --task-type causal-lm to change that")
        if o["text_column"] is None and o["prompt_column"] is None:
            o["text_column"] = "text"
        self.metric = "token_accuracy" if lm else "accuracy"
        # texts are cut to max_length tokens, and to the model's positions when it has fewer
        self.max_tokens = min(int(o["max_length"]), int(getattr(config, "max_position_embeddings", None) or 10**9))
        self.tokenizer = model_tokenizer(o["model"])
        self._source = source

        columns = ({"prompt_column": o["prompt_column"], "response_column": o["response_column"]}
                   if lm and o["prompt_column"] else {"text_column": o["text_column"]})
        if not lm:
            columns["label_column"] = o["label_column"]
        self.train_table = None
        if o["data"]:
            self.train_table = need_columns(read_table(o["data"], "data", ("train",)), columns, o["data"])
        self.eval_table = None
        if o["eval_data"]:
            self.eval_table = need_columns(read_table(o["eval_data"], "eval data", ("test", "validation", "train")),
                                           columns, o["eval_data"])
        self.columns = columns
        if not lm:
            self._resolve_labels()
        else:
            self.modules_to_save = ()
        n_train = len(next(iter(self.train_table.values()))) if self.train_table else 0
        if self.eval_table is None:
            n_test = max(1, round(o["eval_split"] * n_train))
            if n_train - n_test < 1:
                raise LorazooError(f"data {o['data']!r} has {n_train} row(s): too few to hold out eval_split="
                                   f"{o['eval_split']} and train on the rest; give --eval-data or more rows")
            self._train_idx, test = seeded_split(n_train, n_test, int(o["split_seed"]), self.limit)
            self._test = (self.train_table, test)
        else:
            n_eval = len(next(iter(self.eval_table.values())))
            perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(int(o["split_seed"])))
            self._train_idx = perm if self.limit is None else perm[:self.limit]
            self._test = (self.eval_table, torch.arange(n_eval))

    def _resolve_labels(self) -> None:
        o = self.opts
        col = o["label_column"]
        given = o["labels"]
        if given is not None and (not isinstance(given, list) or len(given) < 2
                                  or any(isinstance(v, (dict, list, float)) or v is None for v in given)
                                  or len(set(given)) != len(given)):
            raise LorazooError(f"labels must be a list of at least 2 distinct strings or integers, got {given!r}")
        seen = {}
        for name, table, path in (("data", self.train_table, o["data"]), ("eval data", self.eval_table, o["eval_data"])):
            if table is not None:
                table[col] = label_values(table[col], path, col)
                seen[name] = (set(table[col]), path)
        if given is None:
            if "data" not in seen:
                raise LorazooError("without training data the head's labels must be given (the labels option)")
            values = seen["data"][0]
            if len(values) < 2:
                raise LorazooError(f"data {o['data']!r}: column {col!r} holds a single label "
                                   f"({next(iter(values))!r}); a classifier needs at least 2")
            given = self._model_label_order(values) or sorted(values)
        kinds = {type(v) for v in given}
        for name, (values, path) in seen.items():
            unknown = sorted(values - set(given), key=str)
            if unknown:
                raise LorazooError(f"{name} {path!r}: label(s) {', '.join(map(repr, unknown[:10]))} in column "
                                   f"{col!r} do not fit the head, whose labels are {given!r}")
            if values and {type(v) for v in values} - kinds:
                raise LorazooError(f"{name} {path!r}: labels in column {col!r} are of another type than the "
                                   f"head's {given!r}")
        o["labels"] = list(given)
        self.label_ids = {v: i for i, v in enumerate(given)}
        self.modules_to_save = (self._head_name(),)

    def _model_label_order(self, values: set) -> list | None:
        """The labels in the order of the model's own classification head, when the folder holds one
        whose label names are exactly the data's (its trained head then stays meaningful)."""
        config = model_config(self.opts["model"])
        archs = getattr(config, "architectures", None) or []
        names = {int(i): str(v) for i, v in (getattr(config, "id2label", None) or {}).items()}
        if not any(a.endswith("ForSequenceClassification") for a in archs) or len(names) != len(values):
            return None
        if all(v.startswith("LABEL_") for v in names.values()) or set(names.values()) != {str(v) for v in values}:
            return None
        by_name = {str(v): v for v in values}
        return [by_name[names[i]] for i in sorted(names)]

    def _head_name(self) -> str:
        """The sequence classifier's fresh head, found on an empty (meta) model."""
        from transformers import AutoModelForSequenceClassification

        config = model_config(self.opts["model"])
        try:
            with torch.device("meta"), quiet_transformers():
                model = AutoModelForSequenceClassification.from_config(config)
        except Exception as e:  # noqa: BLE001
            raise LorazooError(f"model {self.opts['model']!r} ({config.model_type}) has no sequence-classification "
                               f"model in transformers: {e}") from None
        for name in HEAD_NAMES:
            if isinstance(getattr(model, name, None), nn.Module):
                return name
        raise LorazooError(f"cannot find the classification head of {type(model).__name__} "
                           f"(looked for {', '.join(HEAD_NAMES)})")

    def n_examples(self) -> int:
        return len(self._train_idx)

    def config(self) -> dict:
        return {"task": self.name, "limit": self.limit, "seed": self.seed, "options": dict(self.opts)}

    # --- model --------------------------------------------------------------------------------
    def processor(self):
        return self.tokenizer

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        folder, extra = self._source
        labels = self.opts["labels"]
        try:
            with quiet_transformers():
                if self.opts["task_type"] == "causal-lm":
                    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
                else:
                    model = AutoModelForSequenceClassification.from_pretrained(
                        folder, dtype=torch.float32, num_labels=len(labels), ignore_mismatched_sizes=True,
                        id2label={i: str(v) for i, v in enumerate(labels)},
                        label2id={str(v): i for i, v in enumerate(labels)}, **extra)
        except Exception as e:  # noqa: BLE001
            raise LorazooError(f"cannot load model {self.opts['model']!r}: {e}") from None
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = pad_id(self.tokenizer)  # sequence classifiers find the last token by it
        if getattr(model, "hf_quantizer", None) is not None:  # GGUF: dequantized to float32 on loading
            model.hf_quantizer.remove_quantization_config(model)
        return model.float().eval()

    # --- data ---------------------------------------------------------------------------------
    @functools.cached_property
    def _encoded(self) -> dict:
        """Token ids (and labels / loss starts) of every row of the training and evaluation tables."""
        return {id(t): self._encode(t) for t in (self.train_table, self.eval_table) if t is not None}

    def _encode(self, table: dict) -> tuple[list, list]:
        tok, n = self.tokenizer, self.max_tokens
        if self.opts["task_type"] == "classification":
            texts = [str(t) for t in table[self.opts["text_column"]]]
            ids = tok(texts, truncation=True, max_length=n)["input_ids"]
            return ids, [self.label_ids[v] for v in table[self.opts["label_column"]]]
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        if self.opts["prompt_column"] is None:
            texts = [str(t) for t in table[self.opts["text_column"]]]
            ids = [(x + eos)[:n] for x in tok(texts)["input_ids"]]
            return [[] for _ in ids], ids
        prompts = tok([str(t) for t in table[self.opts["prompt_column"]]])["input_ids"]
        answers = tok([str(t) for t in table[self.opts["response_column"]]], add_special_tokens=False)["input_ids"]
        out_p, out_a = [], []
        for p, a in zip(prompts, answers):
            a = a + eos
            keep_a = min(len(a), max(n - len(p), n // 2))
            a = a[:keep_a]
            p = p[len(p) - (n - len(a)):] if len(p) + len(a) > n else p
            out_p.append(p)
            out_a.append(a)
        return out_p, out_a

    def _batches(self, table: dict, idx: list[int], batch_size: int) -> list[dict]:
        first, second = self._encoded[id(table)]
        pad = pad_id(self.tokenizer)
        if self.opts["task_type"] == "classification":
            return [collate([first[i] for i in idx[s:s + batch_size]],
                            torch.tensor([second[i] for i in idx[s:s + batch_size]], dtype=torch.long), pad)
                    for s in range(0, len(idx), batch_size)]
        return [lm_batch([first[i] for i in idx[s:s + batch_size]], [second[i] for i in idx[s:s + batch_size]], pad)
                for s in range(0, len(idx), batch_size)]

    def train_batches(self, batch_size: int, epoch: int = 0) -> list[dict]:
        check_batch_size(batch_size)
        if self.train_table is None:
            raise LorazooError("this own-data task was built without training data (--data)")
        return self._batches(self.train_table, shuffled(self._train_idx, self.seed, epoch).tolist(), batch_size)

    def evaluate(self, model: nn.Module) -> dict:
        table, idx = self._test
        first, second = self._encoded[id(table)]
        lm = self.opts["task_type"] == "causal-lm"
        order = sorted(idx.tolist(), key=lambda i: len(first[i]) + (len(second[i]) if lm else 0))  # pad least
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.opts["task_type"] == "classification":
                    return self._evaluate_classifier(model, table, order)
                return self._evaluate_lm(model, table, order)
        finally:
            model.train(was_training)

    def _evaluate_classifier(self, model, table, order) -> dict:
        preds, golds, loss_sum = [], [], 0.0
        for batch in self._batches(table, order, int(self.opts["eval_batch_size"])):
            out = model(**batch)
            preds.append(out.logits.argmax(-1))
            golds.append(batch["labels"])
            loss_sum += float(out.loss) * len(batch["labels"])
        pred, gold = torch.cat(preds), torch.cat(golds)
        return {"accuracy": float((pred == gold).float().mean()),
                "macro_f1": macro_f1(pred, gold, len(self.opts["labels"])), "loss": loss_sum / len(order)}

    def _evaluate_lm(self, model, table, order) -> dict:
        loss_sum, correct, tokens = 0.0, 0, 0
        for batch in self._batches(table, order, int(self.opts["eval_batch_size"])):
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            gold = labels[:, 1:]
            keep = gold != -100
            if not keep.any():
                continue
            loss_sum += float(nn.functional.cross_entropy(logits[keep], gold[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == gold[keep]).sum())
            tokens += int(keep.sum())
        if tokens == 0:
            raise LorazooError("the evaluation data has no response tokens to score")
        loss = loss_sum / tokens
        return {"token_accuracy": correct / tokens, "loss": loss, "perplexity": math.exp(min(loss, 700.0))}
