"""Targets, several adapters on one model, and save/load failure modes."""
import json

import pytest
import torch

import lorazoo
from lorazoo import AdapterSpec, LoadError, SpecError, TargetError
from tiny import TinyNet, perturb, rewrite_file, tiny_data


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)


@pytest.mark.parametrize("targets, expected", [
    ("all-linear", {"fc1", "fc2"}),            # the output head is left alone
    (["fc2"], {"fc2"}),
    (r"fc\d", {"fc1", "fc2"}),
])
def test_target_selection(targets, expected):
    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, targets=targets))
    assert set(h.layers()) == expected


def test_suffix_targets_in_nested_models():
    outer = torch.nn.ModuleDict({"enc": TinyNet()})
    h = lorazoo.adapt(outer, AdapterSpec(rank=2, targets=["fc1"]))
    assert set(h.layers()) == {"enc.fc1"}


@pytest.mark.parametrize("spec, error, words", [
    (AdapterSpec(targets=["nothing"]), TargetError, "matched no linear layer"),
    (AdapterSpec(targets=["fc1", "nothing"]), TargetError, "'nothing' match no linear layer"),
    (AdapterSpec(rank=13, targets=["fc1"]), SpecError, "rank 13 is too large for layer 'fc1' (12 -> 16)"),
    (AdapterSpec(targets=["fc1"], modules_to_save=["nope"]), TargetError, "names no module"),
])
def test_bad_targets_fail_before_anything_changes(spec, error, words):
    model = TinyNet()
    before = state(model)
    with pytest.raises(error) as e:
        lorazoo.adapt(model, spec)
    assert words in str(e.value)
    assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())


def test_several_named_adapters_activate_and_delete():
    x, _ = tiny_data()
    model = TinyNet()
    base = model(x).logits
    a = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1"]), name="a")
    perturb(a, seed=1)
    out_a = model(x).logits
    b = lorazoo.adapt(model, AdapterSpec(rank=3, targets=["fc1", "fc2"]), name="b")
    perturb(b, seed=2)
    out_b = model(x).logits  # b alone is active after adapt
    assert all(not p.requires_grad for _, ad in a.adapters().items() for p in ad.parameters())
    lorazoo.activate(model, "a")
    torch.testing.assert_close(model(x).logits, out_a)
    lorazoo.activate(model, "a", "b")
    both = model(x).logits
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)
    a.merge()
    b.merge()
    torch.testing.assert_close(model(x).logits, both, rtol=1e-6, atol=1e-9)
    with pytest.raises(lorazoo.LorazooError, match="unmerge 'b' first"):
        a.unmerge()
    b.unmerge()
    a.unmerge()
    with pytest.raises(SpecError, match="already has an adapter named 'a'"):
        lorazoo.adapt(model, AdapterSpec(rank=2), name="a")
    lorazoo.delete(model, "a")
    lorazoo.activate(model, "b")
    torch.testing.assert_close(model(x).logits, out_b, rtol=1e-6, atol=1e-9)
    b.delete()
    torch.testing.assert_close(model(x).logits, base, rtol=1e-6, atol=1e-9)
    assert isinstance(model.fc1, torch.nn.Linear) and lorazoo.handles_of(model) == {}


def test_disabled_gives_base_output():
    x, _ = tiny_data()
    model = TinyNet()
    base = model(x).logits
    h = lorazoo.adapt(model, AdapterSpec(rank=2))
    perturb(h)
    with h.disabled():
        torch.testing.assert_close(model(x).logits, base)
    assert not torch.allclose(model(x).logits, base)


@pytest.fixture
def saved(tmp_path):
    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1", "fc2"]))
    perturb(h)
    h.save(tmp_path)
    return tmp_path


def test_load_onto_a_different_base_fails_and_leaves_model(saved):
    other = TinyNet(seed=99)
    before = state(other)
    with pytest.raises(LoadError, match="different base model"):
        lorazoo.load(other, saved)
    assert_unchanged(other, before)


def test_truncated_file_fails_cleanly(saved):
    f = saved / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    model = TinyNet()
    before = state(model)
    with pytest.raises(LoadError, match="truncated or corrupt"):
        lorazoo.load(model, saved)
    assert_unchanged(model, before)


def test_newer_version_is_refused(saved):
    rewrite_file(saved, lambda cfg: cfg.update(lorazoo_version="99.0.0"))
    with pytest.raises(LoadError, match="newer than this lorazoo"):
        lorazoo.load(TinyNet(), saved)


def test_save_killed_between_its_two_renames_leaves_a_matching_pair(tmp_path, monkeypatch):
    x, _ = tiny_data()
    model = TinyNet()
    lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1", "fc2"]), name="a").save(tmp_path)
    other = TinyNet()
    hb = lorazoo.adapt(other, AdapterSpec(rank=3, form="dora", targets=["fc2"]), name="b")
    perturb(hb)
    import lorazoo.files as files

    real, calls = files._atomic, []

    def killed_after_first(target, write):
        calls.append(target.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies before the config's rename
        real(target, write)

    monkeypatch.setattr(files, "_atomic", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        hb.save(tmp_path)
    monkeypatch.undo()
    (tmp_path / ".adapter.safetensors.leftover").write_bytes(b"x")  # a killed save's temporary
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)  # the new tensors with their own config, not the old JSON
    assert loaded.name == "b" and loaded.spec == hb.spec
    torch.testing.assert_close(fresh(x).logits, other(x).logits, rtol=1e-6, atol=1e-9)
    hb.save(tmp_path)  # a complete save cleans the temporaries a killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_missing_folder_and_bad_json(tmp_path):
    with pytest.raises(LoadError, match="holds no adapter_config.json"):
        lorazoo.load(TinyNet(), tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        lorazoo.load(TinyNet(), tmp_path)


def test_failed_save_keeps_the_earlier_save(saved, monkeypatch):
    before = (saved / "adapter.safetensors").read_bytes()
    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1", "fc2"]))
    import lorazoo.files as files

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", boom)
    with pytest.raises(OSError):
        h.save(saved)
    assert (saved / "adapter.safetensors").read_bytes() == before
    assert sorted(p.name for p in saved.iterdir()) == ["adapter.safetensors", "adapter_config.json"]


def test_no_pickle_in_saved_files(saved):
    for f in saved.iterdir():
        assert not f.read_bytes().startswith(b"\x80")  # pickle protocol marker
