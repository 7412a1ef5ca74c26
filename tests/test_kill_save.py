"""Saves killed at random moments (SIGKILL) never leave a broken or mixed adapter behind.

A helper process imports torch and lorazoo once and forks, per round, a child that saves two
different adapters (different forms, ranks and values) into one folder, alternately, in a loop; the
test kills the child after a random short delay. The folder must then load, without error, as
exactly one of the two adapters (never new tensors with an old config, never an error), and the
temporaries a killed save leaves are removed by the next save.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lorazoo

SRC = Path(lorazoo.__file__).resolve().parents[1]

# Run in the helper process and in the test: two adapters on one base, A and B (bigger than the
# tiny tests' so that a save takes a few milliseconds and a kill lands in it).
SETUP = textwrap.dedent("""
    import torch
    from torch import nn
    import lorazoo

    torch.set_num_threads(1)

    def base():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(384, 384) for _ in range(6)])

    def adapter(spec, seed):
        model = base()
        h = lorazoo.adapt(model, lorazoo.AdapterSpec(targets=r"\\d+", **spec))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in h.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        return h

    A = adapter(dict(rank=48), 1)
    B = adapter(dict(form="dora", rank=32, alpha=8), 2)
""")

HELPER = SETUP + textwrap.dedent("""
    import os, signal, sys

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped at once
    folder = sys.argv[1]
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "fork":
            break
        pid = os.fork()
        if pid == 0:  # the child: save A, B, A, B, ... until it is killed
            i = 0
            while True:
                (B if i % 2 == 0 else A).save(folder)
                i += 1
        print(pid, flush=True)
""")

TEMPS = (".adapter.safetensors.*", ".adapter_config.json.*")


def temporaries(folder: Path) -> list[Path]:
    return [p for pattern in TEMPS for p in folder.glob(pattern)]


@pytest.fixture(scope="module")
def adapters():
    ns: dict = {}
    exec(SETUP, ns)
    return ns


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.002)
    raise AssertionError(f"killed saver {pid} is still there")


def _which(folder: Path, adapters: dict) -> str:
    """Load the folder onto a fresh base; it must be exactly A or B."""
    model = adapters["base"]()
    h = lorazoo.load(model, folder)  # any error fails the test
    got = h.state_dict()
    for name in ("A", "B"):
        want = adapters[name].state_dict()
        if got.keys() == want.keys() and all(torch.equal(got[k], want[k].to(got[k])) for k in want):
            return name
    raise AssertionError("the folder loads as neither the old nor the new adapter")


def _kill_rounds(tmp_path: Path, adapters: dict, rounds: int, seed: int) -> None:
    folder = tmp_path / "adapter"
    adapters["A"].save(folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    helper = subprocess.Popen([sys.executable, "-c", HELPER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    rng = random.Random(seed)
    seen, left_over = set(), 0
    try:
        assert helper.stdout.readline().strip() == "ready"
        for _ in range(rounds):
            helper.stdin.write("fork\n")
            helper.stdin.flush()
            pid = int(helper.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.12))
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
            seen.add(_which(folder, adapters))
            left_over += bool(temporaries(folder))
    finally:
        helper.stdin.close()
        try:
            helper.wait(timeout=20)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
    print(f"{rounds} killed saves: folder held {sorted(seen)}, temporaries left by {left_over}")
    adapters["B"].save(folder)  # the next save removes what killed saves left
    assert temporaries(folder) == []
    assert _which(folder, adapters) == "B"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_killed_saves_leave_the_old_or_the_new_adapter(tmp_path, adapters):
    _kill_rounds(tmp_path, adapters, rounds=10, seed=0)


@pytest.mark.fuzz
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_killed_saves_fuzz(tmp_path, adapters):
    _kill_rounds(tmp_path, adapters, rounds=300, seed=int(time.time()))


def test_a_save_removes_temporaries_of_a_killed_one(tmp_path, adapters):
    folder = tmp_path / "adapter"
    adapters["A"].save(folder)
    (folder / ".adapter.safetensors.abc123").write_bytes(b"half a file")
    (folder / ".adapter_config.json.xyz").write_text("{")
    assert _which(folder, adapters) == "A"  # they do not disturb loading
    adapters["A"].save(folder)
    assert temporaries(folder) == []
