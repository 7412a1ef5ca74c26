"""MTLoRA [95]: a shared (task-agnostic) LoRA plus one task-specific LoRA per task, chosen by the sample's task."""
import pytest
import torch

import lorazoo
from lorazoo.forms.mtlora import read_tasks_from_batches, set_tasks, tasks
from lorazoo.train import Trainer
from tiny import TinyNet, adapted, perturb, single_layer, tiny_data, train


def _form(layer):
    return layer.adapters["default"].form


def _ref(layer, x, t):
    """W0 x + b + s·B_sh A_sh x (+ s·B_t A_t x for task t; t None: the shared stream), module by module."""
    f = _form(layer)
    r = f.module_rank
    A, B = f.A.detach(), f.B.detach()
    out = x @ layer.base.weight.detach().T + layer.base.bias.detach() + f.scale * (x @ A[:r].T @ B[:, :r].T)
    if t is not None:
        i = 1 + t
        out = out + f.scale * (x @ A[i * r:(i + 1) * r].T @ B[:, i * r:(i + 1) * r].T)
    return out


def test_each_sample_adds_its_tasks_module_to_the_shared_one():
    model, handle, layer = single_layer("mtlora", rank=2, alpha=4, mtlora_tasks=3)
    perturb(handle)
    x = torch.randn(4, 5, 20, dtype=torch.float64)
    labels = [2, 0, 1, 2]
    with tasks(handle, labels):
        out = model(x)
    for b, t in enumerate(labels):
        torch.testing.assert_close(out[b], _ref(layer, x[b], t), rtol=1e-9, atol=1e-12)
    x2 = torch.randn(3, 20, dtype=torch.float64)  # 2-D: one sample per row
    set_tasks(handle, [1, 1, 0])
    out2 = model(x2)
    for n, t in enumerate([1, 1, 0]):
        torch.testing.assert_close(out2[n], _ref(layer, x2[n], t), rtol=1e-9, atol=1e-12)


def test_without_labels_the_shared_stream_is_plain_lora():
    model, handle, layer = single_layer("mtlora", rank=2, alpha=4, mtlora_tasks=3)
    perturb(handle)
    x = torch.randn(6, 20, dtype=torch.float64)
    torch.testing.assert_close(model(x), _ref(layer, x, None), rtol=1e-9, atol=1e-12)
    model(x).sum().backward()
    f = _form(layer)
    assert f.A.grad[:2].abs().sum() > 0 and torch.count_nonzero(f.A.grad[2:]) == 0 and torch.count_nonzero(f.B.grad[:, 2:]) == 0  # task modules idle


def test_a_task_module_trains_on_its_tasks_samples_only():
    model, handle, layer = single_layer("mtlora", rank=2, mtlora_tasks=3)
    perturb(handle)
    f = _form(layer)
    with tasks(handle, [0, 0, 2]):
        model(torch.randn(3, 20, dtype=torch.float64)).sum().backward()
    used = [f.B.grad[:, 2 * i:2 * i + 2].abs().sum() > 0 for i in range(4)]
    assert used == [True, True, False, True]  # shared, task 0, (task 1 idle), task 2


def test_label_errors():
    model, handle, layer = single_layer("mtlora", rank=2, mtlora_tasks=3)
    with pytest.raises(lorazoo.LorazooError, match="task labels must be integers in 0..2"):
        set_tasks(handle, [0, 3])
    set_tasks(handle, [0, 1])
    with pytest.raises(lorazoo.LorazooError, match="2 task labels.*3 samples"):
        model(torch.randn(3, 20, dtype=torch.float64))
    _, lora = adapted("lora")
    with pytest.raises(lorazoo.LorazooError, match="no 'mtlora' layer"):
        set_tasks(lora, [0])


def test_starts_as_base_trains_with_the_trainer_and_save_load(tmp_path):
    x, y = tiny_data()
    model, handle = adapted("mtlora", rank=2, mtlora_tasks=2)
    torch.testing.assert_close(model(x).logits, TinyNet()(x).logits, rtol=1e-9, atol=1e-12)
    read_tasks_from_batches(handle)
    task = (x[:, 1] > 0).long()
    batches = [{"x": x[i:i + 16], "labels": y[i:i + 16], "tasks": task[i:i + 16]} for i in range(0, 64, 16)]
    out = Trainer(model, handle, lr=2e-2, epochs=10, progress=False).fit(batches)
    assert out["losses"][-1] < 0.9 * out["losses"][0]
    assert all(_form(model.fc1).B[:, 2 * i:2 * i + 2].abs().sum() > 0 for i in range(3))
    model.eval()
    ref = model(x=x, tasks=task).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    with tasks(loaded, task):
        torch.testing.assert_close(fresh(x).logits, ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(lorazoo.NotMergeableError):
        loaded.merge()


def test_preset_trains_without_labels():
    spec = lorazoo.AdapterSpec.preset("mtlora")
    assert (spec.form, spec.rank, spec.options["mtlora_tasks"]) == ("mtlora", 8, 4)
    model, handle = adapted("mtlora", rank=4)
    losses = train(model, handle, steps=30, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("kw,match", [({"mtlora_tasks": 0}, "mtlora_tasks"), ({"mtlora_tasks": 1.5}, "mtlora_tasks"),
                                      ({"init": "pissa"}, "init 'pissa'")])
def test_bad_options_refused(kw, match):
    with pytest.raises(lorazoo.SpecError, match=match):
        lorazoo.AdapterSpec(form="mtlora", **kw)
