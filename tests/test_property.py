"""Property-based tests (hypothesis): any spec, any damaged file, gives a lorazoo error or a working
adapter, and an error leaves the model exactly as it was (weights, module types, requires_grad
flags, adapters).

Specs are drawn over every registered part (lorazoo.registry.REGISTRIES), every declared option
with valid and invalid values, ranks, dropouts, targets and modules_to_save, good and bad. Files are
real saves (with base shifts, shared banks, a saved head) that are truncated, flipped, edited,
re-shaped or loaded onto another model.

The default run is small and deterministic (``derandomize=True``, about 40 examples per property);
``pytest -m fuzz`` runs the same properties with many random examples.
"""
from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch import nn

import lorazoo
from lorazoo import AdapterSpec, LoadError, LorazooError
from lorazoo.presets import PRESETS
from lorazoo.registry import REGISTRIES
from tiny import TinyNet, calibration_batches, perturb, rewrite_file, tiny_data, train

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
FAST = settings(max_examples=40, derandomize=True, **_COMMON)
LONG = settings(max_examples=1500, derandomize=False, **_COMMON)

X, Y = tiny_data(16)


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m).__name__ for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            dict(lorazoo.handles_of(model)))


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[1] == before[1], "module types changed"
    assert after[2] == before[2], "requires_grad flags changed"
    assert after[3] == before[3], "adapters changed"
    assert after[0].keys() == before[0].keys(), "state_dict keys changed"
    for k, v in before[0].items():
        torch.testing.assert_close(after[0][k], v, rtol=0, atol=0, msg=f"{k} changed")


def assert_works(model, handle):
    """An inference forward gives finite logits (training forwards run in ``train``, with the labels
    that label-routed forms such as MoA require)."""
    training = model.training
    model.eval()
    out = model(X).logits
    model.train(training)
    assert torch.isfinite(out).all(), f"non-finite output from {handle.spec!r}"


# --- specs -------------------------------------------------------------------------------------
PARTS = {axis: reg.names() for axis, reg in REGISTRIES.items()}
OPTIONS = {}  # every declared option of every part, with its default
for _reg in REGISTRIES.values():
    for _name in _reg.names():
        OPTIONS.update(getattr(_reg.get(_name).obj, "options", {}))

JUNK = [None, True, False, -1, 0, 10**400, 2**64, -(10**30), 1e308, -1e-300, float("nan"), float("inf"),
        "", "x", "lora", [], [1], {}, {"a": 1}, 2.5, 0.999, 1.0]


