"""QLoRA: adapters on quantized bases (bitsandbytes NF4/FP4/int8, torchao NF4), lorazoo.quantize,
merge(dequantize=True), save/load across precisions, gradient checkpointing (lorazoo.qbase)."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from lorazoo import qbase
from lorazoo.errors import LoadError, NotMergeableError, SpecError
from lorazoo.layer import AdaptedLayer
from lorazoo.quantize import model_bytes, parse_choice
from tiny import TinyNet, TinyTask, perturb, train

F32 = torch.float32
BNB = pytest.mark.skipif(not qbase.available("bitsandbytes"), reason="bitsandbytes is not installed (lorazoo[quant])")
AO = pytest.mark.skipif(not qbase.available("torchao"), reason="torchao is not installed (lorazoo[quant])")
# (kind, backend) pairs; each skips with the reason when its library is missing
BACKENDS = [pytest.param("nf4", "bitsandbytes", marks=BNB, id="bnb-nf4"),
            pytest.param("fp4", "bitsandbytes", marks=BNB, id="bnb-fp4"),
            pytest.param("int8", "bitsandbytes", marks=BNB, id="bnb-int8"),
            pytest.param("nf4", "torchao", marks=AO, id="torchao-nf4")]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Wide(nn.Module):
    """TinyNet's shape with layers every backend takes (torchao: in·out divisible by 64·256;
    bitsandbytes on CPU: in_features a multiple of 64)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2, self.head = nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def forward(self, x, labels=None):
        from types import SimpleNamespace

        logits = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


def net(backend=None, seed=0):
    return Wide(seed)


def data(backend=None, n=32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 128, generator=g)
    return x, x[:, :3].argmax(-1)


def dense_twin(qmodel, backend, seed=0):
    """The same network in full precision with the quantized model's dequantized weights."""
    twin = net(backend, seed)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(twin, name).weight.copy_(qbase.dequantize(getattr(qmodel, name)))
            getattr(twin, name).bias.copy_(getattr(qmodel, name).bias)
    return twin


# --- lorazoo.quantize ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,backend", BACKENDS)
def test_quantize_replaces_linears_but_the_head_and_saves_memory(kind, backend):
    model = net(backend)
    x, _ = data(backend)
    ref = model(x=x).logits.detach()
    before = model_bytes(model)
    lorazoo.quantize(model, kind, backend)
    assert qbase.kind(model.fc1) == kind and qbase.backend(model.fc1) == backend
    assert qbase.is_quantized(model.fc2) and not qbase.is_quantized(model.head)
    assert not any(p.requires_grad for p in model.fc1.parameters())
    after = model_bytes(model)
    assert after < before * (0.4 if kind == "int8" else 0.3)
    rel = (model(x=x).logits - ref).norm() / ref.norm()
    assert rel < (0.02 if kind == "int8" else 0.4)  # two tiny 4-bit layers in a row
    for name in ("fc1", "fc2"):  # the weight is the quantization of the original within its error
        w = getattr(net(backend), name).weight
        err = (qbase.dequantize(getattr(model, name)) - w).norm() / w.norm()
        assert 0 < err < qbase.RELATIVE_ERROR[kind]


def test_quantize_memory_of_a_small_model_nf4_vs_fp32():
    pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    fp32 = model_bytes(model)
    lorazoo.quantize(model, "nf4")
    nf4 = model_bytes(model)
    # 4 bits per weight plus one fp32 absmax per 64 weights (4.5 bits), fp32 biases
    weights = 2 * 512 * 1024
    assert nf4 == weights // 2 + weights // 64 * 4 + (1024 + 512) * 4
    assert fp32 / nf4 > 6.5


@BNB
def test_quantize_refusals_change_nothing():
    model = TinyNet(dtype=F32)  # 12 -> 16 -> 16: layers some kernels cannot take
    with pytest.raises(SpecError, match="backend"):
        lorazoo.quantize(model, "nf4", backend="gptq")
    with pytest.raises(SpecError, match="quantizes to nf4"):
        lorazoo.quantize(model, "int8", backend="torchao")
    if qbase.available("torchao"):
        with pytest.raises(SpecError, match="16384"):
            lorazoo.quantize(model, "nf4", backend="torchao")
    with pytest.raises(SpecError, match="multiple of the block size 64"):
        lorazoo.quantize(model, "nf4")  # bitsandbytes' CPU 4-bit kernels: in_features % 64 == 0
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear
    with pytest.raises(SpecError, match="must be one of"):
        parse_choice("nf3")
    lorazoo.quantize(model, "int8")  # int8 takes any shape
    assert qbase.kind(model.fc1) == "int8" and not qbase.is_quantized(model.head)


