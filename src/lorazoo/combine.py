"""Adapter arithmetic: one new LoRA adapter from weighted adapters already on the model.

``combine(model, names, weights, method, name)`` offers the combination methods of PEFT's
``add_weighted_adapter`` and, for LoRA adapters, gives the same adapter (tested against peft).
With ΔW_i = s_i·B_i A_i the update of adapter i and w_i its weight:

* ``cat``: B = [B_1 ... B_n], A = [w_1 s_1 A_1; ...; w_n s_n A_n], so ΔW = Σ w_i ΔW_i exactly, at
  rank Σ r_i.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the task-arithmetic
  rule applied to the A's and the B's apart, with weights ±sqrt(|w_i s_i|) (the sign on A);
  equal ranks needed; ``linear`` gives (Σ c_i B_i)(Σ ±c_i A_i), cross terms included: a rough,
  cheap approximation (PEFT's words).
* ``svd`` and ``<rule>_svd``: the rule applied to the dense updates ΔW_i (every mergeable form:
  DoRA, LoHa, LoKr, VeRA...; a base shift such as PiSSA's residual counts as part of the update),
  then the top ``svd_rank`` singular triplets: B = U_k S_k, A = V_kᵀ (optionally clamped at the
  ``svd_clamp`` quantile). Exact when ``svd_rank`` reaches the rank of Σ w_i ΔW_i.

The rules themselves (TIES' trim/elect/disjoint merge, DARE's random drop and rescale, magnitude
pruning) are PEFT's ``peft.utils.merge_utils``; DARE draws from torch's global generator, so seed
it for a repeatable result. The new adapter is a LoRA with s = 1 (``scale="constant", alpha=1``),
per-layer ranks where they differ, on the union of the inputs' layers; it becomes the active
adapter, as a new adapter does, and trains like any other. Everything is checked and computed
before the model changes; an error leaves it as it was.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .adapt import adapt
from .errors import SpecError
from .handle import AdapterHandle, handles_of
from .layer import base_weights
from .spec import AdapterSpec

RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = ("cat", "svd", *RULES, *(f"{r}_svd" for r in RULES[1:]))
_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
_SIGN = {"ties", "dare_ties"}


def combine(model: torch.nn.Module, names: Sequence[str], weights: Sequence[float], method: str = "svd",
            name: str = "combined", *, svd_rank: int | None = None, svd_clamp: float | None = None,
            density: float | None = None, majority_sign_method: str = "total") -> AdapterHandle:
    """Add adapter ``name``: the ``method`` combination of adapters ``names`` with ``weights``
    (see the module docstring); returns its handle."""
    handles = _check(model, names, weights, method, name, svd_rank, svd_clamp, density, majority_sign_method)
    rule = method[:-4] if method.endswith("_svd") else ("linear" if method == "svd" else method)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = _union_layers(handles)
    pristine = base_weights(layers)
    for path, layer in layers.items():
        present = [(h, float(w)) for h, w in zip(handles, weights) if h.name in layer.adapters]
        if method == "cat":
            factors[path] = _cat(layer, present)
        elif method in RULES:
            factors[path] = _factor_rule(layer, present, rule, density, majority_sign_method)
        else:
            k = svd_rank or max(h.ranks.get(path, h.spec.rank) for h, _ in present)
            factors[path] = _svd(layer, present, pristine[path], rule, density, majority_sign_method, k, svd_clamp)
    ranks = {p: B.shape[1] for p, (B, A) in factors.items()}
    spec = AdapterSpec(form="lora", rank=max(ranks.values()), alpha=1, scale="constant",
                       targets=sorted(factors), seed=handles[0].spec.seed)
    handle = adapt(model, spec, name=name, ranks=ranks)
    with torch.no_grad():
        for path, ad in handle.adapters().items():
            B_new, A_new = factors[path]
            B, A = ad.form.factors()
            B.copy_(B_new.to(B))
            A.copy_(A_new.to(A))
    return handle


# --- the three families --------------------------------------------------------------------------
def _cat(layer, present):
    Bs, As = [], []
    for h, w in present:
        form = layer.adapters[h.name].form
        B, A = form.factors()
        Bs.append(B.detach())
        As.append(A.detach() * (w * form.scale))
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def _factor_rule(layer, present, rule, density, sign_method):
    As, Bs, wA, wB = [], [], [], []
    for h, w in present:
        form = layer.adapters[h.name].form
        B, A = form.factors()
        c = w * form.scale
        wA.append(math.copysign(math.sqrt(abs(c)), 1.0 if c >= 0 else -1.0))
        wB.append(math.sqrt(abs(c)))
        As.append(A.detach())
        Bs.append(B.detach())
    A = _apply(rule, As, torch.tensor(wA, dtype=As[0].dtype, device=As[0].device), density, sign_method).to(As[0].dtype)
    B = _apply(rule, Bs, torch.tensor(wB, dtype=Bs[0].dtype, device=Bs[0].device), density, sign_method).to(Bs[0].dtype)
    return B, A


def _svd(layer, present, weight, rule, density, sign_method, rank, clamp):
    deltas = []
    for h, w in present:
        ad = layer.adapters[h.name]
        work = torch.promote_types(weight.dtype, torch.float32)
        shifted = weight.to(work) + ad.shift_B.to(work) @ ad.shift_A.to(work)  # the base its form sees
        deltas.append(ad.form.delta_weight(shifted).detach().to(work) + (shifted - weight.to(work)))
    ws = torch.tensor([w for _, w in present], dtype=deltas[0].dtype, device=deltas[0].device)
    delta = _apply(rule, deltas, ws, density, sign_method)
    k = min(rank, *delta.shape)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    B, A = U[:, :k] * S[:k], Vh[:k]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return B.to(weight.dtype), A.to(weight.dtype)


def _apply(rule, tensors, weights, density, sign_method):
    if rule == "linear":
        return sum(w * t for w, t in zip(weights, tensors))
    from peft.utils import merge_utils

    fn = getattr(merge_utils, rule)
    if rule in _SIGN:
        return fn(tensors, weights, density, sign_method)
    return fn(tensors, weights, density)


# --- checks, before anything changes ------------------------------------------------------------
def _check(model, names, weights, method, name, svd_rank, clamp, density, sign_method) -> list[AdapterHandle]:
    if method not in METHODS:
        raise SpecError(f"combine method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise SpecError(f"names must be a non-empty list of adapter names, got {names!r}")
    if isinstance(weights, str) or not isinstance(weights, Sequence) or len(weights) != len(names):
        raise SpecError(f"weights must be a list of {len(names)} numbers, one per adapter, got {weights!r}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise SpecError(f"weights must be finite numbers, got {w!r}")
    if len(set(names)) != len(names):
        raise SpecError(f"names lists an adapter twice: {list(names)}")
    known = handles_of(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise SpecError(f"no adapter named {', '.join(map(repr, missing))} on this model; it has: "
                        f"{', '.join(sorted(known)) or 'none'}")
    if name in known:
        raise SpecError(f"model already has an adapter named {name!r}; pick another name or delete it first")
    rule = method[:-4] if method.endswith("_svd") else method
    if rule in _DENSITY and (isinstance(density, bool) or not isinstance(density, (int, float))
                             or not 0 < density <= 1):
        raise SpecError(f"method {method!r} needs density, the fraction of values kept, in (0, 1]; got {density!r}")
    if sign_method not in ("total", "frequency"):
        raise SpecError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise SpecError(f"svd_rank must be a whole number >= 1, got {svd_rank!r}")
    if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0 < clamp <= 1):
        raise SpecError(f"svd_clamp must be a quantile in (0, 1], got {clamp!r}")
    handles = [known[n] for n in names]
    dense = method == "svd" or method.endswith("_svd")
    for h in handles:
        for path, ad in h.adapters().items():
            form = ad.form
            if not form.mergeable:
                raise SpecError(f"adapter {h.name!r} cannot be combined: form '{form.part_name}' has no weight "
                                f"update (its output depends on the input), so it cannot be merged or combined")
            if dense:
                continue
            plain = form.plain_product and form.factors() is not None and not (form.reads_output or
                                                                               form.multiplicative)
            if not plain:
                raise SpecError(f"method {method!r} combines the B·A factors, which adapter {h.name!r} (form "
                                f"'{form.part_name}') does not have; use method='svd' (or '<rule>_svd'), which "
                                f"combines the dense updates of any mergeable form")
            if ad.shift_A.shape[0]:
                raise SpecError(f"adapter {h.name!r} moved part of the base into itself (init '{h.spec.init}' or "
                                f"a merge schedule), so its factors are not its update; use method='svd', which "
                                f"counts the base shift")
    if method in RULES:
        for path, layer in _union_layers(handles).items():
            ranks = {h.name: layer.adapters[h.name].form.factors()[1].shape[0]
                     for h in handles if h.name in layer.adapters}
            if len(set(ranks.values())) > 1:
                raise SpecError(f"method {method!r} adds factors of equal rank, but at {path} the ranks are "
                                f"{ranks}; use method='cat' (exact, rank adds up) or 'svd'")
    return handles


def _union_layers(handles):
    """Every layer carrying one of the adapters, in the model's module order (PEFT's, which DARE's
    random draws follow)."""
    out = {}
    for h in handles:
        out.update(h.layers())
    order = {p: i for i, (p, _) in enumerate(handles[0].model.named_modules())}
    return dict(sorted(out.items(), key=lambda kv: order[kv[0]]))
