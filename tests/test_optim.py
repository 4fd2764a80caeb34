"""lowvram.optim: the optimizer TrainConfig.optimizer names, and the 8-bit state layout that
the memory planner assumes, held against the real bitsandbytes optimizer."""

import copy
import math

import pytest
import torch

from lowvram.config import ModelConfig, TrainConfig
from lowvram.memory.tracker import Adam8bitLayout
from lowvram.model import GPTModel
from lowvram.optim import build_optimizer

CFG = ModelConfig(vocab_size=512, block_size=32, n_layer=2, n_head=4, n_embd=64)


def _steps(model: GPTModel, opt: torch.optim.Optimizer, n: int = 2) -> float:
    torch.manual_seed(3)
    batch = torch.randint(0, CFG.vocab_size, (4, CFG.block_size + 1))
    for _ in range(n):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def test_adamw_is_torchs_adamw_with_the_configs_lr_and_decay():
    opt = build_optimizer(GPTModel(CFG).parameters(), TrainConfig(max_lr=1e-3, weight_decay=0.1))
    assert type(opt) is torch.optim.AdamW
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (1e-3, 0.1)


def test_optimizer_is_validated():
    with pytest.raises(ValueError, match="optimizer='sgd' is not allowed"):
        TrainConfig(optimizer="sgd")


def test_adamw8bit_is_bitsandbytes_and_trains_on_cpu():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = GPTModel(CFG)
    opt = build_optimizer(model.parameters(), TrainConfig(optimizer="adamw8bit", max_lr=1e-3))
    assert isinstance(opt, bnb.optim.AdamW8bit)
    first = _steps(model, opt, 1)
    last = _steps(model, opt, 10)
    assert last < first - 0.5  # it learns the repeated batch
    big = model.lm_head.weight
    assert opt.state[big]["state1"].dtype == torch.uint8  # 8-bit moments...
    assert opt.state[model.ln_f.weight]["state1"].dtype == torch.float32  # ...only for >= 4096


def test_planner_layout_has_the_bytes_of_the_real_8bit_state():
    pytest.importorskip("bitsandbytes")

    def state_bytes(opt: torch.optim.Optimizer) -> int:
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)}
        return sum(seen.values())

    torch.manual_seed(0)
    real_model, layout_model = GPTModel(CFG), GPTModel(CFG)
    real = build_optimizer(real_model.parameters(), TrainConfig(optimizer="adamw8bit"))
    layout = Adam8bitLayout(layout_model.parameters())
    _steps(real_model, real)
    _steps(layout_model, layout)
    n_big = sum(p.numel() for p in real_model.parameters() if p.numel() >= 4096)
    n_small = sum(p.numel() for p in real_model.parameters() if p.numel() < 4096)
    blocks = sum(math.ceil(p.numel() / 256) for p in real_model.parameters() if p.numel() >= 4096)
    expected = 2 * n_big + 8 * blocks + 8 * n_small + 2 * 256 * 4
    assert state_bytes(real) == state_bytes(layout) == expected


@pytest.mark.parametrize(("impl", "flags"), [
    (None, {"foreach": None, "fused": None}),  # torch decides per device at each step
    ("foreach", {"foreach": True, "fused": None}),
    ("fused", {"foreach": None, "fused": True}),
    ("loop", {"foreach": False, "fused": None}),
])  # fmt: skip
def test_adamw_impl_picks_torchs_kernel(impl, flags):
    opt = build_optimizer(GPTModel(CFG).parameters(), TrainConfig(adamw_impl=impl))
    assert type(opt) is torch.optim.AdamW
    assert {k: opt.defaults[k] for k in flags} == flags


def _trained(impl: str | None, steps: int = 3) -> tuple[dict, torch.optim.Optimizer, GPTModel]:
    torch.manual_seed(0)
    model = GPTModel(CFG)
    opt = build_optimizer(model.parameters(), TrainConfig(adamw_impl=impl, max_lr=1e-3))
    _steps(model, opt, steps)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, opt, model


def test_every_kernel_computes_the_same_update_and_none_is_the_cpu_loop():
    default, _, _ = _trained(None)
    loop, _, _ = _trained("loop")
    # None on the CPU is torch's per-parameter loop: a run without adamw_impl is bit-identical
    assert all(torch.equal(default[k], loop[k]) for k in default)
    for impl in ("foreach", "fused"):
        other, _, _ = _trained(impl)
        worst = max((other[k] - loop[k]).abs().max().item() for k in loop)
        assert worst < 1e-5, (impl, worst)  # the same AdamW, to rounding
    assert not all(torch.equal(default[k], _trained(None, 4)[0][k]) for k in default)  # it trains


def test_a_kernels_state_loads_into_another():
    """Why a run may resume with another adamw_impl: the state is the same (exp_avg, exp_avg_sq,
    step), so a fused optimizer's state continues in the loop kernel as in the fused one."""
    _, fused, model = _trained("fused", 2)
    state = copy.deepcopy(fused.state_dict())  # as saved: state_dict() shares the tensors
    twin = GPTModel(CFG)
    twin.load_state_dict(model.state_dict())
    loop = build_optimizer(twin.parameters(), TrainConfig(adamw_impl="loop", max_lr=1e-3))
    loop.load_state_dict(state)
    _steps(model, fused, 2)
    _steps(twin, loop, 2)
    worst = max((a - b).abs().max().item()
                for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    assert worst < 1e-5
