"""Chunked attention against full-tensor SDPA, the chunk-size estimate, and the override."""
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_headroom.memory.attention import (
    AttentionPlan,
    attention_transient_bytes,
    chunked_attention,
    make_attention_override,
    query_chunk_size,
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


def target_for_chunk(heads: int, k_len: int, rows: int, dtype_bytes: int = 4) -> int:
    """A byte target whose largest fitting chunk is exactly `rows` query rows."""
    return attention_transient_bytes(BATCH, heads, rows, k_len, HEAD_DIM, dtype_bytes) + 1


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
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else reference_mask(mask))


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
@pytest.mark.parametrize("heads", [1, 5, 8])
@pytest.mark.parametrize("k_len", [Q_LEN, CROSS_K_LEN], ids=["self", "cross"])
def test_chunked_matches_full_attention(kernel, heads, k_len):
    q, k, v = make_qkv(heads, k_len)
    target = target_for_chunk(heads, k_len, QUERY_CHUNK)
    assert query_chunk_size(target, BATCH, heads, Q_LEN, k_len, HEAD_DIM, 4) == QUERY_CHUNK

    out = chunked_attention(to_tokens(q), to_tokens(k), to_tokens(v), heads,
                            target_bytes=target, kernel=kernel)

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
def test_masks_are_sliced_per_chunk(kernel, mask_kind, mask_shape):
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    mask = make_mask(mask_kind, mask_shape)
    expected = reference(q, k, v, mask)
    # The mask must matter, or slicing it wrongly would go unnoticed.
    assert not torch.allclose(expected, reference(q, k, v), atol=1e-3)

    out = chunked_attention(q, k, v, heads, mask=mask, skip_reshape=True,
                            skip_output_reshape=True, kernel=kernel,
                            target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK))

    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
def test_layouts(skip_reshape, skip_output_reshape):
    heads = 8
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    inputs = (q, k, v) if skip_reshape else tuple(to_tokens(t) for t in (q, k, v))
    expected = reference(q, k, v)
    if not skip_output_reshape:
        expected = to_tokens(expected)

    out = chunked_attention(*inputs, heads, skip_reshape=skip_reshape,
                            skip_output_reshape=skip_output_reshape,
                            target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK))

    assert out.shape == expected.shape
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_upcast_math_kernel_on_half_precision():
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    expected = to_tokens(reference(q, k, v))
    half = [to_tokens(t).to(torch.bfloat16) for t in (q, k, v)]
    target = attention_transient_bytes(BATCH, heads, QUERY_CHUNK, CROSS_K_LEN, HEAD_DIM, 2,
                                       upcast_fp32=True)

    out = chunked_attention(*half, heads, target_bytes=target, upcast_fp32=True, kernel="math")

    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_transient_estimate_counts_scores_softmax_and_output():
    # fp16: scores and softmax copy at 2 bytes, output at 2 bytes.
    assert attention_transient_bytes(2, 8, 64, 77, 40, 2) == 2 * 8 * 64 * (2 * 77 * 2 + 40 * 2)
    # Upcast: scores and softmax at 4 bytes, output stays fp16.
    assert (attention_transient_bytes(2, 8, 64, 77, 40, 2, upcast_fp32=True)
            == 2 * 8 * 64 * (2 * 77 * 4 + 40 * 2))
    assert smallest_chunk_bytes(2, 8, 77, 40, 2) == attention_transient_bytes(2, 8, 1, 77, 40, 2)


@pytest.mark.parametrize("upcast_fp32", [False, True])
@pytest.mark.parametrize("target_bytes", [20_000, 123_457, 1_000_000, 5e6, 10 ** 9])
def test_chunk_is_the_largest_that_fits(target_bytes, upcast_fp32):
    dims = dict(batch=2, heads=5, q_len=4096, k_len=77, head_dim=64, dtype_bytes=2,
                upcast_fp32=upcast_fp32)
    chunk = query_chunk_size(target_bytes, **dims)
    estimate = lambda rows: attention_transient_bytes(  # noqa: E731
        dims["batch"], dims["heads"], rows, dims["k_len"], dims["head_dim"],
        dims["dtype_bytes"], upcast_fp32)

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
    row = smallest_chunk_bytes(BATCH, 8, Q_LEN, HEAD_DIM, 4)
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

    def __call__(self, q, k, v, heads, mask=None, **kwargs):
        self.calls.append(kwargs)
        b, n, _ = q.shape
        split = lambda t: t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        return to_tokens(F.scaled_dot_product_attention(split(q), split(k), split(v)))


COMFY_KWARGS = dict(transformer_options={"optimized_attention_override": None},
                    _inside_attn_wrapper=True, attn_precision=None, some_future_key=3)


def test_override_auto_passes_through_when_it_fits():
    heads = 5
    q, k, v = (to_tokens(t) for t in make_qkv(heads, CROSS_K_LEN))
    func, records = CountingAttention(), []
    whole = attention_transient_bytes(BATCH, heads, Q_LEN, CROSS_K_LEN, HEAD_DIM, 4)
    override = make_attention_override(AttentionPlan(target_bytes=whole), on_call=records.append)

    out = override(func, q, k, v, heads, **COMFY_KWARGS)

    assert len(func.calls) == 1
    assert func.calls[0] == COMFY_KWARGS  # kwargs forwarded unchanged
    assert [(r.chunked, r.query_chunk, r.chunk_count) for r in records] == [(False, Q_LEN, 1)]
    torch.testing.assert_close(out, func(q, k, v, heads))


def test_override_auto_chunks_when_it_does_not_fit():
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    tokens = [to_tokens(t) for t in (q, k, v)]
    mask = make_mask("additive", (BATCH, Q_LEN, CROSS_K_LEN))
    func, records = CountingAttention(), []
    plan = AttentionPlan(target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK))
    override = make_attention_override(plan, on_call=records.append)

    # The mask arrives as the fifth positional argument.
    out = override(func, *tokens, heads, mask, **COMFY_KWARGS)

    assert func.calls == []
    record = records[0]
    assert (record.chunked, record.query_chunk, record.chunk_count) == (True, QUERY_CHUNK, 5)
    assert record.estimated_bytes <= plan.target_bytes
    torch.testing.assert_close(out, to_tokens(reference(q, k, v, mask)),
                               atol=TOLERANCE, rtol=TOLERANCE)

    # An OOM ladder halves the target on the same plan; the next call uses smaller chunks.
    plan.target_bytes /= 2
    out = override(func, *tokens, heads, mask=mask, **COMFY_KWARGS)
    assert records[1].query_chunk == 3 and records[1].chunk_count == math.ceil(Q_LEN / 3)
    torch.testing.assert_close(out, to_tokens(reference(q, k, v, mask)),
                               atol=TOLERANCE, rtol=TOLERANCE)


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
    assert (record.chunked, record.query_chunk, record.chunk_count) == (True, Q_LEN, 1)
    assert record.upcast_fp32
    torch.testing.assert_close(out, reference(q, k, v), atol=TOLERANCE, rtol=TOLERANCE)


def test_override_refuses_a_target_below_one_row():
    heads = 8
    q, k, v = (to_tokens(t) for t in make_qkv(heads))
    plan = AttentionPlan(target_bytes=1.0, method="chunked")
    with pytest.raises(ValueError, match="below the smallest possible chunk"):
        make_attention_override(plan)(CountingAttention(), q, k, v, heads)
