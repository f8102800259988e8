"""A VRAM budget the user sets per workflow: a cap on resident weights, or memory to keep free."""
from __future__ import annotations

import dataclasses
import math

GB = 1024 ** 3


def gb(n_bytes: float) -> str:
    return f"{n_bytes / GB:.2f} GB"


@dataclasses.dataclass(frozen=True)
class Budget:
    """At most one of the two is set; neither means "let ComfyUI decide"."""

    weights_cap_bytes: int | None = None  # the diffusion model's resident weights stay at or below this
    keep_free_bytes: int | None = None  # leave this much of the device free for other programs

    @classmethod
    def from_gb(cls, budget_gb: float, keep_free_gb: float) -> Budget:
        for name, value in (("budget_gb", budget_gb), ("keep_free_gb", keep_free_gb)):
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be 0 or a positive number of GB, got {value!r}")
        if budget_gb > 0 and keep_free_gb > 0:
            raise ValueError(f"set either budget_gb ({budget_gb:g}) or keep_free_gb ({keep_free_gb:g}), not both: "
                             "budget_gb caps the model's resident weights, keep_free_gb leaves memory to other "
                             "programs; set the other to 0")
        return cls(weights_cap_bytes=int(budget_gb * GB) if budget_gb > 0 else None,
                   keep_free_bytes=int(keep_free_gb * GB) if keep_free_gb > 0 else None)

    @property
    def is_set(self) -> bool:
        return self.weights_cap_bytes is not None or self.keep_free_bytes is not None

    def check_fits(self, device: str, total_bytes: int) -> None:
        """Refuse a budget the device cannot hold at all."""
        if self.weights_cap_bytes is not None and self.weights_cap_bytes > total_bytes:
            raise ValueError(f"budget_gb {self.weights_cap_bytes / GB:g} is larger than {device} "
                             f"({gb(total_bytes)} in all); use at most that, or 0 to let ComfyUI decide")
        if self.keep_free_bytes is not None and self.keep_free_bytes >= total_bytes:
            raise ValueError(f"keep_free_gb {self.keep_free_bytes / GB:g} leaves nothing of {device} "
                             f"({gb(total_bytes)} in all) for the model; use less than that")

    def limit_bytes(self, device_total_bytes: int) -> tuple[int, str] | None:
        """The budget as device memory, for the Memory Report's chart: (bytes, what they mean)."""
        if self.weights_cap_bytes is not None:
            return self.weights_cap_bytes, f"budget_gb: resident weights <= {gb(self.weights_cap_bytes)}"
        if self.keep_free_bytes is not None:
            return (device_total_bytes - self.keep_free_bytes,
                    f"keep_free_gb: {gb(self.keep_free_bytes)} of {gb(device_total_bytes)} left free")
        return None

    def describe(self) -> str:
        if self.weights_cap_bytes is not None:
            return f"resident weights <= {gb(self.weights_cap_bytes)}"
        if self.keep_free_bytes is not None:
            return f"keep {gb(self.keep_free_bytes)} free"
        return "no budget (ComfyUI decides)"
