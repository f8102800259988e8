"""The Memory Report's journal of the prompt that is running."""
from __future__ import annotations

from ..decisions import vram_sources
from .host import features, is_interrupt

_JOURNALS_KEPT = 4  # the running prompt's and a few before it, for a report read after its prompt ended
# The pack's one piece of process state: ComfyUI runs a prompt's nodes and hooks as separate calls, and
# the journal of the prompt they belong to (by the prompt id ComfyUI's executor sets) is what they share.
_journals: dict = {}


def executing_node() -> tuple[str | None, str | None]:
    """(prompt id, node id) of the node ComfyUI is running now; (None, None) outside a prompt."""
    from comfy_execution.utils import get_executing_context
    context = get_executing_context()
    return (context.prompt_id, context.node_id) if context is not None else (None, None)


def prompt_journal():
    """The Journal of the prompt that is running (outside a prompt: one shared journal)."""
    return _journal_of(executing_node()[0])


def stage(kind: str, name: str, device):
    """Measure a block as a stage of the running prompt's journal, tagged with the running node."""
    prompt_id, node_id = executing_node()
    return _journal_of(prompt_id).stage(kind, name, str(device), node_id)


def sample_vram() -> None:
    """Take the running prompt's VRAM readings now (called at every sampling step)."""
    prompt_journal().sample()


def vram_readers() -> dict:
    """The readers of device memory outside torch's allocator this host offers (memory.decisions.vram_sources):
    comfy-aimdo's usage where it pages weights, the process's NVML usage where NVML answers."""
    from . import dynamic, nvml
    available = {"aimdo": dynamic.aimdo_vram_usage, "nvml": nvml.process_vram_usage}
    return {source: available[source] for source in vram_sources(features(), "cuda") if source in available}


def _journal_of(prompt_id: str | None):
    from ..report import Journal, PeakProbe
    journal = _journals.get(prompt_id)
    if journal is None:
        journal = _journals[prompt_id] = Journal(prompt_id, probe=PeakProbe(vram_readers()),
                                                 is_interrupt=is_interrupt)
        while len(_journals) > _JOURNALS_KEPT:
            del _journals[next(iter(_journals))]  # the oldest prompt's
    return journal
