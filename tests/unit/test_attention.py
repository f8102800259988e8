"""Chunked attention against full-tensor SDPA, the chunk-size estimate, and the override."""
import math

import psutil
import pytest
import torch
import torch.nn.functional as F

from comfyui_headroom.memory import attention
from comfyui_headroom.memory.attention import (
    FUSED_SDPA_BACKENDS,
    AttentionPlan,
    attention_transient_bytes,
    chunked_attention,
    free_memory_bytes,
    install_attention_override,
    make_attention_override,
    query_chunk_size,
    sdpa_backend,
    set_attention_plan,
    smallest_chunk_bytes,
)

BATCH = 2
HEAD_DIM = 8
Q_LEN = 30  # 30 rows in chunks of 7: four full chunks and a ragged one of 2
QUERY_CHUNK = 7
CROSS_K_LEN = 11
TOLERANCE = 1e-5


def make_qkv(heads: int, k_len: int = Q_LEN, seed: int = 0):
    """q, k, v in [B, heads, N, dim_head] (fp32)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, heads, Q_LEN, HEAD_DIM, generator=generator)
    k = torch.randn(BATCH, heads, k_len, HEAD_DIM, generator=generator)
    v = torch.randn(BATCH, heads, k_len, HEAD_DIM, generator=generator)
    return q, k, v


def to_tokens(t: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, dim] -> ComfyUI's default [B, N, heads*dim]."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def target_for_chunk(heads: int, k_len: int, rows: int, dtype_bytes: int = 4,
                     fused: bool = False) -> int:
    """A byte target whose largest fitting chunk is exactly `rows` query rows (of Q_LEN), for
    math attention or (`fused`) a kernel that keeps no scores, such as SDPA's flash on the CPU."""
    return attention_transient_bytes(BATCH, heads, Q_LEN, k_len, HEAD_DIM, dtype_bytes,
                                      query_chunk=rows, fused=fused) + 1


RAGGED_CHUNKS = [7, 7, 7, 7, 2]


@pytest.fixture
def chunk_rows(monkeypatch):
    """The query rows of every chunk the module runs, through either kernel."""
    rows = []

    def counted(kernel):
        def run(q, *args, **kwargs):
            rows.append(q.shape[-2])
            return kernel(q, *args, **kwargs)
        return run

    monkeypatch.setattr(attention, "_math_attention", counted(attention._math_attention))
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        counted(F.scaled_dot_product_attention))
    return rows


def make_mask(kind: str, shape: tuple, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=generator) > 0.4
    keep[..., 0] = True  # every query keeps at least one key
    if kind == "bool":
        return keep
    return torch.where(keep, torch.rand(shape, generator=generator), torch.full(shape, -1e4))


def reference_mask(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI's promotion of a mask to 4-D, written out independently of the module."""
    return {2: lambda m: m[None, None], 3: lambda m: m[:, None], 4: lambda m: m}[mask.ndim](mask)


def reference(q, k, v, mask=None):
    """Attention written out in float64, independently of SDPA and of the module."""
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        mask = reference_mask(mask)
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask.double())
    return (scores.softmax(dim=-1) @ v.double()).float()


def test_sdpa_runs_a_fused_kernel_on_this_cpu():
    # The chunk sizes below assume it: SDPA's CPU flash kernel keeps no score matrix.
    q, k, v = make_qkv(5, CROSS_K_LEN)
    assert sdpa_backend(q, k, v) == "flash_attention"
    for mask in (make_mask("bool", (BATCH, 1, Q_LEN, CROSS_K_LEN)),
                 make_mask("additive", (BATCH, 1, 1, CROSS_K_LEN))):
        assert sdpa_backend(q, k, v, mask) in FUSED_SDPA_BACKENDS


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
@pytest.mark.parametrize("heads", [1, 5, 8])
@pytest.mark.parametrize("k_len", [Q_LEN, CROSS_K_LEN], ids=["self", "cross"])
def test_chunked_matches_full_attention(kernel, heads, k_len, chunk_rows):
    q, k, v = make_qkv(heads, k_len)
    fused = kernel == "sdpa"
    target = target_for_chunk(heads, k_len, QUERY_CHUNK, fused=fused)
    assert query_chunk_size(target, BATCH, heads, Q_LEN, k_len, HEAD_DIM, 4,
                            fused=fused) == QUERY_CHUNK

    out = chunked_attention(to_tokens(q), to_tokens(k), to_tokens(v), heads,
                            target_bytes=target, kernel=kernel)

    assert chunk_rows == RAGGED_CHUNKS
    assert out.shape == (BATCH, Q_LEN, heads * HEAD_DIM)
    torch.testing.assert_close(out, to_tokens(reference(q, k, v)),
                               atol=TOLERANCE, rtol=TOLERANCE)


