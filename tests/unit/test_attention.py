"""Chunked attention against full-tensor SDPA, the chunk-size estimate, the override, and one
chunked call's real peak memory against its target."""
import json
import math
import pathlib
import subprocess
import sys
import textwrap

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
)

SDPA = F.scaled_dot_product_attention  # the reference, kept from before any test counts its calls

BATCH = 2
HEAD_DIM = 8
Q_LEN = 30  # 30 rows in chunks of 7: four full chunks and a ragged one of 2
QUERY_CHUNK = 7
CROSS_K_LEN = 11
TOLERANCE = 1e-5


def make_qkv(heads: int, k_len: int = Q_LEN, seed: int = 0, kv_heads: int | None = None):
    """q in [B, heads, N, dim_head], k and v in [B, kv_heads (default: heads), N, dim_head] (fp32)."""
    generator = torch.Generator().manual_seed(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.randn(BATCH, heads, Q_LEN, HEAD_DIM, generator=generator)
    k = torch.randn(BATCH, kv_heads, k_len, HEAD_DIM, generator=generator)
    v = torch.randn(BATCH, kv_heads, k_len, HEAD_DIM, generator=generator)
    return q, k, v


def to_tokens(t: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, dim] -> ComfyUI's default [B, N, heads*dim]."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def call_bytes(heads: int, k_len: int, rows: int, dtype_bytes: int = 4, fused: bool = False,
               kv_heads: int | None = None, upcast_fp32: bool = False, batch: int = BATCH,
               q_len: int = Q_LEN, head_dim: int = HEAD_DIM) -> int:
    """What one chunked call allocates, written out here from the design (not with the
    module's estimator): the output and the key/value copies (key in fp32 when upcasting),
    whatever the chunk; per query row its query copy and output row, and either its scores and
    their softmax (math) or a fused kernel's softmax statistics (max and sum, fp32)."""
    kv_heads = heads if kv_heads is None else kv_heads
    score_bytes = 4 if upcast_fp32 else dtype_bytes
    output = batch * heads * q_len * head_dim * dtype_bytes
    key_value = batch * kv_heads * k_len * head_dim * (score_bytes + dtype_bytes)
    per_row_scores = 2 * 4 if fused else 2 * k_len * score_bytes
    per_row = batch * heads * (per_row_scores + head_dim * (score_bytes + dtype_bytes))
    return output + key_value + rows * per_row


def target_for_chunk(heads: int, k_len: int, rows: int, dtype_bytes: int = 4,
                     fused: bool = False, kv_heads: int | None = None) -> int:
    """A byte target whose largest fitting chunk is exactly `rows` query rows (of Q_LEN), for
    math attention or (`fused`) a kernel that keeps no scores, such as SDPA's flash on the CPU."""
    return call_bytes(heads, k_len, rows, dtype_bytes, fused, kv_heads) + 1


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


