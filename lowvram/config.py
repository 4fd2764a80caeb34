"""The lesson's 25.2 configuration table as code.

Two frozen dataclasses, validated at construction, and named presets::

    from lowvram.config import get_preset, config_table
    model_cfg, train_cfg = get_preset("rtx2050")
    print(train_cfg.effective_batch_size)      # 16 = 4 x 4
    print(config_table(model_cfg, train_cfg))  # Parametr | Dəyər | Məntiqi Əsas

Derived values (the effective batch) are properties, never stored fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lowvram._display import MarkdownTable

__all__ = [
    "ADAMW_IMPLS",
    "OPTIMIZERS",
    "PRECISIONS",
    "PRESETS",
    "ModelConfig",
    "TrainConfig",
    "check_positive_int",
    "config_table",
    "get_preset",
]

PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")  # torch's AdamW; bitsandbytes' 8-bit AdamW (lowvram.optim)
# torch.optim.AdamW's kernels: foreach=True (CUDA's default: one launch per step for all
# parameters, plus a temporary as large as them), fused=True (one kernel, no temporary), and
# foreach=False (a Python loop over the parameters, the CPU's default). Same update, same state.
ADAMW_IMPLS = ("foreach", "fused", "loop")


def _require(ok: bool, field: str, value: object, allowed: str) -> None:
    """Raise a ValueError naming the field, the value and what is allowed."""
    if not ok:
        raise ValueError(f"{field}={value!r} is not allowed: {field} must be {allowed}")


def check_positive_int(field: str, value: object) -> None:
    """The one positive-integer check: a ValueError naming ``field``, its value and what is allowed."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    _require(ok, field, value, "a positive integer (>= 1)")


