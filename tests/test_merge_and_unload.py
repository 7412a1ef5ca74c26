"""handle.merge_and_unload(): the adapter folded into the base weights and lorazoo taken out of the model.

The plain model that is left computes what the adapted one computed (within rounding), for additive,
multiplicative, rescaling and shifted-base adapters, with the trained head in place of the original;
it has the original module classes and state_dict keys, and a Hugging Face model saves and reloads
with its own save_pretrained. Refusals leave the model as it was."""
import pytest
import torch
from torch import nn

import lorazoo
from lorazoo import AdapterSpec, LorazooError, NotMergeableError
from tiny import TinyNet, perturb, tiny_data

SPECS = {
    "lora": dict(rank=4),
    "dora": dict(form="dora", rank=4),
    "hira": dict(form="hira", rank=4),
    "pissa": dict(rank=4, init="pissa"),   # a shifted base: the shift stays folded in
    "loha": dict(form="loha", rank=2),
    "lokr": dict(form="lokr", rank=2),
    "vera": dict(form="vera", rank=8),
    "lorma": dict(form="lorma", rank=4),   # multiplicative
}


def _lorazoo_modules(model):
    from lorazoo.layer import AdaptedLayer
    from lorazoo.saved import SavedModule

    return [n for n, m in model.named_modules() if isinstance(m, (AdaptedLayer, SavedModule))]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_plain_model_computes_what_the_adapter_did(name):
    model = TinyNet()
    keys = set(model.state_dict())
    h = lorazoo.adapt(model, AdapterSpec(targets=["fc1", "fc2"], modules_to_save=["head"], **SPECS[name]))
    perturb(h)
    x, _ = tiny_data()
    with torch.no_grad():
        want = model(x).logits
        trained_head = {k: v.clone() for k, v in h.saved_modules()["head"].state_dict().items()}
        plain = h.merge_and_unload()
        got = plain(x).logits
    assert plain is model and not _lorazoo_modules(model) and not lorazoo.handles_of(model)
    assert all(type(m) is nn.Linear for m in (model.fc1, model.fc2, model.head))
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for k, v in model.head.state_dict().items():
        torch.testing.assert_close(v, trained_head[k], rtol=0, atol=0)
    assert (model.fc1.weight - TinyNet().fc1.weight).abs().max() > 1e-4  # the update is in the weight
    with pytest.raises(LorazooError, match="deleted"):
        h.save("anywhere")


def test_a_merged_adapter_unloads_too_and_full_fine_tuning_leaves_its_trained_copy():
    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1"]))
    perturb(h)
    x, _ = tiny_data()
    with torch.no_grad():
        want = model(x).logits
        h.merge()
        torch.testing.assert_close(h.merge_and_unload()(x).logits, want, rtol=1e-9, atol=1e-10)

    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec.preset("full_ft"))
    perturb(h)
    with torch.no_grad():
        want = model(x).logits
        torch.testing.assert_close(h.merge_and_unload()(x).logits, want, rtol=0, atol=0)
    assert not _lorazoo_modules(model)


def _snapshot(model):
    return ({n: type(m).__name__ for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()}, sorted(lorazoo.handles_of(model)))


def test_refused_before_any_change_with_another_adapter_or_an_unmergeable_form():
    model = TinyNet()
    a = lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc1"]), name="a")
    lorazoo.adapt(model, AdapterSpec(rank=2, targets=["fc2"]), name="b")
    before = _snapshot(model)
    with pytest.raises(LorazooError, match="also has 'b'"):
        a.merge_and_unload()
    after = _snapshot(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())

    model = TinyNet()
    h = lorazoo.adapt(model, AdapterSpec.preset("hydralora", rank=2, targets=["fc1", "fc2"]))  # routed experts
    before = _snapshot(model)
    with pytest.raises(NotMergeableError):
        h.merge_and_unload()
    after = _snapshot(model)
    assert after[0] == before[0] and all(torch.equal(after[1][k], v) for k, v in before[1].items())


def test_a_hugging_face_model_saves_and_reloads_with_save_pretrained(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    h = lorazoo.adapt(model, AdapterSpec(form="dora", rank=4, targets="all-linear", modules_to_save=["classifier"]))
    perturb(h)
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        h.merge_and_unload().save_pretrained(tmp_path)
        again = BertForSequenceClassification.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)


