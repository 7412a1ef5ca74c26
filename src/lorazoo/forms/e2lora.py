"""E2LoRA: LoRA shared within entropy-guided intervals of adjacent layers, ranks per interval ([55]).

M. Li, P. Ye, J. Ye, H. He, T. Chen, "E²LoRA: Efficient and effective low-rank adaptation with
entropy-guided adaptive sharing", ICLR 2026 (OpenReview IQttyo0460). The unified study gives no
equation for it, no official code is known, and the paper's full text could not be read here.
What was read, and what was taken from it:

- The abstract (OpenReview / ICLR 2026 poster page): a gradient-based *proxy entropy* of the
  pre-trained layers shows "Local Similarity" (adjacent layers alike) and "Layer-wise Information
  Heterogeneity"; E²LoRA is "dual-adaptive": *sharing intervals* are partitioned adaptively,
  guided by the inter-layer proxy-entropy similarity, and *ranks* are allocated adaptively,
  informed by the layer-wise absolute proxy entropy; it matches or beats LoRA with "approximately
  50% fewer trainable parameters".
- The papernotes.org summary (en.papernotes.org/ICLR2026/model_compression/e²lora_...): "adaptively
  partition adjacent similar layers into the same sharing interval and allocate LoRA ranks to each
  interval according to its information content"; "halves trainable parameters"; compared with
  LoRA and ShareLoRA (which shares A across layers); existing methods share "the same LoRA
  parameters indiscriminately across all layers or using fixed block sharing".

Everything below that is not in those two sentences is a choice made here (unverified: the
paper's full text could not be read here):

- Layers are blocks: a target's block is its path up to its first numeric part
  (``encoder.layer.3.attention.self.query`` -> ``encoder.layer.3``); a target with no numeric part
  is a block of its own. Intervals are runs of consecutive block indices of one stack
  (``encoder.layer``), never across stacks; a block outside any stack is its own interval.
- What is shared: within an interval, the targets of one module type (``BuildContext.module_type``:
  the path with block indices wildcarded, and the shape; e.g. every ``query`` of blocks 3-5) use
  one pair of factors, A (r_k, in) and B (out, r_k), stored once (ShareLoRA's banks,
  ``forms.sharelora.SharedFactors``). ``e2lora_share="AB"`` (default: "the same LoRA parameters"
  shared within an interval) or "A" / "B" (the other factor per layer, as ShareA / ShareB).
- Proxy entropy, the partition rule and its threshold, the rank rule and the budget: see
  ``lorazoo.inits.e2lora`` (the calibration pass that decides them). In short: H = entropy of the
  normalized singular spectrum of the calibration gradient dL/dW of the frozen model; a block joins
  the interval of its predecessor when |H_b - mean H| / max <= ``e2lora_threshold`` (0.1);
  interval k gets rank r_k ∝ Σ_{i in k} H_i / (its parameters per rank), under a budget of
  ``e2lora_budget`` = 0.5 of LoRA-r's trainable parameters (the abstract's "approximately 50%
  fewer"; met exactly where shapes allow, tested). On MiniLM-L6 (the sentiment task, 8 batches) this
  gives 5 intervals over the 6 blocks (0-1 shared) and ranks 12, 5, 3, 3, 1 (the pooler 4). The
  decided intervals and ranks are recorded in the adapter's spec (``e2lora_intervals``,
  ``e2lora_ranks``), so a load rebuilds the same shapes without data; both may also be given by hand
  (then no data is needed), or only the intervals (ranks still allocated from the data).
- Init: LoRA's (A Kaiming-uniform a = sqrt(5), B zero), shared and local factors alike: the model
  starts as the base (the abstract does not say; LoRA's and ShareLoRA's rule).
- Forward: exactly ShareLoRA's, h = W0 x + s·B(m ⊙ A x) with this layer's (views of) shared
  factors; s = alpha / r_k (the scale part, at the interval's rank). Cost: LoRA's two thin matmuls
  per layer at rank r_k; no (out, in) update while training. A shared tensor sums the gradients of
  all the layers of its interval and type. The adapter's FLOPs are 2T·Σ_layers r_k(in + out)
  against LoRA's 2T·L·r(in + out): fewer where Σ_k n_k·r_k <= L·r (MiniLM above: 36 against 48), but
  with uniform entropies and AB sharing r_k ≈ ρ·r·n_k, so long intervals (n_k > 1/ρ = 2) cost up to
  ρ·n_k times LoRA's adapter FLOPs; both stay small beside the base matmul (r_k << in). Memory:
  half LoRA's trainable parameters and optimizer state; activations T·r_k per layer.
- Not a per-layer B·A (a shared factor is not this layer's own): factor inits, LoRA-Pro and ReLoRA
  refuse it, as ShareLoRA.
"""
from __future__ import annotations

import math

from ..errors import SpecError
from ..parts import Form, check_choice
from ..registry import FORMS
from .sharelora import SHARES, ShareLoRA


