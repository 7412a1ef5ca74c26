"""The LoRA paper's prefix baselines (lorazoo.forms.prefix): PreEmbed and PreLayer on a tiny BERT.

The adapted model's logits against a float64 reference written from the paper's description (prefix
activations concatenated in front of the embedding output, the attention mask extended, block by block with
the prefix positions overwritten after each block for PreLayer, the prefix dropped before the pooler), with
padding in the batch; trainable counts against |Θ| = d·l_p and L·d·l_p; the init; disabled/delete give the
base exactly; save/load; merge refused; training; refusals before any change. The generic contract's
TinyNet has no sequence, so its checks are run here on the tiny BERT. Tiny RoBERTa and XLM-RoBERTa against
the same reference (their head reads <s>, their positions start after the padding index).

Not compared with PEFT: its prompt tuning prepends to the raw word embeddings (before the position
embeddings and LayerNorm, shifting the real tokens to positions l_p..), a different function."""
import pytest
import torch
import torch.nn.functional as F

import lorazoo
from lorazoo import AdapterSpec, LorazooError, NotMergeableError, SpecError
from tiny import TinyNet, perturb

D, I, L, V, P = 32, 64, 3, 40, 4  # hidden, intermediate, blocks, vocabulary, prefix tokens
NAMES = ["prefix_embed", "prefix_layer"]


def bert(seed=0, cls=None, **over):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=2, intermediate_size=I,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **over)
    return (cls or BertForSequenceClassification)(cfg).double().eval()


def spec(name, **over):
    return AdapterSpec.preset(name, **{"modules_to_save": ["classifier"], "prefix_tokens": P, **over})


IDS = torch.randint(1, V, (3, 7), generator=torch.Generator().manual_seed(5))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])  # right padding in two rows


def reference(base, prefixes, head, ids, mask):
    """The paper's PreEmbed / PreLayer on the unmodified ``base`` (BertForSequenceClassification): ``prefixes``
    [embedding-level (l_p, d), then the vectors replacing block 0's, 1's ... outputs], ``head`` (W, b)."""
    bert = base.bert
    n, B = prefixes[0].shape[0], ids.shape[0]
    h = torch.cat([prefixes[0].expand(B, -1, -1), bert.embeddings(input_ids=ids)], dim=1)
    m = torch.cat([torch.ones(B, n, dtype=torch.float64), mask.double()], dim=1)
    additive = (1.0 - m)[:, None, None, :] * torch.finfo(torch.float64).min
    for i, block in enumerate(bert.encoder.layer):
        h = block(h, additive)
        h = h[0] if isinstance(h, tuple) else h
        if i + 1 < len(prefixes):
            h = torch.cat([prefixes[i + 1].expand(B, -1, -1), h[:, n:]], dim=1)
    cls = h[:, n]  # [CLS]: the first real token
    return F.linear(torch.tanh(bert.pooler.dense(cls)), *head)


