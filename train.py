"""The experiment of METHOD.md §5: `python train.py` (README: expected output and time).

SFT pi_ref on the unlabelled corpus -> for each seed: the reward models of every method and control ->
on every evaluation domain, `repeats` meta-test adaptations (3) per method with common random numbers ->
evaluation -> paired statistics over seeds, ceilings, the papers' premises (evaluation.py); then the
figures' experiments at --figure-seeds seeds. Writes results.json / results.md / samples.jsonl / timings.json /
datasets / PNGs into --out, replacing an earlier run only once the new one is complete (cli.py).
"""

import json
import math
import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import data
import evaluation
import metarm
import plots
import policy
from cli import BadInput, clock, option
from evaluation import MAX_NEW, crn_seed, mean

# method -> what adapts the policy on a domain (README, "Methods and controls")
METHODS = (
    "sft",
    "dpo",
    "vanilla_rm",
    "vanilla_rm_long",
    "bilevel",
    "bilevel_bt_only",
    "metarm",
    "metarm_eta0",
    "oracle",
    "in_domain_rm",
    "agnostic_oracle",
)
RM_METHODS = ("vanilla_rm", "vanilla_rm_long", "bilevel", "bilevel_bt_only", "metarm", "metarm_eta0", "in_domain_rm")
CEILINGS = ("oracle", "in_domain_rm", "agnostic_oracle")
# (method, control): a paired difference over seeds; each paper predicts method - control > 0. The five primary
# comparisons of the pre-registration (METHOD.md §5.1)
COMPARISONS = tuple((method, control) for method, control in evaluation.PREREGISTRATION["primary"])
METRICS = ("gold_reward", "win_rate", "rm_accuracy", "kl", "unseen_mass", "shifted_accuracy")
# the positive controls' comparisons (METHOD.md §5.2): with --outer-data own, and whenever dpo and sft both run
POSITIVE_CONTROLS = evaluation.PREREGISTRATION["positive_controls"]
OWN_DATA_COMPARISONS = tuple(tuple(pair) for pair in POSITIVE_CONTROLS["bilevel_own_data"]["comparisons"])
DPO_COMPARISONS = tuple(tuple(pair) for pair in POSITIVE_CONTROLS["dpo"]["comparisons"])
# seed + X_T draws X_t for vanilla_rm_long's extra steps and MetaRM's updates: at eta = 0 MetaRM is vanilla_rm_long
X_T = 1


@dataclass
class Config:
    seeds: int = option(10, "number of seeds 0 .. seeds-1; the seed is the statistical unit")
    out: str = option("runs/latest", "output folder (replaced only when the run is complete)")
    device: str = option("auto", "auto | cpu | cuda")
    world_seed: int = option(
        0, "seed of data.World's draws: corpus, pairs, evaluation pairs (0: world v3 as published)"
    )
    domains: str = option("test", "test: the held-out domains | dev: the dev domains (tuning)")
    methods: str = option(",".join(METHODS), "comma-separated subset of the methods")
    quick: bool = option(False, "a smoke run: 1 seed, small budgets, no figures (< 1 min)")
    figures: bool = option(True, "run the figures' experiments")
    figure_seeds: int = option(3, "seeds 0 .. figure_seeds-1 of the figures' experiments; >= 10 for their verdicts")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    sft_steps: int = option(1500, "SFT steps of pi_ref (64 reviews each; once, shared by all seeds)")
    beta: float = option(metarm.AdaptConfig.beta, "beta, KL coefficient of (3) and of the inner problem (5)")
    adapt_steps: int = option(
        metarm.AdaptConfig.steps, "RLOO steps of meta-test adaptation (3), 16 prompts x 4 samples each"
    )
    adapt_lr: float = option(metarm.AdaptConfig.lr, "Adam step size of adaptation (3)")
    repeats: int = option(2, "adaptations per (method, domain, seed), with common random numbers")
    eval_samples: int = option(16, "evaluation samples per prompt")
    rm_steps: int = option(metarm.RMConfig.steps, "Bradley-Terry steps (1) of the vanilla RM, 32 pairs each")
    rm_lr: float = option(
        metarm.RMConfig.lr, "Adam step size of the Bradley-Terry steps of every reward model (bilevel's: --outer-lr)"
    )
    ceiling_steps: int = option(
        300, "Bradley-Terry steps of the in-domain RM ceiling on the domain's own pairs, from the vanilla RM"
    )
    extra_steps: int = option(
        40,
        "RM updates every method adds to the vanilla RM: bilevel outer steps, MetaRM updates, "
        "vanilla_rm_long's extra steps",
    )
    beta_dpo: float = option(0.1, "beta_DPO of the DPO baseline (2)")
    dpo_lr: float = option(1e-3, "Adam step size of the DPO baseline (2), chosen on dev (README)")
    dpo_steps: int = option(25, "steps of the DPO baseline (2), 64 pairs each")
    outer_data: str = option(
        "train",
        "train: the outer objective (7) and inner problem (5) use the training domains | own: each evaluation "
        "domain's own labelled pairs and prompts, one bilevel RM per domain (the positive control, METHOD.md §5.2)",
    )
    outer_lr: float = option(
        metarm.BilevelConfig.lr, "Adam step size of bilevel's outer steps on phi (and its control)"
    )
    lam: float = option(metarm.BilevelConfig.lam, "lambda, weight of L_BT in the outer objective (7)")
    outer_beta_dpo: float = option(metarm.BilevelConfig.beta_dpo, "beta_DPO inside the outer objective (7)")
    K: int = option(metarm.BilevelConfig.K, "K, candidates per prompt of the inner problem (4)(5)")
    T: int = option(metarm.BilevelConfig.T, "T, inner gradient steps (6), warm-started")
    solver: str = option(metarm.BilevelConfig.solver, "hypergradient (8): cg | neumann | unrolled")
    eta: float = option(metarm.MetaRMConfig.eta, "eta, MetaRM's ascent step (10)")
    metarm_k: int = option(metarm.MetaRMConfig.k, "k, MetaRM responses per shifted prompt (9)")
    temperature: float = option(metarm.MetaRMConfig.temperature, "sampling temperature of MetaRM's shifted set")
    rounds: int = option(
        metarm.MetaRMConfig.rounds, "MetaRM rounds on a held-out domain (the last one's policy is evaluated)"
    )
    second_order: bool = option(
        False, "MetaRM: exact gradient through (10) (default: the authors' first-order update)"
    )


