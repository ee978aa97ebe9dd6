"""How long a run trains: one budget, in steps, tokens, training FLOPs or wall-clock seconds.

    budget=steps:2000      2000 optimizer steps
    budget=tokens:5e6      floor(5e6 / batch_size) steps
    budget=flops:1e13      floor(1e13 / (batch_size x training FLOPs per token)) steps, the FLOPs
                           counted as eval reports them (`train.saes.flops.algorithmic_cost`)
    budget=seconds:600     until 600 s of training have passed (validation passes not counted),
                           resumed runs counting the seconds already spent

A sweep at equal training compute across architectures is one budget for all of them:
`python -m train -m model=topk,switch budget=flops:1e13`. The three deterministic kinds become a
step count before the first step, so a resumed run stops, and decays its learning rate, exactly
where an uninterrupted one does; `seconds` depends on the machine's speed. Budgets never overshoot:
a run stops at the last whole step within its budget (and needs room for one).

The learning rate is constant, then decays linearly to 0 over the last `lr_decay_frac` of the
budget, in the budget's own unit: steps for the deterministic kinds, seconds for `seconds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.errors import ToolkitError

KINDS = ("steps", "tokens", "flops", "seconds")


class BudgetError(ToolkitError, ValueError):
    """A budget that cannot be read or that cannot hold one step (a ValueError too: a bad value)."""


@dataclass(frozen=True)
class Budget:
    kind: str  # one of KINDS
    amount: float  # > 0, in the kind's unit

    @classmethod
    def parse(cls, text: object) -> Budget:
        """'kind:amount' (amount like 2000, 2_000, 5e6 or 1.5e13) -> Budget; BudgetError otherwise."""
        form = "kind:amount with kind one of " + ", ".join(KINDS) + " (e.g. budget=flops:1e13)"
        if not isinstance(text, str) or text.count(":") != 1:
            raise BudgetError(f"budget must be {form}, got {text!r}")
        kind, _, value = (part.strip() for part in text.partition(":"))
        if kind not in KINDS:
            raise BudgetError(f"budget kind {kind!r} is unknown: the budget must be {form}")
        try:
            amount = float(value.replace("_", ""))
        except ValueError:
            raise BudgetError(f"budget amount {value!r} is not a number: the budget must be {form}") from None
        if not (math.isfinite(amount) and amount > 0):
            raise BudgetError(f"budget {text!r} must be positive")
        if kind == "steps" and not amount.is_integer():
            raise BudgetError(f"budget {text!r}: steps must be a whole number")
        return cls(kind, amount)

    def __str__(self) -> str:
        return f"{self.kind}:{self.amount:g}"

    @property
    def timed(self) -> bool:
        """True for a seconds budget (its length is known only as it runs)."""
        return self.kind == "seconds"

    def steps(self, batch_size: int, flops_per_token: float) -> int | None:
        """The step count of a deterministic budget (None for seconds); BudgetError below one step."""
        if self.timed:
            return None
        per_step = {"steps": 1.0, "tokens": batch_size, "flops": batch_size * flops_per_token}[self.kind]
        n = math.floor(self.amount / per_step + 1e-9)  # 1e-9: 3 x 0.1 FLOPs is a budget of 3 steps, not 2
        if n < 1:
            raise BudgetError(f"budget {self} is less than one step ({per_step:.4g} {self.kind} with batch_size "
                              f"{batch_size}); raise it")
        return n


@dataclass(frozen=True)
class Length:
    """A budget made concrete for one run: it ends after `total` steps, or for a seconds budget after
    `total` seconds of training. `elapsed` and `total` are in that unit, which the learning-rate
    decay and warm-ups (`SAE.schedule`) follow too."""

    timed: bool
    total: float

    @classmethod
    def of(cls, budget: Budget, batch_size: int, flops_per_token: float) -> Length:
        steps = budget.steps(batch_size, flops_per_token)
        return cls(True, budget.amount) if steps is None else cls(False, float(steps))

    @property
    def steps(self) -> int | None:
        """The run's step count (None for a seconds budget)."""
        return None if self.timed else int(self.total)

    def elapsed(self, step: int, seconds: float) -> float:
        """How much of the budget `step` steps taking `seconds` of training have used."""
        return seconds if self.timed else float(step)

    def finished(self, step: int, seconds: float) -> bool:
        return self.elapsed(step, seconds) >= self.total
