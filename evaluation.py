"""How the methods are measured (METHOD.md §4, §5), and the experiments behind the figures.

The meta-test metrics (gold reward, win rate, KL, the RM's accuracy against the gold order), the papers'
premises, the paired statistics over seeds (t-intervals, verdicts), and, at --figure-seeds seeds, the reward-vs-KL
frontier, MetaRM's iterative RLHF rounds, and the §2.5 convergence measurements of the bilevel method.
train.py runs all of it; bench.py reuses hypergradient_error.

`s` below is a `Setup`: what every seed of a run shares, built once by train.make_setup and read only.
It lives here, not in train.py, because train.py imports this module.
"""

import copy
import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import bilevel
import data
import metarm
import policy
from cli import clock

MAX_NEW = metarm.AdaptConfig.max_new_tokens  # the longest response, everywhere
# METHOD.md §5.1: delta, the comparisons and the verdict rule's parameters, fixed before the runs they govern
PREREGISTRATION = json.loads((Path(__file__).parent / "preregistration.json").read_text())
DELTA = PREREGISTRATION["delta"]
MATCHED_KL_BETA = "0.5"  # §5.1: bilevel's curve is read at the vanilla RM's KL at beta = 0.5
FRONTIER_BETAS = (0.25, 0.5, 1.0)  # §5.1: the points of the gold-vs-log-KL curve


@dataclass(frozen=True)
class Setup:
    """What every seed of a run shares (train.make_setup builds it; nothing changes it afterwards)."""

    world: data.World
    model: policy.GPT  # pi_ref, frozen
    device: str
    methods: list  # the methods this run compares (train.METHODS or a subset)
    domains: list  # the evaluation domains: data.TEST_DOMAINS or data.DEV_DOMAINS
    rm: policy.RewardModel  # the reward model's architecture; each method's phi is a dict of its own
    train_pairs: tuple  # (chosen, rejected): the pooled training domains' pairs, encoded
    domain_pairs: dict  # training domain -> its rows of train_pairs
    own_pairs: dict  # evaluation domain -> its own labelled pairs (the in-domain ceiling, the positive control)
    eval_pairs: dict  # evaluation domain -> its held-out labelled pairs, encoded
    gold_margins: dict  # evaluation domain -> r*(chosen) - r*(rejected) of its eval_pairs
    prompts: dict  # every domain -> its prompts (tensor)
    theta_ref: dict  # pi_ref's adapted parameters (the output head)
    unseen_tokens: torch.Tensor  # (V,) bool: the tokens no training pair's response contains
    adapt_cfg: metarm.AdaptConfig
    rm_cfg: metarm.RMConfig
    metarm_cfg: metarm.MetaRMConfig


# ==== Meta-test metrics and premises ============================================================
def crn_seed(seed: int, domain_index: int, repeat: int) -> int:
    """The generator seed of one (seed, domain, repeat): every method uses it (common random numbers)."""
    return 1_000_000 * (seed + 1) + 1000 * domain_index + repeat


def reward_functions(s: Setup, rms: dict, d: str, ref: dict) -> dict:
    """method -> the reward its adaptation (3) uses on domain d, standardised on pi_ref's samples (§1)."""
    out = {}
    for m in s.methods:
        if m == "oracle":
            fn = gold_fn(s.world)
        elif m == "agnostic_oracle":
            fn = gold_fn(s.world, agnostic=True)
        elif m in ("vanilla_rm", "vanilla_rm_long", "bilevel", "bilevel_bt_only", "in_domain_rm"):
            fn = reward_fn(s.rm, phi_of(rms, m, d))
        else:
            continue  # sft, dpo: no adaptation; metarm: its own rounds
        out[m] = metarm.standardised(fn, ref)
    return out


def phi_of(rms: dict, m: str, d: str) -> dict:
    """Method m's reward model on domain d: one per domain (in_domain_rm; the bilevel RMs of --outer-data
    own), a dict keyed by domain names, or one for all, keyed by parameter names."""
    per_domain = isinstance(rms[m], dict) and all(k in data.DOMAINS for k in rms[m])
    return rms[m][d] if per_domain else rms[m]


def reward_fn(rm, phi: dict):
    """r_phi as a function of an encoded batch."""

    def r(batch):
        return policy.reward(rm, phi, batch)

    return r


