"""Dense float64 references for the routed-expert forms, written from the study's equations
(Eq. 124-126, 128-129) token by token and expert by expert, apart from lorazoo's code."""
import math

import torch


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def route(x: torch.Tensor, Wg: torch.Tensor, k: int, renormalize: bool = True):
    """(probs, gates, chosen) per token, (N, E) each: g = softmax(W_g x); Eq. 125 keeps the k largest
    g_i (chosen by sorting), renormalized to sum to 1 when ``renormalize``."""
    g = softmax_rows(x.reshape(-1, x.shape[-1]) @ Wg.T)
    gates, chosen = torch.zeros_like(g), torch.zeros_like(g)
    for n in range(g.shape[0]):
        order = sorted(range(g.shape[1]), key=lambda i: -float(g[n, i]))[:k]
        total = sum(float(g[n, i]) for i in order) if renormalize else 1.0
        for i in order:
            gates[n, i] = g[n, i] / total
            chosen[n, i] = 1.0
    return g, gates, chosen


def mixture_output(x, W0, b, A, B, Wg, E, k, scale):
    """Eq. 124: W0 x + b + s·Σ_i ω_i(x) B_i A_i x, expert i = rows/cols i·r..(i+1)·r of A/B."""
    r = A.shape[0] // E
    flat = x.reshape(-1, x.shape[-1])
    _, gates, _ = route(flat, Wg, k)
    out = flat @ W0.T + b
    for i in range(E):
        A_i, B_i = A[i * r:(i + 1) * r], B[:, i * r:(i + 1) * r]
        out = out + scale * gates[:, i:i + 1] * (flat @ A_i.T @ B_i.T)
    return out.reshape(*x.shape[:-1], W0.shape[0])


def switch(probs, chosen):
    """Eq. 126: N Σ_i (1/|B| Σ_x 1[i ∈ TopK]) (1/|B| Σ_x g_i(x))."""
    N, T = probs.shape[1], probs.shape[0]
    return N * sum((chosen[:, i].sum() / T) * (probs[:, i].sum() / T) for i in range(N))


def localized(gates, samples, types, delta):
    """Eq. 128-129 as LoRAMoE's code: Q[m, n] = Σ_{tokens of sample m} ω_n; I[m, n] = 1+δ when
    (type 1 and n < N/2) or (type 0 and n >= N/2), else 1-δ; σ²(Z)/μ(Z)² with Z = I ∘ Q (unbiased σ²)."""
    N = gates.shape[1]
    per = gates.shape[0] // samples
    Z = []
    for m in range(samples):
        for n in range(N):
            q = gates[m * per:(m + 1) * per, n].sum()
            first = n < N // 2
            up = first if int(types[m]) == 1 else not first
            Z.append(q * ((1 + delta) if up else (1 - delta)))
    Z = torch.stack(Z)
    mean = Z.sum() / len(Z)
    var = ((Z - mean) ** 2).sum() / (len(Z) - 1)
    return var / (mean ** 2 + 1e-10)


def kaiming_bound(fan_in: int) -> float:
    return 1 / math.sqrt(fan_in)


def expert_outputs(x, A, B, Wg, E, k):
    """Every routed (token, expert) slot's output o = B_i A_i x (before gate and scale), and its expert."""
    r = A.shape[0] // E
    flat = x.reshape(-1, x.shape[-1])
    _, _, chosen = route(flat, Wg, k)
    outs, labels = [], []
    for t in range(flat.shape[0]):
        for i in range(E):
            if chosen[t, i]:
                outs.append(B[:, i * r:(i + 1) * r] @ (A[i * r:(i + 1) * r] @ flat[t]))
                labels.append(i)
    return outs, labels


def contrastive(outs, labels, tau):
    """Eq. 127 over every ordered (q, k+) pair of one expert's outputs, k- the other experts'; the mean."""
    terms = []
    for p, q in enumerate(outs):
        for j, kp in enumerate(outs):
            if j == p or labels[j] != labels[p]:
                continue
            pos = torch.exp(q @ kp / tau)
            neg = sum(torch.exp(q @ kn / tau) for n, kn in enumerate(outs) if labels[n] != labels[p])
            terms.append(-torch.log(pos / (pos + neg)))
    return torch.stack(terms).mean()