QUICK = dict(
    seeds=1,
    sft_steps=300,
    rm_steps=60,
    ceiling_steps=20,
    adapt_steps=10,
    dpo_steps=10,
    extra_steps=4,
    repeats=1,
    eval_samples=4,
    figures=False,
    rounds=2,
)


# ==== The pipeline ==============================================================================
def run(cfg: Config, tmp: Path) -> dict:
    """The whole experiment; every output goes into tmp. Returns the results dict."""
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    print("config:", json.dumps(asdict(cfg)))
    timings = {}
    t0 = time.perf_counter()
    world = data.World(data.WorldConfig(seed=cfg.world_seed))
    write_datasets(world, tmp)
    with clock(timings, "sft"):
        model, sft_losses = policy.train_pi_ref(world, cfg.sft_steps, seed=0, device=device)
        ppl = policy.perplexity(model, world.sft[: policy.SFT_VALIDATION], device)
    print(f"SFT: validation perplexity {ppl:.3f} ({timings['sft']:.0f}s)")
    with clock(timings, "encode"):
        setup = make_setup(cfg, world, model, device)
    per_seed, samples, logs = [], [], []  # per seed: metrics and premises; samples.jsonl rows; logs
    for seed in tqdm(range(cfg.seeds), desc="seeds"):
        rms, seed_logs = train_reward_models(seed, cfg, setup, timings)
        metrics, premises, smp = evaluate_seed(seed, cfg, setup, rms, timings)
        per_seed.append({"metrics": metrics, "premises": premises})
        samples += smp
        logs.append({**seed_logs, "rms": rms if seed < cfg.figure_seeds else None})
    results = summarise(cfg, per_seed)
    results["world_version"] = data.WORLD_VERSION
    results["sft_val_perplexity"] = ppl
    results["bilevel_curvature"] = [log["curvature"] for log in logs if "curvature" in log]
    if "bilevel" in setup.methods and cfg.outer_data == "train":
        accuracy = evaluation.accuracy_summary([log["hypergradient_accuracy"] for log in logs])
        results["hypergradient_accuracy"] = accuracy
        report_accuracy(accuracy)
    if "dpo" in setup.methods:
        results["dpo_training"] = dpo_training([log["dpo"] for log in logs])
    if cfg.lam == 0 and "bilevel_bt_only" in setup.methods:
        results["reused_runs"] = {
            "bilevel_bt_only": f"{reused_runs(cfg)['bilevel_bt_only']}'s: at lam = 0 the outer objective (7) "
            "without its DPO term is 0, so the control takes no step and its reward model, adaptations and "
            "numbers are that method's"
        }
    if cfg.figures:
        bcfg = bilevel_config(cfg)
        results["figures"] = evaluation.figure_experiments(cfg, setup, logs, per_seed, sft_losses, timings, bcfg)
    write_outputs(tmp, cfg, results, samples)
    timings["total"] = time.perf_counter() - t0
    cli.write_json(tmp / "timings.json", timings)
    return results