MASK_SHAPES = {
    "q_k": (Q_LEN, CROSS_K_LEN),
    "b_q_k": (BATCH, Q_LEN, CROSS_K_LEN),
    "b_h_q_k": (BATCH, 5, Q_LEN, CROSS_K_LEN),
    "b_1_k": (BATCH, 1, CROSS_K_LEN),
    "b_1_1_k": (BATCH, 1, 1, CROSS_K_LEN),
}


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES.values(), ids=MASK_SHAPES.keys())
def test_masks_are_sliced_per_chunk(kernel, mask_kind, mask_shape, chunk_rows):
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    mask = make_mask(mask_kind, mask_shape)
    expected = reference(q, k, v, mask)
    # The mask must matter, or slicing it wrongly would go unnoticed.
    assert not torch.allclose(expected, reference(q, k, v), atol=1e-3)

    out = chunked_attention(q, k, v, heads, mask=mask, skip_reshape=True,
                            skip_output_reshape=True, kernel=kernel,
                            target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK,
                                                          fused=kernel == "sdpa"))

    assert chunk_rows == RAGGED_CHUNKS
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_layouts(skip_reshape, skip_output_reshape, chunk_rows):
    heads = 8
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    inputs = (q, k, v) if skip_reshape else tuple(to_tokens(t) for t in (q, k, v))
    expected = reference(q, k, v)
    if not skip_output_reshape:
        expected = to_tokens(expected)

    out = chunked_attention(*inputs, heads, skip_reshape=skip_reshape,
                            skip_output_reshape=skip_output_reshape,
                            target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK,
                                                          fused=True))

    assert chunk_rows == RAGGED_CHUNKS
    assert out.shape == expected.shape
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_upcast_math_kernel_on_half_precision():
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    expected = to_tokens(reference(q, k, v))
    half = [to_tokens(t).to(torch.bfloat16) for t in (q, k, v)]
    target = attention_transient_bytes(BATCH, heads, Q_LEN, CROSS_K_LEN, HEAD_DIM, 2,
                                       upcast_fp32=True, query_chunk=QUERY_CHUNK)

    out = chunked_attention(*half, heads, target_bytes=target, upcast_fp32=True, kernel="math")

    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_transient_estimate_counts_scores_softmax_output_and_layout_copies():
    b, h, q_len, k_len, d = 2, 8, 64, 77, 40
    # fp16, unchunked: the output and key/value copies, then per query row its scores and
    # softmax copy, its query copy and its output row, all at 2 bytes.
    fixed = b * h * d * (q_len * 2 + k_len * (2 + 2))
    row = b * h * (2 * k_len * 2 + d * (2 + 2))
    assert attention_transient_bytes(b, h, q_len, k_len, d, 2) == fixed + q_len * row
    assert attention_transient_bytes(b, h, q_len, k_len, d, 2, query_chunk=5) == fixed + 5 * row
    # Upcast: scores, softmax, the key copy and the query copy at 4 bytes; the rest stays fp16.
    fixed32 = b * h * d * (q_len * 2 + k_len * (4 + 2))
    row32 = b * h * (2 * k_len * 4 + d * (4 + 2))
    assert (attention_transient_bytes(b, h, q_len, k_len, d, 2, upcast_fp32=True)
            == fixed32 + q_len * row32)
    assert smallest_chunk_bytes(b, h, q_len, k_len, d, 2) == fixed + row
    # A fused kernel keeps, per row, only its softmax statistics (max and sum, fp32).
    fused_row = b * h * (2 * 4 + d * (2 + 2))
    assert attention_transient_bytes(b, h, q_len, k_len, d, 2, fused=True) == fixed + q_len * fused_row


