"""lowvram.precision: the one place precision is decided, and the native-bf16 advice."""

from __future__ import annotations

import pytest
import torch

import lowvram.precision
import lowvram.train
from lowvram.config import PRECISIONS
from lowvram.precision import (
    PRECISION_LABELS,
    cpu_has_native_bf16,
    force_grad_scaler,
    precision_advice,
    resolve_precision,
)


def test_precision_policy_cpu():
    assert resolve_precision("no", torch.device("cpu"))[0] == "no"
    assert resolve_precision("bf16", torch.device("cpu"))[0] == "bf16"
    with pytest.warns(UserWarning, match=r"fp16 was requested on cpu.*running fp32"):
        precision, reason = resolve_precision("fp16", torch.device("cpu"))
    assert precision == "no" and "GradScaler" in reason
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        resolve_precision("fp8", torch.device("cpu"))


def test_precision_policy_cuda(monkeypatch):
    cuda = torch.device("cuda")
    assert resolve_precision("fp16", cuda)[0] == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("bf16", cuda)[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.warns(UserWarning, match="Tesla T4 does not support it"):
        assert resolve_precision("bf16", cuda)[0] == "fp16"


def test_one_list_of_precisions_and_one_label_map():
    assert tuple(PRECISION_LABELS) == PRECISIONS == ("no", "fp16", "bf16")
    assert PRECISION_LABELS["no"] == "fp32"
    with pytest.raises(ValueError, match=r"use 'no' \(fp32\), 'fp16', 'bf16'"):
        resolve_precision("fp32", "cpu")


def test_native_bf16_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_has_native_bf16(cpuinfo) == ("avx512_bf16", "amx_bf16")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")  # Skylake: no bf16
    assert cpu_has_native_bf16(str(cpuinfo)) == ()
    assert cpu_has_native_bf16(tmp_path / "missing") == ()  # not Linux: unknown, no advice


def test_bf16_advice_only_for_fp32_on_a_native_bf16_cpu(monkeypatch):
    monkeypatch.setattr(lowvram.precision, "cpu_has_native_bf16", lambda: ("amx_bf16",))
    advice = precision_advice("no", "cpu")
    assert "native bf16 instructions (amx_bf16)" in advice and "mixed_precision='bf16'" in advice
    assert precision_advice("bf16", "cpu") is None  # already bf16
    assert precision_advice("fp16", "cuda") is None  # advice about CPUs only
    monkeypatch.setattr(lowvram.precision, "cpu_has_native_bf16", lambda: ())
    assert precision_advice("no", "cpu") is None
    # advice, never a decision: fp32 stays fp32
    assert resolve_precision("no", "cpu") == ("no", "fp32 was requested")


def test_force_grad_scaler_needs_an_fp16_accelerator():
    class FakeAccelerator:
        mixed_precision, device, native_amp, scaler = "no", torch.device("cpu"), False, None

    with pytest.raises(ValueError, match="create the Accelerator with mixed_precision='fp16'"):
        force_grad_scaler(FakeAccelerator())
    fake = FakeAccelerator()
    fake.mixed_precision = "fp16"
    force_grad_scaler(fake, init_scale=8.0)
    assert fake.native_amp and fake.scaler.get_scale() == 8.0
    assert lowvram.train.force_grad_scaler is force_grad_scaler  # what notebook 25_3 imports
    assert lowvram.train.resolve_precision is resolve_precision
