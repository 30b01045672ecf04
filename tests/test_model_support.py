"""Helpers shared by the tests/test_model_*.py files (no tests here).

A synthetic, hand-built batch in the layout of docs/CONTRACTS.md ("Batch"), independent of the
data pipeline so the model tests pin the model code alone: each row is
`<|begin_of_text|>` + text + one or more audio segments
`<|audio_out_bos|> AO x (T+2) D x (K-1) <|audio_eos|> <|eot_id|>`; the last segment of a row is
the target (labels as the contract says), earlier ones are reference audio (all -100).
"""

from __future__ import annotations

import torch

IGNORE = -100


def synthetic_batch(config, rows=((5, (6,)), (3, (2, 4))), seed: int = 0, codebook: int = 1024) -> dict:
    """rows: (number of text tokens, frames per audio segment) per row; right padding."""
    g = torch.Generator().manual_seed(seed)
    k = config.num_codebooks
    bos, eos = config.audio_stream_bos_id, config.audio_stream_eos_id
    eot = config.eos_token_id
    audio_eos = config.audio_bos_token_id - 1  # <|audio_eos|> sits right before <|audio_out_bos|> in Llama-3 order
    built = []
    for n_text, segments in rows:
        ids = [config.bos_token_id] + torch.randint(0, 1700, (n_text,), generator=g).tolist()
        labels = [IGNORE] * len(ids)
        cols, col_labels = [], []
        for s, t in enumerate(segments):
            target = s == len(segments) - 1
            codes = torch.randint(0, codebook, (k, t), generator=g)
            seg = torch.full((k, t + k + 1), eos)
            lab = torch.full((k, t + k + 1), IGNORE)
            for row in range(k):
                seg[row, : row + 1] = bos
                seg[row, row + 1 : row + 1 + t] = codes[row]
                if target:
                    lab[row, row + 1 : row + 1 + t] = codes[row]
                    lab[row, row + 1 + t] = eos
            cols.append(seg.T)
            col_labels.append(lab.T)
            turn = (
                [config.audio_bos_token_id]
                + [config.audio_token_id] * (t + 2)
                + [config.audio_delay_token_id] * (k - 1)
                + [audio_eos, eot]
            )
            ids += turn
            if target:
                labels += [config.audio_bos_token_id] + [IGNORE] * (t + k + 1) + [audio_eos, eot]
            else:
                labels += [IGNORE] * len(turn)
        built.append((ids, labels, torch.cat(cols), torch.cat(col_labels)))
    b = len(built)
    length = max(len(x[0]) for x in built)
    n = max(x[2].shape[0] for x in built)
    batch = {
        "input_ids": torch.full((b, length), config.pad_token_id),
        "attention_mask": torch.zeros(b, length, dtype=torch.long),
        "labels": torch.full((b, length), IGNORE),
        "audio_input_ids": torch.full((b, n, k), eos),
        "audio_input_ids_mask": torch.zeros(b, n, dtype=torch.bool),
        "audio_labels": torch.full((b, n, k), IGNORE),
    }
    for i, (ids, labels, cols, col_labels) in enumerate(built):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, : len(ids)] = 1
        batch["labels"][i, : len(ids)] = torch.tensor(labels)
        batch["audio_input_ids"][i, : cols.shape[0]] = cols
        batch["audio_input_ids_mask"][i, : cols.shape[0]] = True
        batch["audio_labels"][i, : cols.shape[0]] = col_labels
    return batch


def model_inputs(batch: dict) -> dict:
    """The keys the transformers model takes as inputs (no labels)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "audio_input_ids", "audio_input_ids_mask")}


def train_steps(model, batch: dict, steps: int, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """`steps` AdamW steps on the transformers loss (audio CE summed over codebooks + text CE)."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
