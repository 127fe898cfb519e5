"""The statistics of METHOD.md §5 and §5.1, as pure functions over numbers: no torch, no file read.

A comparison is a list of paired differences, one per seed (method - control): its mean with a 95 % t-interval
(`interval`), the pre-registered verdict from that interval (`verdict`), and the verdict with the benefit-excluded
flag and the minimum detectable effect (`decide`). The rule's parameters -- delta, alpha, power, the minimum number
of seeds -- are the pre-registration's (study/preregistration.json); whoever reads that file passes them in.
"""

import functools
import math


def mean(xs):
    """The mean of the values that are not None; None if there are none (a premise with no comparable pair)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@functools.cache
def t_quantile(df: int, p: float = 0.975) -> float:
    """The p-quantile of Student's t with df degrees of freedom, by bisection on its CDF (the CDF by
    Simpson's rule on the density: exact to ~1e-7 here, no scipy needed; each (df, p) computed once)."""

    def dens(x):
        return (
            math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2))
            / math.sqrt(df * math.pi)
            * (1 + x * x / df) ** (-(df + 1) / 2)
        )

    def cdf(x):
        return 0.5 + sum(
            (dens(a) + 4 * dens(a + x / 2000) + dens(a + x / 1000)) * x / 6000
            for a in (i * x / 1000 for i in range(1000))
        )

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def interval(xs) -> dict:
    """Mean and 95 % t-interval over seeds (the seed is the unit), None values left out; n = 1 gives no interval."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    m, n = mean(xs), len(xs)
    if n < 2:
        return {"mean": m, "ci95": None, "n_seeds": n}
    half = t_quantile(n - 1) * math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)
    return {"mean": m, "ci95": [m - half, m + half], "n_seeds": n}


def verdict(ci, delta: float, direction: int = 1) -> str:
    """The pre-registered rule (METHOD.md §5.1), in its order of precedence, from the paired 95 % interval
    ci = [lo, hi] in the paper's direction: reproduced (lo > 0), contradicted (hi < 0), absent (-delta < lo
    and hi < delta, strictly: two one-sided tests at 0.025 each), undetermined (otherwise, or no interval)."""
    if ci is None:
        return "undetermined"
    lo, hi = ci if direction > 0 else (-ci[1], -ci[0])
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "contradicted"
    if -delta < lo and hi < delta:
        return "absent"
    return "undetermined"


def decide(diffs: list, delta: float, alpha: float, power: float, min_seeds: int, direction: int = 1) -> dict:
    """A paired comparison over seeds (method - control per seed) judged by METHOD.md §5.1: its interval, the
    verdict, whether a benefit of delta or more is excluded (hi < delta in the paper's direction) and the
    minimum detectable effect at the given power, (t(1 - alpha/2, n - 1) + t(power, n - 1)) SE with
    SE = s / sqrt(n). None values (a seed where the difference is undefined) are left out. With fewer than
    min_seeds seeds (the registration: 10) the verdict is "undetermined (fewer than 10 seeds)"."""
    iv = interval(diffs) or {"mean": None, "ci95": None, "n_seeds": 0}
    rule = verdict(iv["ci95"], delta, direction)
    if iv["n_seeds"] < min_seeds:
        rule = f"undetermined (fewer than {min_seeds} seeds)"
    out = {**iv, "delta": delta, "verdict": rule}
    if iv["ci95"] is None:
        return {**out, "benefit_excluded": None, "mde80": None}
    n, m = iv["n_seeds"], iv["mean"]
    se = math.sqrt(sum((x - m) ** 2 for x in diffs if x is not None) / (n - 1) / n)
    hi = iv["ci95"][1] if direction > 0 else -iv["ci95"][0]
    mde = (t_quantile(n - 1, 1 - alpha / 2) + t_quantile(n - 1, power)) * se
    return {**out, "benefit_excluded": hi < delta, "mde80": mde}