def test_sdpa_that_cannot_name_a_fused_kernel_is_sized_as_math(monkeypatch, chunk_rows):
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    monkeypatch.setattr(attention, "sdpa_backend", lambda *tensors: "math")
    out = chunked_attention(q, k, v, heads, skip_reshape=True, skip_output_reshape=True,
                            kernel="sdpa", target_bytes=target_for_chunk(heads, CROSS_K_LEN,
                                                                         QUERY_CHUNK))
    assert chunk_rows == RAGGED_CHUNKS
    torch.testing.assert_close(out, reference(q, k, v), atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("upcast_fp32", [False, True])
@pytest.mark.parametrize("target_bytes", [5_560_000, 5_623_457, 7e6, 5e7, 10 ** 9])
def test_chunk_is_the_largest_that_fits(target_bytes, upcast_fp32):
    dims = dict(batch=2, heads=5, q_len=4096, k_len=77, head_dim=64, dtype_bytes=2,
                upcast_fp32=upcast_fp32)
    chunk = query_chunk_size(target_bytes, **dims)
    estimate = lambda rows: attention_transient_bytes(**dims, query_chunk=rows)  # noqa: E731

    assert 1 <= chunk <= dims["q_len"]
    assert estimate(chunk) <= target_bytes
    assert chunk == dims["q_len"] or estimate(chunk + 1) > target_bytes


@pytest.mark.parametrize("bad_target", [0, -5, float("nan"), float("inf"), "1GB", True])
def test_non_positive_target_is_refused(bad_target):
    with pytest.raises(ValueError, match="attention memory target must be a positive number"):
        query_chunk_size(bad_target, 1, 1, 4, 4, 8, 4)
    with pytest.raises(ValueError, match="attention memory target"):
        AttentionPlan(target_bytes=bad_target)


def test_target_below_one_query_row_is_refused_with_the_shape():
    q, k, v = make_qkv(8)
    row = smallest_chunk_bytes(BATCH, 8, Q_LEN, Q_LEN, HEAD_DIM, 4, fused=True)
    with pytest.raises(ValueError) as error:
        chunked_attention(q, k, v, 8, skip_reshape=True, target_bytes=row - 1)
    message = str(error.value)
    assert "attention memory target" in message
    assert "below the smallest possible chunk" in message
    assert f"{row / 2 ** 20:.3g} MB for one query row" in message
    assert "8 heads" in message and f"{Q_LEN} queries x {Q_LEN} keys" in message
    # Exactly one row fits.
    out = chunked_attention(q, k, v, 8, skip_reshape=True, skip_output_reshape=True,
                            target_bytes=row)
    torch.testing.assert_close(out, reference(q, k, v), atol=TOLERANCE, rtol=TOLERANCE)


def test_bad_inputs_are_named():
    q, k, v = make_qkv(8)
    tokens = [to_tokens(t) for t in (q, k, v)]
    with pytest.raises(ValueError, match="64 channels, not divisible by 5 heads"):
        chunked_attention(*tokens, 5, target_bytes=10 ** 6)
    with pytest.raises(ValueError, match="head count must be a positive whole number"):
        chunked_attention(*tokens, 0, target_bytes=10 ** 6)
    with pytest.raises(ValueError, match=r"attention mask of shape \[3, 30\] does not fit"):
        chunked_attention(*tokens, 8, mask=torch.ones(3, Q_LEN, dtype=torch.bool),
                          target_bytes=10 ** 6)
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        chunked_attention(*tokens, 8, target_bytes=10 ** 6, kernel="flash")
    with pytest.raises(ValueError, match="attention query must be"):
        chunked_attention(q, k, v, 8, target_bytes=10 ** 6)
    with pytest.raises(ValueError, match="attention method must be one of"):
        AttentionPlan(target_bytes=10 ** 6, method="sometimes")


class CountingAttention:
    """Stands in for the model's own attention function; counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, heads, mask=None, attn_precision=None, **kwargs):
        self.calls.append({**kwargs, "attn_precision": attn_precision})
        b, n, _ = q.shape
        split = lambda t: t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        return to_tokens(F.scaled_dot_product_attention(split(q), split(k), split(v)))


COMFY_KWARGS = dict(transformer_options={"optimized_attention_override": None},
                    _inside_attn_wrapper=True, attn_precision=None, some_future_key=3)


def test_override_auto_passes_through_when_it_fits_a_fused_kernel():
    heads = 5
    q, k, v = (to_tokens(t) for t in make_qkv(heads, CROSS_K_LEN))
    func, records = CountingAttention(), []
    whole = attention_transient_bytes(BATCH, heads, Q_LEN, CROSS_K_LEN, HEAD_DIM, 4, fused=True)
    plan = AttentionPlan(target_bytes=whole, fused_kernel=True)
    override = make_attention_override(plan, on_call=records.append)

    out = override(func, q, k, v, heads, **COMFY_KWARGS)

    assert len(func.calls) == 1
    assert func.calls[0] == COMFY_KWARGS  # kwargs forwarded unchanged
    assert [(r.runner, r.query_chunk, r.chunk_count) for r in records] == [("model", Q_LEN, 1)]
    assert records[0].target_bytes == whole
    torch.testing.assert_close(out, func(q, k, v, heads))


def test_override_auto_chunks_without_a_fused_kernel_even_when_it_fits():
    # Only math attention on the device: the model's kernel would materialise every score, so
    # Headroom runs the call itself, here as one chunk.
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    func, records = CountingAttention(), []
    whole = attention_transient_bytes(BATCH, heads, Q_LEN, CROSS_K_LEN, HEAD_DIM, 4)
    override = make_attention_override(AttentionPlan(target_bytes=whole), on_call=records.append)

    out = override(func, *(to_tokens(t) for t in (q, k, v)), heads, **COMFY_KWARGS)

    assert func.calls == []
    assert [(r.runner, r.query_chunk, r.chunk_count) for r in records] == [("chunked", Q_LEN, 1)]
    torch.testing.assert_close(out, to_tokens(reference(q, k, v)), atol=TOLERANCE, rtol=TOLERANCE)


def comfy_kwargs(run_state: dict) -> dict:
    """ComfyUI's keyword arguments for one call, with a run's transformer_options["headroom"]."""
    return {**COMFY_KWARGS, "transformer_options": {"optimized_attention_override": None,
                                                    "headroom": run_state}}


def test_override_auto_chunks_when_it_does_not_fit():
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    tokens = [to_tokens(t) for t in (q, k, v)]
    mask = make_mask("additive", (BATCH, Q_LEN, CROSS_K_LEN))
    func, records = CountingAttention(), []
    plan = AttentionPlan(target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK, fused=True),
                         fused_kernel=True)
    override = make_attention_override(plan, on_call=records.append)

    # The mask arrives as the fifth positional argument.
    out = override(func, *tokens, heads, mask, **COMFY_KWARGS)

    assert func.calls == []
    record = records[0]
    assert (record.runner, record.kernel, record.query_chunk, record.chunk_count) == (
        "chunked", "sdpa-flash_attention", QUERY_CHUNK, 5)
    assert record.chunked
    assert record.estimated_bytes <= plan.target_bytes == record.target_bytes
    torch.testing.assert_close(out, to_tokens(reference(q, k, v, mask)),
                               atol=TOLERANCE, rtol=TOLERANCE)


def test_override_runs_under_the_plan_of_the_current_run():
    """An OOM ladder puts a tighter plan into one run's transformer_options; the override reads
    it at call time, and the model's own options keep the plan it was built with."""
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    tokens = [to_tokens(t) for t in (q, k, v)]
    func, records = CountingAttention(), []
    plan = AttentionPlan(target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK, fused=True),
                         method="chunked")
    model_options = {}
    install_attention_override(model_options, plan,
                               make_attention_override(plan, on_call=records.append))
    model_state = model_options["headroom"]

    run_options = {**model_options, "headroom": dict(model_options["headroom"])}
    halved = AttentionPlan(target_bytes=target_for_chunk(heads, CROSS_K_LEN, 3, fused=True),
                           method="chunked")
    set_attention_plan(run_options, halved)
    override = run_options["optimized_attention_override"]
    out = override(func, *tokens, heads, **{**COMFY_KWARGS, "transformer_options": run_options})

    assert (records[0].query_chunk, records[0].chunk_count) == (3, math.ceil(Q_LEN / 3))
    assert records[0].target_bytes == halved.target_bytes
    torch.testing.assert_close(out, to_tokens(reference(q, k, v)), atol=TOLERANCE, rtol=TOLERANCE)
    assert model_options["headroom"] is model_state and model_state["attention"] is plan

    # A call without a run's plan (or without transformer_options at all) uses the built-in one.
    override(func, *tokens, heads, **COMFY_KWARGS)
    override(func, *tokens, heads)
    assert [r.query_chunk for r in records[1:]] == [QUERY_CHUNK, QUERY_CHUNK]


