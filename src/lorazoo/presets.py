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
       "study Eq. 35-44 [22]", form="adalora", schedule="adalora", scale="adalora"),
    _p("relora", "ReLoRA: merge-and-reinit, optimizer reset, jagged LR", "II-B1", "schedule",
       "study Eq. 12-13 [21]", schedule="relora"),
    _p("vera", "VeRA: shared frozen random A, B; trainable vectors", "II-B2", "form, share",
       "study Eq. 24-26 [48]", form="vera", rank=256),  # its paper's rank (RoBERTa-base)
    _p("loha", "LoHA: Hadamard product of two low-rank products", "II-B1", "form", "study Eq. 16 [43]",
       form="loha"),
    _p("lokr", "LoKr: Kronecker product", "II-B1", "form", "study Eq. 18-21 [44]", form="lokr"),
    _p("moslora", "MoSLoRA: r x r mixer between A and B", "II-E3", "form", "[92]", form="moslora"),
    _p("hydralora", "HydraLoRA: one A, routed B experts", "II-E3", "form, route", "study Eq. 133 [91]",
       form="hydralora"),
    _p("lora_pro", "LoRA-Pro: gradient alignment with full fine-tuning", "II-C2", "optim",
       "study Eq. 77-84 [25]", optim="lora_pro"),
    # --- Tier 2: structured forms (hira, melora, delora)
    _p("hira", "HiRA: Hadamard product with the frozen weight, W0 ⊙ BA", "II-B1", "form", "study Eq. 17 [45]",
       tier=2, form="hira"),
    _p("melora", "MeLoRA: 2 mini LoRAs on the block diagonal (rank 2r)", "II-B1", "form", "study Eq. 14-15 [42]",
       tier=2, form="melora", melora_blocks=2),
    _p("delora", "DeLoRA: normalized rank-one terms, strength lambda·‖W‖/r (lambda 8)", "II-C2", "form",
       "study Eq. 69-70 [68]", tier=2, form="delora", delora_lambda=8.0),
    # --- Tier 2: shared banks (rasa, denselora, randlora)
    _p("rasa", "RaSA: r - k local ranks + k·L ranks shared across a module type, diagonal D per layer",
       "II-B2", "form, share", "study Eq. 27 [49]", tier=2, form="rasa", rasa_k=1),
    _p("denselora", "DenseLoRA: shared encoder/decoder per module type, dense r x r per layer, GELU",
       "II-B2", "form, share", "study Eq. 33 [50]", tier=2, form="denselora", rank=192, scale="constant",
       alpha=2),
    _p("randlora", "RandLoRA: full-rank sum of shared frozen random bases, diagonal scalings (U = 1024)",
       "II-B2", "form, share", "study Eq. 31-32 [23]", tier=2, form="randlora", rank=32, randlora_bound=1024,
       scale="constant", alpha=2),
    # --- Tier 2: inits (nzlora, olora, lora_one)
    _p("nzlora", "NZLoRA: non-zero random A and B, no base manipulation (does not start as the base)",
       "II-D1", "init", "study Eq. 89 [76]", tier=2, init="nzlora", nzlora_gamma_a=16.0, nzlora_gamma_b=16.0),
    _p("olora", "OLoRA: QR init, orthonormal B, base shifted", "II-D1", "init", "study Eq. 95 [129]", tier=2,
       init="olora"),
    _p("lora_one", "LoRA-One: one-step full-gradient SVD init (with the alpha/sqrt(r) scale of its paper), "
       "base untouched", "II-D2", "init (data)", "study Eq. 104-106 [82]", tier=2, init="lora_one",
       scale="rslora", lora_one_gamma=128.0),
    # --- Tier 2: corda
    _p("corda", "CorDA IPA: covariance-oriented SVD init, principal part of W0·C in the adapter", "II-D3",
       "init (data)", "study Eq. 110-111, 114-115 [84]", tier=2, init="corda"),
    _p("corda_kpa", "CorDA KPA: covariance-oriented SVD init, minor part of W0·C in the adapter", "II-D3",
       "init (data)", "study Eq. 110-113 [84]", tier=2, init="corda", corda_mode="kpa"),
    # --- Tier 2: routed experts (loramoe, goat)
    _p("loramoe", "LoRAMoE: routed LoRA experts, localized balancing loss (8 experts of rank 1, top-2)", "II-E1",
       "form, route, aux loss", "study Eq. 124-129 [86]", tier=2, form="loramoe", experts=8, top_k=2),
    _p("goat", "GOAT: SVD-segment experts, residual base, gradient-aligned scale (8 experts of rank 1, top-2)",
       "II-E3", "form, init, route, aux loss", "study Eq. 124-126, 132 [90]", tier=2, form="goat", init="goat",
       experts=8, top_k=2),
    # --- Tier 2: nonlinear forms (aurora, loran)
    _p("aurora", "Aurora: tanh + B-spline nonlinearity (ANL) between A and B", "II-C2", "form",
       "study Eq. 86-87, 136-137 [72]", tier=2, form="aurora"),
    _p("loran", "LoRAN: Sinter nonlinearity on the entries of B·A", "II-C2", "form",
       "[74]; authors' code (ΔW = s·f(BA))", tier=2, form="loran"),
]}