def _non_negative_int(field: str, value: object) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    _require(ok, field, value, "an integer >= 0 (0 turns it off)")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the course's Day-17 GPT."""

    vocab_size: int = 32000  # the lesson's GPTModel(vocab_size=32000, ...)
    block_size: int = 256  # the lesson's BLOCK_SIZE: tokens of context
    n_layer: int = 12  # GPT-2 small depth, as in the seed
    n_head: int = 12
    n_embd: int = 768  # 768 / 12 heads = 64 dims per head
    dropout: float = 0.0  # 0 keeps micro-batching exactly equal to a big batch; raise it to regularise
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2
    tie_embeddings: bool = False  # the Day-17 model has its own lm head; tying saves vocab x n_embd params
    gradient_checkpointing: bool = False  # recompute blocks in backward: less activation memory, ~30% more compute
    loss_chunk_size: int = 0  # >0: lm head + loss over this many tokens at a time, recomputed in backward: no full logits

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_positive_int(name, getattr(self, name))
        _require(
            self.n_embd % self.n_head == 0,
            "n_embd",
            self.n_embd,
            f"divisible by n_head={self.n_head} (each head gets n_embd // n_head dims)",
        )
        _require(
            _number(self.dropout) and 0.0 <= self.dropout < 1.0,
            "dropout",
            self.dropout,
            "a number in [0, 1)",
        )
        for name in ("bias", "tie_embeddings", "gradient_checkpointing"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        _non_negative_int("loss_chunk_size", self.loss_chunk_size)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class TrainConfig:
    """The training loop's settings (the lesson's constants plus what a real run needs).

    Steps (``max_steps``, ``eval_interval``, ``checkpoint_interval``, ``log_interval``) are
    optimizer steps, i.e. one step per ``gradient_accumulation_steps`` micro-batches.
    """

    mixed_precision: str = "fp16"  # the lesson's choice for a 4 GB card
    gradient_accumulation_steps: int = 4  # 4 micro-batches per optimizer step
    per_device_train_batch_size: int = 4  # the lesson's BATCH_SIZE: what fits next to the weights
    per_device_eval_batch_size: int = 4
    max_lr: float = 3e-4  # the lesson's MAX_LR, a common AdamW peak for GPT-2-sized models
    num_epochs: int = 10  # the lesson's NUM_EPOCHS
    max_steps: int | None = None  # optimizer steps; when set it overrides num_epochs
    warmup_ratio: float = 0.1  # the lesson's total_steps // 10
    max_grad_norm: float = 1.0  # the lesson's clip_grad_norm_(..., 1.0)
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the seed uses
    optimizer: str = "adamw"  # the lesson's torch.optim.AdamW; "adamw8bit": 2 bytes of state per parameter, not 8
    adamw_impl: str | None = None  # None: torch's default for the device (foreach on CUDA, loop on CPU)
    eval_interval: int = 0  # evaluate every N optimizer steps (0: only at epoch ends and the end)
    eval_max_batches: int | None = None  # cap validation batches (None: the whole val set)
    checkpoint_interval: int = 0  # save_state every N optimizer steps (0: only at epoch ends)
    keep_checkpoints: int = 3  # keep the newest N checkpoints
    log_interval: int = 25  # print every N optimizer steps (the lesson: 100 micro-steps = 25 steps)
    drop_last: bool = True  # a short last window is still divided by the full accumulation: a smaller gradient
    seed: int = 1337
    output_dir: str = "runs/rtx2050"
    data_dir: str = "data"

    def __post_init__(self) -> None:
        _require(
            self.mixed_precision in PRECISIONS,
            "mixed_precision",
            self.mixed_precision,
            f"one of {', '.join(repr(p) for p in PRECISIONS)}",
        )
        for name in (
            "gradient_accumulation_steps",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "num_epochs",
            "log_interval",
            "keep_checkpoints",
        ):
            check_positive_int(name, getattr(self, name))
        for name in ("max_steps", "eval_max_batches"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        for name in ("eval_interval", "checkpoint_interval"):
            _non_negative_int(name, getattr(self, name))
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
                 "seed", self.seed, "an integer >= 0 (the RNG seed of the init and data order)")
        _require(
            _number(self.max_lr) and 0.0 < self.max_lr < 1.0,
            "max_lr",
            self.max_lr,
            "a number in (0, 1), e.g. 3e-4",
        )
        _require(
            _number(self.warmup_ratio) and 0.0 <= self.warmup_ratio < 1.0,
            "warmup_ratio",
            self.warmup_ratio,
            "a number in [0, 1): warmup must be shorter than training",
        )
        _require(
            _number(self.max_grad_norm) and self.max_grad_norm > 0,
            "max_grad_norm",
            self.max_grad_norm,
            "a positive number, e.g. 1.0",
        )
        _require(
            _number(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            self.weight_decay,
            "a number >= 0",
        )
        _require(
            self.optimizer in OPTIMIZERS,
            "optimizer",
            self.optimizer,
            f"one of {', '.join(repr(o) for o in OPTIMIZERS)}",
        )
        if self.adamw_impl is not None:
            _require(
                self.adamw_impl in ADAMW_IMPLS,
                "adamw_impl",
                self.adamw_impl,
                f"None (torch's default for the device) or one of "
                f"{', '.join(repr(i) for i in ADAMW_IMPLS)}",
            )
            _require(
                self.optimizer == "adamw",
                "adamw_impl",
                self.adamw_impl,
                f"None (unset) with optimizer={self.optimizer!r} (it picks torch.optim.AdamW's kernel; "
                "bitsandbytes' AdamW8bit has its own)",
            )
        _require(isinstance(self.drop_last, bool), "drop_last", self.drop_last, "True or False")
        for name in ("output_dir", "data_dir"):
            value = getattr(self, name)
            _require(isinstance(value, str) and value != "", name, value, "a non-empty path")

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step in one process: per-device batch x accumulation."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def effective_batch_for(self, num_processes: int) -> int:
        """Sequences per optimizer step across ``num_processes`` data-parallel processes."""
        check_positive_int("num_processes", num_processes)
        return self.effective_batch_size * num_processes

    def replace(self, **changes: object) -> TrainConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # Exactly the lesson's values: GPT-2-small shape, 4 x 4 micro-batching, fp16.
    "rtx2050": (
        ModelConfig(vocab_size=32000, block_size=256, n_layer=12, n_head=12, n_embd=768),
        TrainConfig(output_dir="runs/rtx2050"),
    ),
    # Learns visibly in about a minute on 2 CPU cores: a 4 x 128 model on a 2048-token BPE.
    # fp16 would be ignored on a CPU (see lowvram.train), so ask for what runs: fp32.
    "cpu-demo": (
        ModelConfig(vocab_size=2048, block_size=64, n_layer=4, n_head=4, n_embd=128),
        TrainConfig(
            mixed_precision="no",
            max_lr=2e-3,  # small models tolerate (and need) a larger LR for a short run
            num_epochs=1,
            max_steps=200,
            warmup_ratio=0.05,
            eval_interval=50,
            eval_max_batches=20,
            log_interval=25,
            output_dir="runs/cpu-demo",
        ),
    ),
    # For tests: milliseconds per step.
    "tiny": (
        ModelConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32),
        TrainConfig(
            mixed_precision="no",
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            per_device_eval_batch_size=4,
            max_lr=1e-3,
            num_epochs=1,
            log_interval=1,
            output_dir="runs/tiny",
        ),
    ),
}


