"""What the overhead benchmark runs: its configuration, the base model, and one runner per method.

A *method* is one thing to time: the floor (the frozen base with gradients flowing to its inputs
only), a lorazoo adapter spec, the same under ``torch.compile`` ("lorazoo+compile": the adapted
model compiled with ``cfg.compile_backend``, inductor by default, compiled when the runner is built
so that no timed step pays for it), or PEFT's implementation of that spec. A *runner* holds one
method's model, built once and kept, and knows how to take one training step (forward, backward,
AdamW step and the adapter's step hooks), one inference forward, and how to merge and unmerge.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import SpecError

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IMPLS = ("floor", "lorazoo", "lorazoo+compile", "peft")
COMPILED = "lorazoo+compile"
ADALORA_STEPS = 1000  # the run length schedules are planned for (AdaLoRA's budget), both implementations


@dataclass
class BenchConfig:
    """The model, data and schedule of one benchmark run (defaults: the documented benchmark)."""

    hidden: int = 512
    intermediate: int = 1376
    layers: int = 4
    heads: int = 8
    vocab: int = 8000
    batch: int = 4
    seq: int = 128
    rank: int = 8
    alpha: float = 16
    targets: list = field(default_factory=lambda: list(LLAMA_TARGETS))
    threads: int = 2
    rounds: int = 10       # timed rounds; each method runs once per round, order rotated
    warmup: int = 2        # untimed rounds before them
    mem_steps: int = 3     # training steps taken before reading the peak memory
    lr: float = 1e-4
    seed: int = 0
    compile_backend: str = "inductor"  # torch.compile backend of the "lorazoo+compile" rows
    device: str = "cpu"    # where models and batches live ("cuda", "cuda:1"); times synchronize it, memory is
    #                        the device's peak allocation there instead of the process's RSS

    def __post_init__(self):
        for name in ("hidden", "intermediate", "layers", "heads", "vocab", "batch", "seq", "rank",
                     "threads", "rounds", "mem_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SpecError(f"bench {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise SpecError(f"bench warmup must be >= 0, got {self.warmup!r}")
        if self.hidden % self.heads:
            raise SpecError(f"bench hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise SpecError(f"bench device must be a torch device such as cpu or cuda, got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SpecError(f"bench device {self.device!r}: this machine has no CUDA device (torch "
                            f"{torch.__version__}); use --device cpu")
        self.targets = list(self.targets)


@dataclass
class Method:
    """One benchmarked method: ``impl`` is 'floor', 'lorazoo' or 'peft'; ``spec`` an AdapterSpec dict."""

    label: str
    impl: str
    spec: dict | None = None

    @property
    def key(self) -> str:
        return self.label if self.impl == "floor" else f"{self.impl}:{self.label}"

    def adapter_spec(self):
        from ..spec import AdapterSpec

        return AdapterSpec.from_dict(self.spec)

    def to_dict(self) -> dict:
        return asdict(self)


FLOOR = Method("floor", "floor")


@dataclass
class Runner:
    """A method's model, built once, with its step, forward and merge operations."""

    method: Method
    model: nn.Module
    trainable: int
    step: Callable[[], None]
    batch: dict
    merge: Callable[[], None] | None = None    # None: the form cannot be merged
    unmerge: Callable[[], None] | None = None
    notes: list = field(default_factory=list)

    @property
    def mergeable(self) -> bool:
        return self.merge is not None

    @torch.no_grad()
    def forward(self) -> None:
        """One inference forward (eval mode, no autograd), the way a served model runs."""
        was_training = self.model.training
        self.model.eval()
        self.model(input_ids=self.batch["input_ids"])
        self.model.train(was_training)


def synchronize() -> None:
    """Wait for queued CUDA work (kernels run asynchronously); nothing on a CPU-only run."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds that ``fn()`` takes, its device work included."""
    synchronize()
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0


def build_base(cfg: BenchConfig) -> nn.Module:
    """A random-init Llama (fp32, SDPA attention); the same weights for every method of a run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.heads, vocab_size=cfg.vocab,
                       max_position_embeddings=max(cfg.seq, 128), tie_word_embeddings=False,
                       use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(conf).to(torch.float32)
    model.to(cfg.device).train()
    return model


def make_batch(cfg: BenchConfig) -> dict:
    """Random token ids with labels = ids (causal language-model loss)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(cfg.device)
    return {"input_ids": ids, "labels": ids}


def floor_runner(method: Method, model: nn.Module, batch: dict) -> Runner:
    """Frozen base; the input embeddings are a leaf that requires grad, so backward runs through
    every layer computing activation gradients and no weight gradient; no optimizer step."""
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step() -> None:
        x = embed(batch["input_ids"]).detach().requires_grad_(True)
        model(inputs_embeds=x, labels=batch["labels"]).loss.backward()

    return Runner(method, model, 0, step, batch)


def give_labels(handle, samples: int) -> None:
    """Forms that cannot train without labels from the data (MoA's domains) get one per sample,
    spread over their label range, for every timed forward (MTLoRA and MokA run their label-free
    path, LoRA's cost)."""
    from ..routing import set_labels

    forms = [ad.form for ad in handle.adapters().values() if getattr(ad.form, "requires_labels", False)]
    for cls in {type(f) for f in forms}:
        n = min(f.label_classes for f in forms if isinstance(f, cls))
        set_labels(handle, cls, torch.arange(samples) % n)


def lorazoo_runner(method: Method, cfg: BenchConfig, model: nn.Module, batch: dict, compile: bool = False) -> Runner:
    """lorazoo's adapter on ``model``; with ``compile`` the steps and forwards run
    ``torch.compile(model, backend=cfg.compile_backend)``, compiled here (one step, one forward,
    and the merged forward) so that the timed rounds measure the compiled code only."""
    from ..adapt import adapt

    handle = adapt(model, method.adapter_spec(), calibration=[batch])
    give_labels(handle, batch["input_ids"].shape[0])
    net = model
    if compile:
        import torch._dynamo.config as dynamo_config

        # every compiled variant recompiles the same forward code (Llama's): room for all of them
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)
        net = torch.compile(model, backend=cfg.compile_backend)
    handle.plan(ADALORA_STEPS)
    opt = torch.optim.AdamW(handle.param_groups(cfg.lr))
    base_lrs = [g["lr"] for g in opt.param_groups]
    state = {"step": 0}

    def step() -> None:
        state["step"] += 1
        n = state["step"]
        for g, lr0 in zip(opt.param_groups, base_lrs):
            g["lr"] = lr0 * handle.lr_factor(n)
        opt.zero_grad(set_to_none=True)
        (net(**batch).loss + handle.aux_loss()).backward()
        handle.before_step(opt)
        opt.step()
        handle.after_step(opt, n)

    mergeable = all(ad.form.mergeable for ad in handle.adapters().values())
    runner = Runner(method, net, handle.num_trainable(), step, batch,
                    handle.merge if mergeable else None, handle.unmerge if mergeable else None)
    if compile:
        from torch._dynamo.utils import counters

        breaks0 = sum(counters["graph_break"].values())
        t0 = time.perf_counter()
        step()
        runner.forward()
        if mergeable:
            runner.merge()
            runner.forward()
            runner.unmerge()
        runner.notes.append({"compile_s": round(time.perf_counter() - t0, 2), "backend": cfg.compile_backend,
                             "graph_breaks": sum(counters["graph_break"].values()) - breaks0})
    return runner
