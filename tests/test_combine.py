"""Adapter arithmetic (lorazoo.combine): exact where the method is exact (float64, against Σ w_i ΔW_i
written from the adapters' factors), equal to PEFT's add_weighted_adapter for LoRA, refused cleanly."""
import copy

import pytest
import torch

import lorazoo
from lorazoo.combine import METHODS, combine
from tiny import TinyNet, perturb, tiny_data

F32 = torch.float32


def two_loras(dtype=torch.float64, ranks=(3, 3), scales=("lora", "rslora")):
    model = TinyNet(dtype=dtype)
    hs = []
    for i, (r, sc) in enumerate(zip(ranks, scales)):
        h = lorazoo.adapt(model, lorazoo.AdapterSpec(rank=r, alpha=2 * r + i, scale=sc, targets=["fc1", "fc2"]),
                          name=f"a{i}")
        perturb(h, seed=10 + i)
        hs.append(h)
    return model, hs


def dense_update(layer, name):
    """s·B·A of a LoRA adapter, from its tensors (the reference does not call delta_weight)."""
    f = layer.adapters[name].form
    return f.scale * f.B.detach() @ f.A.detach()


def combined_update(layer, name):
    f = layer.adapters[name].form
    return f.scale * f.B.detach() @ f.A.detach()


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_exact_methods_give_the_weighted_sum_of_updates(method):
    model, _ = two_loras(ranks=(2, 3))
    w = [0.7, -1.3]
    want = {n: w[0] * dense_update(getattr(model, n), "a0") + w[1] * dense_update(getattr(model, n), "a1")
            for n in ("fc1", "fc2")}
    h = combine(model, ["a0", "a1"], w, method, name="mix", svd_rank=5)
    for n in ("fc1", "fc2"):
        torch.testing.assert_close(combined_update(getattr(model, n), "mix"), want[n], rtol=1e-9, atol=1e-12)
    assert h.ranks == {"fc1": 5, "fc2": 5}
    x, _ = tiny_data()
    W0, b = model.fc1.base.weight.detach(), model.fc1.base.bias.detach()
    torch.testing.assert_close(model.fc1(x[:, :12]), x[:, :12] @ (W0 + want["fc1"]).T + b, rtol=1e-9, atol=1e-12)


def test_linear_is_the_product_of_the_weighted_factor_sums():
    model, _ = two_loras()
    w = [0.5, -2.0]
    combine(model, ["a0", "a1"], w, "linear", name="lin")
    for n in ("fc1", "fc2"):
        layer = getattr(model, n)
        fs = [layer.adapters[a].form for a in ("a0", "a1")]
        c = [wi * f.scale for wi, f in zip(w, fs)]
        B = sum(abs(ci) ** 0.5 * f.B.detach() for ci, f in zip(c, fs))
        A = sum((1 if ci >= 0 else -1) * abs(ci) ** 0.5 * f.A.detach() for ci, f in zip(c, fs))
        torch.testing.assert_close(combined_update(layer, "lin"), B @ A, rtol=1e-9, atol=1e-12)


def test_svd_truncates_to_the_best_rank_k_approximation():
    model, _ = two_loras(ranks=(3, 3))
    combine(model, ["a0", "a1"], [1.0, 1.0], "svd", name="k2", svd_rank=2)
    full = dense_update(model.fc2, "a0") + dense_update(model.fc2, "a1")
    S = torch.linalg.svdvals(full)
    err = torch.linalg.matrix_norm(combined_update(model.fc2, "k2") - full)
    torch.testing.assert_close(err, S[2:].norm(), rtol=1e-9, atol=1e-12)  # Eckart-Young


