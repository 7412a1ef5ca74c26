"""The LoRA paper's baselines (Hu et al. 2021, Sec. 5.1), run through lorazoo's own harness.

Parameter selections (form ``selection``: no adapted layer, the chosen base parameters train in place):

- **FT** (``select_params="all"``): every parameter of the model trains.
- **FT-Top2** (``"top"``, ``select_top_blocks=2``; Li & Liang 2021): only the last two Transformer blocks
  (plus the task's fresh head, which ``run`` always saves).
- **BitFit** (``"bias"``; Zaken et al. 2021): only the bias vectors (of linears and of LayerNorms).

They reuse ``modules_to_save`` (lorazoo.saved): each selected module is replaced by a ``SavedModule``
holding the frozen original and the adapter's copy; the copy is what trains, what ``handle.save``
writes (under the module's own path) and what ``lorazoo.load`` fills; ``disabled()`` and ``delete()``
give the original back, so the generic contract (start as base, save/load, delete) holds unchanged.
The spec's parts name the modules through ``Part.select_saved`` (resolved on each ``adapt`` and
``load`` from the model, so the spec stays model-independent). Choices:

- FT selects the root's parameter-holding children (``bert``, ``classifier``; ``model``, ``lm_head``);
  a tied input embedding and output head stay tied in the copies (``saved.share_tied``), so FT on
  SmolLM2 trains the tied matrix once, as plain fine-tuning does. A full copy of the trained weights
  is kept beside the original (as PEFT's ``modules_to_save``): 2x weight memory, the price of
  ``disabled()``/``delete()``; the saved file holds every trained tensor (FT's "changed tensors" are
  all of them).
- FT-Top2's blocks are the model's block stack: the ``nn.ModuleList`` of at least two modules of one
  class holding the most parameters (BERT's ``encoder.layer``, Llama's ``model.layers``, GPT-2's
  ``h``). The pooler, the final norm and the head are not blocks: only the task's head trains with
  them (its ``modules_to_save``), the paper's "only the last two layers are tuned".
- BitFit's copy shares every non-bias parameter with the original (the same Parameter objects): one
  copy of the weights in memory, only the biases in the file. A model without biases (Llama/SmolLM2)
  is refused: BitFit would train nothing of the base.
- Merge is a no-op for a selection (there is no separate update: the trained copies are the model's
  weights); ``form.mergeable`` is True so the contract's merge check runs and sees the same output.

Bottleneck adapters (forms ``adapter_h``, ``adapter_l``) act on a linear's output y = W x + b, the
sublayer's output (the layer passes y with its bias to forms that are neither ``reads_output`` nor
``multiplicative``):

- **Adapter-H** (Houlsby et al. 2019, Eq. in Sec. 2.1 / Fig. 2): h = y + U·GELU(D y + b_D) + b_U after
  the attention output projection and after the FFN output projection of every block (preset targets:
  BERT ``attention.output.dense``/``output.dense``, Llama ``o_proj``/``down_proj``, GPT-2 ``c_proj``),
  and the model's layer norms train too (Houlsby Sec. 2.1; the LoRA paper's count 2·L_LN·d_model),
  ``adapter_h_norms=True``. Parameters per adapter 2·d·r + r + d (LoRA paper Sec. 5.1).
- **Adapter-L** (Lin et al. 2020, Eq. 1): h = y + U·ReLU(D·LN(y) + b_D) + b_U, only after the MLP
  (BERT ``layer.N.output.dense``, Llama ``mlp.down_proj``, GPT-2 ``mlp.c_proj``), its own LayerNorm
  (eps 1e-5) trained: 2·d·r + r + 3·d per adapter.
- Init: D Kaiming-uniform (as LoRA's A), U and both biases zero, so both start exactly as the base.
  Houlsby draws both D and U from a truncated N(0, 1e-3) (near identity, not exact); with U = 0 the
  start is exact and U's first gradient is not scaled down by a 1e-3 D.
- The adapter sits inside the projection, before the block's dropout (Houlsby: after it); identical
  at evaluation. ``rank`` is the bottleneck r (at most d); the scale s (preset: ``constant``, alpha 1,
  s = 1) multiplies U's branch. Not mergeable (the map is nonlinear in y): NotMergeableError.

Cost: two thin matmuls per token on the d-wide output, as LoRA's two on the input/output; Adapter-L adds
one LayerNorm over d. No (d, d) tensor is formed.

Prefix-embedding and prefix-layer tuning (PreEmbed, PreLayer) are in lorazoo.forms.prefix: they lengthen the
sequence, so they run on BERT-family encoders only (the mask is padded and the prefix positions are dropped
before the pooler), through the same ``modules_to_save`` mechanism with a copy of the base model the form
builds itself (``SavedModule.add`` with ``make_copy``); decoders are refused.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SpecError
from .parts import Form, check_choice, check_number
from .registry import FORMS

SELECTIONS = ("all", "top", "bias")


def _named_by(path: str, entries) -> bool:
    """``path`` is named by a modules_to_save entry (the entry is it, or its suffix after a dot)."""
    return any(path == e or path.endswith("." + e) for e in entries)


def _overlaps_saved(path: str, entries, modules) -> bool:
    """``path`` is, contains or sits inside a module named in ``entries`` (the task's head...)."""
    for n in modules:
        if n and _named_by(n, entries) and (n == path or n.startswith(path + ".") or path.startswith(n + ".")):
            return True
    return False


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the model's Transformer blocks: the ``nn.ModuleList`` of >= 2 modules of one class
    holding the most parameters; SpecError if there is none."""
    best, size = None, -1
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > size:
                best, size = (path, mod), n
    if best is None or size == 0:
        raise SpecError(f"{type(model).__name__} has no stack of blocks (an nn.ModuleList of layers of one class, "
                        f"as BERT's encoder.layer, Llama's model.layers or GPT-2's h): FT-Top2 needs one")
    return best


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm (torch's, or a Hugging Face class named so: LlamaRMSNorm, BertLayerNorm...)."""
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or name.endswith(
        ("LayerNorm", "RMSNorm"))


def _is_bias(key: str) -> bool:
    return key == "bias" or key.endswith(".bias")


class NoLayerForm(Form):
    """A form that adapts no layer: its part trains the modules ``select_saved`` names, wrapped like
    ``modules_to_save`` (selections here, prefix tuning in forms/prefix.py). ``trains`` says what."""

    adapts_layers = False
    has_rank = False
    trains = "base parameters"

    def __init__(self, *args, **kwargs):  # never built: adapt builds forms on adapted layers only
        raise SpecError(f"form '{self.part_name}' adapts no layer; it trains {self.trains}")

    @classmethod
    def check_spec(cls, spec):
        if spec.init != "default":
            raise SpecError(f"form '{spec.form}' adapts no layer ({cls.trains}): init {spec.init!r} has no "
                            f"factors to set (use init='default')")
        if spec.dropout > 0:
            raise SpecError(f"form '{spec.form}' has no adapter input to drop out (set dropout=0)")


@FORMS.register("selection", paper="LoRA (Hu et al., 2021) Sec. 5.1: FT; FT-Top2 (Li & Liang, 2021); "
                "BitFit (Zaken et al., 2021)",
                equations="no update form: W' = W with the selected base parameters trained in place",
                summary="a parameter selection: all parameters, the last k blocks, or the biases")
class Selection(NoLayerForm):
    """Trains a selection of the base model's own parameters; adapts no layer (see lorazoo.baselines)."""

    options = {"select_params": "all", "select_top_blocks": 2}
    trains = "base parameters as they are (lorazoo.baselines)"

    @classmethod
    def validate(cls, opts):
        check_choice("select_params", opts["select_params"], SELECTIONS)
        check_number("select_top_blocks", opts["select_top_blocks"], minimum=1, integer=True)


    @classmethod
    def select_saved(cls, model, spec):
        mode = spec.options["select_params"]
        modules = dict(model.named_modules())
        explicit = spec.modules_to_save  # the task's head: trained in full, never narrowed to its biases
        if mode == "top":
            path, blocks = block_stack(model)
            k = int(spec.options["select_top_blocks"])
            if k > len(blocks):
                raise SpecError(f"select_top_blocks={k} but {type(model).__name__} has {len(blocks)} blocks "
                                f"({path or 'the root'})")
            chosen = [f"{path}.{i}" if path else str(i) for i in range(len(blocks) - k, len(blocks))]
            return {p: None for p in chosen if not _overlaps_saved(p, explicit, modules)}
        if any(True for _ in model.named_parameters(recurse=False)):
            raise SpecError(f"{type(model).__name__} holds parameters at its root, which cannot be copied apart "
                            f"from the model; select its modules instead")
        children = [(n, m) for n, m in model.named_children()
                    if any(True for _ in m.parameters()) and not _overlaps_saved(n, explicit, modules)]
        if mode == "all":
            return {n: None for n, _ in children}
        chosen = {n: _is_bias for n, m in children if any(_is_bias(k) for k, _ in m.named_parameters())}
        if not chosen and not explicit:
            raise SpecError(f"BitFit trains bias vectors, and {type(model).__name__} has none (Llama-style models "
                            f"have no biases); use another method")
        if not chosen:
            raise SpecError(f"BitFit trains bias vectors, and {type(model).__name__} has none outside "
                            f"modules_to_save {list(explicit)}; use another method")
        return chosen


class _Bottleneck(Form):
    """h = y + s·(U f(D g(y) + b_D) + b_U) on a linear's output y (bias included); see lorazoo.baselines."""

    mergeable = False
    rank_bound = "nonlinear"
    layer_norm = False

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        super().__init__(in_features, out_features, rank, scale, opts, ctx)
        self.down = nn.Parameter(torch.empty(rank, out_features))
        self.down_bias = nn.Parameter(torch.empty(rank))
        self.up = nn.Parameter(torch.empty(out_features, rank))
        self.up_bias = nn.Parameter(torch.empty(out_features))
        if self.layer_norm:
            self.norm_weight = nn.Parameter(torch.empty(out_features))
            self.norm_bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        for p in (self.down_bias, self.up, self.up_bias):
            nn.init.zeros_(p)
        if self.layer_norm:
            nn.init.ones_(self.norm_weight)
            nn.init.zeros_(self.norm_bias)

    @classmethod
    def max_rank(cls, in_features, out_features):
        return out_features  # the bottleneck is narrower than the output it reads

    @staticmethod
    def act(h):
        raise NotImplementedError

    def forward(self, x, y, weight, mask=None):
        h = F.layer_norm(y, (self.out_features,), self.norm_weight, self.norm_bias, 1e-5) if self.layer_norm else y
        h = self.rank_masked(self.act(F.linear(h, self.down, self.down_bias)), mask)
        return y + F.linear(h * self.scale, self.up, self.up_bias * self.scale)


@FORMS.register("adapter_h", paper="Houlsby et al., 2019 (Adapter-H in LoRA Sec. 5.1)",
                equations="Houlsby Sec. 2.1: h = y + U·GELU(D y + b_D) + b_U after attention and FFN; "
                          "|Θ| = L_Adpt·(2·d·r + r + d) + 2·L_LN·d (LoRA Sec. 5.1)",
                summary="bottleneck adapter on a sublayer's output, layer norms trained")
class AdapterH(_Bottleneck):
    options = {"adapter_h_norms": True}

    @staticmethod
    def act(h):
        return F.gelu(h)

    @classmethod
    def validate(cls, opts):
        if not isinstance(opts["adapter_h_norms"], bool):
            raise SpecError(f"adapter_h_norms must be True or False, got {opts['adapter_h_norms']!r}")

    @classmethod
    def select_saved(cls, model, spec):
        """Every LayerNorm/RMSNorm of the model trains with the adapters (Houlsby Sec. 2.1)."""
        if not spec.options["adapter_h_norms"]:
            return None
        modules = dict(model.named_modules())
        return {p: None for p, m in modules.items()
                if p and is_norm(m) and not _overlaps_saved(p, spec.modules_to_save, modules)
                and not any(p.startswith(q + ".") for q, o in modules.items() if q and q != p and is_norm(o))}


@FORMS.register("adapter_l", paper="Lin et al., 2020 (Adapter-L in LoRA Sec. 5.1)",
                equations="Lin et al. Eq. 1: h = y + U·ReLU(D·LN(y) + b_D) + b_U after the MLP; "
                          "|Θ| = L·(2·d·r + r + d) + 2·L·d (LoRA Sec. 5.1)",
                summary="bottleneck adapter with its own LayerNorm after the MLP only")
class AdapterL(_Bottleneck):
    layer_norm = True

    @staticmethod
    def act(h):
        return F.relu(h)
