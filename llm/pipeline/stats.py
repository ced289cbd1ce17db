"""Is a difference between two sets of runs larger than what the seed alone moves?

Each side of a comparison is n runs of one experiment that differ only in their seeds (replicates,
`runtime.replicate`). `difference(old, new)` gives each side's mean and standard deviation, the
difference of the means with its 95% interval, and a p-value, by Student's two-sample t-test: the
variance pooled over both sides, n_old + n_new - 2 degrees of freedom.

Why Student's and not Welch's t, or a resampling test (chosen by measurement, ci/calibration/):
- The question is "did anything but the seed change?". Under that null hypothesis both sides are
  draws of one distribution, so their variances are equal by construction, and pooling estimates
  the one spread from every run. Welch's test trusts each side's own spread; 3 runs can happen to
  cluster (6 of the CI profile's 16 pretraining losses lie within 0.01 of each other) and then a
  seed change looks significant: on the CI profile, 10 baseline against 3 new replicates, Welch's
  gate raised a false alarm under a pure seed change in 8.5% of draws, Student's in 3.2%.
- With 3 runs per side an exact permutation test has C(6, 3) = 20 arrangements, so its smallest
  one-sided p-value is 0.05 and, corrected for the 7 gated metrics, it could never reject; a
  bootstrap of 3 values underestimates their spread.
The t-test assumes roughly normal metrics; the calibration measures the false-alarm rate it gives.
When a real change also changes the spread, the interval is approximate (it assumes one spread).
`difference(old, new, test="welch")` gives Welch's test, for comparison.

With one run on one side, the other side's spread stands for both (the pooled variance is that
side's: n - 1 degrees of freedom). With one run per side no spread is known: no interval, no
p-value.

`holm(p)` adjusts p-values for testing several metrics at once (Holm's step-down method): the gate
rejects where the adjusted p is at most alpha, so the chance that any gated metric fails by luck
is at most alpha, whatever the metrics' correlation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _scipy

LEVEL = 0.95  # the intervals'
ALPHA = 0.05  # the gate's error rate across all its metrics together


@dataclass(frozen=True)
class Difference:
    """new - old for one metric, from `n_old` and `n_new` runs."""

    n_old: int
    n_new: int
    mean_old: float
    mean_new: float
    sd_old: float | None  # None with one run
    sd_new: float | None
    se: float | None  # standard error of the difference; None: no spread known
    df: float | None  # degrees of freedom of its t distribution
    test: str  # "student" (pooled variance), "welch", or "none"

    @property
    def delta(self) -> float:
        return self.mean_new - self.mean_old

    def interval(self, level: float = LEVEL) -> tuple[float, float] | None:
        """The `level` confidence interval of the difference; None without spread."""
        if self.se is None:
            return None
        if self.se == 0:
            return (self.delta, self.delta)
        half = _scipy.t.ppf(0.5 + level / 2, self.df) * self.se
        return (self.delta - half, self.delta + half)

    def p_value(self) -> float | None:
        """Two-sided: is the difference other than 0?"""
        if self.se is None:
            return None
        if self.se == 0:
            return 1.0 if self.delta == 0 else 0.0
        return float(2 * _scipy.t.sf(abs(self.delta) / self.se, self.df))

    def p_worse(self, worse: str) -> float | None:
        """One-sided: did the metric move in the `worse` direction ("higher" or "lower")?"""
        if self.se is None:
            return None
        worse_by = self.delta if worse == "higher" else -self.delta
        if self.se == 0:
            return 0.0 if worse_by > 0 else 1.0
        return float(_scipy.t.sf(worse_by / self.se, self.df))


def difference(old: Sequence[float], new: Sequence[float], test: str = "student") -> Difference:
    """The difference of the means of `new` and `old` (each at least one finite value), tested by
    `test`: "student" (pooled variance) or "welch"."""
    n1, n2 = len(old), len(new)
    if not n1 or not n2:
        raise ValueError("each side needs at least one value")
    m1, m2 = statistics.fmean(old), statistics.fmean(new)
    s1 = statistics.stdev(old) if n1 > 1 else None
    s2 = statistics.stdev(new) if n2 > 1 else None
    if n1 + n2 > 2 and (test == "student" or s1 is None or s2 is None):
        pooled = ((n1 - 1) * (s1 or 0.0) ** 2 + (n2 - 1) * (s2 or 0.0) ** 2) / (n1 + n2 - 2)
        se = math.sqrt(pooled * (1 / n1 + 1 / n2))
        return Difference(n1, n2, m1, m2, s1, s2, se, float(n1 + n2 - 2), "student")
    if s1 is not None and s2 is not None:
        v1, v2 = s1 * s1 / n1, s2 * s2 / n2
        se = math.sqrt(v1 + v2)
        df = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1)) if se > 0 else float(n1 + n2 - 2)
        return Difference(n1, n2, m1, m2, s1, s2, se, df, "welch")
    if s1 is None and s2 is None:
        return Difference(n1, n2, m1, m2, None, None, None, None, "none")
    return difference(old, new, "student")  # Welch needs two runs a side: one side's spread stands for both


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order (each at most 1)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
