"""Tier 3, mixtures of low-rank experts (study II-E). At the study's comparison scale where the
method allows it: 8 experts of rank 1 (LoRA's rank 8 in total)."""
from . import preset as _p

PRESETS = [
    # --- loss (II-E1)
    _p("moelora", "MoELoRA: top-2 LoRA experts, load balancing + expert contrastive loss (8 experts of rank 1)",
       "II-E1", "form, route, aux loss", "study Eq. 124-127 [85]", tier=3, form="moelora", experts=8, top_k=2),
    # --- router (II-E2)
    _p("moa", "MoA (Mixture-of-LoRAs): one LoRA expert per domain (8, rank 1), sequence-level routing supervised "
       "by the batch's domain labels", "II-E2", "form, route, aux loss", "[87]", tier=3, form="moa", experts=8),
    _p("adamole", "AdaMoLE: LoRA experts above a learned per-token threshold (8 experts of rank 1, τ_max = 1/8)",
       "II-E2", "form, route, aux loss", "study Eq. 130-131 [88]", tier=3, form="adamole", experts=8),
    # --- experts (II-E3)
    _p("mola", "MoLA-▽: more LoRA experts in higher layers (2, 4, 6, 8 by depth quarter), top-2, rank-1 experts",
       "II-E3", "form, route", "[89]; study Eq. 124-125", tier=3, form="mola", mola_experts=[2, 4, 6, 8], top_k=2),
    _p("multilora", "MultiLoRA: 8 parallel rank-1 LoRA modules with learnable scales (zero at init, B non-zero)",
       "II-E3", "form", "[93]", tier=3, form="multilora", multilora_modules=8),
    _p("sira", "SiRA: sparse top-2 LoRA experts, expert capacity, expert dropout on the gates (8 experts of rank 1)",
       "II-E3", "form, route, aux loss", "[94]; study Eq. 124-126", tier=3, form="sira", experts=8, top_k=2),
    _p("mtlora", "MTLoRA: task-agnostic LoRA + one task-specific LoRA per task (4 tasks), chosen by the sample's task",
       "II-E3", "form, route", "[95]; authors' code (MTLoRALinear)", tier=3, form="mtlora", mtlora_tasks=4),
    _p("molre", "MLoRE: 8 experts of ranks 1..8, sample-level noisy top-5 router, cv² balancing",
       "II-E3", "form, route, aux loss", "[96]; authors' code (MOEBlock)", tier=3, form="molre",
       molre_ranks=[1, 2, 3, 4, 5, 6, 7, 8], top_k=5),
    _p("llava_mole", "LLaVA-MoLE: top-1 LoRA experts in MLP layers (8 of rank 1), plain LoRA elsewhere",
       "II-E3", "form, route, aux loss", "[97]", tier=3, form="llava_mole", experts=8),
    _p("moka", "MokA: one A per modality (3, rank 4 each), text-question cross-attention in rank space, shared B",
       "II-E3", "form, route", "[15]; authors' code (lora.py, train mode)", tier=3, form="moka", rank=4,
       moka_modalities=3, moka_cross_weight=1.0),
]
