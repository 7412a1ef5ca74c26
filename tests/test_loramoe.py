"""LoRAMoE (study Eq. 124-129 [86]): routed LoRA experts with the localized balancing loss."""
import pytest
import torch

import lorazoo
from lorazoo.forms.loramoe import set_sample_types
from moe_reference import kaiming_bound, localized, mixture_output, route
from tiny import TinyNet, adapted, layer_input, op_shapes, perturb, reloads_equal, single_layer, tiny_data, train


def _form(layer):
    return layer.adapters["default"].form


def _reference(layer, x, E, k, scale):
    f = _form(layer)
    return mixture_output(x, layer.base.weight.detach(), layer.base.bias.detach(), f.A.detach(), f.B.detach(),
                          f.gate.weight.detach(), E, k, scale)


@pytest.mark.parametrize("rank,E,k", [(8, 8, 2), (6, 3, 2), (4, 4, 4), (6, 3, 1)])
def test_matches_dense_reference_per_token(rank, E, k):
    model, handle = adapted("loramoe", rank=rank, alpha=6, experts=E, top_k=k)
    perturb(handle)
    x = layer_input(n=6).reshape(2, 3, 16)  # (batch, seq, in): routing is per token
    torch.testing.assert_close(model.fc2(x), _reference(model.fc2, x, E, k, 6 / rank), rtol=1e-9, atol=1e-12)


def test_preset_is_eight_rank_one_experts_top_two():
    spec = lorazoo.AdapterSpec.preset("loramoe")
    assert spec.rank == 8 and spec.options["experts"] == 8 and spec.options["top_k"] == 2
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("loramoe", targets=["fc1", "fc2"]))
    f = _form(model.fc1)  # 12 -> 16
    assert (f.experts, f.expert_rank, f.rank, f.gate.top_k) == (8, 1, 8, 2)
    assert f.scale == 16 / 8  # the scale part on the total rank, as LoRA at rank 8
    assert handle.num_trainable() == sum(8 * i + o * 8 + 8 * i for i, o in ((12, 16), (16, 16)))


@pytest.mark.parametrize("rank,expert_rank", [(8, 1), (4, 1), (16, 2), (12, 2)])
def test_rank_is_the_total_over_experts_rounded_up(rank, expert_rank):
    model, _ = adapted("loramoe", rank=rank, experts=8)
    f = _form(model.fc1)
    assert f.expert_rank == expert_rank and f.A.shape == (8 * expert_rank, 12) and f.B.shape == (16, 8 * expert_rank)
    B_3, A_3 = f.expert(3)
    assert torch.equal(A_3, f.A[3 * expert_rank:4 * expert_rank]) and torch.equal(B_3, f.B[:, 3 * expert_rank:4 * expert_rank])


def test_starts_as_base_with_lora_init_per_expert():
    x, _ = tiny_data()
    model, _ = adapted("loramoe", rank=8, experts=4)
    for layer in (model.fc1, model.fc2):
        f = _form(layer)
        assert torch.count_nonzero(f.B) == 0
        bound = kaiming_bound(layer.in_features)
        assert f.A.abs().max() <= bound and f.gate.weight.abs().max() <= bound and f.A.abs().min() > 0
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-6, atol=1e-12)


def test_top_k_routes_gradient_to_the_chosen_experts_only():
    model, handle, layer = single_layer("loramoe", rank=4, experts=4, top_k=2)
    perturb(handle)
    f = _form(layer)
    x = torch.randn(1, 20, dtype=torch.float64)
    layer(x).sum().backward()
    _, _, chosen = route(x, f.gate.weight.detach(), 2)
    for i in range(4):
        used = bool(chosen[0, i])
        assert (f.B.grad[:, i].abs().sum() > 0) == used and (f.A.grad[i].abs().sum() > 0) == used, i


