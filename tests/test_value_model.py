"""ValueModel on a tiny random Llama: shapes, heads, alignment, determinism, gradients, checkpoints."""
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel  # noqa: E402

from vrpo_fast.models.value_model import ValueModel, ValueOutput, hidden_size_of  # noqa: E402
from vrpo_fast.models.vib_head import ScalarValueHead, VIBValueHead  # noqa: E402

B, T, VOCAB = 3, 7, 50


def tiny_config():
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, attn_implementation="eager",
    )


@pytest.fixture
def causal_lm():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config())


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, :2] = 0  # left padded row
    input_ids[1, :2] = 0
    response_mask = torch.zeros(B, T, dtype=torch.long)
    response_mask[:, 4:] = 1
    return input_ids, attention_mask, response_mask


def make(backbone, **kwargs):
    """A ValueModel whose heads are moved off their initialisation.

    The heads zero-initialise their output layers (values start at 0, and no gradient flows back
    through a zero decoder), which would let several checks below pass vacuously.
    """
    model = ValueModel(backbone, **kwargs)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def grads_reach_backbone(model):
    emb = model.backbone.get_input_embeddings().weight.grad
    layer0 = next(p for n, p in model.backbone.named_parameters() if "layers.0." in n and p.grad is not None)
    return emb is not None and emb.abs().sum() > 0 and layer0.grad.abs().sum() > 0


@pytest.mark.parametrize("head,aux_heads,aux_input", [
    ("vib", True, "z"), ("vib", True, "h"), ("vib", False, "z"), ("scalar", True, "h"), ("scalar", False, "h"),
])
def test_shapes_and_heads(causal_lm, batch, head, aux_heads, aux_input):
    input_ids, attention_mask, response_mask = batch
    model = make(causal_lm, head=head, latent_dim=8, aux_heads=aux_heads, aux_input=aux_input)
    out = model(input_ids, attention_mask, response_mask=response_mask, seed=0)
    assert isinstance(out, ValueOutput)
    assert out.values.shape == (B, T) and out.values.dtype == torch.float32
    assert out.kl.dim() == 0 and out.kl.dtype == torch.float32
    assert torch.isfinite(out.values).all()
    assert torch.all(out.values[1, :2] == 0)  # padding
    if head == "scalar":
        assert isinstance(model.value_head, ScalarValueHead)
        assert out.kl.item() == 0.0
    else:
        assert isinstance(model.value_head, VIBValueHead)
        assert model.value_head.latent_dim == 8 and model.value_head.beta == 1e-3
        assert out.kl.item() > 0.0
    if aux_heads:
        assert out.ent_pred.shape == out.nll_pred.shape == (B, T)
        assert out.ent_pred.dtype == torch.float32
        width = 8 if aux_input == "z" else 32
        assert model.entropy_head.net[0].in_features == width
        assert model.nll_head.net[0].in_features == width
    else:
        assert out.ent_pred is None and out.nll_pred is None
        assert model.entropy_head is None
    # no duplicate registration of the backbone weights
    keys = list(model.state_dict())
    assert all(k.startswith(("backbone.", "value_head.", "entropy_head.", "nll_head.")) for k in keys)


def test_bad_arguments(causal_lm):
    with pytest.raises(ValueError, match="aux_input"):
        ValueModel(causal_lm, head="scalar", aux_input="z")
    with pytest.raises(ValueError, match="head"):
        ValueModel(causal_lm, head="mlp")
    with pytest.raises(ValueError, match="aux_input"):
        ValueModel(causal_lm, aux_input="x")
    model = make(causal_lm, latent_dim=8)
    with pytest.raises(ValueError, match="response_mask"):
        model(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3), response_mask=torch.ones(2, 4))


def test_hidden_size_fallbacks(causal_lm):
    assert hidden_size_of(causal_lm.config) == 32
    assert hidden_size_of(types.SimpleNamespace(n_embd=48)) == 48
    assert hidden_size_of(types.SimpleNamespace(d_model=24)) == 24
    with pytest.raises(ValueError, match="hidden"):
        hidden_size_of(types.SimpleNamespace(width=3))


