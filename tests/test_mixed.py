"""Per-sample adapters (lorazoo.mixed_batch): each sample equals a run with only its adapter active,
for every form with a weight update, computed without a loop over sub-batches."""
import copy

import pytest
import torch
from torch import nn

import lorazoo
from lorazoo.mixed import mixed_batch
from tiny import TinyNet, perturb, tiny_data


class Seq(nn.Module):
    """Token sequences through two linear layers, batch first: (batch, tokens, 12) -> (batch, tokens, 3)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
        self.double()

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def build(specs, model=None):
    model = model or Seq()
    for i, (name, spec) in enumerate(specs.items()):
        h = lorazoo.adapt(model, spec, name=name)
        perturb(h, seed=20 + i)
    return model.eval()


def alone(model, names, x):
    """The reference: each sample through the model with only its adapter active (None: none)."""
    outs = []
    for i, n in enumerate(names):
        if n is None:
            lorazoo.activate(model)
        else:
            lorazoo.activate(model, n)
        outs.append(model(x[i:i + 1]))
    return torch.cat(outs)


S = lorazoo.AdapterSpec
FORMS = {
    "lora": S(rank=3, targets=["fc1", "fc2"]),
    "rslora": S.preset("rslora", rank=2, targets=["fc1", "fc2"]),
    "dora": S(form="dora", rank=2, targets=["fc1", "fc2"]),
    "vera": S.preset("vera", rank=6, targets=["fc1", "fc2"]),
    "loha": S(form="loha", rank=2, targets=["fc2"]),
    "lokr": S(form="lokr", rank=2, targets=["fc1"]),
    "moslora": S(form="moslora", rank=3, targets=["fc1", "fc2"]),
    "adalora": S.preset("adalora", rank=3, targets=["fc1", "fc2"]),
    "pissa": S(rank=2, init="pissa", targets=["fc1", "fc2"]),
    "droplora": S.preset("droplora", rank=2, targets=["fc1"]),
    "sharelora": S(form="sharelora", rank=2, targets=["fc1", "fc2"]),
    "vblora": S.preset("vblora", rank=2, targets=["fc1", "fc2"], vblora_vector_length=4, vblora_num_vectors=8),
    "prolora": S(form="prolora", rank=4, targets=["fc1", "fc2"]),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_sample_gets_its_own_adapter(form):
    model = build({"a": FORMS[form], "b": S(rank=4, targets=["fc2"])})
    names = ["a", None, "b", "a", None, "b", "a"]
    x = torch.randn(len(names), 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = alone(model, names, x)
        lorazoo.activate(model, "a")
        with mixed_batch(model, names):
            got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_all_forms_at_once_and_the_layers_are_back_after_the_block():
    model = build(FORMS)
    names = [*FORMS, None] * 2
    x = torch.randn(len(names), 3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = alone(model, names, x)
        lorazoo.activate(model, "lora")
        before = model(x)
        with mixed_batch(model, names):
            got = model(x)
        after = model(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # the same computation as before the block


def test_the_forward_does_not_loop_over_adapters():
    """The adapters' factors are stacked once; a layer's forward is the same few batched ops for any K."""
    calls = {}
    for k in (2, 6):
        model = build({f"a{i}": S(rank=2, targets=["fc1", "fc2"]) for i in range(k)})
        names = [f"a{i % k}" for i in range(12)]
        x = torch.randn(12, 4, 12, dtype=torch.float64)
        n = [0]
        orig = torch.bmm

        def counting(*a, **kw):
            n[0] += 1
            return orig(*a, **kw)

        with mixed_batch(model, names), torch.no_grad():
            torch.bmm = counting
            try:
                model(x)
            finally:
                torch.bmm = orig
        calls[k] = n[0]
    assert calls[2] == calls[6] == 4  # two per adapted layer, whatever the number of adapters


def test_stacks_are_kept_between_batches_and_follow_every_change():
    """The stacked factors are reused by the next batch, and rebuilt when an adapter's tensors change
    (an optimizer step), an adapter is added, or the base weight changes."""
    model = build({"a": S(rank=2, targets=["fc1", "fc2"]), "b": S(rank=3, targets=["fc2"])})
    names = ["a", "b", None, "a"]
    x = torch.randn(len(names), 3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def check():
        with torch.no_grad():
            with mixed_batch(model, names):
                got = model(x)
            torch.testing.assert_close(got, alone(model, names, x), rtol=1e-10, atol=1e-12)

    check()
    stack = model.fc2.__dict__["_mixed_stack"]
    check()
    assert model.fc2.__dict__["_mixed_stack"] is stack  # reused, not rebuilt
    h = lorazoo.handles_of(model)["b"]
    model.train()
    lorazoo.activate(model, "b")
    opt = torch.optim.SGD(h.trainable_parameters(), lr=0.5)
    model(x).square().sum().backward()
    opt.step()  # in place: only the version counters tell
    model.eval()
    check()
    perturb(lorazoo.adapt(model, S(rank=2, targets=["fc2"]), name="c"), seed=9)
    names[2] = "c"
    check()
    with torch.no_grad():
        model.fc2.base.weight.mul_(1.1)
    check()


def test_saved_heads_run_per_adapter():
    model = TinyNet()
    for i, name in enumerate(("p", "q")):
        h = lorazoo.adapt(model, S(rank=2, targets=["fc1"], modules_to_save=["head"]), name=name)
        perturb(h, seed=i)
        with torch.no_grad():
            for p in h.saved_modules()["head"].parameters():
                p.add_(0.1 * (i + 1))
    model.eval()
    x, _ = tiny_data(6)
    names = ["p", "q", None, "q", "p", None]
    with torch.no_grad():
        want = []
        for i, n in enumerate(names):
            lorazoo.activate(model, *([n] if n else []))
            want.append(model(x[i:i + 1]).logits)
        with mixed_batch(model, names):
            got = model(x).logits
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-10, atol=1e-12)


def test_refusals():
    model = build({"a": S(rank=2, targets=["fc1"]), "r": S.preset("hydralora", rank=2, targets=["fc2"])})
    x = torch.randn(3, 2, 12, dtype=torch.float64)
    with pytest.raises(lorazoo.SpecError, match="no adapter named 'zz'"):
        with mixed_batch(model, ["a", "zz"]):
            pass
    with pytest.raises(lorazoo.SpecError, match="one adapter name"):
        with mixed_batch(model, "a"):
            pass
    with pytest.raises(lorazoo.SpecError, match="cannot run per sample: form 'hydralora'"):
        with mixed_batch(model, ["a", "r"]):
            pass
    with pytest.raises(lorazoo.LorazooError, match="batch at this layer has 3 samples"):
        with mixed_batch(model, ["a", None]), torch.no_grad():
            model(x)
    model.train()
    with pytest.raises(lorazoo.LorazooError, match="model.eval"):
        with mixed_batch(model, ["a"]):
            pass
    model.eval()
    lorazoo.activate(model, "a")
    lorazoo.handles_of(model)["a"].merge()
    with pytest.raises(lorazoo.LorazooError, match="merged"):
        with mixed_batch(model, ["a"]):
            pass
    assert all(getattr(m, "mixed", None) is None for m in model.modules())


def test_prefix_tuned_encoder_runs_per_adapter_with_its_mask():
    """Prefix tuning saves the whole encoder: its copy runs on the adapter's samples with their rows of the
    attention mask, the base on the others, and transformers' outputs come back in batch order."""
    from test_prefix_tuning import IDS, MASK, bert

    model = bert()
    h = lorazoo.adapt(model, S.preset("prefix_layer", prefix_tokens=3, modules_to_save=["classifier"]), name="p")
    perturb(h, scale=0.5)
    names = ["p", None, "p"]
    with torch.no_grad():
        want = []
        for i, n in enumerate(names):
            lorazoo.activate(model, *([n] if n else []))
            want.append(model(input_ids=IDS[i:i + 1], attention_mask=MASK[i:i + 1]).logits)
        lorazoo.activate(model, "p")
        with mixed_batch(model, names):
            got = model(input_ids=IDS, attention_mask=MASK).logits
            embeds = model.get_input_embeddings()(IDS)  # the encoder called without input_ids: rows still cut
            torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=MASK).logits, got,
                                       rtol=1e-10, atol=1e-12)
            with pytest.raises(lorazoo.LorazooError, match="different shapes"):
                model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-10, atol=1e-12)
    assert (want[1] - want[0]).abs().max() > 1e-4  # the prefix changes its samples


def test_a_saved_module_that_returns_a_scalar_is_refused():
    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(x).square().mean()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.out = nn.Linear(12, 12), Loss()

        def forward(self, x):
            return self.out(self.fc1(x))

    model = Net().double()
    for name in ("p", "q"):
        lorazoo.adapt(model, S(rank=2, targets=["fc1"], modules_to_save=["out"]), name=name)
    model.eval()
    with pytest.raises(lorazoo.LorazooError, match="returned a scalar"):
        with mixed_batch(model, ["p", "q"]), torch.no_grad():
            model(torch.randn(2, 12, dtype=torch.float64))