def make_setup(cfg: Config, world, model, device) -> evaluation.Setup:
    """What every seed shares: pi_ref, the reward model's architecture, encoded pairs, prompts, configs."""
    methods = cfg.methods.split(",")
    domains = data.TEST_DOMAINS if cfg.domains == "test" else data.DEV_DOMAINS

    def encode(pairs):
        return policy.encode_pairs(model, pairs, device)

    train_pairs = encode(world.pooled_pairs(data.TRAIN_DOMAINS))
    n = world.cfg.n_pairs_per_domain
    domain_pairs = {}  # pooled_pairs is in domain order: domain i holds rows n i .. n (i + 1) - 1
    for i, d in enumerate(data.TRAIN_DOMAINS):
        rows = slice(n * i, n * (i + 1))
        domain_pairs[d] = tuple(policy.rows_of(batch, rows) for batch in train_pairs)
    gold_margins = {}
    for d in domains:
        margins = [world.gold_reward(d, p.chosen) - world.gold_reward(d, p.rejected) for p in world.eval_pairs[d]]
        gold_margins[d] = torch.tensor(margins, device=device)
    metarm_cfg = metarm.MetaRMConfig(
        eta=cfg.eta,
        k=cfg.metarm_k,
        temperature=cfg.temperature,
        steps=cfg.extra_steps // (cfg.rounds - 1),
        rounds=cfg.rounds,
        batch_size=metarm.RMConfig.batch_size,
        second_order=cfg.second_order,
    )
    return evaluation.Setup(
        world=world,
        model=model,
        device=device,
        methods=methods,
        domains=domains,
        rm=policy.RewardModel(model).to(device).requires_grad_(False),
        train_pairs=train_pairs,
        domain_pairs=domain_pairs,
        own_pairs={d: encode(world.pairs[d]) for d in domains} if needs_own_pairs(cfg) else {},
        eval_pairs={d: encode(world.eval_pairs[d]) for d in domains},
        gold_margins=gold_margins,
        prompts={d: torch.tensor(world.prompts[d], device=device) for d in data.DOMAINS},
        theta_ref={name: p.detach() for name, p in policy.adapted_params(model).items()},
        unseen_tokens=unseen_tokens(world, device),
        adapt_cfg=metarm.AdaptConfig(beta=cfg.beta, steps=cfg.adapt_steps, lr=cfg.adapt_lr, max_new_tokens=MAX_NEW),
        rm_cfg=metarm.RMConfig(steps=cfg.rm_steps, lr=cfg.rm_lr),
        metarm_cfg=metarm_cfg,
    )


def unseen_tokens(world, device) -> torch.Tensor:
    """(V,) bool: the tokens that no training pair's response (chosen or rejected) contains."""
    seen = {t for pair in world.pooled_pairs(data.TRAIN_DOMAINS) for t in pair.chosen + pair.rejected}
    unseen = torch.ones(len(world.vocab), dtype=torch.bool)
    unseen[sorted(seen)] = False
    return unseen.to(device)


def needs_own_pairs(cfg: Config) -> bool:
    """The evaluation domains' own labelled pairs are read by the in-domain ceiling and the positive control."""
    return "in_domain_rm" in cfg.methods.split(",") or cfg.outer_data == "own"


def bilevel_config(cfg: Config) -> metarm.BilevelConfig:
    """The bilevel method's settings from the command line (the rest: BilevelConfig's defaults)."""
    return metarm.BilevelConfig(
        beta=cfg.beta,
        beta_dpo=cfg.outer_beta_dpo,
        lam=cfg.lam,
        K=cfg.K,
        T=cfg.T,
        solver=cfg.solver,
        outer_steps=cfg.extra_steps,
        lr=cfg.outer_lr,
        max_new_tokens=MAX_NEW,
    )


def train_reward_model(rm, phi: dict, pairs, cfg: metarm.RMConfig, generator, opt=None, steps: int | None = None):
    """Adam on phi with the Bradley-Terry loss (1) on batches drawn from pairs = (chosen, rejected);
    opt continues an earlier run's optimiser. Returns (per-step loss and accuracy, the optimiser)."""
    opt = opt or torch.optim.Adam(phi.values(), lr=cfg.lr)
    chosen, rejected = pairs
    log = []
    for step in range(cfg.steps if steps is None else steps):
        rows = policy.draw(len(chosen["idx"]), cfg.batch_size, generator)
        loss, acc, _ = metarm.rm_bt_loss(rm, phi, policy.rows_of(chosen, rows), policy.rows_of(rejected, rows))
        policy.check_finite(loss.detach(), "reward-model loss (1)", step)
        policy.apply_gradient(opt, phi, torch.autograd.grad(loss, list(phi.values())))
        log.append({"loss": loss.item(), "acc": acc.item()})
    return log, opt


