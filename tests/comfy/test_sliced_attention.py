"""Sliced Attention inside real ComfyUI: same latents, the override fires, the input model is
untouched, bad inputs are refused naming the input; calls with scale= and grouped-query heads
(as ComfyUI v0.33.0's models make them) through ComfyUI's own attention entry."""
import logging
import re

import pytest
import torch
import torch.nn.functional as F

import comfy_host
from comfy_host import sample

STEPS = 2
SIZE = 128  # 16x16 latent: 256 tokens, 8 heads of 40 in the tiny model's attention layers
# Chunked attention only reorders fp32 sums. Measured on both hosts (tiny SD1.5, 2 euler steps,
# 128x128, latents up to 288): |delta| / |latent| = 8.7e-8 (max |delta| 9e-5) for Headroom's
# chunks against ComfyUI's CPU default (sub-quadratic), 7.5e-8 for ComfyUI's split, 0 for its
# sub-quadratic. Allowed: 1e-6. The random tiny model's latents depend only weakly on attention,
# so the bound is checked to catch real errors: attention logits 1 % off move the latents by
# 2.3e-6, 4 % off by 9.1e-6 (test_the_tolerance_catches_a_4_percent_attention_error).
RELATIVE_TOLERANCE = 1e-6
LINE = re.compile(r"Headroom attention: runner=(?P<runner>.+?) kernel=(?P<kernel>\S+) batch=(?P<batch>\d+) "
                  r"heads=(?P<heads>\d+) kv_heads=(?P<kv_heads>\d+) queries=(?P<queries>\d+) keys=(?P<keys>\d+) "
                  r"chunk=(?P<chunk>\d+) chunks=(?P<chunks>\d+) .* fp32=(?P<fp32>yes|no)")


def sliced(comfy_nodes, model, target_mb=0, method="auto", fp32=False):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomSlicedAttention"]
    return comfy_host.run_v3_node(node, model=model, target_mb=target_mb, method=method, fp32=fp32).args[0]


def attention_calls(caplog) -> list[dict]:
    """The override's per-call DEBUG lines, parsed."""
    return [LINE.match(record.getMessage()).groupdict() for record in caplog.records
            if record.getMessage().startswith("Headroom attention:")]


def attention_layers(model) -> int:
    import comfy.ldm.modules.attention as attention
    return sum(isinstance(module, attention.CrossAttention) for module in model.model.modules())


def relative_difference(actual, expected) -> float:
    assert expected.abs().max().item() > 1  # a real sampled latent, not zeros
    return ((actual - expected).norm() / expected.norm()).item()


def assert_same_latents(actual, expected):
    assert relative_difference(actual, expected) <= RELATIVE_TOLERANCE


