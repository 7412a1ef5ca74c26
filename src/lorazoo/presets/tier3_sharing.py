"""Tier 3, sharing across modules (study II-B2)."""
from . import preset as _p

PRESETS = [
    _p("sharelora", "ShareLoRA: A shared by the layers of a module type, B per layer (ShareA)", "II-B2",
       "share", "study Eq. 22-23 [47]", tier=3, form="sharelora", sharelora_share="A"),
    _p("vblora", "VB-LoRA: A, B assembled from one shared vector bank, top-2 admixture (256 x 256)", "II-B2",
       "form, share", "[54]; VB-LoRA admixture, PEFT's defaults", tier=3, form="vblora", rank=4, scale="constant",
       alpha=1, vblora_num_vectors=256, vblora_vector_length=256, vblora_topk=2),
    _p("tiedlora", "Tied-LoRA: A, B tied across the layers of a module type, per-layer scaling vectors u, v "
       "(all trained)", "II-B2", "share", "[53]; study Sec. II-B2 (on Eq. 24-26)", tier=3, form="tiedlora",
       tiedlora_train="ABuv"),
    _p("prolora", "PRoLoRA: rank chunks broadcast and rolled within A and B (m = n = 2), 1 unshared rank",
       "II-B2", "form, share", "study Eq. 34 [51]", tier=3, form="prolora", prolora_unshared=1, prolora_share_a=2,
       prolora_share_b=2, prolora_rotation=True),
    _p("bslora", "BSLoRA: local rank 2 + intra-layer (4) and inter-layer (8) shared pairs, Kronecker shape "
       "transforms (k = 256), s = 2", "II-B2", "form, share", "study Eq. 28-30 [52]", tier=3, form="bslora", rank=2,
       scale="constant", alpha=2, bslora_intra=4, bslora_inter=8, bslora_mode="kron", bslora_kron_size=256),
    _p("e2lora", "E2LoRA: entropy-guided adaptive sharing: A, B shared within intervals of adjacent layers of "
       "similar gradient proxy entropy, ranks per interval under half LoRA's parameters", "II-B2", "share",
       "[55]; abstract + papernotes summary (no study equation)", tier=3, form="e2lora", init="e2lora",
       e2lora_share="AB", e2lora_budget=0.5, e2lora_threshold=0.1, e2lora_entropy="spectral"),
]
