"""Peak memory of one benchmark method, measured in a fresh process.

Run as ``python -m lorazoo.study.bench_mem '<job json>'`` (``bench.measure_memory`` does it): the
child builds the base model, resets the kernel's peak-RSS mark, reads VmRSS, builds the method,
takes a few training steps, reads VmHWM, and prints one JSON line. The overhead is VmHWM minus
that VmRSS, so it counts the adapter, its optimizer state, and the activations autograd keeps.
It also counts, exactly, the bytes autograd saves for backward during the first step
(:mod:`lorazoo.memory`): unlike peak RSS, this does not move with the allocator's caching.
"""
from __future__ import annotations

import gc
import json
import sys

import torch

from ..memory import MB, saved_for_backward_mb
from .bench_build import build_runner
from .bench_runner import BenchConfig, Method, build_base, make_batch


def proc_status(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (memory is measured on Linux only)")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(cfg: BenchConfig, method: Method) -> dict:
    """Peak-memory overhead of ``method`` over the built base model, in MB."""
    torch.set_num_threads(cfg.threads)
    if method.impl == "peft":  # imported before the baseline, so the import is not counted
        import peft  # noqa: F401
    model = build_base(cfg)
    batch = make_batch(cfg)
    gc.collect()
    cuda = torch.device(cfg.device).type == "cuda"
    if cuda:  # the device's own allocations: what limits a GPU run (the paper's DoRA memory finding)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(cfg.device)
        was_reset, base = True, torch.cuda.memory_allocated(cfg.device)
    else:
        was_reset, base = reset_peak(), proc_status("VmRSS")
    runner = build_runner(method, cfg, batch, model=model)
    saved = saved_for_backward_mb(model, runner.step)
    for _ in range(cfg.mem_steps - 1):
        runner.step()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(cfg.device) if cuda else proc_status("VmHWM")
    return {"base_rss_mb": base / MB, "peak_mb": peak / MB, "overhead_mb": (peak - base) / MB,
            "saved_mb": saved, "peak_reset": was_reset, "memory": "cuda allocated" if cuda else "rss"}


def main(argv: list[str] | None = None) -> int:
    job = json.loads((argv if argv is not None else sys.argv[1:])[0])
    result = measure(BenchConfig(**job["config"]), Method(**job["method"]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
