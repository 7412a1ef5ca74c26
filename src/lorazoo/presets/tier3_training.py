"""Tier 3, the remaining inits, optimizers and schedules."""
from . import preset as _p  # noqa: F401

PRESETS = [
    _p("lora_fa", "LoRA-FA: frozen A, only B trains", "II-A", "optim", "study Eq. 3 context [101]", tier=3,
       optim="lora_fa"),
    _p("init_b_or_a", "Hayou et al.: which factor is zero at init (B, the paper's recommended Init[A])", "II-D1",
       "init", "[77]", tier=3, init="init_b_or_a", init_b_or_a_zero="B"),
    _p("rplora", "RPLoRA: gradients preconditioned by (BᵀB + δI)⁻¹ and (AAᵀ + δI)⁻¹", "II-C1", "optim",
       "study Eq. 65-67 [66]", tier=3, optim="rplora", rplora_damping=1e-6),
    _p("delta_lora", "Delta-LoRA: base updated with λ times the delta of s·B·A after step K (λ 2, K 500)",
       "Appendix [153]", "schedule", "[153] Algorithm 1", tier=3, schedule="delta_lora", delta_lora_ratio=2.0,
       delta_lora_start=500),
    _p("periodiclora", "PeriodicLoRA: unload m·s·B·A into the base every step, keep (1-m)·B, (1-m)·A (m 0.1)",
       "II-B1", "schedule", "study Sec. II-B1 [39] (the study's code)", tier=3, schedule="periodiclora",
       periodiclora_interval=1, periodiclora_momentum=0.1),
    _p("cola", "CoLA: chain of 3 LoRAs; at each knot merge s·B·A, re-init, reset the optimizer (Frank-Wolfe)",
       "II-B1", "schedule", "study Sec. II-B1 [40]", tier=3, schedule="cola", cola_chains=3),
    _p("xgblora", "XGBLoRA: rank-1 boosters on 2 random layers per round, merged each round (10 rounds)",
       "II-B1", "schedule", "study Sec. II-B1 [41]", tier=3, schedule="xgblora", rank=1, xgblora_layers=2,
       xgblora_interval=0.1),
    _p("sorsa", "SORSA: principal SVD triplets as a trainable U·diag(S)·Vᵀ, residual base, orthonormal regularizer "
       "(gamma 4e-4)", "II-D1", "init, schedule", "study Eq. 96-98 [81]", tier=3, form="adalora", init="sorsa",
       schedule="sorsa", scale="constant", alpha=1, sorsa_gamma=4e-4),
    _p("nlora", "NLoRA: SLoRA (B·N·A) started from W0's first r rows, columns and block (authors' code; "
       "does not start as the base)", "II-D1", "init", "[80]", tier=3, form="moslora", init="nlora",
       nlora_mixer="block", nlora_shift_base=False),
    _p("lora_sb", "LoRA-SB: frozen B, A from the SVD of the approximated first Adam step, trainable r x r core",
       "II-D2", "init (data), form", "[131]", tier=3, form="lora_sb", init="lora_sb", lora_sb_eta=1e-4),
    _p("lora_tsd", "LoRA-Dash: LoRA, then a trainable diagonal on the 8 task-specific directions of W0 found "
       "after 100 steps", "II-D2", "form, schedule", "[83]", tier=3, form="lora_dash", schedule="lora_dash",
       lora_dash_directions=8, lora_dash_warmup=100),
    _p("flora_hao", "FLoRA (Hao et al.): frozen random A ~ N(0, 1/r) compresses the gradient; every 1000 steps "
       "fold B·A into the base, redraw A, move the momentum", "II-C2", "init, optim, schedule",
       "study Eq. 71-76 [70]", tier=3, init="flora_hao", optim="lora_fa", schedule="flora_hao", scale="constant",
       alpha=1, flora_hao_interval=1000),
]