def gold_fn(world, agnostic: bool = False):
    """r*_d of an encoded batch as a tensor (the domain is read from each prompt's tag); agnostic: the
    domain-agnostic gold reward of the agnostic_oracle ceiling."""

    def gold(batch):
        idx = batch["idx"]
        return torch.tensor(world.gold_rewards(idx.tolist(), agnostic), dtype=torch.float32, device=idx.device)

    return gold


def evaluate(model, theta, prompts, ref_eval, gold, gen, n: int, unseen_tokens=None):
    """Gold reward of pi_theta's samples, win rate against pi_ref's samples ref_eval of the same prompts
    (judged by the gold reward, ties 1/2), KL(pi_theta || pi_ref) (k1 on the policy's samples) and, given
    unseen_tokens, the probability pi_theta puts on them along its samples (unseen_mass)."""
    batch = policy.sample(model, theta, prompts.repeat(n, 1), MAX_NEW, gen)
    g = gold(batch)
    kl = (policy.logprob(model, theta, batch) - batch["logp_ref"]).mean()
    res = {
        "gold_reward": g.mean().item(),
        "win_rate": metarm.tie_accuracy(g - gold(ref_eval)).item(),
        "kl": kl.item(),
    }
    if unseen_tokens is not None:
        res["unseen_mass"] = unseen_mass(model, theta, batch, unseen_tokens)
    return res, batch, g


@torch.no_grad()
def unseen_mass(model, theta: dict, batch: dict, unseen_tokens) -> float:
    """The probability pi_theta gives the tokens in unseen_tokens (V,) bool, averaged over the response
    positions of batch: the mean of sum_{v unseen} pi_theta(v | x, y_<t) over every response token y_t.
    With unseen_tokens the tokens no training pair's response contains, it measures the mass DPO can move
    to tokens its pairs never show (METHOD.md §5.2, likelihood displacement)."""
    if policy.is_head(theta):
        logits = policy.head_logits(theta, batch["h"])
    else:
        logits, _ = torch.func.functional_call(model, theta, (batch["idx"],))
    mass = torch.softmax(logits[:, :-1], dim=-1)[..., unseen_tokens].sum(-1)  # position t predicts token t + 1
    mask = batch["mask"][:, 1:]
    return ((mass * mask).sum() / mask.sum()).item()


@torch.no_grad()
def rm_accuracy(s: Setup, rms: dict, m: str, d: str) -> float:
    """The RM's accuracy on d's labelled evaluation pairs against the noise-free gold ordering (gold
    ties excluded, RM ties 1/2); MetaRM's RMs (one per repeat) are averaged."""
    if m == "metarm":
        phis = [phi for (domain, _), phi in rms[m].items() if domain == d]
    else:
        phis = [phi_of(rms, m, d)]
    chosen, rejected = s.eval_pairs[d]
    accuracies = []
    for phi in phis:
        margins = policy.reward(s.rm, phi, chosen) - policy.reward(s.rm, phi, rejected)
        accuracies.append(metarm.tie_accuracy(margins, s.gold_margins[d]).item())
    return mean(accuracies)


# MetaRM's premise holds when the collapse ratio's 95 % interval lies below this (METHOD.md §5.2, registered)
COLLAPSE_THRESHOLD = 0.5
# the gold-margin bins of the premise's binned accuracy (METHOD.md §5.2): [0, 0.5), [0.5, 1), [1, 2), [2, inf)
MARGIN_BINS = (0.0, 0.5, 1.0, 2.0, math.inf)


@torch.no_grad()
def measure_premises(rm, phi: dict, ref_eval: dict, adapted: dict, gold, n: int) -> dict:
    """The papers' premises, measured with the vanilla RM (§4): its accuracy on gold-labelled pairs of
    two samples of the same prompt, from pi_ref and from the policy adapted with it; its normalised
    reward-difference spread (§3) on the same samples; and MetaRM's premise as the paper shows it (METHOD.md
    §5.2, within_prompt_differences): the within-prompt |r_i - r_j| at this fixed phi, and the accuracy
    binned by gold margin. Batches hold n samples per prompt, repeat-major (row = repeat x prompts + prompt)."""
    out = {}
    for name, batch in (("pi_ref", ref_eval), ("adapted", adapted)):
        r, g = policy.reward(rm, phi, batch), gold(batch)
        half = len(r) // 2  # rows i and i + half share a prompt
        acc = metarm.tie_accuracy(r[:half] - r[half : 2 * half], g[:half] - g[half : 2 * half]).item()
        out[f"acc_{name}_samples"] = None if math.isnan(acc) else acc  # NaN: every pair tied in gold
        r_by_prompt, g_by_prompt = r.view(n, -1).T.reshape(-1), g.view(n, -1).T.reshape(-1)  # prompt-major
        out[f"spread_{name}"] = metarm.reward_spread(r_by_prompt, n)
        for k, v in within_prompt_differences(r_by_prompt, g_by_prompt, n).items():
            out[f"{k}_{name}"] = v
    return out


