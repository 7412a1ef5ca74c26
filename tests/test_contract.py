"""What every registered variant must do on a tiny model: start as the base (where its paper says
so), learn, merge exactly (or refuse), and survive save/load."""
import pytest
import torch

import lorazoo
from lorazoo.presets import PRESETS
from tiny import TinyNet, calibration_batches, give_labels, perturb, tiny_data, train

ALL = sorted(PRESETS)


def build(name, **over):
    model = TinyNet()
    spec = lorazoo.AdapterSpec.preset(name, rank=4, targets=["fc1", "fc2"], **over)
    if spec.options.get("select_params") == "top":
        pytest.skip(f"{name} trains the last blocks of a block stack, which TinyNet has not; "
                    f"tests/test_baselines.py runs these checks on a tiny BERT")
    family = getattr(spec.part_classes()["form"], "model_family", None)  # prefix tuning: BERT-family encoders
    if family:
        pytest.skip(f"{name} runs on a {family} only, which TinyNet is not; its own tests run these checks on "
                    f"one (tests/test_prefix_tuning.py: a tiny BERT)")
    handle = lorazoo.adapt(model, spec, calibration=calibration_batches())
    model.eval()  # rank dropout (DropLoRA) and dropout are training-only
    return model, handle


@pytest.mark.parametrize("name", ALL)
def test_starts_as_base(name):
    x, _ = tiny_data()
    base = TinyNet()(x).logits
    model, handle = build(name)
    parts = handle.spec.part_classes()
    if not parts["form"].zero_init:
        pytest.skip(f"{name}: form '{handle.spec.form}' does not start from the base model (its paper)")
    if not parts["init"].starts_as_base:
        pytest.skip(f"{name}: init '{handle.spec.init}' does not start from the base model (its paper)")
    torch.testing.assert_close(model(x).logits, base, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_training_lowers_loss(name):
    model, handle = build(name)
    losses = train(model, handle, steps=40, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.grad is None or not p.requires_grad for p in TinyNet().parameters())
    frozen = [n for n, p in model.named_parameters()  # a trained copy of the head (FT, BitFit) is the adapter's
              if ".base." in n or (n.startswith("head") and ".copies." not in n)]
    assert all(not dict(model.named_parameters())[n].requires_grad for n in frozen)


@pytest.mark.parametrize("name", ALL)
def test_merge_unmerge_exact(name):
    x, _ = tiny_data()
    model, handle = build(name)
    perturb(handle)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    out = model(x).logits
    form = handle.spec.part_classes()["form"]
    if not form.mergeable:
        with pytest.raises(lorazoo.NotMergeableError):
            handle.merge()
        assert not handle.merged
        return
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-8)
    handle.unmerge()
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_save_load_roundtrip(name, tmp_path):
    x, _ = tiny_data()
    model, handle = build(name)
    train(model, handle, steps=3, lr=1e-2)
    out = model(x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-6, atol=1e-9)
    assert loaded.spec == handle.spec
    loaded.delete()
    torch.testing.assert_close(fresh(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_a_bf16_autocast_step_gives_finite_gradients(name):
    """Mixed precision as HF Trainer's bf16=True runs it: the forward under autocast, the backward outside
    it, where custom backward functions meet bf16 activations and gradients with float32 parameters."""
    model, handle = build(name)
    model.float().train()
    x, y = tiny_data(dtype=torch.float32)
    give_labels(handle, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x=x, labels=y)
    (out.loss + handle.aux_loss()).backward()
    grads = [p.grad for p in handle.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
