"""Chunked ("sliced") attention under a memory target, and ComfyUI's override callable.

Math attention materialises a score matrix of batch * heads * queries * keys elements; at
high resolution that matrix, not the weights, is what runs a small GPU out of memory. Running
the queries in chunks bounds it: each chunk's scores are computed, used and freed before the
next, and each chunk's output is written straight into one preallocated output tensor.

Pure torch and plain data: no ComfyUI imports. The override follows ComfyUI's calling
convention (`transformer_options["optimized_attention_override"]`, `fn(func, *args, **kwargs)`)
and reads the plan of the current sampling run from `transformer_options["headroom"]`. Newer
hosts pass `scale=` (the softmax scale) and `enable_gqa=` (grouped-query attention: key/value
with fewer heads than the query, each shared by a group of query heads, as `repeat_interleave`
would give them); the chunks honour both. A call carrying any other keyword argument goes to
the model's own kernel with every argument unchanged: the chunks cannot honour what they do
not know.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Optional

import psutil
import torch
import torch.nn.functional as F

AttentionMethod = Literal["auto", "chunked", "comfy split", "sub-quadratic"]
AttentionKernel = Literal["auto", "sdpa", "math"]

ATTENTION_METHODS = ("auto", "chunked", "comfy split", "sub-quadratic")
# Methods run by an attention function the host supplies (ComfyUI's own); they size their
# slices from free memory themselves, so no target applies to them.
DELEGATED_METHODS = ("comfy split", "sub-quadratic")
ATTENTION_KERNELS = ("auto", "sdpa", "math")
# SDPA backends that never materialise the score matrix.
FUSED_SDPA_BACKENDS = ("flash_attention", "efficient_attention", "cudnn_attention")

# Per-run state in transformer_options: a plain dict that ComfyUI copies for every sampling
# run, so an OOM ladder can put a tighter plan there for one run without touching the model.
HEADROOM_STATE_KEY = "headroom"
ATTENTION_PLAN_KEY = "attention"
ACTIVATION_BYTES_KEY = "activation_bytes"  # the activation memory an Offload Model budget planned
OVERRIDE_KEY = "optimized_attention_override"

# Without an activation budget, an auto target is this share of the device's free memory at call
# time: the rest of the layer (projections, feed-forward) and allocator fragmentation need room
# too, and other programs may take memory between the reading and the allocation.
AUTO_FREE_FRACTION = 0.5

FP32_BYTES = 4
MB = 2 ** 20

# ComfyUI's attention functions take these positionally, in this order.
_POSITIONAL_NAMES = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape",
                     "skip_output_reshape")
# The keyword arguments the chunks honour besides those: ComfyUI's own bookkeeping, the
# softmax scale, grouped-query attention, and SageAttention's precision hint (the chunks run at
# full precision, which is what low_precision_attention=False asks for).
HANDLED_KEYWORDS = frozenset({"transformer_options", "_inside_attn_wrapper", "scale",
                              "enable_gqa", "low_precision_attention"})


# --- memory estimate -------------------------------------------------------------------------

def _fixed_and_row_bytes(batch: int, heads: int, q_len: int, k_len: int, head_dim: int,
                         dtype_bytes: int, upcast_fp32: bool, fused: bool,
                         kv_heads: Optional[int]) -> tuple[int, int]:
    score_bytes = FP32_BYTES if upcast_fp32 else dtype_bytes
    kv_heads = heads if kv_heads is None else kv_heads
    # Whatever the chunk: the output, and [B, kv_heads, N, dim] copies of key (fp32 when
    # upcasting) and value, made once so no chunk copies them again.
    fixed = batch * head_dim * (heads * q_len * dtype_bytes
                                + kv_heads * k_len * (score_bytes + dtype_bytes))
    # Per query row: its query copy and output row; then either its scores and their softmax
    # (math), or a fused kernel's softmax statistics (running max and sum, fp32).
    scores = 2 * FP32_BYTES if fused else 2 * k_len * score_bytes
    row = batch * heads * (scores + head_dim * (score_bytes + dtype_bytes))
    return fixed, row


def attention_transient_bytes(batch: int, heads: int, q_len: int, k_len: int, head_dim: int,
                              dtype_bytes: int, upcast_fp32: bool = False,
                              query_chunk: Optional[int] = None, *, fused: bool = False,
                              kv_heads: Optional[int] = None) -> int:
    """Bytes one attention call allocates, run in chunks of `query_chunk` query rows (None:
    unchunked): output and key/value layout copies, plus one chunk's query copy, output rows
    and, for math attention, its scores and their softmax (fp32 when upcast is requested).
    A `fused` kernel (SDPA flash/memory-efficient) keeps per row only softmax statistics; its
    per-thread tiles (well under 1 MB a thread) are not counted. `kv_heads`: the heads of key
    and value as the chunks read them (grouped-query attention; None: `heads`).
    """
    fixed, row = _fixed_and_row_bytes(batch, heads, q_len, k_len, head_dim, dtype_bytes,
                                      upcast_fp32, fused, kv_heads)
    return fixed + (q_len if query_chunk is None else query_chunk) * row


def smallest_chunk_bytes(batch: int, heads: int, q_len: int, k_len: int, head_dim: int,
                         dtype_bytes: int, upcast_fp32: bool = False, *,
                         fused: bool = False, kv_heads: Optional[int] = None) -> int:
    """Transient bytes of the smallest possible chunk: one query row (all batches and heads)."""
    return attention_transient_bytes(batch, heads, q_len, k_len, head_dim, dtype_bytes,
                                      upcast_fp32, query_chunk=1, fused=fused, kv_heads=kv_heads)


def query_chunk_size(target_bytes: float, batch: int, heads: int, q_len: int, k_len: int,
                     head_dim: int, dtype_bytes: int, upcast_fp32: bool = False,
                     target_name: str = "attention memory target", *,
                     fused: bool = False, kv_heads: Optional[int] = None) -> int:
    """Largest number of query rows whose call fits `target_bytes` (at most `q_len`).

    Raises ValueError, naming the target `target_name`, when it is not a positive number or
    is below one query row.
    """
    _check_target(target_bytes, target_name)
    fixed, row = _fixed_and_row_bytes(batch, heads, q_len, k_len, head_dim, dtype_bytes,
                                      upcast_fp32, fused, kv_heads)
    if target_bytes < fixed + row:
        grouped = "" if kv_heads in (None, heads) else f" ({kv_heads} key/value heads)"
        raise ValueError(
            f"{target_name} {_mb(target_bytes)} is below the smallest possible chunk "
            f"({_mb(fixed + row)} for one query row at this shape: batch {batch}, {heads} heads"
            f"{grouped}, {q_len} queries x {k_len} keys, head size {head_dim}); raise {target_name} "
            f"or lower the resolution or batch size")
    # The transient is linear in the query count, so one row's cost divides what is left.
    return min(q_len, int((target_bytes - fixed) // row))


def _check_target(target_bytes: Any, target_name: str = "attention memory target") -> None:
    valid = (isinstance(target_bytes, (int, float)) and not isinstance(target_bytes, bool)
             and math.isfinite(target_bytes) and target_bytes > 0)
    if not valid:
        raise ValueError(
            f"{target_name} must be a positive number of bytes, got {target_bytes!r}")


def _mb(n_bytes: float) -> str:
    megabytes = n_bytes / MB
    return f"{megabytes:.3g} MB" if megabytes < 1000 else f"{megabytes:.0f} MB"


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device` now: system RAM for CPU (and MPS, which shares
    it); for an accelerator, the driver's free memory plus what PyTorch caches unused."""
    if device.type in ("cpu", "mps"):
        return psutil.virtual_memory().available
    module = getattr(torch, device.type)  # torch.cuda, torch.xpu, ...
    free, _ = module.mem_get_info(device)
    return free + module.memory_reserved(device) - module.memory_allocated(device)