def test_auto_target_is_the_activation_memory_of_the_budget():
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    func, records = CountingAttention(), []
    activation = target_for_chunk(heads, CROSS_K_LEN, 4, fused=True)
    override = make_attention_override(AttentionPlan(fused_kernel=True), on_call=records.append)

    out = override(func, *(to_tokens(t) for t in (q, k, v)), heads,
                   **comfy_kwargs({"activation_bytes": activation}))

    assert func.calls == []  # the whole call does not fit the budget's activation memory
    assert (records[0].runner, records[0].query_chunk) == ("chunked", 4)
    assert records[0].target_bytes == activation
    torch.testing.assert_close(out, to_tokens(reference(q, k, v)), atol=TOLERANCE, rtol=TOLERANCE)


def test_auto_target_without_a_budget_is_half_the_free_memory_at_call_time(monkeypatch):
    heads = 5
    tokens = [to_tokens(t) for t in make_qkv(heads, CROSS_K_LEN)]
    free = {"bytes": 2 * target_for_chunk(heads, CROSS_K_LEN, 6, fused=True)}
    seen_devices = []

    def fake_free_memory(device):
        seen_devices.append(device)
        return free["bytes"]

    monkeypatch.setattr(attention, "free_memory_bytes", fake_free_memory)
    records = []
    override = make_attention_override(AttentionPlan(), on_call=records.append)
    override(CountingAttention(), *tokens, heads, **comfy_kwargs({}))
    free["bytes"] = 2 * target_for_chunk(heads, CROSS_K_LEN, 2, fused=True)  # memory taken meanwhile
    override(CountingAttention(), *tokens, heads, **comfy_kwargs({}))

    assert seen_devices == [torch.device("cpu")] * 2  # the tensors' device, read per call
    assert [r.query_chunk for r in records] == [6, 2]
    assert records[1].target_bytes == free["bytes"] / 2


