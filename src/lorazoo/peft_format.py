"""PEFT's adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``): the names and
shapes both directions share, and the writer behind ``handle.save(path, format="peft")``.

The reader is ``lorazoo.peft_files.load_peft``. This module knows no ``adapt``, so ``handle`` can
import it. Never pickle: PEFT's ``adapter_model.bin`` is neither read nor written.

Tensor names are PEFT's, with ``base_model.model.`` before the module path:

=========  ======================================================================================
PEFT       lorazoo (form: tensors)
=========  ======================================================================================
LORA       lora: lora_A.weight = A (r, in), lora_B.weight = B (out, r); on an nn.Embedding
           lora_embedding_A = A (r, vocab), lora_embedding_B = B (dim, r); on a Conv2d A and B
           as (r, in, kh, kw) and (out, r, 1, 1). ``use_dora``: dora, lora_magnitude_vector = m
           ((1, out, 1, 1) on a conv). ``use_rslora``: scale "rslora".
ADALORA    adalora: lora_A = Q, lora_B = P, lora_E = λ ⊙ mask as (r, 1); scale "adalora".
LOHA       loha: hada_w1_a = B1, hada_w1_b = A1, hada_w2_a = B2, hada_w2_b = A2.
LOKR       lokr: lokr_w1 = P; lokr_w2 = C (dense), or lokr_w2_a = B, lokr_w2_b = A.
VERA       vera: base_model.vera_A / vera_B = the shared bank, vera_lambda_d = d, vera_lambda_b = b.
HIRA       hira: hira_A = A, hira_B = s·B (PEFT's HiRA has no scale). PEFT 0.21 builds every HiRA
           layer at the config's r (it ignores rank_pattern there): layers of lower rank are
           written zero-padded, and read at the rank their tensors have.
RANDLORA   randlora: randlora_lambda = λ^T (r, n), randlora_gamma = γ·(s/√n) (n, m) with randlora_alpha = r
           (PEFT's scale alpha/r = 1; it has no 1/√n); the shared bank as base_model.randlora_A =
           A as (r, 1, D_min) and randlora_B (D_max, N, r), also under every layer, as PEFT saves
           it. PEFT pairs column c of the flattened B (D_max, n·r) with A row c // n and γ row c % n,
           lorazoo with A row c % r and γ row c // r: B's first n·r columns are written permuted
           (PEFT column c = lorazoo column (c % n)·r + c // n). That permutation depends on
           n = ceil(min(in, out)/r), so every layer must have the same n (else refused, both ways);
           ``randlora_bound`` below a layer's min(in, out) (PEFT has no bound) is refused.
VBLORA     vblora: vblora_logits_A, vblora_logits_B as they are (same layout), base_model.
           vblora_vector_bank = bank·√s (PEFT's VB-LoRA has no scale; B and A are both linear in the
           bank, so this gives s·BA): one s > 0 for all layers, one rank, in and out multiples of
           ``vblora_vector_length`` (PEFT refuses others); ``save_only_topk_weights`` not read.
DELORA     delora: PEFT has one normalized term, lorazoo two (the trained one minus its frozen
           start): delora_A = [A; A0], delora_B = [B, -B0] at rank 2r and delora_lambda = 2λ (so
           that 2λ/2r = λ/r), delora_w_norm = Σ_W. Read back, B0 = 0 (a zero second term).
           PEFT clamps the factors' column/row norms at 1e-4 (lorazoo at 1e-12): a norm below
           1e-4 is refused in both directions.
=========  ======================================================================================

Writing (every check and every tensor is made before anything is written):
- PEFT's scale per layer is alpha/r (rsLoRA alpha/sqrt(r), AdaLoRA alpha/(r + 1e-5), VeRA none).
  Where lorazoo's scale differs (another scale part, a per-layer rank), the layer gets an
  ``alpha_pattern`` entry giving the same scale (LoRA, DoRA, LoHa, LoKr); AdaLoRA and VeRA, whose
  PEFT layers take no per-layer alpha, get the ratio folded into λ and b.
- A base shift (PiSSA's and OLoRA's residual, LoRA-GA's offset, ReLoRA's merges) is written as
  PEFT's own "converted" PiSSA form: the shift is appended to the LoRA factors as extra rank
  (lora_A = [A; shift_A], lora_B = [B, shift_B / s]), so the files load onto the original,
  unshifted base model; the layer's rank in ``rank_pattern`` includes it. Only LoRA and DoRA
  can carry a shift; another form with one is refused.
- ``modules_to_save`` are written under their own paths, as PEFT does.
- Training-time parts are not written (the optim part, rank dropout, ReLoRA's schedule): PEFT
  gets the adapter's function. AdaLoRA's budget schedule is written as PEFT's options
  (total_step from ``adalora_total_steps`` or ``handle.plan``; 1000 when neither is known).
- Other forms (MoSLoRA, MeLoRA, mixtures, ...) have no PEFT equivalent: the error names the form.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .conv import is_conv2d
from .embedding import is_embedding
from .errors import LorazooError
from .files import _atomic
from .forms.lokr import balanced_split
from .layer import is_conv1d

PREFIX = "base_model.model."
TENSORS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
KINDS = {"lora": "LORA", "dora": "LORA", "adalora": "ADALORA", "loha": "LOHA", "lokr": "LOKR", "vera": "VERA",
         "hira": "HIRA", "delora": "DELORA", "randlora": "RANDLORA", "vblora": "VBLORA"}
NOT_WRITTEN: dict[str, str] = {}  # forms PEFT has but lorazoo does not write yet (none left)
DELORA_FLOOR = 1e-4  # PEFT's clamp of DeLoRA's factor norms


def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's ``lokr.layer.factorization``: like LyCORIS's, but a positive ``factor`` dividing the
    dimension gives (factor, dimension/factor) unsorted."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return balanced_split(dimension, dimension if factor == -1 else factor)


def peft_lokr_shapes(fin: int, fout: int, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PEFT's LoKr (w1, w2) shapes for a linear (fin -> fout): ((out_l, in_m), (out_k, in_n))."""
    in_m, in_n = peft_factorization(fin, factor)
    out_l, out_k = peft_factorization(fout, factor)
    return (out_l, in_m), (out_k, in_n)