def prefixes_of(handle):
    sd = handle.state_dict()
    out = [sd["bert.embeddings.prefix"]] + [sd[f"bert.encoder.layer.{i}.prefix"] for i in range(L - 1)
                                             if f"bert.encoder.layer.{i}.prefix" in sd]
    return out, (sd["classifier.weight"], sd["classifier.bias"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("masked", [True, False])
def test_logits_match_the_papers_description(name, masked):
    model = bert()
    h = lorazoo.adapt(model, spec(name))
    perturb(h, scale=0.5)
    mask = MASK if masked else torch.ones_like(MASK)
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK).logits if masked else model(input_ids=IDS).logits
        prefixes, head = prefixes_of(h)
        assert len(prefixes) == (L if name == "prefix_layer" else 1)
        ref = reference(bert(), prefixes, head, IDS, mask)
        plain = F.linear(bert().bert(input_ids=IDS, attention_mask=mask).pooler_output, *head)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert (out - plain).abs().max() > 1e-4  # the prefix does change the output


@pytest.mark.parametrize("name", NAMES)
def test_padded_tokens_are_ignored(name):
    model = bert()
    h = lorazoo.adapt(model, spec(name))
    perturb(h)
    other = IDS.clone()
    other[MASK == 0] = 1 + (other[MASK == 0] % (V - 1))  # change only the padded tokens
    with torch.no_grad():
        a, b = model(input_ids=IDS, attention_mask=MASK).logits, model(input_ids=other, attention_mask=MASK).logits
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, per_block", [("prefix_embed", 0), ("prefix_layer", 1)])
def test_trainable_count_is_the_papers_formula(name, per_block):
    """PreEmbed |Θ| = d·l_p; PreLayer |Θ| = L·d·l_p: the embedding-level vectors are layer 0, then the outputs
    of blocks 0..L-2 (the last block's prefix outputs are dropped before the pooler, so nothing reads them)."""
    for n in (1, P, 9):
        model = bert()
        h = lorazoo.adapt(model, spec(name, prefix_tokens=n))
        prefix = {k: p.numel() for k, p in h.named_trainable_parameters() if not k.startswith("classifier.")}
        assert sum(prefix.values()) == (L if per_block else 1) * D * n
        assert sorted(prefix) == sorted(["bert.embeddings.prefix"] +
                                        [f"bert.encoder.layer.{i}.prefix" for i in range(L - 1)] * per_block)
        assert h.num_trainable() == sum(prefix.values()) + D * 2 + 2  # + the task's head
        assert all(p.requires_grad for p in h.trainable_parameters())
        assert not any(p.requires_grad for k, p in model.named_parameters() if ".original." in k)


def test_prefix_starts_as_the_base_activations_of_vocabulary_tokens():
    """Each embedding-level vector is LN(word[t] + pos[j] + type[0]) of some token t at position j, and the
    block-level ones are the base model's hidden states of those tokens."""
    model, base = bert(), bert()
    h = lorazoo.adapt(model, spec("prefix_layer"))
    prefixes, _ = prefixes_of(h)
    emb = base.bert.embeddings
    with torch.no_grad():
        table = emb.LayerNorm(emb.word_embeddings.weight[:, None] + emb.position_embeddings.weight[None, :P]
                              + emb.token_type_embeddings.weight[0])  # (V, P, d)
        dist = (table - prefixes[0][None]).abs().amax(-1)  # (V, P)
        tokens = dist.argmin(0)
        torch.testing.assert_close(dist.min(0).values, torch.zeros(P, dtype=torch.float64), rtol=0, atol=1e-12)
        states = base.bert(input_ids=tokens[None], output_hidden_states=True).hidden_states
    for i in range(1, L):
        torch.testing.assert_close(prefixes[i], states[i][0], rtol=1e-10, atol=1e-12)
    again = lorazoo.adapt(bert(), spec("prefix_layer"))  # the spec's seed decides: the same start
    torch.testing.assert_close(prefixes_of(again)[0][0], prefixes[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_disabled_and_delete_give_the_base_back(name):
    model, base = bert(), bert()
    hooks = {k: (len(m._forward_hooks), len(m._forward_pre_hooks)) for k, m in model.named_modules()}
    keys = set(model.state_dict())
    h = lorazoo.adapt(model, spec(name))
    assert not h.spec.part_classes()["form"].zero_init  # the contract's "starts as base" does not apply
    perturb(h)
    with torch.no_grad():
        expected = base(input_ids=IDS, attention_mask=MASK).logits
        assert (model(input_ids=IDS, attention_mask=MASK).logits - expected).abs().max() > 1e-4
        with h.disabled():  # the original modules run: the same computation as the base, so exactly equal
            torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, expected, rtol=0, atol=0)
        h.delete()
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, expected, rtol=0, atol=0)
    assert type(model.bert).__name__ == "BertModel" and set(model.state_dict()) == keys
    assert {k: (len(m._forward_hooks), len(m._forward_pre_hooks)) for k, m in model.named_modules()} == hooks
    assert not any(hasattr(m, "prefix") for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_merge_is_refused(name):
    model = bert()
    h = lorazoo.adapt(model, spec(name))
    perturb(h)
    with torch.no_grad():
        out = model(input_ids=IDS).logits
        with pytest.raises(NotMergeableError):
            h.merge()
        assert not h.merged
        torch.testing.assert_close(model(input_ids=IDS).logits, out, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_roundtrip(name, tmp_path):
    from safetensors import safe_open

    model = bert()
    h = lorazoo.adapt(model, spec(name))
    perturb(h)
    h.save(tmp_path)
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys == sorted(h.state_dict()) and all(k.startswith(("bert.", "classifier.")) and
                                                   (k.endswith(".prefix") or k.startswith("classifier."))
                                                   for k in keys)
    fresh = bert()
    loaded = lorazoo.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS, attention_mask=MASK).logits,
                                   model(input_ids=IDS, attention_mask=MASK).logits, rtol=1e-12, atol=1e-12)
    assert loaded.spec == h.spec
    loaded.delete()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, bert()(input_ids=IDS).logits, rtol=0, atol=0)
    with pytest.raises(lorazoo.LoadError):  # another base model is refused (fingerprint)
        lorazoo.load(bert(seed=1), tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_training_lowers_the_loss(name):
    from lorazoo.train import Trainer

    model = bert()
    model.float()
    h = lorazoo.adapt(model, spec(name))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (32, 6), generator=g)
    labels = ids[:, 1] % 2  # the first token after [CLS] decides the label
    mask = torch.ones_like(ids)
    mask[::3, 4:] = 0
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8], "labels": labels[i:i + 8]}
               for i in range(0, 32, 8)]
    with torch.no_grad():
        before = sum(model(**b).loss.item() for b in batches)
    Trainer(model, h, lr=3e-2, epochs=10, progress=False, warmup=0).fit(batches)
    model.eval()
    with torch.no_grad():
        after = sum(model(**b).loss.item() for b in batches)
    assert after < 0.9 * before, (before, after)
    assert all(p.grad is None for k, p in model.named_parameters() if ".original." in k)


