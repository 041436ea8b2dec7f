"""Coefficient schedules as pure functions of the number of training tokens seen.

Every scheduled quantity of a step (learning rate, TopK k, L1 weight, the TSAE's gate openness and
distillation weight, ...) is a function of the global token count t, so a resumed run recomputes
exactly the same values from the checkpointed t.  The building block is a ramp:

    Ramp(start, end, t0, t1, shape)(t) = start                     t <= t0
                                       = end                       t >= t1
                                       = start + g(u) (end-start)  u = (t-t0)/(t1-t0) otherwise

    g(u) = u                 "linear"
         = (1 - cos(pi u))/2 "cosine"
    "geometric" interpolates log-linearly: start (end/start)^u (for k annealing, which should
    spend comparable time at each octave of k).

`Chain` strings ramps together (the value is given by the last ramp whose t0 <= t), and a
`Schedule` maps names to these functions: `Schedule.at(t) -> {"lr": ..., "k": ...}`, with the
names in `Schedule.integer` rounded to ints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

ScalarFn = Callable[[float], float]


@dataclass(frozen=True)
class Ramp:
    start: float
    end: float
    t0: float = 0.0
    t1: float = 0.0
    shape: str = "linear"

    def __post_init__(self):
        if self.shape not in ("linear", "cosine", "geometric"):
            raise ValueError(f"unknown ramp shape {self.shape!r}")
        if self.t1 < self.t0:
            raise ValueError(f"ramp ends before it starts: t0={self.t0} > t1={self.t1}")
        if self.shape == "geometric" and (self.start <= 0 or self.end <= 0):
            raise ValueError("a geometric ramp needs positive start and end")

    def __call__(self, t: float) -> float:
        if t >= self.t1:
            return float(self.end)
        if t <= self.t0:
            return float(self.start)
        u = (t - self.t0) / (self.t1 - self.t0)
        if self.shape == "geometric":
            return self.start * (self.end / self.start) ** u
        if self.shape == "cosine":
            u = (1 - math.cos(math.pi * u)) / 2
        return self.start + u * (self.end - self.start)


def constant(value: float) -> Ramp:
    return Ramp(value, value)


@dataclass(frozen=True)
class Chain:
    """Piecewise schedule: the last ramp with t0 <= t decides (the first one before any)."""

    ramps: tuple[Ramp, ...]

    def __call__(self, t: float) -> float:
        current = self.ramps[0]
        for r in self.ramps[1:]:
            if r.t0 <= t:
                current = r
        return current(t)


def lr_schedule(lr: float, end: float, warmup_tokens: float = 0, decay_frac: float = 0.0,
                start: float = 0, final_frac: float = 0.0) -> Chain:
    """Over tokens [start, end]: linear warm-up 0 -> lr over `warmup_tokens`, constant, then linear
    decay to final_frac * lr over the last `decay_frac` of the span."""
    decay_start = end - decay_frac * (end - start)
    return Chain((Ramp(0.0 if warmup_tokens else lr, lr, start, start + warmup_tokens),
                  Ramp(lr, lr * final_frac if decay_frac else lr, decay_start, end)))


@dataclass
class Schedule:
    fns: dict[str, ScalarFn] = field(default_factory=dict)
    integer: frozenset[str] = frozenset({"k"})

    def __setitem__(self, name: str, fn: ScalarFn | float) -> None:
        self.fns[name] = fn if callable(fn) else constant(float(fn))

    def at(self, tokens: float) -> dict[str, float]:
        out = {}
        for name, fn in self.fns.items():
            v = fn(tokens)
            out[name] = int(round(v)) if name in self.integer else float(v)
        return out
