import pytest
import torch

from lowvram.exercises import check


def test_check_numbers(capsys):
    assert check("effektiv batch", 4 * 4, 16) is True
    assert capsys.readouterr().out == "✅ effektiv batch: 16\n"
    assert check("effektiv batch", 12, 16) is False
    assert capsys.readouterr().out == "❌ effektiv batch: sizin cavab 12, gözlənilən 16\n"


def test_check_tolerance_and_tensors(capsys):
    assert check("lr", 3e-4 * (1 + 1e-9), 3e-4, rtol=1e-6)
    assert not check("lr", 3.1e-4, 3e-4, rtol=1e-6)
    assert check("grad", torch.tensor([1.0, 2.0]), [1.0, 2.0 + 1e-8], atol=1e-6)
    assert not check("grad", torch.tensor([1.0, 2.0]), [1.0, 2.0, 3.0])
    out = capsys.readouterr().out.splitlines()
    assert [line[0] for line in out] == ["✅", "❌", "✅", "❌"]


def test_check_other_values_and_bad_tolerance(capsys):
    assert check("söz", "fp16", "fp16")
    assert not check("söz", "bf16", "fp16")
    with pytest.raises(ValueError, match="atol and rtol"):
        check("x", 1, 1, atol=-1)