# --- adapters on a quantized base -----------------------------------------------------------------
@pytest.mark.parametrize("kind,backend", BACKENDS)
@pytest.mark.parametrize("form", ["lora", "dora", "hira", "lorma_pi", "vera"])
def test_adapter_on_quantized_base_equals_it_on_the_dequantized_weights(kind, backend, form):
    """Every form computes on the quantized layer what it computes on a dense layer holding the
    dequantized weight: output and gradients (forms reading W get it dequantized, one layer at a time)."""
    q = lorazoo.quantize(net(backend), kind, backend)
    d = dense_twin(q, backend)
    spec = lorazoo.AdapterSpec(form=form, rank=4, targets=["fc1", "fc2"])
    hq, hd = lorazoo.adapt(q, spec), lorazoo.adapt(d, spec)
    perturb(hq, 0.2)
    perturb(hd, 0.2)
    x, y = data(backend, 8)
    lq, ld = q(x=x, labels=y), d(x=x, labels=y)
    torch.testing.assert_close(lq.logits, ld.logits, rtol=1e-4, atol=1e-5)
    lq.loss.backward()
    ld.loss.backward()
    gq, gd = dict(hq.named_trainable_parameters()), dict(hd.named_trainable_parameters())
    assert gq.keys() == gd.keys() and gq
    for k in gq:
        torch.testing.assert_close(gq[k].grad, gd[k].grad, rtol=1e-3, atol=1e-5, msg=k)
    assert qbase.is_quantized(q.fc1.base)  # the base stays the library's quantized layer


@BNB
@pytest.mark.parametrize("form", ["lora", "dora"])
def test_adapter_on_quantized_base_starts_as_it_and_trains(form):
    model = lorazoo.quantize(Wide(), "nf4")
    x, y = data()
    base = model(x=x).logits.detach()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form=form, rank=4, targets=["fc1", "fc2"]))
    torch.testing.assert_close(model(x=x).logits, base, rtol=0, atol=1e-6)
    losses = train(model, handle, steps=20, lr=2e-2, data=(x, y))
    assert losses[-1] < 0.7 * losses[0]
    assert qbase.is_quantized(model.fc1.base) and not model.fc1.base.weight.requires_grad


@BNB
@pytest.mark.parametrize("form,opts", [("hira", {}), ("dora", {"dora_detach_norm": False})])
def test_dequantized_weight_is_not_kept_for_backward(form, opts, monkeypatch):
    """Forms that read W get it dequantized for the forward; autograd keeps a reference to the quantized
    layer instead of the dense copy (freed once the forward returns) and dequantizes again in backward."""
    import gc
    import weakref

    model = lorazoo.quantize(nn.Sequential(nn.Linear(64, 64)), "nf4")
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form=form, rank=4, targets=["0"], **opts))
    perturb(handle, 0.1)
    made, calls = [], []
    real = AdaptedLayer.linear_weight
    real_dequantize = qbase.dequantize

    def recording(self):
        w = real(self)
        made.append(weakref.ref(w))
        return w

    def counting(module):
        calls.append(1)
        return real_dequantize(module)
    monkeypatch.setattr(AdaptedLayer, "linear_weight", recording)
    out = model(torch.randn(3, 64))
    gc.collect()
    assert made and all(r() is None for r in made), "the dense weight outlived the forward"
    import lorazoo.layer as layer_module
    monkeypatch.setattr(layer_module, "dequantize", counting)
    out.sum().backward()
    assert calls  # dequantized again for backward
    assert all(p.grad is not None for p in handle.trainable_parameters())


