"""The LoRA paper's baselines (lorazoo.baselines): FT, FT-Top2, BitFit, Adapter-H, Adapter-L.

Trainable sets against the closed forms of the LoRA paper (Sec. 5.1) on a tiny BERT and a tiny Llama,
the adapters' outputs against a float64 reference written from Houlsby's and Lin et al.'s equations,
start-as-base, save/load, training through ``run`` and the Trainer, and refusals."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorazoo
from lorazoo import AdapterSpec, NotMergeableError, SpecError
from tiny import TinyNet, TinyTask, perturb, tiny_data

D, I, L, V, R = 32, 64, 3, 40, 8  # hidden, intermediate, blocks, vocabulary, bottleneck
BASELINES = ["full_ft", "ft_top2", "bitfit", "adapter_h", "adapter_l"]


def bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=2, intermediate_size=I,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).double().eval()


def llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=I, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).double().eval()


IDS = torch.randint(1, V, (3, 7), generator=torch.Generator().manual_seed(5))
LABELS = torch.tensor([0, 1, 1])


def spec(name, model, **over):
    save = ["classifier"] if hasattr(model, "classifier") else []  # what run() adds for the sentiment task
    return AdapterSpec.preset(name, modules_to_save=save, **over)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


# --- trainable sets: the paper's closed forms -------------------------------------------------------
HEAD = D * 2 + 2                                   # the task's fresh classifier, trained in full
BLOCK = 4 * (D * D + D) + 2 * (2 * D) + (D * I + I) + (I * D + D)  # BERT block: q,k,v,o, two LNs, FFN
EMBED = (V + 32 + 2) * D + 2 * D                   # word, position, token-type embeddings and their LN
POOLER = D * D + D


@pytest.mark.parametrize("name, expected", [
    ("full_ft", EMBED + L * BLOCK + POOLER + HEAD),
    ("ft_top2", 2 * BLOCK + HEAD),
    ("bitfit", L * (4 * D + D + I + 2 * D) + D + D + HEAD),  # biases: q,k,v,o, FFN out, FFN in, 2 LNs; emb LN; pooler
    ("adapter_h", 2 * L * (2 * D * R + R + D) + 2 * (2 * L + 1) * D + HEAD),  # L_Adpt = 2L, L_LN = 2L + 1 (+ emb LN)
    ("adapter_l", L * (2 * D * R + R + D) + 2 * L * D + HEAD),              # one adapter and its LN per block
])
def test_trainable_count_is_the_closed_form_on_bert(name, expected):
    model = bert()
    handle = lorazoo.adapt(model, spec(name, model, rank=R))
    assert handle.num_trainable() == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected  # nothing else trains


def test_trainable_sets_on_a_tied_llama():
    model = llama()
    total = sum(p.numel() for p in model.parameters())  # the tied embedding counted once
    h = lorazoo.adapt(model, spec("full_ft", model))
    assert h.num_trainable() == total
    copies = {p: model.get_submodule(p).copies["default"] for p in ("model", "lm_head")}
    assert copies["lm_head"].weight is copies["model"].embed_tokens.weight  # still tied in the trained copy
    h.delete()
    block = 4 * D * D + 3 * D * I + 2 * D  # q,k,v,o (no biases), gate/up/down, two RMSNorms
    h = lorazoo.adapt(model, spec("ft_top2", model))
    assert h.num_trainable() == 2 * block
    assert sorted(h.saved_modules()) == [f"model.layers.{L - 2}", f"model.layers.{L - 1}"]
    h.delete()
    h = lorazoo.adapt(model, spec("adapter_h", model, rank=R))
    assert h.num_trainable() == 2 * L * (2 * D * R + R + D) + (2 * L + 1) * D  # RMSNorms have no bias
    assert sorted(h.layers()) == sorted([f"model.layers.{i}.self_attn.o_proj" for i in range(L)]
                                        + [f"model.layers.{i}.mlp.down_proj" for i in range(L)])


def test_full_ft_on_a_tied_llama_saves_the_tied_weight_once_and_reloads(tmp_path):
    model = llama()
    h = lorazoo.adapt(model, spec("full_ft", model))
    perturb(h)
    out = logits(model)
    h.save(tmp_path)
    assert ("lm_head.weight" in h.state_dict()) != ("model.embed_tokens.weight" in h.state_dict())
    fresh = llama()
    lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), out, rtol=0, atol=0)
    assert fresh.lm_head.copies["default"].weight is fresh.model.copies["default"].embed_tokens.weight


def test_bitfit_shares_the_frozen_weights_and_saves_only_biases(tmp_path):
    model = bert()
    h = lorazoo.adapt(model, spec("bitfit", model))
    wrapper = model.bert
    copy = wrapper.copies["default"]
    layer = copy.encoder.layer[0].attention.self.query
    assert layer.weight is wrapper.original.encoder.layer[0].attention.self.query.weight  # one tensor in memory
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    assert layer.bias is not wrapper.original.encoder.layer[0].attention.self.query.bias
    assert all(k.endswith("bias") or k.startswith("classifier.") for k in h.state_dict())
    h.save(tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "adapter.safetensors"))) == set(h.state_dict())


# --- the adapters against their papers' equations ------------------------------------------------------
def _layer(form, out_features=10, in_features=6, rank=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features)).double()
    h = lorazoo.adapt(model, AdapterSpec(form=form, rank=rank, targets=["0"], scale="constant", alpha=1.0))
    perturb(h, scale=0.5)
    return model, h, model[0].adapters["default"].form


def test_adapter_h_is_houlsbys_equation():
    model, h, f = _layer("adapter_h")
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W, b = model[0].base.weight.detach(), model[0].base.bias.detach()
    y = x @ W.T + b                                        # the sublayer's output
    hidden = y @ f.down.detach().T + f.down_bias.detach()
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / 2 ** 0.5))
    expected = y + gelu @ f.up.detach().T + f.up_bias.detach()  # h + W_up f(W_down h)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_adapter_l_is_lins_equation():
    model, h, f = _layer("adapter_l")
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W, b = model[0].base.weight.detach(), model[0].base.bias.detach()
    y = x @ W.T + b
    mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    normed = (y - mean) / torch.sqrt(var + 1e-5) * f.norm_weight.detach() + f.norm_bias.detach()
    hidden = torch.clamp(normed @ f.down.detach().T + f.down_bias.detach(), min=0)
    expected = y + hidden @ f.up.detach().T + f.up_bias.detach()
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["adapter_h", "adapter_l"])
def test_adapters_refuse_merge_and_rank_above_the_output(form):
    model, h, _ = _layer(form)
    with pytest.raises(NotMergeableError):
        h.merge()
    with pytest.raises(SpecError, match="rank 11 is too large"):
        lorazoo.adapt(nn.Sequential(nn.Linear(6, 10)), AdapterSpec(form=form, rank=11, targets=["0"]))


# --- generic properties on the real architectures ----------------------------------------------------
@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_starts_as_base_and_delete_restores(name, arch):
    model = bert() if arch == "bert" else llama()
    base = logits(model)
    if name == "bitfit" and arch == "llama":
        pytest.skip("Llama has no biases (refusal tested below)")
    h = lorazoo.adapt(model, spec(name, model))
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    perturb(h)
    assert not torch.allclose(logits(model), base)
    with h.disabled():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    h.delete()
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters()) or name == "none"


@pytest.mark.parametrize("name", BASELINES)
def test_save_load_identical(name, tmp_path):
    model = bert()
    h = lorazoo.adapt(model, spec(name, model))
    perturb(h)
    out = logits(model)
    h.save(tmp_path)
    fresh = bert()
    loaded = lorazoo.load(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), out, rtol=0, atol=0)
    assert loaded.num_trainable() == h.num_trainable() and loaded.spec == h.spec
    with pytest.raises(lorazoo.LoadError, match="different base model"):
        lorazoo.load(bert(seed=1), tmp_path)  # the base is fingerprinted, also for FT and BitFit


def test_ft_top2_trains_only_the_last_blocks():
    model = bert()
    h = lorazoo.adapt(model, spec("ft_top2", model, select_top_blocks=1))
    names = [n for n, _ in h.named_trainable_parameters()]
    assert names and all(n.startswith(f"bert.encoder.layer.{L - 1}.") or n.startswith("classifier.") for n in names)


# --- training through the Trainer and run() ----------------------------------------------------------
@pytest.mark.parametrize("name", ["ft_top2", "adapter_h", "bitfit"])
def test_trainer_lowers_the_loss_on_bert(name):
    from lorazoo.train import Trainer

    model = bert()
    model.float()
    h = lorazoo.adapt(model, spec(name, model))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (32, 6), generator=g)
    labels = (ids[:, 0] % 2)  # the first token decides the label
    batches = [{"input_ids": ids[i:i + 8], "labels": labels[i:i + 8]} for i in range(0, 32, 8)]
    with torch.no_grad():
        before = sum(model(**b).loss.item() for b in batches)
    Trainer(model, h, lr=3e-2, epochs=10, progress=False, warmup=0).fit(batches)
    model.eval()
    with torch.no_grad():
        after = sum(model(**b).loss.item() for b in batches)
    assert after < 0.9 * before, (before, after)


@pytest.fixture
def tiny_task():
    from lorazoo.tasks.base import TASKS

    TASKS[TinyTask.name] = TinyTask
    yield TinyTask.name
    del TASKS[TinyTask.name]


@pytest.mark.parametrize("name", ["full_ft", "bitfit", "adapter_l"])
def test_run_trains_saves_and_reloads(name, tiny_task, tmp_path):
    from lorazoo.run import evaluate_saved, run

    s = AdapterSpec.preset(name, **({"targets": ["fc1", "fc2"]} if name.startswith("adapter") else {}))
    result = run(tiny_task, s, lr=2e-2, epochs=3, batch_size=16, out_dir=tmp_path, checkpoint_every=5,
                 progress=False)
    assert result["losses"][-1] < result["losses"][0]
    assert result["trainable_params"] == {"full_ft": 12 * 16 + 16 + 16 * 16 + 16 + 16 * 3 + 3,
                                          "bitfit": 16 + 16 + 3,
                                          "adapter_l": 2 * (2 * 16 * 8 + 8 + 16 + 2 * 16)}[name]
    again = evaluate_saved(tmp_path)
    assert again["metric"] == pytest.approx(result["metric"], abs=1e-6)


# --- refusals: a clear lorazoo error, the model unchanged ----------------------------------------------
def _unchanged(model, build):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(SpecError) as e:
        build()
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not lorazoo.handles_of(model)
    return str(e.value)


def test_refusals_leave_the_model_unchanged():
    m = llama()
    assert "has none" in _unchanged(m, lambda: lorazoo.adapt(m, spec("bitfit", m)))
    t = TinyNet()
    assert "no stack of blocks" in _unchanged(t, lambda: lorazoo.adapt(t, AdapterSpec.preset("ft_top2")))
    b = bert()
    assert "has 3 blocks" in _unchanged(b, lambda: lorazoo.adapt(b, spec("ft_top2", b, select_top_blocks=4)))


@pytest.mark.parametrize("bad", [dict(select_params="weights"), dict(select_top_blocks=0),
                                 dict(select_top_blocks=1.5), dict(init="pissa"), dict(dropout=0.1),
                                 dict(rank_dropout=0.5)])
def test_selection_refuses_bad_options(bad):
    with pytest.raises(SpecError):
        AdapterSpec.preset("full_ft", **bad)


def test_adapter_h_refuses_a_non_boolean_norm_option():
    with pytest.raises(SpecError, match="adapter_h_norms"):
        AdapterSpec.preset("adapter_h", adapter_h_norms=1)
    m = bert()
    h = lorazoo.adapt(m, spec("adapter_h", m, adapter_h_norms=False, rank=R))
    assert h.num_trainable() == 2 * L * (2 * D * R + R + D) + HEAD and not h.saved_modules().keys() - {"classifier"}


def test_tiny_net_full_ft_matches_plain_training():
    """FT through the adapter equals plain fine-tuning of a copy of the model (same optimizer, same steps)."""
    x, y = tiny_data()
    model, plain = TinyNet(), TinyNet()
    h = lorazoo.adapt(model, AdapterSpec.preset("full_ft"))
    opt_a = torch.optim.SGD(h.param_groups(0.1), lr=0.1)
    opt_b = torch.optim.SGD(plain.parameters(), lr=0.1)
    for _ in range(3):
        for m, o in ((model, opt_a), (plain, opt_b)):
            F.cross_entropy(m(x).logits, y).backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["full_ft", "bitfit"])
def test_a_killed_run_resumes_to_the_uninterrupted_weights(name, tmp_path):
    """The trained copies and their optimizer state go through the trainer's checkpoints (tests/test_checkpoint.py
    pattern): killed at step 5 with checkpoints every 2, resumed in a fresh model, it ends as the uninterrupted run."""
    from test_checkpoint import Killed, epoch_batches, kill_at, trainer

    def make():
        model = TinyNet(dtype=torch.float32)
        return model, lorazoo.adapt(model, AdapterSpec.preset(name))

    torch.manual_seed(0)
    ref_model, ref_handle = make()
    ref = trainer(ref_model, ref_handle).fit(epoch_batches)
    torch.manual_seed(0)
    model, handle = make()
    kill_at(handle, 5)
    with pytest.raises(Killed):
        trainer(model, handle, tmp_path, 2).fit(epoch_batches)
    model2, handle2 = make()
    out = trainer(model2, handle2, tmp_path, 2).fit(epoch_batches, resume=True)
    assert out["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    for k, v in ref_handle.state_dict().items():
        torch.testing.assert_close(handle2.state_dict()[k], v, rtol=1e-6, atol=1e-7)


class HeadTask(TinyTask):
    """TinyTask whose output layer is a fresh head drawn from the global RNG, as a real task's classifier."""
    name = "tiny_fresh_head"

    def build_model(self):
        net = super().build_model()
        with torch.no_grad():
            net.fc2.weight.normal_(std=0.5)
        return net


def test_a_saved_full_fine_tuning_reloads_for_eval_on_the_seeded_head(tmp_path, monkeypatch):
    from lorazoo.analysis import load_run
    from lorazoo.run import evaluate_saved, run
    from lorazoo.tasks.base import TASKS

    monkeypatch.setitem(TASKS, HeadTask.name, HeadTask)
    out = tmp_path / "ft"
    res = run(HeadTask.name, AdapterSpec.preset("full_ft"), lr=1e-2, epochs=0.25, batch_size=16, seed=3,
              out_dir=str(out), progress=False)
    got = evaluate_saved(str(out))  # rebuilds the head from the run's seed: the saved copy's base matches
    assert got["metric"] == pytest.approx(res["metric"], abs=1e-6)
    load_run(str(out))