def peft_lokr_dense_w2(r: int, w2_shape: tuple[int, int]) -> bool:
    """PEFT keeps LoKr's large factor dense when r >= max(its shape) / 2 (its ``use_w2``)."""
    return r >= max(w2_shape) / 2


def module_kind(module) -> str:
    base = getattr(module, "base", module)
    return "embedding" if is_embedding(base) else "conv" if is_conv2d(base) else "linear"


def pattern_key(keys, path: str):
    """The first ``rank_pattern``/``alpha_pattern`` key that PEFT's ``get_pattern_key`` matches to ``path``."""
    for key in keys:
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return key
        except re.error:
            continue
    return None


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


@torch.no_grad()
def peft_state(handle) -> tuple[dict[str, torch.Tensor], dict]:
    """The PEFT tensors and config of ``handle``'s adapter, or a LorazooError saying why not."""
    spec, name = handle.spec, handle.name
    kind = KINDS.get(spec.form)
    if spec.form in NOT_WRITTEN:
        raise LorazooError(
            f"form '{spec.form}': PEFT has {NOT_WRITTEN[spec.form]}, but lorazoo does not write its adapters in that "
            f"format yet (the shared random bases are laid out and scaled differently); save this adapter in "
            f"lorazoo's format (format='lorazoo')")
    if kind is None:
        raise LorazooError(
            f"form '{spec.form}' has no PEFT equivalent that lorazoo writes (PEFT has LoRA, rsLoRA, DoRA, AdaLoRA, "
            f"LoHa, LoKr, VeRA, HiRA, DeLoRA, RandLoRA and VB-LoRA: forms {', '.join(sorted(KINDS))}); save this "
            f"adapter in lorazoo's format (format='lorazoo')")
    layers = handle.layers()
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    shifted = [p for p, l in layers.items() if l.adapters[name].shift_A.shape[0]]
    if shifted and kind != "LORA":
        raise LorazooError(
            f"adapter {name!r} (form '{spec.form}') has a base shift at {', '.join(shifted[:3])} (from init "
            f"'{spec.init}' or schedule '{spec.schedule}'); PEFT's {kind} format has no equivalent (only LoRA "
            f"and DoRA carry one, as extra rank); save it in lorazoo's format")
    convs = [p for p, l in layers.items() if module_kind(l) == "conv"]
    if kind in ("HIRA", "DELORA", "RANDLORA", "VBLORA"):
        convs = [p for p, l in layers.items() if type(l.base) is not torch.nn.Linear]
    if convs and kind != "LORA":
        raise LorazooError(f"form '{spec.form}' on Conv2d layers ({', '.join(convs[:3])}) is not written in PEFT's "
                           f"format by lorazoo (only LoRA and DoRA are); save it in lorazoo's format")
    rs = spec.scale == "rslora"
    if kind == "RANDLORA":
        bank = randlora_peft_bank(handle, layers)
    if kind == "VBLORA":
        root = vblora_peft_root(handle, layers)
    for path, layer in layers.items():
        ad = layer.adapters[name]
        form = ad.form
        P = PREFIX + path
        key = re.escape(path)
        if kind == "LORA":
            A, B, s = form.A, form.B, form.scale
            if ad.shift_A.shape[0]:  # PEFT's converted PiSSA form: the shift as extra rank
                A = torch.cat([A, ad.shift_A.to(A)], 0)
                B = torch.cat([B, ad.shift_B.to(B) / s], 1)
            r = A.shape[0]
            peft_scale = spec.alpha / (math.sqrt(r) if rs else r)
            if r != spec.rank:
                rank_pattern[key] = r
            if not math.isclose(peft_scale, s, rel_tol=1e-12):
                alpha_pattern[key] = s * (math.sqrt(r) if rs else r)
            what = module_kind(layer)
            if what == "embedding":
                tensors[f"{P}.lora_embedding_A"], tensors[f"{P}.lora_embedding_B"] = _c(A), _c(B)
            elif what == "conv":
                w = layer.base.weight
                tensors[f"{P}.lora_A.weight"] = _c(A.reshape(r, *w.shape[1:]))
                tensors[f"{P}.lora_B.weight"] = _c(B[:, :, None, None])
            else:
                tensors[f"{P}.lora_A.weight"], tensors[f"{P}.lora_B.weight"] = _c(A), _c(B)
            if spec.form == "dora":
                m = form.m if what != "conv" else form.m.reshape(1, -1, 1, 1)
                tensors[f"{P}.lora_magnitude_vector"] = _c(m)
        elif kind == "LOHA":
            r = form.rank
            if r != spec.rank:
                rank_pattern[key] = r
            if not math.isclose(spec.alpha / r, form.scale, rel_tol=1e-12):
                alpha_pattern[key] = form.scale * r
            for k, v in (("hada_w1_a", form.B1), ("hada_w1_b", form.A1), ("hada_w2_a", form.B2),
                         ("hada_w2_b", form.A2)):
                tensors[f"{P}.{k}"] = _c(v)
        elif kind == "LOKR":
            r = form.rank
            f = spec.options.get("lokr_factor", -1)
            w1, w2 = peft_lokr_shapes(layer.in_features, layer.out_features, f)
            if (w1, w2) != ((form.out_m, form.in_m), (form.out_n, form.in_n)):
                raise LorazooError(
                    f"lokr_factor={f} splits layer {path!r} as {(form.out_m, form.in_m)} x "
                    f"{(form.out_n, form.in_n)} in lorazoo but {w1} x {w2} in PEFT (PEFT does not sort a given "
                    f"factor); save it in lorazoo's format or use lokr_factor=-1")
            if r != spec.rank:
                rank_pattern[key] = r
            if not math.isclose(spec.alpha / r, form.scale, rel_tol=1e-12):
                alpha_pattern[key] = form.scale * r
            tensors[f"{P}.lokr_w1"] = _c(form.P)
            C = form.full_c()
            if peft_lokr_dense_w2(r, w2):
                tensors[f"{P}.lokr_w2"] = _c(C)
            elif not form.dense:
                tensors[f"{P}.lokr_w2_a"], tensors[f"{P}.lokr_w2_b"] = _c(form.B), _c(form.A)
            else:  # lorazoo's dense C at r = min(shape): C = I·C or C·I, exactly
                eye = torch.eye(r, dtype=C.dtype, device=C.device)
                a, b = (eye, C) if C.shape[0] == r else (C, eye)
                tensors[f"{P}.lokr_w2_a"], tensors[f"{P}.lokr_w2_b"] = _c(a), _c(b)
        elif kind == "VERA":
            tensors[f"{P}.vera_lambda_b"] = _c(form.b * form.scale)  # PEFT's VeRA has no scale
            tensors[f"{P}.vera_lambda_d"] = _c(form.d)
            if "base_model.vera_A" not in tensors:
                tensors["base_model.vera_A"], tensors["base_model.vera_B"] = _c(form.bank.A), _c(form.bank.B)
        elif kind == "HIRA":  # one rank for all layers, zero-padded: PEFT 0.21 ignores HiRA's rank_pattern
            pad = max(l.adapters[name].form.rank for l in layers.values()) - form.rank
            tensors[f"{P}.hira_A"] = _c(torch.cat([form.A, form.A.new_zeros(pad, form.A.shape[1])]))
            tensors[f"{P}.hira_B"] = _c(torch.cat([form.B * form.scale, form.B.new_zeros(form.B.shape[0], pad)], 1))
        elif kind == "DELORA":
            A, B = torch.cat([form.A, form.A0]), torch.cat([form.B, -form.B0], 1)
            low = min(torch.linalg.vector_norm(A, dim=1).min().item(), torch.linalg.vector_norm(B, dim=0).min().item())
            if low < DELORA_FLOOR:
                raise LorazooError(f"layer {path!r}: a DeLoRA factor has a row/column norm {low:.2e} below PEFT's "
                                   f"clamp {DELORA_FLOOR}, where PEFT computes a different update; save it in "
                                   f"lorazoo's format")
            if 2 * form.rank != 2 * spec.rank:
                rank_pattern[key] = 2 * form.rank
            tensors[f"{P}.delora_A"], tensors[f"{P}.delora_B"] = _c(A), _c(B)
            tensors[f"{P}.delora_lambda"] = _c(form.lam * 2)
            tensors[f"{P}.delora_w_norm"] = _c(form.w_norm)
        elif kind == "RANDLORA":
            tensors[f"{P}.randlora_lambda"] = _c(form.lam.t())
            tensors[f"{P}.randlora_gamma"] = _c(form.gam * (form.scale / math.sqrt(form.n)))
            tensors[f"{P}.randlora_A"], tensors[f"{P}.randlora_B"] = _c(bank[0]), _c(bank[1])
            tensors["base_model.randlora_A"], tensors["base_model.randlora_B"] = _c(bank[0]), _c(bank[1])
        elif kind == "VBLORA":
            tensors[f"{P}.vblora_logits_A"], tensors[f"{P}.vblora_logits_B"] = _c(form.logits_A), _c(form.logits_B)
            tensors["base_model.vblora_vector_bank"] = _c(form.bank.vectors * root)
        else:  # ADALORA; padded to one rank (PEFT's ranknum is the config's init_r for every layer)
            init_r = max(l.adapters[name].form.rank for l in layers.values())
            peft_scale = spec.alpha / (init_r + 1e-5)
            lam = form.singular_values() * (form.scale / peft_scale)
            pad = init_r - form.rank
            tensors[f"{P}.lora_A"] = _c(torch.cat([form.Q, form.Q.new_zeros(pad, form.Q.shape[1])]))
            tensors[f"{P}.lora_B"] = _c(torch.cat([form.P, form.P.new_zeros(form.P.shape[0], pad)], 1))
            tensors[f"{P}.lora_E"] = _c(torch.cat([lam, lam.new_zeros(pad)])[:, None])
    for path, mod in handle.saved_modules().items():
        for k, v in mod.state_dict().items():
            tensors[f"{PREFIX}{path}.{k}"] = _c(v)
    return tensors, _config(handle, kind, layers, rank_pattern, alpha_pattern)


