"""MokA [15]: one A per modality, text-question cross-attention in the rank space, one shared B."""
import math

import pytest
import torch

import lorazoo
from lorazoo.forms.moka import modalities, read_modalities_from_batches, set_modalities
from moe_reference import softmax_rows
from tiny import TinyNet, adapted, perturb, single_layer, tiny_data, train


def _form(layer):
    return layer.adapters["default"].form


def _reference(layer, x, ids, question, lam):
    """The authors' train-mode forward, sequence by sequence and token by token."""
    f = _form(layer)
    r, s = f.rank, f.scale
    A, B = f.A.detach(), f.B.detach()
    out = x @ layer.base.weight.detach().T + layer.base.bias.detach()
    for b in range(x.shape[0]):
        h = torch.stack([s * A[int(m) * r:(int(m) + 1) * r] @ x[b, t] for t, m in enumerate(ids[b])])
        qi = [t for t in range(x.shape[1]) if question is not None and bool(question[b, t])]
        if qi:
            keys = torch.stack([h[t] if bool(question[b, t]) else torch.zeros(r, dtype=x.dtype)
                                for t in range(qi[0], qi[-1] + 1)])  # the code's span: zero non-question keys
            new = h.clone()
            for t in range(x.shape[1]):
                if int(ids[b, t]) != 0:
                    w = softmax_rows((keys @ h[t] / math.sqrt(len(qi)))[None])[0]
                    new[t] = h[t] + lam * (w @ keys)
            h = new
        out[b] = out[b] + h @ B.T
    return out


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 20, generator=g, dtype=torch.float64)
    ids = torch.tensor([[1, 1, 2, 2, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0], [2, 0, 0, 0, 0, 0, 0]])
    question = torch.tensor([[0, 0, 0, 0, 1, 0, 1], [0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    return x, ids, question


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_matches_the_authors_forward(lam):
    model, handle, layer = single_layer("moka", rank=2, alpha=4, moka_cross_weight=lam)
    perturb(handle, scale=0.5)
    x, ids, question = _batch()
    with modalities(handle, ids, question):
        out = model(x)
    torch.testing.assert_close(out, _reference(layer, x, ids, question, lam), rtol=1e-9, atol=1e-12)


def test_without_question_each_token_uses_its_modalitys_A_only():
    model, handle, layer = single_layer("moka", rank=2)
    perturb(handle)
    x, ids, _ = _batch(1)
    with modalities(handle, ids):
        out = model(x)
    torch.testing.assert_close(out, _reference(layer, x, ids, None, 1.0), rtol=1e-9, atol=1e-12)
    out.sum().backward()
    f = _form(layer)
    assert all(f.A.grad[2 * m:2 * m + 2].abs().sum() > 0 for m in range(3))


def test_without_modality_ids_every_token_is_text_plain_lora():
    model, handle, layer = single_layer("moka", rank=2, alpha=4)
    perturb(handle)
    f = _form(layer)
    x = torch.randn(5, 20, dtype=torch.float64)
    ref = x @ (layer.base.weight.detach() + 2.0 * f.B.detach() @ f.A.detach()[:2]).T + layer.base.bias.detach()
    torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-12)


def test_text_tokens_do_not_see_the_other_modalities():
    model, handle, layer = single_layer("moka", rank=2)
    perturb(handle)
    x, ids, question = _batch(2)
    with modalities(handle, ids, question):
        out = model(x)
    x2 = x.clone()
    x2[0, :4] += 1.0  # change the first sequence's non-text tokens
    with modalities(handle, ids, question):
        out2 = model(x2)
    torch.testing.assert_close(out2[0, 4:], out[0, 4:], rtol=1e-12, atol=0)


def test_label_errors():
    model, handle, layer = single_layer("moka", rank=2)
    x, ids, question = _batch()
    with pytest.raises(lorazoo.LorazooError, match="modality labels must be integers in 0..2"):
        set_modalities(handle, ids + 1)
    with pytest.raises(lorazoo.LorazooError, match="question tokens must be text"):
        set_modalities(handle, ids, torch.ones_like(question))
    with pytest.raises(lorazoo.LorazooError, match="shape"):
        set_modalities(handle, ids, question[:, :3])
    set_modalities(handle, ids[:, :3])
    with pytest.raises(lorazoo.LorazooError, match="9 modality labels.*21 samples"):
        model(x)


def test_starts_as_base_trains_with_batch_keys_and_save_load(tmp_path):
    x, y = tiny_data()
    model, handle = adapted("moka", rank=4)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)
    read_modalities_from_batches(handle)
    ids = (x[:, 0] > 0).long() * 2  # per "token" (2-D input: each row a token)
    model.train()
    out = model(x=x, labels=y, modality_ids=ids)
    assert out.loss is not None and _form(model.fc1).sample_labels is not None
    losses = train(model, handle, steps=30, lr=2e-2)  # no keys: plain LoRA path
    assert losses[-1] < 0.9 * losses[0]
    ref = model(x=x, modality_ids=ids).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    with modalities(loaded, ids):
        torch.testing.assert_close(fresh(x).logits, ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(lorazoo.NotMergeableError):
        loaded.merge()


def test_preset():
    spec = lorazoo.AdapterSpec.preset("moka")
    assert (spec.form, spec.rank, spec.options["moka_modalities"], spec.options["moka_cross_weight"]) == \
        ("moka", 4, 3, 1.0)


@pytest.mark.parametrize("kw,match", [({"moka_modalities": 0}, "moka_modalities"),
                                      ({"moka_cross_weight": -1}, "moka_cross_weight")])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="moka", **kw)
