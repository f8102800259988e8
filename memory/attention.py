"""Chunked ("sliced") attention under a memory target, and ComfyUI's override callable.

Math attention materialises a score matrix of batch * heads * queries * keys elements; at
high resolution that matrix, not the weights, is what runs a small GPU out of memory. Running
the queries in chunks bounds it: each chunk's scores are computed, used and freed before the
next, and each chunk's output is written straight into one preallocated output tensor.

Pure torch and plain data: no ComfyUI imports. The override follows ComfyUI's calling
convention (`transformer_options["optimized_attention_override"]`, `fn(func, *args, **kwargs)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F

AttentionMethod = Literal["auto", "chunked"]
AttentionKernel = Literal["auto", "sdpa", "math"]

ATTENTION_METHODS = ("auto", "chunked")
ATTENTION_KERNELS = ("auto", "sdpa", "math")

FP32_BYTES = 4
MB = 2 ** 20

# ComfyUI's attention functions take these positionally, in this order.
_POSITIONAL_NAMES = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape",
                     "skip_output_reshape")


# --- memory estimate -------------------------------------------------------------------------

def attention_transient_bytes(batch: int, heads: int, q_len: int, k_len: int, head_dim: int,
                              dtype_bytes: int, upcast_fp32: bool = False) -> int:
    """Transient bytes of one math-attention call: score matrix + softmax copy + output.

    Scores and their softmax are fp32 when upcast is requested. Fused SDPA kernels
    materialise less than this, so the estimate is an upper bound for them.
    """
    score_bytes = FP32_BYTES if upcast_fp32 else dtype_bytes
    score_elements = batch * heads * q_len * k_len
    output_elements = batch * heads * q_len * head_dim
    return 2 * score_elements * score_bytes + output_elements * dtype_bytes


def smallest_chunk_bytes(batch: int, heads: int, k_len: int, head_dim: int, dtype_bytes: int,
                         upcast_fp32: bool = False) -> int:
    """Transient bytes of the smallest possible chunk: one query row (all batches and heads)."""
    return attention_transient_bytes(batch, heads, 1, k_len, head_dim, dtype_bytes, upcast_fp32)


def query_chunk_size(target_bytes: float, batch: int, heads: int, q_len: int, k_len: int,
                     head_dim: int, dtype_bytes: int, upcast_fp32: bool = False) -> int:
    """Largest number of query rows whose transient fits `target_bytes` (at most `q_len`).

    Raises ValueError when the target is not a positive number or below one query row.
    """
    _check_target(target_bytes)
    # The transient is linear in the query count, so one row's cost divides the target.
    row_bytes = smallest_chunk_bytes(batch, heads, k_len, head_dim, dtype_bytes, upcast_fp32)
    if target_bytes < row_bytes:
        raise ValueError(
            f"attention memory target {_mb(target_bytes)} is below the smallest possible chunk "
            f"({_mb(row_bytes)} for one query row at this shape: batch {batch}, {heads} heads, "
            f"{q_len} queries x {k_len} keys, head size {head_dim}); raise the attention "
            f"memory target or lower the resolution or batch size")
    return min(q_len, int(target_bytes // row_bytes))


def _check_target(target_bytes: Any) -> None:
    valid = (isinstance(target_bytes, (int, float)) and not isinstance(target_bytes, bool)
             and math.isfinite(target_bytes) and target_bytes > 0)
    if not valid:
        raise ValueError(
            f"attention memory target must be a positive number of bytes, got {target_bytes!r}")


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / MB:.3g} MB"


# --- shapes and masks ------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    q_len: int
    k_len: int
    head_dim: int


def attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    skip_reshape: bool = False) -> AttentionShape:
    """Read (and check) the attention shape from ComfyUI-layout q, k, v."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"attention head count must be a positive whole number, got {heads!r}")
    layout = "[batch, heads, tokens, head size]" if skip_reshape else "[batch, tokens, channels]"
    ndim = 4 if skip_reshape else 3
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.ndim != ndim:
            raise ValueError(f"attention {name} must be {layout}, got shape {list(t.shape)}")
    if skip_reshape:
        batch, q_heads, q_len, head_dim = q.shape
        if q_heads != heads:
            raise ValueError(f"attention query has {q_heads} heads but {heads} heads were given")
    else:
        batch, q_len, channels = q.shape
        if channels % heads:
            raise ValueError(
                f"attention query has {channels} channels, not divisible by {heads} heads")
        head_dim = channels // heads
    k_len = k.shape[-2] if skip_reshape else k.shape[1]
    if k.shape != v.shape:
        raise ValueError(f"attention key {list(k.shape)} and value {list(v.shape)} differ in shape")
    expected_key = (batch, heads, k_len, head_dim) if skip_reshape else (batch, k_len, q.shape[2])
    if tuple(k.shape) != expected_key:
        raise ValueError(f"attention key/value shape {list(k.shape)} does not match query shape "
                         f"{list(q.shape)} (expected {list(expected_key)})")
    return AttentionShape(batch, heads, q_len, k_len, head_dim)


