"""Adapters on Conv2d layers (lorazoo.conv): dense float64 references, merge, save/load, refusals."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from lorazoo.conv import ConvAdaptedLayer
from lorazoo.errors import SpecError, TargetError
from lorazoo.registry import FORMS
from tiny import perturb

# (kernel, stride, padding, bias) of the conv under test
GEOMETRIES = [(1, 1, 0, True), (1, 2, 0, False), (3, 1, 1, True), (3, 2, 1, False), (3, 1, "same", True),
              (3, 2, 0, True)]


class SamePad(nn.Conv2d):
    """A conv that pads itself in forward (as EfficientNet's Conv2dStaticSamePadding does)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv_net(k=3, stride=1, padding=1, bias=True, cls=nn.Conv2d):
    torch.manual_seed(0)
    return nn.Sequential(cls(4, 6, k, stride=stride, padding=padding, bias=bias), nn.Tanh(),
                         nn.Conv2d(6, 5, 1)).double()


def images(n=2, seed=1):
    return torch.randn(n, 4, 9, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_reference(conv: nn.Module, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The conv with weight W0 + ΔW (ΔW given as (out, in·k·k)), through its own forward."""
    ref = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, bias=conv.bias is not None).double()
    ref.load_state_dict(conv.state_dict())
    with torch.no_grad():
        ref.weight.add_(delta.view_as(ref.weight))
    return ref(x)


@pytest.mark.parametrize("k,stride,padding,bias", GEOMETRIES)
@pytest.mark.parametrize("fast", [True, False])
def test_lora_matches_conv_with_dense_update(k, stride, padding, bias, fast):
    model = conv_net(k, stride, padding, bias)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(rank=3, targets=["0"]))
    layer = model[0]
    assert isinstance(layer, ConvAdaptedLayer) and layer.in_features == 4 * k * k
    layer.fast_lora = fast
    perturb(handle)
    form = layer.adapters["default"].form
    x = images()
    expected = dense_reference(layer.base, form.scale * form.B @ form.A, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_self_padding_conv_subclass_is_respected():
    model = conv_net(3, 2, 0, True, cls=SamePad)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="loha", rank=2, targets=["0"]))
    perturb(handle)
    layer, x = model[0], images()
    expected = dense_reference(layer.base, layer.adapters["default"].form.delta_weight(layer.linear_weight()), x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["lora", "dora", "loha", "lokr", "vera", "moslora", "adalora", "lorma_plus",
                                  "lorma_pi"])
@pytest.mark.parametrize("k", [1, 3])
def test_forms_match_their_merged_conv_and_unmerge_exactly(form, k):
    model = conv_net(k, 1, k // 2, True)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form=form, rank=2, targets=["0", "2"]))
    perturb(handle, scale=0.2)
    x = images()
    before = [m.base.weight.clone() for m in (model[0], model[2])]
    out = model(x)
    handle.merge()
    torch.testing.assert_close(model(x), out, rtol=1e-9, atol=1e-9)
    handle.unmerge()
    for m, w in zip((model[0], model[2]), before):
        torch.testing.assert_close(m.base.weight, w, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), out, rtol=1e-12, atol=1e-12)


SMALL = {"molre": {"molre_ranks": [1, 2], "top_k": 1},  # its default experts (ranks 1..8) exceed the conv
         "moa": {"moa_require_domains": False}}  # no domain labels for image patches here


def conv_spec(form):
    """The bare form, or, for a form that needs a companion part (LoRA-Dash's schedule), its preset."""
    try:
        return lorazoo.AdapterSpec(form=form, rank=2, targets=["0"], **SMALL.get(form, {}))
    except lorazoo.SpecError:
        from lorazoo.presets import PRESETS

        preset = next(p.name for p in PRESETS.values() if p.parts.get("form") == form)
        return lorazoo.AdapterSpec.preset(preset, rank=2, targets=["0"])


# Forms that only exist with a data-driven init, which reads layer inputs as rows and refuses convs.
NOT_ON_CONV = {"lora_sb", "e2lora"}


def test_every_form_runs_on_a_conv():
    for form in FORMS.names():
        model = conv_net(3, 2, 1)
        if form in NOT_ON_CONV or getattr(FORMS.get(form).obj, "model_family", None):  # prefix tuning: BERT only
            with pytest.raises(lorazoo.SpecError):
                lorazoo.adapt(model, conv_spec(form), calibration=[{"x": images()}])
            continue
        handle = lorazoo.adapt(model, conv_spec(form))
        perturb(handle, scale=0.1)
        out = model(images())
        out.sum().backward()
        assert torch.isfinite(out).all(), form
        assert any(p.grad is not None for p in handle.trainable_parameters()), form


def test_save_load_round_trip(tmp_path):
    model = conv_net(3, 2, 1)
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="dora", rank=2, targets="all-conv"))
    perturb(handle)
    x = images()
    out = model(x)
    handle.save(tmp_path)
    fresh = conv_net(3, 2, 1)
    lorazoo.load(fresh, tmp_path)
    assert isinstance(fresh[0], ConvAdaptedLayer) and isinstance(fresh[2], ConvAdaptedLayer)
    torch.testing.assert_close(fresh(x), out, rtol=1e-12, atol=1e-12)


def test_delete_restores_the_plain_conv():
    model = conv_net()
    plain = model(images())
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(rank=2, targets=["0"]))
    perturb(handle)
    handle.delete()
    assert type(model[0]) is nn.Conv2d
    torch.testing.assert_close(model(images()), plain, rtol=0, atol=0)


def test_grouped_and_depthwise_convs_are_refused_and_skipped_by_all_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1),
                          nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TargetError, match=r"layer '0' is a grouped convolution \(groups=4\)"):
        lorazoo.adapt(model, lorazoo.AdapterSpec(targets=["0"]))
    with pytest.raises(TargetError, match="'1' is a depthwise convolution"):
        lorazoo.adapt(model, lorazoo.AdapterSpec(targets=r"[12]"))
    assert type(model[0]) is nn.Conv2d  # nothing changed
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(rank=2, targets="all-conv"))
    assert sorted(handle.layers()) == ["2"]
    handle.delete()
    assert sorted(lorazoo.adapt(model, lorazoo.AdapterSpec(rank=2, targets="all-linear")).layers()) == ["4"]


def test_data_driven_inits_refuse_conv_targets():
    model = conv_net()
    with pytest.raises(SpecError, match="does not support Conv2d targets"):
        lorazoo.adapt(model, lorazoo.AdapterSpec(init="eva", rank=2, targets=["0"]),
                      calibration=[{"input": images()}])


def test_svd_init_shifts_the_conv_weight_and_starts_at_the_base():
    model = conv_net()
    x = images()
    plain = model(x)
    lorazoo.adapt(model, lorazoo.AdapterSpec(init="pissa", rank=2, targets=["0"]))
    torch.testing.assert_close(model(x), plain, rtol=1e-10, atol=1e-10)
