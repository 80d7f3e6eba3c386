"""`RayConfig`: how `millis serve` spreads over Ray Serve replicas (flags and MILLIS_* variables, as
ServeConfig's). `replicas` 0, no `autoscale` and no `ray_address`: the single-process server, which
never imports Ray."""
from __future__ import annotations

import re
from dataclasses import dataclass

from millis.common.config import flag as _f
from millis.common.errors import MillisError


TARGET_ONGOING = 2.0


@dataclass(frozen=True)
class RayConfig:
    replicas: int = _f(0, "Ray Serve replicas, each loading its own model (0 = one process, no Ray); threads per "
                          "replica = --threads (Ray's num_cpus)")
    autoscale: str = _f("", "MIN:MAX replicas, scaled by Ray on ongoing requests per replica (instead of "
                            "--replicas)")
    target_ongoing: float = _f(TARGET_ONGOING, "autoscaling: ongoing requests per replica Ray aims for")
    ray_address: str = _f("", "a running Ray cluster to join (auto, or ray://host:10001); default: start a local "
                              "Ray instance for this process")
    emit_ray_config: str = _f("", "write a Ray Serve config file (`serve deploy FILE`) for this deployment and exit")
    prefix_chars: int = _f(256, "generation: requests whose prompts share this many leading characters go to the "
                                "same replica (its prefix cache); 0 = least-loaded routing only")

    def __post_init__(self) -> None:
        if self.replicas < 0 or self.prefix_chars < 0 or self.target_ongoing <= 0:
            raise MillisError("replicas and prefix_chars must be >= 0 and target_ongoing > 0")
        if self.autoscale:
            self.scale_range()
        if self.replicas and self.autoscale:  # one of them was ignored without a word
            raise MillisError("--replicas and --autoscale both set the replica count: give one")
        if not self.autoscale and self.target_ongoing != TARGET_ONGOING:
            raise MillisError("--target-ongoing is read by --autoscale only")

    @property
    def wanted(self) -> bool:
        """Serve on Ray (else the single-process server)."""
        return bool(self.replicas or self.autoscale or self.ray_address or self.emit_ray_config)

    def scale_range(self) -> tuple[int, int]:
        m = re.fullmatch(r"([0-9]+):([0-9]+)", self.autoscale)  # ASCII digits: str.isdigit takes "²" and "١"
        if m is None or not 0 <= int(m[1]) <= int(m[2]) or int(m[2]) < 1:
            raise MillisError(f"autoscale must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale!r}")
        return int(m[1]), int(m[2])
