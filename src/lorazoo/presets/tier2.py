"""Tier 2: the rest of the unified study's evaluated set and its overhead table."""
from . import preset as _p

PRESETS = [
    _p("lorma", "LoRMA without inflation: s·BA·W0", "seed", "form (multiplicative)", "LoRMA Eq. 6",
       tier=2, form="lorma"),
    # --- structured forms (hira, melora, delora)
    _p("hira", "HiRA: Hadamard product with the frozen weight, W0 ⊙ BA", "II-B1", "form", "study Eq. 17 [45]",
       tier=2, form="hira"),
    _p("melora", "MeLoRA: 2 mini LoRAs on the block diagonal (rank 2r)", "II-B1", "form", "study Eq. 14-15 [42]",
       tier=2, form="melora", melora_blocks=2),
    _p("delora", "DeLoRA: normalized rank-one terms, strength lambda·‖W‖/r (lambda 8)", "II-C2", "form",
       "study Eq. 69-70 [68]", tier=2, form="delora", delora_lambda=8.0),
    # --- shared banks (rasa, denselora, randlora)
    _p("rasa", "RaSA: r - k local ranks + k·L ranks shared across a module type, diagonal D per layer",
       "II-B2", "form, share", "study Eq. 27 [49]", tier=2, form="rasa", rasa_k=1),
    _p("denselora", "DenseLoRA: shared encoder/decoder per module type, dense r x r per layer, GELU",
       "II-B2", "form, share", "study Eq. 33 [50]", tier=2, form="denselora", rank=192, scale="constant",
       alpha=2),
    _p("randlora", "RandLoRA: full-rank sum of shared frozen random bases, diagonal scalings (U = 1024)",
       "II-B2", "form, share", "study Eq. 31-32 [23]", tier=2, form="randlora", rank=32, randlora_bound=1024,
       scale="constant", alpha=2),
    # --- inits (nzlora, olora, lora_one)
    _p("nzlora", "NZLoRA: non-zero random A and B, no base manipulation (does not start as the base)",
       "II-D1", "init", "study Eq. 89 [76]", tier=2, init="nzlora", nzlora_gamma_a=16.0, nzlora_gamma_b=16.0),
    _p("olora", "OLoRA: QR init, orthonormal B, base shifted", "II-D1", "init", "study Eq. 95 [129]", tier=2,
       init="olora"),
    _p("lora_one", "LoRA-One: one-step full-gradient SVD init (with the alpha/sqrt(r) scale of its paper), "
       "base untouched", "II-D2", "init (data)", "study Eq. 104-106 [82]", tier=2, init="lora_one",
       scale="rslora", lora_one_gamma=128.0),
    # --- corda
    _p("corda", "CorDA IPA: covariance-oriented SVD init, principal part of W0·C in the adapter", "II-D3",
       "init (data)", "study Eq. 110-111, 114-115 [84]", tier=2, init="corda"),
    _p("corda_kpa", "CorDA KPA: covariance-oriented SVD init, minor part of W0·C in the adapter", "II-D3",
       "init (data)", "study Eq. 110-113 [84]", tier=2, init="corda", corda_mode="kpa"),
    # --- routed experts (loramoe, goat)
    _p("loramoe", "LoRAMoE: routed LoRA experts, localized balancing loss (8 experts of rank 1, top-2)", "II-E1",
       "form, route, aux loss", "study Eq. 124-129 [86]", tier=2, form="loramoe", experts=8, top_k=2),
    _p("goat", "GOAT: SVD-segment experts, residual base, gradient-aligned scale (8 experts of rank 1, top-2)",
       "II-E3", "form, init, route, aux loss", "study Eq. 124-126, 132 [90]", tier=2, form="goat", init="goat",
       experts=8, top_k=2),
    # --- nonlinear forms (aurora, loran)
    _p("aurora", "Aurora: tanh + B-spline nonlinearity (ANL) between A and B", "II-C2", "form",
       "study Eq. 86-87, 136-137 [72]", tier=2, form="aurora"),
    _p("loran", "LoRAN: Sinter nonlinearity on the entries of B·A", "II-C2", "form",
       "[74]; authors' code (ΔW = s·f(BA))", tier=2, form="loran"),
]
