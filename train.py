"""The experiment of METHOD.md §5: `python train.py` (README: expected output and time).

SFT pi_ref on the unlabelled corpus -> for each seed: the reward models of every method and control -> on every
evaluation domain, `repeats` meta-test adaptations (3) per method with common random numbers -> evaluation ->
paired statistics over seeds with the pre-registered verdicts, ceilings, the papers' premises; then the figures'
experiments at --figure-seeds seeds. Writes results.json / results.md / samples.jsonl / logs.jsonl / timings.json /
provenance.json / datasets / PNGs into --out, replacing an earlier run only once the new one is complete.

The reference (data.py, policy.py, bilevel.py, metarm.py) holds the papers' math; study/ holds what measures it:
the table of methods, the metrics and premises, the statistics and verdicts, the figures, the command line.
"""

import json
import math
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

import data
import metarm
import policy
from study import figures, fits, hypergradient_checks, measure, plots, summary
from study.cli import BadInput, bar, clock, option, parse, prepare_out, provenance, publish, write_json
from study.methods import DEFAULT_METHODS, METHODS
from study.stats import mean

# seed + X_T draws X_t for vanilla_rm_long's extra steps and MetaRM's updates: at eta = 0 MetaRM is vanilla_rm_long
X_T = 1


@dataclass
class Config:
    seeds: int = option(10, "number of seeds, first-seed .. first-seed + seeds - 1; the seed is the statistical unit")
    first_seed: int = option(
        0, "the first seed (10: the confirmatory run's fresh seeds, streams of their own; world 0's pi_ref still)"
    )
    out: str = option("runs/latest", "output folder (replaced only when the run is complete)")
    device: str = option("auto", "auto | cpu | cuda")
    world_seed: int = option(
        0, "seed of data.World's draws: corpus, pairs, evaluation pairs (0: world v3 as published)"
    )
    domains: str = option("test", "test: the held-out domains | dev: the dev domains (tuning)")
    methods: str = option(
        ",".join(DEFAULT_METHODS),
        "comma-separated subset of the methods (study/methods.py; its diagnostics: add them)",
    )
    quick: bool = option(False, "a smoke run: 1 seed, small budgets, no figures (< 1 min)")
    figures: bool = option(True, "run the figures' experiments")
    figure_seeds: int = option(
        3, "the run's first figure-seeds seeds run the figures' experiments; >= 10 for verdicts"
    )
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    progress: bool = option(True, "progress bars with each phase's numbers (the numbers also go to logs.jsonl)")
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
    rho_factor: float = option(
        metarm.BilevelConfig.rho_factor,
        "rho = rho-factor (-lambda_min)_+ at theta* (§2.1; > 1; METHOD.md §5.4 M4: 1.1)",
    )
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


@dataclass(frozen=True)
class Setup:
    """What every seed of a run shares (make_setup builds it; nothing changes it afterwards)."""

    world: data.World
    model: policy.GPT  # pi_ref, frozen
    device: str
    methods: list  # the methods this run compares (study/methods.py, or a subset)
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
    bilevel_cfg: metarm.BilevelConfig  # rho and the inner step unset: each fit calibrates a copy


