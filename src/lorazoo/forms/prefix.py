"""The LoRA paper's prefix baselines (Hu et al. 2021, Sec. 5.1), on BERT-family encoders.

- **PreEmbed** (form ``prefix_embed``): l_p trainable vectors are put in front of the sequence at the
  embedding level, "special tokens whose word embeddings are trainable"; |Θ| = d_model·(l_p + l_i).
- **PreLayer** (form ``prefix_layer``): as PreEmbed, and the activations of those positions after every
  Transformer block are replaced by trainable ones instead of being computed from the previous layer;
  |Θ| = L·d_model·(l_p + l_i).

Only the prefix is implemented (l_i = 0; the infix would need the task's own token layout), so
|Θ| = d·l_p and L·d·l_p exactly (tested). ``prefix_tokens`` = l_p defaults to the rows the paper reports in
its GPT-3 comparison (Table 4, whose configurations are Table 15's): PreEmbed l_p = 256 (3.2M, with l_i = 8)
and PreLayer l_p = 8 (20.2M with l_i = 8; Table 15's prefix-only row l_p = 8, l_i = 0 is 10.1M).

How it runs (transformers' BertModel, whose forward builds the attention mask from the embeddings' output and
the 2D mask, then runs the encoder and pools position 0):

1. the embeddings' output (word + position + token type, LayerNorm, dropout) gets the l_p vectors
   ``embeddings.prefix`` (l_p, d) in front: they are activations, so they bypass the position
   embeddings, LayerNorm and dropout, and the real tokens keep positions 0..T-1 ([CLS] keeps its position);
2. the 2D attention mask gets l_p ones in front (a forward pre-hook; an all-ones mask when none is given);
3. PreLayer: the output of block i (i = 0..L-2) has its first l_p positions replaced by
   ``encoder.layer.i.prefix`` (l_p, d); the block after it reads them as keys and values;
4. the encoder's output loses the l_p positions, so the pooler ([CLS] = position 0), the head and every
   caller see the original T positions.

Counting: PreLayer trains L tensors of (l_p, d): the embedding-level one (it is the input of block 0: the
"layer 0" of the formula) and the outputs of blocks 0..L-2. The last block's output at the prefix positions
is dropped in step 4 and read by nothing, so vectors there would never get a gradient; they are not made.
Hidden states a caller asks for (``output_hidden_states``) keep the l_p positions in front (with the
replaced values), except the last one, which transformers takes from the (stripped) output. The prefix
positions are never padding: padded real tokens stay masked.

Mechanism: the base model (``bert``) becomes a ``modules_to_save`` entry (lorazoo.saved) whose copy the form
builds itself (``SavedModule.add`` with a ``make_copy`` object): a shallow copy of the BertModel whose
embeddings, encoder (and, for PreLayer, blocks 0..L-2) are shallow copies too, sharing every base parameter
and buffer, holding the prefix parameters and the hooks above. The original module is untouched, so
``disabled()`` runs it (exactly the base), ``delete()`` drops the copy with every hook, ``handle.save`` writes
only the prefix tensors (``bert.embeddings.prefix``, ``bert.encoder.layer.<i>.prefix``) and ``lorazoo.load``
fills them. The task's head trains beside it (its own ``modules_to_save``), as for the other baselines.

Choices:

- Init: the paper gives none. The prefix starts as the base model's own activations (embedding output and
  every block's output) of l_p vocabulary tokens drawn with the spec's seed, run as one sequence: Li & Liang
  2021 (their initialization study, Sec. 7) found real words' activations better than random, and PEFT's
  prompt tuning has the same "sample the vocabulary" init (PromptTuningInit.SAMPLE_VOCAB). Prefix tuning does
  not start as the base model (the prefix is attended to from the first step): ``zero_init = False``, so the
  contract skips that check.
- Not mergeable: the prefix lengthens the sequence, no weight change gives the same function;
  ``handle.merge()`` raises NotMergeableError.
- Models: BERT-family encoders (``config.model_type`` "bert": BERT, MiniLM; "roberta", "xlm-roberta": their
  base models run as BertModel does, with positions counted from the padding index) reached as the base model
  of a task model (BertForSequenceClassification, RobertaForSequenceClassification...). Decoders (Llama, GPT-2, BertLMHeadModel) are refused before
  the model is changed: the prefix there shifts positions (RoPE, absolute), needs a causal mask over it and
  belongs in the generation KV cache, which this does not do. PEFT's prompt tuning is not the same
  function: it prepends to the raw word embeddings, before the position embeddings and LayerNorm, so the
  real tokens move to positions l_p.. ; it is not compared against.
- Cost: the sequence is T + l_p long in every block (attention grows as (T + l_p)²), which is the method, not
  the implementation (the hooks add one concatenation per block). Measured on a MiniLM-sized BERT (d 384,
  6 blocks), batch 8 of 48 tokens, one thread: PreEmbed (l_p = 256, 304 positions) 10.5x LoRA's training step,
  PreLayer (l_p = 8) 1.28x; activation memory grows as (T + l_p) / T in the same way.
- Second adapters: as for FT and BitFit, a second adapter that adapts no layer cannot be added once the encoder
  is wrapped (no unwrapped layer is left to fingerprint the base by); it is refused before any change.
"""
from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import nn