def train_dpo(model, pairs, steps: int, batch_size: int, lr: float, beta_dpo: float, generator):
    """Eq. (2) on the pooled training pairs, Adam on the same theta as meta-test adaptation.

    Returns (theta, log): per step, on the step's pairs before its update, the loss and the means of
    log pi_theta(y|x) and Delta = log pi_theta - log pi_ref of the chosen and of the rejected responses;
    the log's last entry ("end") is the same on every training pair, after the last step."""
    theta = policy.adapted_params(model)
    opt = torch.optim.Adam(theta.values(), lr=lr)
    chosen, rejected = pairs
    log = []
    for step in range(steps):
        rows = policy.draw(len(chosen["idx"]), batch_size, generator)
        batch_chosen, batch_rejected = policy.rows_of(chosen, rows), policy.rows_of(rejected, rows)
        delta_chosen = metarm.implicit_reward(model, theta, batch_chosen)
        delta_rejected = metarm.implicit_reward(model, theta, batch_rejected)
        loss = metarm.dpo_loss(delta_chosen, delta_rejected, beta_dpo)[0]
        policy.check_finite(loss.detach(), "DPO loss (2)", step)
        log.append(
            {
                "step": step,
                "loss": loss.item(),
                **dpo_logprobs(batch_chosen, batch_rejected, delta_chosen, delta_rejected),
            }
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        delta_chosen = metarm.implicit_reward(model, theta, chosen)
        delta_rejected = metarm.implicit_reward(model, theta, rejected)
    log.append({"step": "end", **dpo_logprobs(chosen, rejected, delta_chosen, delta_rejected)})
    return {n: p.detach() for n, p in theta.items()}, log


def dpo_logprobs(chosen: dict, rejected: dict, delta_chosen, delta_rejected) -> dict:
    """Means of log pi_theta(y|x) = Delta + log pi_ref(y|x) and of Delta, for chosen and rejected responses."""
    out = {}
    for name, batch, delta in (("chosen", chosen, delta_chosen), ("rejected", rejected, delta_rejected)):
        delta = delta.detach()
        out[f"logp_{name}"] = (delta + batch["logp_ref"]).mean().item()
        out[f"delta_{name}"] = delta.mean().item()
    return out


def train_reward_models(seed: int, cfg: Config, s: evaluation.Setup, timings: dict):
    """Every reward model of one seed (and the DPO policy): returns ({method: phi, or {domain: phi},
    or theta for dpo}, logs). The controls start from the vanilla RM exactly as their method does."""
    methods, rm, model = s.methods, s.rm, s.model

    def gen(k):
        return policy.generator(k, s.device)

    out, logs = {}, {}
    with clock(timings, "vanilla_rm"), stage("vanilla_rm", seed):
        _, phi = policy.make_reward_model(model, gen(seed))
        logs["vanilla_rm"], opt = train_reward_model(rm, phi, s.train_pairs, s.rm_cfg, gen(seed))
        out["vanilla_rm"], out["vanilla_opt"] = phi, opt
    if "vanilla_rm_long" in methods:
        with clock(timings, "vanilla_rm_long"), stage("vanilla_rm_long", seed):
            out["vanilla_rm_long"], opt_long = policy.continue_from(phi, opt, cfg.rm_lr)
            pair_gen = gen(seed + X_T)
            train_reward_model(
                rm, out["vanilla_rm_long"], s.train_pairs, s.rm_cfg, pair_gen, opt_long, cfg.extra_steps
            )
    if "metarm_eta0" in methods:
        # (10) at eta = 0: phi' = phi, so MetaRM's updates are the steps above (seed + X_T)
        out["metarm_eta0"] = out["vanilla_rm_long"]
    if "in_domain_rm" in methods:
        with clock(timings, "in_domain_rm"), stage("in_domain_rm", seed):
            out["in_domain_rm"] = {}
            for d in s.domains:  # a ceiling: the domain's own labels (seen by no method but the positive control)
                out["in_domain_rm"][d], opt_d = policy.continue_from(phi, opt, cfg.rm_lr)
                own_gen = gen(seed + 2)
                train_reward_model(
                    rm, out["in_domain_rm"][d], s.own_pairs[d], s.rm_cfg, own_gen, opt_d, cfg.ceiling_steps
                )
    domains = {d: (s.prompts[d], s.domain_pairs[d]) for d in data.TRAIN_DOMAINS}
    if "bilevel" in methods and cfg.outer_data == "own":  # the positive control: one RM per evaluation domain
        with clock(timings, "bilevel"), stage("bilevel", seed):
            out["bilevel"], logs["curvature"] = train_own_data_bilevel(seed, cfg, s, phi, dpo_term=True)
    elif "bilevel" in methods:
        with clock(timings, "bilevel"), stage("bilevel", seed):
            out["bilevel"] = policy.copy_params(phi)
            keep = evaluation.accuracy_steps(cfg.extra_steps)
            logs["bilevel"], logs["curvature"] = fit_bilevel(
                seed, cfg, s, out["bilevel"], domains, s.train_pairs, data.TRAIN_DOMAINS[:4], keep_steps=keep
            )
        with clock(timings, "hypergradient_accuracy"), stage("bilevel", seed):
            logs["hypergradient_accuracy"] = []
            for step, entry in enumerate(logs["bilevel"]):
                if "inputs" not in entry:
                    continue
                inputs = entry.pop("inputs")
                try:
                    accuracy = evaluation.hypergradient_accuracy(model, rm, s.theta_ref, inputs, len(domains))
                except FloatingPointError as e:  # the reference's Newton solve failed: say so, keep the run
                    accuracy = {"cosine": None, "rel_error": None, "failed": str(e)}
                logs["hypergradient_accuracy"].append({"step": step, **accuracy})
    if "bilevel_bt_only" in methods and cfg.lam == 0:
        # (7) without its DPO term is lam L_BT = 0: no step is taken, so the control is the vanilla RM
        out["bilevel_bt_only"] = out["vanilla_rm"]
    elif "bilevel_bt_only" in methods and cfg.outer_data == "own":
        with clock(timings, "bilevel_bt_only"), stage("bilevel_bt_only", seed):
            out["bilevel_bt_only"], _ = train_own_data_bilevel(seed, cfg, s, phi, dpo_term=False)
    elif "bilevel_bt_only" in methods:
        with clock(timings, "bilevel_bt_only"), stage("bilevel_bt_only", seed):
            out["bilevel_bt_only"] = policy.copy_params(phi)
            fit_bilevel(seed, cfg, s, out["bilevel_bt_only"], domains, s.train_pairs, dpo_term=False)
    if "dpo" in methods:
        with clock(timings, "dpo"), stage("dpo", seed):
            out["dpo"], logs["dpo"] = train_dpo(
                model, s.train_pairs, cfg.dpo_steps, 64, cfg.dpo_lr, cfg.beta_dpo, gen(seed + 6)
            )
    return out, logs


def fit_bilevel(
    seed: int,
    cfg: Config,
    s: evaluation.Setup,
    phi: dict,
    domains: dict,
    bt_pairs,
    probe_domains=(),
    dpo_term: bool = True,
    keep_steps=(),
):
    """Eqs. (6)-(8) on phi in place: domains -> (prompts, encoded pairs) of (5) and (7)'s DPO term, bt_pairs for
    its lam term; with the DPO term, rho and the inner step first calibrated at theta* on one problem of each of
    probe_domains. dpo_term=False is the control bilevel_bt_only (the same draws, no calibration needed).
    Returns (the training log, the curvature with the rho re-checks' margins and the final rho, or None)."""
    bcfg, curvature = bilevel_config(cfg), None
    if dpo_term:
        probe = {}
        for d in probe_domains:
            probe[d] = metarm.draw_problem(s.model, *domains[d], bcfg, policy.generator(seed + 3, s.device))
        curvature = metarm.calibrate(s.model, s.rm, phi, probe, bcfg, s.theta_ref)
    log = metarm.train_bilevel(
        s.model,
        s.rm,
        phi,
        domains,
        bt_pairs,
        bcfg,
        s.theta_ref,
        policy.generator(seed + 4, s.device),
        policy.generator(seed + 5, s.device),
        dpo_term=dpo_term,
        keep_steps=keep_steps,
    )
    if dpo_term:
        curvature["margins"] = [e["margin"] for e in log if "margin" in e]
        curvature["rho_final"] = bcfg.rho
    return log, curvature


def train_own_data_bilevel(seed: int, cfg: Config, s: evaluation.Setup, phi: dict, dpo_term: bool):
    """The positive control of the bilevel path (METHOD.md §5.2): for each evaluation domain d, (7) on d's own
    labelled pairs (its DPO term and its lam L_BT term) with (5) on d's prompts, from the vanilla RM phi;
    dpo_term=False is its control bilevel_bt_only (the same draws). Returns ({d: phi_d}, {d: curvature, with
    each outer step's F})."""
    phis, curvature = {}, {}
    for d in s.domains:
        one_domain = {d: (s.prompts[d], s.own_pairs[d])}
        phis[d] = policy.copy_params(phi)
        log, curvature[d] = fit_bilevel(seed, cfg, s, phis[d], one_domain, s.own_pairs[d], [d], dpo_term)
        if dpo_term:
            curvature[d]["F"] = [e["F"] for e in log]
    return phis, curvature


def reused_runs(cfg: Config) -> dict:
    """control -> the method whose adaptation it copies, because its reward model is that method's
    (train_reward_models): metarm_eta0 always; bilevel_bt_only when lam = 0."""
    reused = {"metarm_eta0": "vanilla_rm_long"}
    if cfg.lam == 0:
        reused["bilevel_bt_only"] = "vanilla_rm"
    return reused


def evaluate_seed(seed: int, cfg: Config, s: evaluation.Setup, rms: dict, timings: dict):
    """Every method on every evaluation domain, cfg.repeats adaptations each with common random numbers.

    Returns (metrics[method][domain] averaged over repeats, premises[domain], a few samples)."""
    world, model, methods, gold = s.world, s.model, s.methods, evaluation.gold_fn(s.world)
    reused = {m: source for m, source in reused_runs(cfg).items() if m in methods}

    def gen(k):
        return policy.generator(k, s.device)

    metrics = {m: {} for m in methods}
    metarm_rms = {}  # (domain, repeat) -> MetaRM's phi
    premises, samples = {}, []
    for i, d in enumerate(s.domains):
        prompts = s.prompts[d]
        ref = policy.sample(
            model, {}, prompts.repeat(8, 1), MAX_NEW, gen(crn_seed(seed, i, 99))
        )  # the reward scale (§1)
        rewards = evaluation.reward_functions(s, rms, d, ref)
        runs = {m: [] for m in methods}
        shifted = []  # per repeat: {RM: its accuracy on MetaRM's last shifted samples X_s}
        for j in range(cfg.repeats):
            key = crn_seed(seed, i, j)
            ref_eval = policy.sample(model, {}, prompts.repeat(cfg.eval_samples, 1), MAX_NEW, gen(key + 500))
            thetas = {"sft": s.theta_ref, "dpo": rms.get("dpo")}
            with clock(timings, "adaptation"):
                for m in methods:
                    if m in rewards and m not in reused:
                        with stage(m, seed):
                            thetas[m] = metarm.adapt(model, prompts, rewards[m], s.adapt_cfg, gen(key))[0]
            with clock(timings, "metarm"):
                if "metarm" in methods:
                    with stage("metarm", seed):
                        phi, opt = policy.continue_from(rms["vanilla_rm"], rms["vanilla_opt"], cfg.rm_lr)
                        thetas["metarm"], history = metarm.metarm_rounds(
                            model,
                            prompts,
                            ref,
                            s.rm,
                            phi,
                            opt,
                            s.train_pairs,
                            s.metarm_cfg,
                            s.adapt_cfg,
                            seeds=(key, key + 1, seed + X_T, key + 3),
                            theta_first=thetas.get("vanilla_rm"),
                        )
                        metarm_rms[(d, j)] = phi
                        shifted.append(shifted_accuracy(s, rms, phi, history[-1]["samples"], gold))
            for m, source in reused.items():  # its reward model is source's (train_reward_models), so is its policy
                thetas[m] = thetas[source]
            with clock(timings, "evaluation"):
                for m in methods:
                    eval_gen = gen(key + 600)
                    res, batch, g = evaluation.evaluate(
                        model, thetas[m], prompts, ref_eval, gold, eval_gen, cfg.eval_samples, s.unseen_tokens
                    )
                    runs[m].append(res)
                    if j == 0:
                        samples += sample_records(world, m, d, seed, batch, g)
                    if m == "vanilla_rm":
                        premise = evaluation.measure_premises(
                            s.rm, rms["vanilla_rm"], ref_eval, batch, gold, cfg.eval_samples
                        )
                        premises.setdefault(d, []).append(premise)
        for m in methods:
            metrics[m][d] = {
                k: mean([r[k] for r in runs[m]]) for k in ("gold_reward", "win_rate", "kl", "unseen_mass")
            }
            if m in RM_METHODS:
                metrics[m][d]["rm_accuracy"] = evaluation.rm_accuracy(s, {**rms, "metarm": metarm_rms}, m, d)
            else:
                metrics[m][d]["rm_accuracy"] = None
            metrics[m][d]["shifted_accuracy"] = (
                mean([acc[m] for acc in shifted]) if shifted and m in shifted[0] else None
            )
        if d in premises:
            premises[d] = {k: mean([p[k] for p in premises[d]]) for k in premises[d][0]}
            # the vanilla RM's accuracy on d's held-out labelled pairs
            premises[d]["acc_behaviour_pairs"] = metrics["vanilla_rm"][d]["rm_accuracy"]
    return metrics, premises, samples


@torch.no_grad()
def shifted_accuracy(s: evaluation.Setup, rms: dict, metarm_phi: dict, samples: dict, gold) -> dict:
    """MetaRM's mechanism (METHOD.md §5.2): on the shifted samples X_s of its last update round (k per prompt),
    the accuracy against the gold order over every within-prompt pair of MetaRM's RM after the updates, of
    the eta = 0 RM on the same samples (vanilla_rm_long's, whose X_t draws are the same) and of the vanilla RM."""
    k, g = s.metarm_cfg.k, gold(samples)
    phis = {"metarm": metarm_phi, "vanilla_rm": rms["vanilla_rm"]}
    if "metarm_eta0" in rms:
        phis["metarm_eta0"] = rms["metarm_eta0"]
    return {m: evaluation.within_prompt_accuracy(policy.reward(s.rm, phi, samples), g, k) for m, phi in phis.items()}


def sample_records(world, method: str, domain: str, seed: int, batch: dict, gold_rewards, n: int = 8) -> list:
    """The first n evaluation samples of a method, decoded, for samples.jsonl."""
    records = []
    for row, gold_reward in list(zip(batch["idx"].tolist(), gold_rewards.tolist()))[:n]:
        records.append(
            {
                "method": method,
                "domain": domain,
                "seed": seed,
                "response": world.decode(row[data.PROMPT_LEN :]),
                "prompt": world.decode(row[: data.PROMPT_LEN]),
                "gold_reward": gold_reward,
            }
        )
    return records


def summarise(cfg: Config, per_seed: list) -> dict:
    """The results dict: per-method means with intervals, paired comparisons, ceilings, premises.

    per_seed: one {"metrics": metrics[method][domain][metric], "premises": premises[domain]} per seed."""
    methods = list(per_seed[0]["metrics"])
    domains = list(per_seed[0]["metrics"][methods[0]])

    def seed_value(run: dict, m: str, k: str) -> float:
        """One seed's value of metric k for method m: the mean over the evaluation domains."""
        return mean([run["metrics"][m][d][k] for d in domains])

    out = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "out"},
        "domains": domains,
        "delta": evaluation.DELTA,
        "methods": {},
    }
    for m in methods:
        out["methods"][m] = {}
        for k in METRICS:
            if per_seed[0]["metrics"][m][domains[0]].get(k) is None:
                out["methods"][m][k] = None
                continue
            per_domain = {d: mean([run["metrics"][m][d][k] for run in per_seed]) for d in domains}
            out["methods"][m][k] = {
                **evaluation.interval([seed_value(run, m, k) for run in per_seed]),
                "per_domain": per_domain,
            }
    out["paired"] = {}
    judged_pairs = judged_comparisons(cfg, methods)
    for a, b in judged_pairs + (("in_domain_rm", "vanilla_rm"), ("oracle", "vanilla_rm")):
        if a not in methods or b not in methods:
            continue
        diffs = [seed_value(run, a, "gold_reward") - seed_value(run, b, "gold_reward") for run in per_seed]
        per_domain = {}
        for d in domains:
            per_domain[d] = mean(
                [run["metrics"][a][d]["gold_reward"] - run["metrics"][b][d]["gold_reward"] for run in per_seed]
            )
        if (a, b) in judged_pairs:
            judged = evaluation.decide(diffs, evaluation.DELTA["gold_reward"])
        else:
            judged = {**evaluation.interval(diffs), "verdict": "n/a (a ceiling)"}
        out["paired"][f"{a} - {b}"] = {
            **judged,
            "wins": sum(x > 0 for x in diffs),
            "per_seed": diffs,
            "per_domain": per_domain,
        }
    compared = [f"{a} - {b}" for a, b in COMPARISONS if f"{a} - {b}" in out["paired"]]
    head = out["paired"].get("in_domain_rm - vanilla_rm")
    if head and head["ci95"] and compared:
        # the headroom rule (README): headroom >= 3 x the widest half-width
        widest = max((out["paired"][c]["ci95"][1] - out["paired"][c]["ci95"][0]) / 2 for c in compared)
        out["headroom_rule"] = {
            "headroom": head["mean"],
            "widest_half_width": widest,
            "compared": compared,
            "ratio": head["mean"] / widest if widest > 0 else None,
            "met": head["mean"] >= 3 * widest,
        }
    if "metarm" in methods and "metarm_eta0" in methods:
        # MetaRM's mechanism, paired against eta = 0 on the same shifted samples (METHOD.md §5.2)
        diffs = [
            difference(
                seed_value(run, "metarm", "shifted_accuracy"), seed_value(run, "metarm_eta0", "shifted_accuracy")
            )
            for run in per_seed
        ]
        out["paired_rm_accuracy"] = {
            "metarm - metarm_eta0 (accuracy on MetaRM's shifted samples X_s)": {
                **evaluation.decide(diffs, evaluation.DELTA["rm_accuracy"]),
                "wins": sum(x is not None and x > 0 for x in diffs),
                "per_seed": diffs,
            }
        }
    if "dpo" in methods and "sft" in methods:
        # likelihood displacement (METHOD.md §5.2): more probability on tokens no training response contains
        diffs = [seed_value(run, "dpo", "unseen_mass") - seed_value(run, "sft", "unseen_mass") for run in per_seed]
        out["unseen_mass_dpo_minus_sft"] = {**evaluation.interval(diffs), "per_seed": diffs}
    out["ceilings"] = {}
    for m in CEILINGS:
        if m in methods:
            out["ceilings"][m] = evaluation.interval([seed_value(run, m, "gold_reward") for run in per_seed])
    if "vanilla_rm" in methods:
        out["premises"] = {}
        for k in per_seed[0]["premises"][domains[0]]:
            values = [mean([run["premises"][d][k] for d in domains]) for run in per_seed]
            out["premises"][k] = evaluation.interval(values)
        if "absdiff_median_adapted" in per_seed[0]["premises"][domains[0]]:
            out["premises"]["collapse_ratio"] = collapse(per_seed, domains)
    return out