def reference(q, k, v, mask=None, scale=None):
    """Attention written out in float64, independently of SDPA and of the module; key/value
    with fewer heads serve consecutive query heads (grouped-query attention)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q.double() @ k.double().transpose(-1, -2) * scale
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


# --- scale= and enable_gqa= (newer ComfyUI passes both) ---------------------------------------

SCALE = 0.23  # not SDPA's default 1/sqrt(HEAD_DIM) = 0.354
# (query heads, key/value heads): grouped-query attention, and plain attention for comparison
GQA_HEADS = {"8q-2kv": (8, 2), "8q-4kv": (8, 4), "6q-3kv": (6, 3), "4q-1kv": (4, 1), "5q-5kv": (5, 5)}


@pytest.fixture
def sdpa_calls(monkeypatch):
    """What every SDPA call of the module got: key heads, enable_gqa, scale."""
    calls = []

    def recorded(q, k, v, *args, **kwargs):
        calls.append({"rows": q.shape[-2], "key_heads": k.shape[1],
                      "enable_gqa": kwargs.get("enable_gqa", False), "scale": kwargs.get("scale")})
        return SDPA(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recorded)
    return calls


def test_scale_and_grouping_change_the_result():
    """The reference cases below would not notice a dropped scale or mis-grouped heads
    unless those change the output."""
    q, k, v = make_qkv(8, CROSS_K_LEN, kv_heads=4)
    expected = SDPA(q, k, v, scale=SCALE, enable_gqa=True)
    assert not torch.allclose(expected, SDPA(q, k, v, enable_gqa=True), atol=1e-3)
    tiled = [t.repeat(1, 2, 1, 1) for t in (k, v)]  # kv head i % 4 instead of i // 2
    assert not torch.allclose(expected, SDPA(q, *tiled, scale=SCALE), atol=1e-3)
    torch.testing.assert_close(expected, reference(q, k, v, scale=SCALE), atol=TOLERANCE,
                               rtol=TOLERANCE)


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
@pytest.mark.parametrize("heads, kv_heads", GQA_HEADS.values(), ids=GQA_HEADS.keys())
@pytest.mark.parametrize("skip_reshape", [True, False], ids=["head-layout", "token-layout"])
@pytest.mark.parametrize("k_len", [Q_LEN, CROSS_K_LEN], ids=["self", "cross"])
def test_scale_and_grouped_query_attention_equal_sdpa(kernel, heads, kv_heads, skip_reshape,
                                                      k_len, chunk_rows):
    q, k, v = make_qkv(heads, k_len, kv_heads=kv_heads)
    expected = SDPA(q, k, v, scale=SCALE, enable_gqa=True)
    # Chunks of 7 rows when key and value are counted with their own head count.
    target = target_for_chunk(heads, k_len, QUERY_CHUNK, fused=kernel == "sdpa", kv_heads=kv_heads)
    inputs = (q, k, v) if skip_reshape else tuple(to_tokens(t) for t in (q, k, v))

    out = chunked_attention(*inputs, heads, skip_reshape=skip_reshape, skip_output_reshape=True,
                            target_bytes=target, kernel=kernel, scale=SCALE,
                            enable_gqa=kv_heads != heads)

    assert chunk_rows == RAGGED_CHUNKS
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=TOLERANCE)


GQA_MASK_SHAPES = {
    "q_k": (Q_LEN, CROSS_K_LEN),
    "b_q_k": (BATCH, Q_LEN, CROSS_K_LEN),
    "b_h_q_k": (BATCH, 8, Q_LEN, CROSS_K_LEN),  # one mask per query head
    "b_1_1_k": (BATCH, 1, 1, CROSS_K_LEN),
}


@pytest.mark.parametrize("kernel", ["sdpa", "math"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("mask_shape", GQA_MASK_SHAPES.values(), ids=GQA_MASK_SHAPES.keys())
def test_grouped_query_attention_with_masks_equals_sdpa(kernel, mask_kind, mask_shape, chunk_rows):
    heads, kv_heads = 8, 2
    q, k, v = make_qkv(heads, CROSS_K_LEN, kv_heads=kv_heads)
    mask = make_mask(mask_kind, mask_shape)
    expected = SDPA(q, k, v, attn_mask=reference_mask(mask), scale=SCALE, enable_gqa=True)
    assert not torch.allclose(expected, SDPA(q, k, v, scale=SCALE, enable_gqa=True), atol=1e-3)

    out = chunked_attention(q, k, v, heads, mask=mask, skip_reshape=True, skip_output_reshape=True,
                            kernel=kernel, scale=SCALE, enable_gqa=True,
                            target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK,
                                                          fused=kernel == "sdpa", kv_heads=kv_heads))

    assert chunk_rows == RAGGED_CHUNKS
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_sdpa_chunks_get_the_scale_and_key_value_heads_as_they_came(sdpa_calls):
    # This CPU's SDPA flash kernel groups query heads itself: key and value are never repeated.
    heads, kv_heads = 8, 2
    q, k, v = make_qkv(heads, CROSS_K_LEN, kv_heads=kv_heads)
    assert sdpa_backend(q, k, v, enable_gqa=True) == "flash_attention"
    chunked_attention(q, k, v, heads, skip_reshape=True, kernel="sdpa", scale=SCALE, enable_gqa=True,
                      target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK, fused=True,
                                                    kv_heads=kv_heads))
    assert sdpa_calls == [{"rows": rows, "key_heads": kv_heads, "enable_gqa": True, "scale": SCALE}
                          for rows in RAGGED_CHUNKS]


def test_sdpa_that_cannot_group_heads_gets_key_value_repeated_once(monkeypatch, sdpa_calls):
    """Where SDPA's kernel for the grouped call would not be memory-efficient (it would repeat
    key and value in every chunk), the chunks get them repeated once, and are sized for it."""
    heads, kv_heads = 8, 2
    q, k, v = make_qkv(heads, CROSS_K_LEN, kv_heads=kv_heads)
    real_backend = attention.sdpa_backend
    monkeypatch.setattr(attention, "sdpa_backend", lambda *tensors, enable_gqa=False: (
        "math" if enable_gqa else real_backend(*tensors)))

    out = chunked_attention(q, k, v, heads, skip_reshape=True, skip_output_reshape=True,
                            kernel="sdpa", scale=SCALE, enable_gqa=True,
                            target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK,
                                                          fused=True, kv_heads=heads))

    assert sdpa_calls == [{"rows": rows, "key_heads": heads, "enable_gqa": False, "scale": SCALE}
                          for rows in RAGGED_CHUNKS]
    torch.testing.assert_close(out, SDPA(q, k, v, scale=SCALE, enable_gqa=True),
                               atol=TOLERANCE, rtol=TOLERANCE)


def test_upcast_math_kernel_with_a_scale_and_grouped_heads_on_half_precision():
    heads, kv_heads = 8, 2
    q, k, v = make_qkv(heads, CROSS_K_LEN, kv_heads=kv_heads)
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    target = call_bytes(heads, CROSS_K_LEN, QUERY_CHUNK, dtype_bytes=2, upcast_fp32=True,
                        kv_heads=kv_heads)

    out = chunked_attention(*half, heads, skip_reshape=True, skip_output_reshape=True,
                            target_bytes=target, upcast_fp32=True, kernel="math", scale=SCALE,
                            enable_gqa=True)

    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q, k, v, scale=SCALE), atol=2e-2, rtol=2e-2)


def test_bad_grouped_query_inputs_are_named():
    q, k, v = make_qkv(8, kv_heads=2)
    with pytest.raises(ValueError, match=r"key/value shape \[2, 2, 30, 8\] does not match query shape "
                                         r"\[2, 8, 30, 8\] .*need enable_gqa=True"):
        chunked_attention(q, k, v, 8, skip_reshape=True, target_bytes=10 ** 6)
    q6, k4, v4 = make_qkv(6, kv_heads=4)
    with pytest.raises(ValueError, match="attention query has 6 heads, not a multiple of the 4 "
                                         "key/value heads"):
        chunked_attention(q6, k4, v4, 6, skip_reshape=True, target_bytes=10 ** 6, enable_gqa=True)
    with pytest.raises(ValueError, match=r"attention key \[2, 2, 30, 8\] and value \[2, 4, 30, 8\] "
                                         r"differ in shape"):
        chunked_attention(q, k, make_qkv(8, kv_heads=4)[2], 8, skip_reshape=True,
                          target_bytes=10 ** 6, enable_gqa=True)
    tokens = [to_tokens(t) for t in (q, k, v)]
    with pytest.raises(ValueError, match=r"key/value shape \[2, 30, 12\] does not match"):
        chunked_attention(tokens[0], tokens[1][..., :12], tokens[2][..., :12], 8,
                          target_bytes=10 ** 6, enable_gqa=True)
    for bad_scale in (float("nan"), float("inf"), "0.2", True):
        with pytest.raises(ValueError, match="attention scale must be a finite number"):
            chunked_attention(q, k, v, 8, skip_reshape=True, target_bytes=10 ** 6, enable_gqa=True,
                              scale=bad_scale)


def test_upcast_math_kernel_on_half_precision():
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    expected = to_tokens(reference(q, k, v))
    half = [to_tokens(t).to(torch.bfloat16) for t in (q, k, v)]
    target = call_bytes(heads, CROSS_K_LEN, QUERY_CHUNK, dtype_bytes=2, upcast_fp32=True)

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
    assert attention.smallest_chunk_bytes(b, h, q_len, k_len, d, 2) == fixed + row
    # A fused kernel keeps, per row, only its softmax statistics (max and sum, fp32).
    fused_row = b * h * (2 * 4 + d * (2 + 2))
    assert attention_transient_bytes(b, h, q_len, k_len, d, 2, fused=True) == fixed + q_len * fused_row
    # Grouped-query attention: key and value copies have their own (fewer) heads; the output,
    # the scores and the query rows have all the query's heads.
    fixed_gqa = b * d * (h * q_len * 2 + 2 * k_len * (2 + 2))
    assert (attention_transient_bytes(b, h, q_len, k_len, d, 2, query_chunk=5, kv_heads=2)
            == fixed_gqa + 5 * row)
    assert (attention.smallest_chunk_bytes(b, h, q_len, k_len, d, 2, fused=True, kv_heads=2)
            == fixed_gqa + fused_row)


def test_sdpa_that_cannot_name_a_fused_kernel_is_sized_as_math(monkeypatch, chunk_rows):
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    monkeypatch.setattr(attention, "sdpa_backend", lambda *tensors, **options: "math")
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
    estimate = lambda rows: call_bytes(dims["heads"], dims["k_len"], rows, dims["dtype_bytes"],  # noqa: E731
                                       upcast_fp32=upcast_fp32, batch=dims["batch"],
                                       q_len=dims["q_len"], head_dim=dims["head_dim"])

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
    row = call_bytes(8, Q_LEN, 1, fused=True)
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


def comfy_layout_sdpa(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False,
                      scale=None, enable_gqa=False, **ignored):
    """ComfyUI's attention_pytorch (v0.33.0) written out with torch SDPA: its layouts, mask
    promotion, scale and grouped-query attention."""
    if not skip_reshape:
        b, n, channels = q.shape
        d = channels // heads
        q = q.reshape(b, n, heads, d).transpose(1, 2)
        k, v = (t.reshape(b, t.shape[1], -1, d).transpose(1, 2) for t in (k, v))
    out = SDPA(q, k, v, attn_mask=None if mask is None else reference_mask(mask), scale=scale,
               enable_gqa=enable_gqa)
    return out if skip_output_reshape else to_tokens(out)


class CountingAttention:
    """Stands in for the model's own attention function; records the keyword arguments of
    each call (and attn_precision, however it came)."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, heads, mask=None, attn_precision=None, **kwargs):
        self.calls.append({**kwargs, "attn_precision": attn_precision})
        return comfy_layout_sdpa(q, k, v, heads, mask, **kwargs)


