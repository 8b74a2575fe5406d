"""Full fine-tuning of a small causal LM on a list of short texts: a plain PyTorch loop.

Built for the demo's specialists (SmolLM2-135M on ICD-10-CM statements, on CPU): AdamW, linear
warm-up then cosine decay, gradient clipping, every text ending with the end-of-sequence token,
loss on the text tokens only (padding masked). The input embeddings (tied to the output head in
SmolLM2) stay frozen, as in the fine-tunes the paper merges, which leaves the vocabulary rows of
all specialists identical; it also saves a third of the optimizer state.

Seeded: the batch order comes from `random.Random(seed)` and torch's generator is seeded, so the
same inputs on the same machine give the same weights.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from medmerge.io import loaders
from medmerge.io.folders import atomic_folder

log = logging.getLogger("medmerge")


def pack(
    token_ids: list[list[int]], seq_len: int, pad_id: int, epochs: int, seed: int
) -> tuple[Tensor, Tensor]:
    """(rows, labels) of `seq_len` tokens: each epoch shuffles the texts and packs them greedily
    into rows (a text never straddles two rows; the rest of a row is `pad_id`, labelled -100).
    Packing instead of padding every short text to the longest of its batch halves the tokens a
    step computes."""
    rng = random.Random(seed)
    rows: list[list[int]] = []
    labels: list[list[int]] = []

    def close(row: list[int]) -> None:
        rows.append(row + [pad_id] * (seq_len - len(row)))
        labels.append(row + [-100] * (seq_len - len(row)))

    for _ in range(epochs):
        order = list(token_ids)
        rng.shuffle(order)
        row: list[int] = []
        for ids in order:
            if len(row) + len(ids) > seq_len:
                close(row)
                row = []
            row += ids[:seq_len]
        if row:
            close(row)
    return torch.tensor(rows), torch.tensor(labels)


def finetune(
    base: str | Path,
    texts: list[str],
    out_dir: str | Path,
    *,
    epochs: int,
    lr: float = 3e-4,
    seq_len: int = 128,
    rows_per_step: int = 4,
    warmup: float = 0.1,
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "fine-tune",
) -> dict:
    """Fine-tune `base` on `texts` for `epochs` passes (steps of `rows_per_step` packed rows of
    `seq_len` tokens; matrix products in bfloat16 autocast, weights and optimizer in float32);
    write the checkpoint to `out_dir` (atomically). Returns the training record."""
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    model = loaders.causal_lm(base, torch.float32)
    tokenizer = loaders.tokenizer(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = [tokenizer(t + tokenizer.eos_token).input_ids for t in texts]
    rows, labels = pack(ids, seq_len, tokenizer.pad_token_id, epochs, seed)
    steps = math.ceil(len(rows) / rows_per_step)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup * steps), steps)
    model.train()
    losses, started = [], time.time()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        batch = slice(step * rows_per_step, (step + 1) * rows_per_step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=rows[batch], labels=labels[batch]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = round(time.time() - started, 1)
    log.info(
        "%s: %d steps in %.0f s, loss %.3f -> %.3f", desc, steps, seconds, losses[0], losses[-1]
    )
    model.eval()
    with atomic_folder(out_dir, overwrite) as tmp:
        model.to(getattr(torch, dtype)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {
        "epochs": epochs,
        "steps": steps,
        "tokens": int((labels != -100).sum()),
        "seconds": seconds,
        "losses": losses,
    }