def test_free_memory_of_the_cpu_is_the_available_ram():
    available = psutil.virtual_memory().available
    assert free_memory_bytes(torch.device("cpu")) == pytest.approx(available, rel=0.05)


def test_errors_name_the_target_and_where_an_auto_target_came_from(monkeypatch):
    heads = 8
    tokens = [to_tokens(t) for t in make_qkv(heads)]
    row = smallest_chunk_bytes(BATCH, heads, Q_LEN, Q_LEN, HEAD_DIM, 4, fused=True)

    named = AttentionPlan(target_bytes=row - 1, method="chunked", target_name="target_mb")
    with pytest.raises(ValueError, match="^target_mb .* below the smallest possible chunk"):
        make_attention_override(named)(CountingAttention(), *tokens, heads)

    auto = AttentionPlan(target_name="target_mb")
    with pytest.raises(ValueError, match=r"target_mb \(auto: the activation memory of the "
                                         r"Offload Model budget\) .* below the smallest"):
        make_attention_override(auto)(CountingAttention(), *tokens, heads,
                                      **comfy_kwargs({"activation_bytes": row - 1}))
    with pytest.raises(ValueError, match=r"activation memory .* must be a positive number"):
        make_attention_override(auto)(CountingAttention(), *tokens, heads,
                                      **comfy_kwargs({"activation_bytes": -1}))
    monkeypatch.setattr(attention, "free_memory_bytes", lambda device: row)
    with pytest.raises(ValueError, match=r"target_mb \(auto: 50% of the .* free on cpu\)"):
        make_attention_override(auto)(CountingAttention(), *tokens, heads)


