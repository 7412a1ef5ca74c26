"""``load_peft(model, DIR)``: put an adapter saved by PEFT onto a model as a lorazoo adapter.

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (never ``adapter_model.bin``, a
pickle) and maps them as the table in ``lorazoo.peft_format`` says; the model then computes what
``PeftModel.from_pretrained(model, DIR)`` computes. Every check runs before the model changes, and
a failure while filling the tensors deletes the adapter again: no half-wrapped layers.

Supported (anything else is refused, naming the option):

- LORA: LoRA, rsLoRA (``use_rslora``), DoRA (``use_dora``), on Linear, HF Conv1D, Conv2d and
  Embedding layers; ``rank_pattern`` and ``alpha_pattern``; ``lora_dropout`` (as ``dropout``);
  ``modules_to_save``; ``init_lora_weights`` True, False, "gaussian" or "eva" (the file holds
  the trained factors), "pissa" and "olora" as PEFT saves them without conversion: PEFT then
  recomputes the residual base from the model it loads onto, and so does lorazoo (its PiSSA or
  OLoRA init on the given weights, then the file's factors); PEFT's converted form
  (``path_initial_model_for_weight_conversion``: rank 2r, ``init_lora_weights`` True) is plain
  LoRA on the original base. Refused: randomized PiSSA ("pissa_niter_*", not reproducible), CorDA,
  LoftQ, LoRA-GA and other inits that change the base, ``bias`` other than "none", ``lora_bias``,
  trainable tokens, layer replication, ``target_parameters``, ``ensure_weight_tying`` on tied
  layers, and every other non-default option lorazoo does not know.
- ADALORA: form and schedule "adalora", scale "adalora" (alpha/(init_r + 1e-5), PEFT's
  lora_alpha/(ranknum + 1e-5)); a saved ``rank_pattern`` (PEFT's pruned, resized layers) loads as
  the full init_r with the pruned triplets masked.
- LOHA, LOKR: linear layers (conv and ``use_effective_conv2d`` refused); LoKr's ``decompose_both``
  (a factorized small factor) refused. Where PEFT keeps LoKr's large factor dense but lorazoo
  would factor it (their thresholds differ), it loads in lorazoo's dense mode.
- VERA: the shared ``vera_A``/``vera_B`` from the file, or, with ``save_projection=False``,
  regenerated from ``projection_prng_key`` exactly as PEFT does; scale "constant", alpha 1.
- HIRA, DELORA: nn.Linear layers; see ``lorazoo.peft_format`` for DeLoRA's mapping (PEFT's
  single normalized term; factor norms under PEFT's 1e-4 clamp are refused).
- RANDLORA: nn.Linear layers, the shared bases from the file (``save_projection=False`` refused:
  PEFT regenerates them with a half-precision Kaiming draw lorazoo does not reproduce; ``sparse``
  and ``very_sparse`` only shape that draw, so a file holding the bases loads whatever they say);
  every layer must have the same number of bases n (see ``lorazoo.peft_format``); scale
  "constant", alpha 1, PEFT's randlora_alpha/r·√n folded into γ.
- VBLORA: nn.Linear layers, the shared vector bank and the logits as they are; scale "constant",
  alpha 1 (PEFT has none). ``save_only_topk_weights=True`` (integer top-k indices, logits lost)
  is refused.
- Not read: the PEFT types lorazoo has no form for (IA3, OFT, BOFT, prompt tuning, ...).

``rank_dropout``/``module_dropout`` (LoHa, LoKr) mean something else than lorazoo's rank dropout;
they are refused unless named in ``drop_options`` (inference is unaffected by them).

Where PEFT's per-layer scale cannot be written with lorazoo's one alpha (an ``alpha_pattern``, LoKr
in dense mode at another rank), the ratio is folded into the output-side factor (B, B1, P, λ or b):
the model computes the same, but further training moves that layer at a slightly different rate.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .adapt import _shape
from .embedding import tied_paths
from .forms.lokr import kron_shapes
from .errors import LoadError, LorazooError
from .handle import AdapterHandle, handles_of
from .io import adapt_then_fill
from .peft_format import (CONFIG, DELORA_FLOOR, PREFIX, TENSORS, module_kind, pattern_key, peft_lokr_dense_w2,
                          peft_lokr_shapes, randlora_common_n, randlora_peft_columns)
from .spec import AdapterSpec
from .targets import candidate_layers

_META = {"peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
         "task_type", "megatron_core", "qalora_group_size"}
_COMMON = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "r",
           "rank_pattern", "alpha_pattern"}
_HANDLED = {
    "LORA": {"lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "fan_in_fan_out", "bias",
             "ensure_weight_tying", "eva_config"},
    "ADALORA": {"lora_alpha", "lora_dropout", "init_lora_weights", "fan_in_fan_out", "bias", "target_r", "init_r",
                "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step", "ensure_weight_tying"},
    "LOHA": {"alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"},
    "LOKR": {"alpha", "rank_dropout", "module_dropout", "rank_dropout_scale", "use_effective_conv2d", "init_weights",
             "decompose_both", "decompose_factor"},
    "VERA": {"d_initial", "projection_prng_key", "save_projection", "vera_dropout", "fan_in_fan_out", "bias",
             "init_weights"},
    "HIRA": {"hira_dropout", "fan_in_fan_out", "init_weights"},
    "DELORA": {"delora_lambda", "module_dropout", "bias", "init_weights", "lambda_pattern"},
    "RANDLORA": {"projection_prng_key", "save_projection", "sparse", "very_sparse", "randlora_dropout",
                 "fan_in_fan_out", "randlora_alpha", "bias", "init_weights"},
    "VBLORA": {"num_vectors", "vector_length", "topk", "vblora_dropout", "init_logits_std", "init_vector_bank_bound",
               "fan_in_fan_out", "bias"},
}
_PLAIN_INITS = (True, False, "gaussian", "eva")
_SHIFT_INITS = ("pissa", "olora")


def _empty(v) -> bool:
    return v is None or v is False or v == 0 or v == "" or (isinstance(v, (list, dict)) and not v)


def read_peft(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's config and tensors from the folder ``path``, checked: JSON, safetensors, float, finite."""
    path = Path(path)
    cfile, tfile = path / CONFIG, path / TENSORS
    if not cfile.is_file():
        raise LoadError(f"{str(path)!r} holds no {CONFIG}; is it a folder written by PEFT's save_pretrained()?")
    try:
        config = json.loads(cfile.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise LoadError(f"{cfile} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise LoadError(f"{cfile} is not a PEFT adapter config (no 'peft_type')")
    if config.get("peft_type") == "VBLORA" and config.get("save_only_topk_weights"):
        raise LoadError(f"{cfile}: VB-LoRA saved with save_only_topk_weights=True keeps only integer top-k indices "
                        f"and weights, not the logits lorazoo's VB-LoRA holds; save the PEFT adapter with "
                        f"save_only_topk_weights=False")
    if "lorazoo_version" in config:
        raise LoadError(f"{str(path)!r} holds a lorazoo adapter, not a PEFT one; load it with lorazoo.load()")
    if not tfile.is_file():
        bin_ = " (it has adapter_model.bin, a pickle, which lorazoo never reads: convert it to safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise LoadError(f"{str(path)!r} has no {TENSORS}{bin_}")
    try:
        tensors = load_file(str(tfile))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"{tfile} is truncated or corrupt ({e})") from None
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise LoadError(f"tensor {k} in {tfile} is {t.dtype}; adapters hold floating-point tensors only")
        if not torch.isfinite(t).all():
            raise LoadError(f"tensor {k} in {tfile} holds NaN or infinite values")
    return config, tensors


def _check_options(config: dict, kind: str, drop_options) -> None:
    known = _META | _COMMON | _HANDLED[kind]
    bad = sorted(k for k, v in config.items() if k not in known and not _empty(v))
    if bad:
        raise LoadError(f"PEFT option(s) {', '.join(f'{k}={config[k]!r}' for k in bad)} of this {kind} adapter have "
                        f"no lorazoo equivalent; lorazoo cannot load it")
    if config.get("bias", "none") != "none":
        raise LoadError(f"PEFT option bias={config['bias']!r} (trained biases) has no lorazoo equivalent; "
                        f"lorazoo loads adapters saved with bias='none'")
    for k in ("rank_dropout", "module_dropout"):
        if kind == "DELORA":
            break  # DeLoRA's module_dropout is dropout on the input, lorazoo's ``dropout``
        if not _empty(config.get(k)) and k not in drop_options:
            raise LoadError(f"PEFT option {k}={config[k]!r} ({kind}'s dropout of weight rows / whole modules) has no "
                            f"lorazoo equivalent; pass drop_options=({k!r},) to load without it (inference is the same)")
    if config.get("use_effective_conv2d"):
        raise LoadError(f"PEFT option use_effective_conv2d=True ({kind} on convolutions) has no lorazoo equivalent")


def _peft_targets(model: nn.Module, config: dict, layers: dict) -> set[str] | None:
    """The layers PEFT's target matching picks among ``layers``; None for "all-linear" (not checked)."""
    tm = config.get("target_modules")
    if tm is None or tm == "all-linear":
        return None
    ex = config.get("exclude_modules")
    saved = config.get("modules_to_save") or []
    idx = config.get("layers_to_transform")
    idx = [idx] if isinstance(idx, int) else idx
    pats = config.get("layers_pattern")
    pats = [pats] if isinstance(pats, str) else pats
    out = set()
    for key in layers:
        if ex and ((isinstance(ex, str) and re.fullmatch(ex, key)) or
                   (not isinstance(ex, str) and (key in ex or any(key.endswith("." + e) for e in ex)))):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in saved):
            continue
        if isinstance(tm, str):
            found = re.fullmatch(tm, key) is not None
        else:
            found = key in tm or any(key.endswith("." + t) for t in tm)
            if found and idx:
                ms = [re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)] if not pats else \
                    [re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key) for p in pats]
                m = next((m for m in ms if m), None)
                found = m is not None and int(m.group("idx")) in idx
        if found:
            out.add(key)
    return out