# --- shapes and masks ------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    q_len: int
    k_len: int
    head_dim: int
    kv_heads: int  # heads of key and value: fewer than `heads` in grouped-query attention

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    skip_reshape: bool = False, enable_gqa: bool = False) -> AttentionShape:
    """Read (and check) the attention shape from ComfyUI-layout q, k, v.

    With `enable_gqa`, key and value may have fewer heads than the query (a divisor of its
    head count), as ComfyUI passes them: [B, kv_heads, N, dim] with `skip_reshape`, else
    [B, N, kv_heads * dim].
    """
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
        kv_heads, k_len = k.shape[1], k.shape[2]
    else:
        batch, q_len, channels = q.shape
        if channels % heads:
            raise ValueError(
                f"attention query has {channels} channels, not divisible by {heads} heads")
        head_dim = channels // heads
        k_len = k.shape[1]
        # Key/value heads follow from their channels; with GQA they may be fewer.
        kv_heads = k.shape[2] // head_dim if k.shape[2] % head_dim == 0 else heads
    if k.shape != v.shape:
        raise ValueError(f"attention key {list(k.shape)} and value {list(v.shape)} differ in shape")
    if not enable_gqa or kv_heads < 1:
        kv_heads = heads
    expected_key = ((batch, kv_heads, k_len, head_dim) if skip_reshape
                    else (batch, k_len, kv_heads * head_dim))
    if tuple(k.shape) != expected_key:
        hint = ("" if enable_gqa else
                "; key/value with fewer heads than the query need enable_gqa=True")
        raise ValueError(f"attention key/value shape {list(k.shape)} does not match query shape "
                         f"{list(q.shape)} (expected {list(expected_key)}){hint}")
    if heads % kv_heads:
        raise ValueError(f"attention query has {heads} heads, not a multiple of the {kv_heads} "
                         f"key/value heads (enable_gqa shares each key/value head among a "
                         f"whole number of query heads)")
    return AttentionShape(batch, heads, q_len, k_len, head_dim, kv_heads)


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

