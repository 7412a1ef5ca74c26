import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Long fuzz runs (``@pytest.mark.fuzz``) only when ``-m`` names them (``pytest -m fuzz``). Not
    an addopts ``-m "not fuzz"``: a command-line ``-m`` (``make test-fast``) would replace it."""
    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    keep = [item for item in items if item.get_closest_marker("fuzz") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("fuzz")])
        items[:] = keep