def within_prompt_differences(r, g, k: int) -> dict:
    """Every pair i < j of two of the k samples of a prompt (prompt-major): the quartiles of |r_i - r_j|
    (absdiff_q25, _median, _q75), and for each gold-margin bin b of MARGIN_BINS (|g_i - g_j| in [lo, hi))
    the share of pairs in it (share_bin{b}) and the RM's accuracy against the gold order there (acc_bin{b};
    gold ties left out, RM ties 1/2; None for a bin without a pair that is not a gold tie)."""
    dr, dg = within_prompt_pairs(r, k), within_prompt_pairs(g, k)
    q = torch.quantile(dr.abs().double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=dr.device))
    out = {"absdiff_q25": q[0].item(), "absdiff_median": q[1].item(), "absdiff_q75": q[2].item()}
    for b, (lo, hi) in enumerate(zip(MARGIN_BINS, MARGIN_BINS[1:])):
        inside = (dg.abs() >= lo) & (dg.abs() < hi)
        out[f"share_bin{b}"] = inside.double().mean().item()
        acc = metarm.tie_accuracy(dr[inside], dg[inside]).item() if inside.any() else math.nan
        out[f"acc_bin{b}"] = None if math.isnan(acc) else acc
    return out


# ==== Paired statistics over seeds ==============================================================
def mean(xs):
    """The mean of the values that are not None; None if there are none (a premise with no comparable pair)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def t_quantile(df: int, p: float = 0.975) -> float:
    """The p-quantile of Student's t with df degrees of freedom, by bisection on its CDF (the CDF by
    Simpson's rule on the density: exact to ~1e-7 here, no scipy needed)."""

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


def decide(diffs: list, delta: float, direction: int = 1, min_seeds: int = PREREGISTRATION["min_seeds"]) -> dict:
    """A paired comparison over seeds (method - control per seed) judged by METHOD.md §5.1: its interval, the
    verdict, whether a benefit of delta or more is excluded (hi < delta in the paper's direction) and the
    minimum detectable effect at the registered power, (t(1 - alpha/2, n - 1) + t(power, n - 1)) SE with
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
    alpha, power = PREREGISTRATION["alpha"], PREREGISTRATION["power"]
    mde = (t_quantile(n - 1, 1 - alpha / 2) + t_quantile(n - 1, power)) * se
    return {**out, "benefit_excluded": hi < delta, "mde80": mde}


def pool_worlds(per_world: dict) -> dict:
    """METHOD.md §5.1, worlds: per primary comparison, each world's paired mean, interval and verdict (conditional
    on that world), and the pooled estimate -- the mean of the per-world means with a t-interval over worlds (W - 1
    degrees of freedom), judged by the same rule, and the between-world spread (standard deviation of the
    per-world means). per_world: world seed -> a run's results.json (decidable worlds only)."""
    names = [f"{a} - {b}" for a, b in PREREGISTRATION["primary"]]
    out = {}
    for name in names:
        worlds = {w: r["paired"][name] for w, r in per_world.items() if name in r["paired"]}
        means = [p["mean"] for p in worlds.values()]
        verdicts = {w: p["verdict"] for w, p in worlds.items()}
        out[name] = {
            "per_world": {w: {k: p[k] for k in ("mean", "ci95", "n_seeds", "verdict")} for w, p in worlds.items()},
            "pooled": decide(means, DELTA["gold_reward"], min_seeds=2),
            "between_world_sd": statistics.stdev(means) if len(means) > 1 else None,
            "verdicts_differ": len(set(verdicts.values())) > 1,
        }
    return out


