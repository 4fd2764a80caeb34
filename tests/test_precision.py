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
    requested_precision,
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


# ----------------------------------------------------------------------------- the order


def test_requested_precision_order(tmp_path):
    """--mixed-precision > accelerate's configured precision > the preset."""
    no_file = tmp_path / "absent.yaml"
    env = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    assert requested_precision("fp16", environ={}, config_file=no_file) == ("fp16", "the preset")
    assert requested_precision("fp16", environ=env, config_file=no_file) == (
        "bf16", "accelerate (ACCELERATE_MIXED_PRECISION)")
    assert requested_precision("fp16", "no", environ=env, config_file=no_file) == (
        "no", "--mixed-precision")
    # accelerate launch sets "no" when nothing is configured: that is not a choice ...
    launcher_default = {"ACCELERATE_MIXED_PRECISION": "no"}
    assert requested_precision("fp16", environ=launcher_default, config_file=no_file)[0] == "fp16"
    # ... but with a config file it is what the learner answered in `accelerate config`
    config = tmp_path / "default_config.yaml"
    config.write_text("mixed_precision: 'no'\n")
    assert requested_precision("fp16", environ=launcher_default, config_file=config)[0] == "no"


def test_requested_precision_names_a_bad_value(tmp_path):
    with pytest.raises(ValueError, match=r"ACCELERATE_MIXED_PRECISION='fp8' is not allowed"):
        requested_precision("no", environ={"ACCELERATE_MIXED_PRECISION": "fp8"},
                            config_file=tmp_path / "absent.yaml")
    with pytest.raises(ValueError, match=r"--mixed-precision='half' is not allowed"):
        requested_precision("no", "half", environ={})


def test_train_follows_accelerate_mixed_precision(tmp_path, monkeypatch, capsys):
    """The environment beats the preset ('no'), the explicit argument beats the environment."""
    from conftest import run

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    history = run(tmp_path / "env", max_steps=1)
    assert history["precision"] == "bf16"
    assert "ACCELERATE_MIXED_PRECISION" in history["precision_reason"]
    assert "precision: bf16 ('bf16' from accelerate" in capsys.readouterr().out
    from conftest import MODEL, TRAIN, rows

    config = TRAIN.replace(output_dir=str(tmp_path / "cli"), max_steps=1)
    history = lowvram.train.train(MODEL, config, train_data=rows(8), val_data=rows(4, seed=1),
                                  progress=False, mixed_precision="no")
    assert history["precision"] == "no"
    assert "from --mixed-precision" in capsys.readouterr().out
