"""Sub-batches of a model call: which samples go together, and slicing the call's arguments."""
import torch

from comfyui_headroom.memory.batching import SubBatch, slice_batch, sub_batches


def test_sub_batches_cover_the_batch_in_order_and_never_straddle_a_cond_chunk():
    assert sub_batches(8, chunks=2, size=2) == [SubBatch(0, 2, 0), SubBatch(2, 4, 0), SubBatch(4, 6, 1),
                                                SubBatch(6, 8, 1)]
    # chunks of 3 (uncond, cond of a batch of 3): a size of 2 would straddle, so 1
    assert [(part.start, part.chunk) for part in sub_batches(6, chunks=2, size=2)] == [
        (0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    assert sub_batches(4, chunks=1, size=4) == [SubBatch(0, 4, 0)]
    assert sub_batches(5, chunks=2, size=1) == [SubBatch(i, i + 1, 0) for i in range(5)]  # chunks unknown: one


def test_slice_batch_cuts_batched_tensors_inside_containers_and_keeps_the_rest():
    part = SubBatch(2, 4, 1)
    x = torch.arange(4 * 3).reshape(4, 3)
    broadcast = torch.ones(1, 3)
    sliced = slice_batch({"x": x, "list": [x, broadcast], "tuple": (x, 7), "none": None, "scalar": torch.tensor(2.0)},
                         4, part)
    assert sliced["x"].tolist() == [[6, 7, 8], [9, 10, 11]]
    assert sliced["list"][0].tolist() == [[6, 7, 8], [9, 10, 11]] and sliced["list"][1] is broadcast
    assert isinstance(sliced["tuple"], tuple) and sliced["tuple"][1] == 7 and sliced["tuple"][0].shape == (2, 3)
    assert sliced["none"] is None and sliced["scalar"].item() == 2.0