# --- lorazoo export: a saved run for use without lorazoo -----------------------------------------------
@pytest.fixture
def saved_run(tmp_path):
    from lorazoo.run import run
    from lorazoo.tasks.base import TASKS
    from tiny import TinyTask

    TASKS[TinyTask.name] = TinyTask
    run(TinyTask.name, AdapterSpec(form="dora", rank=4, targets=["fc1", "fc2"], modules_to_save=["head"]), lr=2e-2,
        epochs=2, batch_size=16, out_dir=tmp_path / "run", progress=False)
    yield tmp_path / "run"
    del TASKS[TinyTask.name]


def test_export_merged_writes_a_plain_model_that_computes_the_adapter(saved_run, tmp_path):
    from safetensors.torch import load_model

    from lorazoo.cli import main
    from lorazoo.run import load_saved

    assert main(["export", str(saved_run), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]  # no save_pretrained
    plain = TinyNet(dtype=torch.float32)
    load_model(plain, str(tmp_path / "out" / "model.safetensors"))
    _, adapted, _ = load_saved(saved_run)
    x, _ = tiny_data(dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, adapted(x).logits, rtol=1e-5, atol=1e-6)


def test_export_refusals_write_nothing(saved_run, tmp_path):
    from lorazoo.run import export_saved

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(LorazooError, match="not an empty folder"):
        export_saved(saved_run, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(LorazooError, match="format must be"):
        export_saved(saved_run, tmp_path / "new", format="onnx")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_export_of_a_sentiment_run_loads_with_transformers_alone(tmp_path):
    """MiniLM + LoRA on 16 texts (2 steps): the merged folder has the model and its tokenizer, and
    transformers' from_pretrained reproduces the adapted model's logits on tokenized text."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorazoo.run import export_saved, load_saved, run

    run("sentiment", AdapterSpec(rank=4), lr=1e-3, epochs=1, batch_size=8, limit=16, test_size=16,
        out_dir=tmp_path / "run", progress=False)
    files = export_saved(tmp_path / "run", tmp_path / "out")
    assert "model.safetensors" in files and "config.json" in files and "tokenizer_config.json" in files
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    _, adapted, _ = load_saved(tmp_path / "run")
    batch = tok(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, adapted.eval()(**batch).logits, rtol=1e-4, atol=1e-5)


def test_export_peft_writes_peft_files_that_lorazoo_reads_back(saved_run, tmp_path):
    from lorazoo.run import export_saved, load_saved

    assert export_saved(saved_run, tmp_path / "peft", format="peft") == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
    _, adapted, _ = load_saved(saved_run)
    fresh = _fresh_head_model(saved_run)
    lorazoo.load_peft(fresh, tmp_path / "peft")
    x, _ = tiny_data(dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, adapted(x).logits, rtol=1e-5, atol=1e-6)


def _fresh_head_model(saved_run):
    from lorazoo.run import fresh_model, read_task_config
    from lorazoo.tasks.base import get_task

    cfg = read_task_config(saved_run)
    return fresh_model(get_task(cfg["task"], limit=cfg.get("limit"), seed=cfg.get("seed", 0)), cfg.get("seed", 0))


def test_conv_and_embedding_layers_unload_to_their_base_modules():
    from test_conv import conv_net, images
    from test_embedding import IDS, LM

    model = conv_net()
    h = lorazoo.adapt(model, AdapterSpec(form="dora", rank=3, targets=["0", "2"]))
    perturb(h)
    x = images()
    with torch.no_grad():
        want = model(x)
        h.merge_and_unload()
        torch.testing.assert_close(model(x), want, rtol=1e-9, atol=1e-10)
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Conv2d and not _lorazoo_modules(model)

    model = LM(tied=False)
    h = lorazoo.adapt(model, AdapterSpec(rank=3, init="pissa", targets=["emb", "fc"]))
    perturb(h)
    with torch.no_grad():
        want = model(IDS)
        h.merge_and_unload()
        torch.testing.assert_close(model(IDS), want, rtol=1e-9, atol=1e-10)
    assert type(model.emb) is nn.Embedding and not _lorazoo_modules(model)


def test_full_fine_tuning_of_a_tied_llama_unloads_tied_and_saves(tmp_path):
    from transformers import LlamaForCausalLM

    from test_baselines import IDS, llama

    model = llama()
    h = lorazoo.adapt(model, AdapterSpec.preset("full_ft"))
    perturb(h, scale=0.05)
    with torch.no_grad():
        want = model(IDS).logits
        plain = h.merge_and_unload()
        assert plain.lm_head.weight is plain.model.embed_tokens.weight  # still one tensor
        plain.save_pretrained(tmp_path)
        again = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
        torch.testing.assert_close(again(IDS).logits, want, rtol=1e-12, atol=1e-12)
