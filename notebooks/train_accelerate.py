"""The lesson's train_accelerate.py (Gün 25) corrected: its parts, names and calls; each change
says why in a ``# fix:`` comment. lowvram gives the model, the data rows and the presets.

    accelerate launch train_accelerate.py                        # the lesson's run: rtx2050, fp16
    accelerate launch --multi_gpu --num_processes 2 train_accelerate.py --preset cpu-demo
"""

import argparse
import math

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import get_linear_schedule_with_warmup

from lowvram.config import get_preset
from lowvram.data import load_datasets
from lowvram.model import GPTModel
from lowvram.precision import requested_precision, resolve_precision


def training_function(args):
    # 1. Konfiqurasiya (fix: from a preset; rtx2050 holds exactly the lesson's values)
    model_cfg, cfg = get_preset(args.preset)
    BATCH_SIZE = cfg.per_device_train_batch_size  # Per-device batch size
    GRADIENT_ACCUMULATION_STEPS = args.gradient_accumulation_steps or cfg.gradient_accumulation_steps
    MAX_LR = cfg.max_lr
    NUM_EPOCHS = cfg.num_epochs

    # 2. Accelerator-un Başlanması
    # fix: --mixed-precision > `accelerate config`/launch > the preset; fp16 on a CPU runs fp32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    requested, _ = requested_precision(cfg.mixed_precision, args.mixed_precision)
    precision, _ = resolve_precision(requested, device)
    accelerator = Accelerator(
        cpu=device.type == "cpu",  # fix: else launched CPU processes train alone, not together
        mixed_precision=precision, gradient_accumulation_steps=GRADIENT_ACCUMULATION_STEPS,
        # fix: the shuffle order depends on (seed, epoch) only, the same for 1 and 2 processes
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    set_seed(cfg.seed)  # fix: no seed in the lesson; after the Accelerator it also fixes the init

    # 3. Məlumatın Yüklənməsi (fix: Day 22's rows, checked against block_size and the vocab)
    train_data, val_data = load_datasets(model_cfg, args.data_dir)
    val_data = val_data[: (cfg.eval_max_batches or len(val_data)) * BATCH_SIZE]  # a quick check
    train_dataset = TensorDataset(train_data)
    val_dataset = TensorDataset(val_data)
    train_dataloader = DataLoader(train_dataset, batch_size=BATCH_SIZE, shuffle=True,
                                  drop_last=True,  # fix: a short last window: a smaller gradient
                                  generator=torch.Generator().manual_seed(cfg.seed))
    val_dataloader = DataLoader(val_dataset, batch_size=BATCH_SIZE, shuffle=False)

    # 4. Model, Optimizer və Scheduler-in Qurulması
    model = GPTModel(model_cfg)  # fix: every size from the preset (rtx2050: the lesson's)
    optimizer = torch.optim.AdamW(model.parameters(), lr=MAX_LR)

    # Təlim addımlarının ümumi sayı
    # fix: in optimizer steps of ONE process (the prepared loader is split over the processes),
    # a short last window counted (accelerate steps on it), --max-steps honoured
    n = accelerator.num_processes  # fix: the prepared scheduler also ticks n times per step
    steps_per_epoch = math.ceil(len(train_dataloader) // n / GRADIENT_ACCUMULATION_STEPS)
    total_steps = args.max_steps or NUM_EPOCHS * steps_per_epoch
    NUM_EPOCHS = math.ceil(total_steps / steps_per_epoch)
    warmup_steps = int(total_steps * cfg.warmup_ratio)  # the lesson: total_steps // 10
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps * n,
                                                num_training_steps=total_steps * n)

    # 5. Modelin Accelerator-a Hazırlanması (fix: fp16 wraps forward in autocast; weights stay fp32)
    model, optimizer, train_dataloader, val_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, val_dataloader, scheduler
    )
    accelerator.print(f"precision: {precision} | processes: {n} | effective batch: "
                      f"{BATCH_SIZE * GRADIENT_ACCUMULATION_STEPS * n} | steps: {total_steps}")

    # 6. Təlim Dövrü
    step, losses, window = 0, [], []  # window: the micro-batch losses of this optimizer step
    for epoch in range(NUM_EPOCHS):
        model.train()
        train_dataloader.set_epoch(epoch)  # fix: a new (seeded) order each epoch
        for batch in train_dataloader:
            # Batch-i giriş və hədəfə ayırmaq
            X, Y = batch[0][:, :-1], batch[0][:, 1:]

            # Qradiyent yığımı üçün kontekst meneceri
            with accelerator.accumulate(model):
                logits, loss = model(X, Y)

                # Loss-u geri yaymaq (accelerate bölür: loss / GRADIENT_ACCUMULATION_STEPS)
                accelerator.backward(loss)

                # fix: clip once, on the complete gradients. The lesson clipped every micro-step:
                # with fp16's GradScaler that raises at the 2nd one, without it clips partial sums
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)

                # Optimizer addımı və Scheduler yenilənməsi (they act only when gradients sync)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()

            window.append(loss.detach())
            if accelerator.sync_gradients:  # fix: log optimizer steps, the mean of all processes
                step, mean = step + 1, torch.stack(window).double().mean()
                losses.append(accelerator.reduce(mean, "mean").item())
                window = []
                if step % args.log_every == 0 or step == total_steps:
                    accelerator.print(f"Epoch {epoch}, Step {step}, Loss: {losses[-1]:.4f}")
                if step == total_steps:
                    break

        # Hər epoxanın sonunda validasiya (fix: the lesson left it for Days 27-28)
        model.eval()
        val_losses = []
        with torch.no_grad():
            for (rows,) in val_dataloader:  # one loss per row: gather_for_metrics drops repeats
                logits, _ = model(rows[:, :-1])
                per_row = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")
                val_losses.append(accelerator.gather_for_metrics(per_row.mean(dim=1)))
        accelerator.print(f"Epoch {epoch}, val loss: {torch.cat(val_losses).mean().item():.4f}")
    accelerator.end_training()
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description="The lesson's train_accelerate.py, corrected.")
    parser.add_argument("--preset", default="rtx2050", help="rtx2050 (the lesson's) or cpu-demo")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: the epochs)")
    parser.add_argument("--gradient-accumulation-steps", type=int, help="default: the preset's")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])  # beats the rest
    parser.add_argument("--data-dir", default="data", help="where lowvram.data put the rows")
    parser.add_argument("--log-every", type=int, default=25, help="in optimizer steps")
    return training_function(parser.parse_args(argv))


# 7. Təlimin Başlanması. Terminalda icra: accelerate launch train_accelerate.py
if __name__ == "__main__":
    main()
