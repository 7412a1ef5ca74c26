"""LoRA+ ([24]; study Sec. II-C1): lr(B) = ratio x lr(A), ratio 2^4 by default."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lorazoo
from lorazoo.optim.loraplus import LoRAPlus, up_parameters
from lorazoo.parts import Form
from tiny import adapted, perturb, tiny_data


def _groups(handle, lr=1e-3, wd=0.1):
    return {g["name"]: g for g in handle.param_groups(lr, wd)}


def _ids(params):
    return {id(p) for p in params}


def test_B_gets_ratio_times_the_lr_of_A():
    model, handle = adapted(optim="loraplus", modules_to_save=["head"])
    assert handle.spec.options["loraplus_ratio"] == 16  # the paper's 2^4
    groups = _groups(handle, lr=1e-3, wd=0.1)
    Bs = {id(model.fc1.adapters["default"].form.B), id(model.fc2.adapters["default"].form.B)}
    As = {id(model.fc1.adapters["default"].form.A), id(model.fc2.adapters["default"].form.A)}
    assert _ids(groups["B"]["params"]) == Bs and groups["B"]["lr"] == pytest.approx(16e-3)
    assert _ids(groups["A"]["params"]) == As | {id(model.head.weight)} and groups["A"]["lr"] == 1e-3
    # the authors' ndim == 1 rule: biases go with B, without weight decay
    assert _ids(groups["B_no_decay"]["params"]) == {id(model.head.bias)}
    assert groups["B_no_decay"]["lr"] == pytest.approx(16e-3) and groups["B_no_decay"]["weight_decay"] == 0.0
    assert groups["A"]["weight_decay"] == groups["B"]["weight_decay"] == 0.1
    # a partition of the trainable parameters
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(listed) == sorted(_ids(handle.trainable_parameters()))


def test_one_sgd_step_moves_B_ratio_times_further():
    x, y = tiny_data()
    lr, ratio = 1e-2, 4.0
    model, handle = adapted(optim="loraplus", loraplus_ratio=ratio)
    perturb(handle)  # B != 0, so A gets a gradient
    forms = [model.fc1.adapters["default"].form, model.fc2.adapters["default"].form]
    before = [(f.B.detach().clone(), f.A.detach().clone()) for f in forms]
    model(x=x, labels=y).loss.backward()
    grads = [(f.B.grad.clone(), f.A.grad.clone()) for f in forms]
    opt = torch.optim.SGD(handle.param_groups(lr))
    opt.step()
    for f, (B0, A0), (gB, gA) in zip(forms, before, grads):
        assert gB.abs().max() > 0 and gA.abs().max() > 0
        torch.testing.assert_close(f.B.detach(), B0 - ratio * lr * gB, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(f.A.detach(), A0 - lr * gA, rtol=1e-6, atol=1e-12)


class _EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.emb(x))


def test_embeddings_of_saved_modules_get_their_own_lr():
    model = _EmbNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(optim="loraplus", targets=["fc"], modules_to_save=["emb"],
                                                      loraplus_lr_embedding=3e-5))
    groups = _groups(handle, lr=1e-3)
    assert _ids(groups["embedding"]["params"]) == {id(model.emb.weight)}
    assert groups["embedding"]["lr"] == 3e-5


def test_ratio_one_is_plain_lora():
    model, handle = adapted(optim="loraplus", loraplus_ratio=1.0)
    assert {g["lr"] for g in handle.param_groups(2e-3)} == {2e-3}


class _Up(Form):
    """A form naming its up-projection explicitly (as AdaLoRA's P would)."""
    up_params = ("P",)

    def __init__(self):
        nn.Module.__init__(self)
        self.P, self.Q = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(2, 3))


class _NoUp(Form):
    def __init__(self):
        nn.Module.__init__(self)
        self.U, self.V = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(2, 3))


def test_up_parameters_by_attribute_factors_or_name():
    f = _Up()
    assert _ids(up_parameters(f)) == {id(f.P)}
    model, handle = adapted()
    lora = model.fc1.adapters["default"].form
    assert _ids(up_parameters(lora)) == {id(lora.B)}
    f = _NoUp()
    f.B1 = nn.Parameter(torch.zeros(3, 2))  # the B* naming rule
    assert _ids(up_parameters(f)) == {id(f.B1)}


def test_one_dimensional_adapter_parameters_go_with_B():
    f = _Up()
    f.lam = nn.Parameter(torch.zeros(2))  # singular values, magnitudes, VeRA vectors: the authors' ndim rule
    fake = SimpleNamespace(adapters=lambda: {"l": SimpleNamespace(form=f)}, saved_modules=dict,
                           named_trainable_parameters=f.named_parameters)
    groups = {g["name"]: g for g in LoRAPlus(lorazoo.AdapterSpec(optim="loraplus")).param_groups(fake, 1.0, 0.1)}
    assert _ids(groups["B"]["params"]) == {id(f.P), id(f.lam)} and groups["B"]["lr"] == 16.0
    assert _ids(groups["A"]["params"]) == {id(f.Q)} and groups["B"]["weight_decay"] == 0.1


def test_form_without_up_projection_is_refused():
    fake = SimpleNamespace(adapters=lambda: {"fc": SimpleNamespace(form=_NoUp())})
    spec = lorazoo.AdapterSpec(optim="loraplus")
    with pytest.raises(lorazoo.SpecError, match="up_params"):
        LoRAPlus(spec).param_groups(fake, 1e-3, 0.0)


@pytest.mark.parametrize("bad", [{"loraplus_ratio": 0}, {"loraplus_ratio": -2.0}, {"loraplus_lr_embedding": -1e-6},
                                 {"loraplus_ratio": "16"}])
def test_bad_options_are_refused(bad):
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec(optim="loraplus", **bad)