_SUFFIXES = {
    "LORA": ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"),
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
    "HIRA": ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"),
    "DELORA": ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
    "RANDLORA": ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"),
    "VBLORA": ("vblora_logits_A", "vblora_logits_B"),
}
_SHARED = {"VERA": ("vera_A", "vera_B"), "RANDLORA": ("randlora_A", "randlora_B"), "VBLORA": ("vblora_vector_bank",)}


def _split(tensors: dict, kind: str, model: nn.Module, config: dict):
    """File tensors -> ({layer path: {suffix: tensor}}, {saved module path: state}, vera bank)."""
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    rest, bank = {}, {}
    for k, t in tensors.items():
        if k.startswith("base_model.") and k[len("base_model."):] in _SHARED.get(kind, ()):
            bank[k[len("base_model."):]] = t
            continue
        if not k.startswith(PREFIX):
            raise LoadError(f"tensor {k!r} in the file is not under {PREFIX!r}; this is not a PEFT adapter file "
                            f"lorazoo can read")
        body = k[len(PREFIX):]
        for suf in _SUFFIXES[kind]:
            if body.endswith("." + suf):
                per_layer.setdefault(body[: -len(suf) - 1], {})[suf] = t
                break
        else:
            rest[body] = t
    modules = dict(model.named_modules())
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for entry in config.get("modules_to_save") or []:
        for n in modules:
            if n and (n == entry or n.endswith("." + entry)):
                state = {k[len(n) + 1:]: v for k, v in rest.items() if k.startswith(n + ".")}
                if not state:
                    raise LoadError(f"the config saves module {n!r} in full (modules_to_save) but the file has "
                                    f"no tensors for it")
                saved[n] = state
    left = [k for k in rest if not any(k.startswith(n + ".") for n in saved)]
    if left:
        raise LoadError(f"the file holds tensor(s) {', '.join(PREFIX + k for k in left[:3])} that are no "
                        f"{kind} adapter tensor and belong to no module in modules_to_save")
    for n, state in saved.items():
        own = {k: v.shape for k, v in modules[n].state_dict().items()}
        if set(own) != set(state) or any(tuple(state[k].shape) != tuple(s) for k, s in own.items()):
            raise LoadError(f"the saved copy of {n!r} (modules_to_save) does not fit the model's module: file "
                            f"{ {k: tuple(v.shape) for k, v in state.items()} }, model "
                            f"{ {k: tuple(s) for k, s in own.items()} }")
    return per_layer, saved, bank


