"""Chunked ("sliced") attention under a memory target, and ComfyUI's override callable.

Math attention materialises a score matrix of batch * heads * queries * keys elements; at
high resolution that matrix, not the weights, is what runs a small GPU out of memory. Running
the queries in chunks bounds it: each chunk's scores are computed, used and freed before the
next, and each chunk's output is written straight into one preallocated output tensor.

Pure torch and plain data: no ComfyUI imports. The override follows ComfyUI's calling
convention (`transformer_options["optimized_attention_override"]`, `fn(func, *args, **kwargs)`)
and reads the plan of the current sampling run from `transformer_options["headroom"]`.
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


# --- memory estimate -------------------------------------------------------------------------

def _fixed_and_row_bytes(batch: int, heads: int, q_len: int, k_len: int, head_dim: int,
                         dtype_bytes: int, upcast_fp32: bool, fused: bool) -> tuple[int, int]:
    score_bytes = FP32_BYTES if upcast_fp32 else dtype_bytes
    # Whatever the chunk: the output, and [B, heads, N, dim] copies of key (fp32 when upcasting)
    # and value, made once so no chunk copies them again.
    fixed = batch * heads * head_dim * (q_len * dtype_bytes + k_len * (score_bytes + dtype_bytes))
    # Per query row: its query copy and output row; then either its scores and their softmax
    # (math), or a fused kernel's softmax statistics (running max and sum, fp32).
    scores = 2 * FP32_BYTES if fused else 2 * k_len * score_bytes
    row = batch * heads * (scores + head_dim * (score_bytes + dtype_bytes))
    return fixed, row


def attention_transient_bytes(batch: int, heads: int, q_len: int, k_len: int, head_dim: int,
                              dtype_bytes: int, upcast_fp32: bool = False,
                              query_chunk: Optional[int] = None, *, fused: bool = False) -> int:
    """Bytes one attention call allocates, run in chunks of `query_chunk` query rows (None:
    unchunked): output and key/value layout copies, plus one chunk's query copy, output rows
    and, for math attention, its scores and their softmax (fp32 when upcast is requested).
    A `fused` kernel (SDPA flash/memory-efficient) keeps per row only softmax statistics; its
    per-thread tiles (well under 1 MB a thread) are not counted.
    """
    fixed, row = _fixed_and_row_bytes(batch, heads, q_len, k_len, head_dim, dtype_bytes,
                                      upcast_fp32, fused)
    return fixed + (q_len if query_chunk is None else query_chunk) * row


def smallest_chunk_bytes(batch: int, heads: int, q_len: int, k_len: int, head_dim: int,
                         dtype_bytes: int, upcast_fp32: bool = False, *,
                         fused: bool = False) -> int:
    """Transient bytes of the smallest possible chunk: one query row (all batches and heads)."""
    return attention_transient_bytes(batch, heads, q_len, k_len, head_dim, dtype_bytes,
                                      upcast_fp32, query_chunk=1, fused=fused)


def query_chunk_size(target_bytes: float, batch: int, heads: int, q_len: int, k_len: int,
                     head_dim: int, dtype_bytes: int, upcast_fp32: bool = False,
                     target_name: str = "attention memory target", *,
                     fused: bool = False) -> int:
    """Largest number of query rows whose call fits `target_bytes` (at most `q_len`).

    Raises ValueError, naming the target `target_name`, when it is not a positive number or
    is below one query row.
    """
    _check_target(target_bytes, target_name)
    fixed, row = _fixed_and_row_bytes(batch, heads, q_len, k_len, head_dim, dtype_bytes,
                                      upcast_fp32, fused)
    if target_bytes < fixed + row:
        raise ValueError(
            f"{target_name} {_mb(target_bytes)} is below the smallest possible chunk "
            f"({_mb(fixed + row)} for one query row at this shape: batch {batch}, {heads} heads, "
            f"{q_len} queries x {k_len} keys, head size {head_dim}); raise {target_name} "
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

def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> str:
    """The kernel PyTorch's scaled_dot_product_attention picks for these [B, heads, N, dim]
    inputs: "flash_attention", "efficient_attention", "cudnn_attention", "math"... and "math"
    when torch cannot say, so that estimates built on the answer stay upper bounds."""
    try:
        from torch.nn.attention import SDPBackend
        # SDPA's own dispatch decision: private, but present since torch 2.0.
        return SDPBackend(torch._fused_sdp_choice(q, k, v, mask)).name.lower()
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return "math"


@dataclass(frozen=True)
class _PreparedCall:
    """One call's tensors in [B, heads, N, dim] layout and the kernel its chunks run."""
    shape: AttentionShape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]  # broadcastable to [B, heads, queries, keys]
    kernel: str  # "math" (Headroom's explicit kernel) or "sdpa"
    sdpa_backend: str  # what SDPA picks for these tensors
    upcast_fp32: bool

    @property
    def kernel_name(self) -> str:
        return self.kernel if self.kernel == "math" else f"sdpa-{self.sdpa_backend}"

    @property
    def fused(self) -> bool:
        """The chunks run a kernel that never materialises the scores."""
        return self.kernel == "sdpa" and self.sdpa_backend in FUSED_SDPA_BACKENDS

    def transient_bytes(self, query_chunk: Optional[int] = None,
                        fused: Optional[bool] = None) -> int:
        s = self.shape
        return attention_transient_bytes(s.batch, s.heads, s.q_len, s.k_len, s.head_dim,
                                          self.q.element_size(), self.upcast_fp32, query_chunk,
                                          fused=self.fused if fused is None else fused)

    def chunk_rows(self, target_bytes: float, target_name: str) -> int:
        s = self.shape
        return query_chunk_size(target_bytes, s.batch, s.heads, s.q_len, s.k_len, s.head_dim,
                                self.q.element_size(), self.upcast_fp32, target_name,
                                fused=self.fused)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
             mask: Optional[torch.Tensor], skip_reshape: bool, upcast_fp32: bool,
             kernel: AttentionKernel) -> _PreparedCall:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {', '.join(ATTENTION_KERNELS)}, "
                         f"got {kernel!r}")
    shape = attention_shape(q, k, v, heads, skip_reshape)
    if not skip_reshape:
        b, h, d = shape.batch, shape.heads, shape.head_dim
        q, k, v = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (q, k, v))
    mask4 = None if mask is None else _mask_4d(mask, shape)
    if kernel == "auto":
        # SDPA keeps its softmax statistics in fp32 only in its fused kernels; when fp32 is
        # asked for on a half-precision input, the explicit math kernel is the one we control.
        kernel = "math" if upcast_fp32 and q.dtype != torch.float32 else "sdpa"
    sdpa_mask = mask4
    if mask4 is not None and mask4.dtype != torch.bool:
        sdpa_mask = mask4.to(q.dtype)
    backend = sdpa_backend(q, k, v, sdpa_mask)
    return _PreparedCall(shape, q, k, v, sdpa_mask if kernel == "sdpa" else mask4, kernel,
                         backend, upcast_fp32)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                      mask: Optional[torch.Tensor] = None, target_bytes: float,
                      skip_reshape: bool = False, skip_output_reshape: bool = False,
                      upcast_fp32: bool = False, kernel: AttentionKernel = "auto") -> torch.Tensor:
    """Attention with the query rows split into chunks so the call fits `target_bytes`.

    Layouts as in ComfyUI: q, k, v are [B, N, heads*dim_head] unless `skip_reshape` (then
    [B, heads, N, dim_head]); the output is [B, N, heads*dim_head] unless
    `skip_output_reshape` (then [B, heads, N, dim_head]).
    """
    prepared = _prepare(q, k, v, heads, mask, skip_reshape, upcast_fp32, kernel)
    query_chunk = prepared.chunk_rows(target_bytes, "attention memory target")
    return _attend_in_chunks(prepared, query_chunk, skip_output_reshape)