# ==== The figures' experiments ==================================================================
def figure_experiments(
    cfg, s: Setup, logs: list, per_seed: list, sft_losses: list, timings: dict, bcfg: metarm.BilevelConfig
) -> dict:
    """Reward-vs-KL frontier, RLHF rounds, hypergradient error, outer convergence, training curves."""
    seeds = list(range(min(cfg.figure_seeds, cfg.seeds)))
    out = {}
    with clock(timings, "figure_frontier"):
        out["frontier"] = frontier(cfg, s, logs, per_seed, seeds)
    if "metarm" in s.methods:
        with clock(timings, "figure_rlhf_rounds"):
            out["rlhf_rounds"] = rlhf_figure(cfg, s, logs, seeds)
    if "bilevel" in s.methods:
        with clock(timings, "figure_hypergradient_error"):
            phi = logs[0]["rms"]["bilevel"]
            curv = logs[0]["curvature"]
            out["hypergradient_error"] = hypergradient_error(s.model, s.rm, s.theta_ref, s.world, phi, bcfg, curv)
        with clock(timings, "figure_outer_convergence"):
            out["outer_convergence"] = outer_convergence(s, logs, seeds, bcfg)

    def every(xs, n=10):
        return [x for i, x in enumerate(xs) if i % n == 0]

    out["training_curves"] = {
        "sft_loss": every(sft_losses),
        "vanilla_rm_loss": every([e["loss"] for e in logs[0]["vanilla_rm"]]),
        "bilevel_F": [e["F"] for e in logs[0].get("bilevel", [])],
    }
    return out


def frontier(cfg, s: Setup, logs: list, per_seed: list, seeds: list) -> dict:
    """Gold reward and KL after adaptation at beta in {0.25, 0.5, 1} for the vanilla and bilevel RMs and
    the oracle, on the first two evaluation domains, per seed (paired over seeds): one adaptation at
    0.25 and 1; at cfg.beta the main table's own adaptations (per_seed)."""
    methods = [m for m in ("vanilla_rm", "bilevel", "oracle") if m in s.methods]
    points = {
        m: {str(cfg.beta): {seed: [per_seed[seed]["metrics"][m][d] for d in s.domains[:2]] for seed in seeds}}
        for m in methods
    }
    gold = gold_fn(s.world)

    def gen(k):
        return policy.generator(k, s.device)

    for beta in [b for b in FRONTIER_BETAS if b != cfg.beta]:
        acfg = metarm.AdaptConfig(**{**asdict(s.adapt_cfg), "beta": beta})
        for seed in seeds:
            for i, d in enumerate(s.domains[:2]):
                prompts, key = s.prompts[d], crn_seed(seed, i, 7)
                ref = policy.sample(s.model, {}, prompts.repeat(8, 1), MAX_NEW, gen(crn_seed(seed, i, 99)))
                ref_eval = policy.sample(s.model, {}, prompts.repeat(cfg.eval_samples, 1), MAX_NEW, gen(key + 500))
                rewards = reward_functions(replace(s, methods=methods), logs[seed]["rms"], d, ref)
                for m in methods:
                    theta = metarm.adapt(s.model, prompts, rewards[m], acfg, gen(key))[0]
                    res = evaluate(s.model, theta, prompts, ref_eval, gold, gen(key + 600), cfg.eval_samples)[0]
                    points[m].setdefault(str(beta), {}).setdefault(seed, []).append(res)
    values = {
        m: {
            beta: {k: [mean([r[k] for r in per[seed]]) for seed in seeds] for k in ("gold_reward", "kl")}
            for beta, per in by_beta.items()
        }
        for m, by_beta in points.items()
    }
    out = {
        "domains": s.domains[:2],
        "seeds": seeds,
        "points": {
            m: {beta: {k: interval(v) for k, v in p.items()} for beta, p in by_beta.items()}
            for m, by_beta in values.items()
        },
    }
    if "bilevel" in values:  # paired over seeds at each beta
        out["bilevel - vanilla_rm"] = {
            beta: {
                k: interval([a - b for a, b in zip(values["bilevel"][beta][k], values["vanilla_rm"][beta][k])])
                for k in ("gold_reward", "kl")
            }
            for beta in values["bilevel"]
        }
        registered = {m: {str(b): by_beta[str(b)] for b in FRONTIER_BETAS} for m, by_beta in values.items()}
        out["matched_kl"] = matched_kl(registered, MATCHED_KL_BETA, seeds)
    return out