def _need(path: str, got: dict, want: dict[str, tuple]) -> None:
    """Refuse unless the layer's tensors are exactly ``want`` (suffix -> shape)."""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if missing or extra:
        raise LoadError(f"layer {path!r}: the file {'lacks ' + ', '.join(missing) if missing else ''}"
                        f"{' and ' if missing and extra else ''}{'has unexpected ' + ', '.join(extra) if extra else ''}"
                        f"; the file is damaged or made by a PEFT option lorazoo does not support")
    for k, shape in want.items():
        if tuple(got[k].shape) != tuple(shape):
            raise LoadError(f"tensor {PREFIX}{path}.{k} has shape {tuple(got[k].shape)} but the model's layer needs "
                            f"{tuple(shape)}; the adapter was made for another model or its config does not match "
                            f"its tensors")


def _rank_of(config: dict, path: str, default: int) -> int:
    key = pattern_key(list((config.get("rank_pattern") or {}).keys()), path)
    return int(config["rank_pattern"][key]) if key is not None else default


def _alpha_of(config: dict, path: str, default: float) -> float:
    key = pattern_key(list((config.get("alpha_pattern") or {}).keys()), path)
    return float(config["alpha_pattern"][key]) if key is not None else default


def load_peft(model: nn.Module, path, name: str | None = None, *, drop_options=()) -> AdapterHandle:
    """Load the PEFT adapter in folder ``path`` onto ``model`` as lorazoo adapter ``name`` ("default").

    The model then computes what ``PeftModel.from_pretrained(model, path)`` does (see the module
    docstring for what is supported). Every check runs before the model changes; on any error it
    is left as it was. ``drop_options`` names PEFT training-time options (LoHa's and LoKr's
    ``rank_dropout``, ``module_dropout``) to accept and drop.
    """
    config, tensors = read_peft(path)
    name = name or "default"
    if name in handles_of(model):
        raise LoadError(f"model already has an adapter named {name!r}; pass name=... to load it under another")
    kind = config["peft_type"]
    if kind not in _HANDLED:
        raise LoadError(f"PEFT adapter type {kind!r} is not read by lorazoo (no lorazoo equivalent); lorazoo "
                        f"loads {', '.join(sorted(_HANDLED))}")
    _check_options(config, kind, drop_options)
    per_layer, saved, bank = _split(tensors, kind, model, config)
    if not per_layer:
        raise LoadError(f"the file holds no {kind} adapter tensors")
    layers = candidate_layers(model)
    missing = [p for p in per_layer if p not in layers]
    modules = dict(model.named_modules())
    odd = [f"{p} ({type(modules[p]).__name__})" for p in missing if p in modules]
    if odd:
        raise LoadError(f"lorazoo cannot adapt layer(s) {', '.join(odd[:5])} that this PEFT adapter targets; it "
                        f"adapts nn.Linear, HF Conv1D, nn.Conv2d and nn.Embedding layers")
    if missing:
        raise LoadError(f"the model has no layer(s) {', '.join(missing[:5])} that this PEFT adapter was made for; "
                        f"load it onto the base model it was trained on")
    picked = _peft_targets(model, config, layers)
    if picked is not None:
        lacking = sorted(picked - set(per_layer))
        if lacking:
            raise LoadError(f"the config's target_modules {config.get('target_modules')!r} select layer(s) "
                            f"{', '.join(lacking[:5])} for which the file has no tensors: missing keys (damaged file, "
                            f"or a config for another model)")
        unasked = sorted(set(per_layer) - picked)
        if unasked:
            raise LoadError(f"the file has tensors for layer(s) {', '.join(unasked[:5])} that its config's "
                            f"target_modules {config.get('target_modules')!r} do not select; config and tensors do "
                            f"not match")
    targets = {p: layers[p] for p in per_layer}
    bases = {p: getattr(m, "base", m) for p, m in targets.items()}
    if config.get("ensure_weight_tying") and tied_paths(model, targets):
        raise LoadError("PEFT option ensure_weight_tying=True (the adapter shared by tied embeddings and head) has "
                        "no lorazoo equivalent")
    build = {"LORA": _lora, "ADALORA": _adalora, "LOHA": _loha, "LOKR": _lokr, "VERA": _vera, "HIRA": _hira,
             "DELORA": _delora, "RANDLORA": _randlora, "VBLORA": _vblora}[kind]
    spec_kw, ranks, fill, initialize = build(config, per_layer, bases, bank)
    spec_kw.update(targets=sorted(per_layer), modules_to_save=sorted(saved))
    try:
        spec = AdapterSpec(**spec_kw)
    except LorazooError as e:
        raise LoadError(f"the PEFT adapter maps to a lorazoo spec that is not valid: {e}") from None

    @torch.no_grad()
    def fill_all(handle):
        for p, layer in handle.layers().items():
            fill(p, layer.adapters[name].form)
        for p, mod in handle.saved_modules().items():
            mod.load_state_dict(saved[p])

    return adapt_then_fill(model, spec, fill_all, name=name, ranks=ranks, initialize=initialize,
                           misfit="the PEFT adapter does not fit this model",
                           broken="the PEFT adapter's tensors do not fit")


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src.reshape(dst.shape).to(dst))