def test_override_chunked_method_always_chunks_and_honours_layout_kwargs():
    heads = 8
    q, k, v = make_qkv(heads)
    func, records = CountingAttention(), []
    plan = AttentionPlan(target_bytes=10 ** 9, method="chunked", kernel="math")
    override = make_attention_override(plan, on_call=records.append)

    out = override(func, q, k, v, heads, skip_reshape=True, skip_output_reshape=True,
                   **{**COMFY_KWARGS, "attn_precision": torch.float32})

    assert func.calls == []
    record = records[0]
    assert (record.chunked, record.kernel, record.query_chunk, record.chunk_count) == (
        True, "math", Q_LEN, 1)
    assert record.upcast_fp32
    torch.testing.assert_close(out, reference(q, k, v), atol=TOLERANCE, rtol=TOLERANCE)


def test_override_refuses_a_target_below_one_row():
    heads = 8
    q, k, v = (to_tokens(t) for t in make_qkv(heads))
    plan = AttentionPlan(target_bytes=1.0, method="chunked")
    with pytest.raises(ValueError, match="below the smallest possible chunk"):
        make_attention_override(plan)(CountingAttention(), q, k, v, heads)


@pytest.mark.parametrize("method", ["comfy split", "sub-quadratic"])
def test_delegated_methods_call_the_host_function_with_the_model_arguments(method):
    heads = 5
    tokens = [to_tokens(t) for t in make_qkv(heads, CROSS_K_LEN)]
    model_func, host_func, records = CountingAttention(), CountingAttention(), []
    override = make_attention_override(AttentionPlan(method=method), on_call=records.append,
                                       delegates={method: host_func})

    out = override(model_func, *tokens, heads, **COMFY_KWARGS)

    assert model_func.calls == [] and host_func.calls == [COMFY_KWARGS]
    assert [(r.runner, r.target_bytes) for r in records] == [(method, None)]
    torch.testing.assert_close(out, model_func(*tokens, heads))


def test_fp32_option_reaches_the_kernels_headroom_does_not_run():
    heads = 5
    tokens = [to_tokens(t) for t in make_qkv(heads, CROSS_K_LEN)]
    func, host_func = CountingAttention(), CountingAttention()
    fits = AttentionPlan(target_bytes=10 ** 9, upcast_fp32=True, fused_kernel=True)
    make_attention_override(fits)(func, *tokens, heads, **COMFY_KWARGS)
    # attn_precision given positionally (sixth argument) is replaced, not duplicated.
    make_attention_override(fits)(func, *tokens, heads, None, None)
    split = AttentionPlan(method="comfy split", upcast_fp32=True)
    make_attention_override(split, delegates={"comfy split": host_func})(func, *tokens, heads)

    assert func.calls[0] == {**COMFY_KWARGS, "attn_precision": torch.float32}
    assert func.calls[1] == {"attn_precision": torch.float32}
    assert host_func.calls == [{"attn_precision": torch.float32}]


def test_a_delegated_method_needs_its_host_function():
    with pytest.raises(ValueError, match="'comfy split' needs the host's attention function"):
        make_attention_override(AttentionPlan(method="comfy split"))


def test_install_replaces_the_headroom_dict_instead_of_changing_it():
    shared = {"offload": "settings of another node"}
    options = {"headroom": shared, "optimized_attention_override": "someone else's"}
    plan = AttentionPlan(target_bytes=10 ** 6)
    override = make_attention_override(plan)

    assert install_attention_override(options, plan, override) is True
    assert options["optimized_attention_override"] is override
    assert options["headroom"] == {"offload": "settings of another node", "attention": plan}
    assert shared == {"offload": "settings of another node"}  # the incoming dict is untouched
    assert install_attention_override({}, plan, override) is False


def test_plan_is_frozen_and_auto_by_default():
    plan = AttentionPlan()
    assert (plan.target_bytes, plan.method, plan.fused_kernel) == (None, "auto", False)
    with pytest.raises(AttributeError):
        plan.target_bytes = 5
