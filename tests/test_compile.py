"""torch.compile: an adapted model traces as one graph (no graph break) for LoRA, DoRA, LoHa, LoKr, VeRA
and the dense forms (HiRA, Sine-LoRA), in training (rank dropout on) and in eval, and the compiled model
computes what eager does."""
import pytest
import torch
from torch import nn

import lorazoo
from tiny import perturb

FORMS = {
    "lora": dict(rank=4, rank_dropout=0.3),
    "dora": dict(form="dora", rank=4),
    "loha": dict(form="loha", rank=2),
    "lokr": dict(form="lokr", rank=2),
    "vera": dict(form="vera", rank=8, scale="constant", alpha=1),
    "hira": dict(form="hira", rank=4),  # the dense forms' shared autograd function (forms/dense.py)
    "sinelora": dict(form="sinelora", rank=4, sinelora_frequency=3.0),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def adapted(form):
    model = Net()
    h = lorazoo.adapt(model, lorazoo.AdapterSpec(targets=["fc1", "fc2"], **FORMS[form]))
    perturb(h)
    return model


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_no_graph_break(form, training):
    model = adapted(form).train(training)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(8, 12))
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("form", sorted(FORMS))
def test_compiled_equals_eager_forward_and_backward(form):
    model = adapted(form).eval()
    x = torch.randn(8, 12)
    eager = model(x)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6)