def _attend_in_chunks(call: _PreparedCall, query_chunk: int,
                      skip_output_reshape: bool) -> torch.Tensor:
    shape, q, k, v, mask4 = call.shape, call.q, call.k, call.v, call.mask
    b, h, d = shape.batch, shape.heads, shape.head_dim
    scale = d ** -0.5

    def attend(start: int, stop: int) -> torch.Tensor:
        mask_chunk = None
        if mask4 is not None:
            # A mask without a query dimension (size 1) broadcasts over every chunk.
            mask_chunk = mask4[:, :, start:stop] if mask4.shape[2] > 1 else mask4
        if call.kernel == "sdpa":
            return F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=mask_chunk,
                                                  scale=scale)
        return _math_attention(q[:, :, start:stop], k, v, mask_chunk, scale, call.upcast_fp32)

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

    @property
    def chunked(self) -> bool:
        return self.runner == "chunked"

    def log_line(self) -> str:
        target = "none" if self.target_bytes is None else _mb(self.target_bytes).replace(" ", "")
        return (f"Headroom attention: runner={self.runner} kernel={self.kernel or '-'} "
                f"batch={self.batch} heads={self.heads} queries={self.q_len} keys={self.k_len} "
                f"chunk={self.query_chunk} chunks={self.chunk_count} "
                f"estimate={_mb(self.estimated_bytes).replace(' ', '')} target={target} "
                f"fp32={'yes' if self.upcast_fp32 else 'no'}")


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
        # Keyword arguments win; unknown keys (transformer_options, ...) are not ours.
        call.update((name, kwargs[name]) for name in _POSITIONAL_NAMES if name in kwargs)
        run_state = (kwargs.get("transformer_options") or {}).get(HEADROOM_STATE_KEY) or {}
        current = run_state.get(ATTENTION_PLAN_KEY, plan)
        q, k, v, heads = call["q"], call["k"], call["v"], call["heads"]
        upcast_fp32 = current.upcast_fp32 or call.get("attn_precision") == torch.float32
        prepared = _prepare(q, k, v, heads, call.get("mask"), bool(call.get("skip_reshape", False)),
                            upcast_fp32, current.kernel)
        shape = prepared.shape

        def report(runner: str, kernel: str, query_chunk: int, estimated: int,
                   target: Optional[float]):
            if on_call is not None:
                on_call(AttentionCall(runner, kernel, query_chunk, -(-shape.q_len // query_chunk),
                                      shape.batch, shape.heads, shape.q_len, shape.k_len,
                                      upcast_fp32, estimated, target))

        if current.method in DELEGATED_METHODS:
            _check_delegate(current, delegates)
            report(current.method, "", shape.q_len, prepared.transient_bytes(fused=False), None)
            return _call_attention(delegates[current.method], args, kwargs, current.upcast_fp32)

        target_bytes, target_name = resolve_target_bytes(current, q.device, run_state)
        if current.method == "auto" and current.fused_kernel:
            # The device's kernel is memory-efficient where SDPA's would be for these tensors
            # (masks and dtypes limit both alike).
            whole_bytes = prepared.transient_bytes(
                fused=prepared.sdpa_backend in FUSED_SDPA_BACKENDS)
            if whole_bytes <= target_bytes:
                report("model", "", shape.q_len, whole_bytes, target_bytes)
                return _call_attention(func, args, kwargs, current.upcast_fp32)

        query_chunk = prepared.chunk_rows(target_bytes, target_name)
        report("chunked", prepared.kernel_name, query_chunk, prepared.transient_bytes(query_chunk),
               target_bytes)
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