from ..errors import LorazooError, SpecError
from ..baselines import NoLayerForm
from ..parts import check_number
from ..registry import FORMS
from ..saved import SavedModule

_FAMILY = ("bert", "roberta", "xlm-roberta")  # config.model_type values whose base model runs as BertModel does
# (tested: BERT, MiniLM, RoBERTa, XLM-RoBERTa)


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing ``module``'s submodules, parameters and buffers, with its
    own registries (and its own copies of the hooks ``module`` has), so parameters, submodules and hooks added
    to it never reach ``module``."""
    dup = copy.copy(module)
    for key, value in vars(dup).items():
        if isinstance(value, (dict, set)):  # _parameters, _buffers, _modules, the hook dicts, non-persistent names
            dup.__dict__[key] = copy.copy(value)
    return dup


@functools.lru_cache(maxsize=None)
def _positional(cls) -> tuple[str, ...]:
    """The names of ``cls.forward``'s positional parameters after self (input_ids, attention_mask, ...)."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _pad_mask(module, args, kwargs):
    """Forward pre-hook on the base model's copy: l_p ones in front of the 2D attention mask."""
    n = module.embeddings.prefix.shape[0]
    kw = {**dict(zip(_positional(type(module)), args)), **kwargs}
    mask, ids, embeds = kw.get("attention_mask"), kw.get("input_ids"), kw.get("inputs_embeds")
    shape, device = (ids.shape[:2], ids.device) if ids is not None else (embeds.shape[:2], embeds.device)
    if mask is None:
        mask = torch.ones(shape, dtype=torch.long, device=device)
    if mask.dim() != 2:
        raise LorazooError(f"prefix tuning pads a 2D attention mask (batch, tokens) with its {n} positions; got a "
                           f"{mask.dim()}D mask")
    kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    return (), kw


def _prepend(module, args, output):
    """Forward hook on the embeddings' copy: the prefix vectors in front of the embedding output."""
    p = module.prefix.to(output.dtype)
    return torch.cat([p.expand(output.shape[0], -1, -1), output], dim=1)


def _replace(module, args, output):
    """Forward hook on block i's copy (PreLayer): its output at the prefix positions is the trained vectors."""
    h = output[0] if isinstance(output, tuple) else output
    p = module.prefix.to(h.dtype)
    h = torch.cat([p.expand(h.shape[0], -1, -1), h[:, p.shape[0]:]], dim=1)
    return (h, *output[1:]) if isinstance(output, tuple) else h


def _strip(n, module, args, output):
    """Forward hook on the encoder's copy: the prefix positions leave the encoder's output."""
    if isinstance(output, tuple):
        return (output[0][:, n:], *output[1:])
    output.last_hidden_state = output.last_hidden_state[:, n:]
    return output