def test_causal_lm_and_base_backbone_agree_and_skip_lm_head(causal_lm, batch):
    input_ids, attention_mask, _ = batch
    base = LlamaModel(tiny_config())
    base.load_state_dict(causal_lm.model.state_dict())
    torch.manual_seed(3)
    m_lm = make(causal_lm, latent_dim=8).eval()
    m_base = ValueModel(base, latent_dim=8).eval()
    m_base.load_state_dict({k: v for k, v in m_lm.state_dict().items() if not k.startswith("backbone.")},
                           strict=False)
    calls = []
    causal_lm.lm_head.register_forward_hook(lambda *a: calls.append(1))
    out_lm = m_lm(input_ids, attention_mask)
    out_base = m_base(input_ids, attention_mask)
    assert not calls, "the LM head must not run inside the value model"
    torch.testing.assert_close(out_lm.values, out_base.values)
    torch.testing.assert_close(out_lm.ent_pred, out_base.ent_pred)


def test_hidden_state_is_the_backbones_last(causal_lm, batch):
    input_ids, attention_mask, _ = batch
    model = make(causal_lm, latent_dim=8).eval()
    ones = torch.ones_like(attention_mask)
    with torch.no_grad():
        ref = causal_lm(input_ids, attention_mask=ones, output_hidden_states=True).hidden_states[-1]
        hidden = model.last_hidden_state(input_ids, ones)
    torch.testing.assert_close(hidden, ref)


def test_eval_determinism_and_training_noise(causal_lm, batch):
    input_ids, attention_mask, response_mask = batch
    model = make(causal_lm, latent_dim=8)
    model.eval()
    a = model(input_ids, attention_mask, response_mask=response_mask)
    b = model(input_ids, attention_mask, response_mask=response_mask, seed=123)
    assert torch.equal(a.values, b.values) and torch.equal(a.ent_pred, b.ent_pred)
    model.train()
    c = model(input_ids, attention_mask, seed=5)
    d = model(input_ids, attention_mask, seed=5)
    e = model(input_ids, attention_mask, seed=6)
    torch.testing.assert_close(c.values, d.values)
    assert not torch.allclose(c.values, e.values)  # z is sampled in training mode
    assert not torch.allclose(c.values, a.values)