# The keyword arguments ComfyUI v0.33.0's wrap_attn and models pass besides the tensors.
COMFY_KWARGS = dict(transformer_options={"optimized_attention_override": None},
                    _inside_attn_wrapper=True, attn_precision=None, low_precision_attention=False)


def test_override_auto_passes_through_when_it_fits_a_fused_kernel():
    heads = 5
    q, k, v = (to_tokens(t) for t in make_qkv(heads, CROSS_K_LEN))
    func, records = CountingAttention(), []
    whole = call_bytes(heads, CROSS_K_LEN, Q_LEN, fused=True)
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
    whole = call_bytes(heads, CROSS_K_LEN, Q_LEN)
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
    row = call_bytes(heads, Q_LEN, 1, fused=True)

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


@pytest.mark.parametrize("skip_reshape", [True, False], ids=["head-layout", "token-layout"])
@pytest.mark.parametrize("kernel", ["sdpa", "math"])
def test_override_honours_scale_and_grouped_heads_as_comfyui_passes_them(skip_reshape, kernel,
                                                                         chunk_rows):
    # As ComfyUI v0.33.0's GQA models call attention: k/v with their own heads, scale= and
    # enable_gqa= as keywords, the mask positional.
    heads, kv_heads = 8, 2
    q, k, v = make_qkv(heads, CROSS_K_LEN, kv_heads=kv_heads)
    mask = make_mask("additive", (BATCH, Q_LEN, CROSS_K_LEN))
    inputs = (q, k, v) if skip_reshape else tuple(to_tokens(t) for t in (q, k, v))
    func, records = CountingAttention(), []
    plan = AttentionPlan(target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK,
                                                       fused=kernel == "sdpa", kv_heads=kv_heads),
                         method="chunked", kernel=kernel)
    override = make_attention_override(plan, on_call=records.append)

    out = override(func, *inputs, heads, mask, skip_reshape=skip_reshape, scale=SCALE,
                   enable_gqa=True, **COMFY_KWARGS)

    assert func.calls == []
    assert chunk_rows == RAGGED_CHUNKS
    assert [(r.runner, r.heads, r.kv_heads, r.unhandled) for r in records] == [
        ("chunked", heads, kv_heads, ())]
    assert f" heads={heads} kv_heads={kv_heads} " in records[0].log_line()
    expected = SDPA(q, k, v, attn_mask=reference_mask(mask), scale=SCALE, enable_gqa=True)
    torch.testing.assert_close(out, to_tokens(expected), atol=TOLERANCE, rtol=TOLERANCE)


