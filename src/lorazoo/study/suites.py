"""Named study suites (``lorazoo study --suite NAME``), as data: edit the dicts to adjust.

Each suite is a study config (see ``grid``); ``"variant": "all"`` means every registered variant.
"""
from __future__ import annotations

import copy

from .errors import StudyError

# Sizing (measured): a sentiment trial of 32 steps (limit 512, batch 16) took ~30 s on one thread
# but left most variants near chance (0.50-0.60): too few steps to compare anything. The quick
# suite takes 96 steps (limit 768, batch 8), max_length 48, a 400-text test split.
LRS_WIDE = [1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
LRS_FULL = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
LRS_FEW = [1e-4, 1e-3, 1e-2]
SMALL_VARIANTS = ["lora", "droplora", "lorma_plus", "dora"]
# The quick study's 20 variants (the Tier 1 presets when it was checked in, with LoRMA's ablation); an
# explicit list, so the suite stays what docs/study reports as the catalogue grows.
QUICK_VARIANTS = ["adalora", "dora", "droplora", "eva", "hydralora", "loha", "lokr", "lora", "lora_ga", "lora_pro",
                  "loraplus", "lorma", "lorma_pi", "lorma_plus", "milora", "moslora", "pissa", "relora", "rslora",
                  "vera"]
TIER2_STUDY = ["lora", "vera", "relora", "hira", "melora", "delora", "rasa", "denselora", "randlora",
               "nzlora", "olora", "lora_one", "corda", "corda_kpa", "loramoe", "goat", "aurora", "loran"]

SUITES: dict[str, dict] = {
    "quick": {
        "description": "About an hour on 2 cores (--workers 2): every variant x 6 learning rates (1e-5..1e-2) "
                       "on the NLU sentiment task, one seed; then 4 variants x 3 learning rates on NLG and IC.",
        "sweeps": [
            {"grid": {"task": ["sentiment"], "variant": QUICK_VARIANTS, "lr": LRS_WIDE, "seed": [0]},
             "fixed": {"epochs": 1, "limit": 768, "batch_size": 8, "max_length": 48, "test_size": 400}},
            {"grid": {"task": ["nlg_sentiment"], "variant": SMALL_VARIANTS, "lr": LRS_FEW, "seed": [0]},
             "fixed": {"epochs": 1, "limit": 256}},
            {"grid": {"task": ["fashion"], "variant": SMALL_VARIANTS, "lr": LRS_FEW, "seed": [0]},
             "fixed": {"epochs": 1, "limit": 256, "test_size": 500}},
        ],
    },
    "tier2": {
        "description": "About 40 minutes on 2 cores (--workers 2): the study's Tier 2 variants, with LoRA, the "
                       "fixed VeRA (paper init and rank 256), LoRMA-pi and the run-relative ReLoRA, at LoRA's "
                       "best rate of the quick suite (1e-3) and at the structured forms' (1e-2), on sentiment "
                       "with the quick suite's settings.",
        "sweeps": [
            {"grid": {"task": ["sentiment"], "variant": TIER2_STUDY, "lr": [1e-3, 1e-2], "seed": [0]},
             "fixed": {"epochs": 1, "limit": 768, "batch_size": 8, "max_length": 48, "test_size": 400}},
            {"grid": {"task": ["sentiment"], "variant": ["lorma_pi", "lorma_plus"], "lr": [1e-4, 3e-4, 1e-3, 1e-2],
                      "seed": [0]},
             "fixed": {"epochs": 1, "limit": 768, "batch_size": 8, "max_length": 48, "test_size": 400}},
        ],
    },
    "tier2_long": {
        "description": "About 30 minutes on 2 cores: 250 sentiment steps (2000 texts, batch 8) for LoRA, VeRA at "
                       "its paper's rank and scale, and LoRMA-pi on its paper's targets (query, value) at its "
                       "paper's rate; the runs behind docs/study/tier2/README.md's 250-step table.",
        "sweeps": [
            {"grid": {"task": ["sentiment"], "variant": ["lora"], "lr": [1e-3], "seed": [0]},
             "fixed": {"epochs": 1, "limit": 2000, "batch_size": 8, "max_length": 48}},
            {"grid": {"task": ["sentiment"], "variant": ["vera"], "lr": [4e-3, 1e-2], "seed": [0]},
             "fixed": {"epochs": 1, "limit": 2000, "batch_size": 8, "max_length": 48}},
            {"grid": {"task": ["sentiment"], "variant": ["lorma_pi"], "lr": [4e-4], "seed": [0]},
             "fixed": {"epochs": 1, "limit": 2000, "batch_size": 8, "max_length": 48,
                       "targets": ["query", "value"]}},
        ],
    },
    "qlora": {
        "description": "QLoRA against LoRA (issue 9): LoRA r=8 on SmolLM2-135M in float32 and on its NF4 base "
                       "(bitsandbytes), the quick suite's NLG rates and size, three seeds; 18 trials, about 13 "
                       "minutes a trial on one thread (half of it generation), so about 2 hours with --workers 2.",
        "sweeps": [
            {"grid": {"task": ["nlg_sentiment"], "variant": ["lora"], "lr": [lr], "seed": [0, 1, 2]},
             "fixed": {"epochs": 1, "limit": 256, **({"quantize": q} if q else {})}}
            for lr in (1e-3, 1e-4, 1e-2) for q in (None, "nf4")
        ],
    },
    "smoke": {
        "description": "A minute or two: LoRA and DropLoRA at two learning rates on 200 sentiment examples.",
        "sweeps": [
            {"grid": {"task": ["sentiment"], "variant": ["lora", "droplora"], "lr": [1e-4, 1e-3]},
             "fixed": {"epochs": 1, "limit": 200, "max_length": 32}},
        ],
    },
    "full": {
        "description": "The study's Figs. 7, 9, 10: every variant x 7 learning rates x 3 seeds on all four "
                       "tasks (hours; use --workers or --backend ray).",
        "sweeps": [
            {"grid": {"task": ["sentiment", "bbc", "nlg_sentiment", "fashion"], "variant": "all",
                      "lr": LRS_FULL, "seed": [0, 1, 2]},
             "fixed": {"epochs": 3}},
        ],
    },
}


# --- the papers' claims: suites whose trials findings.py turns into verdicts ---------------------
# The study's 20 evaluated variants (its GLUE Tables IV-X; findings.STUDY_VARIANTS); VeRA is not one.
STUDY_20 = ["lora", "hira", "rasa", "adalora", "melora", "denselora", "randlora", "relora", "dora", "rslora",
            "loraplus", "delora", "eva", "pissa", "lora_ga", "lora_one", "nzlora", "goat", "moslora", "loramoe"]
# The LoRA paper's baselines (its Tables 2-4): lorazoo/baselines.py and forms/prefix.py.
BASELINES = ["full_ft", "ft_top2", "bitfit", "prefix_embed", "prefix_layer", "adapter_h", "adapter_l"]
# PreEmbed's l_p on the 48-token sentiment texts: the preset's 256 (the paper's GPT-3 row, for long inputs)
# would make every sequence 6x longer and a trial 10x LoRA's (forms/prefix.py); 16 is a third of the sequence.
PREEMBED_TOKENS = 16
# The study's NLU grid is 1e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3 around LoRA's best 1e-4 (RoBERTa-base).
# Here LoRA peaks near 1e-3 (quick suite), 10x higher, so the grid keeps the study's 1-5-10 spacing but
# drops 1e-6 (nothing learns there: in the quick suite every variant is at the majority class, <= 0.565,
# already at 1e-5)
# and adds 1e-2 (the structured forms' 10x LoRA's best). 5x LoRA's best (the study's 5e-4) is 5e-3.
LRS_STUDY = [1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2]
SEEDS3 = [0, 1, 2]
LRS_LORMA = [1e-4, 4e-4, 1e-3, 3e-3, 1e-2]
LRS_RANKS = [3e-4, 1e-3, 3e-3, 1e-2]  # lora_paper's rank sweep on query and value
LRS_BASELINES = [1e-5, 1e-4, 1e-3, 1e-2]  # and its baselines
LRS_PREFIX = LRS_BASELINES + [3e-2, 1e-1]  # prefix tuning peaked at 1e-2, the baselines' top: two rates above

# Sizing of `paper` (measured 2026-12-01, one torch thread, LoRA, CPU time of the process, so a core's
# time when the machine is not shared; /tmp/fs/timing_cpu.py):
#   sentiment (MiniLM, batch 8, max_length 48): 0.294 s a step, 9.4 ms a test text, 8 s to build
#     the model and tokenize; fashion (EfficientNet-lite0, batch 16, 96 px): 0.648 s a step, 21.9 ms a
#     test image; nlg_sentiment (SmolLM2-135M, batch 8): 4.33 s a step, 0.49 s a test text
#     (greedy generation, 6 tokens).
#   The 20 variants cost 1.2x LoRA's step on average (docs/study/trials.csv and tier2/trials.csv: HiRA,
#   DenseLoRA, RandLoRA about 2x, most 1.0-1.1x); evaluation 1.1x.
# Test split: the binomial SE of an accuracy p on n texts is sqrt(p(1-p)/n); two cells differ by
#   2·SE·sqrt(2) at 2 SE. At p = 0.8: n = 2000 gives 2·0.0089·1.41 = 0.025 (sentiment has 12,752
#   texts: 2000 leaves 10,752 for training); fashion 1000 gives 0.036 (an image costs 2.3x a text).
# NLU: 250 steps (2000 texts, batch 8; VeRA and LoRMA-π leave zero by 250 steps, docs/study/tier2; AdaLoRA,
#   at the majority class after 96 steps in the quick suite, has not been measured at 250) ->
#   8 + 250·0.294·1.2 + 2·2000·0.0094·1.1 = 8 + 88 + 41 = 137 s a trial; 20 variants x 7 rates x 3 seeds
#   = 420 trials = 57,500 core-s = 8.0 h on 2 workers.
# IC: 100 steps (1600 images, batch 16), 1000 test images -> 5 + 100·0.648·1.2 + 2·1000·0.0219·1.1 = 131 s;
#   5 variants x 3 rates x 3 seeds = 45 trials = 5,900 core-s = 0.8 h.
# NLG: 48 steps (384 texts), 200 test texts (SE 0.028, so 2·SE·sqrt(2) = 0.08: only large effects) ->
#   1 + 48·4.33·1.2 + 2·200·0.49·1.1 = 466 s; LoRA, DoRA, PiSSA x 3 rates x 2 seeds = 18 trials = 8,400
#   core-s = 1.2 h.
# Total: 57,500 + 5,900 + 8,400 = 71,800 core-s = 10.0 h on 2 workers (one thread each). The full design on
#   NLG alone (20 x 7 x 3 at this size) would be 420 x 466 s = 196,000 core-s = 27 h on 2 workers, and on IC
#   (17 variants) 357 x 131 s = 6.5 h: for those, write a config with STUDY_20 on those tasks and run it with
#   --backend ray on more machines.
# Half of each trial's evaluation is run()'s "before" evaluation, the same for every variant that starts as
#   the base: the runner measures it once per (task, seed, task options) and hands it on (runner.py), which
#   takes 2000·0.0094·1.1 = 21 s off a sentiment trial, 24 s off IC and 108 s off NLG: 49,000 + 4,800 + 6,400
#   = 60,200 core-s = 8.4 h on 2 workers; with the 5x sweep below, 9.7 h. Measured on the first 136 sentiment
#   trials (beside other work): 150 s a trial (LoRA 104 s, HiRA 177 s, DenseLoRA 191 s), so expect 10-11 h.
# NLG and IC: one variant per family of the study's taxonomy (as its own high-rank check, Table III, takes
# one per family): LoRA, DoRA (optimization), HiRA (rank, structured), PiSSA (initialization), MoSLoRA (MoE).
# EVA and LoRA-One refuse Conv2d targets and LoRA-GA the 3-channel stem (SpecError), so 17 of the 20 could
# run on fashion at all.
PER_FAMILY = ["lora", "dora", "hira", "pissa", "moslora"]
PAPER_IC_SWEEP = {"grid": {"task": ["fashion"], "variant": PER_FAMILY, "lr": [1e-3, 5e-3, 1e-2], "seed": SEEDS3},
                  "fixed": {"targets": "all-conv", "epochs": 1, "limit": 1600, "batch_size": 16, "test_size": 1000,
                            "lr_schedule": "cosine"}}
PAPER_NLG_SWEEP = {"grid": {"task": ["nlg_sentiment"], "variant": ["lora", "dora", "pissa"], "lr": [1e-4, 1e-3, 1e-2],
                            "seed": [0, 1]},
                   "fixed": {"epochs": 1, "limit": 384, "batch_size": 8, "test_size": 200, "lr_schedule": "cosine"}}
# The study's collapse and init-variant claims are at 5x LoRA's best rate (its 5e-4, the grid's neighbour of
# LoRA's 1e-4). On sentiment LoRA peaks at 5e-4 (this suite, 3 seeds: 0.763; 1e-3 0.708), whose neighbours on
# that grid are 2x and 10x, so the suite adds 2.5e-3 for all 20 (findings.check_collapse needs a rate within
# 1.5x of 5x): 60 trials x ~150 s (measured mean of the first 136) = 1.25 h on 2 workers.
PAPER_NLU_FIXED = {"epochs": 1, "limit": 2000, "batch_size": 8, "max_length": 48, "test_size": 2000, "warmup": 0.03}
PAPER_5X_SWEEP = {"grid": {"task": ["sentiment"], "variant": STUDY_20, "lr": [2.5e-3], "seed": SEEDS3},
                  "fixed": PAPER_NLU_FIXED}
SUITES.update({
    "paper": {
        "description": "The unified study's evaluation (findings.py gives its verdicts in `lorazoo report`): its "
                       "20 evaluated variants on its learning-rate grid, 3 seeds, NLU sentiment (250 steps, "
                       "2000-text test split); one variant per family (LoRA, DoRA, HiRA, PiSSA, MoSLoRA) on IC "
                       "fashion (3 rates, 3 seeds) and LoRA, DoRA, PiSSA on NLG nlg_sentiment (3 rates, 2 seeds); "
                       "and 2.5e-3 on sentiment, 5x LoRA's best there. About a night (9.7 h) on 2 cores with "
                       "--workers 2 (arithmetic in suites.py).",
        "sweeps": [
            {"grid": {"task": ["sentiment"], "variant": STUDY_20, "lr": LRS_STUDY, "seed": SEEDS3},
             "fixed": PAPER_NLU_FIXED},
            PAPER_5X_SWEEP,
            PAPER_IC_SWEEP,
            PAPER_NLG_SWEEP,
        ],
    },
    # DropLoRA (its Fig. 2 sweep: rank 32, alpha 64, pruning rate 0.1-0.5) against LoRA without and with
    # input dropout (0.05, the LLM-Adapters setting DropLoRA follows; 0.1), 5 seeds, at LoRA's two best
    # rates of the quick suite (5e-4, 1e-3) and 2e-4: at rank 32 on every linear, 1e-3 is past the edge of
    # stability for most seeds (docs/study/droplora), so 2e-4 brackets the best rate from below.
    # 8 configurations x 3 rates x 5 seeds = 120 trials of 250 steps, measured 95-100 s a trial on a quiet
    # machine (the base evaluated once per seed): 120 x 100 = 12,000 core-s = 1.7 h on 2 workers.
    "droplora": {
        "description": "DropLoRA's claims: rank dropout 0 (LoRA), 0.1-0.5 against LoRA with input dropout 0.05 "
                       "and 0.1; rank 32, alpha 64, sentiment, 250 steps, 5 seeds, 3 rates; about 1.7 h on "
                       "2 cores (--workers 2).",
        "sweeps": [
            {"grid": {"task": ["sentiment"], "variant": ["lora"], "lr": [2e-4, 5e-4, 1e-3], "seed": [0, 1, 2, 3, 4],
                      "rank_dropout": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]},
             "fixed": {"rank": 32, "alpha": 64, "epochs": 1, "limit": 2000, "batch_size": 8, "max_length": 48,
                       "test_size": 2000}},
            {"grid": {"task": ["sentiment"], "variant": ["lora"], "lr": [2e-4, 5e-4, 1e-3], "seed": [0, 1, 2, 3, 4],
                      "dropout": [0.05, 0.1]},
             "fixed": {"rank": 32, "alpha": 64, "epochs": 1, "limit": 2000, "batch_size": 8, "max_length": 48,
                       "test_size": 2000}},
        ],
    },
    # LoRMA (its Tables 2-5): LoRMA+ and LoRMA-π against LoRA on the paper's targets (query, value),
    # its rank 8 and its rate 4e-4 with three rates above it (on query and value only, LoRA peaks at 3e-3
    # here, so 1e-2 brackets it) and one below, 3 seeds; adapters kept for the ΔW rank
    # (its Table 15) and correlation (its Table 9) analyses. Its Table 7 (pre- vs post-multiplication):
    # LoRMA+ in post order (W0·M, lorma_order="post") on the same grid, against the main sweep's pre order.
    # 4 configurations x 5 rates x 3 seeds = 60 trials of 250 steps on two of the six layers' linears
    # (cheaper steps, ~0.2 s): 8 + 250·0.2·1.5 (LoRMA-π's dense d x d multiplier) + 38 = 121 s,
    # 60 x 121 = 7,300 core-s = 1.0 h.
    "lorma": {
        "description": "LoRMA's claims: LoRMA+ and LoRMA-pi against LoRA on query and value, 5 rates around "
                       "its paper's 4e-4, 3 seeds, sentiment, 250 steps, and LoRMA+ post- against "
                       "pre-multiplication; adapters kept for the ΔW analyses; about an hour on 2 cores "
                       "(--workers 2).",
        "sweeps": [
            {"grid": {"task": ["sentiment"], "variant": ["lora", "lorma_plus", "lorma_pi"],
                      "lr": LRS_LORMA, "seed": SEEDS3},
             "fixed": {"targets": ["query", "value"], "epochs": 1, "limit": 2000, "batch_size": 8,
                       "max_length": 48, "test_size": 2000, "keep_adapter": True}},
            {"grid": {"task": ["sentiment"], "variant": ["lorma_plus"], "lorma_order": ["post"],
                      "lr": LRS_LORMA, "seed": SEEDS3},
             "fixed": {"targets": ["query", "value"], "epochs": 1, "limit": 2000, "batch_size": 8,
                       "max_length": 48, "test_size": 2000}},
        ],
    },
    # The LoRA paper: rank 1, 2, 4, 8, 64 on W_q, W_v (its Table 6; alpha fixed at 16 as it fixes alpha
    # to the first r tried), 4 rates, 3 seeds; r = 8 and r = 64 keep their adapters for the subspace
    # similarity (its Eq. 4, Figs. 3-4: r=8 vs r=64, and r=64 seed vs seed) and amplification (Table 7)
    # analyses; its baselines by the same harness at 4 rates (full fine-tuning needs small rates, BitFit
    # large ones). On query and value, LoRA r=8 peaks at 3e-3 and collapses at 1e-2 (docs/study/lorma), so
    # the ranks' grid goes to 1e-2 to bracket it. 5 ranks x 4 rates x 3 seeds = 60 + 7 baselines x 4 rates
    # x 3 seeds = 84 trials of 250 steps: 60 x ~110 s + 84 x ~140 s (full fine-tuning's step is about 2x
    # LoRA's) = 18,400 core-s = 2.6 h. Prefix tuning peaked at 1e-2, the top of that grid, so its two forms
    # also run at 3e-2 and 1e-1 (12 trials more, ~130 s each: 156 in all). The sweep that keeps adapters
    # runs last, so that a suite continued across sessions has its adapters, and the report that reads
    # them, from the same one.
    "lora_paper": {
        "description": "The LoRA paper's claims: rank 1, 2, 4, 8, 64 on query and value (r=8 and r=64 "
                       "adapters kept for the subspace and amplification analyses), 4 rates, 3 seeds, and its "
                       "baselines (full fine-tuning, FT-Top2, BitFit, prefix-embedding and prefix-layer tuning, "
                       "Adapter-H/L) at 4 rates (prefix tuning at 6); sentiment, 250 steps; about 2.8 h on 2 cores "
                       "(--workers 2).",
        "sweeps": [
            {"grid": {"task": ["sentiment"], "variant": ["lora"], "lr": LRS_RANKS, "seed": SEEDS3,
                      "rank": [1, 2, 4]},
             "fixed": {"targets": ["query", "value"], "alpha": 16, "epochs": 1, "limit": 2000, "batch_size": 8,
                       "max_length": 48, "test_size": 2000}},
            {"grid": {"task": ["sentiment"], "variant": [b for b in BASELINES if not b.startswith("prefix_")],
                      "lr": LRS_BASELINES, "seed": SEEDS3},
             "fixed": {"epochs": 1, "limit": 2000, "batch_size": 8, "max_length": 48, "test_size": 2000}},
            {"grid": {"task": ["sentiment"], "variant": ["prefix_layer"], "lr": LRS_PREFIX, "seed": SEEDS3},
             "fixed": {"epochs": 1, "limit": 2000, "batch_size": 8, "max_length": 48, "test_size": 2000}},
            {"grid": {"task": ["sentiment"], "variant": ["prefix_embed"], "lr": LRS_PREFIX,
                      "seed": SEEDS3},
             "fixed": {"prefix_tokens": PREEMBED_TOKENS, "epochs": 1, "limit": 2000, "batch_size": 8,
                       "max_length": 48, "test_size": 2000}},
            {"grid": {"task": ["sentiment"], "variant": ["lora"], "lr": LRS_RANKS, "seed": SEEDS3,
                      "rank": [8, 64]},
             "fixed": {"targets": ["query", "value"], "alpha": 16, "epochs": 1, "limit": 2000, "batch_size": 8,
                       "max_length": 48, "test_size": 2000, "keep_adapter": True}},
        ],
    },
    "findings_smoke": {
        "description": "About 4 minutes on 2 cores: LoRA, LoRMA+ and DoRA at one rate, 2 seeds, 64 sentiment "
                       "steps (8 + 64·0.35 + 2·200·0.0094 = 34 s a trial); enough trials for `lorazoo report` to "
                       "reach some findings' verdict code (a pipeline check, not evidence: one rate is no tuning).",
        "sweeps": [
            {"grid": {"task": ["sentiment"], "variant": ["lora", "lorma_plus", "dora"], "lr": [1e-3],
                      "seed": [0, 1]},
             "fixed": {"epochs": 1, "limit": 512, "batch_size": 8, "max_length": 32, "test_size": 200,
                       "keep_adapter": True}},
        ],
    },
})


def suites() -> list[str]:
    return sorted(SUITES)


def suite(name: str) -> dict:
    """The study config of suite ``name`` (a copy, named after the suite). Baseline presets
    (:data:`BASELINES`) that are not registered yet are left out of their sweeps, and the
    description says so; a sweep left with no variant is dropped."""
    if name not in SUITES:
        raise StudyError(f"unknown suite {name!r}; suites: {', '.join(sorted(SUITES))}")
    cfg = {"name": name, **copy.deepcopy(SUITES[name])}
    wanted = {v for sw in cfg.get("sweeps", []) for v in (sw["grid"].get("variant") or []) if v in BASELINES}
    if wanted:
        from ..variants import variants

        missing = sorted(wanted - set(variants()))
        if missing:
            for sw in cfg["sweeps"]:
                if isinstance(sw["grid"].get("variant"), list):
                    sw["grid"]["variant"] = [v for v in sw["grid"]["variant"] if v not in missing]
            cfg["sweeps"] = [sw for sw in cfg["sweeps"] if sw["grid"].get("variant") != []]
            cfg["description"] = (cfg.get("description", "") + f" (left out, not registered yet: "
                                  f"{', '.join(missing)})")
    return cfg