def option_value(default):
    """A value an option of this default could well take (valid or not for the part)."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.one_of(st.just(default), st.integers(0, 3 * max(abs(default), 4)))
    if isinstance(default, float):
        return st.one_of(st.just(default), st.floats(0.0, 4 * max(abs(default), 1.0), allow_nan=False))
    if isinstance(default, str):
        return st.sampled_from([default, default, "derived", "ipa", "kpa", "gelu", "identity", "kaiming", "x"])
    return st.one_of(st.none(), st.integers(1, 12), st.floats(0, 1, allow_nan=False))


GOOD = {  # plausible values of each field
    "form": st.sampled_from(PARTS["form"]),
    "init": st.one_of(st.just("default"), st.sampled_from(PARTS["init"])),
    "scale": st.sampled_from(PARTS["scale"]),
    "optim": st.one_of(st.just("default"), st.just("default"), st.sampled_from(PARTS["optim"])),
    "schedule": st.one_of(st.just("none"), st.just("none"), st.sampled_from(PARTS["schedule"])),
    "rank": st.one_of(st.integers(1, 4), st.integers(1, 16)),
    "alpha": st.one_of(st.just(16.0), st.floats(0.01, 64, allow_nan=False)),
    "rank_dropout": st.one_of(st.just(0.0), st.floats(0, 0.9)),
    "dropout": st.one_of(st.just(0.0), st.floats(0, 0.9)),
    "targets": st.sampled_from(["all-linear", ["fc1"], ["fc2"], ["fc1", "fc2"], ["head"], r"fc\d", ".*",
                                ("fc2",)]),
    "modules_to_save": st.sampled_from([[], [], ["head"], ["fc2"], ["fc1", "head"]]),
    "seed": st.integers(0, 2**31),
}
BAD = {  # values that must be refused (or, for some, that a part may refuse)
    **{axis: st.sampled_from(JUNK + ["no-such-part"]) for axis in PARTS},
    "rank": st.sampled_from(JUNK + [10**9, 13, 17]),
    "alpha": st.sampled_from(JUNK),
    "rank_dropout": st.sampled_from(JUNK),
    "dropout": st.sampled_from(JUNK),
    "targets": st.sampled_from(["all-conv", "(", [], ["nothing"], ["fc1", "nothing"], [""], 5, None, [3]]),
    "modules_to_save": st.sampled_from([["nope"], [""], None, 5, "head", [3], ["fc1"], ["base"]]),
    "seed": st.sampled_from([-1, 2**64, 2**64 - 1, 1.5, None, "0"]),
}


@st.composite
def spec_kwargs(draw, hostile=True):
    """Plausible specs over every registered part (some from the presets); in about a third of them
    one to three fields, or the options, hold a bad value."""
    bad = set() if not hostile else draw(st.one_of(st.just(set()), st.just(set()), st.sets(st.sampled_from(sorted(BAD) + ["options"]), min_size=1,
                                                 max_size=3)), label="bad fields")
    kw = {key: draw(BAD[key] if key in bad else GOOD[key], label=key) for key in GOOD}
    if not hostile or draw(st.booleans(), label="from a preset"):  # the catalogue's combinations of parts and options
        preset = PRESETS[draw(st.sampled_from(sorted(PRESETS)), label="preset")].parts
        kw.update({k: v for k, v in preset.items() if k not in bad and k not in ("rank", "alpha", "targets")})
    declared = {}
    for axis in PARTS:
        name = kw[axis]
        if isinstance(name, str) and name in PARTS[axis]:
            declared.update(getattr(REGISTRIES[axis].get(name).obj, "options", {}))
    for key, default in declared.items():
        if draw(st.integers(0, 3), label=f"set {key}") == 0:
            kw[key] = draw(st.sampled_from(JUNK) if "options" in bad else option_value(default), label=key)
    if "options" in bad and draw(st.booleans(), label="unknown option"):  # no chosen part declares it
        key = draw(st.sampled_from(sorted(set(OPTIONS) - set(declared)) + ["no_such_option"]), label="option")
        kw[key] = draw(option_value(OPTIONS.get(key, 1.0)), label=key)
    return kw


def check_spec(data, hostile=True):
    kw = data.draw(spec_kwargs(hostile), label="spec")
    calibration = calibration_batches(2, 8) if data.draw(st.integers(0, 4), label="calib") else None
    model = TinyNet()
    if data.draw(st.booleans(), label="second adapter"):  # an adapter already there, saving the head
        lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1"], modules_to_save=["head"]), name="first")
    before = snapshot(model)
    try:
        spec = AdapterSpec(**kw)
        handle = lorazoo.adapt(model, spec, name="drawn", calibration=calibration)
    except LorazooError as e:
        note(f"refused: {e}")
        event(f"refused: {type(e).__name__}")
        assert_unchanged(model, before)
        return
    event("a working adapter")
    assert_works(model, handle)
    perturb(handle)
    assert_works(model, handle)
    losses = train(model, handle, steps=2, data=(X, Y))  # every hook of the parts runs
    assert all(math.isfinite(v) for v in losses), f"non-finite loss {losses} from {handle.spec!r}"
    assert_works(model, handle)
    handle.delete()  # gives the model back (up to float rounding of undone base shifts)
    after = snapshot(model)
    assert after[1] == before[1] and after[3] == before[3]
    for k, v in before[0].items():
        torch.testing.assert_close(after[0][k], v, rtol=1e-9, atol=1e-12)


# --- files -------------------------------------------------------------------------------------
SAVES = {  # adapters with base shifts (PiSSA), shared banks (VeRA), a rescaled output (DoRA), a saved head
    "pissa": dict(rank=2, init="pissa", targets=["fc1", "fc2"]),
    "vera": dict(form="vera", rank=4, targets=["fc1", "fc2"]),
    "dora_head": dict(form="dora", rank=2, targets=["fc1"], modules_to_save=["head"]),
}
_SAVED: dict[str, tuple[Path, torch.Tensor]] = {}


def saved(kind: str) -> tuple[Path, torch.Tensor]:
    """A folder holding a save of adapter ``kind`` (made once), and the outputs it gives."""
    if kind not in _SAVED:
        folder = Path(tempfile.mkdtemp(prefix=f"lorazoo_prop_{kind}_"))
        atexit.register(shutil.rmtree, folder, True)
        model = TinyNet()
        h = lorazoo.adapt(model, AdapterSpec(**SAVES[kind]))
        perturb(h)
        h.save(folder)
        _SAVED[kind] = folder, model(X).logits.detach()
    return _SAVED[kind]


def json_values():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([10**20, -(2**63)]),
                     st.floats(-1e6, 1e6, allow_nan=False), st.text(max_size=6), st.sampled_from(PARTS["form"]))
    return st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                        max_leaves=6)


def _edit_config(data, cfg: dict) -> None:
    where = data.draw(st.sampled_from(["top", "spec", "ranks", "fingerprint", "drop"]), label="edit")
    value = data.draw(json_values(), label="value")
    if where == "top":
        cfg[data.draw(st.sampled_from(sorted(cfg) + ["extra"]), label="key")] = value
    elif where == "spec" and isinstance(cfg.get("spec"), dict):
        cfg["spec"][data.draw(st.sampled_from(sorted(cfg["spec"]) + sorted(OPTIONS)), label="key")] = value
    elif where == "ranks":
        cfg["ranks"][data.draw(st.sampled_from(["fc1", "fc2", "head", "nope"]), label="key")] = value
    elif where == "fingerprint":
        layer = data.draw(st.sampled_from(sorted(cfg["fingerprint"])), label="layer")
        cfg["fingerprint"][layer] = data.draw(st.one_of(st.just(value), st.just(
            [cfg["fingerprint"][layer][0], [1.0, 2.0, 3.0]])), label="fp")
    else:
        cfg.pop(data.draw(st.sampled_from(sorted(cfg)), label="key"))


def _edit_tensors(data, tensors: dict) -> None:
    key = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    t = tensors[key]
    how = data.draw(st.sampled_from(["transpose", "reshape", "grow", "swap", "rename", "drop", "dtype"]),
                    label="how")
    if how == "transpose" and t.dim() == 2 and t.shape[0] != t.shape[1]:
        tensors[key] = t.t().contiguous()
    elif how == "reshape" and t.numel() > 1:
        tensors[key] = t.reshape(-1).contiguous() if t.dim() > 1 else t.reshape(1, -1).contiguous()
    elif how == "grow":
        tensors[key] = torch.cat([t, t[:1]]) if t.dim() and t.shape[0] else torch.zeros(1, *t.shape[1:], dtype=t.dtype)
    elif how == "swap":
        other = data.draw(st.sampled_from(sorted(tensors)), label="other")
        tensors[key], tensors[other] = tensors[other], t
        assume(tensors[key].shape != t.shape or not torch.equal(tensors[key], t))
    elif how == "rename":
        tensors[key + "x"] = tensors.pop(key)
    elif how == "drop":
        tensors.pop(key)
    else:
        tensors[key] = t.to(data.draw(st.sampled_from([torch.float32, torch.float16, torch.int64]), label="dtype"))


def check_file(data):
    kind = data.draw(st.sampled_from(sorted(SAVES)), label="kind")
    source, outputs = saved(kind)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "a"
        shutil.copytree(source, folder)
        f = folder / "adapter.safetensors"
        size = f.stat().st_size
        damage = data.draw(st.sampled_from(["truncate", "flip", "config", "tensors", "json", "model", "none"]),
                           label="damage")
        lenient = damage in ("config", "json")  # a deliberate, consistent edit may be a valid adapter
        if damage == "truncate":
            f.write_bytes(f.read_bytes()[:data.draw(st.integers(0, size - 1), label="offset")])
        elif damage == "flip":
            raw = bytearray(f.read_bytes())
            header_end = 8 + int.from_bytes(raw[:8], "little")  # the JSON header, with the config
            at = data.draw(st.one_of(st.integers(0, size - 1), st.integers(8, header_end - 1)), label="offset")
            raw[at] ^= data.draw(st.one_of(st.integers(1, 255), st.sampled_from([1, 2, 4, 8])), label="mask")
            f.write_bytes(bytes(raw))
        elif damage == "config":
            rewrite_file(folder, change_config=lambda cfg: _edit_config(data, cfg))
        elif damage == "tensors":
            def edit(tensors):
                shapes = {k: v.shape for k, v in tensors.items()}
                _edit_tensors(data, tensors)
                kept.append(shapes == {k: v.shape for k, v in tensors.items()})

            kept: list[bool] = []
            rewrite_file(folder, change_tensors=edit)
            lenient = kept == [True]  # same names and shapes, other values: a valid (other) adapter
        elif damage == "json":  # a file without the header config falls back on the JSON beside it
            from safetensors.torch import load_file, save_file
            save_file(load_file(str(f)), str(f))
            cfg = json.loads((folder / "adapter_config.json").read_text())
            _edit_config(data, cfg)
            (folder / "adapter_config.json").write_text(json.dumps(cfg))

        target = data.draw(st.sampled_from(["same", "same", "other seed", "other shape", "adapted"]), label="model")
        if damage == "model" and target == "same":
            target = "other seed"
        if target == "same":
            model = TinyNet()
        elif target == "other seed":
            model = TinyNet(seed=5)
        elif target == "other shape":
            model = nn.Sequential()
            model.fc1, model.fc2 = nn.Linear(12, 8).double(), nn.Linear(8, 16).double()
        else:  # the right base, with another adapter (and a saved head) on it already
            model = TinyNet()
            lorazoo.adapt(model, AdapterSpec(rank=1, targets=["fc2"], modules_to_save=["head"]), name="first")
        before = snapshot(model)
        try:
            handle = lorazoo.load(model, folder, name="loaded")
        except LoadError as e:
            note(f"refused: {e}")
            event(f"{damage}: refused")
            assert_unchanged(model, before)
            return
        event(f"{damage}: loaded")
        # Loaded: only the right base may take it, and it must be the adapter that was saved unless
        # the config was deliberately (consistently) edited.
        assert target in ("same", "adapted"), f"loaded onto a {target} model"
        if target == "same" and not lenient:
            torch.testing.assert_close(model(X).logits, outputs, rtol=0, atol=0,
                                       msg=f"{damage} damage loaded as a different adapter")
        assert_works(model, handle)


def _pair(check):
    """The fast, deterministic test of a property and its long random (``-m fuzz``) run."""
    def run(data):
        check(data)

    def run_long(data):
        check(data)

    run.__name__, run_long.__name__ = check.__name__, check.__name__ + "_fuzz"
    return FAST(given(st.data())(run)), pytest.mark.fuzz(LONG(given(st.data())(run_long)))


def check_plausible_spec(data):
    check_spec(data, hostile=False)


test_any_spec_gives_an_adapter_or_a_lorazoo_error, test_any_spec_fuzz = _pair(check_spec)
test_plausible_specs_give_an_adapter_or_a_named_conflict, test_plausible_specs_fuzz = _pair(check_plausible_spec)
test_any_damaged_file_gives_a_load_error, test_any_damaged_file_fuzz = _pair(check_file)


def test_the_parts_drawn_are_every_registered_part():
    assert all(PARTS[axis] for axis in ("form", "init", "scale", "optim", "schedule"))
    assert set(PARTS["form"]) >= {"lora", "dora", "vera", "adalora", "loha", "lokr"}
    assert {"loraplus_ratio", "experts", "pissa_niter"} <= set(OPTIONS)


def test_a_flipped_digit_in_the_config_is_caught(tmp_path):
    """Found by the file property: the tensors' checksum did not cover the config in the header, so
    one flipped byte (alpha 16 -> 36) loaded silently as another adapter. The config has its own
    checksum now (``config_checksum``)."""
    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1", "fc2"]))
    perturb(h)
    h.save(tmp_path)
    f = tmp_path / "adapter.safetensors"
    raw = bytearray(f.read_bytes())
    at = raw.index(b'"alpha\\": 16')
    raw[at + len(b'"alpha\\": ')] ^= 0x02  # '1' -> '3'
    f.write_bytes(bytes(raw))
    fresh = TinyNet()
    before = snapshot(fresh)
    with pytest.raises(LoadError, match="does not match the checksum it records"):
        lorazoo.load(fresh, tmp_path)
    assert_unchanged(fresh, before)