def _lora(config, per_layer, bases, bank):
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith("pissa_niter"):
        raise LoadError(f"init_lora_weights={init!r}: PEFT recomputes the residual base with a randomized SVD on "
                        f"load, which cannot be reproduced; save the PEFT adapter in its converted form "
                        f"(path_initial_model_for_weight_conversion) and load that")
    if init not in _PLAIN_INITS and init not in _SHIFT_INITS:
        raise LoadError(f"init_lora_weights={init!r} changes the base model in a way lorazoo does not reproduce on "
                        f"load; supported: {', '.join(map(repr, _PLAIN_INITS + _SHIFT_INITS))}")
    dora, rs = bool(config.get("use_dora")), bool(config.get("use_rslora"))
    r0, alpha = int(config["r"]), float(config["lora_alpha"])
    ranks, scales = {}, {}
    for p, got in per_layer.items():
        base = bases[p]
        r = _rank_of(config, p, r0)
        fin, fout = _shape(base)
        what = module_kind(base)
        if what == "embedding":
            want = {"lora_embedding_A": (r, fin), "lora_embedding_B": (fout, r)}
        elif what == "conv":
            want = {"lora_A.weight": (r, *base.weight.shape[1:]), "lora_B.weight": (fout, r, 1, 1)}
        else:
            want = {"lora_A.weight": (r, fin), "lora_B.weight": (fout, r)}
        if dora:
            want["lora_magnitude_vector"] = (1, fout, 1, 1) if what == "conv" else (fout,)
        _need(p, got, want)
        ranks[p] = r
        a = _alpha_of(config, p, alpha)
        scales[p] = a / math.sqrt(r) if rs else a / r
    spec_kw = dict(form="dora" if dora else "lora", init=init if init in _SHIFT_INITS else "default",
                   scale="rslora" if rs else "lora", rank=r0, alpha=alpha, dropout=float(config.get("lora_dropout", 0)))

    def fill(p, form):
        got = per_layer[p]
        A = got.get("lora_A.weight", got.get("lora_embedding_A"))
        B = got.get("lora_B.weight", got.get("lora_embedding_B"))
        _copy(form.A, A.reshape(A.shape[0], -1))
        _copy(form.B, B.reshape(B.shape[0], -1) * (scales[p] / form.scale))
        if dora:
            _copy(form.m, got["lora_magnitude_vector"].reshape(-1))

    return spec_kw, ranks, fill, init in _SHIFT_INITS


