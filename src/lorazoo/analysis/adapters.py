"""Per-layer tensors of an adapter, for the analyses: ΔW, the pre-trained W, the factors B and A,
and saved runs rebuilt with their model.

- :func:`delta_weights` (handle) -> {layer path: ΔW (out, in)}: the form's ``delta_weight`` against
  the weight the adapter sees, plus the adapter's base shift (PiSSA's residual, ReLoRA's merges),
  so ΔW is "the final adapted weight minus the pre-trained one" (LoRMA Sec. 5.6); with
  ``include_shift=False`` only the form's own update. Conv layers give their (out, in·kh·kw) view.
  Forms whose update depends on the input (DenseLoRA with GELU) have no ΔW and are refused.
- :func:`base_weights_of` (handle) -> {path: W}: the pristine pre-trained weight (merges and
  every adapter's shift removed).
- :func:`lora_factors` (handle) -> {path: (B, A)}: the form's plain factors (``Form.factors``;
  scale not included), A (r, in) being the LoRA paper's A ∈ R^{r×k}.
- :func:`load_run` (folder) -> (model, handle, task): a folder written by ``lorazoo train`` (or
  ``lorazoo.run.run(out_dir=...)``) loaded onto a fresh base model of the task in its task.json,
  as ``lorazoo eval`` does.
"""
from __future__ import annotations

import torch

from ..errors import LorazooError, NotMergeableError


def _layers(handle) -> dict:
    layers = handle.layers()
    if not layers:
        raise LorazooError(f"adapter {handle.name!r} is on no layer")
    return layers


def base_weights_of(handle) -> dict[str, torch.Tensor]:
    """The pristine (out, in) weight of every layer of ``handle``, detached."""
    from ..layer import base_weights

    return {p: w.detach().clone() for p, w in base_weights(_layers(handle)).items()}


@torch.no_grad()
def delta_weights(handle, include_shift: bool = True) -> dict[str, torch.Tensor]:
    """{layer path: ΔW (out, in)} of ``handle`` (see the module docstring), detached."""
    out = {}
    pristine = base_weights_of(handle)
    for path, layer in _layers(handle).items():
        ad = layer.adapters[handle.name]
        shift = ad.shift_B.to(pristine[path]) @ ad.shift_A.to(pristine[path]) if ad.shift_A.shape[0] else None
        weight = pristine[path] if shift is None else pristine[path] + shift
        try:
            delta = ad.form.delta_weight(weight.to(_dtype(ad)))
        except (NotImplementedError, NotMergeableError) as e:
            raise LorazooError(f"form '{ad.form.part_name}' at {path} has no weight update ΔW (its output is not "
                               f"a linear map of the input), so the weight analyses do not apply"
                               + (f": {e}" if str(e) else "")) from None
        delta = delta.detach().to(weight.dtype)
        out[path] = delta + shift if include_shift and shift is not None else delta
    return out


def _dtype(adapter) -> torch.dtype:
    for t in adapter.form.parameters():
        return t.dtype
    return adapter.shift_A.dtype


