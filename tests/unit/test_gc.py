"""The collector's own logic, against a host double of our own `ModelHost` protocol (not ComfyUI)."""

import pytest

from comfyui_headroom.memory.gc import GcRequest, force_gc


class Model:  # a plain object a weak reference can point at
    pass


class RecordingHost:
    """Holds models per device like an application would; unloading drops its references."""

    def __init__(self, models_by_device):
        self.models = {device: dict(models) for device, models in models_by_device.items()}
        self.unloaded_devices = []
        self.cleanups = 0

    def loaded_models(self):
        return [(device, name, module) for device, models in self.models.items() for name, module in models.items()]

    def unload_models(self, device):
        self.unloaded_devices.append(device)
        names = list(self.models.pop(device, {}))
        return names

    def cleanup(self):
        self.cleanups += 1


def test_unloads_every_device_that_holds_models_not_only_the_default():
    host = RecordingHost({"cuda:0": {"SD15": Model()}, "cuda:1": {"CLIP": Model()}})
    record = force_gc(GcRequest(device="cuda:0"), host)
    assert record.acted
    assert host.unloaded_devices == ["cuda:0", "cuda:1"]
    assert record.models_unloaded == ["SD15", "CLIP"]
    assert host.cleanups == 1
    # nothing else references them, so they are gone and no excuse is needed
    assert record.models_still_referenced == []
    assert "unloaded=[SD15, CLIP]" in record.log_line()


def test_says_which_unloaded_models_stay_referenced():
    kept = Model()
    host = RecordingHost({"cpu": {"SD15": kept}, "cuda:0": {"VAE": Model()}})
    record = force_gc(GcRequest(device="cpu"), host)
    assert record.models_still_referenced == ["SD15"]
    assert "still referenced" in record.note
    assert "still_referenced=[SD15]" in record.log_line()


def test_below_threshold_does_nothing():
    host = RecordingHost({"cpu": {"SD15": Model()}})
    record = force_gc(GcRequest(threshold_percent=100.0, device="cpu"), host)
    assert not record.acted
    assert host.unloaded_devices == [] and host.cleanups == 0
    assert record.objects_collected == 0 and record.before is None
    assert "action=skipped (below threshold)" in record.log_line()


def test_threshold_zero_always_acts_and_unload_can_be_switched_off():
    host = RecordingHost({"cpu": {"SD15": Model()}})
    record = force_gc(GcRequest(threshold_percent=0.0, unload_models=False, device="cpu"), host)
    assert record.acted
    assert host.unloaded_devices == [] and record.models_unloaded == []
    assert host.cleanups == 1


def test_collects_garbage_cycles():
    class Node:
        pass
    import gc as python_gc
    python_gc.collect()
    for _ in range(50):
        first, second = Node(), Node()
        first.other, second.other = second, first
    del first, second
    record = force_gc(GcRequest(unload_models=False, trim_ram=False), RecordingHost({}))
    assert record.objects_collected >= 100


@pytest.mark.parametrize("threshold", [-0.1, 100.1, float("nan")])
def test_threshold_outside_0_to_100_is_refused_naming_the_input(threshold):
    with pytest.raises(ValueError, match="threshold_percent"):
        GcRequest(threshold_percent=threshold)


def test_record_serialises_with_freed_bytes():
    record = force_gc(GcRequest(device="cpu"), RecordingHost({}))
    as_dict = record.to_dict()
    assert as_dict["ram_freed_bytes"] == record.before.ram_bytes - record.after.ram_bytes
    assert as_dict["device"] == "cpu" and as_dict["acted"] is True