def dpo_training(per_seed: list) -> dict:
    """DPO's training log over seeds (train_dpo): per step, the mean over seeds of the loss and of the chosen
    and rejected responses' log pi_theta and Delta; at the end, on every training pair, each with its interval."""
    keys = [k for k in per_seed[0][-1] if k != "step"]
    steps = []
    for entries in zip(*[log[:-1] for log in per_seed]):
        steps.append(
            {"step": entries[0]["step"], **{k: mean([e[k] for e in entries]) for k in entries[0] if k != "step"}}
        )
    end = {k: evaluation.interval([log[-1][k] for log in per_seed]) for k in keys}
    return {"per_step": steps, "end_all_training_pairs": end}


def difference(a, b):
    """a - b, None when either is None (a seed whose pairs all tie in gold: left out of the interval)."""
    return None if a is None or b is None else a - b


def judged_comparisons(cfg: Config, methods: list) -> tuple:
    """The comparisons a run judges by the verdict rule: the primary ones, those of the bilevel positive control
    with --outer-data own, DPO's when dpo and sft run (METHOD.md §5.1, §5.2); each once, in that order."""
    pairs = list(COMPARISONS)
    if cfg.outer_data == "own":
        pairs += OWN_DATA_COMPARISONS
    if "dpo" in methods and "sft" in methods:
        pairs += DPO_COMPARISONS
    return tuple(dict.fromkeys(pairs))


