"""Signs that a training run is going wrong, noticed while it runs, each with the fix named.

A run at a learning rate far from what its SAE needs rarely fails loudly: its loss stays finite
and it ends with an SAE whose FVU never fell or whose latents died. `RunHealth` watches the
metrics rows the trainer logs and returns one warning per kind of trouble, the first time it
shows:

- FVU not falling: after the warmup and a tenth of the run, the best FVU is still at least
  `STALL_RATIO` of its first logged value (a learning rate too low to move the weights, or one so
  high that the steps cancel out);
- FVU rising: the median FVU of the last `SMOOTH_ROWS` rows is more than `RISE_RATIO` above the
  best such median so far (steps too large). One row is not enough: on heavy-tailed data a batch
  with an outlier token lifts a row's FVU by half in runs that end well (tests/test_sae.py's
  planted dictionary at every learning rate it is tested at);
- dead share rising: at least `DEAD_SHARE` of the latents are dead and the share has grown over
  the last `DEAD_ROWS` rows (too large steps knock latents out of the data's range).
"""

from __future__ import annotations

from dataclasses import dataclass, field

STALL_RATIO = 0.8
RISE_RATIO = 1.5
SMOOTH_ROWS = 5
DEAD_SHARE = 0.5
DEAD_ROWS = 4


@dataclass
class RunHealth:
    """Fed every metrics row (`observe`); returns each kind of warning once."""

    lr: float
    """train.lr, named in the advice."""
    warmup_steps: int
    total_steps: int
    first_fvu: float | None = None
    best_fvu: float = float("inf")
    fvus: list[float] = field(default_factory=list)
    best_median: float = float("inf")
    dead: list[float] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)

    def observe(self, step: int, fvu: float, dead_fraction: float) -> list[str]:
        """The warnings this metrics row raises for the first time."""
        out = []
        if self.first_fvu is None:
            self.first_fvu = fvu
        self.best_fvu = min(self.best_fvu, fvu)
        self.dead.append(dead_fraction)
        settled = step >= max(self.warmup_steps, self.total_steps // 10)
        if settled and self.best_fvu >= STALL_RATIO * self.first_fvu:
            out.append(self._once("stall", f"FVU {fvu:.3f} at step {step:,} has not fallen from {self.first_fvu:.3f}: "
                                           f"train.lr = {self.lr:g} is likely too low (or far too high); try "
                                           f"{self.lr * 3:.3g} and {self.lr / 3:.3g}"))
        self.fvus.append(fvu)
        if len(self.fvus) >= SMOOTH_ROWS:
            median = sorted(self.fvus[-SMOOTH_ROWS:])[SMOOTH_ROWS // 2]
            if median > RISE_RATIO * self.best_median and median > 0.05:
                out.append(self._once("rise", f"FVU rose to {median:.3f} by step {step:,} (median of the last "
                                              f"{SMOOTH_ROWS} logs) from {self.best_median:.3f}: train.lr = "
                                              f"{self.lr:g} is too high; try {self.lr / 3:.3g}"))
            self.best_median = min(self.best_median, median)
        recent = self.dead[-DEAD_ROWS:]
        if (len(recent) == DEAD_ROWS and dead_fraction >= DEAD_SHARE
                and all(a < b for a, b in zip(recent, recent[1:]))):
            out.append(self._once("dead", f"{dead_fraction:.0%} of the latents are dead at step {step:,} and the share "
                                          f"is rising: try train.lr = {self.lr / 3:.3g} (steps that large push "
                                          f"latents out of the data's range)"))
        return [w for w in out if w]

    def _once(self, kind: str, message: str) -> str:
        if kind in self.warned:
            return ""
        self.warned.add(kind)
        return "train: warning: " + message
