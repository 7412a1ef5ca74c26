"""E2LoRA ([55]): LoRA shared within entropy-guided intervals of adjacent layers, ranks per interval.

No equation is published (see lorazoo/forms/e2lora.py); the references below are written from the
rules stated in the module docstrings: ΔW = s_k·B_{k,t} A_{k,t} per interval k and module type t,
spectral proxy entropy of the calibration gradient, greedy adjacent partition, ranks by entropy
share under rho·LoRA's parameters."""
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from types import SimpleNamespace

import lorazoo
from lorazoo.inits.e2lora import E2LoRAInit, partition, proxy_entropy
from stacked import SHAPES, TARGETS, Stacked
from tiny import calibration_batches, perturb, rewrite_file, tiny_data, train

TYPES = {"q": "layers_N_q_12x12", "up": "layers_N_up_12x20", "down": "layers_N_down_20x12"}
GIVEN = dict(e2lora_intervals=[["layers.0", "layers.1"], ["layers.2"]], e2lora_ranks=[3, 2])


def build(model=None, calibration=None, **kw):
    model = model or Stacked()
    spec = lorazoo.AdapterSpec.preset("e2lora", rank=4, alpha=6, targets=TARGETS, **kw)
    return model, lorazoo.adapt(model, spec, calibration=calibration)


def bank(model, k, share, r, kind):
    return model.layers[0].q.adapters["default"].shared[f"e2lora_i{k}_{share}_r{r}_{TYPES[kind]}"]