def test_svd_combines_any_mergeable_form_and_counts_base_shifts():
    model = TinyNet()
    pissa = lorazoo.adapt(model, lorazoo.AdapterSpec(rank=2, init="pissa", targets=["fc1", "fc2"]), name="p")
    perturb(pissa, seed=1)
    loha = lorazoo.adapt(model, lorazoo.AdapterSpec(form="loha", rank=2, targets=["fc2"]), name="h")
    perturb(loha, seed=2)
    pristine = TinyNet()
    x, _ = tiny_data()
    with torch.no_grad():
        lorazoo.activate(model, "p")
        out_p = model(x).logits
        lorazoo.activate(model, "h")
        out_h = model(x).logits
    base = pristine(x).logits
    combine(model, ["p", "h"], [1.0, 1.0], "svd", name="both", svd_rank=16)
    # fc2 carries both updates; at full rank the combination equals applying both deltas to the base
    W = {n: getattr(pristine, n).weight.detach() for n in ("fc1", "fc2")}
    dp = {n: getattr(model, n).adapters["p"].form.delta_weight(
        W[n] + getattr(model, n).adapters["p"].shift_B @ getattr(model, n).adapters["p"].shift_A)
        + getattr(model, n).adapters["p"].shift_B @ getattr(model, n).adapters["p"].shift_A for n in ("fc1", "fc2")}
    dh = model.fc2.adapters["h"].form.delta_weight(W["fc2"])
    torch.testing.assert_close(combined_update(model.fc1, "both"), dp["fc1"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(combined_update(model.fc2, "both"), dp["fc2"] + dh, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(out_p, base) and not torch.allclose(out_h, base)


# --- against PEFT's add_weighted_adapter ----------------------------------------------------------
def _peft_pair(lz_model):
    peft = pytest.importorskip("peft")
    pm = TinyNet(dtype=F32)
    for i in range(2):
        f1 = lz_model.fc1.adapters[f"a{i}"].form
        cfg = peft.LoraConfig(r=f1.A.shape[0], lora_alpha=2 * f1.A.shape[0] + i, target_modules=["fc1", "fc2"],
                              use_rslora=i == 1, init_lora_weights=False)
        if i == 0:
            pm = peft.get_peft_model(pm, cfg, adapter_name="a0")
        else:
            pm.add_adapter("a1", cfg)
        with torch.no_grad():
            for n in ("fc1", "fc2"):
                f = getattr(lz_model, n).adapters[f"a{i}"].form
                mod = getattr(pm.base_model.model, n)
                mod.lora_A[f"a{i}"].weight.copy_(f.A)
                mod.lora_B[f"a{i}"].weight.copy_(f.B)
    return pm


def _value_keyed_drop(tensor, density, rescale):
    """DARE's random drop made a function of the values, so that PEFT's and lorazoo's calls, which
    draw in different orders (PEFT initializes the new adapter first), drop the same entries."""
    keep = ((tensor * 997).frac().abs() < density).to(tensor.dtype)
    return tensor * keep / density if rescale else tensor * keep


@pytest.mark.parametrize("method", METHODS)
def test_equals_peft_for_lora(method, monkeypatch):
    from peft.utils import merge_utils

    monkeypatch.setattr(merge_utils, "random_pruning", _value_keyed_drop)
    model, _ = two_loras(dtype=F32)
    pm = _peft_pair(model)
    kw = {"density": 0.6} if method.split("_svd")[0] != "linear" and method not in ("cat", "svd") else {}
    w = [0.8, -0.5]
    torch.manual_seed(123)
    pm.add_weighted_adapter(["a0", "a1"], w, "mix", combination_type=method, **kw)
    torch.manual_seed(123)
    combine(model, ["a0", "a1"], w, method, name="mix", **kw)
    pm.set_adapter("mix")
    x, _ = tiny_data(dtype=F32)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, pm(x).logits, rtol=1e-5, atol=1e-5)


# --- refusals, model untouched --------------------------------------------------------------------
@pytest.mark.parametrize("args, kw, msg", [
    ((["a0", "zz"], [1, 1], "svd"), {}, "no adapter named 'zz'"),
    ((["a0", "a1"], [1], "svd"), {}, "weights must be a list of 2"),
    ((["a0", "a1"], [1, float("nan")], "svd"), {}, "finite"),
    ((["a0", "a1"], [1, 1], "average"), {}, "combine method must be one of"),
    ((["a0", "a1"], [1, 1], "ties"), {}, "needs density"),
    ((["a0", "a1"], [1, 1], "ties"), {"density": 1.5}, "needs density"),
    ((["a0", "a1"], [1, 1], "svd"), {"svd_rank": 0}, "svd_rank"),
    ((["a0", "a1"], [1, 1], "svd"), {"name": "a0"}, "already has an adapter named 'a0'"),
    ((["a0", "a0"], [1, 1], "svd"), {}, "twice"),
])
def test_bad_arguments_are_refused_before_anything_changes(args, kw, msg):
    model, _ = two_loras()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lorazoo.SpecError, match=msg):
        combine(model, *args, **kw)
    assert set(lorazoo.handles_of(model)) == {"a0", "a1"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_factor_methods_refuse_what_has_no_plain_factors_and_unequal_ranks():
    model, _ = two_loras(ranks=(2, 3))
    with pytest.raises(lorazoo.SpecError, match="use method='cat'"):
        combine(model, ["a0", "a1"], [1, 1], "linear")
    dora = lorazoo.adapt(model, lorazoo.AdapterSpec(form="dora", rank=2, targets=["fc1"]), name="d")
    perturb(dora)
    with pytest.raises(lorazoo.SpecError, match="does not have; use method='svd'"):
        combine(model, ["a0", "d"], [1, 1], "cat")
    pissa = lorazoo.adapt(model, lorazoo.AdapterSpec(rank=2, init="pissa", targets=["fc1"]), name="p")
    with pytest.raises(lorazoo.SpecError, match="counts the base shift"):
        combine(model, ["a0", "p"], [1, 1], "linear")
    combine(model, ["a0", "d", "p"], [1, 1, 1], "svd", name="ok")  # the dense route takes all three
    assert "ok" in lorazoo.handles_of(model)
    del pissa


def test_forms_without_a_weight_update_are_refused():
    model = TinyNet()
    a = lorazoo.adapt(model, lorazoo.AdapterSpec.preset("aurora", rank=2, targets=["fc1"]), name="au")
    b = lorazoo.adapt(model, lorazoo.AdapterSpec(rank=2, targets=["fc1"]), name="b")
    with pytest.raises(lorazoo.SpecError, match="cannot be merged or combined"):
        combine(model, ["au", "b"], [1, 1], "svd")
    del a, b


def test_the_combination_saves_loads_and_trains():
    model, _ = two_loras()
    h = combine(model, ["a0", "a1"], [1, 1], "cat", name="mix")
    x, _ = tiny_data()
    out = model(x).logits.detach()
    assert h.num_trainable() > 0 and all(p.requires_grad for p in h.trainable_parameters())
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        h.save(d)
        fresh = TinyNet()
        lorazoo.load(fresh, d)
        torch.testing.assert_close(fresh(x).logits, out, rtol=1e-9, atol=1e-12)
