"""modules_to_save: a module trained and saved in full beside the adapter (lorazoo.saved).

Each adapter trains its own copy of the module; the original is kept frozen, so disabled() and
delete() give it back exactly and activate() switches between adapters' copies (as PEFT does). A
module cannot be both adapted and saved in full: that is refused in adapt(), before any change."""
import pytest
import torch
from torch import nn

import lorazoo
from lorazoo import AdapterSpec, LorazooError, TargetError
from lorazoo.saved import SavedModule
from tiny import TinyNet, perturb, tiny_data, train


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m).__name__ for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            dict(lorazoo.handles_of(model)))


def assert_same(model, before):
    after = snapshot(model)
    assert after[1:] == before[1:]
    assert after[0].keys() == before[0].keys()
    for k, v in before[0].items():
        torch.testing.assert_close(after[0][k], v, rtol=0, atol=0)


class Nested(nn.Module):
    """enc (a TinyNet) and a head of its own, to test containment both ways."""

    def __init__(self):
        super().__init__()
        self.enc = TinyNet()
        self.out = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.out(self.enc(x).logits)


def _with_a(model):  # another adapter already on fc1 and saving head
    lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1"], modules_to_save=["head"]), name="a")
    return model


@pytest.mark.parametrize("build, spec, words", [
    (TinyNet, AdapterSpec(targets=["fc1", "fc2"], modules_to_save=["fc1"]),
     "names 'fc1', which is 'fc1', a target of this adapter"),
    (TinyNet, AdapterSpec(targets=r"fc\d", modules_to_save=["fc2"]), "which is 'fc2', a target of this adapter"),
    (Nested, AdapterSpec(targets=["fc1"], modules_to_save=["enc"]), "names 'enc', which contains 'enc.fc1'"),
    (Nested, AdapterSpec(targets=["out"], modules_to_save=["enc", "fc2"]), "'enc.fc2', which overlaps 'enc'"),
    (lambda: _with_a(TinyNet()), AdapterSpec(targets=["fc2"], modules_to_save=["fc1"]),
     "which is the adapted layer 'fc1' (adapter(s) 'a')"),
    (lambda: _with_a(TinyNet()), AdapterSpec(targets=["fc2"], modules_to_save=["base"]),
     "names 'fc1.base', which is inside the adapted layer 'fc1'"),
    (lambda: _with_a(TinyNet()), AdapterSpec(targets=["fc2"], modules_to_save=["original"]),
     "names 'head.original', which is inside 'head', a module already saved in full by adapter(s) 'a'"),
    (TinyNet, AdapterSpec(targets=["fc1"], modules_to_save=["nope"]), "names no module"),
])
def test_conflicts_are_refused_before_anything_changes(build, spec, words):
    model = build()
    before = snapshot(model)
    with pytest.raises(TargetError) as e:
        lorazoo.adapt(model, spec, name="b")
    assert words in str(e.value)
    assert_same(model, before)


def test_all_linear_leaves_saved_modules_alone():
    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, modules_to_save=["fc2"]))  # "all-linear"
    assert set(h.layers()) == {"fc1"} and set(h.saved_modules()) == {"fc2"}
    with pytest.raises(TargetError, match="left no layer to adapt"):
        lorazoo.adapt(TinyNet(), AdapterSpec(rank=2, modules_to_save=["fc1", "fc2"]))


def test_a_saved_adapted_layer_no_longer_breaks_save(tmp_path):
    """The issue's case: modules_to_save naming a target used to train the base weight in full and
    fail in save with safetensors' shared-memory error. Now refused up front; the valid spec saves."""
    with pytest.raises(TargetError, match="cannot be adapted and trained in full"):
        lorazoo.adapt(TinyNet(), AdapterSpec(rank=2, targets=["fc1", "head"], modules_to_save=["head"]))
    x, y = tiny_data()
    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1", "fc2"], modules_to_save=["head"]))
    train(model, h, steps=5)
    h.save(tmp_path)
    other = TinyNet()
    lorazoo.load(other, tmp_path)
    torch.testing.assert_close(other(x).logits, model(x).logits, rtol=0, atol=0)


