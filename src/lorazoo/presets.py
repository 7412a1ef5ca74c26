"""Named variants: each a preset of parts, with its family and paper (see ../shared/VARIANTS.md)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    method: str
    family: str
    axes: str
    paper: str
    parts: dict = field(default_factory=dict)
    tier: int = 1


def _p(name, method, family, axes, paper, tier=1, **parts):
    return Preset(name, method, family, axes, paper, parts, tier)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    _p("lora", "LoRA", "base (II-A)", "form", "Hu et al. 2021; study Eq. 1, 134"),
    _p("droplora", "DropLoRA: Bernoulli mask on the rank dimension", "seed", "form (rank dropout)",
       "DropLoRA Eq. 2, Algorithm 1", rank_dropout=0.5),
    _p("lorma_plus", "LoRMA+: (s·BA + I)·W0", "seed", "form (multiplicative)", "LoRMA Eq. 8",
       form="lorma_plus"),
    _p("lorma_pi", "LoRMA-pi: I_pi(BA)·W0", "seed", "form (multiplicative)", "LoRMA Eq. 7, Sec. 3.2.1",
       form="lorma_pi"),
    _p("lorma", "LoRMA without inflation: s·BA·W0", "seed", "form (multiplicative)", "LoRMA Eq. 6",
       tier=2, form="lorma"),
    _p("rslora", "rsLoRA: s = alpha/sqrt(r)", "II-C1", "scale", "study Eq. 56-61 [65]", scale="rslora"),
    _p("loraplus", "LoRA+: lr(B) = ratio x lr(A)", "II-C1", "optim", "[24]", optim="loraplus"),
    _p("dora", "DoRA: magnitude x direction", "II-C2", "form", "study Eq. 68, 135 [67]", form="dora"),
    _p("pissa", "PiSSA: principal singular init, residual base", "II-D1", "init", "study Eq. 90-92 [26]",
       init="pissa"),
    _p("milora", "MiLoRA: minor singular init", "II-D1", "init", "study Eq. 93-94 [78]", init="milora"),
    _p("lora_ga", "LoRA-GA: gradient SVD init (with the alpha/sqrt(r) scale its stable factor assumes)",
       "II-D2", "init (data)", "study Eq. 99-102 [27]", init="lora_ga", scale="rslora"),
    _p("eva", "EVA: activation SVD init + rank redistribution", "II-D3, II-B3", "init (data), schedule",
       "study Eq. 55, 116-123 [64]", init="eva"),
    _p("adalora", "AdaLoRA: SVD form, importance masking, budget schedule", "II-B3", "form, schedule",
       "study Eq. 35-44 [22]", form="adalora", schedule="adalora"),
    _p("relora", "ReLoRA: merge-and-reinit, optimizer reset, jagged LR", "II-B1", "schedule",
       "study Eq. 12-13 [21]", schedule="relora"),
    _p("vera", "VeRA: shared frozen random A, B; trainable vectors", "II-B2", "form, share",
       "study Eq. 24-26 [48]", form="vera"),
    _p("loha", "LoHA: Hadamard product of two low-rank products", "II-B1", "form", "study Eq. 16 [43]",
       form="loha"),
    _p("lokr", "LoKr: Kronecker product", "II-B1", "form", "study Eq. 18-21 [44]", form="lokr"),
    _p("moslora", "MoSLoRA: r x r mixer between A and B", "II-E3", "form", "[92]", form="moslora"),
    _p("hydralora", "HydraLoRA: one A, routed B experts", "II-E3", "form, route", "study Eq. 133 [91]",
       form="hydralora"),
    _p("lora_pro", "LoRA-Pro: gradient alignment with full fine-tuning", "II-C2", "optim",
       "study Eq. 77-84 [25]", optim="lora_pro"),
    # --- Tier 2: structured forms (hira, melora, delora)
    # --- Tier 2: shared banks (rasa, denselora, randlora)
    # --- Tier 2: inits (nzlora, olora, lora_one)
    # --- Tier 2: corda
    # --- Tier 2: routed experts (loramoe, goat)
    # --- Tier 2: nonlinear forms (aurora, loran)
]}