def get_preset(name: str) -> tuple[ModelConfig, TrainConfig]:
    """Return the (ModelConfig, TrainConfig) pair called ``name``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"preset={name!r} is unknown: preset must be one of {', '.join(sorted(PRESETS))}"
        ) from None


# The reason column of the lesson's table, one per parameter (Azerbaijani, as in the course).
_REASONS = {
    "mixed_precision": "16-bit dəqiqlik aktivasiyaları kiçildir; çəkilər, qradiyentlər və Adam "
    "vəziyyəti fp32 qalır (`25_2` dəftərinin CUDA proqnozuna baxın).",
    "gradient_accumulation_steps": "Effektiv batch-i böyütmək: qradiyentlər bu qədər "
    "mikro-addımda yığılır, sonra çəkilər bir dəfə yenilənir.",
    "per_device_train_batch_size": "Bir mikro-batch-da neçə sıra var: aktivasiya yaddaşı "
    "bununla düz mütənasib böyüyür.",
    "effective_batch_size": "Bir optimizator addımının gördüyü sıralar: "
    "cihaz başına batch x yığım addımları x proseslər.",
    "max_lr": "İsinmədən (warmup) sonra çatılan ən yüksək öyrənmə sürəti; sonra xətti azalır.",
    "block_size": "Kontekst uzunluğu (token): aktivasiya yaddaşı bununla böyüyür.",
    "model": "Qatlar x başlar x embedding ölçüsü: parametr sayını və yaddaşı müəyyən edir.",
}


def config_table(
    model: ModelConfig, train: TrainConfig, num_processes: int = 1
) -> MarkdownTable:
    """Render the configuration as the lesson's Markdown table (Parametr | Dəyər | Məntiqi Əsas)."""
    per_device = train.per_device_train_batch_size
    accum = train.gradient_accumulation_steps
    effective = train.effective_batch_for(num_processes)
    product = f"{per_device} * {accum}" + (f" * {num_processes}" if num_processes > 1 else "")
    rows = [
        ("**`mixed_precision`**", f'`"{train.mixed_precision}"`', _REASONS["mixed_precision"]),
        (
            "**`gradient_accumulation_steps`**",
            f"`{accum}`",
            _REASONS["gradient_accumulation_steps"],
        ),
        (
            "**`per_device_train_batch_size`**",
            f"`{per_device}`",
            _REASONS["per_device_train_batch_size"],
        ),
        ("**Effektiv Batch Size**", f"`{effective}` ({product})", _REASONS["effective_batch_size"]),
        ("**`max_lr`**", f"`{train.max_lr:g}`", _REASONS["max_lr"]),
        ("**`block_size`**", f"`{model.block_size}`", _REASONS["block_size"]),
        (
            "**Model**",
            f"`{model.n_layer} x {model.n_head} x {model.n_embd}`, vocab `{model.vocab_size}`",
            _REASONS["model"],
        ),
    ]
    lines = ["| Parametr | Dəyər | Məntiqi Əsas |", "| :--- | :--- | :--- |"]
    lines += [f"| {p} | {v} | {r} |" for p, v, r in rows]
    return MarkdownTable("\n".join(lines))
