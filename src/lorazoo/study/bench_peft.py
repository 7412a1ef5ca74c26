"""PEFT's implementation of a lorazoo spec, for ``lorazoo bench --against peft``.

``peft_equivalent(spec)`` says whether PEFT has the same method with the same hyperparameters
(rank, alpha, scale, init, targets, dropout) and returns the PEFT config, or the reason it has
none. PEFT is an optional extra (``pip install lorazoo[peft]``); it is imported only here.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import LorazooError
from .bench_runner import ADALORA_STEPS, BenchConfig, Method, Runner

_LORA_INITS = {"default": True, "pissa": "pissa"}  # lorazoo init -> PEFT init_lora_weights
_SCHEDULES = {"lora": "none", "dora": "none", "loha": "none", "lokr": "none", "vera": "none", "hira": "none",
              "adalora": "adalora"}  # the schedule each PEFT form comes with


def require_peft():
    """The ``peft`` module, or a clear error saying how to install it."""
    try:
        import peft
    except ImportError:
        raise LorazooError("--against peft needs PEFT, an optional extra: pip install 'lorazoo[peft]'") from None
    return peft


def _opt(spec, name: str, default: Any = None) -> Any:
    """Option ``name`` of the spec's parts, or ``default`` where they do not declare it or leave it unset."""
    value = spec.options.get(name)
    return default if value is None else value


def _lora_init(spec) -> Any:
    """PEFT's ``init_lora_weights`` for a lorazoo init of a LoRA or DoRA form."""
    if spec.init == "pissa" and _opt(spec, "pissa_niter", 0):
        return f"pissa_niter_{spec.options['pissa_niter']}"
    return _LORA_INITS[spec.init]


def peft_equivalent(spec, cfg: BenchConfig) -> tuple[Any, str | None]:
    """(PEFT config, None) for a spec PEFT implements, else (None, the reason it does not)."""
    peft = require_peft()
    if spec.form not in _SCHEDULES:
        return None, f"PEFT has no form '{spec.form}'"
    if spec.schedule != _SCHEDULES[spec.form]:
        return None, f"PEFT has no schedule '{spec.schedule}' for form '{spec.form}'"
    if spec.optim not in ("default", "loraplus"):
        return None, f"PEFT has no optim '{spec.optim}'"
    if spec.modules_to_save:
        return None, "modules_to_save is not benchmarked against PEFT"
    lora_like = spec.form in ("lora", "dora", "adalora")
    if spec.init != "default" and not (spec.form in ("lora", "dora") and spec.init in _LORA_INITS):
        return None, f"PEFT has no init '{spec.init}' for form '{spec.form}'"
    # PEFT's VeRA and HiRA have no scale: lorazoo's scale="constant", alpha=1
    unscaled = spec.form in ("vera", "hira") and spec.scale == "constant" and spec.alpha == 1
    if spec.form == "hira" and not unscaled:
        return None, "PEFT's HiRA has no scale: compare with hira:scale=constant:alpha=1"
    if spec.scale != "lora" and not (lora_like and spec.scale == "rslora") and not unscaled:
        return None, f"PEFT has no scale '{spec.scale}' for form '{spec.form}'"
    if spec.rank_dropout and spec.form not in ("loha", "lokr"):
        return None, f"PEFT's {spec.form} has no rank dropout"
    if spec.form == "dora" and not _opt(spec, "dora_detach_norm", True):
        return None, "PEFT's DoRA always detaches the norm (dora_detach_norm=False has no equivalent)"

    common = {"target_modules": spec.targets, "r": spec.rank}
    if spec.form in ("lora", "dora"):
        return peft.LoraConfig(**common, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                               use_rslora=spec.scale == "rslora", use_dora=spec.form == "dora",
                               init_lora_weights=_lora_init(spec)), None
    if spec.form in ("loha", "lokr"):
        kw = {"alpha": spec.alpha, "rank_dropout": spec.rank_dropout, "module_dropout": spec.dropout}
        if spec.form == "loha":
            return peft.LoHaConfig(**common, **kw), None
        return peft.LoKrConfig(**common, **kw, decompose_factor=_opt(spec, "lokr_factor", -1)), None
    if spec.form == "hira":
        return peft.HiraConfig(**common, hira_dropout=spec.dropout), None
    if spec.form == "vera":
        return peft.VeraConfig(**common, vera_dropout=spec.dropout, projection_prng_key=spec.seed,
                               d_initial=_opt(spec, "vera_d_init", 0.1)), None
    # AdaLoRA: the schedule's options map one to one (lorazoo's defaults: the initial rank is the
    # rank, the target rank 2/3 of it).
    from ..schedules.adalora import resolve_steps

    init_r = _opt(spec, "adalora_init_rank", spec.rank)
    total, t_init, t_final = resolve_steps(spec.options, ADALORA_STEPS)
    del common["r"]
    return peft.AdaLoraConfig(
        **common, lora_alpha=spec.alpha, lora_dropout=spec.dropout, init_r=init_r,
        target_r=_opt(spec, "adalora_target_rank", max(1, round(2 * init_r / 3))),
        total_step=total, tinit=t_init, tfinal=t_final, deltaT=_opt(spec, "adalora_interval", 1),
        beta1=_opt(spec, "adalora_beta1", 0.85), beta2=_opt(spec, "adalora_beta2", 0.85),
        orth_reg_weight=_opt(spec, "adalora_orth_reg", 0.5),
    ), None


def peft_runner(method: Method, cfg: BenchConfig, model: torch.nn.Module, batch: dict) -> Runner:
    """PEFT's version of ``method`` on ``model``: same step (forward, backward, AdamW, hooks)."""
    peft = require_peft()
    spec = method.adapter_spec()
    config, reason = peft_equivalent(spec, cfg)
    if config is None:
        raise LorazooError(f"{method.label}: {reason}")
    pmodel = peft.get_peft_model(model, config)
    params = [p for p in pmodel.parameters() if p.requires_grad]
    if spec.optim == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(pmodel, torch.optim.AdamW, lr=cfg.lr,
                                        loraplus_lr_ratio=_opt(spec, "loraplus_ratio", 16))
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr)
    adalora = spec.form == "adalora"
    state = {"step": 0}

    def step() -> None:
        state["step"] += 1
        opt.zero_grad(set_to_none=True)
        pmodel(**batch).loss.backward()  # AdaLoRA's model adds its orthogonality loss itself
        opt.step()
        if adalora:
            pmodel.base_model.update_and_allocate(state["step"])

    return Runner(method, pmodel, sum(p.numel() for p in params), step, batch,
                  pmodel.merge_adapter, pmodel.unmerge_adapter)
