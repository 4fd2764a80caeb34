"""lowvram._bench.host_ops: train()'s ATen ops per optimizer step against the plain loop's.

On a host-bound GPU (the rtx2050 model on an H200) a step takes as long as the host needs to
issue its ops, so every op train() adds to the plain loop's is time. The counts are exact on
any machine; the model has the rtx2050's 12 layers and 12 heads at a tiny width.
"""

from __future__ import annotations

import re

import pytest

from lowvram._bench import host_ops
from lowvram.config import ModelConfig
from lowvram.history import StepLog

ACCUM = 4  # the lesson's 4 x 4
# the parts of a step both loops do through the same torch code: no op of train()'s may be extra
SHARED = {"backward", "optimizer step", "clip_grad_norm_", "GradScaler", "DataLoader",
          "model forward"}


def by_file(excess: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The excess with line numbers dropped (accelerate's and ours move between versions)."""
    merged: dict[str, dict[str, int]] = {}
    for site, ops in excess.items():
        key = re.sub(r":\d+ ", " ", site)
        for op, n in ops.items():
            merged.setdefault(key, {})[op] = merged.get(key, {}).get(op, 0) + n
    return {k: {op: n for op, n in v.items() if n} for k, v in merged.items()
            if any(v.values())}


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_train_issues_the_plain_loops_ops_plus_one_per_micro_batch(precision):
    """Allowed beyond the plain loop, per optimizer step: one op per micro-batch for the loss
    record on the device (StepLog.add); under 16-bit autocast accelerate's fp32 copy of each
    micro-batch's logits (convert_outputs_to_fp32; the memory planner models it); with fp16's
    GradScaler (forced on the CPU in both loops, as on a GPU) 2 ops per step that keep the loss
    scale and the skipped flag on the device (StepLog.loss_scale, StepLog.step)."""
    r = host_ops.count_ops(host_ops.HOST_BOUND_MODEL, host_ops.host_bound_train_config(precision))
    autocast_copies = 0 if precision == "no" else ACCUM
    scaler_records = 2 if precision == "fp16" else 0
    allowance = ACCUM + autocast_copies + scaler_records
    assert r["train"]["per_step"] <= r["plain"]["per_step"] + allowance
    excess = by_file(r["excess"])
    assert not SHARED & set(excess), excess
    expected = {
        # accelerator.backward divides the loss by the accumulation; the plain loop does it itself
        "accelerate/accelerator.py (backward)": {"div": ACCUM},
        "loop body": {"div": -ACCUM},
        # the step's float64 loss sum: a copy of the first loss, then 3 in-place adds
        "lowvram/history.py (add)": {"_to_copy": 1, "add_": ACCUM - 1},
    }
    if autocast_copies:
        expected["accelerate/utils/operations.py (_convert_to_fp32)"] = {"_to_copy": ACCUM}
    if scaler_records:  # the scale before optimizer.step, and "it went down" (a skipped step)
        expected["lowvram/history.py (loss_scale)"] = {"clone": 1}
        expected["lowvram/history.py (step)"] = {"lt": 1}
    assert excess == expected
    assert r["train"]["per_step"] - r["plain"]["per_step"] == allowance
    # the model's depth is in the count: 12 layers' forward and backward, thousands of ops
    assert r["plain"]["per_step"] > 6000


def test_the_count_catches_one_more_op_per_micro_batch(monkeypatch):
    """Had StepLog.add kept its old ``loss.detach()`` (an op per micro-batch), the count rises
    by exactly 4 per step of 4 x 4, at the line that issues it."""
    small = ModelConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=8)
    config = host_ops.host_bound_train_config("no")
    before = host_ops.count_ops(small, config)
    add = StepLog.add

    def add_with_detach(self, loss, tokens):
        loss = loss.detach()  # one more op
        add(self, loss, tokens)

    monkeypatch.setattr(StepLog, "add", add_with_detach)
    after = host_ops.count_ops(small, config)
    assert after["plain"]["per_step"] == before["plain"]["per_step"]
    assert after["train"]["per_step"] == before["train"]["per_step"] + ACCUM
    assert by_file(after["excess"])["tests/test_host_ops.py (add_with_detach)"] == {"detach": ACCUM}
    assert after["train"]["per_step"] > after["plain"]["per_step"] + ACCUM  # the allowance


def test_train_runs_accelerates_per_call_checks_once_per_step_not_per_micro_batch():
    """The Python train() runs beyond the plain loop, per optimizer step (exact for the pinned
    torch and accelerate): +641 calls on the 12 x 12 model, 4 x 4, fp32, since train() calls
    the prepared optimizer.step/scheduler.step/zero_grad only once the gradients are complete.
    Called on every micro-batch, as in the lesson, they were +1,381 (accelerate's package
    lookup for LOMO optimizers in each optimizer.step: ~300 calls into importlib each time)."""
    small = ModelConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=8)
    r = host_ops.count_ops(small, host_ops.host_bound_train_config("no"), python_calls=True)
    extra = r["train"]["python_calls_per_step"] - r["plain"]["python_calls_per_step"]
    assert 0 < extra < 1000, r["python_excess"]
    assert r["python_excess"]["accelerate"] > 0  # its accumulate(), backward(), loader, ...
    assert r["python_excess"].get("lowvram/history.py", 0) <= 10  # StepLog.add + step


def test_where_names_the_part_the_line_or_the_loop():
    """A frame chain from this test: not torch, not the model, not a loop: its own line."""
    import sys

    site = host_ops.where(sys._getframe())
    assert re.fullmatch(r"tests/test_host_ops\.py:\d+ \(test_where_names_the_part_the_line_or_the_loop\)",
                        site), site


def test_count_ops_rejects_no_steps_and_forced_fp16_anything_but_fp16():
    with pytest.raises(ValueError, match="steps=0"):
        host_ops.count_ops(steps=0)
    with pytest.raises(ValueError, match="mixed_precision='bf16'"):
        with host_ops.forced_fp16(host_ops.host_bound_train_config("bf16")):
            pass


def test_format_ops_states_counts_and_excess():
    result = {"precision": "bf16", "micro_batch": 4, "accumulation": 4,
              "train": {"per_step": 7586}, "plain": {"per_step": 7578},
              "excess": {"lowvram/history.py:84 (add)": {"_to_copy": 1, "add_": 3}}}
    assert host_ops.format_ops(result).splitlines() == [
        "bf16, 4 x 4: ATen ops per optimizer step: train() 7,586, plain loop 7,578, excess +8",
        "  lowvram/history.py:84 (add): _to_copy +1, add_ +3",
    ]
