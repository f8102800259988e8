"""The out-of-memory ladder's runner (memory/ladder.py): its rules, on plain callables."""
import gc
import weakref

import pytest
import torch

from comfyui_headroom.memory.ladder import LadderExhausted, Rung, run_ladder


def is_oom(error):
    return isinstance(error, torch.OutOfMemoryError)


class Interrupt(Exception):
    pass


def failing(times, error=lambda: torch.OutOfMemoryError("CUDA out of memory")):
    calls = {"n": 0}

    def work():
        calls["n"] += 1
        if calls["n"] <= times:
            raise error()
        return "done"
    return work, calls


def rung(name, changes, applied):
    def apply():
        applied.append(name)
        return changes
    return Rung(name, apply)


def test_first_attempt_that_fits_uses_no_rung():
    work, calls = failing(0)
    attempts = []
    assert run_ladder(work, [rung("a", "x", [])], what="w", is_out_of_memory=is_oom, attempts=attempts) == "done"
    assert calls["n"] == 1 and attempts == []


def test_rungs_in_order_until_it_fits_each_recorded():
    work, calls = failing(2)
    applied, attempts = [], []
    result = run_ladder(work, [rung("a", "freed 1 model", applied), rung("b", "split", applied),
                               rung("c", "never", applied)], what="w", is_out_of_memory=is_oom, attempts=attempts)
    assert result == "done" and calls["n"] == 3 and applied == ["a", "b"]
    assert [(a.name, a.changed, a.outcome) for a in attempts] == [("a", "freed 1 model", "out of memory"),
                                                                    ("b", "split", "success")]
    assert all(a.seconds >= 0 for a in attempts)


def test_a_rung_that_changes_nothing_is_skipped_not_recorded():
    work, calls = failing(1)
    applied, attempts = [], []
    run_ladder(work, [rung("a", "", applied), rung("b", "split", applied)], what="w", is_out_of_memory=is_oom,
               attempts=attempts)
    assert applied == ["a", "b"] and [a.name for a in attempts] == ["b"] and calls["n"] == 2


def test_exhausted_ladder_lists_every_rung_and_is_an_oom_error():
    work, calls = failing(99)
    attempts = []
    with pytest.raises(LadderExhausted) as raised:
        run_ladder(work, [rung("a", "freed", []), rung("b", "split", [])], what="decoding with VAE X",
                   is_out_of_memory=is_oom, attempts=attempts, advice="Lower the resolution.")
    assert isinstance(raised.value, torch.OutOfMemoryError)
    message = str(raised.value)
    assert "decoding with VAE X" in message and "a (freed)" in message and "b (split)" in message
    assert "Lower the resolution." in message and calls["n"] == 3  # tried once each: never loops
    assert [a.outcome for a in raised.value.attempts] == ["out of memory", "out of memory"]


def test_a_generator_of_rungs_sees_what_earlier_rungs_did():
    tile = {"size": 512}

    def halving():
        while tile["size"] > 64:
            yield Rung("halve tiles", lambda: (tile.update(size=tile["size"] // 2) or f"tile {tile['size']}"))

    def work():
        if tile["size"] > 128:
            raise torch.OutOfMemoryError("oom")
        return tile["size"]
    attempts = []
    assert run_ladder(work, halving(), what="w", is_out_of_memory=is_oom, attempts=attempts) == 128
    assert [a.changed for a in attempts] == ["tile 256", "tile 128"]


def test_non_memory_error_is_never_retried():
    work, calls = failing(5, error=lambda: ValueError("a bug"))
    applied = []
    with pytest.raises(ValueError):
        run_ladder(work, [rung("a", "x", applied)], what="w", is_out_of_memory=is_oom, attempts=[])
    assert calls["n"] == 1 and applied == []


def test_interrupt_during_a_retry_stops_at_once():
    state = {"n": 0}

    def work():
        state["n"] += 1
        raise torch.OutOfMemoryError("oom") if state["n"] == 1 else Interrupt()
    applied, attempts = [], []
    with pytest.raises(Interrupt):
        run_ladder(work, [rung("a", "x", applied), rung("b", "y", applied)], what="w", is_out_of_memory=is_oom,
                   attempts=attempts, is_interrupt=lambda error: isinstance(error, Interrupt))
    assert applied == ["a"] and state["n"] == 2 and attempts[0].outcome == "interrupted"


def test_keyboard_interrupt_is_not_caught():
    def work():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_ladder(work, [rung("a", "x", [])], what="w", is_out_of_memory=lambda error: True, attempts=[])


def test_retry_runs_after_the_failed_attempts_frames_are_gone():
    seen = {}

    class Big:
        pass

    def work():
        if "ref" not in seen:
            big = Big()
            seen["ref"] = weakref.ref(big)
            raise torch.OutOfMemoryError("oom")
        gc.collect()
        return seen["ref"]() is None  # the failed attempt's local is unreachable when the retry runs

    assert run_ladder(work, [rung("a", "x", [])], what="w", is_out_of_memory=is_oom, attempts=[])
