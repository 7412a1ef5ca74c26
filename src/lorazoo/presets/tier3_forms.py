"""Tier 3, the remaining forms (study II-B1, II-C2, II-D1)."""
from . import preset as _p  # noqa: F401

PRESETS = [
    _p("mora", "MoRA: square r̂ x r̂ matrix between fixed compress/decompress operators, LoRA-r's parameters",
       "II-B1", "form", "[46] (MoRA Sec. 3, Eq. 6 and 9)", tier=3, form="mora", scale="constant", alpha=1),
    _p("sinelora", "Sine-LoRA: sin(ω·BA)/sqrt(in) on the entries of LoRA's product (ω = 200, unverified), mergeable",
       "II-C2", "form", "[73] (Sine-LoRA Sec. 3; authors' sinlora.py)", tier=3, form="sinelora"),
    _p("loda", "LoDA+: LeakyReLU network of two r x r matrices on A x, LeakyReLU after B (loda_plus=False: "
       "LoDA)", "II-C2", "form", "study Eq. 85 [75]", tier=3, form="loda", loda_plus=True),
    _p("flora_si", "FLoRA (Si et al.): Tucker core G (r x r, zero) between Gaussian B and A, constant scale 4",
       "II-C2", "form", "[71] (Tucker form, N = 2; authors' layers.py)", tier=3, form="flora_si",
       scale="constant", alpha=4),
    _p("dude", "DuDe: DoRA's magnitude x direction with the direction's B, A from PiSSA's SVD (base shifted)",
       "II-C2", "form, init", "[69] (DuDe Fig. 1b)", tier=3, form="dora", init="pissa"),
    _p("nora", "NoRA: inner LoRA (rank r) nested in a frozen outer pair U_R S_R, V_R of W0's SVD, "
       "R = 0.8 min(in, out)", "II-D1", "init, form", "[79] (NoRA abstract; authors' NoRALinear_C, lliai/LoRA-Zoo)",
       tier=3, form="nora", init="nora"),
]