# (queries, keys, rows per chunk, chunks) of the self- and the cross-attention call. A 2 MB target
# through SDPA's CPU flash kernel (no score matrix): the output and key/value copies take
# 1.97 MB (self) and 1.05 MB (cross, 77 keys), and each query row 5248 B of softmax statistics,
# query copy and output, so 24 and 199 rows fit.
TWO_MB_CHUNKS = {("256", "256", "24", "11"), ("256", "77", "199", "2")}
UNCHUNKED = {("256", "256", "256", "1"), ("256", "77", "256", "1")}
CASES = {
    # the CPU has no fused kernel in ComfyUI (it runs sub-quadratic): Headroom runs the call itself
    "auto": dict(method="auto", runner="chunked", kernel="sdpa-flash_attention", chunks=UNCHUNKED),
    "chunked-2MB": dict(method="chunked", target_mb=2, runner="chunked", kernel="sdpa-flash_attention",
                        chunks=TWO_MB_CHUNKS),
    "chunked-2MB-fp32": dict(method="chunked", target_mb=2, fp32=True, runner="chunked",
                             kernel="sdpa-flash_attention", chunks=TWO_MB_CHUNKS),
    "comfy-split": dict(method="comfy split", runner="comfy split", kernel="-", chunks=UNCHUNKED),
    "sub-quadratic": dict(method="sub-quadratic", runner="sub-quadratic", kernel="-", chunks=UNCHUNKED),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sampled_latents_match_and_the_override_fires_on_every_attention_call(
        comfy_nodes, loaded_checkpoint, caplog, case):
    model, _, _ = loaded_checkpoint
    expected = sample(comfy_nodes, model, seed=3, steps=STEPS, size=SIZE)
    patched = sliced(comfy_nodes, model, case.get("target_mb", 0), case["method"], case.get("fp32", False))

    caplog.set_level(logging.DEBUG, logger="headroom")
    actual = sample(comfy_nodes, patched, seed=3, steps=STEPS, size=SIZE)

    assert_same_latents(actual, expected)
    calls = attention_calls(caplog)
    # cond and uncond run as one batch of 2: one call per attention layer per step
    assert len(calls) == STEPS * attention_layers(model) == 4
    assert {(call["runner"], call["kernel"], call["batch"], call["fp32"]) for call in calls} == {
        (case["runner"], case["kernel"], "2", "yes" if case.get("fp32") else "no")}
    assert {(call["queries"], call["keys"], call["chunk"], call["chunks"]) for call in calls} == case["chunks"]


def test_the_tolerance_catches_a_4_percent_attention_error(comfy_nodes, loaded_checkpoint):
    model, _, _ = loaded_checkpoint
    expected = sample(comfy_nodes, model, seed=3, steps=STEPS, size=SIZE)
    skewed = model.clone()

    def logits_4_percent_off(func, q, *args, **kwargs):
        return func(q * 1.04, *args, **kwargs)

    skewed.model_options["transformer_options"]["optimized_attention_override"] = logits_4_percent_off
    assert relative_difference(sample(comfy_nodes, skewed, seed=3, steps=STEPS, size=SIZE),
                               expected) > 5 * RELATIVE_TOLERANCE


def test_the_incoming_model_is_untouched(comfy_nodes, loaded_checkpoint):
    model, _, _ = loaded_checkpoint
    before = sample(comfy_nodes, model, seed=5)
    patched = sliced(comfy_nodes, model, target_mb=1, method="chunked")
    sample(comfy_nodes, patched, seed=5)

    assert patched is not model
    assert not {"optimized_attention_override", "headroom"} & set(model.model_options["transformer_options"])
    options = patched.model_options["transformer_options"]
    assert callable(options["optimized_attention_override"])
    plan = options["headroom"]["attention"]
    assert (plan.target_bytes, plan.method, plan.fused_kernel, plan.target_name) == (2 ** 20, "chunked", False,
                                                                                      "target_mb")
    assert sample(comfy_nodes, model, seed=5).equal(before)  # the incoming model samples as before


@pytest.mark.parametrize("first", ["sliced attention", "offload model"])
def test_composes_with_offload_model_in_either_order(comfy_nodes, loaded_checkpoint, caplog, first):
    model, _, _ = loaded_checkpoint
    offload = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomOffloadModel"]

    def offloaded(m):
        return comfy_host.run_v3_node(offload, model=m, budget_gb=0.0, keep_free_gb=0.0,
                                      text_encoder_and_vae="keep loaded").args[0]

    if first == "sliced attention":
        middle = sliced(comfy_nodes, model, target_mb=2, method="chunked")
        both = offloaded(middle)
    else:
        middle = offloaded(model)
        both = sliced(comfy_nodes, middle, target_mb=2, method="chunked")
    middle_state = dict(middle.model_options["transformer_options"]["headroom"])

    caplog.set_level(logging.DEBUG, logger="headroom")
    sample(comfy_nodes, both, seed=1, size=SIZE)

    assert set(both.model_options["transformer_options"]["headroom"]) >= {"attention", "offload"}
    assert middle.model_options["transformer_options"]["headroom"] == middle_state  # not changed by the next node
    calls = attention_calls(caplog)
    assert len(calls) == STEPS * attention_layers(model)
    assert {(call["queries"], call["keys"], call["chunk"], call["chunks"]) for call in calls} == TWO_MB_CHUNKS


def test_a_target_below_one_query_row_fails_naming_target_mb(comfy_nodes, loaded_checkpoint):
    model, _, _ = loaded_checkpoint
    patched = sliced(comfy_nodes, model, target_mb=1, method="chunked")
    # 512x512: 4096 tokens; output and key/value copies of a self-attention call: 3 x 2 x 4096 x 320 x 4 B
    with pytest.raises(ValueError, match=r"^target_mb 1 MB is below the smallest possible chunk \(30 MB for "
                                         r"one query row at this shape: batch 2, 8 heads, 4096 queries x 4096 keys"):
        sample(comfy_nodes, patched, steps=1, size=512)


@pytest.mark.parametrize("inputs, message", [
    (dict(method="flash"), r"^method must be one of auto, chunked, comfy split, sub-quadratic, got 'flash'"),
    (dict(target_mb=-1), r"^target_mb must be a whole number of MB from 0 \(auto\) to 1048576, got -1"),
    (dict(target_mb=2 ** 20 + 1), r"^target_mb must be a whole number of MB"),
    (dict(target_mb=512, method="comfy split"), r"^target_mb 512 cannot bound method 'comfy split'"),
])
def test_bad_inputs_are_refused_naming_the_input(comfy_nodes, loaded_checkpoint, inputs, message):
    model, _, _ = loaded_checkpoint
    node = comfy_nodes.NODE_CLASS_MAPPINGS["HeadroomSlicedAttention"]
    arguments = {"target_mb": 0, "method": "auto", **inputs}
    assert re.match(message, node.validate_inputs(**arguments))  # queue time
    with pytest.raises(ValueError, match=message):  # run time (a prompt that skipped validation)
        comfy_host.run_v3_node(node, model=model, fp32=False, **arguments)


# As ComfyUI v0.33.0's grouped-query models call attention (Boogu, OmniGen2, Stable Audio's DiT):
# q [B, heads, N, dim] and k, v [B, kv_heads, N, dim] with skip_reshape (or [B, N, heads*dim] and
# [B, N, kv_heads*dim] without), enable_gqa=True, a scale, the mask positional, transformer_options.
GQA_BATCH, GQA_HEADS, GQA_KV_HEADS, GQA_TOKENS, GQA_HEAD_DIM, GQA_SCALE = 2, 8, 2, 512, 32, 0.11


def gqa_inputs(with_mask: bool):
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(GQA_BATCH, GQA_HEADS, GQA_TOKENS, GQA_HEAD_DIM, generator=generator)
    k, v = (torch.randn(GQA_BATCH, GQA_KV_HEADS, GQA_TOKENS, GQA_HEAD_DIM, generator=generator) for _ in range(2))
    mask = None
    if with_mask:  # padding: the last 100 keys of the second sample are masked out
        mask = torch.zeros(GQA_BATCH, 1, 1, GQA_TOKENS)
        mask[1, ..., -100:] = -torch.inf
    return q, k, v, mask


def tokens(t):
    """[B, heads, N, dim] -> ComfyUI's [B, N, heads*dim]."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "padding-mask"])
@pytest.mark.parametrize("skip_reshape", [True, False], ids=["head-layout", "token-layout"])
@pytest.mark.parametrize("method, target_mb", [("chunked", 2), ("auto", 0)])
def test_grouped_heads_and_scale_through_comfyuis_attention_entry(
        comfy_nodes, loaded_checkpoint, caplog, method, target_mb, skip_reshape, with_mask):
    import comfy.ldm.modules.attention as attention
    model, _, _ = loaded_checkpoint
    options = sliced(comfy_nodes, model, target_mb, method).model_options["transformer_options"]
    q, k, v, mask = gqa_inputs(with_mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=GQA_SCALE, enable_gqa=True)
    assert not torch.allclose(expected, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                              atol=1e-3)  # the scale matters
    inputs = (q, k, v) if skip_reshape else tuple(tokens(t) for t in (q, k, v))

    caplog.set_level(logging.DEBUG, logger="headroom")
    # ComfyUI's attention entry (wrap_attn) hands the call to the override in transformer_options.
    out = attention.optimized_attention(*inputs, GQA_HEADS, mask, skip_reshape=skip_reshape,
                                        skip_output_reshape=True, transformer_options=options,
                                        scale=GQA_SCALE, enable_gqa=True)

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    (call,) = attention_calls(caplog)
    assert (call["runner"], call["heads"], call["kv_heads"], call["queries"]) == (
        "chunked", str(GQA_HEADS), str(GQA_KV_HEADS), str(GQA_TOKENS))
    # 2 MB: 1 MiB of output and 0.5 MiB of key/value leave room for about a quarter of the rows
    assert int(call["chunks"]) == (1 if method == "auto" else 5)


@pytest.mark.parametrize("method", ["comfy split", "sub-quadratic"])
def test_delegated_methods_get_the_scale_as_the_model_passed_it(comfy_nodes, loaded_checkpoint, caplog, method):
    import comfy.ldm.modules.attention as attention
    model, _, _ = loaded_checkpoint
    options = sliced(comfy_nodes, model, 0, method).model_options["transformer_options"]
    q, k, v, _ = gqa_inputs(False)
    k, v = (t.repeat_interleave(GQA_HEADS // GQA_KV_HEADS, dim=1) for t in (k, v))  # every host's split takes these
    host_function = attention.get_attention_function("split" if method == "comfy split" else "sub_quad")

    caplog.set_level(logging.DEBUG, logger="headroom")
    out = attention.optimized_attention(q, k, v, GQA_HEADS, skip_reshape=True, transformer_options=options,
                                        scale=GQA_SCALE)

    # what the host's own function makes of these arguments (on v0.33.0: the scaled attention)
    assert out.equal(host_function(q, k, v, GQA_HEADS, skip_reshape=True, scale=GQA_SCALE))
    assert [call["runner"] for call in attention_calls(caplog)] == [method]


def test_a_keyword_the_chunks_do_not_know_runs_the_models_own_kernel_with_one_warning(
        comfy_nodes, loaded_checkpoint, caplog):
    import comfy.ldm.modules.attention as attention
    model, _, _ = loaded_checkpoint
    options = sliced(comfy_nodes, model, 1, "chunked").model_options["transformer_options"]
    q, k, v, _ = gqa_inputs(False)
    k, v = (t.repeat_interleave(GQA_HEADS // GQA_KV_HEADS, dim=1) for t in (k, v))

    caplog.set_level(logging.DEBUG, logger="headroom")
    outs = [attention.optimized_attention(q, k, v, GQA_HEADS, skip_reshape=True, transformer_options=options,
                                          a_future_argument=True) for _ in range(2)]

    # 1 MB could not hold this call's 2 MiB output: only the model's kernel can have run it
    expected = attention.optimized_attention(q, k, v, GQA_HEADS, skip_reshape=True, a_future_argument=True)
    assert all(out.equal(expected) for out in outs)
    assert [(call["runner"], call["chunks"]) for call in attention_calls(caplog)] == [("model", "1")] * 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["Headroom Sliced Attention: attention called with a_future_argument, which Headroom's "
                        "chunks do not implement; those calls run the model's own attention, not bounded by "
                        "the target"]