@BNB
def test_init_that_shifts_the_base_requantizes_the_residual():
    """PiSSA on a quantized base: the residual is re-quantized (as PEFT does for OLoRA), the shift is
    recorded, and delete() brings a base back within one quantization step."""
    model = lorazoo.quantize(Wide(), "nf4")
    x, _ = data()
    w0 = qbase.dequantize(model.fc1)
    base = model(x=x).logits.detach()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="lora", init="pissa", rank=4, targets=["fc1", "fc2"]))
    layer = model.fc1
    ad = layer.adapters["default"]
    assert ad.shift_A.shape[0] == 4 and qbase.is_quantized(layer.base)
    residual = w0 + ad.shift_B @ ad.shift_A  # W - s·B·A, what the base must now hold (quantized)
    err = (qbase.dequantize(layer.base) - residual).norm() / residual.norm()
    assert 0 < err < qbase.RELATIVE_ERROR["nf4"]
    assert (model(x=x).logits - base).norm() / base.norm() < 0.15  # starts near the base (re-quantization)
    handle.delete()
    assert (qbase.dequantize(model.fc1) - w0).norm() / w0.norm() < qbase.RELATIVE_ERROR["nf4"]


@BNB
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("init,form", [("pissa", "lora"), ("milora", "lora"), ("olora", "lora"), ("corda", "lora"),
                                       ("eva", "lora"), ("lora_ga", "lora"), ("goat", "goat")])
def test_weight_and_data_driven_inits_on_a_quantized_base(init, form, kind):
    """Inits read the dequantized weight (and calibrate through the quantized layers); those that move a
    part of W into the adapter re-quantize the residual, so the model starts within that rounding."""
    model = lorazoo.quantize(Wide(), kind)
    x, y = data(n=64)
    calibration = [{"x": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, 64, 16)]
    base = model(x=x).logits.detach()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form=form, init=init, rank=4, targets=["fc1", "fc2"]),
                           calibration=calibration)
    shifted = model.fc1.adapters["default"].shift_A.shape[0] > 0
    assert shifted == (init != "eva")
    rel = float((model(x=x).logits - base).norm() / base.norm())
    assert rel < (1e-6 if not shifted else 0.03 if kind == "int8" else 0.3), rel
    assert qbase.kind(model.fc1.base) == kind
    losses = train(model, handle, steps=10, lr=1e-2, data=(x, y))
    assert losses[-1] < 0.5 * losses[0]


@BNB
def test_qpissa_adapt_full_precision_then_quantize_the_residual():
    """PiSSA's QPiSSA: quantizing the residual W - s·B·A loses less than quantizing W."""
    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():  # a weight with a dominant low-rank part, as pretrained weights have
        full[0].weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) + 0.05 * torch.randn(64, 64))
    W = full[0].weight.detach().clone()
    qlora = qbase.dequantize(qbase.quantized_linear(W, None, "nf4"))
    lorazoo.adapt(full, lorazoo.AdapterSpec(form="lora", init="pissa", rank=4, targets=["0"]))
    lorazoo.quantize(full, "nf4")
    layer = full[0]
    form = layer.adapters["default"].form
    assert qbase.is_quantized(layer.base)
    start = qbase.dequantize(layer.base) + form.scale * form.B @ form.A
    assert (start - W).norm() < 0.5 * (qlora - W).norm()


@BNB
def test_merge_refuses_then_merges_dequantized():
    model = lorazoo.quantize(Wide(), "nf4")
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="lora", rank=4, targets=["fc1", "fc2"]))
    perturb(handle)
    x, _ = data()
    out = model(x=x).logits.detach()
    with pytest.raises(NotMergeableError, match="quantized.*merge\\(dequantize=True\\)"):
        handle.merge()
    assert not handle.merged and qbase.is_quantized(model.fc1.base) and qbase.is_quantized(model.fc2.base)
    handle.merge(dequantize=True)
    assert type(model.fc1.base) is nn.Linear and model.fc1.base.weight.dtype == F32 and handle.merged
    torch.testing.assert_close(model(x=x).logits, out, rtol=1e-5, atol=1e-5)
    handle.unmerge()
    torch.testing.assert_close(model(x=x).logits, out, rtol=1e-5, atol=1e-5)


@BNB
def test_merge_dequantize_refuses_unmergeable_forms_before_dequantizing():
    model = lorazoo.quantize(Wide(), "nf4")
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="denselora", rank=4, targets=["fc1", "fc2"]))
    with pytest.raises(NotMergeableError):
        handle.merge(dequantize=True)
    assert qbase.is_quantized(model.fc1.base)


