"""LoRA+ (Hayou et al., 2024 [24]; study Sec. II-C1, Eq. 62-64): lr(B) = ratio x lr(A).

Parameter groups, as the authors' ``create_loraplus_optimizer`` makes them:

- B group, lr x ``loraplus_ratio``: the up-projection ("B-like") parameters of each form, and
  every 1-D trainable parameter (the authors' ``param.ndim == 1`` rule: DoRA magnitudes, VeRA
  vectors, biases and norms of ``modules_to_save``). 1-D parameters of saved modules (biases,
  norms) get no weight decay, as in the authors' code.
- embedding group, lr = ``loraplus_lr_embedding`` (authors' default 1e-6): parameters of
  ``nn.Embedding`` modules in ``modules_to_save`` (lorazoo adapts linear layers only, so this is
  where the paper's embedding group applies).
- A group, lr: everything else (A, other matrices).

Which parameters of a form are B-like: the names in the form's class attribute ``up_params``
when it has one (e.g. ``up_params = ("P",)``), else B of ``factors()``, else parameters whose
name starts with ``B``. A form with none is refused when the groups are built.
"""
from __future__ import annotations

from torch import nn

from ..errors import SpecError
from ..parts import Optim, check_number
from ..registry import OPTIMS


def up_parameters(form: nn.Module) -> list[nn.Parameter]:
    """The up-projection ("B-like") parameters of ``form``."""
    names = getattr(form, "up_params", None)
    if names is not None:
        return [form.get_parameter(n) for n in names]
    factors = form.factors()
    if factors is not None:
        return [factors[0]]
    return [p for n, p in form.named_parameters() if n.rpartition(".")[2].startswith("B")]


@OPTIMS.register("loraplus", paper="LoRA+ (Hayou et al., 2024) [24]",
                 equations="study Sec. II-C1, Eq. 62-64; eta_B = ratio * eta_A, ratio = 2^4",
                 summary="B-like parameters learn ratio (16) times faster than A")
class LoRAPlus(Optim):
    options = {"loraplus_ratio": 16.0, "loraplus_lr_embedding": 1e-6}

    @classmethod
    def validate(cls, opts):
        check_number("loraplus_ratio", opts["loraplus_ratio"], strict=True)
        check_number("loraplus_lr_embedding", opts["loraplus_lr_embedding"])

    def param_groups(self, handle, lr, weight_decay):
        ratio = self.spec.options["loraplus_ratio"]
        up: set[int] = set()
        for path, ad in handle.adapters().items():
            found = up_parameters(ad.form)
            if not found:
                raise SpecError(
                    f"optim 'loraplus' needs the up-projection (B-like) parameters of form "
                    f"'{ad.form.part_name}', which names none; declare them on the form as a class "
                    f"attribute up_params = ('<name>', ...), or use optim='default'"
                )
            up.update(id(p) for p in found)
        saved = {id(p) for m in handle.saved_modules().values() for p in m.parameters()}
        embedding = {id(p) for m in handle.saved_modules().values() for e in m.modules()
                     if isinstance(e, nn.Embedding) for p in e.parameters()}

        groups = {"A": [], "B": [], "B_no_decay": [], "embedding": []}
        seen: set[int] = set()
        for _, p in handle.named_trainable_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in embedding:
                groups["embedding"].append(p)
            elif p.dim() <= 1 and id(p) in saved:
                groups["B_no_decay"].append(p)
            elif id(p) in up or p.dim() <= 1:
                groups["B"].append(p)
            else:
                groups["A"].append(p)
        settings = {"A": (lr, weight_decay), "B": (lr * ratio, weight_decay), "B_no_decay": (lr * ratio, 0.0),
                    "embedding": (self.spec.options["loraplus_lr_embedding"], weight_decay)}
        return [{"params": params, "lr": settings[k][0], "weight_decay": settings[k][1], "name": k}
                for k, params in groups.items() if params]