def gold_at_kl(points: list, kl: float) -> tuple:
    """Gold reward at `kl` on the piecewise-linear curve through points [(kl_i, gold_i)] in log KL (METHOD.md
    §5.1); outside the points' range the nearest segment is extended. Returns (gold, extended), or (None,
    False) where log KL is undefined or the curve is not a function of it: a KL estimate <= 0 (k1 can be
    negative after a few steps) or two points at the same KL."""
    if kl <= 0 or any(k <= 0 for k, _ in points) or len({k for k, _ in points}) < len(points):
        return None, False
    points = sorted((math.log(k), g) for k, g in points)
    x = math.log(kl)
    i = 0
    while i < len(points) - 2 and x > points[i + 1][0]:
        i += 1
    (x0, g0), (x1, g1) = points[i], points[i + 1]
    extended = x < points[0][0] or x > points[-1][0]
    return g0 + (g1 - g0) * (x - x0) / (x1 - x0), extended


def matched_kl(values: dict, beta: str, seeds: list) -> dict:
    """Jia's frontier trend, pre-registered (METHOD.md §5.1): per seed, bilevel's gold reward read at the
    vanilla RM's KL at `beta` on bilevel's gold-vs-log-KL curve, minus the vanilla RM's gold reward there."""
    diffs, extended = [], 0
    for i, _ in enumerate(seeds):
        target_kl = values["vanilla_rm"][beta]["kl"][i]
        curve = [(by_beta["kl"][i], by_beta["gold_reward"][i]) for by_beta in values["bilevel"].values()]
        gold, outside = gold_at_kl(curve, target_kl)
        diffs.append(None if gold is None else gold - values["vanilla_rm"][beta]["gold_reward"][i])
        extended += outside
    return {
        **decide(diffs, DELTA["gold_reward"]),
        "per_seed": diffs,
        "at_beta": beta,
        "extended_seeds": extended,
        "undefined_seeds": diffs.count(None),
    }


def rlhf_figure(cfg, s: Setup, logs: list, seeds: list, rounds: int = 3) -> dict:
    """§3, the paper's main setting: iterative RLHF on the training domains' prompts, MetaRM vs eta = 0,
    3 rounds, per seed: the RM's normalised spread, its accuracy against the gold order on pairs of the
    round's policy samples, and their gold reward. The pre-registered verdicts (METHOD.md §5.1) per round
    from round 2 on: round 1 is the same run for both (the same vanilla RM, the same draws)."""
    prompts = torch.cat([s.prompts[d][::4] for d in data.TRAIN_DOMAINS])
    runs = {"metarm": [], "metarm_eta0": []}
    for seed in seeds:
        gen = policy.generator(seed + 77, s.device)
        ref = policy.sample(s.model, {}, prompts.repeat(4, 1), MAX_NEW, gen)
        for name, eta in (("metarm", cfg.eta), ("metarm_eta0", 0.0)):
            phi, opt = policy.continue_from(
                logs[seed]["rms"]["vanilla_rm"], logs[seed]["rms"]["vanilla_opt"], cfg.rm_lr
            )
            mcfg = metarm.MetaRMConfig(**{**asdict(s.metarm_cfg), "eta": eta})
            gens = [policy.generator(seed + k, s.device) for k in (78, 79)]  # the same for both
            runs[name].append(
                rlhf_rounds(
                    s.model,
                    prompts,
                    ref,
                    s.rm,
                    phi,
                    opt,
                    s.train_pairs,
                    mcfg,
                    s.adapt_cfg,
                    rounds,
                    gold_fn(s.world),
                    *gens,
                )
            )

    def by_round(name, k):
        return [[run[t][k] for run in runs[name]] for t in range(rounds)]

    def paired(k, t):
        """metarm - metarm_eta0 per seed in round t (None where a seed's accuracy had no comparable pair)."""
        pairs = zip(by_round("metarm", k)[t], by_round("metarm_eta0", k)[t])
        return [None if a is None or b is None else a - b for a, b in pairs]

    metrics = ("spread", "gold", "rm_accuracy")
    out = {"seeds": seeds, "rounds": rounds}
    for name in runs:
        out[name] = {k: [interval(v) for v in by_round(name, k)] for k in metrics}
    out["metarm - metarm_eta0"] = {k: [interval(paired(k, t)) for t in range(rounds)] for k in metrics}
    out["verdicts"] = {}
    for k, delta in (("gold", DELTA["gold_reward"]), ("rm_accuracy", DELTA["rm_accuracy"])):
        out["verdicts"][k] = [{"round": t + 1, **decide(paired(k, t), delta)} for t in range(1, rounds)]
    return out


