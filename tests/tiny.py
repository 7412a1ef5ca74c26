"""A tiny model with the Hugging Face calling convention, and helpers shared by the tests."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import lorazoo


class TinyNet(nn.Module):
    """fc1 (12 -> 16), fc2 (16 -> 16), head (16 -> 3); model(x=..., labels=...) returns .loss."""

    def __init__(self, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2, self.head = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        self.to(dtype)

    def forward(self, x, labels=None):
        logits = self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def tiny_data(n: int = 64, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g, dtype=dtype)
    labels = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5], dtype=dtype)).argmax(-1)
    return x, labels


def calibration_batches(n_batches: int = 4, batch: int = 16):
    x, y = tiny_data(n_batches * batch, seed=7)
    return [{"x": x[i * batch:(i + 1) * batch], "labels": y[i * batch:(i + 1) * batch]} for i in range(n_batches)]


def trains_and_reloads(model, handle, tmp_path) -> None:
    """30 steps at 2e-2 lower the loss by 10 %+, and the adapter reloads (:func:`reloads_equal`)."""
    losses = train(model, handle, steps=30, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0], losses
    reloads_equal(model, handle, tmp_path)


def reloads_equal(model, handle, tmp_path):
    """The saved adapter, loaded on a fresh TinyNet, gives the model's logits in eval mode; the loaded handle."""
    x, _ = tiny_data()
    model.eval()
    out = model(x).logits
    handle.save(tmp_path)
    fresh = TinyNet()
    loaded = lorazoo.load(fresh, tmp_path)
    fresh.eval()
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-9, atol=1e-12)
    return loaded


def train(model, handle, steps: int = 30, lr: float = 1e-2, data=None) -> list[float]:
    """A plain loop through the handle's hooks; returns the losses."""
    x, y = data or tiny_data()
    opt = torch.optim.AdamW(handle.param_groups(lr))
    handle.plan(steps)
    base_lrs = [g["lr"] for g in opt.param_groups]
    losses = []
    give_labels(handle, y)
    model.train()
    for step in range(1, steps + 1):
        for g, lr0 in zip(opt.param_groups, base_lrs):
            g["lr"] = lr0 * handle.lr_factor(step)
        loss = model(x=x, labels=y).loss
        (loss + handle.aux_loss()).backward()
        handle.before_step(opt)
        opt.step()
        opt.zero_grad()
        handle.after_step(opt, step)
        losses.append(loss.item())
    give_labels(handle, None)
    model.eval()
    return losses


def give_labels(handle, y) -> None:
    """Forms routed by labels that come with the data (MoA's domains, MTLoRA's tasks, MokA's
    modalities) get ``y`` folded into their label range, one label per sample (None: cleared)."""
    from lorazoo.routing import set_labels

    for cls in {type(ad.form) for ad in handle.adapters().values() if getattr(ad.form, "label_kind", None)}:
        n = min(ad.form.label_classes for ad in handle.adapters().values() if isinstance(ad.form, cls))
        set_labels(handle, cls, None if y is None else y % n)


def perturb(handle, scale: float = 0.3, seed: int = 3) -> None:
    """Move every trainable tensor off its init, so an update is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def adapted(form: str = "lora", rank: int = 4, calibration=None, **kw):
    """TinyNet with an adapter of ``form`` on fc1 and fc2; returns (model, handle)."""
    model = TinyNet()
    spec = lorazoo.AdapterSpec(form=form, rank=rank, targets=["fc1", "fc2"], **kw)
    return model, lorazoo.adapt(model, spec, calibration=calibration)


def layer_input(n: int = 5, features: int = 16, seed: int = 11, dtype=torch.float64):
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_layer_update(layer, form, delta: torch.Tensor, x: torch.Tensor | None = None) -> None:
    """The adapted layer computes W0 + ``delta`` (a dense reference written from the paper), and so do the
    form's ``delta_weight`` and its factored update for per-sample serving (``update_factors``)."""
    x = layer_input() if x is None else x
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    torch.testing.assert_close(layer(x), x @ (W0 + delta).T + b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(form.delta_weight(W0), delta, rtol=1e-9, atol=1e-12)
    up, down = form.update_factors(W0)
    torch.testing.assert_close(up @ down, delta, rtol=1e-9, atol=1e-12)


def op_shapes(fn) -> set:
    """Shapes of every tensor the aten ops inside ``fn()`` produce (forward and backward), to check
    that a form never materializes its (out, in) update."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    shapes = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes.update(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with Record():
        fn()
    return shapes


def single_layer(form: str, in_features: int = 20, out_features: int = 24, rank: int = 3, **kw):
    """One nn.Linear (float64) adapted with ``form``; returns (model, handle, adapted layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features)).double()
    handle = lorazoo.adapt(model, lorazoo.AdapterSpec(form=form, rank=rank, targets=["0"], **kw))
    return model, handle, model[0]


def rank_mask_draw(rank: int, p: float) -> tuple[int, torch.Tensor]:
    """(seed, mask): a seed after which DropLoRA's forward draws a rank mask that keeps some but not
    all of ``rank``, and that mask (Bernoulli(1 - p) / (1 - p), DropLoRA's rescaled mask).
    ``torch.manual_seed(seed)`` just before the forward makes it draw the same mask."""
    def draw(seed):
        torch.manual_seed(seed)
        return torch.empty(rank, dtype=torch.float64).bernoulli_(1 - p) / (1 - p)

    seed = next(s for s in range(100) if 0 < int((draw(s) != 0).sum()) < rank)
    return seed, draw(seed)


def rewrite_file(folder, change_config=lambda cfg: None, change_tensors=lambda t: None, checksum=True) -> None:
    """Edit a saved adapter where load reads it (the safetensors header holds the config); with
    ``checksum`` the edited tensors and config get matching checksums, as a deliberate (not damaged)
    file would."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lorazoo.files import checksum as sha
    from lorazoo.files import config_checksum as config_sha

    f = folder / "adapter.safetensors"
    with safe_open(str(f), framework="pt") as sf:
        meta = sf.metadata()
    cfg, tensors = json.loads(meta["lorazoo_config"]), load_file(str(f))
    change_tensors(tensors)
    if checksum:
        cfg["checksum"] = sha(tensors)
    change_config(cfg)
    if checksum and isinstance(cfg, dict) and "config_checksum" in cfg:
        cfg["config_checksum"] = config_sha(cfg)
    save_file(tensors, str(f), metadata={**meta, "lorazoo_config": json.dumps(cfg)})


def _tiny_task():
    from lorazoo.tasks.base import Task

    class TinyTask(Task):
        """TinyNet on tiny_data as a lorazoo task (float32), for run(), the CLI and the study runner."""

        name, metric, targets = "tiny_ckpt", "accuracy", ["fc1", "fc2"]
        options = {"n": 96}

        def build_model(self):
            return TinyNet(dtype=torch.float32)

        def train_batches(self, batch_size, epoch=0):
            x, y = tiny_data(self.opts["n"], seed=1, dtype=torch.float32)
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
            return [{"x": x[order[i:i + batch_size]], "labels": y[order[i:i + batch_size]]}
                    for i in range(0, len(x), batch_size)]

        def evaluate(self, model):
            x, y = tiny_data(64, seed=2, dtype=torch.float32)
            with torch.no_grad():
                out = model(x=x, labels=y)
            return {"accuracy": float((out.logits.argmax(-1) == y).float().mean()), "loss": float(out.loss)}

    return TinyTask


TinyTask = _tiny_task()