def _mask_4d(mask: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """ComfyUI mask -> a view broadcastable to [batch, heads, queries, keys]."""
    # Same promotion as ComfyUI's attention_pytorch: [Nq, Nk] gains batch and heads,
    # [B, Nq, Nk] (or [B, 1, Nk]) gains heads.
    if mask.ndim == 2:
        mask4 = mask[None, None]
    elif mask.ndim == 3:
        mask4 = mask[:, None]
    elif mask.ndim == 4:
        mask4 = mask
    else:
        mask4 = None
    full = (shape.batch, shape.heads, shape.q_len, shape.k_len)
    if mask4 is None or any(m not in (1, f) for m, f in zip(mask4.shape, full)):
        raise ValueError(
            f"attention mask of shape {list(mask.shape)} does not fit batch {shape.batch}, "
            f"{shape.heads} heads, {shape.q_len} queries x {shape.k_len} keys; expected "
            f"[queries, keys], [batch, queries, keys], [batch, heads, queries, keys] "
            f"or a broadcastable shape such as [batch, 1, keys]")
    return mask4


# --- chunked attention -----------------------------------------------------------------------

def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                      mask: Optional[torch.Tensor] = None, target_bytes: float,
                      skip_reshape: bool = False, skip_output_reshape: bool = False,
                      upcast_fp32: bool = False, kernel: AttentionKernel = "auto") -> torch.Tensor:
    """Attention with the query rows split into chunks whose transient fits `target_bytes`.

    Layouts as in ComfyUI: q, k, v are [B, N, heads*dim_head] unless `skip_reshape` (then
    [B, heads, N, dim_head]); the output is [B, N, heads*dim_head] unless
    `skip_output_reshape` (then [B, heads, N, dim_head]).
    """
    shape = attention_shape(q, k, v, heads, skip_reshape)
    query_chunk = query_chunk_size(target_bytes, shape.batch, shape.heads, shape.q_len,
                                   shape.k_len, shape.head_dim, q.element_size(), upcast_fp32)
    return _attend_in_chunks(q, k, v, shape, mask, query_chunk, skip_reshape,
                             skip_output_reshape, upcast_fp32, kernel)