# --- save / load across precisions ----------------------------------------------------------------
@BNB
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_moves_between_quantized_and_full_precision_bases(kind, tmp_path):
    x, _ = data()
    q = lorazoo.quantize(Wide(), kind)
    hq = lorazoo.adapt(q, lorazoo.AdapterSpec(form="lora", rank=4, targets=["fc1", "fc2"]))
    perturb(hq)
    hq.save(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert config["base_quantization"] == kind
    # trained on the quantized base -> loads on the full-precision base, with a warning saying why
    full = Wide()
    with pytest.warns(UserWarning, match=f"{kind} quantization error"):
        hf = lorazoo.load(full, tmp_path / "q")
    for k, v in hq.state_dict().items():
        torch.testing.assert_close(hf.state_dict()[k], v, rtol=0, atol=0)
    # and the reverse: saved on full precision, loaded on a quantized base
    hf.save(tmp_path / "f")
    q2 = lorazoo.quantize(Wide(), kind)
    with pytest.warns(UserWarning, match="quantization"):
        lorazoo.load(q2, tmp_path / "f")
    torch.testing.assert_close(q2(x=x).logits, q(x=x).logits, rtol=1e-5, atol=1e-5)
    # a different model is still refused, the message naming the tolerance
    for other in (Wide(5), lorazoo.quantize(Wide(5), kind)):
        with pytest.raises(LoadError, match="different base model.*allowing for"):
            lorazoo.load(other, tmp_path / "q")


@BNB
def test_full_precision_save_and_load_keep_the_strict_fingerprint(tmp_path):
    """No quantization on either side: the float-rounding tolerance, no warning."""
    model = Wide()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form="lora", rank=4, targets=["fc1", "fc2"]))
    handle.save(tmp_path / "a")
    assert "base_quantization" not in json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    nudged = Wide()
    with torch.no_grad():
        nudged.fc1.weight.mul_(1.01)  # well inside the 4-bit tolerance, far outside the strict one
    with pytest.raises(LoadError, match="different base model"):
        lorazoo.load(nudged, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorazoo.load(Wide(), tmp_path / "a")


@BNB
def test_pissa_adapter_saved_on_full_precision_loads_on_nf4(tmp_path):
    full = Wide()
    handle = lorazoo.adapt(full, lorazoo.AdapterSpec(form="lora", init="pissa", rank=4, targets=["fc1", "fc2"]))
    handle.save(tmp_path / "p")
    q = lorazoo.quantize(Wide(), "nf4")
    w0 = qbase.dequantize(q.fc1)
    with pytest.warns(UserWarning):
        hq = lorazoo.load(q, tmp_path / "p")
    ad = q.fc1.adapters["default"]
    residual = w0 + ad.shift_B @ ad.shift_A
    assert (qbase.dequantize(q.fc1.base) - residual).norm() / residual.norm() < qbase.RELATIVE_ERROR["nf4"]
    hq.delete()
    assert qbase.is_quantized(q.fc1)


# --- gradient checkpointing, lorazoo train --quantize ------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).float()


@BNB
@pytest.mark.parametrize("form", ["lora", "dora"])
def test_gradient_checkpointing_on_a_quantized_llama(form):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = lorazoo.quantize(_tiny_llama(), "nf4")
        assert qbase.is_quantized(model.model.layers[0].self_attn.q_proj) and not qbase.is_quantized(model.lm_head)
        handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form=form, rank=4, targets="all-linear"))
        perturb(handle, 0.05)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in handle.named_trainable_parameters()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= 14
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)


@BNB
def test_train_cli_quantize_flag(tmp_path, capsys):  # TinyTask's 12 -> 16 layers: int8 (see refusals)
    from lorazoo.cli import main
    from lorazoo.tasks.base import TASKS

    TASKS[TinyTask.name] = TinyTask
    try:
        assert main(["train", "--task", TinyTask.name, "--rank", "4", "--lr", "0.02", "--epochs", "1",
                     "--batch-size", "32", "--no-progress", "--quantize", "int8", "--out", str(tmp_path / "o")]) == 0
    finally:
        del TASKS[TinyTask.name]
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["base_quantization"] == "int8"
    assert "quantize: int8" in (tmp_path / "o" / "config.yaml").read_text()
    with pytest.raises(SystemExit):
        main(["train", "--quantize", "nf3"])