def lora_factors(handle) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer path: (B (out, r), A (r, in))} of a form with plain factors (LoRA, DoRA, PiSSA's...),
    detached; LorazooError for forms without them."""
    out = {}
    for path, layer in _layers(handle).items():
        form = layer.adapters[handle.name].form
        f = form.factors()
        if f is None:
            raise LorazooError(f"form '{form.part_name}' has no B·A factors (at {path}); analyse its ΔW instead "
                               f"(e.g. `lorazoo analyze subspace --of delta`)")
        out[path] = (f[0].detach(), f[1].detach())
    return out


def load_run(folder):
    """(model, handle, task): the adapter in ``folder`` loaded onto a fresh base model of the task named
    in ``folder/task.json`` (what ``lorazoo train`` and ``run(out_dir=...)`` write)."""
    from pathlib import Path

    from ..io import load
    from ..run import fresh_model, read_task_config
    from ..tasks.base import get_task

    if not Path(folder).is_dir():
        raise LorazooError(f"{str(folder)!r} is not a folder; give a folder written by `lorazoo train --out`")
    cfg = read_task_config(folder)
    task = get_task(cfg["task"], limit=cfg.get("limit"), seed=cfg.get("seed", 0), options=cfg.get("options", {}))
    model = fresh_model(task, cfg.get("seed", 0))
    handle = load(model, folder)
    model.eval()
    return model, handle, task


# --- the analyses over every layer of an adapter (what `lorazoo analyze` prints) -------------------
def _select(tensors: dict, modules: str | None) -> dict:
    import re

    if modules is None:
        return tensors
    try:
        pattern = re.compile(modules)
    except re.error as e:
        raise LorazooError(f"--modules {modules!r} is not a valid regular expression: {e}") from None
    picked = {p: t for p, t in tensors.items() if pattern.search(p)}
    if not picked:
        raise LorazooError(f"no adapted layer matches {modules!r}; the layers are {', '.join(sorted(tensors)[:8])}"
                           + (" ..." if len(tensors) > 8 else ""))
    return picked


def _per_layer(fn, *dicts):
    out = {}
    for path in dicts[0]:
        try:
            out[path] = fn(*(d[path] for d in dicts))
        except LorazooError as e:
            raise LorazooError(f"layer {path}: {e}") from None
    return out


def _common(a: dict, b: dict) -> list[str]:
    common = [p for p in a if p in b]
    if not common:
        raise LorazooError(f"the two adapters share no layer (the first is on {', '.join(sorted(a)[:4])}, the second "
                           f"on {', '.join(sorted(b)[:4])}); compare adapters of the same model")
    return common


def row_spaces(handle, of: str = "A", modules: str | None = None) -> dict[str, torch.Tensor]:
    """{path: the matrix whose right-singular vectors the subspace analysis compares}: the factor A
    (``of="A"``, the LoRA paper's choice) or ΔW (``of="delta"``, any mergeable form)."""
    if of == "A":
        return _select({p: A for p, (_, A) in lora_factors(handle).items()}, modules)
    if of == "delta":
        return _select(delta_weights(handle), modules)
    raise LorazooError(f"of must be 'A' or 'delta', got {of!r}")


def subspace_by_layer(handle1, handle2=None, of: str = "A", modules: str | None = None, seed: int = 0) -> dict:
    """Per common layer: the φ grid (LoRA Eq. 4) between ``handle1``'s and ``handle2``'s row spaces,
    or, with ``handle2=None``, against a standard Gaussian matrix of the same shape (Fig. 4, right).
    With ``of="delta"`` the grid stops at each ΔW's numerical rank (at RUN1's for the random baseline)."""
    from .spectrum import numerical_rank
    from .subspace import random_gaussian_like, subspace_similarity_grid

    m1 = row_spaces(handle1, of, modules)
    m2 = ({p: random_gaussian_like(A, seed + k) for k, (p, A) in enumerate(m1.items())} if handle2 is None
          else row_spaces(handle2, of, modules))
    common = _common(m1, m2)

    def one(A1, A2):
        grid = subspace_similarity_grid(A1, A2)
        if of == "delta":  # ΔW's right-singular vectors past its numerical rank are rounding noise
            k1 = max(1, numerical_rank(A1))
            grid = grid[:k1, :k1 if handle2 is None else max(1, numerical_rank(A2))]
        return {"shape1": list(A1.shape), "shape2": list(A2.shape), "phi_1_1": float(grid[0, 0]),
                "phi_full": float(grid[-1, -1]), "phi_mean": float(grid.mean()),
                "grid": [[float(v) for v in row] for row in grid]}

    return _per_layer(one, {p: m1[p] for p in common}, {p: m2[p] for p in common})


def amplification_by_layer(handle, r: int | None = None, modules: str | None = None, seed: int = 0,
                           include_shift: bool = True) -> dict:
    """Per layer: LoRA's Table 7 numbers (:func:`lorazoo.analysis.amplification`) for the pre-trained
    W and the adapter's ΔW."""
    from .amplification import amplification

    deltas = _select(delta_weights(handle, include_shift), modules)
    weights = base_weights_of(handle)
    return _per_layer(lambda W, D: amplification(W, D, r=r, seed=seed), {p: weights[p] for p in deltas}, deltas)


def spectrum_by_layer(handle, rtol: float | None = None, top: int | None = None, modules: str | None = None,
                      include_shift: bool = True) -> dict:
    """Per layer: :func:`lorazoo.analysis.spectrum` of ΔW."""
    from .spectrum import spectrum

    return _per_layer(lambda D: spectrum(D, rtol=rtol, top=top), _select(delta_weights(handle, include_shift), modules))


def correlation_by_layer(handle1, handle2, r: int | None = None, modules: str | None = None,
                         include_shift: bool = True) -> dict:
    """Per common layer: the LoRMA paper's Table 9 (:func:`lorazoo.analysis.correlation`) of the two ΔW."""
    from .correlation import correlation

    d1 = _select(delta_weights(handle1, include_shift), modules)
    d2 = _select(delta_weights(handle2, include_shift), modules)
    common = _common(d1, d2)
    return _per_layer(lambda a, b: correlation(a, b, r=r), {p: d1[p] for p in common}, {p: d2[p] for p in common})