def _adalora(config, per_layer, bases, bank):
    init_r = int(config.get("init_r") or config["r"])
    alpha = float(config.get("lora_alpha") or 0) or float(init_r)  # PEFT: lora_alpha if > 0 else r
    pattern = config.get("rank_pattern") or {}
    masks = {}
    for p, got in per_layer.items():
        key = next((k for k in pattern if k.removesuffix(".default").removesuffix(".lora_E") == p), None)
        keep = [bool(v) for v in pattern[key]] if key is not None else [True] * init_r
        if len(keep) != init_r:
            raise LoadError(f"rank_pattern for {p!r} has {len(keep)} entries; init_r is {init_r}")
        masks[p] = torch.tensor(keep)
        k = sum(keep)
        fin, fout = _shape(bases[p])
        _need(p, got, {"lora_A": (k, fin), "lora_B": (fout, k), "lora_E": (k, 1)})
    total = config.get("total_step")
    opts = dict(adalora_target_rank=min(int(config.get("target_r") or init_r), init_r),
                adalora_beta1=float(config.get("beta1", 0.85)), adalora_beta2=float(config.get("beta2", 0.85)),
                adalora_orth_reg=float(config.get("orth_reg_weight", 0.5)),
                adalora_interval=int(config.get("deltaT") or 1))
    if total:
        opts.update(adalora_total_steps=int(total), adalora_warmup_steps=int(config.get("tinit") or 0),
                    adalora_final_steps=int(config.get("tfinal") or 0))
    spec_kw = dict(form="adalora", schedule="adalora", scale="adalora", rank=init_r, alpha=alpha,
                   dropout=float(config.get("lora_dropout", 0)), **opts)

    def fill(p, form):
        got, keep = per_layer[p], masks[p]
        form.Q.zero_()
        form.P.zero_()
        form.lam.zero_()
        form.Q[keep] = got["lora_A"].to(form.Q)
        form.P[:, keep] = got["lora_B"].to(form.P)
        form.lam[keep] = got["lora_E"][:, 0].to(form.lam) * (alpha / (init_r + 1e-5) / form.scale)
        form.rank_mask.copy_(keep.to(form.rank_mask))

    return spec_kw, {p: init_r for p in per_layer}, fill, False