def test_left_padding_does_not_change_values(causal_lm):
    model = make(causal_lm, latent_dim=8).eval()
    seq = torch.tensor([[5, 9, 13, 2, 7]])
    padded = torch.tensor([[0, 0, 5, 9, 13, 2, 7]])
    pad_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        plain = model(seq, torch.ones_like(seq))
        left = model(padded, pad_mask)
    torch.testing.assert_close(left.values[:, 2:], plain.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(left.nll_pred[:, 2:], plain.nll_pred, rtol=1e-4, atol=1e-5)


def test_alignment_and_kl_mask(causal_lm, batch):
    input_ids, attention_mask, response_mask = batch
    model = make(causal_lm, latent_dim=8).eval()
    out = model(input_ids, attention_mask, response_mask=response_mask)
    tok = model(input_ids, attention_mask, response_mask=response_mask, align_to_tokens=True)
    # token-aligned entry t is the state-aligned entry t - 1
    torch.testing.assert_close(tok.values[:, 1:], out.values[:, :-1])
    assert torch.all(tok.values[:, 0] == 0)
    torch.testing.assert_close(tok.nll_pred[:, 1:], out.nll_pred[:, :-1])
    # the KL is averaged over the states that generate response tokens: positions 3..T-2
    with torch.no_grad():
        hidden = model.last_hidden_state(input_ids, attention_mask)
        per_token = model.value_head(hidden, mask=attention_mask.bool()).kl_per_token
    state_mask = torch.zeros(B, T)
    state_mask[:, 3:T - 1] = 1
    want = (per_token * state_mask).sum() / state_mask.sum()
    torch.testing.assert_close(out.kl, want.float())
    # without a response mask: all attended positions
    out_all = model(input_ids, attention_mask)
    m = attention_mask.float()
    torch.testing.assert_close(out_all.kl, ((per_token * m).sum() / m.sum()).float())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_reaches_backbone_and_heads(causal_lm, batch, checkpointing):
    input_ids, attention_mask, response_mask = batch
    model = make(causal_lm, latent_dim=8).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
        flag = getattr(causal_lm, "is_activation_checkpointing", None)
        assert flag if flag is not None else causal_lm.is_gradient_checkpointing
    out = model(input_ids, attention_mask, response_mask=response_mask, seed=0)
    loss = out.values.square().mean() + 1e-3 * out.kl + out.ent_pred.square().mean() + out.nll_pred.square().mean()
    loss.backward()
    assert grads_reach_backbone(model)
    for head in (model.value_head, model.entropy_head, model.nll_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert causal_lm.lm_head.weight.grad is None or causal_lm.model.embed_tokens.weight is causal_lm.lm_head.weight


def test_aux_on_h_gives_backbone_gradient_without_value(causal_lm, batch):
    input_ids, attention_mask, _ = batch
    model = make(causal_lm, head="scalar", aux_input="h")
    out = model(input_ids, attention_mask)
    out.ent_pred.sum().backward()
    assert grads_reach_backbone(model)
    assert all(p.grad is None for p in model.value_head.parameters())


@pytest.mark.parametrize("head,aux_input", [("vib", "z"), ("scalar", "h")])
def test_save_load_round_trip(causal_lm, batch, tmp_path, head, aux_input):
    input_ids, attention_mask, response_mask = batch
    model = make(causal_lm, head=head, latent_dim=8, aux_input=aux_input, aux_hidden=0).eval()
    model.save_pretrained(str(tmp_path))
    loaded = ValueModel.from_pretrained(str(tmp_path)).eval()
    assert loaded.head_config == model.head_config
    assert type(loaded.value_head) is type(model.value_head)
    assert isinstance(loaded.backbone, LlamaForCausalLM)  # the saved backbone kind is kept
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, msg=k)
    a = model(input_ids, attention_mask, response_mask=response_mask)
    b = loaded(input_ids, attention_mask, response_mask=response_mask)
    torch.testing.assert_close(b.values, a.values)
    torch.testing.assert_close(b.kl, a.kl)
    torch.testing.assert_close(b.ent_pred, a.ent_pred)
    # keyword arguments that change the head layout cannot silently load mismatched weights
    with pytest.raises(ValueError, match="head weights"):
        ValueModel.from_pretrained(str(tmp_path), aux_heads=False, head=head, aux_input=aux_input)
    # a bare backbone, with a non-head keyword routed to the backbone's from_pretrained
    bare = ValueModel.from_pretrained(str(tmp_path), backbone_class="base", dtype=torch.bfloat16)
    assert isinstance(bare.backbone, LlamaModel) and bare.backbone.dtype == torch.bfloat16
    out = bare.eval()(input_ids, attention_mask)
    assert out.values.dtype == torch.float32
    torch.testing.assert_close(out.values, a.values, rtol=0.1, atol=0.1)


def test_from_plain_hf_directory_initialises_heads(causal_lm, batch, tmp_path):
    causal_lm.save_pretrained(str(tmp_path))
    model = ValueModel.from_pretrained(str(tmp_path), latent_dim=4, aux_input="h")
    assert isinstance(model.backbone, LlamaModel)  # fresh value models load the bare model
    assert model.head_config["latent_dim"] == 4
    torch.testing.assert_close(model.backbone.embed_tokens.weight, causal_lm.model.embed_tokens.weight)
    out = model(*batch[:2])
    assert out.values.shape == (B, T)


def test_gpt2_backbone_absolute_positions_and_n_embd():
    # GPT-2 has absolute position embeddings (left padding would shift them without position_ids)
    # and names its width n_embd
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    model = make(lm, latent_dim=8).eval()
    assert model.hidden_size == 32
    seq = torch.tensor([[5, 9, 13, 2]])
    with torch.no_grad():
        plain = model(seq, torch.ones_like(seq))
        left = model(torch.tensor([[0, 0, 5, 9, 13, 2]]), torch.tensor([[0, 0, 1, 1, 1, 1]]))
    torch.testing.assert_close(left.values[:, 2:], plain.values, rtol=1e-4, atol=1e-5)