def block_key(path: str) -> str:
    """The block a target belongs to: its path up to its first numeric part, or the path itself."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return path


def parse_block(key: str) -> tuple[str, int | None]:
    """(stack, index) of a block key (``encoder.layer.3`` -> ("encoder.layer", 3)); (key, None) for a
    block outside any stack."""
    head, _, last = key.rpartition(".")
    return (head, int(last)) if last.isdigit() else (key, None)


def interval_label(interval: list[str]) -> str:
    """``layers.0-2`` for blocks 0..2 of ``layers``; the key itself for a one-block interval."""
    if len(interval) == 1:
        return interval[0]
    stack, first = parse_block(interval[0])
    return f"{stack}.{first}-{parse_block(interval[-1])[1]}"


def check_intervals(intervals, ranks) -> None:
    """Refuse malformed ``e2lora_intervals`` / ``e2lora_ranks`` (before any model is touched)."""
    if ranks is not None and intervals is None:
        raise SpecError("e2lora_ranks needs e2lora_intervals (one rank per interval); give both or neither")
    if intervals is None:
        return
    if not isinstance(intervals, list) or not intervals or not all(
            isinstance(i, list) and i and all(isinstance(k, str) and k for k in i) for i in intervals):
        raise SpecError(f"e2lora_intervals must be a non-empty list of non-empty lists of block names "
                        f"(e.g. [['layers.0', 'layers.1'], ['layers.2']]), got {intervals!r}")
    seen = [k for i in intervals for k in i]
    dup = sorted({k for k in seen if seen.count(k) > 1})
    if dup:
        raise SpecError(f"e2lora_intervals names block(s) {', '.join(dup[:3])} more than once")
    for interval in intervals:
        if len(interval) == 1:
            continue
        parsed = [parse_block(k) for k in interval]
        if any(i is None for _, i in parsed) or len({s for s, _ in parsed}) > 1 or [i for _, i in parsed] != list(
                range(parsed[0][1], parsed[0][1] + len(parsed))):
            raise SpecError(f"e2lora_intervals: {interval!r} is not a run of consecutive blocks of one stack "
                            f"(a sharing interval holds adjacent layers, in order)")
    if ranks is None:
        return
    if not isinstance(ranks, list) or len(ranks) != len(intervals) or not all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= 2**31 for r in ranks):
        raise SpecError(f"e2lora_ranks must be a list of {len(intervals)} integers >= 1 (one per interval of "
                        f"e2lora_intervals), got {ranks!r}")


def interval_index(intervals: list[list[str]], keys) -> dict[str, int]:
    """Block key -> index of its interval, checking that ``intervals`` cover exactly the blocks ``keys``
    of the targets (each once)."""
    index = {k: n for n, interval in enumerate(intervals) for k in interval}
    keys = list(dict.fromkeys(keys))
    missing = [k for k in keys if k not in index]
    extra = [k for k in index if k not in set(keys)]
    if missing or extra:
        raise SpecError(
            "e2lora_intervals must cover the targets' blocks exactly: "
            + (f"no interval holds {', '.join(missing[:3])}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"{', '.join(extra[:3])} hold(s) no target" if extra else ""))
    return index


@FORMS.register("e2lora", paper="E²LoRA (Li et al., ICLR 2026) [55]",
                equations="no equation in the study; h = W0 x + s·B_{k,t}(A_{k,t} x): one pair per sharing interval "
                          "k of adjacent blocks and module type t, rank r_k (abstract + papernotes summary)",
                summary="LoRA shared within adaptive intervals of adjacent layers (both factors by default), a rank "
                        "per interval; intervals and ranks from calibration (init 'e2lora')")
class E2LoRA(ShareLoRA):
    """ShareLoRA's form, one bank per (sharing interval, module type); see the module docstring."""

    options = {"e2lora_share": "AB", "e2lora_intervals": None, "e2lora_ranks": None}

    def __init__(self, in_features, out_features, rank, scale, opts, ctx):
        Form.__init__(self, in_features, out_features, rank, scale, opts, ctx)
        intervals, ranks = opts.get("e2lora_intervals"), opts.get("e2lora_ranks")
        if intervals is None:
            raise SpecError("form 'e2lora' needs its sharing intervals: use init 'e2lora' with calibration data, "
                            "or give e2lora_intervals (and e2lora_ranks)")
        k = interval_index(intervals, map(block_key, ctx.shapes))[block_key(ctx.path)]
        if ranks is not None and ranks[k] != rank:
            raise SpecError(f"layer {ctx.path!r} has rank {rank} but its interval {interval_label(intervals[k])!r} "
                            f"has rank {ranks[k]} in e2lora_ranks")
        self.interval = k
        self.build_factors(ctx, f"e2lora_i{k}", opts.get("e2lora_share", "AB"), "type", in_features, out_features,
                           rank)

    @classmethod
    def validate(cls, opts):
        check_choice("e2lora_share", opts["e2lora_share"], SHARES)
        check_intervals(opts["e2lora_intervals"], opts["e2lora_ranks"])

    @classmethod
    def check_spec(cls, spec):
        if spec.init != "e2lora":
            raise SpecError(f"form 'e2lora' takes its sharing intervals and ranks from init 'e2lora', not "
                            f"{spec.init!r}")
