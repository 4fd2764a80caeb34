import math

import pytest
import torch

from lowvram.config import ModelConfig, get_preset
from lowvram.model import GPTModel

TINY = get_preset("tiny")[0]


def _model(**changes):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.__dict__, **changes})
    return GPTModel(cfg)


def test_forward_shapes_and_initial_loss_near_uniform():
    model = _model()
    idx = torch.randint(0, TINY.vocab_size, (3, TINY.block_size))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, TINY.block_size, TINY.vocab_size)
    # small init: predictions are almost uniform, so the loss is about ln(vocab)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.1
    logits, loss = model(idx)
    assert loss is None


def test_seed_style_keyword_construction():
    model = GPTModel(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)
    assert model.config.vocab_size == 50
    with pytest.raises(TypeError, match="either a ModelConfig"):
        GPTModel(TINY, n_layer=3)


def test_parameter_count_matches_the_formula():
    c = TINY
    per_block = 12 * c.n_embd**2 + 13 * c.n_embd  # attn 4C^2+4C, mlp 8C^2+5C, 2 LN 4C
    expected = (
        c.vocab_size * c.n_embd  # wte
        + c.block_size * c.n_embd  # wpe
        + c.n_layer * per_block
        + 2 * c.n_embd  # ln_f
        + c.vocab_size * c.n_embd  # untied lm_head
    )
    assert _model().num_parameters() == expected
    assert _model(tie_embeddings=True).num_parameters() == expected - c.vocab_size * c.n_embd
    assert _model().num_parameters(non_embedding=True) == expected - c.block_size * c.n_embd
    # the seed's model: GPT-2 small with an untied 32000-token head
    assert GPTModel(get_preset("rtx2050")[0]).num_parameters() == 134_404_608


def test_tied_head_shares_the_embedding():
    model = _model(tie_embeddings=True)
    assert model.lm_head.weight is model.wte.weight


def test_causality_future_tokens_do_not_change_the_past():
    model = _model().eval()
    a = torch.randint(0, TINY.vocab_size, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % TINY.vocab_size
    la, _ = model(a)
    lb, _ = model(b)
    assert torch.allclose(la[0, :7], lb[0, :7], atol=1e-6)
    assert not torch.allclose(la[0, 7:], lb[0, 7:])


def test_gradient_checkpointing_gives_the_same_gradients():
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
    grads = []
    for ckpt in (False, True):
        model = _model(gradient_checkpointing=ckpt)
        _, loss = model(idx, idx)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize(
    ("idx", "words"),
    [
        (torch.zeros(TINY.block_size + 1, dtype=torch.long)[None], "block_size=16"),
        (torch.full((1, 4), TINY.vocab_size), "vocab_size=96 allows only [0, 95]"),
        (torch.full((1, 4), -1), "token ids in [-1, -1]"),
        (torch.zeros(4, dtype=torch.long), "shape (batch, seq_len)"),
        (torch.zeros(1, 4), "integer token ids"),
    ],
)
def test_bad_input_is_a_clear_value_error(idx, words):
    with pytest.raises(ValueError) as err:
        _model()(idx)
    assert words in str(err.value)


def test_bad_targets():
    idx = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets has shape"):
        _model()(idx, idx[:, :3])
    with pytest.raises(ValueError, match="targets holds token ids"):
        _model()(idx, idx + TINY.vocab_size)


def test_generate_appends_tokens_deterministically():
    model = _model().eval()
    start = torch.zeros(1, 1, dtype=torch.long)
    out1 = model.generate(start, 20, generator=torch.Generator().manual_seed(1))
    out2 = model.generate(start, 20, generator=torch.Generator().manual_seed(1))
    assert out1.shape == (1, 21)
    assert torch.equal(out1, out2)
    assert int(out1.max()) < TINY.vocab_size
    # prompts longer than block_size are cropped, not rejected
    long = torch.zeros(1, 40, dtype=torch.long)
    assert model.generate(long, 2, top_k=5).shape == (1, 42)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(start, 1, temperature=0)


def _loss_and_grads(chunk: int, autocast: bool = False, tie: bool = False):
    model = _model(loss_chunk_size=chunk, tie_embeddings=tie, n_embd=32, vocab_size=96)
    torch.manual_seed(1)
    idx = torch.randint(0, TINY.vocab_size, (3, TINY.block_size))
    tgt = torch.randint(0, TINY.vocab_size, (3, TINY.block_size))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, loss = model(idx, tgt)
    loss.backward()
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 7, 16, 48, 1000])  # 48 = all tokens, 1000 > all tokens
@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_equals_the_plain_loss_and_gradients(chunk, tie):
    torch.set_default_dtype(torch.float32)
    _, plain_loss, plain = _loss_and_grads(0, tie=tie)
    logits, loss, grads = _loss_and_grads(chunk, tie=tie)
    assert logits is None  # the full logits are never built
    assert abs(loss.item() - plain_loss.item()) <= 1e-6 * abs(plain_loss.item())
    for name, g in plain.items():
        err = (grads[name] - g).norm() / g.norm()
        assert err <= 1e-6, (name, err.item())