def to_float64(x):
    """A float64 CPU copy of a tensor, or of every tensor in a (nested) dict or tuple; other values as they are."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu() if x.is_floating_point() else x.detach().cpu()
    if isinstance(x, dict):
        return {k: to_float64(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(to_float64(v) for v in x)
    return x


def hypergradient_error(
    model,
    rm,
    theta_ref: dict,
    world,
    phi: dict,
    bcfg: metarm.BilevelConfig,
    curv: dict,
    domain: str = "restaurant",
    ns=(1, 2, 4, 8, 16, 32),
    timed: bool = False,
) -> dict:
    """Error of dF/dr against a reference vs HVPs, for CG (n iterations), Neumann and unrolled (4n terms
    or steps), on the real inner problem of one training domain at seed 0's bilevel RM (float64 copies).
    CG and Neumann solve at theta* (Newton, |grad g| <= 1e-9); unrolled runs its own inner steps from
    theta_ref. Reference: CG at theta* to a relative residual of 1e-12, itself checked against a central
    finite difference of F. training_setting: the hypergradient as one outer step would compute it from a
    cold start (T inner steps from theta_ref, then CG with cg_iters / cg_tol; training warm-starts).
    timed: add each row's seconds (bench.py only). model, rm: pi_ref and the reward model's architecture;
    curv: metarm.calibrate's result (rho and the inner step)."""
    model = copy.deepcopy(model).double().cpu()
    rm = copy.deepcopy(rm).double().cpu()
    phi = to_float64(phi)
    theta_ref = to_float64(theta_ref)
    bcfg = metarm.BilevelConfig(**{**asdict(bcfg), "rho": curv["rho"], "inner_lr": curv["inner_lr"]})
    prompts = torch.tensor(world.prompts[domain])
    candidate_prompts = prompts.repeat_interleave(bcfg.K, 0)
    cand = policy.sample(model, {}, candidate_prompts, bcfg.max_new_tokens, policy.generator(0))
    pairs = policy.encode_pairs(model, world.pairs[domain][:64])
    prob = {"cand": cand, "chosen": pairs[0], "rejected": pairs[1]}
    g, f = metarm.level_functions(model, prob, bcfg, theta_ref)
    with torch.no_grad():
        outer = {"r": metarm.candidate_rewards(rm, phi, cand, bcfg.K)}
    theta_gd, _ = bilevel.inner_solve(g, theta_ref, outer, 10 * bcfg.T, bcfg.inner_lr)  # g is not convex at theta_ref
    theta_star, newton = bilevel.newton_solve(g, theta_gd, outer, tol=1e-9)
    ref, _ = bilevel.hypergrad_implicit(f, g, theta_star, outer, "cg", max_iter=2000, tol=1e-12)

    def F(up):
        return f(bilevel.newton_solve(g, theta_star, up, tol=1e-9)[0], up)

    u = {"r": torch.randn(outer["r"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    fd = bilevel.hypergrad_fd(F, outer, u, eps=1e-4)
    solvers = {
        "cg": lambda n: bilevel.hypergrad_implicit(f, g, theta_star, outer, "cg", max_iter=n, tol=0.0),
        "neumann": lambda n: bilevel.hypergrad_implicit(
            f, g, theta_star, outer, "neumann", alpha=bcfg.inner_lr, J=4 * n
        ),
        "unrolled": lambda n: bilevel.hypergrad_unrolled(f, g, theta_ref, outer, 4 * n, bcfg.inner_lr),
    }

    def error(gr):
        return bilevel.norm(bilevel.add(gr, ref, -1.0)) / bilevel.norm(ref)

    curves = {name: [] for name in solvers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncated solves warn by design
        for name, solve in solvers.items():
            for n in ns:
                t = time.perf_counter()
                gr, info = solve(n)
                row = {"iters": n if name == "cg" else 4 * n, "hvps": info["hvps"], "error": error(gr)}
                curves[name].append({**row, "seconds": time.perf_counter() - t} if timed else row)
        theta_T, inner = bilevel.inner_solve(g, theta_ref, outer, bcfg.T, bcfg.inner_lr)
        gr, info = bilevel.hypergrad_implicit(f, g, theta_T, outer, "cg", max_iter=bcfg.cg_iters, tol=bcfg.cg_tol)
    training = {
        "T": bcfg.T,
        "cg_iters": bcfg.cg_iters,
        "cg_tol": bcfg.cg_tol,
        "hvps": info["hvps"],
        "inner_grad_norm": inner["grad_norm"],
        "error": error(gr),
    }
    return {
        "domain": domain,
        "newton_grad_norm": newton["grad_norm"],
        "fd_check_rel_error": abs(fd - bilevel.dot(ref, u).item()) / abs(fd),
        "curves": curves,
        "training_setting": training,
    }


# Below this cosine between the hypergradient training used and its reference (an outer step more than 37 degrees
# off), a run warns (README, Troubleshooting). The dev run's 30 checks gave 0.904 at the least: 0.8 leaves room for
# another machine's rounding and still catches a broken solve (one inner step and one CG iteration: about 0.5-0.7).
HYPERGRADIENT_COSINE_WARNING = 0.8


def hypergradient_accuracy(model, rm, theta_ref: dict, inputs: dict, n_domains: int, newton_tol: float = 1e-8) -> dict:
    """How accurate the hypergradient (8) that training used was, carried to phi: one outer step of
    metarm.train_bilevel recomputed from what it was computed from (`inputs`: phi, the warm starts, the
    drawn problems, cfg; the same float32 code, so the same numbers) against a float64 reference at the
    solved inner problem (100 gradient steps then Newton to |grad g| <= newton_tol from the same warm starts,
    then CG to a relative residual of 1e-10). The lam L_BT term is left out of both: it is exact, and would
    only hide the error of the rest. Returns cosine, relative error ||g - g_ref|| / ||g_ref|| and ||g||."""
    cfg = replace(inputs["cfg"], lam=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="cg did not converge")  # as in training: cg_tol is loose by design
        used = metarm.outer_gradient(
            model, rm, inputs["phi"], inputs["problems"], None, cfg, theta_ref, n_domains, warm=dict(inputs["warm"])
        )[0]
    model64, rm64 = copy.deepcopy(model).double().cpu(), copy.deepcopy(rm).double().cpu()
    phi64 = {name: p.requires_grad_(True) for name, p in to_float64(inputs["phi"]).items()}
    # whatever --solver training used, the reference is CG: 100 gradient steps, then Newton, then CG to 1e-10
    ref_cfg = replace(cfg, solver="cg", T=10, cg_iters=2000, cg_tol=1e-10)
    ref = metarm.outer_gradient(
        model64,
        rm64,
        phi64,
        to_float64(inputs["problems"]),
        None,
        ref_cfg,
        to_float64(theta_ref),
        n_domains,
        warm=to_float64(inputs["warm"]),
        newton_tol=newton_tol,
    )[0]
    g = torch.cat([x.detach().double().cpu().flatten() for x in used])
    g_ref = torch.cat([x.flatten() for x in ref])
    cosine = (g @ g_ref / (g.norm() * g_ref.norm())).item()
    return {"cosine": cosine, "rel_error": ((g - g_ref).norm() / g_ref.norm()).item(), "norm": g.norm().item()}


def accuracy_steps(outer_steps: int) -> list:
    """The outer steps whose hypergradient is checked: the first (a cold start), the middle and the last."""
    return sorted({0, outer_steps // 2, outer_steps - 1})


def accuracy_summary(per_seed: list) -> dict:
    """results.json's hypergradient_accuracy: per_seed[seed] = [{"step", "cosine", "rel_error"}, ...]; the
    smallest and median cosine and the median and largest relative error, over all checks and per step. A
    check whose reference could not be computed (cosine None, "failed": why) is counted apart."""
    checks = [c for seed_checks in per_seed for c in seed_checks if c["cosine"] is not None]
    failed = sum(c["cosine"] is None for seed_checks in per_seed for c in seed_checks)

    def spread(rows: list) -> dict:
        cosines = [c["cosine"] for c in rows]
        errors = [c["rel_error"] for c in rows]
        return {
            "n": len(rows),
            "cosine_min": min(cosines),
            "cosine_median": statistics.median(cosines),
            "rel_error_median": statistics.median(errors),
            "rel_error_max": max(errors),
        }

    steps = sorted({c["step"] for c in checks})
    return {
        "what": "the hypergradient (8) training used, carried to phi (lam term left out), against a float64 "
        "reference at the Newton-solved inner problem",
        "warn_below_cosine": HYPERGRADIENT_COSINE_WARNING,
        "failed_checks": failed,
        "all": spread(checks) if checks else None,
        "by_step": {str(step): spread([c for c in checks if c["step"] == step]) for step in steps},
        "per_seed": per_seed,
    }


def outer_convergence(
    s: Setup, logs: list, seeds: list, base: metarm.BilevelConfig, steps: int = 20, every: int = 5
) -> dict:
    """§2.5: the raw full-batch ||grad F(phi_k)||^2 / ||grad F(phi_0)||^2 along bilevel runs at beta in
    {0.25, 0.5, 1}, rho and the inner step *held fixed* across the sweep (calibrated once, at cfg.beta),
    per seed, on a fixed objective: 2 training domains' candidates and pairs drawn once, 64 pooled pairs."""
    curves = {}
    for seed in seeds:
        gen = policy.generator(seed + 31, s.device)
        domains = {d: (s.prompts[d], s.domain_pairs[d]) for d in data.TRAIN_DOMAINS[:2]}
        fixed = {d: metarm.draw_problem(s.model, *domains[d], base, gen) for d in domains}
        rows = policy.draw(len(s.train_pairs[0]["idx"]), 64, gen)
        pairs = tuple(policy.rows_of(b, rows) for b in s.train_pairs)
        metarm.calibrate(s.model, s.rm, logs[seed]["rms"]["vanilla_rm"], fixed, base, s.theta_ref)
        for beta in (0.25, 0.5, 1.0):
            bcfg = metarm.BilevelConfig(**{**asdict(base), "beta": beta, "recalibrate_every": 0})
            phi = policy.copy_params(logs[seed]["rms"]["vanilla_rm"])
            opt = torch.optim.Adam(phi.values(), lr=bcfg.lr)
            norms = []
            for k in range(0, steps + 1, every):
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="cg did not converge")
                    grads = metarm.outer_gradient(s.model, s.rm, phi, fixed, pairs, bcfg, s.theta_ref)[0]
                norms.append(sum((g**2).sum() for g in grads).item())
                if k < steps:
                    metarm.train_bilevel(
                        s.model, s.rm, phi, domains, pairs, bcfg, s.theta_ref, gen, gen, steps=every, opt=opt
                    )
            curves.setdefault(str(beta), []).append([n / norms[0] for n in norms])

    def running_min(xs):
        return [min(xs[: i + 1]) for i in range(len(xs))]

    return {
        "steps": list(range(0, steps + 1, every)),
        "seeds": seeds,
        "ratio": {beta: [interval(list(v)) for v in zip(*c)] for beta, c in curves.items()},
        "running_min": {beta: [interval(list(v)) for v in zip(*map(running_min, c))] for beta, c in curves.items()},
    }


def within_prompt_pairs(x, k: int):
    """x_i - x_j over every pair i < j of two of the k samples of a prompt (prompt-major), flattened."""
    i, j = torch.triu_indices(k, k, 1)
    x = x.view(-1, k)
    return (x[:, i] - x[:, j]).flatten()


def within_prompt_accuracy(r, g, k: int):
    """The RM's accuracy against the gold order over every pair of two samples of the same prompt (k per
    prompt, prompt-major): gold ties left out, RM ties 1/2; None if every pair ties in gold."""
    accuracy = metarm.tie_accuracy(within_prompt_pairs(r, k), within_prompt_pairs(g, k)).item()
    return None if math.isnan(accuracy) else accuracy


def rlhf_rounds(
    model,
    prompts,
    ref_batch,
    rm,
    phi,
    opt,
    pairs,
    cfg: metarm.MetaRMConfig,
    adapt_cfg: metarm.AdaptConfig,
    rounds: int,
    gold,
    generator,
    meta_generator,
):
    """Iterative RLHF (§3, the paper's main setting): each round continues the policy with (3) under the
    current RM, samples it (cfg.temperature, k per prompt), records the RM's spread and the samples'
    gold reward, then updates the RM with MetaRM (9)-(11) on them (eta = 0: Bradley-Terry steps)."""
    theta, history = None, []
    for t in range(rounds):
        standardised_reward = metarm.standardised(reward_fn(rm, phi), ref_batch)
        theta, _ = metarm.adapt(model, prompts, standardised_reward, adapt_cfg, generator, theta0=theta)
        meta = policy.sample(
            model,
            theta,
            prompts.repeat_interleave(cfg.k, dim=0),
            adapt_cfg.max_new_tokens,
            generator,
            temperature=cfg.temperature,
        )
        with torch.no_grad():
            r, g = policy.reward(rm, phi, meta), gold(meta)
        history.append(
            {
                "round": t,
                "spread": metarm.reward_spread(r, cfg.k),
                "gold": g.mean().item(),
                "rm_accuracy": within_prompt_accuracy(r, g, cfg.k),
            }
        )
        metarm.train_metarm(rm, phi, opt, pairs, meta, cfg, generator, meta_generator)
    return history
