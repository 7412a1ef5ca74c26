"""AdapterSpec: presets, options, and clear errors before anything changes."""
import json

import pytest
import torch

import lorazoo
from lorazoo import AdapterSpec, SpecError


def test_every_tier1_preset_exists_and_describes_itself():
    tier1 = ["lora", "droplora", "lorma_plus", "lorma_pi", "rslora", "loraplus", "dora", "pissa", "milora",
             "lora_ga", "eva", "adalora", "relora", "vera", "loha", "lokr", "moslora", "hydralora", "lora_pro"]
    assert set(tier1) <= set(lorazoo.variants())
    for name in tier1:
        d = lorazoo.describe(name)
        assert d["family"] and d["paper"] and d["parts"]["form"]


def test_preset_overrides_and_roundtrip():
    spec = AdapterSpec.preset("droplora", rank=32, rank_dropout=0.3)
    assert (spec.rank, spec.rank_dropout, spec.form) == (32, 0.3, "lora")
    again = AdapterSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


@pytest.mark.parametrize("kwargs, words", [
    ({"form": "nope"}, "unknown form 'nope'"),
    ({"init": "nope"}, "unknown init"),
    ({"rank": 0}, "rank must be >= 1"),
    ({"rank": 2.5}, "rank must be an integer"),
    ({"rank": "8"}, "rank must be an integer"),
    ({"alpha": -1}, "alpha must be > 0"),
    ({"alpha": float("nan")}, "alpha must be a number"),
    ({"rank_dropout": 1.0}, "rank_dropout must be <="),
    ({"dropout": -0.1}, "dropout must be >= 0"),
    ({"targets": []}, "targets must be a non-empty list"),
    ({"targets": "("}, "not a valid regular expression"),
    ({"not_an_option": 3}, "unknown option(s) not_an_option"),
    ({"alpha": 10**309}, "alpha is too large"),
    ({"rank": 1e309}, "rank must be an integer"),
    ({"seed": 2**64}, "seed must be <="),
    ({"seed": True}, "seed must be an integer"),
    ({"modules_to_save": None}, "modules_to_save must be a list"),
    ({"modules_to_save": 5}, "modules_to_save must be a list"),
])
def test_bad_specs_are_refused_with_a_clear_message(kwargs, words):
    with pytest.raises(SpecError) as e:
        AdapterSpec(**kwargs)
    assert words in str(e.value)


def test_unknown_preset():
    with pytest.raises(SpecError, match="unknown variant 'nope'; known variants: .*lora"):
        AdapterSpec.preset("nope")
    with pytest.raises(SpecError, match="unknown variant"):
        AdapterSpec.preset(["lora"])


@pytest.mark.parametrize("kwargs, words", [
    ({"form": "moslora", "optim": "lora_pro"}, "lora_pro"),
    ({"form": "moslora", "schedule": "relora"}, "relora"),
    ({"form": "lokr", "init": "pissa"}, "pissa"),
    ({"form": "lorma_plus", "init": "eva"}, "eva"),
    ({"form": "hydralora", "schedule": "relora"}, "relora"),
    ({"form": "lora", "schedule": "adalora"}, "adalora"),
])
def test_meaningless_combinations_are_refused(kwargs, words):
    with pytest.raises(SpecError) as e:
        AdapterSpec(**kwargs)
    assert words in str(e.value)


def test_meaningful_combination_builds_and_runs():
    from tiny import TinyNet, calibration_batches, tiny_data, train

    spec = AdapterSpec(form="dora", init="pissa", scale="rslora", optim="loraplus", rank=4, rank_dropout=0.3,
                       targets=["fc1", "fc2"])
    model = TinyNet()
    base = model(tiny_data()[0]).logits
    handle = lorazoo.adapt(model, spec, calibration=calibration_batches())
    model.eval()
    torch.testing.assert_close(model(tiny_data()[0]).logits, base, rtol=1e-6, atol=1e-9)
    losses = train(model, handle, steps=30, lr=1e-2)
    assert losses[-1] < losses[0]
