"""FLoRA (Hao et al., 2024, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors" [70];
study Eq. 71-76): LoRA with a frozen random A compresses the gradient; resampling A lets the
accumulated update reach high rank.

The adapter reading of the paper, in torch's (out, in) layout (the study writes W̃ as (in, out), so
its A_0 is our Aᵀ and its Aᵀ∇W̃ our G·Aᵀ):

- A (r, in) is frozen (marked ``_lorazoo_frozen`` as LoRA-FA does) and drawn N(0, 1/r)
  (``init="flora_hao"``, so E[AᵀA] = I), B (out, r) starts at 0, s = 1 (the preset:
  scale="constant", alpha=1). With A frozen, f_A ≡ 0 in Eq. 71-73, so Eq. 71 gives
  B_t = −η s Σ_{i<t} G_i Aᵀ exactly under SGD: B's gradient is the compressed gradient s·G·Aᵀ
  (study Eq. 2), and ΔW_t = s·B_t·A = −η s² Σ G_i AᵀA (Eq. 76 and Eq. 3 with equality): FLoRA's
  compress (G·Aᵀ) and decompress (·A) with the optimizer state kept in the compressed space.
- Every κ = ``flora_hao_interval`` optimizer steps (default 1000, the authors' ``kappa``; a value
  below 1 is a fraction of the run, resolved by ``handle.plan(total_steps)`` as ReLoRA's): the
  update is folded into the base, W0 += s·B·A (``merging.fold``, through the base shift, so
  save/load/delete reproduce and undo it), A is redrawn (resample c = step/κ, from a generator
  seeded by the spec's seed, c and the layer's path: ``inits.flora_hao.projection``, so every
  process and a resumed run draw alike), B is zeroed (the model's output is unchanged), and the
  optimizer state of B moves to the new subspace:

  first moment (Adam's ``exp_avg``, SGD's ``momentum_buffer``): m_B <- m_B·A_old·A_newᵀ, the
  paper's momentum transfer (the authors' code: down_proj_new(up_proj_old(m))).

  second moment (``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``): has no faithful transfer: it is a
  per-entry average of squares, v_ij ≈ E[(g_i·a_j)²], and squares do not rotate (the authors' code
  never compresses it: Adafactor's factored second moment lives in the full space). Choice: each
  row becomes its mean, v_ij <- mean_k v_ik. For an isotropic draw a'_j ~ N(0, I/r) the new entry's
  expectation E[(g_i·a'_j)²] = ‖g_i‖²/r is the same for every column j, and the row mean is its
  estimate from the old columns (each old v_ik estimates g_iᵀ(a_k a_kᵀ)g_i, mean over k ≈ ‖g_i‖²/r).
  Kept: Adam's step count (so both moments keep their bias corrections). Zeroing v instead would
  divide the transferred m by ~0 at the next step (ReLoRA's failure mode).

  Exact for SGD with momentum (torch's SGD, no weight decay): SGD's buffer is the compressed
  momentum, so the adapted weights follow the paper's FLoRA with momentum step for step,
  M_t = μM_{t−1} + G_t·Aᵀ, W_t = W_{t−1} − η M_t·A, M <- M·A_old·A_newᵀ at each resample (tested
  in float64, dampening 0; the transfer is linear, so it holds for any dampening too). With Adam it
  is the adapter reading of the paper (Adam on the compressed gradient), not the authors' Adafactor
  variant, whose normalization acts on the decompressed update. Weight decay (AdamW's) acts on B,
  i.e. on the current phase's update only, never on the folded part.

Refused (SpecError, before the model changes): a form whose update is not a mergeable additive
s·B·A (DoRA, VeRA, MoSLoRA, ...: the fold and the compression need it), an init other than
``flora_hao`` (the decompression is unbiased only for A ~ N(0, 1/r), and every resample draws
that), an optim that rewrites gradients (only ``default`` and ``lora_fa``: LoRA-Pro, RPLoRA or
LoRA+ would change B's update away from the compressed gradient), input dropout (B's gradient
becomes that of the dropped-out input, not the model's G) and rank dropout (it masks columns of
G·Aᵀ). A scale s ≠ 1 is allowed: it multiplies the decompressed step by s² (a learning-rate factor).

Cost: between resamples it is LoRA with A frozen (LoRA-FA: no A gradient, no A state, no stored
input for A). A resample costs one (out, r) x (r, in) product per layer (the fold), an (r, in) draw
on the CPU and an (out, r) x (r, r) product per first moment, every κ steps. As PeriodicLoRA's, the
accumulated base change is recorded in the adapter's base shift, compacted to at most min(out, in)
rows: a saved FLoRA adapter holds its base change (dense once it passes min(out, in)/r resamples).
Resume: the resample count is the step over κ, so the only state is κ itself (``state_dict``).
"""
from __future__ import annotations

import torch

from ..errors import LorazooError, SpecError
from ..inits.flora_hao import projection
from ..optim.lora_fa import LoRAFA
from ..parts import Schedule, check_number
from ..registry import SCHEDULES
from .merging import check_plain_product, fold, refuse_merged

FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")
OPTIMS = ("default", "lora_fa")


