"""The out-of-memory ladder: run some work; after an out-of-memory error, retry it with ever cheaper
settings until it completes or no cheaper setting is left.

One runner for every ladder (sampling, VAE decode/encode, text encode), so all of them share the rules:
  - each retry runs outside the `except` block, so the failed attempt's frames (and their tensors) are freed
    before it starts;
  - a rung is tried once: the ladder never loops;
  - an error that is not out of memory is never retried, and an interrupt (a BaseException, or what the
    caller's `is_out_of_memory` refuses) stops at once, also during a retry;
  - every rung tried is recorded with what it changed, its time and how it ended, and the final error, if any,
    lists them all.
Plain Python: the caller says what counts as out of memory and what a rung does (memory.comfy knows ComfyUI).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterable, Iterator, TypeVar

import torch

log = logging.getLogger("headroom")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Rung:
    """One step down the ladder. `apply` makes the change before the retry and returns what it changed,
    in words (what it freed, the new tile size); an empty answer means it changed nothing and is skipped."""
    name: str
    apply: Callable[[], str]


@dataclasses.dataclass
class RungAttempt:
    """One rung that was tried: what it changed, how long the retry took, how it ended."""
    name: str
    changed: str
    seconds: float = 0.0
    outcome: str = "running"  # success | out of memory | failed: <error> | interrupted

    def describe(self) -> str:
        return f"{self.name} ({self.changed}): {self.outcome} in {self.seconds:.2f}s"


class LadderExhausted(torch.OutOfMemoryError):
    """Every rung was tried and the work still ran out of memory. An out-of-memory error, so ComfyUI still
    shows its own out-of-memory advice; `attempts` holds the rungs tried."""

    def __init__(self, message: str, attempts: list[RungAttempt]):
        super().__init__(message)
        self.attempts = attempts


def error_summary(error: BaseException) -> str:
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def run_ladder(work: Callable[[], T], rungs: Iterable[Rung], *, what: str,
               is_out_of_memory: Callable[[BaseException], bool], attempts: list[RungAttempt],
               advice: str = "", is_interrupt: Callable[[BaseException], bool] = lambda error: False) -> T:
    """`work()`, retried after each out-of-memory error with the next rung of `rungs` applied (rungs may be
    a generator: a rung can depend on what the earlier ones did). Appends each rung tried to `attempts`
    (the caller's list, so a record sees them even when this raises). `what`: the work, for messages
    ("sampling model X on cuda:0"). Raises LadderExhausted when out of memory with no rung left."""
    pending: Iterator[Rung] = iter(rungs)
    current: RungAttempt | None = None
    while True:
        started = time.perf_counter()
        failure = None
        try:
            result = work()
        except BaseException as error:
            if current is not None:
                current.seconds = time.perf_counter() - started
                current.outcome = ("interrupted" if not isinstance(error, Exception) or is_interrupt(error)
                                   else "out of memory" if is_out_of_memory(error) else f"failed: {error_summary(error)}")
            if not isinstance(error, Exception) or not is_out_of_memory(error):
                raise
            failure = error_summary(error)
        else:
            if current is not None:
                current.seconds, current.outcome = time.perf_counter() - started, "success"
            return result
        # out of memory: the except block is left, the failed attempt's frames are gone
        current = None
        for rung in pending:
            changed = rung.apply()
            if changed:
                current = RungAttempt(rung.name, changed)
                break
        if current is None:
            tried = "; ".join(attempt.describe() for attempt in attempts) or "no rung applies"
            raise LadderExhausted(f"Headroom: out of memory while {what} ({failure}). Tried: {tried}."
                                  + (f" {advice}" if advice else ""), list(attempts))
        attempts.append(current)
        log.warning("Headroom: out of memory while %s (%s); retrying: %s (%s)", what, failure, current.name,
                    current.changed)
