"""The experiment of METHOD.md §5: `python train.py` (README: expected output and time).

SFT pi_ref on the unlabelled corpus -> for each seed: the reward models of every method and control
-> on every evaluation domain, several repeats of meta-test adaptation (3) per method with common
random numbers -> evaluation -> paired statistics over seeds, ceilings, the papers' premises; then the
figures' experiments (>= 3 seeds). Writes results.json / results.md / samples.jsonl / timings.json /
datasets / PNGs into --out, replacing an earlier run only once the new one is complete.
"""
import argparse
import copy
import json
import math
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

import bilevel
import data
import metarm
import plots
import policy as P

# method -> what adapts the policy on a domain (README, "Methods and controls")
METHODS = ("sft", "dpo", "vanilla_rm", "vanilla_rm_long", "bilevel", "bilevel_bt_only", "metarm",
           "metarm_eta0", "oracle", "in_domain_rm", "agnostic_oracle")
RM_METHODS = ("vanilla_rm", "vanilla_rm_long", "bilevel", "bilevel_bt_only", "metarm", "metarm_eta0", "in_domain_rm")
CEILINGS = ("oracle", "in_domain_rm", "agnostic_oracle")
# (method, control, the paper's direction): each comparison is a paired difference over seeds
COMPARISONS = (("bilevel", "vanilla_rm"), ("bilevel", "bilevel_bt_only"), ("metarm", "vanilla_rm"),
               ("metarm", "metarm_eta0"), ("vanilla_rm_long", "vanilla_rm"))
METRICS = ("gold_reward", "win_rate", "rm_accuracy", "kl")
MAX_NEW = 16