def test_balancing_loss_matches_eq_128_129_and_reaches_the_router():
    model, handle, layer = single_layer("loramoe", rank=6, experts=6, top_k=2, loramoe_beta=0.5, loramoe_delta=0.2)
    perturb(handle)
    f = _form(layer)
    x = torch.randn(3, 5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    model.train()
    model(x)
    _, gates, _ = route(x, f.gate.weight.detach(), 2)
    ref = 0.5 * localized(gates, 3, torch.zeros(3), 0.2)  # no labels: every sample is type 0
    loss = handle.aux_loss()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
    f.gate.weight.grad = None
    loss.backward()
    assert f.gate.weight.grad.abs().sum() > 0
    types = torch.tensor([1, 0, 1])
    set_sample_types(handle, types)
    model(x)
    torch.testing.assert_close(handle.aux_loss(), 0.5 * localized(gates, 3, types, 0.2), rtol=1e-9, atol=0)


def test_aux_loss_sums_over_layers_in_training_only():
    model, handle = adapted("loramoe", rank=4, experts=4, top_k=2)
    perturb(handle)
    x, _ = tiny_data(n=8)
    model.train()
    model(x)
    h1 = torch.tanh(model.fc1(x)).detach()
    total = 0
    for layer, inp in ((model.fc1, x), (model.fc2, h1)):
        _, gates, _ = route(inp, _form(layer).gate.weight.detach(), 2)
        total = total + 0.1 * localized(gates, 8, torch.zeros(8), 0.1)  # 2-D input: one-token samples
    torch.testing.assert_close(handle.aux_loss(), total, rtol=1e-9, atol=0)
    model.eval()
    assert handle.aux_loss() == 0
    model.train()
    with torch.no_grad():
        model(x)
    assert handle.aux_loss() == 0  # a forward without autograd leaves nothing to train


def test_no_loss_without_beta_and_plain_balance_without_delta():
    _, handle, layer = single_layer("loramoe", rank=4, experts=4, loramoe_beta=0.0)
    layer.train()
    layer(torch.randn(3, 20, dtype=torch.float64))
    assert _form(layer).aux_loss() is None
    model, handle, layer = single_layer("loramoe", rank=4, experts=4, loramoe_delta=0.0)
    layer.train()
    x = torch.randn(3, 20, dtype=torch.float64)
    layer(x)
    _, gates, _ = route(x, _form(layer).gate.weight.detach(), 2)
    torch.testing.assert_close(handle.aux_loss(), 0.1 * localized(gates, 3, torch.ones(3), 0.0))


def test_sample_types_errors():
    model, handle, layer = single_layer("loramoe", rank=4, experts=4)
    with pytest.raises(lorazoo.LorazooError, match="0 .* or 1"):
        set_sample_types(handle, [0, 2])
    set_sample_types(handle, [0, 1])
    layer.train()
    layer(torch.randn(3, 20, dtype=torch.float64))
    with pytest.raises(lorazoo.LorazooError, match="2 sample types.*3 samples"):
        handle.aux_loss()
    set_sample_types(handle, None)
    assert handle.aux_loss() > 0
    _, lora = adapted("lora")
    with pytest.raises(lorazoo.LorazooError, match="no 'loramoe' layer"):
        set_sample_types(lora, [0])


def test_never_forms_the_dense_update():
    model, handle, layer = single_layer("loramoe", rank=8, experts=4)
    perturb(handle)
    f = _form(layer)
    f.train()
    x = torch.randn(5, 20, dtype=torch.float64)
    shapes = op_shapes(lambda: (f(x, torch.zeros(5, 24, dtype=torch.float64), layer.linear_weight(), None).sum()
                                + f.aux_loss()).backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes


def test_rank_dropout_masks_each_experts_units():
    model, handle, layer = single_layer("loramoe", rank=4, experts=4, top_k=4)
    perturb(handle)
    f = _form(layer)
    x = torch.randn(5, 20, dtype=torch.float64)
    mask = torch.tensor([0.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    out = f(x, torch.zeros(5, 24, dtype=torch.float64), None, mask)
    with torch.no_grad():
        f.A.mul_(mask[:, None])  # M ⊙ (A x) == (M ⊙ A) x
    ref = _reference(layer, x, 4, 4, f.scale) - x @ layer.base.weight.detach().T - layer.base.bias.detach()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    model2, h2 = adapted("loramoe", rank=8, experts=4, rank_dropout=0.5)
    assert train(model2, h2, steps=3)  # the mask spans all E·r_e units


def test_loraplus_gives_the_experts_B_the_higher_rate():
    model, handle = adapted("loramoe", rank=8, experts=4, optim="loraplus")
    groups = handle.param_groups(1e-3)
    fast = [g for g in groups if g["lr"] > 1e-3]
    ids = {id(p) for g in fast for p in g["params"]}
    assert ids == {id(_form(layer).B) for layer in (model.fc1, model.fc2)}


def test_not_mergeable():
    model, handle = adapted("loramoe", rank=8)
    with pytest.raises(lorazoo.NotMergeableError, match="depends on the input"):
        handle.merge()


def test_save_load_keeps_router_and_experts(tmp_path):
    model, handle = adapted("loramoe", rank=8, experts=4)
    perturb(handle)
    reloads_equal(model, handle, tmp_path)


@pytest.mark.parametrize("kw,match", [
    ({"experts": 0}, "experts"), ({"experts": 1.5}, "experts"), ({"experts": 300}, "experts"),
    ({"top_k": 0}, "top_k"), ({"experts": 4, "top_k": 5}, "top_k .5. cannot exceed experts"),
    ({"loramoe_delta": 1.5}, "loramoe_delta"), ({"loramoe_beta": -1}, "loramoe_beta"),
    ({"experts": 1, "top_k": 1}, "needs experts >= 2"),
    ({"init": "pissa"}, "init 'pissa'"), ({"optim": "lora_pro"}, "lora_pro"), ({"schedule": "relora"}, "relora"),
])
def test_bad_combinations_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="loramoe", **kw)