# ==== The pipeline ==============================================================================
def run(cfg: Config, tmp: Path) -> dict:
    """The whole experiment; every output goes into tmp. Returns the results dict."""
    device = pick_device(cfg)
    print("config:", json.dumps(asdict(cfg)))
    prereg = summary.read_preregistration()
    timings = {}
    t0 = time.perf_counter()
    world = data.World(data.WorldConfig(seed=cfg.world_seed))
    write_datasets(world, tmp)
    with clock(timings, "sft"):
        model, sft_losses = policy.train_pi_ref(world, cfg.sft_steps, seed=0, device=device, progress=cfg.progress)
        ppl = policy.perplexity(model, world.sft[: policy.SFT_VALIDATION], device)
    print(f"SFT: validation perplexity {ppl:.3f} ({timings['sft']:.0f}s)")
    with clock(timings, "encode"):
        setup = make_setup(cfg, world, model, device)
    per_seed, samples, logs = [], [], []  # per seed: metrics and premises; samples.jsonl rows; logs
    rows = [{"phase": "sft", "step": i, "loss": loss} for i, loss in enumerate(sft_losses)]  # logs.jsonl
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    for seed in tqdm(seeds, desc="seeds", disable=not cfg.progress):
        rms, seed_logs = train_reward_models(seed, cfg, setup, timings)
        metrics, premises, smp, adapted = evaluate_seed(seed, cfg, setup, rms, timings)
        per_seed.append({"metrics": metrics, "premises": premises})
        samples += smp
        logs.append({**seed_logs, "rms": rms if seed < seeds[0] + cfg.figure_seeds else None})
        rows += log_rows(seed, seed_logs, adapted)
    config = {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress")}  # what the numbers depend on
    if not cfg.first_seed:
        del config["first_seed"]  # a default run's results.json as before the flag
    results = summary.summarise(config, per_seed, prereg)
    results["world_version"] = data.WORLD_VERSION
    results["sft_val_perplexity"] = ppl
    results["bilevel_curvature"] = [log["curvature"] for log in logs if "curvature" in log]
    if any("path_signal" in log for log in logs):  # the own-data fit's M1 (METHOD.md §5.4)
        results["path_signal"] = summary.path_signal([log["path_signal"] for log in logs])
    if "bilevel" in setup.methods and cfg.outer_data == "train":
        accuracy = hypergradient_checks.accuracy_summary([log["hypergradient_accuracy"] for log in logs])
        results["hypergradient_accuracy"] = accuracy
        hypergradient_checks.report(accuracy)
    if "dpo" in setup.methods:
        results["dpo_training"] = summary.dpo_training([log["dpo"] for log in logs])
    if cfg.lam == 0 and "bilevel_bt_only" in setup.methods:
        results["reused_runs"] = {
            "bilevel_bt_only": f"{reused_runs(cfg)['bilevel_bt_only']}'s: at lam = 0 the outer objective (7) "
            "without its DPO term is 0, so the control takes no step and its reward model, adaptations and "
            "numbers are that method's"
        }
    if cfg.figures:
        results["figures"] = figures.figure_experiments(cfg, setup, logs, per_seed, sft_losses, timings, prereg)
    write_outputs(tmp, results, samples, rows, prereg)
    timings["total"] = time.perf_counter() - t0
    write_json(tmp / "timings.json", timings)
    return results


def pick_device(cfg: Config) -> str:
    return "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"


def make_setup(cfg: Config, world, model, device) -> Setup:
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
    bilevel_cfg = metarm.BilevelConfig(
        beta=cfg.beta,
        beta_dpo=cfg.outer_beta_dpo,
        lam=cfg.lam,
        K=cfg.K,
        T=cfg.T,
        solver=cfg.solver,
        outer_steps=cfg.extra_steps,
        lr=cfg.outer_lr,
        max_new_tokens=measure.MAX_NEW,
        rho_factor=cfg.rho_factor,
    )
    own_pairs_needed = "in_domain_rm" in methods or cfg.outer_data == "own"  # the ceiling and the positive control
    return Setup(
        world=world,
        model=model,
        device=device,
        methods=methods,
        domains=domains,
        rm=policy.RewardModel(model).to(device).requires_grad_(False),
        train_pairs=train_pairs,
        domain_pairs=domain_pairs,
        own_pairs={d: encode(world.pairs[d]) for d in domains} if own_pairs_needed else {},
        eval_pairs={d: encode(world.eval_pairs[d]) for d in domains},
        gold_margins=gold_margins,
        prompts={d: torch.tensor(world.prompts[d], device=device) for d in data.DOMAINS},
        theta_ref={name: p.detach() for name, p in policy.adapted_params(model).items()},
        unseen_tokens=measure.unseen_tokens(world, device),
        adapt_cfg=metarm.AdaptConfig(
            beta=cfg.beta, steps=cfg.adapt_steps, lr=cfg.adapt_lr, max_new_tokens=measure.MAX_NEW
        ),
        rm_cfg=metarm.RMConfig(steps=cfg.rm_steps, lr=cfg.rm_lr),
        metarm_cfg=metarm_cfg,
        bilevel_cfg=bilevel_cfg,
    )


def train_reward_models(seed: int, cfg: Config, s: Setup, timings: dict):
    """Every reward model of one seed (and the DPO policy), in this order: returns ({method: phi, or {domain: phi},
    or theta for dpo}, logs). The controls start from the vanilla RM exactly as their method does."""
    methods, rm, model = s.methods, s.rm, s.model

    def gen(k):
        return policy.generator(k, s.device)

    def phase(name, total, key=None):
        return run_phase(name, seed, total, cfg.progress, timings, key)

    out, logs = {}, {}
    with phase("vanilla_rm", cfg.rm_steps) as progress:
        _, phi = policy.make_reward_model(model, gen(measure.stream(seed)))
        logs["vanilla_rm"], opt = metarm.train_reward_model(
            rm, phi, s.train_pairs, s.rm_cfg, gen(measure.stream(seed)), progress=progress
        )
        out["vanilla_rm"], out["vanilla_opt"] = phi, opt
    if "vanilla_rm_long" in methods:
        with phase("vanilla_rm_long", cfg.extra_steps) as progress:
            out["vanilla_rm_long"], opt_long = policy.continue_from(phi, opt, cfg.rm_lr)
            pair_gen = gen(measure.stream(seed, X_T))
            logs["vanilla_rm_long"], _ = metarm.train_reward_model(
                rm, out["vanilla_rm_long"], s.train_pairs, s.rm_cfg, pair_gen, opt_long, cfg.extra_steps, progress
            )
    if "metarm_eta0" in methods:
        # (10) at eta = 0: phi' = phi, so MetaRM's updates are vanilla_rm_long's steps (seed + X_T)
        out["metarm_eta0"] = out[METHODS["metarm_eta0"].reuses]
    if "in_domain_rm" in methods:
        with phase("in_domain_rm", len(s.domains) * cfg.ceiling_steps) as progress:
            out["in_domain_rm"], logs["in_domain_rm"] = {}, {}
            for d in s.domains:  # a ceiling: the domain's own labels (seen by no method but the positive control)
                out["in_domain_rm"][d], opt_d = policy.continue_from(phi, opt, cfg.rm_lr)
                own_gen = gen(measure.stream(seed, 2))
                logs["in_domain_rm"][d], _ = metarm.train_reward_model(
                    rm, out["in_domain_rm"][d], s.own_pairs[d], s.rm_cfg, own_gen, opt_d, cfg.ceiling_steps, progress
                )
    training_domains = {d: (s.prompts[d], s.domain_pairs[d]) for d in data.TRAIN_DOMAINS}
    own_steps = len(s.domains) * cfg.extra_steps  # --outer-data own: one bilevel RM per evaluation domain
    if "bilevel" in methods and cfg.outer_data == "own":  # the positive control
        with phase("bilevel", own_steps) as progress:
            own = fits.own_data_bilevel(seed, s, phi, "dpo", progress)
            out["bilevel"], logs["curvature"], logs["path_signal"] = own
    elif "bilevel" in methods:
        with phase("bilevel", cfg.extra_steps) as progress:
            out["bilevel"] = policy.copy_params(phi)
            probes, checks = data.TRAIN_DOMAINS[:4], hypergradient_checks.accuracy_steps(cfg.extra_steps)
            logs["bilevel"], logs["curvature"], kept = fits.fit_bilevel(
                seed, s, out["bilevel"], training_domains, s.train_pairs, probes, checks, progress
            )
        with phase("bilevel", len(kept), key="hypergradient_accuracy") as progress:
            n_domains = len(training_domains)
            logs["hypergradient_accuracy"] = hypergradient_checks.accuracy_checks(
                model, rm, s.theta_ref, kept, n_domains, progress
            )
    if "bilevel_bt_only" in methods and cfg.lam == 0:
        # (7) without its DPO term is lam L_BT = 0: no step is taken, so the control is the vanilla RM
        out["bilevel_bt_only"] = out["vanilla_rm"]
    elif "bilevel_bt_only" in methods and cfg.outer_data == "own":
        with phase("bilevel_bt_only", own_steps) as progress:
            out["bilevel_bt_only"], _, _ = fits.own_data_bilevel(seed, s, phi, None, progress)
    elif "bilevel_bt_only" in methods:
        with phase("bilevel_bt_only", cfg.extra_steps) as progress:
            out["bilevel_bt_only"] = policy.copy_params(phi)
            # no domain: (7) is lam L_BT alone, on the same batches as bilevel's lam term
            logs["bilevel_bt_only"], _, _ = fits.fit_bilevel(
                seed, s, out["bilevel_bt_only"], {}, s.train_pairs, progress=progress
            )
    for m in ("bilevel_swapped", "bilevel_gold"):  # METHOD.md §5.4's diagnostics, on the own-data run only
        if m in methods:
            with phase(m, own_steps) as progress:
                out[m], _, _ = fits.own_data_bilevel(seed, s, phi, fits.OUTER[m], progress)
    if "dpo" in methods:
        with phase("dpo", cfg.dpo_steps) as progress:
            out["dpo"], logs["dpo"] = fits.train_dpo(
                model,
                s.train_pairs,
                cfg.dpo_steps,
                64,
                cfg.dpo_lr,
                cfg.beta_dpo,
                gen(measure.stream(seed, 6)),
                progress,
            )
    return out, logs


def evaluate_seed(seed: int, cfg: Config, s: Setup, rms: dict, timings: dict):
    """Every method on every evaluation domain, cfg.repeats adaptations each with common random numbers.

    Returns (metrics[method][domain] averaged over repeats, premises[domain], a few samples, each adaptation's last
    step: its mean reward and KL). The progress bar shows, per (domain, repeat), the adaptations' mean reward."""
    world, model, methods, gold = s.world, s.model, s.methods, measure.gold_fn(s.world)
    reused = {m: source for m, source in reused_runs(cfg).items() if m in methods}

    def gen(k):
        return policy.generator(k, s.device)

    metrics = {m: {} for m in methods}
    metarm_rms = {}  # (domain, repeat) -> MetaRM's phi
    premises, samples, adapted = {}, [], []
    progress = bar(f"meta-test, seed {seed}", len(s.domains) * cfg.repeats, cfg.progress)
    for i, d in enumerate(s.domains):
        prompts = s.prompts[d]
        scale_gen = gen(measure.crn_seed(seed, i, 99))
        ref = policy.sample(model, {}, prompts.repeat(8, 1), measure.MAX_NEW, scale_gen)  # the reward scale (§1)
        rewards = measure.reward_functions(s, rms, d, ref)
        runs = {m: [] for m in methods}
        shifted = []  # per repeat: {RM: its accuracy on MetaRM's last shifted samples X_s}
        widened = []  # per repeat: {RM: its within-prompt |r_i - r_j| on X_s, on its own scale}
        for j in range(cfg.repeats):
            key = measure.crn_seed(seed, i, j)
            ref_eval = policy.sample(model, {}, prompts.repeat(cfg.eval_samples, 1), measure.MAX_NEW, gen(key + 500))
            thetas = {"sft": s.theta_ref, "dpo": rms.get("dpo")}
            with clock(timings, "adaptation"):
                for m in methods:
                    if m in rewards and m not in reused:
                        with stage(m, seed):
                            thetas[m], log = metarm.adapt(model, prompts, rewards[m], s.adapt_cfg, gen(key))
                        adapted.append({"domain": d, "repeat": j, "method": m, **log[-1]})
            with clock(timings, "metarm"):
                if "metarm" in methods:
                    with stage("metarm", seed):
                        phi, opt = policy.continue_from(rms["vanilla_rm"], rms["vanilla_opt"], cfg.rm_lr)
                        thetas["metarm"], meta_sets = metarm.metarm_rounds(
                            model,
                            prompts,
                            ref,
                            s.rm,
                            phi,
                            opt,
                            s.train_pairs,
                            s.metarm_cfg,
                            s.adapt_cfg,
                            adapt_seed=key,
                            sample_generator=gen(key + 1),
                            pair_generator=gen(
                                measure.stream(seed, X_T)
                            ),  # vanilla_rm_long's pairs: at eta = 0 its steps
                            meta_generator=gen(key + 3),
                            theta_first=thetas.get("vanilla_rm"),
                        )
                        metarm_rms[(d, j)] = phi
                        shifted.append(measure.shifted_accuracy(s, rms, phi, meta_sets[-1], gold))
                        widened.append(measure.shifted_widening(s, rms, phi, meta_sets[-1], ref))
            for m, source in reused.items():  # its reward model is source's (train_reward_models), so is its policy
                thetas[m] = thetas[source]
            with clock(timings, "evaluation"):
                for m in methods:
                    eval_gen = gen(key + 600)
                    res, batch, g = measure.evaluate(
                        model, thetas[m], prompts, ref_eval, gold, eval_gen, cfg.eval_samples, s.unseen_tokens
                    )
                    runs[m].append(res)
                    if j == 0:
                        samples += measure.sample_records(world, m, d, seed, batch, g)
                    if m == "vanilla_rm":
                        premise = measure.measure_premises(
                            s.rm, rms["vanilla_rm"], ref_eval, batch, gold, cfg.eval_samples
                        )
                        premises.setdefault(d, []).append(premise)
            last = [a for a in adapted if (a["domain"], a["repeat"]) == (d, j)]
            policy.show(progress, {"domain": d, "reward": mean([a["reward"] for a in last]) or 0.0})
        for m in methods:
            metrics[m][d] = {
                k: mean([r[k] for r in runs[m]]) for k in ("gold_reward", "win_rate", "kl", "unseen_mass")
            }
            if METHODS[m].has_rm:
                metrics[m][d]["rm_accuracy"] = measure.rm_accuracy(s, {**rms, "metarm": metarm_rms}, m, d)
            else:
                metrics[m][d]["rm_accuracy"] = None
            metrics[m][d]["shifted_accuracy"] = (
                mean([acc[m] for acc in shifted]) if shifted and m in shifted[0] else None
            )
            metrics[m][d]["shifted_widening"] = mean([w[m] for w in widened]) if widened and m in widened[0] else None
        if d in premises:
            premises[d] = {k: mean([p[k] for p in premises[d]]) for k in premises[d][0]}
            # the vanilla RM's accuracy on d's held-out labelled pairs
            premises[d]["acc_behaviour_pairs"] = metrics["vanilla_rm"][d]["rm_accuracy"]
    progress.close()
    return metrics, premises, samples, adapted


def reused_runs(cfg: Config) -> dict:
    """control -> the method whose adaptation it copies, because its reward model is that method's: the table's
    reuses (metarm_eta0), and bilevel_bt_only when lam = 0 (train_reward_models)."""
    reused = {m: row.reuses for m, row in METHODS.items() if row.reuses}
    if cfg.lam == 0:
        reused["bilevel_bt_only"] = "vanilla_rm"
    return reused


# ==== The command line and the output folder ====================================================
def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def parse_config(argv) -> Config:
    """The CLI is derived from Config; every value is checked before anything runs."""
    given = parse(Config, argv, __doc__.splitlines()[0])
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
            cfg.first_seed + cfg.seeds <= 1000,
            "--first-seed + --seeds must be <= 1000 (a seed >= 10 owns the streams 1000 * seed + k, k < 1000)",
        ),
        (
            all(positive(x) for x in rates),
            "--beta, --adapt-lr, --rm-lr, --outer-lr, --dpo-lr, --beta-dpo, --outer-beta-dpo and --temperature "
            "must be finite numbers > 0",
        ),
        (math.isfinite(cfg.eta) and cfg.eta >= 0, "--eta must be a finite number >= 0"),
        (math.isfinite(cfg.lam) and cfg.lam >= 0, "--lam must be a finite number >= 0"),
        (
            math.isfinite(cfg.rho_factor) and cfg.rho_factor > 1,
            "--rho-factor must be a finite number > 1 (rho must exceed -lambda_min)",
        ),
        (cfg.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
        (cfg.domains in ("test", "dev"), "--domains must be test or dev"),
        (cfg.solver in ("cg", "neumann", "unrolled"), "--solver must be cg, neumann or unrolled"),
        (cfg.outer_data in ("train", "own"), "--outer-data must be train or own"),
        (
            cfg.outer_data == "train" or not cfg.figures,
            "--outer-data own is the positive control of the main table, not of the figures: add --figures 0",
        ),
        (
            cfg.outer_data == "own" or not {"bilevel_swapped", "bilevel_gold"} & set(methods),
            "--methods bilevel_swapped and bilevel_gold are METHOD.md §5.4's diagnostics of the own-data run: add "
            "--outer-data own",
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


@contextmanager
def stage(method: str, seed: int):
    """Name the method and seed in a non-finite-value error raised inside (the step is named by metarm)."""
    try:
        yield
    except FloatingPointError as e:
        raise FloatingPointError(f"{method}, seed {seed}: {e}") from None


@contextmanager
def run_phase(name: str, seed: int, total: int, show: bool, timings: dict, key: str | None = None):
    """One phase of a seed: its wall time added to timings[key or name], a non-finite value raised inside named with
    the phase and the seed (stage), and, yielded, a progress bar of `total` steps for its loop to show numbers in."""
    with clock(timings, key or name), stage(name, seed), bar(f"{key or name}, seed {seed}", total, show) as progress:
        yield progress


def log_rows(seed: int, seed_logs: dict, adapted: list) -> list:
    """logs.jsonl's rows of one seed: every step of the training loops whose numbers the progress bars showed (the
    phase, the seed, the step and the loop's own numbers), and each meta-test adaptation's last step."""
    rows = []
    for phase in ("vanilla_rm", "vanilla_rm_long", "bilevel", "hypergradient_accuracy", "bilevel_bt_only", "dpo"):
        for step, entry in enumerate(seed_logs.get(phase, [])):
            rows.append({"phase": phase, "seed": seed, "step": step, **entry})
    for d, log in seed_logs.get("in_domain_rm", {}).items():
        rows += [{"phase": "in_domain_rm", "seed": seed, "domain": d, "step": i, **e} for i, e in enumerate(log)]
    return rows + [{"phase": "adaptation", "seed": seed, **entry} for entry in adapted]


def write_datasets(world, tmp: Path):
    data.save_pairs_jsonl(world, world.pooled_pairs(data.TRAIN_DOMAINS), tmp / "train_pairs.jsonl")
    data.save_pairs_jsonl(world, world.pooled_pairs(data.DEV_DOMAINS), tmp / "dev_pairs.jsonl")
    data.save_pairs_jsonl(world, [p for d in data.DOMAINS for p in world.eval_pairs[d]], tmp / "eval_pairs.jsonl")


def write_outputs(tmp: Path, results: dict, samples: list, rows: list, prereg: dict):
    write_json(tmp / "results.json", results)
    (tmp / "results.md").write_text(plots.results_markdown(results))
    for name, lines in (("samples.jsonl", samples), ("logs.jsonl", rows)):
        with open(tmp / name, "w") as f:
            for row in lines:
                f.write(json.dumps(row) + "\n")
    plots.make_all(results, tmp, prereg)


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        out = Path(cfg.out).resolve()
        tmp = prepare_out(out, "results.json")
    except BadInput as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        started, t0 = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), time.perf_counter()
        results = run(cfg, tmp)
        command = shlex.join(["python", "train.py", *(sys.argv[1:] if argv is None else argv)])
        seconds = time.perf_counter() - t0
        write_json(tmp / "provenance.json", provenance(command, started, seconds, pick_device(cfg)))
        publish(tmp, out)
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
