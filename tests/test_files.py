"""Hostile adapter files: every damaged, edited or mismatched file is refused with a LoadError and
leaves the model exactly as it was (weights, module types, requires_grad flags, adapters)."""
import json

import pytest
import torch

import lorazoo
from lorazoo import AdapterSpec, LoadError
from tiny import TinyNet, perturb, rewrite_file, tiny_data


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m).__name__ for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            dict(lorazoo.handles_of(model)))


def refused(folder, match, model=None):
    model = model or TinyNet()
    before = snapshot(model)
    with pytest.raises(LoadError, match=match):
        lorazoo.load(model, folder)
    after = snapshot(model)
    assert after[1:] == before[1:]
    for k, v in before[0].items():
        torch.testing.assert_close(after[0][k], v, rtol=0, atol=0)


@pytest.fixture
def saved(tmp_path):
    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, init="pissa", targets=["fc1", "fc2"]))  # with base shifts
    perturb(h)
    h.save(tmp_path)
    return tmp_path


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "2", 10**12])
def test_bad_ranks_in_the_config(saved, rank):
    rewrite_file(saved, lambda cfg: cfg["ranks"].update(fc1=rank))
    refused(saved, "ranks/fc1")


@pytest.mark.parametrize("key, value", [
    ("format", "1"), ("lorazoo_version", 1), ("name", ["x"]), ("name", "no spaces"), ("ranks", []),
    ("fingerprint", {}), ("fingerprint", {"fc1": "x"}), ("spec", 3),
])
def test_config_values_of_the_wrong_type(saved, key, value):
    rewrite_file(saved, lambda cfg: cfg.update({key: value}))
    refused(saved, "not a valid lorazoo adapter config")


@pytest.mark.parametrize("key, match", [("fingerprint", "'fingerprint' is a required"), ("checksum", "no checksum")])
def test_a_config_without_fingerprint_or_checksum(saved, key, match):
    rewrite_file(saved, lambda cfg: cfg.pop(key), checksum=False)
    refused(saved, match)


@pytest.mark.parametrize("text", [b"\xff\xfe{", b"[" * 100000 + b"]" * 100000, b'{"format": 1e999}',
                                  b'{"x": ' + b"9" * 5000 + b"}", b'{"format": NaN}'])
def test_damaged_json_beside_a_file_without_a_header_config(tmp_path, text):
    (tmp_path / "adapter_config.json").write_bytes(text)
    refused(tmp_path, "not valid JSON|not a lorazoo adapter config|not a valid lorazoo")


def test_a_flipped_byte_is_caught_by_the_checksum(saved):
    f = saved / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    f.write_bytes(bytes(data))
    refused(saved, "checksum")


@pytest.mark.parametrize("bad", [
    lambda t: t["fc1.form.A"].__setitem__((0, 0), float("nan")),
    lambda t: t["fc2.form.B"].__setitem__((1, 1), float("inf")),
])
def test_non_finite_tensors(saved, bad):
    rewrite_file(saved, change_tensors=bad)
    refused(saved, "NaN or infinite")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_non_float_tensors(saved, dtype):
    rewrite_file(saved, change_tensors=lambda t: t.update({"fc1.form.A": t["fc1.form.A"].to(dtype)}))
    refused(saved, "floating-point")


@pytest.mark.parametrize("edit", [
    lambda t: t.pop("fc2.form.A"),                                            # missing
    lambda t: t.update(extra=torch.zeros(2)),                                 # unexpected
    lambda t: t.update({"fc2.form.A": torch.zeros(3, 16, dtype=torch.float64)}),  # misshapen
    lambda t: t.update({"fc2.shift_A": torch.zeros(3, 16, dtype=torch.float64)}),  # shift shapes disagree
    lambda t: t.update({"fc2.shift_B": torch.zeros(16, 2, 2, dtype=torch.float64)}),
])
def test_tensors_that_do_not_fit_the_spec(saved, edit):
    rewrite_file(saved, change_tensors=edit)
    refused(saved, "does not (match|fit)|shape")


def test_a_spec_that_does_not_fit_the_model(saved):
    rewrite_file(saved, lambda cfg: cfg["ranks"].update(fc1=50))  # rank above the layer's 12 inputs
    refused(saved, "does not fit this model")


def test_a_good_file_still_loads_equal(saved):
    x, _ = tiny_data()
    model = TinyNet()
    lorazoo.load(model, saved)
    again = TinyNet()
    lorazoo.load(again, saved)
    torch.testing.assert_close(model(x).logits, again(x).logits, rtol=0, atol=0)
    assert json.loads((saved / "adapter_config.json").read_text())["format"] == 2