def _config(handle, kind, layers, rank_pattern, alpha_pattern) -> dict:
    spec = handle.spec
    model_config = getattr(handle.model, "config", None)
    config = {
        "peft_type": kind, "task_type": None, "inference_mode": True,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "target_modules": sorted(layers), "modules_to_save": sorted(handle.saved_modules()) or None,
        "r": spec.rank, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    fan_in_fan_out = any(is_conv1d(l.base) for l in layers.values())
    if kind in ("LORA", "ADALORA"):
        config.update(lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none", fan_in_fan_out=fan_in_fan_out,
                      use_rslora=kind == "LORA" and spec.scale == "rslora", use_dora=spec.form == "dora",
                      init_lora_weights=True)
    if kind == "ADALORA":
        o, sched = spec.options, handle.schedule
        init_r = max(l.adapters[handle.name].form.rank for l in layers.values())
        total = o.get("adalora_total_steps") or getattr(sched, "total", None) or 1000
        t_init = getattr(sched, "t_init", None)
        t_final = getattr(sched, "t_final", None)
        if t_init is None or t_final is None or t_init + t_final >= total:
            t_init, t_final = 0, 0
        target = getattr(sched, "target_rank", None) or o.get("adalora_target_rank") or init_r
        config.update(r=init_r, init_r=init_r, target_r=min(int(target), init_r), total_step=int(total),
                      tinit=int(t_init), tfinal=int(t_final), deltaT=int(o.get("adalora_interval", 1)),
                      beta1=o.get("adalora_beta1", 0.85), beta2=o.get("adalora_beta2", 0.85),
                      orth_reg_weight=o.get("adalora_orth_reg", 0.5), rank_pattern=None, alpha_pattern={})
    if kind in ("LOHA", "LOKR"):
        config.update(alpha=spec.alpha, rank_dropout=0.0, module_dropout=0.0, use_effective_conv2d=False,
                      init_weights=True)
    if kind == "LOKR":
        config.update(decompose_both=False, decompose_factor=spec.options.get("lokr_factor", -1))
    if kind == "HIRA":
        config.update(r=max(l.adapters[handle.name].form.rank for l in layers.values()), rank_pattern={},
                      hira_dropout=spec.dropout, fan_in_fan_out=fan_in_fan_out, init_weights=True)
        del config["alpha_pattern"]
    if kind == "DELORA":
        config.update(r=2 * spec.rank, delora_lambda=2 * spec.options.get("delora_lambda", 8.0),
                      module_dropout=spec.dropout, bias="none", init_weights=True, lambda_pattern={})
        del config["alpha_pattern"]
    if kind == "RANDLORA":
        config.update(projection_prng_key=int(spec.seed), save_projection=True, sparse=False, very_sparse=False,
                      randlora_dropout=spec.dropout, fan_in_fan_out=fan_in_fan_out, randlora_alpha=spec.rank,
                      bias="none", init_weights=True)
        del config["rank_pattern"], config["alpha_pattern"]
    if kind == "VBLORA":
        o = spec.options
        config.update(num_vectors=int(o.get("vblora_num_vectors", 256)), vector_length=int(o.get(
            "vblora_vector_length", 256)), topk=int(o.get("vblora_topk", 2)), vblora_dropout=spec.dropout,
            init_logits_std=float(o.get("vblora_logits_std", 0.1)), init_vector_bank_bound=float(o.get(
                "vblora_bank_bound", 0.02)), save_only_topk_weights=False, fan_in_fan_out=fan_in_fan_out,
            bias="none")
        del config["rank_pattern"], config["alpha_pattern"]
    if kind == "VERA":
        ranks = {l.adapters[handle.name].form.rank for l in layers.values()}
        if len(ranks) > 1:
            raise LorazooError(f"PEFT's VeRA has one rank for all layers; this adapter has ranks {sorted(ranks)}")
        config.update(r=ranks.pop(), projection_prng_key=int(spec.seed), save_projection=True,
                      vera_dropout=spec.dropout, d_initial=spec.options.get("vera_d_init", 0.1), bias="none",
                      fan_in_fan_out=fan_in_fan_out, init_weights=True)
        del config["rank_pattern"], config["alpha_pattern"]
    return config


def randlora_common_n(ns: dict[str, int], rank: int, error=LorazooError) -> int:
    """The one number of bases n all RandLoRA layers share, or ``error`` naming the layers that differ."""
    if len(set(ns.values())) > 1:
        seen = ", ".join(f"{p}: n={n}" for p, n in sorted(ns.items())[:6])
        raise error(
            f"RandLoRA layers with different numbers of bases n = ceil(min(in, out)/r) ({seen}, r={rank}): PEFT pairs "
            f"column c of the shared basis B with A row c // n and γ row c % n, lorazoo with A row c % r and γ row "
            f"c // r, so the "
            f"shared B would need a different column order for each n; only adapters whose layers all have the same "
            f"n map between the two (target layers with the same min(in, out), or a rank giving them the same n)")
    return next(iter(ns.values()))


def randlora_peft_columns(n: int, rank: int, total: int) -> torch.Tensor:
    """For PEFT's flattened B column c (of ``total``), lorazoo's column: (c % n)·r + c // n for c < n·r, else c."""
    c = torch.arange(total)
    return torch.where(c < n * rank, (c % n) * rank + c // n, c)


def randlora_peft_bank(handle, layers) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (randlora_A (r, 1, D_min), randlora_B (D_max, N, r)) for lorazoo's RandLoRA adapter."""
    name, r = handle.name, handle.spec.rank
    forms = {p: l.adapters[name].form for p, l in layers.items()}
    ranks = sorted({f.rank for f in forms.values()})
    if ranks != [r]:
        raise LorazooError(f"PEFT's RandLoRA has one basis rank r for all layers (one shared basis); this adapter has "
                           f"ranks {ranks}; save it in lorazoo's format")
    capped = [f"{p} (n={f.n}, PEFT's {math.ceil(f.m / r)})" for p, f in forms.items() if f.n != math.ceil(f.m / r)]
    if capped:
        raise LorazooError(f"randlora_bound={handle.spec.options.get('randlora_bound')} caps the number of bases at "
                           f"{', '.join(capped[:3])}; PEFT's RandLoRA has no bound; save it in lorazoo's format")
    n = randlora_common_n({p: f.n for p, f in forms.items()}, r)
    bank = next(iter(forms.values())).bank
    lo = bank.A.shape[1]
    big = math.ceil(lo / r)  # PEFT's N: enough bases for D_min (lorazoo's bank may hold fewer under a bound)
    B = bank.B.new_zeros(bank.B.shape[0], big, r)
    B[:, : bank.B.shape[1]] = bank.B[:, :big]
    flat = B.reshape(B.shape[0], -1)
    return bank.A[:, None, :], flat[:, randlora_peft_columns(n, r, flat.shape[1])].reshape(B.shape)


def vblora_peft_root(handle, layers) -> float:
    """√s for VB-LoRA's bank (PEFT has no scale), or a LorazooError where PEFT cannot express the adapter."""
    name, o = handle.name, handle.spec.options
    b = int(o.get("vblora_vector_length", 256))
    forms = {p: l.adapters[name].form for p, l in layers.items()}
    odd = [f"{p} ({f.in_features} -> {f.out_features})" for p, f in forms.items()
           if f.in_features % b or f.out_features % b]
    if odd:
        raise LorazooError(f"VB-LoRA layer(s) {', '.join(odd[:3])} are not multiples of vblora_vector_length={b}, "
                           f"which PEFT's VB-LoRA refuses; save it in lorazoo's format")
    ranks = {f.rank for f in forms.values()}
    scales = {f.scale for f in forms.values()}
    if len(ranks) > 1:
        raise LorazooError(f"PEFT's VB-LoRA has one rank for all layers; this adapter has ranks {sorted(ranks)}")
    if len(scales) > 1 or min(scales) <= 0:
        raise LorazooError(f"PEFT's VB-LoRA has no scale; lorazoo folds one positive scale into the shared bank "
                           f"(as its square root), but this adapter's scales are {sorted(scales)} (scale "
                           f"'{handle.spec.scale}', alpha {handle.spec.alpha}); use scale='constant', alpha=1 or save "
                           f"it in lorazoo's format")
    return math.sqrt(scales.pop())


def save_peft(handle, path) -> None:
    """Write ``handle``'s adapter as PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``.

    Everything is checked and built first; a refusal writes nothing. Each file is replaced by an
    atomic rename (tensors first).
    """
    tensors, config = peft_state(handle)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LorazooError(f"cannot save into {str(path)!r}: it is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic(path / TENSORS, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    _atomic(path / CONFIG, lambda f: Path(f).write_text(text))
