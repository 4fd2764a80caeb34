import dataclasses

import pytest

from lowvram.config import PRESETS, ModelConfig, TrainConfig, config_table, get_preset


def test_rtx2050_is_exactly_the_seed():
    model, train = get_preset("rtx2050")
    assert (model.vocab_size, model.block_size, model.n_layer, model.n_head, model.n_embd) == (
        32000,
        256,
        12,
        12,
        768,
    )
    assert train.mixed_precision == "fp16"
    assert train.gradient_accumulation_steps == 4
    assert train.per_device_train_batch_size == 4
    assert train.effective_batch_size == 16
    assert train.max_lr == 3e-4
    assert train.num_epochs == 10
    assert train.max_steps is None
    assert train.warmup_ratio == 0.1  # the seed's total_steps // 10
    assert train.max_grad_norm == 1.0


def test_adamw_impl_defaults_to_torchs_choice_and_is_validated():
    from lowvram.config import ADAMW_IMPLS

    assert TrainConfig().adamw_impl is None  # torch's default for the device
    assert ADAMW_IMPLS == ("foreach", "fused", "loop")
    for impl in ADAMW_IMPLS:
        assert TrainConfig(adamw_impl=impl).adamw_impl == impl
    with pytest.raises(ValueError, match=r"adamw_impl='fast' is not allowed: adamw_impl must be "
                                         r"None .* 'foreach', 'fused', 'loop'"):
        TrainConfig(adamw_impl="fast")
    # the 8-bit optimizer is bitsandbytes' own kernel: a torch kernel there would be ignored
    with pytest.raises(ValueError, match=r"adamw_impl='fused' is not allowed: .* None \(unset\) "
                                         r"with optimizer='adamw8bit'"):
        TrainConfig(optimizer="adamw8bit", adamw_impl="fused")
    assert TrainConfig(optimizer="adamw8bit").adamw_impl is None


def test_effective_batch_is_derived_not_stored():
    train = TrainConfig(per_device_train_batch_size=3, gradient_accumulation_steps=5)
    assert "effective_batch_size" not in {f.name for f in dataclasses.fields(TrainConfig)}
    assert train.effective_batch_size == 15
    assert train.effective_batch_for(2) == 30
    assert train.replace(gradient_accumulation_steps=2).effective_batch_size == 6


def test_presets_are_reachable_by_name_and_valid():
    assert set(PRESETS) == {"rtx2050", "cpu-demo", "tiny"}
    for name in PRESETS:
        assert get_preset(name) is PRESETS[name]
        assert get_preset(name)[1].output_dir == f"runs/{name}"  # each preset's runs go to a dir of its own
    with pytest.raises(ValueError, match=r"preset='nope'.*cpu-demo, rtx2050, tiny"):
        get_preset("nope")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("per_device_train_batch_size", 0, "positive integer"),
        ("per_device_train_batch_size", -4, "positive integer"),
        ("per_device_train_batch_size", 2.5, "positive integer"),
        ("gradient_accumulation_steps", 0, "positive integer"),
        ("num_epochs", 0, "positive integer"),
        ("max_steps", 0, "positive integer"),
        ("max_lr", 0.0, "(0, 1)"),
        ("max_lr", -3e-4, "(0, 1)"),
        ("max_lr", float("nan"), "(0, 1)"),
        ("mixed_precision", "fp8", "'no', 'fp16', 'bf16'"),
        ("mixed_precision", "FP16", "'no', 'fp16', 'bf16'"),
        ("warmup_ratio", 1.0, "warmup must be shorter than training"),
        ("warmup_ratio", -0.1, "warmup must be shorter than training"),
        ("max_grad_norm", 0, "positive number"),
        ("weight_decay", -1, ">= 0"),
        ("eval_interval", -1, ">= 0"),
        ("output_dir", "", "non-empty path"),
    ],
)
def test_bad_train_values_name_field_value_and_allowed(field, value, words):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{field: value})
    message = str(err.value)
    assert message.startswith(f"{field}={value!r}")
    assert words in message


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"n_embd": 100, "n_head": 12}, "n_embd=100 is not allowed: n_embd must be divisible by n_head=12"),
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"block_size": -1}, "block_size=-1"),
        ({"n_layer": True}, "n_layer=True"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"bias": "yes"}, "bias='yes'"),
    ],
)
def test_bad_model_values(changes, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**changes)


def test_model_config_head_size_is_what_the_attention_uses():
    from lowvram.model import GPTModel

    config = ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=4, n_embd=32)
    assert ModelConfig().head_size == 768 // 12 == 64
    assert GPTModel(config).blocks[0].attn.head_size == config.head_size == 8


def test_config_table_has_seed_columns_and_values():
    table = config_table(*get_preset("rtx2050"))
    lines = table.splitlines()
    assert lines[0] == "| Parametr | Dəyər | Məntiqi Əsas |"
    assert '| **`mixed_precision`** | `"fp16"` |' in table
    assert "| **`gradient_accumulation_steps`** | `4` |" in table
    assert "| **`per_device_train_batch_size`** | `4` |" in table
    assert "| **Effektiv Batch Size** | `16` (4 * 4) |" in table
    assert "`32` (4 * 4 * 2)" in config_table(*get_preset("rtx2050"), num_processes=2)
    # every row carries a reason
    assert all(row.count("|") == 4 and row.split("|")[3].strip() for row in lines[2:])


def test_config_table_shows_its_text_to_nbval():
    # nbval compares text/plain: the table's own text must be there, not an object repr
    table = config_table(*get_preset("rtx2050"))
    assert repr(table) == str(table)
    assert table._repr_markdown_() == str(table)


def test_a_negative_seed_is_refused_without_a_false_promise():
    # before: --seed -1 said "0 turns it off"
    with pytest.raises(ValueError, match=r"seed=-1 is not allowed: seed must be an integer >= 0 "
                                         r"\(the RNG seed") as info:
        TrainConfig(seed=-1)
    assert "turns it off" not in str(info.value)