def test_the_copy_trains_and_the_original_is_kept():
    x, _ = tiny_data()
    model = TinyNet()
    base = model(x).logits
    original = model.head
    w0 = original.weight.detach().clone()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1"], modules_to_save=["head"]))
    assert isinstance(model.head, SavedModule) and model.head.original is original
    torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)  # starts as the base
    copy = h.saved_modules()["head"]
    assert copy is not original and model.head.weight is copy.weight  # attribute reads: the copy that runs
    assert {id(p) for p in copy.parameters()} <= {id(p) for p in h.trainable_parameters()}
    assert all(p.requires_grad for p in copy.parameters())
    assert not any(p.requires_grad for p in original.parameters())
    train(model, h, steps=5)
    assert not torch.equal(copy.weight, w0)
    torch.testing.assert_close(original.weight, w0, rtol=0, atol=0)
    assert set(h.state_dict()) >= {"head.weight", "head.bias"}  # the file format is unchanged


def test_disabled_and_delete_give_the_original_module_back():
    x, _ = tiny_data()
    model = TinyNet()
    base = model(x).logits
    before = snapshot(model)
    original = model.head
    h = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1"], modules_to_save=["head"]))
    train(model, h, steps=5)
    trained = model(x).logits
    with h.disabled():
        torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)
        assert model.head.weight is original.weight
    torch.testing.assert_close(model(x).logits, trained, rtol=0, atol=0)
    lorazoo.activate(model)  # no adapter active: the original runs
    torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)
    h.activate()
    torch.testing.assert_close(model(x).logits, trained, rtol=0, atol=0)
    h.delete()
    assert model.head is original
    torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)
    # the same modules and values; only the flags adapt() froze stay frozen, as for the base layers
    assert_same(model, (before[0], before[1], {n: False for n in before[2]}, {}))


def test_each_adapter_has_its_own_copy_and_activate_switches(tmp_path):
    x, _ = tiny_data()
    model = TinyNet()
    a = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1"], modules_to_save=["head"]), name="a")
    perturb(a, seed=1)
    out_a = model(x).logits
    b = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc2"], modules_to_save=["head"]), name="b")
    perturb(b, seed=2)
    out_b = model(x).logits
    assert a.saved_modules()["head"] is not b.saved_modules()["head"]
    assert not any(p.requires_grad for p in a.saved_modules()["head"].parameters())
    lorazoo.activate(model, "a")
    torch.testing.assert_close(model(x).logits, out_a, rtol=0, atol=0)
    assert all(p.requires_grad for p in a.saved_modules()["head"].parameters())
    assert not any(p.requires_grad for p in b.saved_modules()["head"].parameters())
    before = snapshot(model)
    with pytest.raises(LorazooError, match="'a', 'b' each train their own copy of 'head'"):
        lorazoo.activate(model, "a", "b")
    assert_same(model, before)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    for name, out in (("a", out_a), ("b", out_b)):
        fresh = TinyNet()
        lorazoo.load(fresh, tmp_path / name)
        torch.testing.assert_close(fresh(x).logits, out, rtol=0, atol=0)
    a.delete()
    assert isinstance(model.head, SavedModule) and list(model.head.copies) == ["b"]
    lorazoo.activate(model, "b")
    torch.testing.assert_close(model(x).logits, out_b, rtol=0, atol=0)
    # the copies inside the wrapper are never targets of a later adapter
    c = lorazoo.adapt(model, AdapterSpec(rank=2, targets=r".*"), name="c")
    assert set(c.layers()) == {"fc1", "fc2"}


def test_a_failed_adapt_removes_its_copy_and_wrapper(monkeypatch):
    model = TinyNet()
    lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1"], modules_to_save=["head"]), name="a")
    fresh = TinyNet()

    def boom(self, *others):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(lorazoo.AdapterHandle, "activate", boom)
    for m in (model, fresh):
        before = snapshot(m)
        with pytest.raises(RuntimeError, match="disk on fire"):
            lorazoo.adapt(m, AdapterSpec(rank=2, targets=["fc2"], modules_to_save=["head"]), name="b")
        assert_same(m, before)
    assert list(model.head.copies) == ["a"] and isinstance(fresh.head, nn.Linear)


def test_a_loaded_adapter_gets_its_own_copy_beside_another(tmp_path):
    x, _ = tiny_data()
    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1"], modules_to_save=["head"]))
    perturb(h)
    out = model(x).logits
    h.save(tmp_path)
    other = _with_a(TinyNet())
    base_a = other(x).logits
    loaded = lorazoo.load(other, tmp_path, name="saved")
    torch.testing.assert_close(other(x).logits, out, rtol=0, atol=0)
    loaded.delete()
    lorazoo.activate(other, "a")
    torch.testing.assert_close(other(x).logits, base_a, rtol=0, atol=0)
