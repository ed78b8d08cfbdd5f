"""Step cache: on some denoising steps a sample reuses its last velocity instead of running
the transformer.

Caches like TeaCache and MagCache decide at run time, from how much the model's inputs or
outputs changed, whether a step can be skipped. Here the decision is a fixed function of the
step index and the number of steps, fixed when a request is admitted, so:
- a result depends only on the request (seed, steps, prompt, image), never on what else is
  in the batch or on timing: the same request gives the same image every time;
- each sample keeps its own schedule, so samples at different steps share batches as
  before (continuous batching); a sample whose step is skipped is simply not in that
  step's transformer batch.

A skipped step is an Euler update with the velocity of the sample's last computed step; for
a flow-matching model whose trajectories are nearly straight in the middle of the schedule
that is close to the exact update. The first steps (where the image's layout forms) and the
last ones (fine detail) are always computed.

    StepCacheConfig(compute_every=3, always_first=3, always_last=2).compute_steps(20)
    # {0, 1, 2, 3, 6, 9, 12, 15, 18, 19}: 10 transformer evaluations instead of 20

The engine applies it from outside the model: `LocalEngine(registry, step_cache="fast")`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepCacheConfig:
    """Which steps run the transformer: the first `always_first`, the last `always_last`, and
    every `compute_every`-th step in between (counting from the first one after
    `always_first`). `compute_every=1` computes every step (the exact sampler)."""

    compute_every: int = 2
    always_first: int = 3
    always_last: int = 2

    def __post_init__(self) -> None:
        if self.compute_every < 1:
            raise ValueError(f"compute_every must be at least 1, got {self.compute_every}")
        if self.always_first < 1:
            # Step 0 has no earlier velocity to reuse.
            raise ValueError(f"always_first must be at least 1, got {self.always_first}")
        if self.always_last < 0:
            raise ValueError(f"always_last must not be negative, got {self.always_last}")

    def compute_steps(self, num_steps: int) -> frozenset[int]:
        """The step indices (0 … num_steps − 1) at which the transformer is evaluated."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        first = set(range(min(self.always_first, num_steps)))
        last = set(range(max(0, num_steps - self.always_last), num_steps))
        middle = set(range(self.always_first, num_steps, self.compute_every))
        return frozenset(first | last | middle)

    def evals(self, num_steps: int) -> int:
        """Transformer evaluations per image for `num_steps` steps."""
        return len(self.compute_steps(num_steps))

    def label(self) -> str:
        return f"every {self.compute_every}, first {self.always_first}, last {self.always_last}"


# Named presets. "fast": at 20 steps 10 evaluations (2×), at 28 steps 14 (2×).
PRESETS: dict[str, StepCacheConfig] = {
    "fast": StepCacheConfig(compute_every=3, always_first=3, always_last=2),
}
OFF = ("off", "exact", "none", "")


def resolve(spec: StepCacheConfig | str | None) -> StepCacheConfig | None:
    """A config, a preset name ("fast"), "every,first,last" (e.g. "3,3,2"), or off (None, "off")."""
    if spec is None or isinstance(spec, StepCacheConfig):
        return spec
    name = spec.strip().lower()
    if name in OFF:
        return None
    if name in PRESETS:
        return PRESETS[name]
    parts = name.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() for p in parts):
        every, first, last = (int(p) for p in parts)
        return StepCacheConfig(compute_every=every, always_first=first, always_last=last)
    raise ValueError(f"unknown step cache {spec!r}; use off, {', '.join(PRESETS)}, or every,first,last such as 3,3,2")
