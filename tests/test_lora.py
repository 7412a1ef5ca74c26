"""LoRA (Hu et al. Eq. 1; study Eq. 1, 134): h = W0 x + (alpha/r)·B A x, B = 0 at init."""
import torch

import lorazoo
from tiny import adapted, layer_input, perturb


def test_matches_dense_reference():
    model, handle = adapted("lora", rank=4, alpha=6)
    perturb(handle)
    layer = model.fc2
    A, B = layer.adapters["default"].form.A, layer.adapters["default"].form.B
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    x = layer_input()
    ref = x @ (W0 + (6 / 4) * B.detach() @ A.detach()).T + b  # Eq. 1 with s = alpha / r
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=0)


def test_zero_update_at_init_and_rank_bound():
    model, handle = adapted("lora", rank=3)
    form = model.fc2.adapters["default"].form
    assert torch.count_nonzero(form.B) == 0
    perturb(handle)
    assert torch.linalg.matrix_rank(form.delta_weight(model.fc2.linear_weight())) <= 3


def test_conv1d_layer_is_adapted_like_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv1D(8, 6)).double()  # weight stored (in=6, out=8)
    x = torch.randn(4, 6, dtype=torch.float64)
    handle = lorazoo.adapt(net, lorazoo.AdapterSpec(rank=2, targets=["0"]))
    perturb(handle)
    form = net[0].adapters["default"].form
    W0 = net[0].base.weight.detach().T
    ref = x @ (W0 + 8 * form.B.detach() @ form.A.detach()).T + net[0].base.bias.detach()
    torch.testing.assert_close(net(x), ref, rtol=1e-6, atol=0)
    handle.merge()
    torch.testing.assert_close(net(x), ref, rtol=1e-6, atol=1e-9)