def transfer_first_moment(m: torch.Tensor, A_old: torch.Tensor, A_new: torch.Tensor) -> None:
    """m <- m·A_old·A_newᵀ in place (m (out, r), A (r, in)): the paper's momentum transfer."""
    m.copy_(m @ (A_old.to(m) @ A_new.to(m).T))


def transfer_second_moment(v: torch.Tensor) -> None:
    """v_ij <- mean_k v_ik in place: every column of a row gets the row's mean (see module doc)."""
    v.copy_(v.mean(dim=1, keepdim=True).expand_as(v))


@SCHEDULES.register("flora_hao", paper="Flora (Hao et al., 2024) [70]",
                    equations="study Eq. 71-76 (f_A ≡ 0: B_t = −η s Σ G_i Aᵀ, ΔW = −η s² Σ G_i AᵀA); every κ "
                              "steps W0 += s·B·A, A <- new N(0, 1/r) draw, B <- 0, m_B <- m_B·A_old·A_newᵀ",
                    summary="frozen random A compresses the gradient; every κ steps fold B·A into the base, "
                            "redraw A, move the momentum")
class FloraHao(Schedule):
    options = {"flora_hao_interval": 1000}

    @classmethod
    def validate(cls, opts):
        every = opts["flora_hao_interval"]
        check_number("flora_hao_interval", every, strict=True)
        if every >= 1 and every != int(every):
            raise SpecError(f"flora_hao_interval is a step count (an integer) or a fraction below 1, got {every!r}")

    @classmethod
    def check_form(cls, form_cls):
        check_plain_product(form_cls, "flora_hao", "compresses the gradient through A and folds s·B·A into the base")

    @classmethod
    def check_spec(cls, spec):
        if spec.init != "flora_hao":
            raise SpecError(
                f"schedule 'flora_hao' draws A ~ N(0, 1/r) at every resample and needs the same start; "
                f"init '{spec.init}' is not it: use init='flora_hao' (or the preset 'flora_hao')")
        if spec.optim not in OPTIMS:
            raise SpecError(
                f"schedule 'flora_hao' trains B on the compressed gradient G·Aᵀ; optim '{spec.optim}' changes "
                f"that gradient or its step: use optim='lora_fa' or 'default'")
        for field in ("dropout", "rank_dropout"):
            if getattr(spec, field) > 0:
                raise SpecError(
                    f"schedule 'flora_hao': {field}={getattr(spec, field)} makes B's gradient differ from the "
                    f"compressed gradient G·Aᵀ of the model; set {field}=0")

    def __init__(self, spec):
        super().__init__(spec)
        every = spec.options["flora_hao_interval"]
        self.interval = int(every) if every >= 1 else None  # a fraction waits for plan()

    def attach(self, handle):
        LoRAFA(self.spec).attach(handle)  # A frozen: no gradient, no optimizer state

    def plan(self, total_steps):
        every = self.spec.options["flora_hao_interval"]
        if every < 1:
            self.interval = max(1, round(every * total_steps))

    def phase(self) -> int:
        if self.interval is None:
            raise LorazooError(
                f"flora_hao_interval={self.spec.options['flora_hao_interval']} is a fraction of the run: call "
                f"handle.plan(total_steps) before training (lorazoo's trainer does), or give it in steps")
        return self.interval

    # --- checkpoint ---------------------------------------------------------------------------
    def state_dict(self):
        """κ as resolved by ``plan``; the resample count is the step over κ, the folds are the base
        shift and the current A is a tensor of the adapter (both saved with it)."""
        return {"interval": self.interval}

    def load_state_dict(self, state):
        if state.get("interval") is not None:
            self.interval = int(state["interval"])

    # --- resample -----------------------------------------------------------------------------
    def after_step(self, handle, optimizer, step):
        T = self.phase()
        if step % T == 0:
            self.resample(handle, optimizer, step // T)

    @torch.no_grad()
    def resample(self, handle, optimizer, count: int) -> None:
        """Fold s·B·A into the base, draw A of resample ``count``, zero B, move B's optimizer state."""
        refuse_merged(handle, "FLoRA")
        layers = handle.layers()
        work = []
        for path, layer in layers.items():  # check every layer before changing any
            ad = layer.adapters[handle.name]
            B, A = ad.form.factors()
            state = optimizer.state.get(B, {}) if optimizer is not None else {}
            unknown = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == B.shape
                       and k not in FIRST_MOMENTS + SECOND_MOMENTS]
            if unknown:
                raise LorazooError(
                    f"FLoRA cannot move optimizer state {', '.join(unknown)} of {path!r} to the new projection "
                    f"(it moves {', '.join(FIRST_MOMENTS)} and {', '.join(SECOND_MOMENTS)}): use SGD or Adam(W)")
            work.append((layer, ad, B, A, state, projection(self.spec.seed, count, path, A.shape, A)))
        for layer, ad, B, A, state, A_new in work:
            fold(layer, ad)
            for key, value in state.items():
                if not torch.is_tensor(value) or value.shape != B.shape:
                    continue
                if key in FIRST_MOMENTS:
                    transfer_first_moment(value, A, A_new)
                else:
                    transfer_second_moment(value)
            A.copy_(A_new)
            B.zero_()
