"""DropLoRA (DropLoRA Eq. 2, Algorithm 1): W = W0 + (B ⊙ M)(M ⊙ A), M ~ Bernoulli over the rank,
resampled every step, off at inference."""
import torch

import lorazoo
from tiny import TinyNet, layer_input, perturb, rank_mask_draw


def _layer(p=0.5):
    model = TinyNet()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("droplora", rank=6, rank_dropout=p,
                                                             targets=["fc2"]))
    perturb(handle)
    return model, handle, model.fc2


def test_single_mask_equals_two_masks_on_A_and_B():
    model, handle, layer = _layer()
    form = layer.adapters["default"].form
    x = layer_input()
    seed, keep = rank_mask_draw(6, 0.5)  # prunes some, not all
    torch.manual_seed(seed)  # the forward draws the same mask
    out = layer(x)
    A, B = form.A.detach(), form.B.detach()
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    masked_B = B * keep[None, :]          # B ⊙ M (columns)
    masked_A = A * (keep != 0)[:, None]   # M ⊙ A (rows); the 1/(1-p) rescale is applied once
    ref = x @ (W0 + form.scale * masked_B @ masked_A).T + b
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


def test_masks_differ_between_steps_and_vanish_at_eval():
    model, handle, layer = _layer(p=0.5)
    x = layer_input()
    outs = {tuple(layer(x).detach().flatten()[:4].tolist()) for _ in range(8)}
    assert len(outs) > 1  # a fresh mask per forward
    model.eval()
    form = layer.adapters["default"].form
    ref = x @ (layer.base.weight.detach() + form.scale * form.B.detach() @ form.A.detach()).T + layer.base.bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-6, atol=0)  # identity mask at inference


def test_expected_update_is_unbiased():
    model, handle, layer = _layer(p=0.3)
    x = layer_input(n=2)
    mean = torch.stack([layer(x) for _ in range(4000)]).mean(0)
    model.eval()
    torch.testing.assert_close(mean, layer(x), rtol=0, atol=0.05 * layer(x).abs().max().item())


def test_rank_dropout_refused_without_rank_dimension():
    # every form either has a rank dim or refuses; checked generically for the registered forms
    from lorazoo.registry import FORMS

    for name in FORMS.names():
        cls = FORMS.get(name).obj
        if not cls.has_rank:
            try:
                lorazoo.AdapterSpec(form=name, rank_dropout=0.3)
            except lorazoo.SpecError as e:
                assert "rank dimension" in str(e)
            else:
                raise AssertionError(f"{name} accepted rank_dropout without a rank dimension")