def test_prefix_gradients_match_the_reference():
    """The gradient reaches every trained vector (PreLayer's block-level ones through the next blocks' keys and
    values), as the reference's autograd gives it."""
    model = bert()
    h = lorazoo.adapt(model, spec("prefix_layer"))
    perturb(h)
    model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1, 1])).loss.backward()
    prefixes, head = prefixes_of(h)
    leaves = [p.detach().clone().requires_grad_(True) for p in prefixes]
    ref = F.cross_entropy(reference(bert(), leaves, [t.detach() for t in head], IDS, MASK), torch.tensor([0, 1, 1]))
    ref.backward()
    params = dict(h.named_trainable_parameters())
    names = ["bert.embeddings.prefix"] + [f"bert.encoder.layer.{i}.prefix" for i in range(L - 1)]
    for k, leaf in zip(names, leaves):
        assert leaf.grad.abs().max() > 0
        torch.testing.assert_close(params[k].grad, leaf.grad, rtol=1e-9, atol=1e-12)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = bert()
        if checkpointing:
            model.gradient_checkpointing_enable()
        h = lorazoo.adapt(model, spec("prefix_layer"))
        perturb(h)
        model.train()
        model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1, 1])).loss.backward()
        grads.append({k: p.grad.clone() for k, p in h.named_trainable_parameters()})
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-10, atol=1e-12)


def out_last(model):
    with torch.no_grad():
        return model.bert(input_ids=IDS, attention_mask=MASK).last_hidden_state


def test_hidden_states_keep_the_prefix_in_front():
    """Requested hidden states hold the l_p positions in front (the trained values), except the last, which
    transformers takes from the model's output: the T real positions."""
    model = bert()
    h = lorazoo.adapt(model, spec("prefix_layer"))
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
    prefixes, _ = prefixes_of(h)
    assert len(out.hidden_states) == L + 1 and all(s.shape == (3, P + 7, D) for s in out.hidden_states[:-1])
    torch.testing.assert_close(out.hidden_states[-1], out_last(model), rtol=0, atol=0)  # the stripped output
    for i in range(L):
        torch.testing.assert_close(out.hidden_states[i][:, :P], prefixes[i].expand(3, -1, -1), rtol=0, atol=0)


# --- refusals: before any change ------------------------------------------------------------------------
def _snapshot(model):
    return ({n: type(m).__name__ for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()}, dict(lorazoo.handles_of(model)))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=I, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).double()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=2, n_positions=32)).double()


def _bert_decoder():
    from transformers import BertLMHeadModel

    return bert(cls=BertLMHeadModel, is_decoder=True)


def _bare_bert():
    from transformers import BertModel

    return bert(cls=BertModel)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("make, message", [
    (_llama, "LlamaForCausalLM (llama) is not one"), (_gpt2, "GPT2LMHeadModel (gpt2) is not one"),
    (_bert_decoder, "decoder"), (_bare_bert, "task model"), (TinyNet, "TinyNet is not one")])
def test_other_models_are_refused_before_any_change(name, make, message):
    model = make()
    before = _snapshot(model)
    with pytest.raises(SpecError, match="BERT-family encoders") as e:
        lorazoo.adapt(model, AdapterSpec.preset(name))
    assert message in str(e.value)
    assert _snapshot(model) == before


@pytest.mark.parametrize("bad", [dict(prefix_tokens=0), dict(prefix_tokens=-3), dict(prefix_tokens=2.5),
                                 dict(prefix_tokens="8"), dict(prefix_tokens=True), dict(prefix_tokens=10**6),
                                 dict(init="pissa"), dict(dropout=0.1), dict(rank_dropout=0.1)])
@pytest.mark.parametrize("name", NAMES)
def test_bad_options_are_refused(name, bad):
    with pytest.raises(SpecError):
        AdapterSpec.preset(name, **bad)


@pytest.mark.parametrize("name", NAMES)
def test_saving_a_module_inside_the_encoder_is_refused(name):
    model = bert()
    before = _snapshot(model)
    with pytest.raises(SpecError, match="inside 'bert'"):
        lorazoo.adapt(model, spec(name, modules_to_save=["classifier", "pooler"]))
    assert _snapshot(model) == before


