"""CLIP and VAE copies whose every use is a stage of the Memory Report, and which can move off their
device as soon as a use has finished."""
from __future__ import annotations

from .journal import stage
from .models import loaded_bytes, model_name, release

# the CLIP and VAE methods nodes call to use them, and the stage each is; an outer call may use an inner one
_ENTRY_POINTS = {"CLIP": {"encode_from_tokens_scheduled": "text encode", "encode_from_tokens": "text encode",
                          "encode": "text encode"},
                 "VAE": {"decode": "VAE decode", "decode_tiled": "VAE decode", "encode": "VAE encode",
                         "encode_tiled": "VAE encode"}}


def watch_use(clip_or_vae, kind: str, offload: bool, patcher=None):
    """A copy of a CLIP or VAE whose every use is a stage of the Memory Report, and which unloads itself
    from its device as soon as a use has finished when `offload` is set. `patcher`: the copy's patcher, a
    clone of the incoming one that Pick GPU placed (it may hold its own module); default a plain clone.

    The methods are wrapped on the copy only (an instance we own), never on the class; the copy
    gets its own patcher clone so releasing it leaves the incoming object's loaded state alone.
    ComfyUI's loaded-model list falls back to a patcher's parent when the patcher dies, and a dead
    parent reads as a memory leak. So the clone's parent is the incoming patcher (never a throwaway
    clone), and the wrappers hold the copy weakly: no reference cycle, so the copy dies when ComfyUI's
    cache drops it, while the nodes before it still hold the parent.
    """
    import copy
    import logging
    import weakref
    log = logging.getLogger("headroom")
    if kind == "CLIP":
        user = clip_or_vae.clone()
        if patcher is not None:
            user.patcher, user.cond_stage_model = patcher, patcher.model
    else:
        user = copy.copy(clip_or_vae)  # v0.3.64's VAE has no clone(); its state is the patcher
        for name in after_use_entry_points(clip_or_vae, kind):
            delattr(user, name)  # an earlier watch_use's wrappers call the copy they were made for
        user.patcher = patcher if patcher is not None else clip_or_vae.patcher.clone()
        user.first_stage_model = user.patcher.model
    this_copy = weakref.ref(user)
    depth = [0]
    for name, stage_kind in _ENTRY_POINTS[kind].items():
        if not hasattr(user, name):
            continue

        def use(*args, _method=getattr(type(user), name), _name=name, _stage=stage_kind, **kwargs):
            watched = this_copy()  # alive: it is the object this method was looked up on
            if depth[0]:
                return _method(watched, *args, **kwargs)  # an inner call of an outer use: one stage, one release
            depth[0] += 1
            patcher = watched.patcher
            try:
                with stage(_stage, model_name(patcher), patcher.load_device) as record:
                    try:
                        return _method(watched, *args, **kwargs)
                    finally:
                        record.resident_bytes = loaded_bytes(patcher)
                        if offload:
                            unloaded = release(patcher)
                            record.detail = f"moved off {patcher.load_device} after {_name}"
                            log.info("Headroom offload: %s moved off %s after %s (unloaded: %s)", kind,
                                     patcher.load_device, _name, ", ".join(unloaded) or "nothing was loaded")
            finally:
                depth[0] -= 1

        use.headroom_offload = offload
        setattr(user, name, use)
    return user


def after_use_entry_points(clip_or_vae, kind: str) -> list[str]:
    """The methods watch_use wrapped on this object."""
    return [name for name in _ENTRY_POINTS[kind] if hasattr(vars(clip_or_vae).get(name), "headroom_offload")]


def offloads_after_use(clip_or_vae, kind: str) -> bool:
    """Whether Offload Model set this CLIP or VAE to move off its device after each use."""
    return any(vars(clip_or_vae)[name].headroom_offload for name in after_use_entry_points(clip_or_vae, kind))