@dataclass
class Config:
    seeds: int = field(default=10, metadata={"help": "number of seeds 0 .. seeds-1; the seed is the statistical unit"})
    out: str = field(default="runs/latest", metadata={"help": "output folder (replaced only when the run is complete)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    domains: str = field(default="test", metadata={"help": "test: the held-out domains | dev: the dev domains (tuning)"})
    methods: str = field(default=",".join(METHODS), metadata={"help": "comma-separated subset of the methods"})
    quick: bool = field(default=False, metadata={"help": "a smoke run: 1 seed, small budgets, no figures (< 1 min)"})
    figures: bool = field(default=True, metadata={"help": "run the figures' experiments (3 seeds)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    sft_steps: int = field(default=1500, metadata={"help": "SFT steps of pi_ref (64 reviews each; once, shared by all seeds)"})
    beta: float = field(default=metarm.AdaptConfig.beta, metadata={"help": "beta, KL coefficient of (3) and of the lower level (5)"})
    adapt_steps: int = field(default=metarm.AdaptConfig.steps, metadata={"help": "RLOO steps of meta-test adaptation (3), 16 prompts x 4 samples each"})
    adapt_lr: float = field(default=metarm.AdaptConfig.lr, metadata={"help": "Adam step size of adaptation (3)"})
    repeats: int = field(default=2, metadata={"help": "adaptations per (method, domain, seed), with common random numbers"})
    eval_samples: int = field(default=16, metadata={"help": "evaluation samples per prompt"})
    rm_steps: int = field(default=metarm.RMConfig.steps, metadata={"help": "Bradley-Terry steps (1) of the vanilla RM, 32 pairs each"})
    rm_lr: float = field(default=metarm.RMConfig.lr, metadata={"help": "Adam step size of every reward model"})
    ceiling_steps: int = field(default=300, metadata={"help": "Bradley-Terry steps of the in-domain RM ceiling on the domain's own pairs, from the vanilla RM"})
    extra_steps: int = field(default=40, metadata={"help": "RM updates every method adds to the vanilla RM: bilevel outer steps, MetaRM updates, vanilla_rm_long's extra steps"})
    beta_dpo: float = field(default=0.1, metadata={"help": "beta_DPO of the DPO baseline (2)"})
    dpo_lr: float = field(default=1e-2, metadata={"help": "Adam step size of the DPO baseline (as many steps as adaptation, 64 pairs each)"})
    lam: float = field(default=metarm.BilevelConfig.lam, metadata={"help": "lambda, weight of L_BT in the upper level (7)"})
    upper_beta_dpo: float = field(default=metarm.BilevelConfig.beta_dpo, metadata={"help": "beta_DPO inside the upper level (7)"})
    K: int = field(default=metarm.BilevelConfig.K, metadata={"help": "K, candidates per prompt of the lower level (4)(5)"})
    T: int = field(default=metarm.BilevelConfig.T, metadata={"help": "T, inner gradient steps (6), warm-started"})
    solver: str = field(default=metarm.BilevelConfig.solver, metadata={"help": "hypergradient (8): cg | neumann | unrolled"})
    eta: float = field(default=metarm.MetaRMConfig.eta, metadata={"help": "eta, MetaRM's ascent step (10)"})
    metarm_k: int = field(default=metarm.MetaRMConfig.k, metadata={"help": "k, MetaRM responses per shifted prompt (9)"})
    temperature: float = field(default=metarm.MetaRMConfig.temperature, metadata={"help": "sampling temperature of MetaRM's shifted set"})
    rounds: int = field(default=metarm.MetaRMConfig.rounds, metadata={"help": "MetaRM rounds on a held-out domain (the last one's policy is evaluated)"})
    second_order: bool = field(default=False, metadata={"help": "MetaRM: exact gradient through (10) (default: the authors' first-order update)"})


QUICK = dict(seeds=1, sft_steps=300, rm_steps=60, ceiling_steps=20, adapt_steps=10, extra_steps=4, repeats=1, eval_samples=4,
             figures=False, rounds=2)


# =================================================================================================
# The pipeline
# =================================================================================================
def run(cfg: Config, tmp: Path) -> dict:
    """The whole experiment; every output goes into tmp. Returns the results dict."""
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    print("config:", json.dumps(asdict(cfg)))
    timings, t0 = {}, time.perf_counter()
    world = data.World()
    write_datasets(world, tmp)
    with clock(timings, "sft"):
        torch.manual_seed(0)
        model = P.GPT(P.GPTConfig(vocab_size=len(world.vocab))).to(device)
        sft_losses = P.sft(model, world.sft[1000:], cfg.sft_steps, 64, 1.5e-3, torch.Generator(device).manual_seed(0), device)
        model.requires_grad_(False)
        ppl = P.perplexity(model, world.sft[:1000], device)
    print(f"SFT: validation perplexity {ppl:.3f} ({timings['sft']:.0f}s)")
    with clock(timings, "encode"):
        setup = make_setup(cfg, world, model, device)
    per_seed, samples, logs = [], [], []
    for seed in tqdm(range(cfg.seeds), desc="seeds"):
        rms, seed_logs = train_reward_models(seed, cfg, setup, timings)
        metrics, premises, smp = evaluate_seed(seed, cfg, setup, rms, timings)
        per_seed.append({"metrics": metrics, "premises": premises})
        samples += smp
        logs.append({**seed_logs, "rms": rms if seed < 3 else None})
    results = summarise(cfg, per_seed)
    results.update(world_version=data.WORLD_VERSION, sft_val_perplexity=ppl,
                   bilevel_curvature=[l["curvature"] for l in logs if "curvature" in l])
    if cfg.figures:
        results["figures"] = figure_experiments(cfg, setup, logs, sft_losses, timings)
    write_outputs(tmp, cfg, results, samples)
    timings["total"] = time.perf_counter() - t0
    write_json(tmp / "timings.json", timings)
    return results


def make_setup(cfg: Config, world, model, device) -> dict:
    """What every seed shares: pi_ref, the reward model's architecture, encoded pairs, prompts."""
    methods = cfg.methods.split(",")
    domains = data.TEST_DOMAINS if cfg.domains == "test" else data.DEV_DOMAINS
    enc = lambda pairs: P.encode_pairs(model, pairs, device)
    eval_pairs = {d: enc(world.eval_pairs[d]) for d in domains}
    train_pairs = enc(world.pooled_pairs(data.TRAIN_DOMAINS))
    n = world.cfg.n_pairs_per_domain
    gold_margins = {d: torch.tensor([world.gold_reward(d, p.chosen) - world.gold_reward(d, p.rejected)
                                     for p in world.eval_pairs[d]], device=device) for d in domains}
    return {"world": world, "model": model, "device": device, "methods": methods, "domains": domains,
            "rm": P.RewardModel(model).to(device).requires_grad_(False),
            "train_pairs": train_pairs,
            "domain_pairs": {d: tuple(P.rows_of(b, slice(n * i, n * (i + 1))) for b in train_pairs)
                             for i, d in enumerate(data.TRAIN_DOMAINS)},     # pooled_pairs is in domain order
            "own_pairs": {d: enc(world.pairs[d]) for d in domains} if "in_domain_rm" in methods else {},
            "eval_pairs": eval_pairs, "gold_margins": gold_margins,
            "prompts": {d: torch.tensor(world.prompts[d], device=device) for d in data.DOMAINS},
            "theta_ref": {n: p.detach() for n, p in P.adapted_params(model).items()},
            "adapt_cfg": metarm.AdaptConfig(beta=cfg.beta, steps=cfg.adapt_steps, lr=cfg.adapt_lr, max_new_tokens=MAX_NEW),
            "rm_cfg": metarm.RMConfig(steps=cfg.rm_steps, lr=cfg.rm_lr),
            "metarm_cfg": metarm.MetaRMConfig(eta=cfg.eta, k=cfg.metarm_k, temperature=cfg.temperature,
                                              steps=cfg.extra_steps // max(1, cfg.rounds - 1), rounds=cfg.rounds,
                                              second_order=cfg.second_order)}


def bilevel_config(cfg: Config, **over) -> metarm.BilevelConfig:
    return metarm.BilevelConfig(**{**dict(beta=cfg.beta, beta_dpo=cfg.upper_beta_dpo, lam=cfg.lam, K=cfg.K, T=cfg.T,
                                          solver=cfg.solver, outer_steps=cfg.extra_steps, lr=cfg.rm_lr,
                                          max_new_tokens=MAX_NEW), **over})


def train_reward_models(seed: int, cfg: Config, s: dict, timings: dict):
    """Every reward model of one seed (and the DPO policy): returns ({method: phi, or {domain: phi},
    or theta for dpo}, logs). The controls start from the vanilla RM exactly as their method does."""
    methods, rm, model, gen = s["methods"], s["rm"], s["model"], lambda k: torch.Generator(s["device"]).manual_seed(k)
    out, logs = {}, {}
    with clock(timings, "vanilla_rm"), stage("vanilla_rm", seed):
        _, phi = P.make_reward_model(model, gen(seed))
        logs["vanilla_rm"], opt = metarm.train_reward_model(rm, phi, s["train_pairs"], s["rm_cfg"], gen(seed))
        out["vanilla_rm"], out["vanilla_opt"] = phi, opt
    if "vanilla_rm_long" in methods:
        with clock(timings, "vanilla_rm_long"), stage("vanilla_rm_long", seed):
            out["vanilla_rm_long"], opt_long = metarm.continue_from(phi, opt, cfg.rm_lr)
            metarm.train_reward_model(rm, out["vanilla_rm_long"], s["train_pairs"], s["rm_cfg"], gen(seed + 1),
                                      opt_long, steps=cfg.extra_steps)
    if "in_domain_rm" in methods:
        with clock(timings, "in_domain_rm"), stage("in_domain_rm", seed):
            out["in_domain_rm"] = {}
            for d in s["domains"]:                     # a ceiling: the domain's own labels, seen by no method
                out["in_domain_rm"][d], opt_d = metarm.continue_from(phi, opt, cfg.rm_lr)
                metarm.train_reward_model(rm, out["in_domain_rm"][d], s["own_pairs"][d], s["rm_cfg"], gen(seed + 2), opt_d,
                                          steps=cfg.ceiling_steps)
    domains = {d: (s["prompts"][d], s["domain_pairs"][d]) for d in data.TRAIN_DOMAINS}
    if "bilevel" in methods:
        with clock(timings, "bilevel"), stage("bilevel", seed):
            bcfg, out["bilevel"] = bilevel_config(cfg), P.copy_params(phi)
            probe = {d: metarm.draw_problem(model, *domains[d], bcfg, gen(seed + 3)) for d in data.TRAIN_DOMAINS[:4]}
            logs["curvature"] = metarm.calibrate(model, rm, out["bilevel"], probe, bcfg, s["theta_ref"])
            logs["bilevel"] = metarm.train_bilevel(model, rm, out["bilevel"], domains, s["train_pairs"], bcfg,
                                                   s["theta_ref"], gen(seed + 4), gen(seed + 5))
            logs["curvature"]["margins"] = [e["margin"] for e in logs["bilevel"] if "margin" in e]
            logs["curvature"]["rho_final"] = bcfg.rho
    if "bilevel_bt_only" in methods:
        with clock(timings, "bilevel_bt_only"), stage("bilevel_bt_only", seed):
            out["bilevel_bt_only"] = P.copy_params(phi)
            metarm.train_bilevel(model, rm, out["bilevel_bt_only"], domains, s["train_pairs"], bilevel_config(cfg),
                                 s["theta_ref"], gen(seed + 4), gen(seed + 5), dpo_term=False)
    if "dpo" in methods:
        with clock(timings, "dpo"), stage("dpo", seed):
            out["dpo"] = metarm.train_dpo(model, s["train_pairs"], cfg.adapt_steps, 64, cfg.dpo_lr, cfg.beta_dpo, gen(seed + 6))
    return out, logs


def crn_seed(seed: int, domain_index: int, repeat: int) -> int:
    """The generator seed of one (seed, domain, repeat): every method uses it (common random numbers)."""
    return 1_000_000 * (seed + 1) + 1000 * domain_index + repeat


def evaluate_seed(seed: int, cfg: Config, s: dict, rms: dict, timings: dict):
    """Every method on every evaluation domain, cfg.repeats adaptations each with common random numbers.

    Returns (metrics[method][domain] averaged over repeats, premises[domain], a few samples)."""
    world, model, methods, gold = s["world"], s["model"], s["methods"], gold_fn(s["world"])
    gen = lambda k: torch.Generator(s["device"]).manual_seed(k)
    metrics = {m: {} for m in methods}
    premises, samples = {}, []
    for i, d in enumerate(s["domains"]):
        prompts = s["prompts"][d]
        ref = P.sample(model, {}, prompts.repeat(8, 1), MAX_NEW, gen(crn_seed(seed, i, 99)))   # the reward scale (§1)
        rewards = reward_functions(s, rms, d, ref)
        runs = {m: [] for m in methods}
        for j in range(cfg.repeats):
            key = crn_seed(seed, i, j)
            ref_eval = P.sample(model, {}, prompts.repeat(cfg.eval_samples, 1), MAX_NEW, gen(key + 500))
            thetas = {"sft": s["theta_ref"], "dpo": rms.get("dpo")}
            with clock(timings, "adaptation"):
                for m in methods:
                    if m in rewards:
                        with stage(m, seed):
                            thetas[m] = metarm.adapt(model, prompts, rewards[m], s["adapt_cfg"], gen(key))[0]
            with clock(timings, "metarm"):
                for m, eta in (("metarm", cfg.eta), ("metarm_eta0", 0.0)):
                    if m in methods:
                        with stage(m, seed):
                            phi, opt = metarm.continue_from(rms["vanilla_rm"], rms["vanilla_opt"], cfg.rm_lr)
                            mcfg = metarm.MetaRMConfig(**{**asdict(s["metarm_cfg"]), "eta": eta})
                            thetas[m], _ = metarm.metarm_rounds(model, prompts, ref, s["rm"], phi, opt, s["train_pairs"],
                                                                mcfg, s["rm_cfg"], s["adapt_cfg"], (key, key + 1, key + 2, key + 3),
                                                                theta_first=thetas.get("vanilla_rm"))
                            rms.setdefault(m, {})[(d, j)] = phi
            with clock(timings, "evaluation"):
                for m in methods:
                    res, batch, g = evaluate(model, thetas[m], prompts, ref_eval, gold, gen(key + 600), cfg.eval_samples)
                    runs[m].append(res)
                    if j == 0:
                        samples += [{"method": m, "domain": d, "seed": seed, "response": world.decode(row[data.PROMPT_LEN:]),
                                     "prompt": world.decode(row[:data.PROMPT_LEN]), "gold_reward": gr}
                                    for row, gr in list(zip(batch["idx"].tolist(), g.tolist()))[:8]]
                    if m == "vanilla_rm":
                        premises.setdefault(d, []).append(measure_premises(s, rms["vanilla_rm"], ref_eval, batch, gold, cfg.eval_samples))
        for m in methods:
            metrics[m][d] = {k: mean([r[k] for r in runs[m]]) for k in ("gold_reward", "win_rate", "kl")}
            metrics[m][d]["rm_accuracy"] = rm_accuracy(s, rms, m, d) if m in RM_METHODS else None
        if d in premises:
            premises[d] = {k: mean([p[k] for p in premises[d]]) for k in premises[d][0]}
            premises[d]["acc_behaviour_pairs"] = rm_accuracy(s, rms, "vanilla_rm", d)
    return metrics, premises, samples


def reward_functions(s: dict, rms: dict, d: str, ref: dict) -> dict:
    """method -> the reward its adaptation (3) uses on domain d, standardised on pi_ref's samples (§1)."""
    gold, world, out = gold_fn(s["world"]), s["world"], {}
    for m in s["methods"]:
        if m == "oracle":
            fn = gold
        elif m == "agnostic_oracle":
            fn = lambda b: torch.tensor(world.gold_rewards(b["idx"].tolist(), agnostic=True), device=b["idx"].device)
        elif m in ("vanilla_rm", "vanilla_rm_long", "bilevel", "bilevel_bt_only", "in_domain_rm"):
            phi = rms[m][d] if m == "in_domain_rm" else rms[m]
            fn = lambda b, phi=phi: P.reward(s["rm"], phi, b)
        else:
            continue                                      # sft, dpo: no adaptation; metarm: its own rounds
        out[m] = metarm.standardised(fn, ref)
    return out


# =================================================================================================
# Evaluation
# =================================================================================================
def gold_fn(world):
    """r*_d of an encoded batch as a tensor (the domain is read from each prompt's tag)."""
    return lambda b: torch.tensor(world.gold_rewards(b["idx"].tolist()), dtype=torch.float32, device=b["idx"].device)


def evaluate(model, theta, prompts, ref_eval, gold, gen, n: int):
    """Gold reward of pi_theta's samples, win rate against pi_ref's samples ref_eval of the same prompts
    (judged by the gold reward, ties 1/2) and KL(pi_theta || pi_ref) (k1 on the policy's samples)."""
    batch = P.sample(model, theta, prompts.repeat(n, 1), MAX_NEW, gen)
    g = gold(batch)
    kl = (P.logprob(model, theta, batch) - batch["logp_ref"]).mean()
    return {"gold_reward": g.mean().item(), "win_rate": metarm.tie_accuracy(g - gold(ref_eval)).item(),
            "kl": kl.item()}, batch, g


@torch.no_grad()
def rm_accuracy(s: dict, rms: dict, m: str, d: str) -> float:
    """The RM's accuracy on d's labelled evaluation pairs against the noise-free gold ordering (gold
    ties excluded, RM ties 1/2); MetaRM's RMs (one per repeat) are averaged."""
    phis = rms[m]
    phis = [phis[d]] if m == "in_domain_rm" else [phis] if m not in ("metarm", "metarm_eta0") else \
        [p for (dd, _), p in phis.items() if dd == d]
    chosen, rejected = s["eval_pairs"][d]
    return mean([metarm.tie_accuracy(P.reward(s["rm"], phi, chosen) - P.reward(s["rm"], phi, rejected),
                                     s["gold_margins"][d]).item() for phi in phis])


@torch.no_grad()
def measure_premises(s: dict, phi: dict, ref_eval: dict, adapted: dict, gold, n: int) -> dict:
    """The papers' premises, measured with the vanilla RM (§4): its accuracy on gold-labelled pairs of
    two samples of the same prompt, from pi_ref and from the policy adapted with it; its normalised
    reward-difference spread (§3) on the same samples."""
    out = {}
    for name, batch in (("pi_ref", ref_eval), ("adapted", adapted)):
        r, g = P.reward(s["rm"], phi, batch), gold(batch)
        half = len(r) // 2                                      # rows i and i + half share a prompt
        acc = metarm.tie_accuracy(r[:half] - r[half:2 * half], g[:half] - g[half:2 * half]).item()
        out[f"acc_{name}_samples"] = None if math.isnan(acc) else acc     # NaN: every pair tied in gold
        out[f"spread_{name}"] = metarm.reward_spread(r.view(n, -1).T.reshape(-1), n)
    return out


# =================================================================================================
# Statistics
# =================================================================================================
def mean(xs):
    """The mean of the values that are not None; None if there are none (a premise with no comparable pair)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def t_quantile(df: int, p: float = 0.975) -> float:
    """The p-quantile of Student's t with df degrees of freedom, by bisection on its CDF (the CDF by
    Simpson's rule on the density: exact to ~1e-7 here, no scipy needed)."""
    dens = lambda x: math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + x * x / df) ** (-(df + 1) / 2)
    cdf = lambda x: 0.5 + sum((dens(a) + 4 * dens(a + x / 2000) + dens(a + x / 1000)) * x / 6000
                              for a in (i * x / 1000 for i in range(1000)))
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


def verdict(ci, direction: int = 1) -> str:
    """reproduced: the interval excludes 0 in the paper's direction; contradicted: the other way."""
    if ci is None:
        return "undetermined"
    lo, hi = ci
    if (lo > 0 and direction > 0) or (hi < 0 and direction < 0):
        return "reproduced"
    return "contradicted" if lo > 0 or hi < 0 else "undetermined"


def summarise(cfg: Config, per_seed: list) -> dict:
    """The results dict: per-method means with intervals, paired comparisons, ceilings, premises."""
    methods = list(per_seed[0]["metrics"])
    domains = list(per_seed[0]["metrics"][methods[0]])
    seed_value = lambda s, m, k: mean([s["metrics"][m][d][k] for d in domains])
    out = {"config": {k: v for k, v in asdict(cfg).items() if k != "out"}, "domains": domains, "methods": {}}
    for m in methods:
        out["methods"][m] = {k: None if per_seed[0]["metrics"][m][domains[0]][k] is None else
                             {**interval([seed_value(s, m, k) for s in per_seed]),
                              "per_domain": {d: mean([s["metrics"][m][d][k] for s in per_seed]) for d in domains}}
                             for k in METRICS}
    out["paired"] = {}
    for a, b in COMPARISONS + (("in_domain_rm", "vanilla_rm"), ("oracle", "vanilla_rm")):
        if a in methods and b in methods:
            diffs = [seed_value(s, a, "gold_reward") - seed_value(s, b, "gold_reward") for s in per_seed]
            iv = interval(diffs)
            out["paired"][f"{a} - {b}"] = {**iv, "wins": sum(x > 0 for x in diffs), "per_seed": diffs,
                                           "per_domain": {d: mean([s["metrics"][a][d]["gold_reward"] - s["metrics"][b][d]["gold_reward"]
                                                                   for s in per_seed]) for d in domains},
                                           "verdict": verdict(iv["ci95"])}
    out["ceilings"] = {m: interval([seed_value(s, m, "gold_reward") for s in per_seed]) for m in CEILINGS if m in methods}
    if "vanilla_rm" in methods:
        keys = list(per_seed[0]["premises"][domains[0]])
        out["premises"] = {k: interval([mean([s["premises"][d][k] for d in domains]) for s in per_seed]) for k in keys}
    return out


# =================================================================================================
# The figures' experiments (>= 3 seeds where they compare methods)
# =================================================================================================
def figure_experiments(cfg: Config, s: dict, logs: list, sft_losses: list, timings: dict) -> dict:
    """Reward-vs-KL frontier, RLHF rounds, hypergradient error, outer convergence, training curves."""
    seeds = [k for k in range(min(3, cfg.seeds))]
    out = {}
    with clock(timings, "figure_frontier"):
        out["frontier"] = frontier(cfg, s, logs, seeds)
    if "metarm" in s["methods"]:
        with clock(timings, "figure_rlhf_rounds"):
            out["rlhf_rounds"] = rlhf_figure(cfg, s, logs, seeds)
    if "bilevel" in s["methods"]:
        with clock(timings, "figure_hypergradient_error"):
            out["hypergradient_error"] = hypergradient_error(s, logs[0]["rms"]["bilevel"], bilevel_config(cfg),
                                                             logs[0]["curvature"])
        with clock(timings, "figure_outer_convergence"):
            out["outer_convergence"] = outer_convergence(cfg, s, logs, seeds)
    every = lambda xs, n=10: [x for i, x in enumerate(xs) if i % n == 0]
    out["training_curves"] = {"sft_loss": every(sft_losses), "vanilla_rm_loss": every([e["loss"] for e in logs[0]["vanilla_rm"]]),
                              "bilevel_F": [e["F"] for e in logs[0].get("bilevel", [])]}
    return out


def frontier(cfg: Config, s: dict, logs: list, seeds: list) -> dict:
    """Gold reward and KL after adaptation at beta in {0.25, 0.5, 1} for the vanilla and bilevel RMs and
    the oracle, on the first two evaluation domains, one repeat, per seed (paired over seeds)."""
    methods = [m for m in ("vanilla_rm", "bilevel", "oracle") if m in s["methods"]]
    points = {m: {} for m in methods}
    gold, gen = gold_fn(s["world"]), lambda k: torch.Generator(s["device"]).manual_seed(k)
    for beta in (0.25, 0.5, 1.0):
        acfg = metarm.AdaptConfig(**{**asdict(s["adapt_cfg"]), "beta": beta})
        for seed in seeds:
            for i, d in enumerate(s["domains"][:2]):
                prompts, key = s["prompts"][d], crn_seed(seed, i, 7)
                ref = P.sample(s["model"], {}, prompts.repeat(8, 1), MAX_NEW, gen(crn_seed(seed, i, 99)))
                ref_eval = P.sample(s["model"], {}, prompts.repeat(cfg.eval_samples, 1), MAX_NEW, gen(key + 500))
                rewards = reward_functions({**s, "methods": methods}, logs[seed]["rms"], d, ref)
                for m in methods:
                    theta = metarm.adapt(s["model"], prompts, rewards[m], acfg, gen(key))[0]
                    res = evaluate(s["model"], theta, prompts, ref_eval, gold, gen(key + 600), cfg.eval_samples)[0]
                    points[m].setdefault(str(beta), {}).setdefault(seed, []).append(res)
    per_seed = {m: {beta: {k: [mean([r[k] for r in per[seed]]) for seed in seeds] for k in ("gold_reward", "kl")}
                    for beta, per in by_beta.items()} for m, by_beta in points.items()}
    out = {"domains": s["domains"][:2], "seeds": seeds,
           "points": {m: {beta: {k: interval(v) for k, v in p.items()} for beta, p in by_beta.items()}
                      for m, by_beta in per_seed.items()}}
    if "bilevel" in per_seed:                           # paired over seeds at each beta
        out["bilevel - vanilla_rm"] = {beta: {k: interval([a - b for a, b in zip(per_seed["bilevel"][beta][k],
                                                                                   per_seed["vanilla_rm"][beta][k])])
                                              for k in ("gold_reward", "kl")} for beta in per_seed["bilevel"]}
    return out


def rlhf_figure(cfg: Config, s: dict, logs: list, seeds: list, rounds: int = 4) -> dict:
    """§3, the paper's main setting: iterative RLHF on the training domains' prompts, MetaRM vs eta = 0,
    4 rounds, per seed: the RM's normalised spread and the gold reward of each round's policy."""
    prompts = torch.cat([s["prompts"][d][::4] for d in data.TRAIN_DOMAINS])
    runs = {"metarm": [], "metarm_eta0": []}
    for seed in seeds:
        gen = torch.Generator(s["device"]).manual_seed(seed + 77)
        ref = P.sample(s["model"], {}, prompts.repeat(4, 1), MAX_NEW, gen)
        for name, eta in (("metarm", cfg.eta), ("metarm_eta0", 0.0)):
            phi, opt = metarm.continue_from(logs[seed]["rms"]["vanilla_rm"], logs[seed]["rms"]["vanilla_opt"], cfg.rm_lr)
            mcfg = metarm.MetaRMConfig(**{**asdict(s["metarm_cfg"]), "eta": eta})
            gens = [torch.Generator(s["device"]).manual_seed(seed + k) for k in (78, 79)]   # the same for both
            runs[name].append(metarm.rlhf_rounds(s["model"], prompts, ref, s["rm"], phi, opt, s["train_pairs"], mcfg,
                                                 s["rm_cfg"], s["adapt_cfg"], rounds, gold_fn(s["world"]), *gens))
    by_round = lambda name, k: [[run[t][k] for run in runs[name]] for t in range(rounds)]
    return {"seeds": seeds, "rounds": rounds,
            **{name: {k: [interval(v) for v in by_round(name, k)] for k in ("spread", "gold")} for name in runs},
            "metarm - metarm_eta0": {k: [interval([a - b for a, b in zip(x, y)])
                                         for x, y in zip(by_round("metarm", k), by_round("metarm_eta0", k))]
                                     for k in ("spread", "gold")}}


def hypergradient_error(s: dict, phi: dict, bcfg: metarm.BilevelConfig, curv: dict, domain: str = "restaurant",
                        ns=(1, 2, 4, 8, 16, 32), timed: bool = False) -> dict:
    """Error of dF/dr against a reference vs HVPs, for CG (n iterations), Neumann and unrolled (4n terms
    or steps), on the real lower level of one training domain at seed 0's vanilla RM (float64 copies).
    CG and Neumann solve at theta* (Newton, |grad g| <= 1e-9); unrolled runs its own inner steps from
    theta_ref. Reference: CG at theta* to a relative residual of 1e-12, itself checked against a central
    finite difference of F. training_setting: the hypergradient as training computes it (T inner steps
    from theta_ref, then CG with cg_iters / cg_tol). timed: add each row's seconds (bench.py only)."""
    model = copy.deepcopy(s["model"]).double().cpu()
    rm = copy.deepcopy(s["rm"]).double().cpu()
    phi = {n: p.detach().double().cpu() for n, p in phi.items()}
    theta_ref = {n: p.detach().double().cpu() for n, p in s["theta_ref"].items()}
    bcfg = metarm.BilevelConfig(**{**asdict(bcfg), "rho": curv["rho"], "inner_lr": curv["inner_lr"]})
    prompts = s["prompts"][domain].cpu()
    cand = P.sample(model, {}, prompts.repeat_interleave(bcfg.K, 0), bcfg.max_new_tokens, torch.Generator().manual_seed(0))
    pairs = P.encode_pairs(model, s["world"].pairs[domain][:64])
    prob = {"cand": cand, "chosen": pairs[0], "rejected": pairs[1]}
    g, f = metarm.level_functions(model, prob, bcfg, theta_ref)
    with torch.no_grad():
        upper = {"r": metarm.candidate_rewards(rm, phi, cand, bcfg.K)}
    theta_gd, _ = bilevel.inner_solve(g, theta_ref, upper, 10 * bcfg.T, bcfg.inner_lr)   # g is not convex at theta_ref
    theta_star, newton = bilevel.newton_solve(g, theta_gd, upper, tol=1e-9)
    ref, _ = bilevel.hypergrad_implicit(f, g, theta_star, upper, "cg", max_iter=2000, tol=1e-12)
    F = lambda up: f(bilevel.newton_solve(g, theta_star, up, tol=1e-9)[0], up)
    u = {"r": torch.randn(upper["r"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    fd = bilevel.hypergrad_fd(F, upper, u, eps=1e-4)
    solvers = {"cg": lambda n: bilevel.hypergrad_implicit(f, g, theta_star, upper, "cg", max_iter=n, tol=0.0),
               "neumann": lambda n: bilevel.hypergrad_implicit(f, g, theta_star, upper, "neumann",
                                                               alpha=bcfg.inner_lr, J=4 * n),
               "unrolled": lambda n: bilevel.hypergrad_unrolled(f, g, theta_ref, upper, 4 * n, bcfg.inner_lr)}
    error = lambda gr: bilevel.norm(bilevel.add(gr, ref, -1.0)) / bilevel.norm(ref)
    curves = {name: [] for name in solvers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # truncated solves warn by design
        for name, solve in solvers.items():
            for n in ns:
                t = time.perf_counter()
                gr, info = solve(n)
                row = {"iters": n if name == "cg" else 4 * n, "hvps": info["hvps"], "error": error(gr)}
                curves[name].append({**row, "seconds": time.perf_counter() - t} if timed else row)
        theta_T, inner = bilevel.inner_solve(g, theta_ref, upper, bcfg.T, bcfg.inner_lr)
        gr, info = bilevel.hypergrad_implicit(f, g, theta_T, upper, "cg", max_iter=bcfg.cg_iters, tol=bcfg.cg_tol)
    training = {"T": bcfg.T, "cg_iters": bcfg.cg_iters, "cg_tol": bcfg.cg_tol, "hvps": info["hvps"],
                "inner_grad_norm": inner["grad_norm"], "error": error(gr)}
    return {"domain": domain, "newton_grad_norm": newton["grad_norm"],
            "fd_check_rel_error": abs(fd - bilevel.dot(ref, u).item()) / abs(fd), "curves": curves,
            "training_setting": training}


def outer_convergence(cfg: Config, s: dict, logs: list, seeds: list, steps: int = 20, every: int = 5) -> dict:
    """§2.5: the raw full-batch ||grad F(phi_k)||^2 / ||grad F(phi_0)||^2 along bilevel runs at beta in
    {0.25, 0.5, 1}, rho and the inner step *held fixed* across the sweep (calibrated once, at cfg.beta),
    per seed, on a fixed objective: 2 training domains' candidates and pairs drawn once, 64 pooled pairs."""
    curves = {}
    for seed in seeds:
        gen = torch.Generator(s["device"]).manual_seed(seed + 31)
        base = bilevel_config(cfg)
        domains = {d: (s["prompts"][d], s["domain_pairs"][d]) for d in data.TRAIN_DOMAINS[:2]}
        fixed = {d: metarm.draw_problem(s["model"], *domains[d], base, gen) for d in domains}
        rows = P.draw(len(s["train_pairs"][0]["idx"]), 64, gen)
        pairs = tuple(P.rows_of(b, rows) for b in s["train_pairs"])
        metarm.calibrate(s["model"], s["rm"], logs[seed]["rms"]["vanilla_rm"], fixed, base, s["theta_ref"])
        for beta in (0.25, 0.5, 1.0):
            bcfg = metarm.BilevelConfig(**{**asdict(base), "beta": beta, "recalibrate_every": 0})
            phi = P.copy_params(logs[seed]["rms"]["vanilla_rm"])
            opt, norms = torch.optim.Adam(phi.values(), lr=bcfg.lr), []
            for k in range(0, steps + 1, every):
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="cg did not converge")
                    grads = metarm.outer_gradient(s["model"], s["rm"], phi, fixed, pairs, bcfg, s["theta_ref"])[0]
                norms.append(sum((g ** 2).sum() for g in grads).item())
                if k < steps:
                    metarm.train_bilevel(s["model"], s["rm"], phi, domains, pairs, bcfg, s["theta_ref"], gen, gen,
                                         steps=every, opt=opt)
            curves.setdefault(str(beta), []).append([n / norms[0] for n in norms])
    running_min = lambda xs: [min(xs[:i + 1]) for i in range(len(xs))]
    return {"steps": list(range(0, steps + 1, every)), "seeds": seeds,
            "ratio": {beta: [interval(list(v)) for v in zip(*c)] for beta, c in curves.items()},
            "running_min": {beta: [interval(list(v)) for v in zip(*map(running_min, c))] for beta, c in curves.items()}}


# =================================================================================================
# Output plumbing: the command line, atomic output folders
# =================================================================================================
class BadInput(Exception):
    """A command-line value that is not allowed."""


class Parser(argparse.ArgumentParser):
    def error(self, message):              # one line and exit code 2, not argparse's usage block
        raise BadInput(message)


def as_bool(s: str) -> bool:
    table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if s.lower() not in table:
        raise ValueError(s)
    return table[s.lower()]


def cli(config_cls, argv, description: str) -> dict:
    """The values given on the command line, one --flag per field of the dataclass config_cls, with its
    help text and default (a bool flag alone means true). Raises BadInput on an unknown flag or a value
    of the wrong type."""
    parser = Parser(description=description)
    for f in fields(config_cls):
        kind = as_bool if f.type is bool else f.type
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            nargs="?" if f.type is bool else None, const=True if f.type is bool else None,
                            metavar="BOOL" if f.type is bool else None,
                            help=f"{f.metadata.get('help', '')} (default: {f.default})")
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


INT_LIMIT = 10 ** 6                        # integer flags above this are refused (not a useful run)


def parse_config(argv) -> Config:
    """The CLI is derived from Config; every value is checked before anything runs."""
    given = cli(Config, argv, __doc__.splitlines()[0])
    cfg = Config(**({**QUICK, **given} if given.get("quick") else given))
    positive = lambda x: math.isfinite(x) and x > 0
    too_big = [f.name for f in fields(Config) if f.type is int and not 0 <= getattr(cfg, f.name) <= INT_LIMIT]
    checks = [(not too_big, f"--{too_big[0].replace('_', '-') if too_big else ''} must be an integer in 0 .. {INT_LIMIT}"),
              (cfg.seeds >= 1, "--seeds must be an integer >= 1"),
              (all(positive(x) for x in (cfg.beta, cfg.adapt_lr, cfg.rm_lr, cfg.dpo_lr, cfg.beta_dpo, cfg.upper_beta_dpo,
                                         cfg.temperature)),
               "--beta, --adapt-lr, --rm-lr, --dpo-lr, --beta-dpo, --upper-beta-dpo and --temperature must be finite numbers > 0"),
              (math.isfinite(cfg.eta) and cfg.eta >= 0, "--eta must be a finite number >= 0"),
              (math.isfinite(cfg.lam) and cfg.lam >= 0, "--lam must be a finite number >= 0"),
              (cfg.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
              (cfg.domains in ("test", "dev"), "--domains must be test or dev"),
              (cfg.solver in ("cg", "neumann", "unrolled"), "--solver must be cg, neumann or unrolled"),
              (bool(cfg.methods) and set(cfg.methods.split(",")) <= set(METHODS) and "vanilla_rm" in cfg.methods.split(","),
               f"--methods must be a comma-separated subset of {','.join(METHODS)} that includes vanilla_rm"),
              (min(cfg.sft_steps, cfg.rm_steps, cfg.ceiling_steps, cfg.adapt_steps, cfg.extra_steps, cfg.repeats, cfg.eval_samples,
                   cfg.T) >= 1, "step counts, --repeats, --eval-samples and --T must be integers >= 1"),
              (cfg.K >= 2 and cfg.metarm_k >= 2 and cfg.eval_samples % 2 == 0,
               "--K and --metarm-k must be >= 2 and --eval-samples even"),
              (cfg.rounds >= 2, "--rounds must be >= 2 (round 1 is the vanilla RM's)"),
              (cfg.device != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but no GPU is visible")]
    for ok, message in checks:
        if not ok:
            raise BadInput(message)
    return cfg


def prepare_out(out: Path, marker: str = "results.json") -> Path:
    """The folder the run writes into (<out>.partial), created now so that an --out that cannot be
    written fails before any work starts. out must be absolute (resolved). An existing out is
    replaced at the end, so it must be empty or an earlier run (holding marker): `--out .` or
    `--out ~` is refused rather than swapped away."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise BadInput(f"--out {out} exists and is not an earlier run (no {marker} in it); "
                       "give a new folder or an earlier run's")
    tmp = out.with_name(out.name + ".partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / ".write_test").write_text("")
    except OSError as e:
        raise BadInput(f"--out {out} cannot be written ({e.strerror or e}); give a writable folder")
    return tmp


def publish(tmp: Path, out: Path):
    """Swap the complete run in: the earlier run stays whole until the new one is in place."""
    (tmp / ".write_test").unlink(missing_ok=True)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def stage(method: str, seed: int):
    """Name the method and seed in a non-finite-value error raised inside (the step is named by metarm)."""
    try:
        yield
    except FloatingPointError as e:
        raise FloatingPointError(f"{method}, seed {seed}: {e}") from None


@contextmanager
def clock(timings: dict, key: str):
    """Add the block's wall time to timings[key] (seconds, summed over seeds)."""
    t = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0) + time.perf_counter() - t


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=1) + "\n")


def write_datasets(world, tmp: Path):
    data.save_pairs_jsonl(world, world.pooled_pairs(data.TRAIN_DOMAINS), tmp / "train_pairs.jsonl")
    data.save_pairs_jsonl(world, world.pooled_pairs(data.DEV_DOMAINS), tmp / "dev_pairs.jsonl")
    data.save_pairs_jsonl(world, [p for d in data.DOMAINS for p in world.eval_pairs[d]], tmp / "eval_pairs.jsonl")


def write_outputs(tmp: Path, cfg: Config, results: dict, samples: list):
    write_json(tmp / "results.json", results)
    (tmp / "results.md").write_text(plots.results_markdown(results))
    with open(tmp / "samples.jsonl", "w") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
    plots.make_all(results, tmp)


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        out = Path(cfg.out).resolve()
        tmp = prepare_out(out)
    except BadInput as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        results = run(cfg, tmp)
        publish(tmp, out)
    except (FloatingPointError, KeyboardInterrupt) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        print(f"train.py: error: {what}; the previous results in {out} are untouched", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:                                                 # whatever stopped it, nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)               # (after publish, tmp no longer exists)
    print(plots.results_markdown(results))
    print(f"wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