def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: Optional[torch.Tensor] = None, *, enable_gqa: bool = False) -> str:
    """The kernel PyTorch's scaled_dot_product_attention picks for these [B, heads, N, dim]
    inputs: "flash_attention", "efficient_attention", "cudnn_attention", "math"... and "math"
    when torch cannot say, so that estimates built on the answer stay upper bounds."""
    try:
        from torch.nn.attention import SDPBackend
        # SDPA's own dispatch decision: private, but present since torch 2.0 (enable_gqa since
        # 2.5; an older torch raises TypeError and is answered "math").
        extra = {"enable_gqa": True} if enable_gqa else {}
        return SDPBackend(torch._fused_sdp_choice(q, k, v, mask, **extra)).name.lower()
    except (ImportError, AttributeError, RuntimeError, ValueError, TypeError):
        return "math"


def _valid_scale(scale: Any, head_dim: int) -> float:
    """The softmax scale of a call: the caller's, else SDPA's default 1/sqrt(head size)."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"attention scale must be a finite number, got {scale!r}")
    return float(scale)


@dataclass(frozen=True)
class _PreparedCall:
    """One call's tensors in [B, heads, N, dim] layout (key and value [B, kv_heads, N, dim])
    and the kernel its chunks run."""
    shape: AttentionShape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]  # broadcastable to [B, heads, queries, keys]
    kernel: str  # "math" (Headroom's explicit kernel) or "sdpa"
    sdpa_backend: str  # what SDPA picks for the tensors its chunks get
    upcast_fp32: bool
    scale: float
    # SDPA chunks get key/value repeated to every query head: SDPA's kernel for the grouped call
    # would repeat them in every chunk (math) or cannot group them (some fused kernels).
    repeat_kv: bool = False

    @property
    def kernel_name(self) -> str:
        return self.kernel if self.kernel == "math" else f"sdpa-{self.sdpa_backend}"

    @property
    def fused(self) -> bool:
        """The chunks run a kernel that never materialises the scores."""
        return self.kernel == "sdpa" and self.sdpa_backend in FUSED_SDPA_BACKENDS

    @property
    def chunk_kv_heads(self) -> int:
        """Heads of the key/value copies every chunk reads."""
        return self.shape.heads if self.repeat_kv else self.shape.kv_heads

    def transient_bytes(self, query_chunk: Optional[int] = None,
                        fused: Optional[bool] = None) -> int:
        s = self.shape
        return attention_transient_bytes(s.batch, s.heads, s.q_len, s.k_len, s.head_dim,
                                          self.q.element_size(), self.upcast_fp32, query_chunk,
                                          fused=self.fused if fused is None else fused,
                                          kv_heads=self.chunk_kv_heads)

    def chunk_rows(self, target_bytes: float, target_name: str) -> int:
        s = self.shape
        return query_chunk_size(target_bytes, s.batch, s.heads, s.q_len, s.k_len, s.head_dim,
                                self.q.element_size(), self.upcast_fp32, target_name,
                                fused=self.fused, kv_heads=self.chunk_kv_heads)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
             mask: Optional[torch.Tensor], skip_reshape: bool, upcast_fp32: bool,
             kernel: AttentionKernel, scale: Optional[float] = None,
             enable_gqa: bool = False) -> _PreparedCall:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(ATTENTION_KERNELS)}, "
                         f"got {kernel!r}")
    shape = attention_shape(q, k, v, heads, skip_reshape, enable_gqa)
    scale = _valid_scale(scale, shape.head_dim)
    if not skip_reshape:
        b, d = shape.batch, shape.head_dim
        q = q.reshape(b, -1, shape.heads, d).transpose(1, 2)
        k, v = (t.reshape(b, -1, shape.kv_heads, d).transpose(1, 2) for t in (k, v))
    mask4 = None if mask is None else _mask_4d(mask, shape)
    if kernel == "auto":
        # SDPA keeps its softmax statistics in fp32 only in its fused kernels; when fp32 is
        # asked for on a half-precision input, the explicit math kernel is the one we control.
        kernel = "math" if upcast_fp32 and q.dtype != torch.float32 else "sdpa"
    sdpa_mask = mask4
    if mask4 is not None and mask4.dtype != torch.bool:
        sdpa_mask = mask4.to(q.dtype)
    grouped = shape.kv_heads != shape.heads
    backend = sdpa_backend(q, k, v, sdpa_mask, enable_gqa=grouped)
    repeat_kv = kernel == "sdpa" and grouped and backend not in FUSED_SDPA_BACKENDS
    if repeat_kv:
        # What SDPA picks once key/value have every query head (asked with stride-0 views of
        # that shape; the copies are made only if the chunks run).
        full = (shape.batch, shape.heads, shape.k_len, shape.head_dim)
        backend = sdpa_backend(q, k[:, :1].expand(full), v[:, :1].expand(full), sdpa_mask)
    return _PreparedCall(shape, q, k, v, sdpa_mask if kernel == "sdpa" else mask4, kernel,
                         backend, upcast_fp32, scale, repeat_kv)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                      mask: Optional[torch.Tensor] = None, target_bytes: float,
                      skip_reshape: bool = False, skip_output_reshape: bool = False,
                      upcast_fp32: bool = False, kernel: AttentionKernel = "auto",
                      scale: Optional[float] = None, enable_gqa: bool = False) -> torch.Tensor:
    """Attention with the query rows split into chunks so the call fits `target_bytes`.

    Layouts as in ComfyUI: q, k, v are [B, N, heads*dim_head] unless `skip_reshape` (then
    [B, heads, N, dim_head]); the output is [B, N, heads*dim_head] unless
    `skip_output_reshape` (then [B, heads, N, dim_head]). `scale`: the softmax scale (None:
    1/sqrt(dim_head)). `enable_gqa`: key and value may have fewer heads than the query, each
    serving a group of consecutive query heads (as SDPA's enable_gqa).
    """
    prepared = _prepare(q, k, v, heads, mask, skip_reshape, upcast_fp32, kernel, scale,
                        enable_gqa)
    query_chunk = prepared.chunk_rows(target_bytes, "attention memory target")
    return _attend_in_chunks(prepared, query_chunk, skip_output_reshape)


def _attend_in_chunks(call: _PreparedCall, query_chunk: int,
                      skip_output_reshape: bool) -> torch.Tensor:
    shape, q, k, v, mask4 = call.shape, call.q, call.k, call.v, call.mask
    b, h, d = shape.batch, shape.heads, shape.head_dim
    grouped = shape.kv_heads != h
    if call.repeat_kv:
        k, v = (t.repeat_interleave(shape.group, dim=1) for t in (k, v))  # once, not per chunk
        grouped = False
    sdpa_extra = {"enable_gqa": True} if grouped else {}

    def attend(start: int, stop: int) -> torch.Tensor:
        mask_chunk = None
        if mask4 is not None:
            # A mask without a query dimension (size 1) broadcasts over every chunk.
            mask_chunk = mask4[:, :, start:stop] if mask4.shape[2] > 1 else mask4
        if call.kernel == "sdpa":
            return F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=mask_chunk,
                                                  scale=call.scale, **sdpa_extra)
        return _math_attention(q[:, :, start:stop], k, v, mask_chunk, call.scale, call.upcast_fp32)

    if call.kernel == "math" and call.upcast_fp32:
        k = k.float()  # once, not per chunk
    if query_chunk >= shape.q_len:
        # One chunk: the kernel's result is the output, laid out as ComfyUI's kernels do.
        out = attend(0, shape.q_len)
        return out if skip_output_reshape else out.transpose(1, 2).reshape(b, shape.q_len, h * d)

    # Every chunk reads all keys and values: contiguous per head, once, instead of a strided
    # read (SDPA) or a layout copy (matmul) per chunk. The estimate counts these copies.
    k, v = k.contiguous(), v.contiguous()
    if skip_output_reshape:
        out = torch.empty((b, h, shape.q_len, d), dtype=q.dtype, device=q.device)
        out_rows = out
    else:
        out = torch.empty((b, shape.q_len, h * d), dtype=q.dtype, device=q.device)
        # [B, heads, N, dim] view of the output, so a chunk is written in place.
        out_rows = out.view(b, shape.q_len, h, d).transpose(1, 2)
    for start in range(0, shape.q_len, query_chunk):
        stop = min(start + query_chunk, shape.q_len)
        out_rows[:, :, start:stop] = attend(start, stop)
    return out


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: Optional[torch.Tensor], scale: float, upcast_fp32: bool) -> torch.Tensor:
    """Attention of q [B, heads, n, dim] over k, v [B, kv_heads, N, dim], kv_heads dividing
    heads; each key/value head serves `heads // kv_heads` consecutive query heads."""
    b, heads, n, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if upcast_fp32:
        q = q.float()
    # A group's query rows stacked, so each key/value head is read as it is, never repeated.
    q = q.reshape(b, kv_heads, group * n, d)
    scores = (q @ k.transpose(-1, -2)).mul_(scale)  # [B, kv_heads, group * n, N]
    if mask is not None:
        # The same scores as [B, kv_heads, group, n, N], the mask's heads split alike.
        grouped_scores = scores.view(b, kv_heads, group, n, scores.shape[-1])
        grouped_mask = (mask.unflatten(1, (kv_heads, group)) if mask.shape[1] == heads
                        else mask.unsqueeze(1))
        if grouped_mask.dtype == torch.bool:
            # A finite fill, as ComfyUI's attention_basic does, so no row softmaxes to NaN.
            grouped_scores.masked_fill_(~grouped_mask, torch.finfo(scores.dtype).min)
        else:
            grouped_scores.add_(grouped_mask)
    probs = scores.softmax(dim=-1)
    del scores
    return (probs.to(v.dtype) @ v).view(b, heads, n, d)


# --- the ComfyUI override --------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionPlan:
    """How the override runs attention.

    Frozen: to change it for one sampling run (an OOM ladder halving the target), put a new
    plan into that run's transformer_options with `set_attention_plan`.
    """
    target_bytes: Optional[float] = None  # None = auto: the run's activation budget, else a share of free memory
    method: AttentionMethod = "auto"
    upcast_fp32: bool = False
    kernel: AttentionKernel = "auto"
    # The device runs attention through a memory-efficient kernel (SDPA flash/memory-efficient,
    # xFormers...): "auto" then leaves calls that fit the target to the model's own kernel.
    fused_kernel: bool = False
    target_name: str = "attention memory target"  # how error messages name the target

    def __post_init__(self) -> None:
        if self.target_bytes is not None:
            _check_target(self.target_bytes, self.target_name)
        if self.method not in ATTENTION_METHODS:
            raise ValueError(f"attention method must be one of {', '.join(ATTENTION_METHODS)}, "
                             f"got {self.method!r}")
        if self.kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {', '.join(ATTENTION_KERNELS)}, "
                             f"got {self.kernel!r}")


def resolve_target_bytes(plan: AttentionPlan, device: torch.device,
                         run_state: Mapping[str, Any]) -> tuple[float, str]:
    """(target bytes, how error messages name it) for one call: the plan's own target; for
    auto, the run's activation budget when one was planned, else a share of free memory."""
    if plan.target_bytes is not None:
        return plan.target_bytes, plan.target_name
    activation_bytes = run_state.get(ACTIVATION_BYTES_KEY)
    if activation_bytes is not None:
        name = f"{plan.target_name} (auto: the activation memory of the Offload Model budget)"
        _check_target(activation_bytes, name)
        return activation_bytes, name
    free = free_memory_bytes(device)
    return free * AUTO_FREE_FRACTION, (f"{plan.target_name} (auto: {AUTO_FREE_FRACTION:.0%} of "
                                       f"the {_mb(free)} free on {device})")


def set_attention_plan(transformer_options: dict, plan: AttentionPlan) -> None:
    """Make `plan` the attention plan of `transformer_options` (a clone's, or one run's).

    The "headroom" dict is replaced by a copy, never changed: it may be shared with the model
    (or the run) the options were copied from.
    """
    run_state = transformer_options.get(HEADROOM_STATE_KEY, {})
    transformer_options[HEADROOM_STATE_KEY] = {**run_state, ATTENTION_PLAN_KEY: plan}


def install_attention_override(transformer_options: dict, plan: AttentionPlan,
                               override: Callable[..., torch.Tensor]) -> bool:
    """Put `override` and its `plan` into a patcher clone's transformer_options.

    Returns whether another override was there (it is replaced: ComfyUI calls only one).
    """
    replaced = OVERRIDE_KEY in transformer_options
    transformer_options[OVERRIDE_KEY] = override
    set_attention_plan(transformer_options, plan)
    return replaced


@dataclass(frozen=True)
class AttentionCall:
    """What one override call did; given to `on_call`."""
    runner: str  # "model" (its own kernel, unchunked), "chunked", or a delegated method's name
    kernel: str  # what each chunk ran ("sdpa-flash_attention", "math"...); "" unless chunked
    query_chunk: int  # query rows per chunk Headroom ran (q_len when Headroom did not chunk)
    chunk_count: int
    batch: int
    heads: int
    q_len: int
    k_len: int
    upcast_fp32: bool
    estimated_bytes: int  # Headroom's estimate of the call (chunked: at the chosen chunk)
    target_bytes: Optional[float]  # the target the call was sized for; None for delegated methods
    kv_heads: int = 0  # heads of key and value (fewer than `heads` with grouped-query attention)
    # Keyword arguments the chunks do not implement: the call went to the model's own kernel.
    unhandled: tuple[str, ...] = ()

    @property
    def chunked(self) -> bool:
        return self.runner == "chunked"

    def log_line(self) -> str:
        target = "none" if self.target_bytes is None else _mb(self.target_bytes).replace(" ", "")
        return (f"Headroom attention: runner={self.runner} kernel={self.kernel or '-'} "
                f"batch={self.batch} heads={self.heads} kv_heads={self.kv_heads} "
                f"queries={self.q_len} keys={self.k_len} "
                f"chunk={self.query_chunk} chunks={self.chunk_count} "
                f"estimate={_mb(self.estimated_bytes).replace(' ', '')} target={target} "
                f"fp32={'yes' if self.upcast_fp32 else 'no'}"
                + (f" unhandled={','.join(self.unhandled)}" if self.unhandled else ""))


AttentionOverride = Callable[..., torch.Tensor]


def make_attention_override(plan: AttentionPlan,
                            on_call: Optional[Callable[[AttentionCall], None]] = None, *,
                            delegates: Optional[Mapping[str, Callable[..., torch.Tensor]]] = None
                            ) -> AttentionOverride:
    """An `optimized_attention_override` for ComfyUI's transformer_options.

    Each call runs under the plan in `transformer_options["headroom"]["attention"]` when the
    call carries one (the current run's; an OOM ladder may have tightened it), else `plan`.
    `delegates` maps the delegated methods to the host's attention functions, called with the
    model's own arguments.
    """
    delegates = dict(delegates or {})
    _check_delegate(plan, delegates)

    def override(func: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        call = dict(zip(_POSITIONAL_NAMES, args))
        # Keyword arguments win; the rest (transformer_options, scale, ...) are read below.
        call.update((name, kwargs[name]) for name in _POSITIONAL_NAMES if name in kwargs)
        run_state = (kwargs.get("transformer_options") or {}).get(HEADROOM_STATE_KEY) or {}
        current = run_state.get(ATTENTION_PLAN_KEY, plan)
        q, k, v, heads = call["q"], call["k"], call["v"], call["heads"]
        upcast_fp32 = current.upcast_fp32 or call.get("attn_precision") == torch.float32
        skip_reshape = bool(call.get("skip_reshape", False))
        enable_gqa = bool(kwargs.get("enable_gqa", False))
        unhandled = tuple(sorted(set(kwargs) - set(_POSITIONAL_NAMES) - HANDLED_KEYWORDS))

        def report(runner: str, shape: AttentionShape, kernel: str, query_chunk: int,
                   estimated: int, target: Optional[float]):
            if on_call is not None:
                on_call(AttentionCall(runner, kernel, query_chunk,
                                      -(-shape.q_len // max(query_chunk, 1)), shape.batch,
                                      shape.heads, shape.q_len, shape.k_len, upcast_fp32,
                                      estimated, target, shape.kv_heads, unhandled))

        if unhandled and current.method not in DELEGATED_METHODS:
            # An argument the chunks would silently ignore: the model's kernel gets the call,
            # every argument as it came.
            try:
                shape = attention_shape(q, k, v, heads, skip_reshape, enable_gqa)
            except ValueError:  # a layout only the model's kernel knows
                shape = AttentionShape(0, 0, 0, 0, 0, 0)
            report("model", shape, "", shape.q_len, 0, None)
            return _call_attention(func, args, kwargs, current.upcast_fp32)

        prepared = _prepare(q, k, v, heads, call.get("mask"), skip_reshape, upcast_fp32,
                            current.kernel, kwargs.get("scale"), enable_gqa)
        shape = prepared.shape

        if current.method in DELEGATED_METHODS:
            _check_delegate(current, delegates)
            report(current.method, shape, "", shape.q_len, prepared.transient_bytes(fused=False),
                   None)
            return _call_attention(delegates[current.method], args, kwargs, current.upcast_fp32)

        target_bytes, target_name = resolve_target_bytes(current, q.device, run_state)
        if current.method == "auto" and current.fused_kernel:
            # The device's kernel is memory-efficient where SDPA's would be for these tensors
            # (masks and dtypes limit both alike).
            whole_bytes = prepared.transient_bytes(
                fused=prepared.sdpa_backend in FUSED_SDPA_BACKENDS)
            if whole_bytes <= target_bytes:
                report("model", shape, "", shape.q_len, whole_bytes, target_bytes)
                return _call_attention(func, args, kwargs, current.upcast_fp32)

        query_chunk = prepared.chunk_rows(target_bytes, target_name)
        report("chunked", shape, prepared.kernel_name, query_chunk,
               prepared.transient_bytes(query_chunk), target_bytes)
        return _attend_in_chunks(prepared, query_chunk,
                                 bool(call.get("skip_output_reshape", False)))

    return override


def _check_delegate(plan: AttentionPlan, delegates: Mapping[str, Callable]) -> None:
    if plan.method in DELEGATED_METHODS and plan.method not in delegates:
        raise ValueError(f"attention method {plan.method!r} needs the host's attention function, "
                         f"and none was given (available: {', '.join(delegates) or 'none'})")


def _call_attention(function: Callable[..., torch.Tensor], args: tuple, kwargs: dict,
                    upcast_fp32: bool) -> torch.Tensor:
    """Call a host attention function with the model's arguments; fp32 asked through its own
    `attn_precision` argument."""
    if upcast_fp32:
        position = _POSITIONAL_NAMES.index("attn_precision")
        if len(args) > position:
            args = args[:position] + (torch.float32,) + args[position + 1:]
        else:
            kwargs = {**kwargs, "attn_precision": torch.float32}
    return function(*args, **kwargs)