def _base(model: nn.Module, form: str) -> tuple[str, nn.Module]:
    """(path, module) of the BERT-family encoder inside ``model``; SpecError for any other model."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    what = f"prefix tuning (form '{form}') is implemented for BERT-family encoders"
    name = f"{type(model).__name__}{f' ({kind})' if kind else ''}"
    if kind not in _FAMILY:
        raise SpecError(f"{what} (transformers models of type {', '.join(_FAMILY)}); {name} is not one. Decoders "
                        f"(Llama, GPT-2) would need the prefix in positions, a causal mask and the generation cache, "
                        f"which this does not do")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise SpecError(f"{what}; {name} is configured as a decoder (is_decoder / add_cross_attention), which "
                        f"would need the prefix in the causal mask and the generation cache")
    found = base
    if isinstance(base, SavedModule):  # another adapter saves it already (a second prefix, FT): its original
        base = base.original
    if not isinstance(base, nn.Module) or base is model:
        raise SpecError(f"{what} through their task model (BertForSequenceClassification...), whose base model "
                        f"'{prefix or 'bert'}' the prefix is put in; {type(model).__name__} has none")
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(getattr(base, "embeddings", None), nn.Module) or not isinstance(layers, nn.ModuleList):
        raise SpecError(f"{what}; {type(base).__name__} has no embeddings and encoder.layer stack as BertModel")
    if "forward" in vars(base):
        raise SpecError(f"{type(base).__name__}'s forward is replaced on the instance (a device-map or offload "
                        f"hook); prefix tuning needs the model's own forward")
    taken = [m for m in (base.embeddings, *layers) if hasattr(m, "prefix")]
    if taken:
        raise SpecError(f"{type(taken[0]).__name__} already has an attribute 'prefix', which prefix tuning uses")
    path = next(p for p, m in model.named_modules() if m is found)
    return path, base


class PrefixCopy:
    """What ``select_saved`` returns for the base model: ``SavedModule.add`` calls :meth:`make_copy`."""

    def __init__(self, tokens: int, per_layer: bool, seed: int):
        self.tokens, self.per_layer, self.seed = tokens, per_layer, seed

    @torch.no_grad()
    def initial(self, base: nn.Module) -> list[torch.Tensor]:
        """The base model's embedding output and block outputs (L + 1 tensors (l_p, d)) for l_p vocabulary
        tokens drawn with the spec's seed, run as sequences no longer than the position table allows."""
        g = torch.Generator().manual_seed(self.seed)
        config = base.config
        ids = torch.randint(config.vocab_size, (self.tokens,), generator=g)
        device = base.embeddings.word_embeddings.weight.device
        training = base.training
        base.eval()
        chunks = []
        # RoBERTa's positions start after its padding index: padding_idx + 1 of the table's rows are not positions
        longest = config.max_position_embeddings - (getattr(base.embeddings, "padding_idx", -1) + 1)
        try:  # the embeddings, then block by block (one unpadded sequence: no mask), as BertModel's forward
            for c in ids.split(longest):
                states = [base.embeddings(input_ids=c[None].to(device))]
                for block in base.encoder.layer:
                    out = block(states[-1], None)
                    states.append(out[0] if isinstance(out, tuple) else out)
                chunks.append(states)
        finally:
            base.train(training)
        return [torch.cat([c[i][0] for c in chunks]) for i in range(len(chunks[0]))]

    def make_copy(self, base: nn.Module) -> nn.Module:
        start = self.initial(base)
        dup = _shallow(base)
        emb = dup._modules["embeddings"] = _shallow(base.embeddings)
        emb.prefix = nn.Parameter(start[0].clone())
        emb.register_forward_hook(_prepend, prepend=True)  # before output recorders: they see the prefix
        enc = dup._modules["encoder"] = _shallow(base.encoder)
        enc.register_forward_hook(functools.partial(_strip, self.tokens))
        if self.per_layer:
            stack = enc._modules["layer"] = _shallow(base.encoder.layer)
            for i in range(len(stack) - 1):  # the last block's prefix outputs are stripped, read by nothing
                block = stack._modules[str(i)] = _shallow(base.encoder.layer[i])
                block.prefix = nn.Parameter(start[i + 1].clone())
                block.register_forward_hook(_replace, prepend=True)
        dup.register_forward_pre_hook(_pad_mask, with_kwargs=True)
        return dup


class _Prefix(NoLayerForm):
    """Trainable prefix activations on a BERT-family encoder; adapts no layer (module docstring)."""

    trains = "prefix activations (lorazoo.forms.prefix)"
    mergeable = False
    zero_init = False  # the prefix is attended to from the start (no paper claims a start at the base)
    rank_bound = "none"
    model_family = "BERT-family encoder"  # the generic contract's TinyNet is not one
    per_layer = False

    @classmethod
    def validate(cls, opts):
        check_number("prefix_tokens", opts["prefix_tokens"], minimum=1, integer=True, maximum=65536)

    @classmethod
    def select_saved(cls, model, spec):
        path, base = _base(model, spec.form)
        inside = [e for e in spec.modules_to_save if any(
            p == e or p.endswith("." + e) for p, _ in base.named_modules(prefix=path))]
        if inside:
            raise SpecError(f"modules_to_save {inside} lies inside {path!r}, which prefix tuning runs with its "
                            f"prefix; save modules outside it (the task's head)")
        return {path: PrefixCopy(int(spec.options["prefix_tokens"]), cls.per_layer, int(spec.seed))}


@FORMS.register("prefix_embed", paper="LoRA (Hu et al., 2021) Sec. 5.1: prefix-embedding tuning (PreEmbed)",
                equations="l_p trainable activations in front of the embedding output; |Θ| = d_model·l_p "
                          "(LoRA Sec. 5.1 with l_i = 0)",
                summary="trainable prefix vectors at the embedding level of a BERT-family encoder")
class PrefixEmbed(_Prefix):
    options = {"prefix_tokens": 256}


@FORMS.register("prefix_layer", paper="LoRA (Hu et al., 2021) Sec. 5.1: prefix-layer tuning (PreLayer)",
                equations="PreEmbed plus the prefix activations after every block replaced by trainable ones; "
                          "|Θ| = L·d_model·l_p (LoRA Sec. 5.1 with l_i = 0)",
                summary="trainable prefix activations at the embedding level and after every block")
class PrefixLayer(_Prefix):
    options = {"prefix_tokens": 8}
    per_layer = True
