"""The printing and the command line of :mod:`lowvram.verify` (``python -m lowvram.verify
--help``): one result as ``--verify-gpu`` prints it, the plan rows as a table, ``verify_cli``
(the memory CLI's ``--verify-gpu``) and ``main``.

The top of the package: it imports :mod:`lowvram.verify.check` and the memory planner's
``report`` submodule; ``lowvram.memory.cli`` imports it, nothing here imports that.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from lowvram.config import OPTIMIZERS, PRECISIONS, ModelConfig, TrainConfig, get_preset
from lowvram.verify.check import (
    PLAN_TOLERANCE,
    MiB,
    _adamw_impl,
    _mib,
    _no_cuda_message,
    configs_for,
    verify_plan,
    verify_training,
)

__all__ = ["format_plan_table", "format_result", "main", "verify_cli"]


def format_result(r: dict[str, Any]) -> str:
    """The lines ``--verify-gpu`` prints for one :func:`verify_training` result."""
    settings = (f"{r['precision']}, micro-batch {r['micro_batch']} x accumulation "
                f"{r['gradient_accumulation_steps']}, {r['optimizer']}"
                + (f" ({r['adamw_impl']})" if r["adamw_impl"] else "")
                + (", tied" if r["tie_embeddings"] else "")
                + (", checkpointing" if r["gradient_checkpointing"] else "")
                + (f", loss chunks of {r['loss_chunk_size']}" if r["loss_chunk_size"] else ""))
    card = (f"the whole GPU ({_mib(r['card_bytes'])} MiB; it is smaller than {r['card_gib']:g} GiB)"
            if r["card_is_the_gpu"] else f"a {r['card_gib']:g} GiB card")
    lines = [
        f"GPU: {r['device']} (compute capability {r['capability'][0]}.{r['capability'][1]}), "
        f"{_mib(r['gpu_total_bytes'])} MiB",
        f"run: the real lowvram.train.train(), {r['steps']} optimizer steps on random rows: {settings}",
        f"card: {card}; outside the allocator (CUDA context, library handles, other programs): "
        f"{_mib(r['context_bytes'])} MiB{'' if r['context_bytes'] == r['context_measured_bytes'] else ' (given)'}"
        f", measured {_mib(r['context_measured_bytes'])} MiB before the run and "
        f"{_mib(r['context_after_bytes'])} MiB after it; allocator capped at {_mib(r['cap_bytes'])} MiB",
    ]
    for what in ("allocated", "reserved"):
        pred, meas = r[f"predicted_{what}_bytes"], r[f"measured_{what}_bytes"]
        lines.append(f"max_memory_{what}: predicted {_mib(pred)} MiB, measured {_mib(meas)} MiB "
                     f"({r[f'{what}_error']:+.1%})")
    capped = r.get("predicted_capped_reserved_bytes")
    if capped is not None:  # results from before the planner judged on it lack it
        lines.append(
            f"under a cap: the planner's run needs {_mib(capped)} MiB reserved (the smallest cap "
            f"it fits under; the uncapped peak above can be larger): predicted to "
            + ("run" if r["predicted_runs_under_cap"] else "run out of memory")
            + f" under this cap of {_mib(r['cap_bytes'])} MiB; the plan says it "
            + ("fits" if r["predicted_fits"] else "does not fit")
            + f" a {r['card_gib']:g} GiB card with its headroom")
    if not r["accumulation_modelled"]:
        lines.append("note: this planner predicts one micro-batch; it does not model the "
                     "accumulation")
    if r["fits"]:
        need = r["measured_reserved_bytes"] + r["context_after_bytes"]
        lines.append(f"result: fits ({len(r['losses'])} steps, losses "
                     + ", ".join(f"{x:.4f}" for x in r["losses"]) + f"); the card needs "
                     f"{_mib(need)} of {_mib(r['card_bytes'])} MiB (reserved peak + outside the "
                     "allocator after the run)"
                     + ("; that is more than the card: on the card itself it may run out of "
                        "memory" if need > r["card_bytes"] else ""))
    else:
        lines.append(f"result: ran out of memory ({r['error']})")
    return "\n".join(lines)


def format_plan_table(results: list[dict[str, Any]], tolerance: float = PLAN_TOLERANCE) -> str:
    """The plan rows of :func:`verify_plan` as a Markdown table."""
    lines = ["| recipe | micro x accum | predicted alloc MiB | measured alloc MiB | error | "
             "predicted reserved MiB | measured reserved MiB | predicted need under a cap MiB | "
             "outcome | passed |",
             "| :--- | :---: | ---: | ---: | ---: | ---: | ---: | ---: | :--- | :--- |"]
    for r in results:
        shape = f"{r['micro_batch']} x {r['gradient_accumulation_steps']}"
        if "measured_allocated_bytes" not in r:  # not run, or failed before a measurement
            verdict = "-" if r["passed"] is None else "**NO**"
            lines.append(f"| {r['recipe']} | {shape} | | | | | | | {r['note']} | {verdict} |")
            continue
        verdict = "yes" if r["passed"] else f"**NO**: {r['note']}"
        lines.append(
            f"| {r['recipe']} | {shape} | {_mib(r['predicted_allocated_bytes'])} | "
            f"{_mib(r['measured_allocated_bytes'])} | {r['allocated_error']:+.1%} | "
            f"{_mib(r['predicted_reserved_bytes'])} | {_mib(r['measured_reserved_bytes'])} | "
            f"{_mib(capped) if (capped := r.get('predicted_capped_reserved_bytes')) else ''} | "
            f"{r['outcome']} | {verdict} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def verify_cli(model_config: ModelConfig, train_config: TrainConfig, recipe: Any = None, *,
               micro_batch: int | None = None, gradient_accumulation_steps: int | None = None,
               card_gib: float = 4.0, steps: int = 2, context_bytes: int | None = None,
               as_json: bool = False) -> int:
    """What ``python -m lowvram.memory --verify-gpu`` (and ``python -m lowvram.verify``) runs:
    verify ``recipe`` (a ``lowvram.memory.Recipe``; None: the configs as they are) at this
    micro-batch and accumulation (None: the train config's) and print the result. Returns the
    exit status: 0 fits, 1 ran out of memory, 2 no CUDA GPU."""
    from lowvram import environment

    # why a GPU goes unused: a CPU build of torch, or (h18cli's check, where merged) a CUDA build
    # on a driver too old for it
    unused = getattr(environment, "gpu_left_unused", environment.cpu_build_on_gpu_machine)
    problem = unused()
    if problem:
        print(problem, file=sys.stderr)
    if not torch.cuda.is_available():
        print(f"error: {_no_cuda_message()}", file=sys.stderr)
        return 2
    micro = micro_batch or train_config.per_device_train_batch_size
    accumulation = gradient_accumulation_steps or train_config.gradient_accumulation_steps
    if recipe is None:
        train_config = train_config.replace(per_device_train_batch_size=micro,
                                            gradient_accumulation_steps=accumulation)
    else:
        try:
            model_config, train_config = configs_for(model_config, train_config, recipe, micro,
                                                     accumulation)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    result = verify_training(model_config, train_config, card_gib=card_gib, steps=steps,
                             context_bytes=context_bytes)
    print(json.dumps(result, indent=2) if as_json else format_result(result))
    return 0 if result["fits"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lowvram.verify --preset NAME [train options] [--card-gib G] [--plan]``.

    The train options are ``python -m lowvram.train``'s, so a plan row's train command verifies
    as printed with ``lowvram.train`` replaced by ``lowvram.verify``."""
    p = argparse.ArgumentParser(
        prog="python -m lowvram.verify",
        description="Run the real train() on CUDA under a card-sized memory cap and hold its "
                    "peaks against lowvram.memory's prediction.",
    )
    p.add_argument("--preset", default="rtx2050", help="default: %(default)s")
    p.add_argument("--per-device-train-batch-size", "--micro-batch", type=int, dest="micro_batch")
    p.add_argument("--gradient-accumulation-steps", type=int)
    p.add_argument("--mixed-precision", "--precision", choices=PRECISIONS, dest="precision")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--adamw-impl", choices=("foreach", "fused", "loop"))
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--loss-chunk-size", type=int)
    p.add_argument("--card-gib", type=float, default=4.0, help="the card to emulate (default 4)")
    p.add_argument("--context-mib", type=float,
                   help="memory outside the allocator, MiB (default: measured here)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (default 2)")
    p.add_argument("--plan", action="store_true",
                   help="verify every row of the plan for an effective batch of 16 that fits")
    p.add_argument("--json", action="store_true", help="JSON instead of text")
    args = p.parse_args(argv)
    from lowvram.memory.report import Recipe

    try:
        model_cfg, train_cfg = get_preset(args.preset)
        context = None if args.context_mib is None else int(args.context_mib * MiB)
        if args.plan:
            if not torch.cuda.is_available():
                print(f"error: {_no_cuda_message()}", file=sys.stderr)
                return 2
            results = verify_plan(model_cfg, train_cfg, card_gib=args.card_gib, steps=args.steps,
                                  context_bytes=context)
            print(json.dumps(results, indent=2) if args.json else format_plan_table(results))
            return 0 if all(r["passed"] is not False for r in results) else 1
        recipe = Recipe(
            "command line", precision=args.precision or train_cfg.mixed_precision,
            optimizer=args.optimizer or train_cfg.optimizer,
            adamw_impl=args.adamw_impl or _adamw_impl(train_cfg),
            tie_embeddings=args.tie_embeddings, gradient_checkpointing=args.gradient_checkpointing,
            loss_chunk_size=args.loss_chunk_size,
        )
        return verify_cli(model_cfg, train_cfg, recipe, micro_batch=args.micro_batch,
                          gradient_accumulation_steps=args.gradient_accumulation_steps,
                          card_gib=args.card_gib, steps=args.steps, context_bytes=context,
                          as_json=args.json)
    except ValueError as err:
        p.error(str(err))
    return 2  # not reached: p.error exits

