"""The experiments behind the figures (METHOD.md §2.5, §3, §5.1), at the first --figure-seeds seeds of a run.

- frontier: gold reward against KL as beta varies, for the vanilla and bilevel RMs and the oracle, and Jia's trend
  read at matched KL (a registered secondary comparison);
- rlhf_figure: MetaRM in iterative RLHF, the paper's main setting, against eta = 0, per round (registered too);
- the hypergradient's error against its cost (study/hypergradient_checks.py) and the outer objective's stationarity;
- the training curves of the run's first seed.
`s` is train.py's Setup; `logs` and `per_seed` are lists in the run's seed order (figure_experiments keys them by
seed), `logs[seed]["rms"]` that seed's reward models.
"""

import warnings
from dataclasses import asdict, replace

import torch

import data
import metarm
import policy
from study import hypergradient_checks, measure, stats, summary
from study.cli import bar, clock

MATCHED_KL_BETA = "0.5"  # §5.1: bilevel's curve is read at the vanilla RM's KL at beta = 0.5
FRONTIER_BETAS = (0.25, 0.5, 1.0)  # §5.1: the points of the gold-vs-log-KL curve


def figure_experiments(cfg, s, logs: list, per_seed: list, sft_losses: list, timings: dict, prereg: dict) -> dict:
    """Reward-vs-KL frontier, RLHF rounds, hypergradient error, outer convergence, training curves: at the first
    cfg.figure_seeds seeds of the run, from each seed's reward models (logs[seed]["rms"]); the registered verdicts of
    the frontier and the rounds with prereg (summary.read_preregistration)."""
    bcfg = replace(s.bilevel_cfg)
    run_seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    logs, per_seed = dict(zip(run_seeds, logs)), dict(zip(run_seeds, per_seed))  # by seed
    seeds = list(run_seeds)[: cfg.figure_seeds]
    first = seeds[0]  # the seed of the training curves and of the hypergradient's error
    out = {}
    experiments = 1 + ("metarm" in s.methods) + 2 * ("bilevel" in s.methods)
    progress = bar(f"figures, {len(seeds)} seed(s)", experiments, cfg.progress)
    with clock(timings, "figure_frontier"):
        out["frontier"] = frontier(cfg, s, logs, per_seed, seeds, prereg)
    policy.show(progress, {"done": "frontier"})
    if "metarm" in s.methods:
        with clock(timings, "figure_rlhf_rounds"):
            out["rlhf_rounds"] = rlhf_figure(cfg, s, logs, seeds, prereg)
        policy.show(progress, {"done": "rlhf_rounds"})
    if "bilevel" in s.methods:
        with clock(timings, "figure_hypergradient_error"):
            phi = logs[first]["rms"]["bilevel"]
            curv = logs[first]["curvature"]
            out["hypergradient_error"] = hypergradient_checks.hypergradient_error(
                s.model, s.rm, s.theta_ref, s.world, phi, bcfg, curv
            )
        policy.show(progress, {"done": "hypergradient_error"})
        with clock(timings, "figure_outer_convergence"):
            out["outer_convergence"] = outer_convergence(s, logs, seeds, bcfg)
        policy.show(progress, {"done": "outer_convergence"})
    progress.close()

    def every(xs, n=10):
        return [x for i, x in enumerate(xs) if i % n == 0]

    out["training_curves"] = {
        "sft_loss": every(sft_losses),
        "vanilla_rm_loss": every([e["loss"] for e in logs[first]["vanilla_rm"]]),
        "bilevel_F": [e["F"] for e in logs[first].get("bilevel", [])],
    }
    return out


def frontier(cfg, s, logs: dict, per_seed: dict, seeds: list, prereg: dict) -> dict:
    """Gold reward and KL after adaptation at beta in {0.25, 0.5, 1} for the vanilla and bilevel RMs and
    the oracle, on the first two evaluation domains, per seed (paired over seeds): one adaptation at
    0.25 and 1; at cfg.beta the main table's own adaptations (per_seed). Jia's trend at matched KL judged by the
    registered rule."""
    methods = [m for m in ("vanilla_rm", "bilevel", "oracle") if m in s.methods]
    points = {
        m: {str(cfg.beta): {seed: [per_seed[seed]["metrics"][m][d] for d in s.domains[:2]] for seed in seeds}}
        for m in methods
    }
    gold = measure.gold_fn(s.world)

    def gen(k):
        return policy.generator(k, s.device)

    for beta in [b for b in FRONTIER_BETAS if b != cfg.beta]:
        acfg = metarm.AdaptConfig(**{**asdict(s.adapt_cfg), "beta": beta})
        for seed in seeds:
            for i, d in enumerate(s.domains[:2]):
                prompts, key = s.prompts[d], measure.crn_seed(seed, i, 7)
                ref = policy.sample(
                    s.model, {}, prompts.repeat(8, 1), measure.MAX_NEW, gen(measure.crn_seed(seed, i, 99))
                )
                ref_eval = policy.sample(
                    s.model, {}, prompts.repeat(cfg.eval_samples, 1), measure.MAX_NEW, gen(key + 500)
                )
                rewards = measure.reward_functions(replace(s, methods=methods), logs[seed]["rms"], d, ref)
                for m in methods:
                    theta = metarm.adapt(s.model, prompts, rewards[m], acfg, gen(key))[0]
                    res = measure.evaluate(s.model, theta, prompts, ref_eval, gold, gen(key + 600), cfg.eval_samples)[
                        0
                    ]
                    points[m].setdefault(str(beta), {}).setdefault(seed, []).append(res)
    values = {
        m: {
            beta: {k: [stats.mean([r[k] for r in per[seed]]) for seed in seeds] for k in ("gold_reward", "kl")}
            for beta, per in by_beta.items()
        }
        for m, by_beta in points.items()
    }
    out = {
        "domains": s.domains[:2],
        "seeds": seeds,
        "points": {
            m: {beta: {k: stats.interval(v) for k, v in p.items()} for beta, p in by_beta.items()}
            for m, by_beta in values.items()
        },
    }
    if "bilevel" in values:  # paired over seeds at each beta
        out["bilevel - vanilla_rm"] = {
            beta: {
                k: stats.interval([a - b for a, b in zip(values["bilevel"][beta][k], values["vanilla_rm"][beta][k])])
                for k in ("gold_reward", "kl")
            }
            for beta in values["bilevel"]
        }
        registered = {m: {str(b): by_beta[str(b)] for b in FRONTIER_BETAS} for m, by_beta in values.items()}
        out["matched_kl"] = summary.matched_kl(
            registered, MATCHED_KL_BETA, seeds, prereg["delta"]["gold_reward"], summary.rule(prereg)
        )
    return out


