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
TIER2_STUDY = ["lora", "vera", "relora", "hira", "melora", "delora", "rasa", "denselora", "randlora",
               "nzlora", "olora", "lora_one", "corda", "corda_kpa", "loramoe", "goat", "aurora", "loran"]

SUITES: dict[str, dict] = {
    "quick": {
        "description": "About an hour on 2 cores (--workers 2): every variant x 6 learning rates (1e-5..1e-2) "
                       "on the NLU sentiment task, one seed; then 4 variants x 3 learning rates on NLG and IC.",
        "sweeps": [
            {"grid": {"task": ["sentiment"], "variant": "all", "lr": LRS_WIDE, "seed": [0]},
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


def suite(name: str) -> dict:
    """The study config of suite ``name`` (a copy, named after the suite)."""
    if name not in SUITES:
        raise StudyError(f"unknown suite {name!r}; suites: {', '.join(sorted(SUITES))}")
    return {"name": name, **copy.deepcopy(SUITES[name])}


def suites() -> list[str]:
    return sorted(SUITES)
