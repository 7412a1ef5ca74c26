"""LoRA and DoRA on nn.Embedding (lorazoo.embedding): the update against a dense reference written
from the equations, PEFT's init, merge, save/load, tied input/output embeddings, and refusals."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from lorazoo import AdapterSpec, LoadError, NotMergeableError, SpecError, TargetError
from lorazoo.embedding import EmbeddingAdaptedLayer
from lorazoo.layer import AdaptedLayer

TOL = dict(rtol=1e-10, atol=1e-10)


class LM(nn.Module):
    """emb (30 -> 8) -> fc (8 -> 8) -> lm_head (8 -> 30), the head tied to the embedding or not."""

    def __init__(self, tied: bool = True, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(30, 8, padding_idx=0)
        self.fc = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 30, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if tied:
            self.lm_head.weight = self.emb.weight
        self.double()

    def forward(self, x, labels=None):
        logits = self.lm_head(torch.tanh(self.fc(self.emb(x))))
        if labels is None:
            return logits
        from types import SimpleNamespace
        return SimpleNamespace(loss=F.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits=logits)


IDS = torch.tensor([[0, 3, 7, 7, 29], [1, 2, 0, 28, 5]])


def _perturb(handle, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _untouched(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_lora_embedding_matches_dense_reference():
    model = LM(tied=False)
    E = model.emb.weight.detach().clone()
    h = lorazoo.adapt(model, AdapterSpec(rank=3, alpha=6, targets=["emb"]))
    assert isinstance(model.emb, EmbeddingAdaptedLayer)
    _perturb(h)
    A, B = h.adapters()["emb"].form.A.detach(), h.adapters()["emb"].form.B.detach()  # (r, vocab), (dim, r)
    W = E + (6 / 3) * (B @ A).T  # E' = E + s·(BA)ᵀ: row i is token i's vector
    torch.testing.assert_close(model.emb(IDS), W[IDS], **TOL)


def test_dora_embedding_matches_dense_reference():
    model = LM(tied=False)
    E = model.emb.weight.detach().clone()
    h = lorazoo.adapt(model, AdapterSpec(form="dora", rank=3, alpha=6, targets=["emb"]))
    _perturb(h)
    f = h.adapters()["emb"].form
    V = E.T + 2.0 * f.B.detach() @ f.A.detach()  # (dim, vocab) direction
    Wp = f.m.detach()[:, None] * V / V.norm(dim=1, keepdim=True)  # norm per embedding dimension (PEFT)
    torch.testing.assert_close(model.emb(IDS), Wp.T[IDS], **TOL)


def test_default_init_is_peft_embedding_init_and_starts_as_base():
    model = LM()
    base = model(IDS)
    h = lorazoo.adapt(model, AdapterSpec(rank=4, targets=["emb", "fc"]))
    f = h.adapters()["emb"].form
    assert torch.count_nonzero(f.A) == 0 and torch.count_nonzero(f.B) > 0  # A = 0, B ~ N(0, 1) as PEFT
    assert 0.5 < f.B.std().item() < 1.5
    assert torch.count_nonzero(h.adapters()["fc"].form.B) == 0  # the linear layer keeps LoRA's init
    torch.testing.assert_close(model(IDS), base, **TOL)


def test_all_linear_leaves_embeddings_and_names_pick_them():
    model = LM(tied=False)
    h = lorazoo.adapt(model, AdapterSpec(rank=2))
    assert sorted(h.ranks) == ["fc"]
    h2 = lorazoo.adapt(model, AdapterSpec(rank=2, targets=r"e.b"), name="rx")
    assert sorted(h2.ranks) == ["emb"]


def test_untied_merge_unmerge_and_pissa():
    model = LM(tied=False)
    E0 = model.emb.weight.detach().clone()
    base = model(IDS)
    h = lorazoo.adapt(model, AdapterSpec(form="dora", init="pissa", rank=3, targets=["emb"]))
    torch.testing.assert_close(model(IDS), base, **TOL)  # PiSSA on the (dim, vocab) map starts as base
    _perturb(h)
    out = model(IDS)
    h.merge()
    torch.testing.assert_close(model(IDS), out, **TOL)
    h.unmerge()
    torch.testing.assert_close(model(IDS), out, **TOL)
    h.delete()
    torch.testing.assert_close(model.emb.weight, E0, **TOL)


def test_tied_head_stays_the_base_head_and_merge_is_refused():
    model = LM(tied=True)
    h = lorazoo.adapt(model, AdapterSpec(rank=3, targets=["emb", "fc"]))
    _perturb(h)
    hidden = torch.randn(4, 8, dtype=torch.float64)
    E = model.emb.base.weight.detach().clone()
    torch.testing.assert_close(model.lm_head(hidden), hidden @ E.T, **TOL)  # the head: frozen shared weight
    assert model.lm_head.weight is model.emb.base.weight
    out, snap = model(IDS), _snapshot(model)
    with pytest.raises(NotMergeableError, match="shared with 'lm_head'"):
        h.merge()
    _untouched(model, snap)  # fc (merged before or after emb) was rolled back too
    torch.testing.assert_close(model(IDS), out, **TOL)


def test_tied_base_shift_is_refused_before_any_change():
    model = LM(tied=True)
    snap = _snapshot(model)
    with pytest.raises(TargetError, match="shared with 'lm_head'"):
        lorazoo.adapt(model, AdapterSpec(init="pissa", rank=3, targets=["fc", "emb"]))
    _untouched(model, snap)
    assert not lorazoo.handles_of(model)
    with pytest.raises(TargetError, match="shared with 'emb'"):  # the tied head as a target: same rule
        lorazoo.adapt(model, AdapterSpec(init="olora", rank=3, targets=["lm_head"]))
    _untouched(model, snap)


@pytest.mark.parametrize("spec, err, needle", [
    (dict(form="loha"), SpecError, "cannot adapt embedding"),
    (dict(form="vera"), SpecError, "cannot adapt embedding"),
    (dict(init="eva"), SpecError, "data-driven"),
])
def test_embedding_refusals_leave_model_untouched(spec, err, needle):
    model = LM(tied=False)
    snap = _snapshot(model)
    with pytest.raises(err, match=needle):
        lorazoo.adapt(model, AdapterSpec(rank=2, targets=["emb", "fc"], **spec), calibration=[{"x": IDS}])
    _untouched(model, snap)


def test_max_norm_and_custom_forward_refused():
    class Odd(nn.Embedding):
        def forward(self, x):
            return super().forward(x) * 2

    for emb in (nn.Embedding(10, 4, max_norm=1.0), Odd(10, 4)):
        model = nn.Sequential(emb)
        with pytest.raises(TargetError, match="embedding '0'"):
            lorazoo.adapt(model, AdapterSpec(rank=2, targets=["0"]))
        assert type(model[0]) is type(emb)


def test_embed_scale_subclass_scales_update_too():
    class Scaled(nn.Embedding):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.embed_scale = 3.0

        def forward(self, x):
            return super().forward(x) * self.embed_scale

    model = nn.Sequential(Scaled(10, 4)).double()
    ids = torch.tensor([1, 4, 9])
    h = lorazoo.adapt(model, AdapterSpec(rank=2, alpha=2, targets=["0"]))
    _perturb(h)
    f = h.adapters()["0"].form
    ref = 3.0 * (model[0].base.weight + (f.B @ f.A).T)[ids]
    torch.testing.assert_close(model(ids), ref.detach(), **TOL)


def test_rank_dropout_training_and_save_load(tmp_path):
    model = LM(tied=True)
    h = lorazoo.adapt(model, AdapterSpec(rank=4, targets=["emb"], rank_dropout=0.25))
    labels = torch.randint(0, 30, IDS.shape, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(h.param_groups(5e-2))
    losses = []
    for _ in range(25):
        loss = model(IDS, labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    A = h.adapters()["emb"].form.A  # the padding token's column gets no update (as the base's row)
    assert torch.count_nonzero(A[:, 0]) == 0 and torch.count_nonzero(A[:, 3]) > 0
    model.eval()
    out = model(IDS)
    h.save(tmp_path)
    model2 = LM(tied=True)
    lorazoo.load(model2, tmp_path)
    model2.eval()
    torch.testing.assert_close(model2(IDS), out, **TOL)
    with pytest.raises(LoadError):
        lorazoo.load(LM(tied=True, seed=5), tmp_path)  # another base: the fingerprint differs


def test_peft_embedding_lora_files_load(tmp_path):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(LM(tied=False).float(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["emb"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        pm.save_pretrained(str(tmp_path))
        ref = peft.PeftModel.from_pretrained(LM(tied=False).float(), str(tmp_path))(IDS)
    model = LM(tied=False).float()
    h = lorazoo.load_peft(model, tmp_path)
    assert isinstance(model.emb, EmbeddingAdaptedLayer) and not isinstance(model.fc, AdaptedLayer)
    torch.testing.assert_close(model(IDS), ref, rtol=1e-5, atol=1e-5)
    h.save(tmp_path / "back", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(LM(tied=False).float(), str(tmp_path / "back"))(IDS)
    torch.testing.assert_close(back, ref, rtol=1e-5, atol=1e-5)


def test_peft_lora_on_tied_embedding_loads_with_peft_semantics(tmp_path):
    """PEFT (ensure_weight_tying=False, its default) also adapts the input embedding only."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(LM(tied=True).float(), peft.LoraConfig(r=2, target_modules=["emb", "fc"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        pm.save_pretrained(str(tmp_path))
        ref = peft.PeftModel.from_pretrained(LM(tied=True).float(), str(tmp_path))(IDS)
    model = LM(tied=True).float()
    h = lorazoo.load_peft(model, tmp_path)
    torch.testing.assert_close(model(IDS), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotMergeableError, match="tied"):
        h.merge()