def test_override_reads_heads_and_layout_given_as_keywords(chunk_rows):
    # As WAN's image cross-attention calls it on v0.33.0: heads= as a keyword, with
    # low_precision_attention=False (the chunks run at full precision anyway).
    heads = 5
    q, k, v = make_qkv(heads, CROSS_K_LEN)
    func, records = CountingAttention(), []
    plan = AttentionPlan(target_bytes=target_for_chunk(heads, CROSS_K_LEN, QUERY_CHUNK, fused=True),
                         method="chunked")

    out = make_attention_override(plan, on_call=records.append)(
        func, *(to_tokens(t) for t in (q, k, v)), heads=heads, **COMFY_KWARGS)

    assert func.calls == [] and chunk_rows == RAGGED_CHUNKS
    assert [(r.runner, r.heads, r.unhandled) for r in records] == [("chunked", heads, ())]
    torch.testing.assert_close(out, to_tokens(reference(q, k, v)), atol=TOLERANCE, rtol=TOLERANCE)


def test_override_hands_a_grouped_call_that_fits_to_the_model_with_every_argument():
    heads, kv_heads = 8, 2
    q, k, v = make_qkv(heads, CROSS_K_LEN, kv_heads=kv_heads)
    func, records = CountingAttention(), []
    # Exactly the whole call, key and value counted with their 2 heads: it fits.
    plan = AttentionPlan(target_bytes=call_bytes(heads, CROSS_K_LEN, Q_LEN, fused=True,
                                                 kv_heads=kv_heads), fused_kernel=True)
    kwargs = dict(skip_reshape=True, skip_output_reshape=True, scale=SCALE, enable_gqa=True,
                  **COMFY_KWARGS)

    out = make_attention_override(plan, on_call=records.append)(func, q, k, v, heads, **kwargs)

    assert func.calls == [kwargs]
    assert [(r.runner, r.kv_heads) for r in records] == [("model", kv_heads)]
    torch.testing.assert_close(out, SDPA(q, k, v, scale=SCALE, enable_gqa=True))


