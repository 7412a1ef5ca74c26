"""MoA, Mixture-of-LoRAs [87]: one LoRA expert per domain, sequence-level routing supervised by labels."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from lorazoo.forms.moa import domains, read_domains_from_batches, set_domains
from lorazoo.train import Trainer
from moe_reference import softmax_rows
from tiny import TinyNet, adapted, perturb, reloads_equal, single_layer, tiny_data, train


def _form(layer):
    return layer.adapters["default"].form


def _expert_out(layer, x, d):
    """W0 x + b + s·B_d A_d x for a (T, in) sequence x and expert d."""
    f = _form(layer)
    r = f.expert_rank
    A, B = f.A.detach()[d * r:(d + 1) * r], f.B.detach()[:, d * r:(d + 1) * r]
    return x @ layer.base.weight.detach().T + layer.base.bias.detach() + f.scale * (x @ A.T @ B.T)


def test_inference_routes_each_sequence_to_its_routers_top_1():
    model, handle, layer = single_layer("moa", rank=8, experts=4)
    perturb(handle, scale=1.0)
    x = torch.randn(5, 6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    Wg = _form(layer).gate.weight.detach()
    model.eval()
    out = model(x)
    picks = set()
    for b in range(5):
        d = int(torch.argmax(softmax_rows((x[b].sum(0) / 6)[None] @ Wg.T)))  # router on the sequence's mean
        picks.add(d)
        torch.testing.assert_close(out[b], _expert_out(layer, x[b], d), rtol=1e-9, atol=1e-12)
    assert len(picks) > 1  # the test routes to more than one expert


def test_training_uses_the_labelled_expert_and_the_router_loss_is_cross_entropy():
    model, handle, layer = single_layer("moa", rank=8, experts=4, moa_router_weight=0.5)
    perturb(handle)
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    labels = torch.tensor([2, 0, 3])
    model.train()
    with domains(handle, labels):
        out = model(x)
    for b in range(3):
        torch.testing.assert_close(out[b], _expert_out(layer, x[b], int(labels[b])), rtol=1e-9, atol=1e-12)
    Wg = _form(layer).gate.weight.detach()
    logits = torch.stack([(x[b].sum(0) / 5) @ Wg.T for b in range(3)])
    ce = -sum(torch.log(softmax_rows(logits)[b, int(labels[b])]) for b in range(3)) / 3
    loss = handle.aux_loss()
    torch.testing.assert_close(loss, 0.5 * ce, rtol=1e-9, atol=1e-12)
    (loss + out.sum()).backward()
    f = _form(layer)
    assert f.gate.weight.grad.abs().sum() > 0
    used = torch.zeros(4, dtype=torch.bool)
    used[labels] = True  # experts 0, 2, 3: expert 1 (no sequence of its domain) gets no gradient
    assert torch.equal(f.A.grad.reshape(4, 2, 20).abs().sum((1, 2)) > 0, used)
    assert torch.equal(f.B.grad.reshape(24, 4, 2).abs().sum((0, 2)) > 0, used)


def test_every_token_of_a_sequence_goes_to_one_expert():
    model, handle, layer = single_layer("moa", rank=4, experts=4)
    perturb(handle, scale=1.0)
    x = torch.randn(4, 7, 20, dtype=torch.float64)
    model.eval()
    model(x)
    g = _form(layer).gate.last.gates  # (4, 4): one routing per sequence
    assert g.shape == (4, 4) and torch.all((g != 0).sum(-1) == 1)


def test_missing_or_wrong_labels_are_a_clear_error():
    model, handle, layer = single_layer("moa", rank=4, experts=4, moa_require_domains=True)
    model.train()
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    with pytest.raises(lorazoo.LorazooError, match="no domain labels.*set_domains.*read_domains_from_batches"):
        model(x)
    set_domains(handle, [0, 1])
    with pytest.raises(lorazoo.LorazooError, match="2 domain labels.*3 samples"):
        model(x)
    with pytest.raises(lorazoo.LorazooError, match="domain labels must be integers in 0..3"):
        set_domains(handle, [0, 4, 1])
    with pytest.raises(lorazoo.LorazooError, match="domain labels must be integers in 0..3"):
        set_domains(handle, [0.5, 1.0, 1.0])
    model.eval()
    set_domains(handle, None)
    model(x)  # inference needs no labels
    _, lora = adapted("lora")
    with pytest.raises(lorazoo.LorazooError, match="no 'moa' layer"):
        set_domains(lora, [0])


def test_labels_read_from_the_batch_key_and_trainer_style_training():
    x, y = tiny_data(n=32)
    dom = (x[:, 0] > 0).long()
    model, handle = adapted("moa", rank=8, experts=2, moa_require_domains=True)
    hook = read_domains_from_batches(handle)
    model.train()
    out = model(x=x, labels=y, domains=dom)  # the model itself never sees 'domains'
    assert out.loss is not None and torch.equal(_form(model.fc1).sample_labels, dom)
    with pytest.raises(lorazoo.LorazooError, match="no domain labels"):
        model(x=x, labels=y)  # a batch without the key clears them
    hook.remove()
    set_domains(handle, dom)
    losses = train(model, handle, steps=30, lr=2e-2, data=(x, y))
    assert losses[-1] < 0.9 * losses[0]


def test_starts_as_base_save_load_and_copy(tmp_path):
    x, _ = tiny_data()
    model, handle = adapted("moa", rank=8, experts=4)
    model.eval()
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)
    perturb(handle)
    model.train()
    with domains(handle, torch.zeros(64, dtype=torch.long)):
        model(x)
    c = copy.deepcopy(model)
    assert _form(c.fc1)._router_loss is None
    reloads_equal(model, handle, tmp_path)
    with pytest.raises(lorazoo.NotMergeableError):
        handle.merge()


def test_without_labels_it_refuses_by_default_and_can_warn_instead():
    model, handle, layer = single_layer("moa", rank=8, experts=4)
    model.train()
    with pytest.raises(lorazoo.LorazooError, match="no domain labels.*set_domains"):
        model(torch.randn(5, 6, 20, dtype=torch.float64))
    model, handle, layer = single_layer("moa", rank=8, experts=4, moa_require_domains=False)
    perturb(handle, scale=1.0)
    x = torch.randn(5, 6, 20, dtype=torch.float64)
    model.eval()
    ref = model(x)
    model.train()
    with pytest.warns(UserWarning, match="no domain labels.*set_domains.*moa_require_domains=False"):
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)  # the router's top-1, as in inference
    assert handle.aux_loss() == 0  # no labels: no router loss
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # warned once only


@pytest.mark.parametrize("kw,match", [
    ({"experts": 1}, "experts"), ({"moa_router_weight": -1}, "moa_router_weight"), ({"top_k": 2}, "unknown option"),
    ({"moa_require_domains": 1}, "moa_require_domains"),
])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="moa", **kw)


def test_lorazoos_trainer_passes_the_batch_labels():
    x, y = tiny_data(n=64)
    dom = (x[:, 0] > 0).long()
    model, handle = adapted("moa", rank=8, experts=2, moa_require_domains=True)
    read_domains_from_batches(handle)
    batches = [{"x": x[i:i + 16], "labels": y[i:i + 16], "domains": dom[i:i + 16]} for i in range(0, 64, 16)]
    out = Trainer(model, handle, lr=2e-2, epochs=10, progress=False).fit(batches)
    assert out["losses"][-1] < 0.9 * out["losses"][0]
    with pytest.raises(lorazoo.LorazooError, match="no domain labels"):
        Trainer(model, handle, lr=2e-2, epochs=1, progress=False).fit([{"x": x, "labels": y}])