def _linear_only(kind, bases):
    convs = [p for p, b in bases.items() if module_kind(b) != "linear"]
    if convs:
        raise LoadError(f"PEFT {kind} on non-linear layers ({', '.join(convs[:3])}) is not supported by lorazoo's "
                        f"loader")


def _loha(config, per_layer, bases, bank):
    _linear_only("LOHA", bases)
    r0, alpha = int(config["r"]), float(config["alpha"])
    ranks, scales = {}, {}
    for p, got in per_layer.items():
        r = _rank_of(config, p, r0)
        fin, fout = _shape(bases[p])
        _need(p, got, {"hada_w1_a": (fout, r), "hada_w1_b": (r, fin), "hada_w2_a": (fout, r), "hada_w2_b": (r, fin)})
        ranks[p], scales[p] = r, _alpha_of(config, p, alpha) / r

    def fill(p, form):
        got = per_layer[p]
        _copy(form.B1, got["hada_w1_a"] * (scales[p] / form.scale))
        _copy(form.A1, got["hada_w1_b"])
        _copy(form.B2, got["hada_w2_a"])
        _copy(form.A2, got["hada_w2_b"])

    return dict(form="loha", rank=r0, alpha=alpha), ranks, fill, False


def _lokr(config, per_layer, bases, bank):
    _linear_only("LOKR", bases)
    r0, alpha = int(config["r"]), float(config["alpha"])
    f = int(config.get("decompose_factor", -1))
    ranks, scales, dense = {}, {}, {}
    for p, got in per_layer.items():
        if "lokr_w1_a" in got or "lokr_t2" in got:
            raise LoadError(f"layer {p!r} has a factorized small LoKr factor (decompose_both) or a CP core "
                            f"(lokr_t2); lorazoo's LoKr keeps the small factor dense")
        r = _rank_of(config, p, r0)
        fin, fout = _shape(bases[p])
        w1, w2 = peft_lokr_shapes(fin, fout, f)
        if (w1, w2) != kron_shapes(fin, fout, f):
            raise LoadError(f"decompose_factor={f} splits layer {p!r} as {w1} x {w2} in PEFT but differently in "
                            f"lorazoo (which sorts the factors); lorazoo cannot load it")
        want = {"lokr_w1": w1}
        if peft_lokr_dense_w2(r, w2):
            want["lokr_w2"] = w2
        else:
            want.update(lokr_w2_a=(w2[0], r), lokr_w2_b=(r, w2[1]))
        _need(p, got, want)
        full = min(w2)
        dense[p] = "lokr_w2" in want or r >= full
        ranks[p] = full if dense[p] else r  # lorazoo keeps C dense at rank min(C's shape)
        scales[p] = _alpha_of(config, p, alpha) / r

    def fill(p, form):
        got = per_layer[p]
        _copy(form.P, got["lokr_w1"] * (scales[p] / form.scale))
        C = got["lokr_w2"] if "lokr_w2" in got else got["lokr_w2_a"] @ got["lokr_w2_b"]
        if form.dense:
            _copy(form.C, C)
        else:
            _copy(form.B, got["lokr_w2_a"])
            _copy(form.A, got["lokr_w2_b"])

    return dict(form="lokr", rank=r0, alpha=alpha, lokr_factor=f), ranks, fill, False