FUTURE_KWARGS = dict(COMFY_KWARGS, scale=SCALE, sinks="a future argument", is_causal=True)


@pytest.mark.parametrize("plan", [
    AttentionPlan(target_bytes=10 ** 9, method="chunked"),
    AttentionPlan(target_bytes=1.0, method="chunked"),  # even a target no chunk could meet
    AttentionPlan(fused_kernel=True),
], ids=["chunked", "chunked-tiny-target", "auto"])
def test_a_keyword_the_chunks_do_not_know_sends_the_call_to_the_model_unchanged(plan):
    heads = 5
    tokens = [to_tokens(t) for t in make_qkv(heads, CROSS_K_LEN)]
    func, records = CountingAttention(), []

    out = make_attention_override(plan, on_call=records.append)(func, *tokens, heads,
                                                                **FUTURE_KWARGS)

    assert func.calls == [FUTURE_KWARGS]
    assert [(r.runner, r.unhandled, r.target_bytes) for r in records] == [
        ("model", ("is_causal", "sinks"), None)]
    assert records[0].log_line().endswith(" unhandled=is_causal,sinks")
    torch.testing.assert_close(out, comfy_layout_sdpa(*tokens, heads, scale=SCALE))


@pytest.mark.parametrize("method", ["comfy split", "sub-quadratic"])
def test_delegated_methods_get_scale_grouping_and_unknown_keywords_unchanged(method):
    heads, kv_heads = 8, 2
    q, k, v = make_qkv(heads, CROSS_K_LEN, kv_heads=kv_heads)
    model_func, host_func, records = CountingAttention(), CountingAttention(), []
    override = make_attention_override(AttentionPlan(method=method), on_call=records.append,
                                       delegates={method: host_func})
    kwargs = dict(FUTURE_KWARGS, skip_reshape=True, skip_output_reshape=True, enable_gqa=True)

    out = override(model_func, q, k, v, heads, **kwargs)

    assert model_func.calls == [] and host_func.calls == [kwargs]
    assert [(r.runner, r.kv_heads) for r in records] == [(method, kv_heads)]
    torch.testing.assert_close(out, SDPA(q, k, v, scale=SCALE, enable_gqa=True))


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