def test_an_adapted_layer_inside_the_encoder_is_refused():
    model = bert()
    lorazoo.adapt(model, AdapterSpec(rank=2, targets=["query"]), name="lora")
    before = _snapshot(model)
    with pytest.raises(LorazooError, match="adapted layer"):
        lorazoo.adapt(model, spec("prefix_layer"), name="prefix")
    assert _snapshot(model) == before


def test_a_second_adapter_on_the_wrapped_encoder_is_refused_before_any_change():
    """As for FT/BitFit, a second adapter that adapts no layer finds no unwrapped layer to fingerprint the base by
    (targets.candidate_layers skips saved modules): refused, the first adapter untouched."""
    model = bert()
    lorazoo.adapt(model, spec("prefix_embed"), name="a")
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK).logits
    before = _snapshot(model)
    with pytest.raises(LorazooError):
        lorazoo.adapt(model, spec("prefix_layer"), name="b")
    assert _snapshot(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, out, rtol=0, atol=0)


def test_a_non_2d_mask_is_refused_at_the_forward():
    model = bert()
    lorazoo.adapt(model, spec("prefix_embed"))
    with pytest.raises(LorazooError, match="2D attention mask"):
        model(input_ids=IDS, attention_mask=torch.ones(3, 1, 7, 7))


def test_presets_use_the_papers_prefix_lengths():
    assert AdapterSpec.preset("prefix_embed").options["prefix_tokens"] == 256  # Table 4/15: l_p = 256, l_i = 8
    assert AdapterSpec.preset("prefix_layer").options["prefix_tokens"] == 8    # Table 4/15: l_p = 8, l_i = 8


# --- RoBERTa-family encoders: the same function, positions counted from the padding index ------------------
def roberta(kind, seed=0):
    """A tiny RoBERTa / XLM-RoBERTa classifier (padding index 1, so positions start at 2)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(kind, vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=2,
                               intermediate_size=I, max_position_embeddings=32 + 2, num_labels=2, pad_token_id=1,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AutoModelForSequenceClassification.from_config(cfg).double().eval()


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta"])
@pytest.mark.parametrize("name", NAMES)
def test_roberta_family_matches_the_papers_description(kind, name, tmp_path):
    """Logits against the reference (prefix in front of the embedding output, mask extended, PreLayer's block
    outputs overwritten, the head reading the first real token <s>), trainable names, disabled and save/load."""
    model = roberta(kind)
    ids = IDS.clamp(min=2)  # no padding token inside the text: RoBERTa would give it the padding position
    h = lorazoo.adapt(model, spec(name))
    perturb(h, scale=0.5)
    sd = h.state_dict()
    names = ["roberta.embeddings.prefix"] + [f"roberta.encoder.layer.{i}.prefix" for i in range(L - 1)] * (
        name == "prefix_layer")
    assert sorted(k for k in sd if not k.startswith("classifier.")) == sorted(names)
    prefixes = [sd[k] for k in names]

    base = roberta(kind)
    head = roberta(kind).classifier
    head.load_state_dict({k[len("classifier."):]: v for k, v in sd.items() if k.startswith("classifier.")})
    n, B = P, ids.shape[0]
    with torch.no_grad():
        hs = torch.cat([prefixes[0].expand(B, -1, -1), base.roberta.embeddings(input_ids=ids)], dim=1)
        m = torch.cat([torch.ones(B, n, dtype=torch.float64), MASK.double()], dim=1)
        additive = (1.0 - m)[:, None, None, :] * torch.finfo(torch.float64).min
        for i, block in enumerate(base.roberta.encoder.layer):
            hs = block(hs, additive)
            hs = hs[0] if isinstance(hs, tuple) else hs
            if i + 1 < len(prefixes):
                hs = torch.cat([prefixes[i + 1].expand(B, -1, -1), hs[:, n:]], dim=1)
        ref = head(hs[:, n:])
        out = model(input_ids=ids, attention_mask=MASK).logits
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        expected = base(input_ids=ids, attention_mask=MASK).logits
        with h.disabled():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=MASK).logits, expected, rtol=0, atol=0)
    h.save(tmp_path)
    fresh = roberta(kind)
    lorazoo.load(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=MASK).logits, out, rtol=1e-12, atol=1e-12)


def test_roberta_prefix_longer_than_the_position_table_starts_from_chunks():
    """A prefix longer than RoBERTa's 32 positions (its table has 34 rows: the first 2 are before the padding
    index) is initialized in chunks that each fit the table."""
    model = roberta("roberta")
    h = lorazoo.adapt(model, spec("prefix_embed", prefix_tokens=70))
    assert h.state_dict()["roberta.embeddings.prefix"].shape == (70, D)
    with torch.no_grad():
        assert model(input_ids=IDS.clamp(min=2)).logits.isfinite().all()
