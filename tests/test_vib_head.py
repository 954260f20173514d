"""VIBValueHead / ScalarValueHead: shapes, masked KL, eval determinism, autocast, gradients, init."""
import pytest
import torch
from conftest import requires_triton
from torch import nn

from vrpo_fast.models.vib_head import ScalarValueHead, VIBHeadOutput, VIBValueHead

B, T, H, L = 3, 5, 32, 48


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    return hidden, mask


def randomise(head, scale=0.3):
    """Move away from the near-zero init so values / KL are not trivially 0."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return head


def manual_kl_per_token(head, hidden):
    stats = head.encoder(hidden).double()
    mu, logvar = stats[..., :L], stats[..., L:].clamp(-20.0, 10.0)
    return 0.5 * (mu**2 + logvar.exp() - logvar - 1).sum(-1)


@pytest.mark.parametrize("decoder", ["linear", "mlp", "module"])
def test_shapes_and_dtypes(decoder):
    if decoder == "module":
        decoder = nn.Sequential(nn.Linear(L, 8), nn.Tanh(), nn.Linear(8, 1))
    head = VIBValueHead(H, latent_dim=L, decoder=decoder)
    hidden, mask = inputs()
    out = head(hidden, mask, seed=0)
    assert isinstance(out, VIBHeadOutput)
    assert out.values.shape == (B, T) and out.values.dtype == torch.float32
    assert out.z.shape == (B, T, L)
    assert out.kl_per_token.shape == (B, T) and out.kl_per_token.dtype == torch.float32
    assert out.kl.shape == () and out.kl.dtype == torch.float32
    assert head.beta == 1e-3


def test_values_are_decoder_of_z():
    head = randomise(VIBValueHead(H, latent_dim=L))
    hidden, mask = inputs()
    out = head(hidden, mask, seed=3)
    expected = out.z.detach() @ head.decoder.weight.detach().T + head.decoder.bias.detach()
    torch.testing.assert_close(out.values.detach(), expected.squeeze(-1))
    # z is a sample around mu with the seed's noise: not mu itself in training mode.
    mu = head.encoder(hidden)[..., :L]
    assert not torch.allclose(out.z, mu)


def test_masked_mean_kl_matches_manual():
    head = randomise(VIBValueHead(H, latent_dim=L))
    hidden, mask = inputs()
    out = head(hidden, mask, seed=1)
    kl_tok = manual_kl_per_token(head, hidden).detach()
    torch.testing.assert_close(out.kl_per_token.double(), kl_tok, rtol=1e-5, atol=1e-5)
    expected = sum(kl_tok[b, t] for b in range(B) for t in range(T) if mask[b, t]) / mask.sum()
    torch.testing.assert_close(out.kl.double(), expected, rtol=1e-5, atol=1e-5)
    # Float / int masks give the same; mask=None averages over every token.
    torch.testing.assert_close(head(hidden, mask.float(), seed=1).kl, out.kl)
    torch.testing.assert_close(head(hidden, mask.long(), seed=1).kl, out.kl)
    torch.testing.assert_close(head(hidden, None, seed=1).kl.double(), kl_tok.mean(), rtol=1e-5, atol=1e-5)


def test_all_masked_batch_gives_zero_kl_and_finite_grads():
    head = randomise(VIBValueHead(H, latent_dim=L))
    hidden, _ = inputs()
    mask = torch.zeros(B, T)
    out = head(hidden, mask, seed=0)
    assert out.kl.item() == 0.0
    (out.values.sum() * 0 + out.kl).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_eval_is_deterministic_and_uses_mu():
    head = randomise(VIBValueHead(H, latent_dim=L)).eval()
    hidden, mask = inputs()
    a = head(hidden, mask, seed=1)
    b = head(hidden, mask, seed=2)
    c = head(hidden, mask)
    assert torch.equal(a.values, b.values) and torch.equal(a.values, c.values)
    torch.testing.assert_close(a.z, head.encoder(hidden)[..., :L])
    torch.testing.assert_close(a.kl, b.kl)


def test_training_seed_controls_noise():
    head = randomise(VIBValueHead(H, latent_dim=L))
    hidden, mask = inputs()
    a = head(hidden, mask, seed=5)
    b = head(hidden, mask, seed=5)
    c = head(hidden, mask, seed=6)
    assert torch.equal(a.values, b.values)
    assert not torch.allclose(a.values, c.values)
    torch.manual_seed(3)
    d = head(hidden, mask)
    torch.manual_seed(3)
    e = head(hidden, mask)
    assert torch.equal(d.values, e.values)


def test_autocast_bf16():
    head = randomise(VIBValueHead(H, latent_dim=L, decoder="mlp"))
    hidden, mask = inputs()
    ref = head(hidden, mask, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(hidden, mask, seed=4)
    assert out.z.dtype == torch.bfloat16
    assert out.values.dtype == torch.float32 and out.kl.dtype == torch.float32
    torch.testing.assert_close(out.values, ref.values, rtol=5e-2, atol=1e-1)
    torch.testing.assert_close(out.kl, ref.kl, rtol=5e-2, atol=1e-2)
    out.values.sum().add(out.kl).backward()
    assert torch.isfinite(head.encoder.weight.grad).all() and head.encoder.weight.grad.abs().sum() > 0
    # bf16 hidden states (a bf16 backbone) work without autocast: cast to the head's dtype.
    out16 = head(hidden.bfloat16(), mask, seed=4)
    assert out16.values.dtype == torch.float32 and torch.isfinite(out16.values).all()


@pytest.mark.parametrize("decoder", ["linear", "mlp"])
def test_gradients_reach_encoder_and_decoder(decoder):
    head = VIBValueHead(H, latent_dim=L, decoder=decoder)
    hidden, mask = inputs()
    target = torch.randn(B, T)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)

    def loss_fn():
        out = head(hidden, mask, seed=0)
        value_loss = ((out.values - target) ** 2)[mask].mean()
        return value_loss + head.beta * out.kl

    # At init the zero output layer blocks the value gradient upstream, but the KL still reaches
    # the encoder and the output layer gets a value gradient.
    loss_fn().backward()
    assert head.encoder.weight.grad.abs().sum() > 0
    last = head.decoder if decoder == "linear" else head.decoder[-1]
    assert last.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    loss_fn().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # And a few steps reduce the loss.
    first = loss_fn().item()
    for _ in range(20):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < first


@pytest.mark.parametrize("decoder", ["linear", "mlp"])
def test_init_starts_informative_and_passes_gradient_to_the_encoder(decoder):
    """The latent starts as a nearly noise-free projection of h (not at the prior, a saddle where z is
    pure noise), values start small but non-zero, and the value's gradient reaches the encoder."""
    torch.manual_seed(0)
    head = VIBValueHead(64, latent_dim=16, decoder=decoder)
    hidden = torch.randn(4, 16, 64)  # a normed hidden state: unit scale per dim
    mu, logvar = head.encoder(hidden).split(16, dim=-1)
    assert torch.allclose(logvar.mean(), torch.tensor(-5.0), atol=0.5) and 0.3 < mu.std() < 1.0
    out = head(hidden, seed=0)
    assert 0.0 < out.values.abs().max().item() < 0.5
    signal, noise = mu.var(), (out.z - mu).var()
    assert noise / signal < 0.05  # sigma ~ 0.08 against |mu| ~ 0.6
    out.values.sum().backward()
    assert head.encoder.weight.grad.abs().sum() > 0
    head_low = VIBValueHead(64, latent_dim=16, decoder=decoder, logvar_init=-2.0)
    assert torch.allclose(head_low.encoder.bias[16:], torch.full((16,), -2.0))