# --- one chunked call's real peak memory against its target -----------------------------------

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MIB = 2 ** 20
# Runs in a fresh interpreter: the core module alone (torch, no ComfyUI), random inputs, one
# small warm-up call (thread pools, first-use buffers), then the measured call. Its peak: the
# process's RSS high-water mark (Linux VmHWM, reset through /proc/self/clear_refs just before
# the call; ru_maxrss would carry the parent's RSS across fork and exec) minus the RSS at that
# moment: what the call added at its peak, output included, as the operating system counts it.
PEAK_CHILD = textwrap.dedent("""
    import importlib.util, json, re, sys
    import torch
    spec = importlib.util.spec_from_file_location("headroom_attention", sys.argv[1])
    attention = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = attention
    spec.loader.exec_module(attention)
    case = json.loads(sys.argv[2])
    heads, kv_heads, tokens, head_dim = case["heads"], case["kv_heads"], case["tokens"], case["head_dim"]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, head_dim, generator=generator)
    k, v = (torch.randn(1, kv_heads, tokens, head_dim, generator=generator) for _ in range(2))

    def run(q, k, v, target_bytes):
        return attention.chunked_attention(q, k, v, heads, skip_reshape=True, skip_output_reshape=True,
                                           target_bytes=target_bytes, kernel=case["kernel"],
                                           enable_gqa=kv_heads != heads, scale=0.1)

    def status_bytes(field):
        with open("/proc/self/status") as status:
            return int(re.search(rf"^{field}:\\s+(\\d+) kB", status.read(), re.MULTILINE).group(1)) * 1024

    run(q[:, :, :64], k[:, :, :64], v[:, :, :64], 10 ** 9)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS now
    before = status_bytes("VmRSS")
    out = run(q, k, v, case["target_bytes"])
    print(json.dumps({"peak_bytes": status_bytes("VmHWM") - before}))
""")

PEAK_CASES = {
    # SD1.5's first level at 512x512 (one image, 8 heads of 40) through math attention: the
    # whole call would hold 1 GiB of scores and softmax; a chunk's scores (over 32 MiB) are
    # mapped and unmapped by malloc, not kept cached.
    "math": dict(heads=8, kv_heads=8, tokens=4096, head_dim=40, kernel="math", target_bytes=128 * MIB),
    # grouped-query attention, 16 query heads on one key/value head: repeating key and value to
    # every head would add 30 MiB
    "math-gqa": dict(heads=16, kv_heads=1, tokens=4096, head_dim=64, kernel="math",
                     target_bytes=128 * MIB),
    # SDPA's flash kernel keeps no scores: the output (16 MiB) is most of the call
    "sdpa-gqa": dict(heads=16, kv_heads=1, tokens=4096, head_dim=64, kernel="sdpa",
                     target_bytes=20 * MIB),
}


@pytest.mark.parametrize("case", PEAK_CASES.values(), ids=PEAK_CASES.keys())
def test_a_chunked_call_stays_within_its_target_measured(case):
    finished = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(REPO_ROOT / "memory" / "attention.py"),
                               json.dumps(case)], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    peak = json.loads(finished.stdout.strip().splitlines()[-1])["peak_bytes"]
    target = case["target_bytes"]
    # At most the target and 10 % (allocator rounding, the kernels' per-thread buffers) ...
    assert peak <= 1.10 * target, f"peak {peak / MIB:.1f} MiB over target {target / MIB:.0f} MiB"
    # ... and most of it: the chunks are the largest that fit, and the measurement sees them.
    assert peak >= 0.5 * target, f"peak {peak / MIB:.1f} MiB, under half the target {target / MIB:.0f} MiB"
