"""Splitting one model call into sub-batches: which samples go together, and slicing the call's arguments.

A model call's batch is made of chunks, one per cond it runs (ComfyUI's `cond_or_uncond`: uncond and cond
batched together are two chunks of the latent batch each). A sub-batch never straddles two chunks, so each
sub-call runs one cond, as ComfyUI's own calls do, and per-chunk options stay right.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class SubBatch:
    start: int
    stop: int
    chunk: int  # the index of the cond chunk (in cond_or_uncond) the samples belong to


def sub_batches(batch: int, chunks: int, size: int) -> list[SubBatch]:
    """Consecutive sub-batches of at most `size` samples covering `batch`, none across a chunk boundary.
    `chunks` equal chunks make the batch (1 when unknown or when it does not divide the batch)."""
    if chunks < 1 or batch % chunks:
        chunks = 1
    per_chunk = batch // chunks
    step = math.gcd(max(1, size), per_chunk)  # divides the chunk: every sub-batch lies inside one
    return [SubBatch(start, start + step, start // per_chunk) for start in range(0, batch, step)]


def slice_batch(value: Any, batch: int, part: SubBatch) -> Any:
    """`value` with every tensor whose first dimension is the batch cut to `part`; dicts, lists and tuples
    are sliced inside; anything else (a tensor broadcast over the batch, a number) is kept."""
    if isinstance(value, torch.Tensor):
        return value[part.start:part.stop] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: slice_batch(item, batch, part) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(slice_batch(item, batch, part) for item in value)
    return value