def _vera(config, per_layer, bases, bank):
    _linear_only("VERA", bases)
    r = int(config["r"])
    if config.get("rank_pattern"):
        raise LoadError("PEFT option rank_pattern on VeRA has no lorazoo equivalent (one shared rank)")
    shapes = {p: _shape(b) for p, b in bases.items()}
    max_in, max_out = max(s[0] for s in shapes.values()), max(s[1] for s in shapes.values())
    for p, got in per_layer.items():
        _need(p, got, {"vera_lambda_b": (shapes[p][1],), "vera_lambda_d": (r,)})
    if config.get("save_projection", True) or bank:
        if set(bank) != {"vera_A", "vera_B"}:
            raise LoadError("the VeRA config has save_projection=True but the file lacks base_model.vera_A or vera_B")
        A, B = bank["vera_A"], bank["vera_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r or A.shape[1] < max_in or \
                B.shape[0] < max_out:
            raise LoadError(f"the shared VeRA projections have shapes {tuple(A.shape)}, {tuple(B.shape)}; the "
                            f"targets need at least ({r}, {max_in}) and ({max_out}, {r})")
    seed = int(config.get("projection_prng_key", 0))
    spec_kw = dict(form="vera", scale="constant", alpha=1, rank=r, seed=seed,
                   vera_d_init=float(config.get("d_initial", 0.1)), dropout=float(config.get("vera_dropout", 0)))

    def fill(p, form):
        got = per_layer[p]
        _copy(form.d, got["vera_lambda_d"])
        _copy(form.b, got["vera_lambda_b"] / form.scale)
        if bank:
            form.bank.A.copy_(bank["vera_A"][:, :form.bank.A.shape[1]].to(form.bank.A))
            form.bank.B.copy_(bank["vera_B"][:form.bank.B.shape[0]].to(form.bank.B))

    return spec_kw, {p: r for p in per_layer}, fill, False


def _plain_linear(kind, bases):
    odd = [p for p, b in bases.items() if type(b) is not nn.Linear]
    if odd:
        raise LoadError(f"PEFT {kind} on layers other than nn.Linear ({', '.join(odd[:3])}) is not supported by "
                        f"lorazoo's loader")


def _hira(config, per_layer, bases, bank):
    _plain_linear("HIRA", bases)
    r0 = int(config["r"])
    ranks = {}
    for p, got in per_layer.items():
        # PEFT 0.21 builds every HiRA layer at the config's r whatever rank_pattern says: the file's rank
        r = got["hira_A"].shape[0] if "hira_A" in got and got["hira_A"].dim() == 2 else _rank_of(config, p, r0)
        fin, fout = _shape(bases[p])
        _need(p, got, {"hira_A": (r, fin), "hira_B": (fout, r)})
        ranks[p] = r

    def fill(p, form):
        _copy(form.A, per_layer[p]["hira_A"])
        _copy(form.B, per_layer[p]["hira_B"] / form.scale)

    return dict(form="hira", scale="constant", alpha=1, rank=r0,
                dropout=float(config.get("hira_dropout") or 0)), ranks, fill, False


def _delora(config, per_layer, bases, bank):
    _plain_linear("DELORA", bases)
    r0 = int(config["r"])
    ranks = {}
    for p, got in per_layer.items():
        r = _rank_of(config, p, r0)
        fin, fout = _shape(bases[p])
        _need(p, got, {"delora_A": (r, fin), "delora_B": (fout, r), "delora_lambda": (1,),
                       "delora_w_norm": (fin,)})
        low = min(torch.linalg.vector_norm(got["delora_A"], dim=1).min().item(),
                  torch.linalg.vector_norm(got["delora_B"], dim=0).min().item())
        if low < DELORA_FLOOR:
            raise LoadError(f"layer {p!r}: a DeLoRA factor has a row/column norm {low:.2e} below PEFT's clamp "
                            f"{DELORA_FLOOR} (an untrained B?), where PEFT's update differs from the paper's "
                            f"normalized one that lorazoo computes; lorazoo cannot load it")
        ranks[p] = r

    def fill(p, form):
        got = per_layer[p]
        _copy(form.A, got["delora_A"])
        _copy(form.B, got["delora_B"])
        _copy(form.lam, got["delora_lambda"])
        _copy(form.w_norm, got["delora_w_norm"])
        form.A0.copy_(form.A)
        form.B0.zero_()  # no frozen start term: PEFT's DeLoRA has none

    return dict(form="delora", rank=r0, delora_lambda=float(config.get("delora_lambda") or 8.0),
                dropout=float(config.get("module_dropout") or 0)), ranks, fill, False


def _randlora(config, per_layer, bases, bank):
    _plain_linear("RANDLORA", bases)
    if not config.get("save_projection", True):
        raise LoadError("PEFT option save_projection=False on RandLoRA: PEFT regenerates the shared bases from "
                        "projection_prng_key with a half-precision Kaiming draw that lorazoo does not reproduce; save "
                        "the PEFT adapter with save_projection=True")
    r = int(config["r"])
    shapes = {p: _shape(b) for p, b in bases.items()}
    max_in, max_out = max(s[0] for s in shapes.values()), max(s[1] for s in shapes.values())
    lo, hi = min(max_in, max_out), max(max_in, max_out)
    big = math.ceil(lo / r)
    if set(bank) != {"randlora_A", "randlora_B"}:
        raise LoadError("the RandLoRA file lacks base_model.randlora_A or base_model.randlora_B (the shared bases)")
    A, B = bank["randlora_A"], bank["randlora_B"]
    if tuple(A.shape) != (r, 1, lo) or tuple(B.shape) != (hi, big, r):
        raise LoadError(f"the shared RandLoRA bases have shapes {tuple(A.shape)}, {tuple(B.shape)}; these targets "
                        f"need {(r, 1, lo)} and {(hi, big, r)}")
    ns = {}
    for p, got in per_layer.items():
        m = min(shapes[p])
        ns[p] = math.ceil(m / r)
        _need(p, got, {"randlora_lambda": (r, ns[p]), "randlora_gamma": (ns[p], m), "randlora_A": (r, 1, lo),
                       "randlora_B": (hi, big, r)})
        if not (torch.equal(got["randlora_A"], A) and torch.equal(got["randlora_B"], B)):
            raise LoadError(f"layer {p!r}: its copy of the shared RandLoRA bases differs from base_model.randlora_A/B "
                            f"(PEFT keeps one tensor and would load whichever copy comes last); the file is damaged")
    n = randlora_common_n(ns, r, LoadError)
    alpha = float(config.get("randlora_alpha", 640))
    flat = B.reshape(hi, -1)
    lz = torch.empty_like(flat)
    lz[:, randlora_peft_columns(n, r, flat.shape[1])] = flat
    lz = lz.reshape(hi, big, r)

    def fill(p, form):
        got = per_layer[p]
        _copy(form.lam, got["randlora_lambda"].t())
        _copy(form.gam, got["randlora_gamma"] * (alpha / r * math.sqrt(form.n) / form.scale))
        form.bank.A.copy_(A[:, 0].to(form.bank.A))
        form.bank.B.copy_(lz.to(form.bank.B))

    return dict(form="randlora", scale="constant", alpha=1, rank=r, seed=int(config.get("projection_prng_key", 0)),
                dropout=float(config.get("randlora_dropout") or 0)), {p: r for p in per_layer}, fill, False


def _vblora(config, per_layer, bases, bank):
    _plain_linear("VBLORA", bases)
    r, h, b = int(config["r"]), int(config["num_vectors"]), int(config["vector_length"])
    if set(bank) != {"vblora_vector_bank"}:
        raise LoadError("the VB-LoRA file lacks base_model.vblora_vector_bank (the shared vector bank)")
    if tuple(bank["vblora_vector_bank"].shape) != (h, b):
        raise LoadError(f"the VB-LoRA vector bank has shape {tuple(bank['vblora_vector_bank'].shape)}; the config "
                        f"says num_vectors={h}, vector_length={b}")
    for p, got in per_layer.items():
        fin, fout = _shape(bases[p])
        if fin % b or fout % b:
            raise LoadError(f"layer {p!r} ({fin} -> {fout}) is not a multiple of vector_length={b}; PEFT's VB-LoRA "
                            f"refuses it too")
        _need(p, got, {"vblora_logits_A": (r, fin // b, h), "vblora_logits_B": (fout // b, r, h)})

    def fill(p, form):
        _copy(form.logits_A, per_layer[p]["vblora_logits_A"])
        _copy(form.logits_B, per_layer[p]["vblora_logits_B"])
        _copy(form.bank.vectors, bank["vblora_vector_bank"])

    return dict(form="vblora", scale="constant", alpha=1, rank=r, dropout=float(config.get("vblora_dropout") or 0),
                vblora_num_vectors=h, vblora_vector_length=b, vblora_topk=int(config.get("topk", 2)),
                vblora_logits_std=float(config.get("init_logits_std", 0.1)),
                vblora_bank_bound=float(config.get("init_vector_bank_bound", 0.02))), {p: r for p in per_layer}, \
        fill, False
