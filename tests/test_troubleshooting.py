"""What notebooks/25_5_problemler.ipynb relies on: each problem is triggered the way the notebook
triggers it, and the parts of the messages that it prints stay as it prints them."""

import os
import warnings
from unittest import mock

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from lowvram.config import get_preset
from lowvram.environment import cpu_build_on_gpu_machine, notebook_launcher_problem
from lowvram.model import GPTModel
from lowvram.train import NonFiniteLossError, main, train

MODEL, TRAIN = get_preset("tiny")


def _rows(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, MODEL.vocab_size, (n, MODEL.block_size + 1), generator=gen)


def test_a_poisoned_weight_stops_training_at_the_first_step(tmp_path):
    def poison(module, args):
        if isinstance(module, GPTModel) and module.training:
            with torch.no_grad():
                next(module.parameters())[0, 0] = float("inf")

    config = TRAIN.replace(max_steps=4, output_dir=str(tmp_path / "nan"))
    hook = register_module_forward_pre_hook(poison)
    try:
        with pytest.raises(NonFiniteLossError) as info:
            train(MODEL, config, train_data=_rows(64, 0), val_data=_rows(8, 1), progress=False)
    finally:
        hook.remove()
    stopped, causes = str(info.value).split(" Likely causes: ")  # the notebook splits here
    assert (
        stopped.split(". ")[0] == "training stopped at optimizer step 1 (epoch 0): the loss is nan"
    )
    assert causes.startswith("(1) the learning rate is too high")
    # without the hook the same run finishes (the notebook's "the fix works" cell)
    history = train(MODEL, config, train_data=_rows(64, 0), val_data=_rows(8, 1), progress=False,
                    overwrite_output_dir=True)  # the stopped run's files are replaced
    assert len(history["steps"]) == 4 and torch.isfinite(torch.tensor(history["final_val_loss"]))


def test_cli_warns_before_it_loads_data_when_launched_with_cpu(tmp_path):
    with (
        mock.patch.dict(os.environ, {"MASTER_ADDR": "127.0.0.1"}),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as info:
            main(["--preset", "cpu-demo", "--data-dir", str(tmp_path / "none"), "--no-progress"])
    assert info.value.code == 2  # no data there: main stops after warning
    assert [w.category for w in caught] == [UserWarning]
    assert "accelerate launch --multi_gpu --num_processes 2" in str(caught[0].message)


def test_the_faked_environments_of_the_notebook():
    with (
        mock.patch("shutil.which", return_value="nvidia-smi"),
        mock.patch.object(torch.version, "cuda", None),
    ):
        assert "is a CPU build" in cpu_build_on_gpu_machine()
    with mock.patch("sys.platform", "win32"):
        assert notebook_launcher_problem(2).startswith("skipped: notebook_launcher needs fork()")