def collapse(per_seed: list, domains: list) -> dict:
    """MetaRM's premise (METHOD.md §5.2): per seed, the median within-prompt |r_i - r_j| of the vanilla RM on
    the adapted policy's samples over that on pi_ref's (each averaged over domains first); "holds" when the
    95 % interval's upper end is below the registered threshold."""
    values = []
    for run in per_seed:
        adapted = mean([run["premises"][d]["absdiff_median_adapted"] for d in domains])
        reference = mean([run["premises"][d]["absdiff_median_pi_ref"] for d in domains])
        values.append(adapted / reference)
    out = evaluation.interval(values)
    out["threshold"] = evaluation.COLLAPSE_THRESHOLD
    out["holds"] = out["ci95"] is not None and out["ci95"][1] < evaluation.COLLAPSE_THRESHOLD
    return out


# ==== The command line and the output folder ====================================================
def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def parse_config(argv) -> Config:
    """The CLI is derived from Config; every value is checked before anything runs."""
    given = cli.parse(Config, argv, __doc__.splitlines()[0])
    cfg = Config(**({**QUICK, **given} if given.get("quick") else given))
    methods = cfg.methods.split(",")
    rates = (
        cfg.beta,
        cfg.adapt_lr,
        cfg.rm_lr,
        cfg.outer_lr,
        cfg.dpo_lr,
        cfg.beta_dpo,
        cfg.outer_beta_dpo,
        cfg.temperature,
    )
    counts = (
        cfg.sft_steps,
        cfg.rm_steps,
        cfg.ceiling_steps,
        cfg.adapt_steps,
        cfg.extra_steps,
        cfg.repeats,
        cfg.dpo_steps,
    )
    checks = [
        (cfg.seeds >= 1, "--seeds must be an integer >= 1"),
        (cfg.figure_seeds >= 1, "--figure-seeds must be an integer >= 1"),
        (
            all(positive(x) for x in rates),
            "--beta, --adapt-lr, --rm-lr, --outer-lr, --dpo-lr, --beta-dpo, --outer-beta-dpo and --temperature "
            "must be finite numbers > 0",
        ),
        (math.isfinite(cfg.eta) and cfg.eta >= 0, "--eta must be a finite number >= 0"),
        (math.isfinite(cfg.lam) and cfg.lam >= 0, "--lam must be a finite number >= 0"),
        (cfg.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
        (cfg.domains in ("test", "dev"), "--domains must be test or dev"),
        (cfg.solver in ("cg", "neumann", "unrolled"), "--solver must be cg, neumann or unrolled"),
        (cfg.outer_data in ("train", "own"), "--outer-data must be train or own"),
        (
            cfg.outer_data == "train" or not cfg.figures,
            "--outer-data own is the positive control of the main table, not of the figures: add --figures 0",
        ),
        (
            cfg.outer_data == "train" or "in_domain_rm" not in methods or cfg.ceiling_steps == cfg.extra_steps,
            "--outer-data own compares in_domain_rm at bilevel's budget: give --ceiling-steps equal to --extra-steps",
        ),
        (
            bool(cfg.methods) and set(methods) <= set(METHODS) and "vanilla_rm" in methods,
            f"--methods must be a comma-separated subset of {','.join(METHODS)} that includes vanilla_rm",
        ),
        (
            min(*counts, cfg.eval_samples, cfg.T) >= 1,
            "step counts, --repeats, --eval-samples and --T must be integers >= 1",
        ),
        (
            cfg.K >= 2 and cfg.metarm_k >= 2 and cfg.eval_samples % 2 == 0,
            "--K and --metarm-k must be >= 2 and --eval-samples even",
        ),
        (
            cfg.rounds >= 2 and cfg.extra_steps % (cfg.rounds - 1) == 0,
            "--rounds must be >= 2 (round 1 is the vanilla RM's) and --rounds - 1 must divide --extra-steps",
        ),
        (
            "metarm_eta0" not in methods or "vanilla_rm_long" in methods,
            "--methods: metarm_eta0 needs vanilla_rm_long (at eta = 0 MetaRM's rounds are its Bradley-Terry steps)",
        ),
        (cfg.device != "cuda" or torch.cuda.is_available(), "--device cuda asked for, but no GPU is visible"),
    ]
    for ok, message in checks:
        if not ok:
            raise BadInput(message)
    return cfg


def report_accuracy(summary: dict):
    """One line on the hypergradient's accuracy (evaluation.accuracy_summary); a warning only for what a user
    must act on: a cosine below the stated threshold, or a check whose reference could not be computed."""
    if summary["failed_checks"]:
        warnings.warn(
            f"bilevel: {summary['failed_checks']} hypergradient accuracy check(s) could not compute their "
            "reference (results.json: hypergradient_accuracy, per_seed)"
        )
    accuracy = summary["all"]
    if accuracy is None:
        return
    print(
        f"hypergradient accuracy ({accuracy['n']} checks): cosine min {accuracy['cosine_min']:.4f}, median "
        f"{accuracy['cosine_median']:.4f}; relative error median {accuracy['rel_error_median']:.3f}, max "
        f"{accuracy['rel_error_max']:.3f}"
    )
    if accuracy["cosine_min"] < evaluation.HYPERGRADIENT_COSINE_WARNING:
        warnings.warn(
            f"bilevel: a hypergradient training used has cosine {accuracy['cosine_min']:.3f} < "
            f"{evaluation.HYPERGRADIENT_COSINE_WARNING} with its reference: raise --T or BilevelConfig.cg_iters "
            "(README, Troubleshooting)"
        )


@contextmanager
def stage(method: str, seed: int):
    """Name the method and seed in a non-finite-value error raised inside (the step is named by metarm)."""
    try:
        yield
    except FloatingPointError as e:
        raise FloatingPointError(f"{method}, seed {seed}: {e}") from None


def write_datasets(world, tmp: Path):
    data.save_pairs_jsonl(world, world.pooled_pairs(data.TRAIN_DOMAINS), tmp / "train_pairs.jsonl")
    data.save_pairs_jsonl(world, world.pooled_pairs(data.DEV_DOMAINS), tmp / "dev_pairs.jsonl")
    data.save_pairs_jsonl(world, [p for d in data.DOMAINS for p in world.eval_pairs[d]], tmp / "eval_pairs.jsonl")


def write_outputs(tmp: Path, cfg: Config, results: dict, samples: list):
    cli.write_json(tmp / "results.json", results)
    (tmp / "results.md").write_text(plots.results_markdown(results))
    with open(tmp / "samples.jsonl", "w") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
    plots.make_all(results, tmp)


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        out = Path(cfg.out).resolve()
        tmp = cli.prepare_out(out, "results.json")
    except BadInput as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        results = run(cfg, tmp)
        cli.publish(tmp, out)
    except (FloatingPointError, KeyboardInterrupt) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        print(f"train.py: error: {what}; the previous results in {out} are untouched", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    finally:  # whatever stopped it, nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)  # (after publish, tmp no longer exists)
    print(plots.results_markdown(results))
    print(f"wrote {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
