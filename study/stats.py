"""The statistics of METHOD.md §5, §5.1 and §5.3, as pure functions over numbers: no torch, no file read.

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
    """The p-quantile (p >= 1/2) of Student's t with df degrees of freedom, by bisection on its CDF (the CDF by
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


def beta_regularised(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, by its continued fraction (modified Lentz), using the
    symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - beta_regularised(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    f, c, d = 1.0, 1.0, 0.0
    for i in range(1000):
        m = i // 2
        if i == 0:
            term = 1.0
        elif i % 2 == 0:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + term * d
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1 + term / c
        c = c if abs(c) > 1e-300 else 1e-300
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1) / a


def t_cdf(x: float, df: int) -> float:
    """Student's t CDF, 1 - I_{df / (df + x^2)}(df/2, 1/2) / 2 for x >= 0 and symmetric below (accurate in the far
    tails too, which the p-values need)."""
    tail = beta_regularised(df / 2, 0.5, df / (df + x * x)) / 2
    return 1 - tail if x >= 0 else tail


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def chi2_sf(q: float, df: int) -> float:
    """P(chi^2_df > q), the regularised upper incomplete gamma Q(df/2, q/2) as 1 minus its power series (the
    p-value of Cochran's Q; accurate where it matters, q < ~200)."""
    if q <= 0:
        return 1.0
    a, x = df / 2, q / 2
    term = total = 1 / a
    n = 1
    while term > 1e-17 * total:
        term *= x / (a + n)
        total += term
        n += 1
    return max(0.0, 1 - math.exp(a * math.log(x) - x - math.lgamma(a)) * total)


def interval(xs, p: float = 0.975) -> dict:
    """Mean and 95 % t-interval over seeds (the seed is the unit), None values left out; n = 1 gives no interval.
    p: the upper quantile of t that sets the half-width (0.995 for a Bonferroni interval over five comparisons)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    m, n = mean(xs), len(xs)
    if n < 2:
        return {"mean": m, "ci95": None, "n_seeds": n}
    half = t_quantile(n - 1, p) * standard_error(xs)
    return {"mean": m, "ci95": [m - half, m + half], "n_seeds": n}


def standard_error(xs) -> float:
    """s / sqrt(n) of the values that are not None; None for fewer than two."""
    xs = [x for x in xs if x is not None]
    m, n = mean(xs), len(xs)
    if n < 2:
        return None
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


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
    n, se = iv["n_seeds"], standard_error(diffs)
    hi = iv["ci95"][1] if direction > 0 else -iv["ci95"][0]
    mde = (t_quantile(n - 1, 1 - alpha / 2) + t_quantile(n - 1, power)) * se
    return {**out, "benefit_excluded": hi < delta, "mde80": mde}


# ==== The confirmatory run's multiplicity and the pooled analyses (METHOD.md §5.3) ============================
def p_values(diffs: list, delta: float) -> dict:
    """The paired t test's one-sided p-values on n - 1 degrees of freedom: p_greater for "> 0" (H0: mu <= 0),
    p_less for "< 0" (H0: mu >= 0), and the TOST p for "inside +-delta", the larger of the one-sided p-values
    against -delta (H0: mu <= -delta) and against +delta (H0: mu >= delta)."""
    xs = [x for x in diffs if x is not None]
    if len(xs) < 2 or standard_error(xs) == 0:
        return {"p_greater": None, "p_less": None, "p_tost": None}  # no test: the verdict is undetermined
    m, se, df = mean(xs), standard_error(xs), len(xs) - 1
    return {
        "p_greater": 1 - t_cdf(m / se, df),
        "p_less": t_cdf(m / se, df),
        "p_tost": max(1 - t_cdf((m + delta) / se, df), t_cdf((m - delta) / se, df)),
    }


def holm(ps: list) -> list:
    """Holm's step-down adjustment of a family's p-values, in their given order: the i-th smallest (i = 0, 1, ..)
    times (m - i), made monotone by a running maximum and capped at 1. A None (no test) stays None, out of m."""
    order = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    adjusted, running = [None] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def verdict_from_p(p: dict, level: float = 0.025) -> str:
    """The §5.1 rule read from (adjusted) p-values, in its order: reproduced (p_greater < level), contradicted
    (p_less < level), absent (p_tost < level), undetermined."""
    if p["p_greater"] is None:
        return "undetermined"
    if p["p_greater"] < level:
        return "reproduced"
    if p["p_less"] < level:
        return "contradicted"
    if p["p_tost"] < level:
        return "absent"
    return "undetermined"


def absent_reachable(se: float, n: int, delta: float) -> float:
    """The probability that the 95 % interval lies inside +-delta ("absent") if the true effect is 0 and the
    standard error is se: 2 Phi((delta - t SE) / SE) - 1, 0 when t SE >= delta, t = t(0.975, n - 1)."""
    if n < 2 or se is None or se <= 0:
        return None
    t = t_quantile(n - 1)
    return max(0.0, 2 * normal_cdf((delta - t * se) / se) - 1)


def heterogeneity(y: list, se: list) -> dict:
    """Cochran's Q with inverse-variance weights, its chi-square p-value on W - 1 df, and I^2 = max(0, (Q - df)/Q)."""
    w = [1 / s**2 for s in se]
    mu = sum(wi * yi for wi, yi in zip(w, y)) / sum(w)
    q = sum(wi * (yi - mu) ** 2 for wi, yi in zip(w, y))
    df = len(y) - 1
    return {"Q": q, "Q_df": df, "Q_p": chi2_sf(q, df), "I2": max(0.0, (q - df) / q) if q > 0 else 0.0}


def common_effect(y: list, se: list, n: list) -> dict:
    """The common-effect (inverse-variance) pool of per-world means y with standard errors se from n seeds each:
    conditional on these worlds; a t-interval on sum(n_i - 1) degrees of freedom. None if a world's se is 0."""
    if min(se) <= 0:
        return None
    w = [1 / s**2 for s in se]
    mu, pooled_se, df = sum(wi * yi for wi, yi in zip(w, y)) / sum(w), math.sqrt(1 / sum(w)), sum(n) - len(n)
    half = t_quantile(df) * pooled_se
    return {"mean": mu, "se": pooled_se, "df": df, "ci95": [mu - half, mu + half], **heterogeneity(y, se)}


def random_effects(y: list, se: list) -> dict:
    """The random-effects pool over worlds: tau^2 by DerSimonian-Laird, (Q - (W - 1)) / (sum w - sum w^2 / sum w)
    floored at 0; weights w* = 1/(se^2 + tau^2); the Hartung-Knapp interval mu +- t(0.975, W - 1) sqrt(q / sum w*)
    with q = sum w* (y - mu)^2 / (W - 1), truncated at max(1, q) (ci95, METHOD.md §5.3's amendment) and not
    (ci95_untruncated, as first registered). None if a world's se is 0."""
    if min(se) <= 0:
        return None
    het = heterogeneity(y, se)
    w = [1 / s**2 for s in se]
    tau2 = max(0.0, (het["Q"] - het["Q_df"]) / (sum(w) - sum(wi**2 for wi in w) / sum(w)))
    ws = [1 / (s**2 + tau2) for s in se]
    mu = sum(wi * yi for wi, yi in zip(ws, y)) / sum(ws)
    q = sum(wi * (yi - mu) ** 2 for wi, yi in zip(ws, y)) / het["Q_df"]
    t = t_quantile(het["Q_df"])
    half, half_untruncated = t * math.sqrt(max(1.0, q) / sum(ws)), t * math.sqrt(q / sum(ws))
    return {
        "mean": mu,
        "se": math.sqrt(max(1.0, q) / sum(ws)),
        "df": het["Q_df"],
        "tau2": tau2,
        "ci95": [mu - half, mu + half],
        "ci95_untruncated": [mu - half_untruncated, mu + half_untruncated],
        **het,
    }