def rlhf_figure(cfg, s, logs: dict, seeds: list, prereg: dict, rounds: int = 3) -> dict:
    """§3, the paper's main setting: iterative RLHF on the training domains' prompts, MetaRM vs eta = 0,
    3 rounds, per seed: the RM's normalised spread, its accuracy against the gold order on pairs of the
    round's policy samples, and their gold reward. The pre-registered verdicts (METHOD.md §5.1) per round
    from round 2 on: round 1 is the same run for both (the same vanilla RM, the same draws)."""
    prompts = torch.cat([s.prompts[d][::4] for d in data.TRAIN_DOMAINS])
    runs = {"metarm": [], "metarm_eta0": []}
    for seed in seeds:
        gen = policy.generator(measure.stream(seed, 77), s.device)
        ref = policy.sample(s.model, {}, prompts.repeat(4, 1), measure.MAX_NEW, gen)
        for name, eta in (("metarm", cfg.eta), ("metarm_eta0", 0.0)):
            phi, opt = policy.continue_from(
                logs[seed]["rms"]["vanilla_rm"], logs[seed]["rms"]["vanilla_opt"], cfg.rm_lr
            )
            mcfg = metarm.MetaRMConfig(**{**asdict(s.metarm_cfg), "eta": eta})
            gens = [policy.generator(measure.stream(seed, k), s.device) for k in (78, 79)]  # the same for both
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
                    measure.gold_fn(s.world),
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
        out[name] = {k: [stats.interval(v) for v in by_round(name, k)] for k in metrics}
    out["metarm - metarm_eta0"] = {k: [stats.interval(paired(k, t)) for t in range(rounds)] for k in metrics}
    out["verdicts"] = {}
    for k, delta in (("gold", prereg["delta"]["gold_reward"]), ("rm_accuracy", prereg["delta"]["rm_accuracy"])):
        judged = [
            {"round": t + 1, **stats.decide(paired(k, t), delta, **summary.rule(prereg))} for t in range(1, rounds)
        ]
        out["verdicts"][k] = judged
    return out


def outer_convergence(s, logs: dict, seeds: list, base: metarm.BilevelConfig, steps: int = 20, every: int = 5) -> dict:
    """§2.5: the raw full-batch ||grad F(phi_k)||^2 / ||grad F(phi_0)||^2 along bilevel runs at beta in
    {0.25, 0.5, 1}, rho and the inner step *held fixed* across the sweep (calibrated once, at cfg.beta),
    per seed, on a fixed objective: 2 training domains' candidates and pairs drawn once, 64 pooled pairs. Each part of
    `every` steps starts the inner solves from theta_ref again (train_bilevel's warm starts are not carried between
    the parts: the figure is computed as it was first registered); Adam's state is carried."""
    curves = {}
    for seed in seeds:
        gen = policy.generator(measure.stream(seed, 31), s.device)
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
                    state = {"step": 0, "warm": {}, "opt": opt}
                    metarm.train_bilevel(s.model, s.rm, phi, domains, pairs, bcfg, s.theta_ref, gen, gen, every, state)
            curves.setdefault(str(beta), []).append([n / norms[0] for n in norms])

    def running_min(xs):
        return [min(xs[: i + 1]) for i in range(len(xs))]

    return {
        "steps": list(range(0, steps + 1, every)),
        "seeds": seeds,
        "ratio": {beta: [stats.interval(list(v)) for v in zip(*c)] for beta, c in curves.items()},
        "running_min": {
            beta: [stats.interval(list(v)) for v in zip(*map(running_min, c))] for beta, c in curves.items()
        },
    }


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
        standardised_reward = metarm.standardised(measure.reward_fn(rm, phi), ref_batch)
        theta, _ = metarm.adapt(model, prompts, standardised_reward, adapt_cfg, generator, theta0=theta)
        meta = metarm.sample_meta_set(model, theta, prompts, cfg, adapt_cfg.max_new_tokens, generator)
        with torch.no_grad():
            r, g = policy.reward(rm, phi, meta), gold(meta)
        history.append(
            {
                "round": t,
                "spread": metarm.reward_spread(r, cfg.k),
                "gold": g.mean().item(),
                "rm_accuracy": measure.within_prompt_accuracy(r, g, cfg.k),
            }
        )
        metarm.train_metarm(rm, phi, opt, pairs, meta, cfg, generator, meta_generator)
    return history