def test_chunked_loss_under_autocast_matches_the_plain_path():
    _, plain_loss, plain = _loss_and_grads(0, autocast=True)
    _, loss, grads = _loss_and_grads(16, autocast=True)
    # bf16 matmuls in both; the chunked sum runs in another order
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-3)
    err = (grads["lm_head.weight"] - plain["lm_head.weight"]).norm() / plain["lm_head.weight"].norm()
    assert err < 1e-2


def test_chunked_model_still_generates_and_gives_logits_without_targets():
    model = _model(loss_chunk_size=5).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    logits, loss = model(idx)
    assert logits.shape == (2, 8, TINY.vocab_size) and loss is None
    reference = _model()  # same seed: same weights
    assert torch.equal(logits, reference.eval()(idx)[0])
    with torch.no_grad():  # evaluation with targets: the loss, chunked, no logits
        _, val_loss = model(idx, idx)
    assert val_loss.item() == pytest.approx(reference(idx, idx)[1].item(), rel=1e-6)
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 6)


def test_loss_chunk_size_is_validated():
    with pytest.raises(ValueError, match="loss_chunk_size=-1 is not allowed"):
        ModelConfig(loss_chunk_size=-1)


def test_token_range_is_checked_on_cpu_always_and_elsewhere_once_per_device():
    model = _model()
    cpu = torch.zeros(1, 4, dtype=torch.long)
    assert model._range_check_due(cpu) and model._range_check_due(cpu)  # no sync on CPU: always
    other = torch.zeros(1, 4, dtype=torch.long, device="meta")  # stands in for a CUDA tensor
    assert model._range_check_due(other)  # the first forward on a device: checked (one sync)
    assert not model._range_check_due(other)  # later ones: no device-to-host sync per step
    # every bad id still fails clearly on CPU, also after many good calls
    for _ in range(3):
        model(cpu)
    with pytest.raises(ValueError, match="vocab_size=96 allows only"):
        model(cpu + TINY.vocab_size)


def test_a_caller_that_checked_its_rows_turns_the_range_check_off():
    """train() checks its rows once when loaded and sets check_token_range = False: its model
    reads no token id back per forward. A learner's model keeps the check."""
    model, other = _model(), _model()
    assert model.check_token_range and other.check_token_range
    model.check_token_range = False
    idx = torch.zeros(1, 4, dtype=torch.long)
    assert not model._range_check_due(idx) and other._range_check_due(idx)
    with pytest.raises(IndexError):  # unchecked, a bad id reaches nn.Embedding
        model(idx + TINY.vocab_size)
    with pytest.raises(ValueError, match="vocab_size=96 allows only"):
        other(idx + TINY.vocab_size)
