"""The course's Day-17 GPT, read top to bottom.

    from lowvram.config import get_preset
    from lowvram.model import GPTModel
    model = GPTModel(get_preset("tiny")[0])
    logits, loss = model(X, Y)          # exactly as the seed calls it

Token + position embeddings, pre-LayerNorm blocks (causal self-attention through
``torch.nn.functional.scaled_dot_product_attention``, then an MLP), a final LayerNorm and a
language-model head, optionally tied to the token embedding.

With ``ModelConfig(loss_chunk_size=N)`` a call with targets computes the head and the loss N
tokens at a time and recomputes each chunk in backward (:func:`chunked_cross_entropy`), so the
full (B, T, vocab) logits never exist: it returns ``(None, loss)``. Without targets (``generate``,
an evaluation that wants logits) the model returns the full logits as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from lowvram.config import ModelConfig

__all__ = ["GPTModel", "chunked_cross_entropy"]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # query, key and value for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.head_size = config.n_head, config.head_size
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        # flash / memory-efficient kernels where available: no (T, T) matrix is kept for backward
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # pre-LayerNorm: normalise, transform, add back
        x = x + self.mlp(self.ln_2(x))
        return x


class GPTModel(nn.Module):
    """A GPT language model: ``forward(idx, targets=None) -> (logits, loss)``.

    ``forward`` checks its input and names what is wrong (shape, dtype, length, token ids out
    of ``[0, vocab_size)``). The token-id range check reads ``idx.min()``/``idx.max()`` on the
    host, which on a GPU waits for it: see :meth:`_range_check_due`. ``lowvram.train.train``
    sets ``check_token_range = False`` on its model, because it checks its rows once when
    they are loaded; a learner's ``model(X)`` keeps the check.
    """

    check_token_range: bool = True  # False: trust the caller's token ids (train() checked them)

    def __init__(self, config: ModelConfig | None = None, **kwargs: object) -> None:
        """Build from a ModelConfig, or from its fields as keywords, as the seed does:
        ``GPTModel(vocab_size=32000, block_size=256, n_layer=12, n_head=12, n_embd=768)``.
        """
        super().__init__()
        if config is None:
            config = ModelConfig(**kwargs)  # type: ignore[arg-type]
        elif kwargs:
            raise TypeError("pass either a ModelConfig or its fields as keywords, not both")
        self.config = config
        self._range_checked_devices: set[torch.device] = set()  # see _range_check_due
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embeddings
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one matrix serves as input and output
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the sum stays O(1)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count; a tied head is counted once. ``non_embedding`` drops position embeddings."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    def _check_input(self, idx: torch.Tensor, name: str) -> None:
        cfg = self.config
        if not isinstance(idx, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dim() != 2:
            raise ValueError(
                f"{name} must have shape (batch, seq_len), got shape {tuple(idx.shape)}; "
                "add a batch dimension with .unsqueeze(0)"
            )
        if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"{name} must hold integer token ids, got dtype {idx.dtype}")
        if idx.numel() == 0:
            raise ValueError(
                f"{name} is empty (shape {tuple(idx.shape)}): it needs at least one sequence of "
                "at least one token"
            )
        if idx.size(1) > cfg.block_size:
            raise ValueError(
                f"{name} has {idx.size(1)} tokens but block_size={cfg.block_size}: "
                f"crop to the last {cfg.block_size} tokens (idx[:, -{cfg.block_size}:])"
            )
        if self._range_check_due(idx) and (idx.min() < 0 or idx.max() >= cfg.vocab_size):
            # out of range, nn.Embedding fails with an IndexError on CPU and a device-side
            # assert on CUDA, which poisons the whole CUDA context
            raise ValueError(
                f"{name} holds token ids in [{int(idx.min())}, {int(idx.max())}] but the model's "
                f"vocab_size={cfg.vocab_size} allows only [0, {cfg.vocab_size - 1}]: was the data "
                "encoded with a tokenizer of another vocabulary size?"
            )

    def _range_check_due(self, idx: torch.Tensor) -> bool:
        """Whether to check ``idx``'s token range now.

        Reading ``idx.min()``/``idx.max()`` of a GPU tensor waits for the GPU (a device-to-host
        sync), which on every micro-step would stall the CUDA queue. The rows a training run
        feeds are already checked on the CPU, where it costs nothing, by
        ``lowvram.data.check_rows``: the data boundary is the guard. Here, CPU tensors are
        always checked (no sync), and a tensor on another device is checked on the model's
        first forward with that device only, which catches the usual mistake (data from a
        tokenizer with another vocabulary size) before the first bad lookup turns into a
        device-side assert. Never while torch.compile traces (a data-dependent branch), and
        never when ``check_token_range`` is False (``train`` sets it: it checked its rows).
        """
        if not self.check_token_range or torch.compiler.is_compiling():
            return False
        if idx.device.type == "cpu":
            return True
        if idx.device in self._range_checked_devices:
            return False
        self._range_checked_devices.add(idx.device)
        return True

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return (logits (B, T, vocab), mean cross-entropy loss or None).

        With ``config.loss_chunk_size`` and targets, the logits are None (they are never built).
        """
        self._check_input(idx, "idx")
        B, T = idx.size()
        if targets is not None:
            self._check_input(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(
                    f"targets has shape {tuple(targets.shape)} but idx has {tuple(idx.shape)}: "
                    "they must match (targets are idx shifted by one token)"
                )
            targets = targets.long()  # cross_entropy wants int64 targets
        x = self._trunk(idx)  # (B, T, C)
        if targets is not None and self.config.loss_chunk_size:
            # no full logits: the head and the loss run chunk by chunk (see chunked_cross_entropy)
            return None, chunked_cross_entropy(
                x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T),
                self.config.loss_chunk_size,
            )
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, T, n_embd) that the lm head reads: everything but the head."""
        self._check_input(idx, "idx")
        return self._trunk(idx)

    def _trunk(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        idx = idx.long()  # nn.Embedding takes int64/int32 only; the check allows any int
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; recompute its inside during backward
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.ln_f(x)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T); returns (B, T + max_new_tokens)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self._check_input(idx[..., -self.config.block_size :], "idx")  # longer prompts are cropped
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # crop the context to block_size
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float() / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def _chunk_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    cross_entropy: Callable[..., torch.Tensor],
) -> torch.Tensor:
    logits = F.linear(hidden, weight)  # (chunk, vocab): the only logits alive at any moment
    return cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    cross_entropy: Callable[..., torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """Mean ``cross_entropy(hidden @ weight.T, targets)`` without the full logits.

    Args:
        hidden: (N, C) final hidden states (after ``ln_f``).
        weight: (vocab, C) the lm head's weight.
        targets: (N,) token ids.
        chunk_size: tokens per chunk; each chunk's (chunk_size, vocab) logits live only inside
            its own forward, and again inside its own backward, which recomputes them
            (``torch.utils.checkpoint``): one extra head matmul per token, instead of keeping
            the logits, their log-softmax and (CUDA autocast) an fp32 copy for the whole step.
        cross_entropy: the loss of one chunk, called with ``reduction="sum"``.

    The same loss and gradients as the plain path (up to the order of fp32 sums), under
    autocast too: checkpoint replays each chunk under the autocast state of its forward.
    Why not a library: Liger-Kernel's fused linear cross-entropy and Apple's cut-cross-entropy
    are Triton kernels, which need a CUDA GPU (a learner's CPU and our CI have none), and
    torchtune's chunked loss still takes the hidden-to-logits projection outside, whole. This is
    the same idea in plain PyTorch, so it runs on CPU and CUDA alike.
    """
    chunks = [
        checkpoint(_chunk_loss, h, weight, t, cross_entropy, use_reentrant=False,
                   preserve_rng_state=False)  # the head has no dropout: no RNG to replay
        for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True)
    ]  # fmt: skip
    return torch.stack(chunks).sum() / targets.numel()
