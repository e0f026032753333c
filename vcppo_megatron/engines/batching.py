"""Split a batch (dict of tensors) into length-sorted micro-batches under a token budget.

Padding bound. Rows are sorted by length (longest first) and packed greedily: a micro-batch takes
rows while rows x (its longest row) <= `max_tokens_per_micro_batch` (a row longer than the budget
goes alone), and is trimmed to its own longest row. With n_k rows in micro-batch k, its padding is
at most n_k·(L_max,k - L_min,k); since the length ranges of consecutive micro-batches do not
overlap, the total padding over the batch is at most max_k n_k · (L_longest - L_shortest).
With `seq_multiple` m > 1 (sequence parallelism needs lengths divisible by the TP size) each
micro-batch is padded on to a multiple of m: at most n_k·(m − 1) more per micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

REQUIRED_KEYS = ("input_ids", "attention_mask")


@dataclass
class MicroBatch:
    """One micro-batch: the rows of the batch it holds (original indices) and its trimmed tensors."""

    rows: Tensor
    seq_len: int
    data: dict[str, Tensor]


def validate_batch(batch: dict[str, Tensor]) -> tuple[int, int, Tensor]:
    """Check keys and shapes; return (rows, seq_len, per-row lengths). Right padding is required."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch: expected a dict of tensors, got {type(batch).__name__}")
    for key in REQUIRED_KEYS:
        if key not in batch:
            raise KeyError(f"batch is missing key {key!r}; got keys {sorted(batch)}")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.dim() != 2:
        raise ValueError(f"batch['input_ids'] shape {tuple(ids.shape)}: expected [rows, seq]")
    n, s = ids.shape
    for key, t in batch.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"batch[{key!r}] is a {type(t).__name__}, expected a tensor")
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(f"batch[{key!r}] shape {tuple(t.shape)}: expected {n} rows like input_ids")
    if mask.shape != ids.shape:
        raise ValueError(f"batch['attention_mask'] shape {tuple(mask.shape)}: expected {tuple(ids.shape)}")
    lengths = mask.to(torch.long).sum(-1)
    prefix = torch.arange(s, device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(prefix, mask.bool()):
        bad = int((prefix != mask.bool()).any(-1).nonzero()[0, 0])
        raise ValueError(f"batch['attention_mask'] row {bad} is not right-padded (ones then zeros)")
    if int(lengths.min()) < 1:
        raise ValueError("batch['attention_mask'] has an empty row; every row needs >= 1 token")
    return n, s, lengths


def split_micro_batches(batch: dict[str, Tensor], max_tokens_per_micro_batch: int,
                        seq_multiple: int = 1) -> list[MicroBatch]:
    """Sort rows by length, pack under the token budget and trim each micro-batch to its longest
    row rounded up to a multiple of `seq_multiple` (zero-padded past the batch; see module doc)."""
    if max_tokens_per_micro_batch < 1:
        raise ValueError(f"max_tokens_per_micro_batch={max_tokens_per_micro_batch}, expected >= 1")
    if seq_multiple < 1:
        raise ValueError(f"seq_multiple={seq_multiple}, expected >= 1")
    n, s, lengths = validate_batch(batch)
    host_lengths = lengths.tolist()             # one copy of the row lengths: packing is planned here
    order = sorted(range(n), key=lambda i: -host_lengths[i])         # longest first, stable
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * host_lengths[groups[-1][0]] <= max_tokens_per_micro_batch:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for g in groups:
        rows = torch.tensor(g, dtype=torch.long, device=lengths.device)
        seq = -(-host_lengths[g[0]] // seq_multiple) * seq_multiple
        data = {k: (_columns(t[rows], seq) if t.dim() >= 2 and t.shape[1] == s else t[rows])
                for k, t in batch.items()}
        out.append(MicroBatch(rows=rows, seq_len=seq, data=data))
    return out


def _columns(t: Tensor, seq: int) -> Tensor:
    """The first `seq` columns of t, zero-padded when t has fewer."""
    if t.shape[1] >= seq:
        return t[:, :seq]
    pad = t.new_zeros((t.shape[0], seq - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def computed_tokens(micro_batches: list[MicroBatch]) -> int:
    """Tokens the model computes for these micro-batches (rows x trimmed length, padding included)."""
    return sum(len(mb.rows) * mb.seq_len for mb in micro_batches)
