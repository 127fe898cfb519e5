"""The experiment of METHOD.md §5: `python train.py`.

SFT pi_ref on the unlabelled corpus -> reward models / policies of the six methods (SFT, vanilla RM,
DPO, MetaRM, bilevel meta-RM, gold-reward oracle) -> meta-test adaptation (3) with the same budget
on every held-out domain -> evaluation, for several seeds; then the one-seed sweeps behind the
figures. Writes results.json / results.md / samples.jsonl / timings.json / datasets / PNGs into
--out, replacing an earlier run only once the new one is complete.
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

import bilevel
import data
import metarm
import plots
import policy as P

METHODS = ("sft", "vanilla_rm", "dpo", "metarm", "bilevel", "oracle")
RM_METHODS = ("vanilla_rm", "metarm", "bilevel")
METRICS = ("gold_reward", "win_rate", "rm_accuracy", "kl")


@dataclass
class Config:
    seeds: int = 3                  # number of seeds, 0 .. seeds-1 (the main table)
    out: str = "runs/latest"        # output folder (replaced only when the run is complete)
    device: str = "auto"            # auto | cpu | cuda
    beta: float = 0.5               # KL coefficient of adaptation (3) and of the lower level (5)
    quick: bool = False             # one seed, small budgets, no sweeps: a smoke run of about 35 s
    methods: str = ",".join(METHODS)  # comma-separated subset of the six methods
    domains: str = "test"           # test: the held-out domains | dev: the dev domains (tuning)
    figures: bool = True            # run the one-seed sweeps behind the figures
    sft_steps: int = 1000           # SFT of pi_ref (once; shared by all seeds)
    rm_steps: int = 400             # vanilla RM: Bradley-Terry steps of 32 pairs
    rm_lr: float = 1.5e-3
    adapt_steps: int = 60           # meta-test adaptation (3): RLOO steps of 16 prompts x 4 samples
    adapt_lr: float = 1e-2
    dpo_lr: float = 1e-2            # (chosen on dev domains) DPO takes as many steps as adaptation, 64 pairs each
    beta_dpo: float = 0.1           # DPO temperature (2), also in the upper level (7)
    metarm_steps: int = 40          # MetaRM (9)-(11) steps from the vanilla RM, per held-out domain
    eta: float = 0.03               # MetaRM ascent step (10), chosen on dev domains
    metarm_k: int = 4               # MetaRM responses per shifted prompt (pi_ref, temperature 1)
    second_order: bool = True       # MetaRM: exact gradient through (10) (False: the first-order update)
    bilevel_steps: int = 60         # outer steps (Adam on phi) from the vanilla RM
    lam: float = 0.3                # weight of L_BT in the upper level (7), chosen on dev domains
    K: int = 4                      # lower level: candidates per prompt
    T: int = 20                     # lower level: inner gradient steps (6)
    solver: str = "cg"              # hypergradient: cg | neumann | unrolled
    eval_samples: int = 16          # evaluation samples per prompt (20 prompts per domain)
    threads: int = 0                # torch CPU threads (0: torch's default)


QUICK = dict(seeds=1, sft_steps=300, rm_steps=60, adapt_steps=15, metarm_steps=5, bilevel_steps=5,
             eval_samples=4, figures=False)
MAX_NEW = 24


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


def cli(config_cls, argv, description: str = __doc__.splitlines()[0]) -> dict:
    """The values given on the command line, one --flag per field of the dataclass config_cls
    (a bool flag alone means true). Raises BadInput on an unknown flag or a value of the wrong type."""
    parser = Parser(description=description)
    for f in fields(config_cls):
        kind = as_bool if f.type is bool else f.type
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            nargs="?" if f.type is bool else None, const=True if f.type is bool else None,
                            metavar="BOOL" if f.type is bool else None)
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def parse_config(argv) -> Config:
    """The CLI is derived from Config; every value is checked before anything runs."""
    given = cli(Config, argv)
    cfg = Config(**({**QUICK, **given} if given.get("quick") else given))
    positive = lambda x: math.isfinite(x) and x > 0
    checks = [(cfg.seeds >= 1, "--seeds must be an integer >= 1"),
              (positive(cfg.beta), "--beta must be a finite number > 0"),
              (all(positive(x) for x in (cfg.rm_lr, cfg.adapt_lr, cfg.dpo_lr, cfg.beta_dpo)),
               "--rm-lr, --adapt-lr, --dpo-lr and --beta-dpo must be finite numbers > 0"),
              (math.isfinite(cfg.eta) and cfg.eta >= 0, "--eta must be a finite number >= 0"),
              (math.isfinite(cfg.lam) and cfg.lam >= 0, "--lam must be a finite number >= 0"),
              (cfg.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
              (cfg.domains in ("test", "dev"), "--domains must be test or dev"),
              (cfg.solver in ("cg", "neumann", "unrolled"), "--solver must be cg, neumann or unrolled"),
              (bool(cfg.methods) and set(cfg.methods.split(",")) <= set(METHODS),
               f"--methods must be a comma-separated subset of {','.join(METHODS)}"),
              (min(cfg.sft_steps, cfg.rm_steps, cfg.adapt_steps, cfg.metarm_steps, cfg.bilevel_steps,
                   cfg.eval_samples, cfg.K, cfg.T) >= 1,
               "step counts, --eval-samples, --K and --T must be integers >= 1"),
              (cfg.K >= 2 and cfg.metarm_k >= 2, "--K and --metarm-k must be >= 2"),
              (cfg.threads >= 0, "--threads must be >= 0 (0: torch's default)"),
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


# ---- evaluation ----------------------------------------------------------------------------------
def gold_fn(world, device):
    """r*_d of full sequences as a tensor (the domain is read from each prompt's tag)."""
    return lambda idx: torch.tensor(world.gold_rewards(idx.tolist()), dtype=torch.float32, device=device)


def evaluate(policy, theta, prompts, baseline, gold, gen, n: int):
    """Gold reward, win rate against pi_ref's samples `baseline` of the same prompts (judged by the
    gold reward, ties 1/2) and KL(pi_theta || pi_ref) (k1 on the policy's samples)."""
    idx, mask = P.sample(policy, theta, prompts.repeat(n, 1), MAX_NEW, gen)
    logp, logp_ref = P.logprob_and_ref(policy, theta, idx, mask)
    g, g_ref = gold(idx), gold(baseline)
    win = ((g > g_ref).float() + 0.5 * (g == g_ref).float()).mean()
    return {"gold_reward": g.mean().item(), "win_rate": win.item(), "kl": (logp - logp_ref).mean().item()}, idx, g


@torch.no_grad()
def rm_accuracy(rm, phi, pairs, world) -> float:
    """Accuracy on labelled pairs against the noise-free gold ordering (gold ties excluded, RM ties 1/2)."""
    (c, _), (r, _) = metarm.pair_tensors(pairs, next(iter(phi.values())).device)
    d = (P.reward(rm, phi, c) - P.reward(rm, phi, r)).cpu()
    gd = torch.tensor([world.gold_reward(p.domain, p.chosen) - world.gold_reward(p.domain, p.rejected) for p in pairs])
    keep = gd != 0
    return ((d * gd > 0).float() + 0.5 * (d == 0).float())[keep].mean().item()


def bilevel_problems(world, policy, theta_ref, cfg, gen, device, n_pairs=64):
    """Fixed candidates (every prompt x K from pi_ref) and n_pairs pairs per training domain."""
    problems = {}
    for d in data.TRAIN_DOMAINS:
        prompts = torch.tensor(world.prompts[d], device=device).repeat_interleave(cfg.K, 0)
        idx, mask = P.sample(policy, {}, prompts, MAX_NEW, gen)
        problems[d] = metarm.domain_problem(policy, theta_ref, metarm.prepare(policy, idx, mask, theta_ref),
                                            world.pairs[d][:n_pairs])
    return problems


def bilevel_config(cfg, **over):
    return metarm.BilevelConfig(**{**dict(beta=cfg.beta, beta_dpo=cfg.beta_dpo, lam=cfg.lam, K=cfg.K, T=cfg.T,
                                          solver=cfg.solver, outer_steps=cfg.bilevel_steps), **over})


def calibrate(policy, rm, phi, problems, bcfg, theta_ref):
    """rho and the inner step from the measured curvature (§2.1), worst case over the domains."""
    curv = [metarm.curvature(policy, theta_ref, metarm.candidate_rewards(rm, phi, p["cand"], bcfg.K).detach(),
                             p["cand"], bcfg) for p in problems.values()]
    bcfg.rho, bcfg.inner_lr = max(c["rho"] for c in curv), min(c["inner_lr"] for c in curv)
    pick = {"rho": max, "inner_lr": min}             # the values used; eigenvalues: the extremes
    return {k: pick.get(k, min if "min" in k else max)(c[k] for c in curv) for k in curv[0]}


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


def bar(desc: str, total: int):
    return tqdm(total=total, desc=desc, leave=False)


# ---- one seed of the main table -------------------------------------------------------------------
def run_seed(seed, cfg, world, policy, device, timings, keep):
    """All methods on every evaluation domain for one seed: (metrics[method][domain], samples, logs)."""
    gen = torch.Generator(device).manual_seed(seed)
    methods = cfg.methods.split(",")
    domains = data.TEST_DOMAINS if cfg.domains == "test" else data.DEV_DOMAINS
    train_pairs = world.pooled_pairs(data.TRAIN_DOMAINS)
    theta_ref = {n: p.detach() for n, p in P.adapted_params(policy, "head").items()}
    gold = gold_fn(world, device)
    prompts = {d: torch.tensor(world.prompts[d], device=device) for d in domains}
    baseline = {d: P.sample(policy, {}, prompts[d].repeat(cfg.eval_samples, 1), MAX_NEW, gen)[0] for d in domains}
    acfg = metarm.AdaptConfig(beta=cfg.beta, steps=cfg.adapt_steps, lr=cfg.adapt_lr, max_new_tokens=MAX_NEW)
    rcfg = metarm.RMConfig(steps=cfg.rm_steps, lr=cfg.rm_lr, eta=cfg.eta, k=cfg.metarm_k,
                           second_order=cfg.second_order)
    logs, rewards = {}, {}                              # rewards[method][domain] = (rm, phi) or "gold"
    with clock(timings, "vanilla_rm"), stage("vanilla_rm", seed):
        rm = P.make_reward_model(policy, gen)
        phi_vanilla = P.adapted_params(rm, "all")
        if set(methods) & set(RM_METHODS):
            logs["vanilla_rm"] = metarm.train_reward_model(rm, phi_vanilla, train_pairs, rcfg, gen,
                                                           progress=bar("vanilla RM (1)", cfg.rm_steps))
    rewards["vanilla_rm"] = {d: phi_vanilla for d in domains}
    if "metarm" in methods:
        rewards["metarm"], logs["metarm"] = {}, {}
        with clock(timings, "metarm"), stage("metarm", seed):
            for d in domains:                          # X_s: pi_ref's samples of d's prompts, no labels
                x_s, _ = P.sample(policy, {}, prompts[d].repeat_interleave(cfg.metarm_k, 0), MAX_NEW, gen)
                phi = P.copy_params(phi_vanilla)
                logs["metarm"][d] = metarm.train_reward_model(
                    rm, phi, train_pairs, rcfg, gen, steps=cfg.metarm_steps, progress=bar(f"MetaRM {d}", cfg.metarm_steps),
                    meta_set=(x_s, metarm.distinct_pairs(x_s, cfg.metarm_k)))
                rewards["metarm"][d] = phi
    if "bilevel" in methods:
        with clock(timings, "bilevel"), stage("bilevel", seed):
            problems = bilevel_problems(world, policy, theta_ref, cfg, gen, device)
            bcfg = bilevel_config(cfg)
            phi = P.copy_params(phi_vanilla)
            logs["curvature"] = calibrate(policy, rm, phi, problems, bcfg, theta_ref)
            logs["bilevel"] = metarm.train_bilevel(policy, rm, phi, problems, train_pairs, bcfg, theta_ref, gen,
                                                   progress=bar("bilevel (7)(8)", cfg.bilevel_steps))
        rewards["bilevel"] = {d: phi for d in domains}
        keep.update(problems=problems, bcfg=bcfg, phi_bilevel=phi)
    if "dpo" in methods:
        with clock(timings, "dpo"), stage("dpo", seed):
            theta_dpo = metarm.train_dpo(policy, train_pairs, cfg.adapt_steps, 64, cfg.dpo_lr, cfg.beta_dpo, gen)
    rewards["oracle"] = {d: "gold" for d in domains}
    keep.update(rm=rm, rewards=rewards, prompts=prompts, baseline=baseline, acfg=acfg, phi_vanilla=phi_vanilla,
                theta_ref=theta_ref)
    metrics, samples = {m: {} for m in methods}, []
    for m, d in tqdm([(m, d) for m in methods for d in domains], desc="adaptation (3) + evaluation", leave=False):
        with clock(timings, "adaptation"), stage(m, seed):
            if m == "sft":
                theta = theta_ref
            elif m == "dpo":
                theta = theta_dpo
            else:
                theta = adapt_with(policy, m, d, keep, cfg.beta, gen, gold)
        with clock(timings, "evaluation"):
            res, idx, g = evaluate(policy, theta, prompts[d], baseline[d], gold, gen, cfg.eval_samples)
            res["rm_accuracy"] = rm_accuracy(rm, rewards[m][d], world.eval_pairs[d], world) if m in RM_METHODS else None
            metrics[m][d] = res
            for row, gr in list(zip(idx.tolist(), g.tolist()))[:32]:
                samples.append({"method": m, "domain": d, "seed": seed, "prompt": world.decode(row[:data.PROMPT_LEN]),
                                "response": world.decode(row[data.PROMPT_LEN:]), "gold_reward": gr})
    return metrics, samples, logs


def adapt_with(policy, method, d, keep, beta, gen, gold, steps=None):
    """Meta-test adaptation (3) on domain d with the method's reward, standardised on pi_ref's samples."""
    r = keep["rewards"][method][d]
    reward_fn = gold if r == "gold" else (lambda idx, phi=r: P.reward(keep["rm"], phi, idx))
    acfg = metarm.AdaptConfig(**{**asdict(keep["acfg"]), "beta": beta, **({"steps": steps} if steps else {})})
    theta, _ = metarm.adapt(policy, keep["prompts"][d], metarm.standardised(reward_fn, keep["baseline"][d]), acfg, gen)
    return theta


# ---- one-seed sweeps behind the figures ----------------------------------------------------------
def sweeps(cfg, world, policy, device, keep, logs, main_metrics, timings) -> dict:
    """The figures' experiments, seed 0: reward-vs-KL frontier (beta sweep), hypergradient error vs
    HVPs, outer convergence for several beta, MetaRM vs vanilla over RLHF rounds, lambda ablation.
    main_metrics: seed 0's main-table metrics, reused as the frontier's point at beta = cfg.beta."""
    methods, out = cfg.methods.split(","), {}
    gen = torch.Generator(device).manual_seed(10_000)
    gold, domains = gold_fn(world, device), list(keep["prompts"])
    adapt_and_evaluate = lambda m, d, beta: evaluate(policy, adapt_with(policy, m, d, keep, beta, gen, gold),
                                                     keep["prompts"][d], keep["baseline"][d], gold, gen,
                                                     cfg.eval_samples)[0]
    with clock(timings, "sweep_frontier"):
        frontier = {m: [] for m in ("vanilla_rm", "metarm", "bilevel", "oracle") if m in methods}
        for beta in (0.25, 0.5, 1.0, 2.0):            # on the first two evaluation domains
            for m in frontier:
                res = [main_metrics[m][d] if beta == cfg.beta else adapt_and_evaluate(m, d, beta)
                       for d in domains[:2]]           # seed 0's main-table runs are the point at cfg.beta
                frontier[m].append({"beta": beta, **{k: sum(r[k] for r in res) / len(res) for k in ("kl", "gold_reward")}})
        out["frontier"] = {"domains": domains[:2], "points": frontier}
    if "bilevel" in methods:
        with clock(timings, "sweep_hypergradient_error"):
            out["hypergradient_error"] = hypergradient_error(policy, keep, world)
        with clock(timings, "sweep_outer_convergence"):
            out["outer_convergence"] = outer_convergence(cfg, world, policy, keep, gen)
        with clock(timings, "sweep_lambda"):
            phi = P.copy_params(keep["phi_vanilla"])   # lambda = 0: the pure bilevel objective
            bcfg = metarm.BilevelConfig(**{**asdict(keep["bcfg"]), "lam": 0.0})
            metarm.train_bilevel(policy, keep["rm"], phi, keep["problems"], world.pooled_pairs(data.TRAIN_DOMAINS),
                                 bcfg, keep["theta_ref"], gen)
            keep["rewards"]["bilevel_lam0"] = {d: phi for d in domains}
            res = [adapt_and_evaluate("bilevel_lam0", d, cfg.beta) for d in domains]
            out["lambda_ablation"] = {"lam": 0.0, "gold_reward": sum(r["gold_reward"] for r in res) / len(res),
                                      "rm_accuracy": sum(rm_accuracy(keep["rm"], phi, world.eval_pairs[d], world)
                                                         for d in domains) / len(domains)}
    if "metarm" in methods:
        with clock(timings, "sweep_rlhf_rounds"):
            prompts = torch.tensor([x for d in data.TRAIN_DOMAINS for x in world.prompts[d]], device=device)
            rcfg = metarm.RMConfig(lr=cfg.rm_lr, eta=cfg.eta, k=cfg.metarm_k, second_order=cfg.second_order)
            out["rlhf_rounds"] = {
                name: metarm.rlhf_rounds(policy, keep["rm"], P.copy_params(keep["phi_vanilla"]),
                                         world.pooled_pairs(data.TRAIN_DOMAINS), prompts, 4, keep["acfg"], rcfg,
                                         cfg.metarm_steps, gen, gold, use_metarm=(name == "metarm"))
                for name in ("vanilla_rm", "metarm")}
    every = lambda xs, n=10: [x for i, x in enumerate(xs) if i % n == 0]
    out["training_curves"] = {
        "sft_loss": every(keep["sft_losses"]), "vanilla_rm_loss": every([l["loss"] for l in logs.get("vanilla_rm", [])]),
        "metarm_loss": [l["loss"] for l in logs.get("metarm", {}).get(domains[0], [])],
        "bilevel_F": [l["F"] for l in logs.get("bilevel", [])]}
    return out


def hypergradient_error(policy, keep, world, domain="restaurant", ns=(1, 2, 4, 8, 16, 32), timed=False):
    """Error of dF/dr against a reference vs HVPs, for CG (n iterations), Neumann and unrolled (4n
    terms / steps), on the real lower level of one training domain (seed 0's bilevel RM, float64
    copies). CG and Neumann solve at theta* (Newton, |grad g| <= 1e-9); unrolled runs its own 4n
    inner steps from theta_ref. Reference: CG at theta* to a relative residual of 1e-12, itself
    checked against a central finite difference of F along a random direction of r.
    training_setting: the error of the hypergradient as training computes it -- theta* replaced by
    T inner steps from theta_ref, then CG with cg_iters / cg_tol -- so both of its errors at once.
    timed: add each row's seconds (bench.py; kept out of results.json, which must not hold timings)."""
    pol = copy.deepcopy(policy).double()
    rm = copy.deepcopy(keep["rm"]).double()
    phi = {n: p.detach().double() for n, p in keep["phi_bilevel"].items()}
    theta_ref = {n: p.detach().double() for n, p in keep["theta_ref"].items()}
    cand = keep["problems"][domain]["cand"]
    prob = metarm.domain_problem(pol, theta_ref, metarm.prepare(pol, cand["idx"], cand["mask"].double(), theta_ref),
                                 world.pairs[domain][:64])
    bcfg = keep["bcfg"]
    g, f = metarm.level_functions(pol, prob, bcfg, theta_ref)
    with torch.no_grad():
        upper = {"r": metarm.candidate_rewards(rm, phi, prob["cand"], bcfg.K)}
    theta_star, _ = bilevel.newton_solve(g, theta_ref, upper, tol=1e-9)
    ref, _ = bilevel.hypergrad_implicit(f, g, theta_star, upper, "cg", max_iter=2000, tol=1e-12)
    F = lambda up: f(bilevel.newton_solve(g, theta_ref, up, tol=1e-9)[0], up)
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
        theta_T, inner = bilevel.inner_solve(g, theta_ref, upper, bcfg.T, bcfg.inner_lr)   # as in training:
        gr, info = bilevel.hypergrad_implicit(f, g, theta_T, upper, "cg", max_iter=bcfg.cg_iters, tol=bcfg.cg_tol)
    training = {"T": bcfg.T, "cg_iters": bcfg.cg_iters, "cg_tol": bcfg.cg_tol, "hvps": info["hvps"],
                "inner_grad_norm": inner["grad_norm"], "error": error(gr)}
    return {"domain": domain, "fd_check_rel_error": abs(fd - bilevel.dot(ref, u).item()) / abs(fd), "curves": curves,
            "training_setting": training}


def outer_convergence(cfg, world, policy, keep, gen, steps=30, every=10, n_domains=4):
    """§2.5: the raw full-batch ||grad F(phi_k)||^2 / ||grad F(phi_0)||^2 along a bilevel run, for
    several beta, on a fixed objective: the first n_domains training domains' fixed candidates and
    128 fixed pairs spread over every training domain (the run draws its minibatches from these)."""
    train_pairs, curves = world.pooled_pairs(data.TRAIN_DOMAINS), {}
    pairs = train_pairs[::len(train_pairs) // 128][:128]
    problems = {d: keep["problems"][d] for d in data.TRAIN_DOMAINS[:n_domains]}
    for beta in (0.25, 0.5, 1.0):
        bcfg = bilevel_config(cfg, beta=beta)
        phi = P.copy_params(keep["phi_vanilla"])
        calibrate(policy, keep["rm"], phi, problems, bcfg, keep["theta_ref"])
        opt, norms = torch.optim.Adam(phi.values(), lr=bcfg.lr), []
        for k in range(0, steps + 1, every):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="cg did not converge")
                grads = metarm.outer_gradient(policy, keep["rm"], phi, problems, pairs, bcfg, keep["theta_ref"])[0]
            norms.append({"step": k, "grad_norm2": sum((gr ** 2).sum() for gr in grads).item()})
            if k < steps:
                metarm.train_bilevel(policy, keep["rm"], phi, problems, pairs, bcfg, keep["theta_ref"],
                                     gen, steps=every, opt=opt)
        curves[str(beta)] = [{**n, "ratio": n["grad_norm2"] / norms[0]["grad_norm2"]} for n in norms]
    return curves


# ---- aggregation and output -----------------------------------------------------------------------
def aggregate(per_seed, methods):
    """methods -> metric -> {mean, std, per_seed, per_domain}, a seed's value being its domain mean."""
    out = {}
    for m in methods:
        out[m] = {}
        for k in METRICS:
            doms = list(per_seed[0][m])
            if per_seed[0][m][doms[0]][k] is None:
                out[m][k] = None
                continue
            seeds = [sum(s[m][d][k] for d in doms) / len(doms) for s in per_seed]
            mean = sum(seeds) / len(seeds)
            std = math.sqrt(sum((x - mean) ** 2 for x in seeds) / (len(seeds) - 1)) if len(seeds) > 1 else None
            out[m][k] = {"mean": mean, "std": std, "per_seed": seeds,
                         "per_domain": {d: sum(s[m][d][k] for s in per_seed) / len(per_seed) for d in doms}}
    return out


def fmt(v):
    if v is None:
        return "n/a"
    return f"{v['mean']:.3f}" + ("" if v["std"] is None else f" ± {v['std']:.3f}")


def results_table(results) -> str:
    lines = ["| method | gold reward | win rate vs π_ref | RM accuracy (held-out pairs) | KL(π‖π_ref) |",
             "|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        lines.append(f"| {m} | " + " | ".join(fmt(r[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1) + "\n")


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        out = Path(cfg.out).resolve()
        tmp = prepare_out(out)
    except BadInput as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg, out, tmp)
    except (FloatingPointError, KeyboardInterrupt) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        print(f"train.py: error: {what}; the previous results in {out} are untouched", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:                                                 # whatever stopped it, nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)               # (after publish, tmp no longer exists)
    return 0


def run(cfg: Config, out: Path, tmp: Path):
    """The whole experiment, written into tmp and swapped in as out at the end."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    print("config:", json.dumps(asdict(cfg)))
    timings, t0 = {}, time.perf_counter()
    world = data.World()
    data.save_pairs_jsonl(world, world.pooled_pairs(data.TRAIN_DOMAINS), tmp / "train_pairs.jsonl")
    data.save_pairs_jsonl(world, world.pooled_pairs(data.DEV_DOMAINS), tmp / "dev_pairs.jsonl")
    data.save_pairs_jsonl(world, [p for d in data.DOMAINS for p in world.eval_pairs[d]], tmp / "eval_pairs.jsonl")
    torch.manual_seed(0)
    policy = P.GPT(P.GPTConfig(vocab_size=len(world.vocab)), len(world.vocab)).to(device)
    sft_losses = P.sft(policy, world.sft[1000:], cfg.sft_steps, 64, 1.5e-3, torch.Generator(device).manual_seed(0), device)
    policy.requires_grad_(False)
    ppl = P.perplexity(policy, world.sft[:1000], device)
    timings["sft"] = time.perf_counter() - t0
    print(f"SFT: validation perplexity {ppl:.3f} ({timings['sft']:.0f}s)")
    per_seed, samples, keep, seed_logs = [], [], {}, []
    for seed in tqdm(range(cfg.seeds), desc="seeds"):          # keep: seed 0's objects, for the sweeps
        metrics, smp, logs = run_seed(seed, cfg, world, policy, device, timings, keep if seed == 0 else {})
        per_seed.append(metrics)
        samples += smp
        seed_logs.append(logs)
    methods = cfg.methods.split(",")
    results = {"config": asdict(cfg), "world_version": data.WORLD_VERSION, "sft_val_perplexity": ppl,
               "methods": aggregate(per_seed, methods),
               "per_seed": per_seed,
               "curvature": [l.get("curvature") for l in seed_logs]}
    results["config"].pop("out")
    if cfg.figures:
        keep["sft_losses"] = sft_losses
        results["figures"] = sweeps(cfg, world, policy, device, keep, seed_logs[0], per_seed[0], timings)
    write_json(tmp / "results.json", results)
    (tmp / "results.md").write_text(f"# metarm results ({cfg.domains} domains, {cfg.seeds} seed(s), β = {cfg.beta})\n\n"
                                    + results_table(results) + "\n")
    with open(tmp / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    plots.make_all(results, tmp)
    timings["total"] = time.perf_counter() - t0
    write_json(tmp / "timings.json", timings)
    publish(tmp, out)
    print(results_table(results))
    print(f"wrote {out}/ in {timings['total']:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))


if __name__ == "__main__":
    sys.exit(main())
