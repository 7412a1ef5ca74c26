"""PRoLoRA (Wang et al. [51]; study Eq. 34): broadcast chunks rolled along the rank, u unshared ranks."""
import math

import pytest
import torch
from safetensors.torch import load_file

import lorazoo
from tiny import TinyNet, adapted, layer_input, op_shapes, perturb, single_layer, train


def _dense(f):
    """Eq. 34 with loops: copy k of the chunk, rolled by k·stride on the rank (torch.roll on the rows
    of A0 / columns of B0), placed at block k; cut to the layer; the unshared ranks appended."""
    rs, m, n = f.shared_rank, f.m, f.n
    sa, sb = (max(rs // m, 1), max(rs // n, 1)) if f.rotation else (0, 0)
    A0, B0 = f.A0.detach(), f.B0.detach()
    A_s = torch.cat([torch.roll(A0, shifts=-k * sa, dims=0) for k in range(m)], dim=1)[:, : f.in_features]
    B_s = torch.cat([torch.roll(B0, shifts=-k * sb, dims=1) for k in range(n)], dim=0)[: f.out_features]
    A = torch.cat([A_s, f.A_u.detach()], dim=0)
    B = torch.cat([B_s, f.B_u.detach()], dim=1)
    return f.scale * B @ A


@pytest.mark.parametrize("rank,u,m,n,rot", [(4, 1, 2, 3, True), (5, 0, 3, 2, True), (4, 2, 2, 2, False),
                                            (6, 1, 7, 5, True), (3, 3, 2, 2, True)])
def test_matches_dense_reference(rank, u, m, n, rot):
    """Includes shapes that m, n do not divide (20 / 3, 24 / 7, 24 / 5) and u = r (no shared ranks)."""
    model, handle, layer = single_layer("prolora", rank=rank, alpha=6, prolora_unshared=u, prolora_share_a=m,
                                        prolora_share_b=n, prolora_rotation=rot)
    perturb(handle)
    f = layer.adapters["default"].form
    dW = _dense(f)
    x = layer_input(features=20)
    torch.testing.assert_close(layer(x), x @ (layer.base.weight.detach() + dW).T + layer.base.bias,
                               rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(f.delta_weight(None), dW, rtol=1e-6, atol=1e-12)
    # the paper's parameter count: u(in + out) + (r - u)(ceil(in/m) + ceil(out/n))
    assert handle.num_trainable() == u * (20 + 24) + (rank - u) * (math.ceil(20 / m) + math.ceil(24 / n))


def test_broadcast_tiles_one_block_rotation_differentiates_them():
    """u = 0, m = n = 4, rank 4, equal strides s = 1: without rotation ΔW is one (cb x ca) block B0 A0
    tiled 4 x 4; with rotation block (i, j) is B0 P^(j - i) A0 (P the roll by one rank): blocks on
    one diagonal agree, the others differ. ΔW keeps rank r either way."""
    kw = dict(rank=4, prolora_unshared=0, prolora_share_a=4, prolora_share_b=4)
    blocks = lambda dW: [[dW[6 * i:6 * i + 6, 5 * j:5 * j + 5] for j in range(4)] for i in range(4)]  # noqa: E731
    _, h, layer = single_layer("prolora", prolora_rotation=False, **kw)
    perturb(h)
    dW = layer.adapters["default"].form.delta_weight(None)
    b = blocks(dW)
    assert all(torch.equal(b[i][j], b[0][0]) for i in range(4) for j in range(4))
    assert torch.linalg.matrix_rank(dW) == 4
    _, h, layer = single_layer("prolora", **kw)
    perturb(h)
    f = layer.adapters["default"].form
    dW = f.delta_weight(None)
    b = blocks(dW)
    A0, B0 = f.A0.detach(), f.B0.detach()
    for i in range(4):
        for j in range(4):
            ref = f.scale * torch.roll(B0, -i, dims=1) @ torch.roll(A0, -j, dims=0)
            torch.testing.assert_close(b[i][j], ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(b[1][2], b[0][1], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(b[0][0], b[0][1])
    assert torch.linalg.matrix_rank(dW) == 4


def test_a_superset_of_lora():
    """m = n = 1, u = 0: exactly LoRA, the same init draws and the same output."""
    _, h1, pro = single_layer("prolora", rank=3, prolora_unshared=0, prolora_share_a=1, prolora_share_b=1)
    _, h2, lora = single_layer("lora", rank=3)
    f, g = pro.adapters["default"].form, lora.adapters["default"].form
    assert f.A0.shape == g.A.shape and f.B0.shape == g.B.shape
    torch.testing.assert_close(f.A0, g.A, rtol=0, atol=0)  # the rectified bound is LoRA's 1/sqrt(in) here
    with torch.no_grad():
        g.B.normal_()
        f.B0.copy_(g.B)
    x = layer_input(features=20)
    torch.testing.assert_close(pro(x), lora(x), rtol=1e-12, atol=1e-12)


def test_rectified_init_and_zero_start():
    _, h, layer = single_layer("prolora", rank=4, prolora_share_a=4)
    f = layer.adapters["default"].form
    bound = 1 / math.sqrt(20)  # the full A's fan-in, not the chunk's (ceil(20/4) = 5)
    for t in (f.A0, f.A_u):
        assert t.abs().max() <= bound and t.abs().max() > 0.7 * bound
    assert torch.count_nonzero(f.B0) == 0 and torch.count_nonzero(f.B_u) == 0
    assert torch.count_nonzero(f.delta_weight(None)) == 0


def test_only_chunks_saved_and_trained(tmp_path):
    model, handle = adapted("prolora", rank=4)
    x = layer_input(n=32, features=12)
    losses = train(model, handle, steps=20, lr=2e-2)
    assert losses[-1] < losses[0]
    out = model(x).logits
    handle.save(tmp_path)
    keys = sorted(k for k in load_file(str(tmp_path / "adapter.safetensors")) if "fc1" in k)
    # the chunks and the unshared ranks only: no index buffers, no assembled A, B
    assert [k for k in keys if ".form." in k] == [f"fc1.form.{t}" for t in ("A0", "A_u", "B0", "B_u")]
    fresh = TinyNet()
    lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, out, rtol=1e-6, atol=1e-9)
    handle.merge()
    torch.testing.assert_close(model(x).logits, out, rtol=1e-6, atol=1e-9)


def test_rank_mask():
    _, h, layer = single_layer("prolora", rank=4)
    perturb(h)
    f = layer.adapters["default"].form
    x, y = layer_input(features=20), layer_input(features=24, seed=5)
    mask = torch.tensor([2.0, 0, 2, 0], dtype=torch.float64)
    B, A = f.pair()
    ref = y + x @ (f.scale * B.detach() @ torch.diag(mask) @ A.detach()).T
    torch.testing.assert_close(f(x, y, layer.linear_weight(), mask), ref, rtol=1e-6, atol=1e-12)


def test_refusals_before_the_model_changes():
    for key, bad in (("prolora_unshared", -1), ("prolora_share_a", 0), ("prolora_share_b", 1.5),
                     ("prolora_rotation", 1)):
        with pytest.raises(lorazoo.SpecError, match=key):
            lorazoo.AdapterSpec(form="prolora", **{key: bad})
    with pytest.raises(lorazoo.SpecError, match=r"prolora_unshared \(5\) must be at most rank \(4\)"):
        lorazoo.AdapterSpec(form="prolora", rank=4, prolora_unshared=5)
    with pytest.raises(lorazoo.SpecError, match="prolora"):
        lorazoo.AdapterSpec(form="prolora", init="pissa")
    model = TinyNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorazoo.SpecError):
        lorazoo.adapt(model, lorazoo.AdapterSpec(form="prolora", rank=13, targets=["fc1", "fc2"]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    p = lorazoo.AdapterSpec.preset("prolora").options
    assert (p["prolora_unshared"], p["prolora_share_a"], p["prolora_share_b"], p["prolora_rotation"]) == (1, 2, 2, True)


def test_forward_never_forms_the_update():
    _, h, layer = single_layer("prolora", rank=4)
    perturb(h)
    f = layer.adapters["default"].form
    x = layer_input(features=20).requires_grad_()
    shapes = op_shapes(lambda: f(x, torch.zeros(5, 24, dtype=torch.float64), layer.linear_weight()).sum().backward())
    assert (24, 20) not in shapes and (20, 24) not in shapes
