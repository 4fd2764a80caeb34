"""The command line of :mod:`lowvram.memory` (``python -m lowvram.memory --help``).

Layer 11, the top of the package: it imports the layers below, never the package's face. The
options are the train command line's spellings (``--per-device-train-batch-size``,
``--gradient-accumulation-steps``, ``--mixed-precision``, ...); the older ``--micro-batch``,
``--precision``, ``--tie`` and ``--checkpointing`` stay as aliases.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from lowvram.config import OPTIMIZERS, PRECISIONS, get_preset
from lowvram.memory.measure import measure_step
from lowvram.memory.plan import ablation, plan
from lowvram.memory.report import (
    ADAMW_IMPLS,
    MAX_MICRO_BATCH,
    TARGETS,
    Recipe,
    check_card,
    reserve_bytes,
    usable_bytes,
)
from lowvram.memory.show import _mib, ablation_table, format_report, plan_table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lowvram.memory",
        description="Measure the GPU memory of one training step (on CPU) and check it fits a card.",
    )
    p.add_argument("--preset", default="rtx2050", help="model preset from lowvram.config (default rtx2050)")
    p.add_argument("--per-device-train-batch-size", "--micro-batch", type=int, default=None, dest="micro_batch", help="sequences per micro-batch (default: the preset's)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=None, help="micro-batches per optimizer step (default: the preset's, 4 for rtx2050)")
    p.add_argument("--mixed-precision", "--precision", choices=PRECISIONS, default=None, dest="precision", help="autocast precision (default: the preset's mixed_precision; no = fp32)")
    p.add_argument("--gradient-checkpointing", "--checkpointing", action="store_true", dest="gradient_checkpointing", help="gradient checkpointing of every block")
    p.add_argument("--tie-embeddings", "--tie", action="store_true", dest="tie_embeddings", help="tie the lm head to the token embedding")
    p.add_argument("--loss-chunk-size", type=int, default=None, help="chunked lm head + loss over this many tokens (default: the preset's, 0 = off)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="adamw or adamw8bit (default: the preset's)")
    p.add_argument("--adamw-impl", choices=ADAMW_IMPLS, default="foreach", help="torch AdamW kernel (default foreach, CUDA's default)")
    p.add_argument("--target", choices=TARGETS, default="cuda", help="predict a CUDA GPU (default) or report the CPU allocator")
    p.add_argument("--card-gib", type=float, default=4.0, help="the card's memory in GiB (default 4)")
    p.add_argument("--plan", action="store_true", help="also print the planner's table (exact effective batch)")
    p.add_argument("--ablation", action="store_true", help="also print the ablation table")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--verify-gpu", action="store_true", help="run the real train() on CUDA for 2 steps under a --card-gib cap; print its peaks next to the prediction")
    return p


def run(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        model_cfg, train_cfg = get_preset(args.preset)
    except ValueError as err:
        parser.error(str(err))
    micro = args.micro_batch if args.micro_batch is not None else train_cfg.per_device_train_batch_size
    if not 1 <= micro <= MAX_MICRO_BATCH:
        parser.error(
            f"--micro-batch {micro} is not allowed: give a number of sequences in [1, {MAX_MICRO_BATCH}]"
        )
    try:
        check_card(args.card_gib)
    except ValueError:
        parser.error(
            f"--card-gib {args.card_gib:g} is not allowed: give the card's memory in GiB "
            "(0 < GiB <= 4096), e.g. 4"
        )
    accumulation = (args.gradient_accumulation_steps if args.gradient_accumulation_steps is not None
                    else train_cfg.gradient_accumulation_steps)  # fmt: skip
    if not 1 <= accumulation <= MAX_MICRO_BATCH:
        parser.error(f"--gradient-accumulation-steps {accumulation} is not allowed: give micro-batches "
                     f"per optimizer step in [1, {MAX_MICRO_BATCH}], e.g. 4")
    chunk = args.loss_chunk_size if args.loss_chunk_size is not None else model_cfg.loss_chunk_size
    if not 0 <= chunk <= MAX_MICRO_BATCH * model_cfg.block_size:
        parser.error(f"--loss-chunk-size {chunk} is not allowed: give tokens per chunk (0 = off)")
    recipe = Recipe(
        "command line",
        precision=args.precision or train_cfg.mixed_precision,  # the preset's: rtx2050 is fp16
        optimizer=args.optimizer or train_cfg.optimizer,
        adamw_impl=args.adamw_impl,
        tie_embeddings=args.tie_embeddings or None,
        gradient_checkpointing=args.gradient_checkpointing or None,
        loss_chunk_size=chunk,
    )
    if args.verify_gpu:  # the real train() under a card-sized cap (lowvram/verify/)
        from lowvram.verify.cli import verify_cli

        return verify_cli(model_cfg, train_cfg, recipe, micro_batch=micro, card_gib=args.card_gib,
                          gradient_accumulation_steps=accumulation, as_json=args.json)
    target_batch = train_cfg.effective_batch_size
    # the plan first: its recorded steps then give this step by a replay (milliseconds)
    rows = plan(model_cfg, args.card_gib, target_batch, largest=True) if args.plan else []
    report = measure_step(model_cfg, micro, recipe, gradient_accumulation_steps=accumulation,
                          target=args.target)
    steps = (ablation(model_cfg, micro, args.card_gib, gradient_accumulation_steps=accumulation)
             if args.ablation else [])  # fmt: skip
    if args.json:
        out = report.to_dict()
        out["card_gib"] = args.card_gib
        out["usable_bytes"] = usable_bytes(args.card_gib)
        out["fits"] = report.fits(args.card_gib)
        if args.plan:
            out["plan"] = [
                {"recipe": r.recipe.name, "micro_batch": r.micro_batch, "accumulation": r.accumulation,
                 "gradient_accumulation_steps": r.accumulation,
                 "effective_batch": r.effective_batch, "largest_micro_batch": r.largest_micro_batch,
                 "total_bytes": r.report.total_bytes if r.report else None,
                 "needed_bytes": r.report.needed_bytes if r.report else None,
                 "train_command": r.train_command(args.preset) if r.report else None}
                for r in rows
            ]
        if args.ablation:
            out["ablation"] = [
                {"step": r.name, "peak_bytes": r.report.peak_bytes, "total_bytes": r.report.total_bytes,
                 "needed_bytes": r.report.needed_bytes, "fits": r.report.fits(args.card_gib)}
                for r in steps
            ]
        print(json.dumps(out, indent=2))
        return 0
    print(format_report(report, args.card_gib))
    if args.plan:
        usable = usable_bytes(args.card_gib)
        print(f"\nPlans for effective batch exactly {target_batch} on {args.card_gib:g} GiB: the "
              f"largest micro-batch that divides it and keeps Needed (what the run needs under "
              f"a cap, CUDA context included) <= {_mib(usable)} MiB "
              f"({_mib(reserve_bytes(args.card_gib))} MiB kept free), each micro-batch measured "
              "with its own accumulation. Total: what an uncapped run (a big GPU) reserves, plus "
              "the context. "
              "'Largest that fits': the largest micro-batch under that limit, exact or not.")
        print(plan_table(rows))
        print("\nTo train a row as planned:")
        for r in rows:
            if r.report is not None:
                print(f"  {r.recipe.name}: {r.train_command(args.preset)}")
    if args.ablation:
        print(f"\nAblation at micro-batch {micro} x accumulation {accumulation}:")
        print(ablation_table(steps, args.card_gib))
    return 0