@requires_triton
def test_triton_backend_matches_torch_where_noise_free():
    head = randomise(VIBValueHead(H, latent_dim=L))
    head_t = randomise(VIBValueHead(H, latent_dim=L, backend="triton"))
    hidden, mask = inputs()
    a, b = head(hidden, mask, seed=0), head_t(hidden, mask, seed=0)
    torch.testing.assert_close(a.kl_per_token, b.kl_per_token)  # KL does not depend on eps
    head.eval()
    head_t.eval()
    torch.testing.assert_close(head(hidden, mask).values, head_t(hidden, mask).values)


def test_scalar_value_head():
    head = ScalarValueHead(H)
    hidden, mask = inputs()
    out = head(hidden, mask, seed=0)
    assert isinstance(out, VIBHeadOutput) and out.z is None
    assert out.values.shape == (B, T) and out.values.dtype == torch.float32
    assert out.values.abs().max().item() == 0.0
    assert torch.equal(out.kl_per_token, torch.zeros(B, T)) and out.kl.item() == 0.0
    assert head.beta == 0.0
    with torch.no_grad():
        head.value.weight.normal_()
    out = head(hidden)
    torch.testing.assert_close(out.values, (hidden @ head.value.weight.T + head.value.bias).squeeze(-1))
    out.values.sum().backward()
    assert head.value.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(hidden, mask).values.dtype == torch.float32


def test_validation():
    head = VIBValueHead(H, latent_dim=L)
    hidden, mask = inputs()
    with pytest.raises(ValueError, match="hidden"):
        head(torch.randn(B, T, H + 1))
    with pytest.raises(TypeError, match="hidden"):
        head(torch.zeros(B, T, H, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        head(hidden, mask[:, :-1])
    with pytest.raises(ValueError, match="decoder"):
        VIBValueHead(H, decoder="deep")
    with pytest.raises(ValueError, match="decoder"):
        VIBValueHead(H, latent_dim=L, decoder=nn.Linear(L, 3))(hidden)
    with pytest.raises(ValueError, match="latent_dim"):
        VIBValueHead(H, latent_dim=0)
    with pytest.raises(ValueError, match="beta"):
        VIBValueHead(H, beta=-1.0)
    with pytest.raises(ValueError, match="logvar_clamp"):
        VIBValueHead(H, logvar_clamp=(5.0, 1.0))
    with pytest.raises(ValueError, match="backend"):
        VIBValueHead(H, backend="gpu")
    with pytest.raises(ValueError, match="hidden_size"):
        ScalarValueHead(0)