@pytest.mark.parametrize("share", ["AB", "A", "B"])
def test_matches_dense_reference_for_given_intervals_and_ranks(share):
    model, handle = build(e2lora_share=share, **GIVEN)  # no data needed: both given
    perturb(handle)
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref_base = Stacked()
    for i, (k, r) in enumerate([(0, 3), (0, 3), (1, 2)]):
        for kind in TARGETS:
            path = f"layers.{i}.{kind}"
            layer, base = model.get_submodule(path), ref_base.get_submodule(path)
            fin = SHAPES[kind][0]
            xin = torch.randn(5, fin, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            form = layer.adapters["default"].form
            shared = bank(model, k, share, r, kind)
            A = shared.A.detach() if "A" in share else form.A.detach()
            B = shared.B.detach() if "B" in share else form.B.detach()
            assert A.shape == (r, fin) and B.shape == (SHAPES[kind][1], r)
            s = 6 / r  # alpha / r_k
            want = xin @ base.weight.T + base.bias + s * (xin @ A.T) @ B.T
            torch.testing.assert_close(layer(xin), want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(form.delta_weight(base.weight), s * B @ A, rtol=1e-10, atol=1e-12)
    out = model(x).logits
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-9, atol=1e-10)
    handle.unmerge()


def test_layers_of_one_interval_and_type_share_one_tensor():
    model, handle = build(**GIVEN)
    f = {p: model.get_submodule(p).adapters["default"].form for p in handle.ranks}
    for kind in TARGETS:
        a0, a1, a2 = (f[f"layers.{i}.{kind}"].pair()[1] for i in range(3))
        assert a0.data_ptr() == a1.data_ptr() and a0.data_ptr() != a2.data_ptr()
    assert f["layers.0.q"].pair()[1].data_ptr() != f["layers.0.up"].pair()[1].data_ptr()


def _expected_params(share, ranks=(3, 2), sizes=(2, 1)):
    """Per interval k and type t: A (r_k, in) once or per layer, B (out, r_k) once or per layer."""
    total = 0
    for r, n in zip(ranks, sizes):
        for fin, fout in SHAPES.values():
            total += r * ((fin if "A" in share else n * fin) + (fout if "B" in share else n * fout))
    return total


@pytest.mark.parametrize("share", ["AB", "A", "B"])
def test_shared_tensors_stored_once(share, tmp_path):
    model, handle = build(e2lora_share=share, **GIVEN)
    assert handle.num_trainable() == _expected_params(share)
    handle.save(tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    trained = {k: v for k, v in tensors.items() if k.endswith((".A", ".B"))}
    assert sum(v.numel() for v in trained.values()) == _expected_params(share)
    banks = sorted(k for k in trained if ".shared." in k)  # intervals x types x shared factors, each once
    assert banks == sorted(f"layers.0.q.shared.e2lora_i{k}_{share}_r{r}_{t}.{w}" for k, r in ((0, 3), (1, 2))
                           for t in TYPES.values() for w in share)
    local = [k for k in trained if ".shared." not in k]
    assert len(local) == len(TARGETS) * 3 * (2 - len(share))


def test_starts_as_base():
    x, _ = tiny_data()
    base = Stacked()(x).logits
    model, handle = build(calibration=calibration_batches())
    torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)


# --- proxy entropy, partition, ranks: hand-made cases with known answers ------------------------
def test_proxy_entropy_reference():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=g))
    sigma = torch.tensor([2.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    G = U[:, :5] @ torch.diag(sigma) @ V.T
    p = [4 / 6, 1 / 6, 1 / 6]  # σ² / Σσ²
    assert proxy_entropy(G) == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-10)
    E = torch.tensor([[1.0, -1.0], [2.0, 0.0]], dtype=torch.float64)  # |E| / 4 = 1/4, 1/4, 1/2
    assert proxy_entropy(E, "elementwise") == pytest.approx(2 * 0.25 * math.log(4) + 0.5 * math.log(2), rel=1e-12)
    assert proxy_entropy(torch.zeros(3, 4)) == 0.0
    assert proxy_entropy(3.0 * G) == pytest.approx(proxy_entropy(G), rel=1e-10)  # scale-free


def test_partition_reference():
    H = {"l.0": 1.0, "l.1": 1.0, "l.2": 1.05, "l.3": 2.0, "l.4": 2.1, "head": 5.0}
    assert partition(H, 0.1) == [["l.0", "l.1", "l.2"], ["l.3", "l.4"], ["head"]]
    assert partition(H, 0.1, max_len=2) == [["l.0", "l.1"], ["l.2"], ["l.3", "l.4"], ["head"]]
    assert partition(H, 0.0) == [["l.0", "l.1"], ["l.2"], ["l.3"], ["l.4"], ["head"]]
    assert partition(H, 10.0) == [["l.0", "l.1", "l.2", "l.3", "l.4"], ["head"]]
    # only adjacent blocks share, and a drift is compared with the interval's mean, not the last block
    assert partition({"l.0": 1.0, "l.2": 1.0}, 1.0) == [["l.0"], ["l.2"]]
    assert partition({"l.0": 1.0, "l.1": 1.06, "l.2": 1.12, "l.3": 1.18}, 0.1) == [
        ["l.0", "l.1", "l.2"], ["l.3"]]  # 1.18 vs mean 1.06: 0.102 > 0.1, though 1.18 vs 1.12 is 0.051


def test_rank_allocation_reference():
    """Two intervals of equal cost, entropy mass 3:1, budget 0.5·LoRA-4 over 3 blocks -> Σ r_k = 6: 4.5
    and 1.5, floored to 4 and 1, the leftover rank to the larger remainder (tie: the earlier): 5, 1."""
    model = Stacked()
    spec = lorazoo.AdapterSpec.preset("e2lora", rank=4, targets=TARGETS)
    init = E2LoRAInit(spec)
    targets = {p: model.get_submodule(p) for p in (f"layers.{i}.{k}" for i in range(3) for k in TARGETS)}
    keys = {p: p.rsplit(".", 1)[0] for p in targets}
    init.entropy = {p: (1.0 if p.startswith(("layers.0", "layers.1")) else 2.0 / 3.0) for p in targets}
    # interval 0 holds 2 blocks but shares AB, so it costs as much per rank as interval 1
    assert init.allocate([["layers.0", "layers.1"], ["layers.2"]], targets, keys) == [5, 1]
    init.entropy = {p: 1.0 for p in targets}  # uniform: ranks by number of layers, 4 and 2
    assert init.allocate([["layers.0", "layers.1"], ["layers.2"]], targets, keys) == [4, 2]
    init.entropy = {p: 0.0 for p in targets}  # no information anywhere: by number of layers too
    assert init.allocate([["layers.0", "layers.1"], ["layers.2"]], targets, keys) == [4, 2]


class Parallel(nn.Module):
    """Three identical blocks side by side: every block sees the same input and the same output
    gradient, so their calibration gradients, hence proxy entropies, are identical."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(12, 12), "up": nn.Linear(12, 20)})
                                     for _ in range(3)])
        self.head = nn.Linear(20, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            for block in self.layers[1:]:
                block.load_state_dict(self.layers[0].state_dict())
        self.double()

    def forward(self, x, labels=None):
        h = sum(b["up"](torch.tanh(b["q"](x))) for b in self.layers)
        logits = self.head(torch.tanh(h))
        return SimpleNamespace(loss=None if labels is None else nn.functional.cross_entropy(logits, labels),
                               logits=logits)


def test_identical_gradients_share_one_interval_and_budget_is_met_exactly():
    model = Parallel()
    spec = lorazoo.AdapterSpec.preset("e2lora", rank=4, targets=["q", "up"], e2lora_threshold=1e-9)
    handle = lorazoo.adapt(model, spec, calibration=calibration_batches())
    assert handle.spec.options["e2lora_intervals"] == [["layers.0", "layers.1", "layers.2"]]
    assert handle.spec.options["e2lora_ranks"] == [6]  # 0.5 · 4 · 3 blocks
    lora = 4 * 3 * ((12 + 12) + (12 + 20))
    assert handle.num_trainable() == lora // 2


def test_budget_met_exactly_from_data():
    model, handle = build(calibration=calibration_batches())
    ranks = handle.spec.options["e2lora_ranks"]
    assert sum(ranks) == 6  # 0.5 · r · L with every type in every interval, shared AB
    lora = 4 * 3 * sum(fin + fout for fin, fout in SHAPES.values())
    assert handle.num_trainable() == lora // 2
    intervals = handle.spec.options["e2lora_intervals"]
    assert [k for i in intervals for k in i] == ["layers.0", "layers.1", "layers.2"]
    for p, r in handle.ranks.items():
        k = next(n for n, i in enumerate(intervals) if p.rsplit(".", 1)[0] in i)
        assert r == ranks[k]


# --- files, training, output ----------------------------------------------------------------------
def test_save_load_rebuilds_the_partition_without_data(tmp_path):
    x, y = tiny_data()
    spec = lorazoo.AdapterSpec.preset("e2lora", rank=4, targets=TARGETS, e2lora_threshold=0.3)
    model = Stacked()
    handle = lorazoo.adapt(model, spec, calibration=calibration_batches())
    assert spec.options["e2lora_intervals"] is None  # the caller's spec is left alone
    train(model, handle, steps=3, lr=1e-2)
    out = model(x).logits
    handle.save(tmp_path)
    fresh = Stacked()
    loaded = lorazoo.load(fresh, tmp_path)  # no calibration
    assert loaded.spec == handle.spec and loaded.ranks == handle.ranks
    assert loaded.spec.options["e2lora_intervals"] == handle.spec.options["e2lora_intervals"]
    torch.testing.assert_close(fresh(x).logits, out, rtol=0, atol=0)


@pytest.mark.parametrize("edit", [
    lambda spec: spec.update(e2lora_ranks=[3, 3]),                        # disagrees with the layers' ranks
    lambda spec: spec.update(e2lora_intervals=[["layers.0"], ["layers.1", "layers.2"]]),  # other banks
    lambda spec: spec.update(e2lora_intervals=None),                      # no partition to rebuild
])
def test_load_refuses_an_edited_partition(edit, tmp_path):
    model, handle = build(**GIVEN)
    handle.save(tmp_path)
    rewrite_file(tmp_path, change_config=lambda cfg: edit(cfg["spec"]))
    fresh = Stacked()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(lorazoo.LoadError):
        lorazoo.load(fresh, tmp_path)
    assert not lorazoo.handles_of(fresh) and fresh.state_dict().keys() == before.keys()


def test_training_lowers_loss_and_reaches_the_shared_factors():
    model, handle = build(calibration=calibration_batches(), e2lora_threshold=10.0)  # one interval
    assert len(handle.spec.options["e2lora_intervals"]) == 1
    shared = model.layers[0].q.adapters["default"].shared
    before = {k: v.detach().clone() for k, v in shared.state_dict().items()}
    losses = train(model, handle, steps=40, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0]
    assert all(not torch.equal(shared.state_dict()[k], v) for k, v in before.items() if k.endswith(".B"))


def test_training_output_shows_intervals_and_ranks(capsys):
    from lorazoo.commands.train import _report

    model, handle = build(**GIVEN)
    summary = E2LoRAInit.summary(handle)
    assert summary["intervals"] == {"layers.0-1": 3, "layers.2": 2}
    result = {"metric_name": "acc", "metric_before": 0.5, "metric": 0.6, "steps": 1, "train_seconds": 0.1,
              "trainable_params": handle.num_trainable(), "schedule_summary": summary}
    _report(result, "/tmp/x", False)
    assert "sharing intervals (2; rank each): layers.0-1=3, layers.2=2" in capsys.readouterr().out


# --- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    dict(e2lora_share="C"), dict(e2lora_budget=0), dict(e2lora_budget=-1.0), dict(e2lora_threshold=-0.1),
    dict(e2lora_max_interval=1.5), dict(e2lora_entropy="renyi"), dict(e2lora_intervals="layers.0"),
    dict(e2lora_intervals=[]), dict(e2lora_intervals=[[]]), dict(e2lora_intervals=[["a.0"], ["a.0"]]),
    dict(e2lora_intervals=[["a.0", "a.2"]]), dict(e2lora_intervals=[["a.0", "b.1"]]),
    dict(e2lora_intervals=[["a.1", "a.0"]]), dict(e2lora_intervals=[["head", "a.0"]]),
    dict(e2lora_ranks=[2]), dict(e2lora_intervals=[["a.0"]], e2lora_ranks=[2, 2]),
    dict(e2lora_intervals=[["a.0"]], e2lora_ranks=[0]), dict(e2lora_intervals=[["a.0"]], e2lora_ranks=[True]),
    dict(init="default"), dict(init="pissa"), dict(optim="lora_pro"), dict(schedule="relora"),
])
def test_bad_options_refused(bad):
    with pytest.raises(lorazoo.SpecError):
        lorazoo.AdapterSpec.preset("e2lora", **bad)


def test_init_and_form_come_together():
    with pytest.raises(lorazoo.SpecError, match="e2lora"):
        lorazoo.AdapterSpec(form="lora", init="e2lora")
    with pytest.raises(lorazoo.SpecError, match="e2lora"):
        lorazoo.AdapterSpec(form="sharelora", init="e2lora")
    assert lorazoo.AdapterSpec.preset("e2lora").options["e2lora_budget"] == 0.5


@pytest.mark.parametrize("kw, calibration, match", [
    (dict(e2lora_intervals=[["layers.0", "layers.1"]], e2lora_ranks=[2, ]), None, "no interval holds layers.2"),
    (dict(e2lora_intervals=[["layers.0"], ["layers.1"], ["layers.2"], ["layers.3"]]), calibration_batches(),
     "layers.3 hold"),
    (dict(), None, "calibration"),
    (dict(rank=1, e2lora_budget=0.1), calibration_batches(), "budget"),
])
def test_refused_at_adapt_before_the_model_changes(kw, calibration, match):
    model = Stacked()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = lorazoo.AdapterSpec.preset("e2lora", targets=TARGETS, **{"rank": 4, **kw})
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.adapt(model, spec, calibration=calibration)
    assert not lorazoo.handles_of(model) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_loraplus_puts_each_shared_up_projection_in_the_fast_group_once():
    model, handle = build(optim="loraplus", **GIVEN)
    groups = {g["name"]: g["params"] for g in handle.param_groups(1e-3)}
    fast = {id(p) for p in groups["B"]}
    assert fast == {id(bank(model, k, "AB", r, kind).B) for k, r in ((0, 3), (1, 2)) for kind in TARGETS}
    assert sum(len(v) for v in groups.values()) == len(handle.trainable_parameters())