def _attend_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape,
                      mask: Optional[torch.Tensor], query_chunk: int, skip_reshape: bool,
                      skip_output_reshape: bool, upcast_fp32: bool,
                      kernel: AttentionKernel) -> torch.Tensor:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(ATTENTION_KERNELS)}, "
                         f"got {kernel!r}")
    b, h, d = shape.batch, shape.heads, shape.head_dim
    if not skip_reshape:
        q, k, v = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
    mask4 = None if mask is None else _mask_4d(mask, shape)
    if kernel == "auto":
        # SDPA keeps its softmax statistics in fp32 only in its fused kernels; when fp32 is
        # asked for on a half-precision input, the explicit math kernel is the one we control.
        kernel = "math" if upcast_fp32 and q.dtype != torch.float32 else "sdpa"
    if kernel == "math" and upcast_fp32:
        # Cast the keys once, not per chunk.
        k = k.float()

    if skip_output_reshape:
        out = torch.empty((b, h, shape.q_len, d), dtype=q.dtype, device=q.device)
        out_rows = out
    else:
        out = torch.empty((b, shape.q_len, h * d), dtype=q.dtype, device=q.device)
        # [B, heads, N, dim] view of the output, so a chunk is written in place.
        out_rows = out.view(b, shape.q_len, h, d).transpose(1, 2)

    scale = d ** -0.5
    for start in range(0, shape.q_len, query_chunk):
        stop = min(start + query_chunk, shape.q_len)
        q_chunk = q[:, :, start:stop]
        mask_chunk = None
        if mask4 is not None:
            # A mask without a query dimension (size 1) broadcasts over every chunk.
            mask_chunk = mask4[:, :, start:stop] if mask4.shape[2] > 1 else mask4
        if kernel == "sdpa":
            if mask_chunk is not None and mask_chunk.dtype != torch.bool:
                mask_chunk = mask_chunk.to(q.dtype)
            out_rows[:, :, start:stop] = F.scaled_dot_product_attention(
                q_chunk, k, v, attn_mask=mask_chunk, scale=scale)
        else:
            out_rows[:, :, start:stop] = _math_attention(q_chunk, k, v, mask_chunk, scale,
                                                         upcast_fp32)
    return out


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: Optional[torch.Tensor], scale: float, upcast_fp32: bool) -> torch.Tensor:
    if upcast_fp32:
        q = q.float()
    scores = (q @ k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        if mask.dtype == torch.bool:
            # A finite fill, as ComfyUI's attention_basic does, so no row softmaxes to NaN.
            scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
        else:
            scores.add_(mask)
    probs = scores.softmax(dim=-1)
    del scores
    return probs.to(v.dtype) @ v


# --- the ComfyUI override --------------------------------------------------------------------

@dataclass
class AttentionPlan:
    """How the override runs attention. Mutable on purpose: an OOM ladder halves target_bytes."""
    target_bytes: float
    method: AttentionMethod = "auto"
    upcast_fp32: bool = False
    kernel: AttentionKernel = "auto"

    def __post_init__(self) -> None:
        _check_target(self.target_bytes)
        if self.method not in ATTENTION_METHODS:
            raise ValueError(f"attention method must be one of {', '.join(ATTENTION_METHODS)}, "
                             f"got {self.method!r}")
        if self.kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {', '.join(ATTENTION_KERNELS)}, "
                             f"got {self.kernel!r}")


@dataclass(frozen=True)
class AttentionCall:
    """What one override call did; given to `on_call`."""
    chunked: bool
    query_chunk: int
    chunk_count: int
    q_len: int
    k_len: int
    upcast_fp32: bool
    estimated_bytes: int  # transient of one chunk (the whole call when not chunked)


AttentionOverride = Callable[..., torch.Tensor]


def make_attention_override(plan: AttentionPlan,
                            on_call: Optional[Callable[[AttentionCall], None]] = None
                            ) -> AttentionOverride:
    """An `optimized_attention_override` for ComfyUI's transformer_options.

    The plan is read on every call, so changing `plan.target_bytes` takes effect at once.
    """
    def override(func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        call = dict(zip(_POSITIONAL_NAMES, args))
        # Keyword arguments win; unknown keys (transformer_options, ...) are not ours.
        call.update((name, kwargs[name]) for name in _POSITIONAL_NAMES if name in kwargs)
        q, k, v, heads = call["q"], call["k"], call["v"], call["heads"]
        skip_reshape = bool(call.get("skip_reshape", False))
        upcast_fp32 = plan.upcast_fp32 or call.get("attn_precision") == torch.float32
        shape = attention_shape(q, k, v, heads, skip_reshape)
        dims = (shape.batch, shape.heads, shape.q_len, shape.k_len, shape.head_dim,
                q.element_size())

        whole_bytes = attention_transient_bytes(*dims, upcast_fp32)
        if plan.method == "auto" and whole_bytes <= plan.target_bytes:
            if on_call is not None:
                on_call(AttentionCall(False, shape.q_len, 1, shape.q_len, shape.k_len,
                                      upcast_fp32, whole_bytes))
            return func(*args, **kwargs)

        query_chunk = query_chunk_size(plan.target_bytes, *dims, upcast_fp32)
        if on_call is not None:
            chunk_bytes = attention_transient_bytes(shape.batch, shape.heads, query_chunk,
                                                    shape.k_len, shape.head_dim,
                                                    q.element_size(), upcast_fp32)
            on_call(AttentionCall(True, query_chunk, -(-shape.q_len // query_chunk),
                                  shape.q_len, shape.k_len, upcast_fp32, chunk_bytes))
        return _attend_in_chunks(q, k, v, shape, call.get("mask"), query_chunk, skip_reshape,
                                 bool(call.get("skip_output_reshape", False)), upcast_fp32,
                                 plan.kernel)

    return override
