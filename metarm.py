"""The losses, the meta-test and both methods, Eqs. (1)-(11) of METHOD.md, in the papers' order.

1. Shared losses and the meta-test, Eqs. (1)-(3): Bradley-Terry, DPO, KL-regularised policy optimisation.
2. The bilevel meta-learned reward model, Eqs. (4)-(8): Jia, "Generalizing Reward Modeling for
   Out-of-Distribution Preference Learning" (arXiv 2402.14760). Its public text does not give its objectives:
   (4), (5) and (7) are this project's formalisation of the bilevel structure it states.
3. MetaRM, Eqs. (9)-(11), and its rounds: Dou et al., "MetaRM: Shifted Distributions Alignment via
   Meta-Learning" (arXiv 2405.00438; the arXiv v1 numbering: (9)-(11) here are its Eqs. (2)-(5)).

Each function that computes an equation names METHOD.md's number and the paper's.

Symbols -> names:
    beta        KL coefficient of (3), of the inner problem (5) and of meta-test adaptation
    beta_dpo    temperature of the DPO loss (2), also inside the outer objective (7)
    theta       the policy's adapted parameters (its output head); theta_ref = pi_ref's
    rm, phi     the reward model (policy.RewardModel) and its parameters, a dict (all of them)
    Delta       log pi_theta(y|x) - log pi_ref(y|x), the policy's implicit reward (up to beta)
    K, T, rho   candidates per prompt, inner steps, proximal weight of the inner problem (5)
    lam         weight of the Bradley-Terry term of the outer objective (7)
    eta, k      MetaRM's ascent step (10) and responses per shifted prompt (9)
A batch is policy.encode's dict (tokens, mask, pi_ref's features); a reward function maps a batch to (B,).
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bilevel
import policy
from policy import apply_gradient, check_finite


# ==== 1. Shared losses and the meta-test, Eqs. (1)-(3) ==========================================
def tie_accuracy(margins, gold_margins=None):
    """Share of pairs ranked right, a tie counting 1/2; margins r(y_w) - r(y_l) (B,). With gold_margins,
    "right" means the gold order, and the pairs gold ties are left out (NaN if that is all of them)."""
    if gold_margins is None:
        return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean()
    keep = gold_margins != 0
    return ((margins * gold_margins > 0).float() + 0.5 * (margins == 0).float())[keep].mean()


def bt_loss(r_chosen, r_rejected):
    """Eq. (1); Dou et al. Eq. (1): L_BT = -E log sigmoid(r(x, y_w) - r(x, y_l)).
    Returns (loss, accuracy, margins (B,))."""
    margins = r_chosen - r_rejected
    return -F.logsigmoid(margins).mean(), tie_accuracy(margins), margins


def dpo_loss(delta_chosen, delta_rejected, beta_dpo: float):
    """Eq. (2); Rafailov et al. (arXiv 2305.18290) Eq. (7):
    L_DPO = -E log sigmoid(beta_dpo [Delta(x, y_w) - Delta(x, y_l)]), as bt_loss returns it."""
    return bt_loss(beta_dpo * delta_chosen, beta_dpo * delta_rejected)


def implicit_reward(model, theta: dict, batch: dict):
    """Delta_theta(x, y) = log pi_theta(y|x) - log pi_ref(y|x), (B,), with the graph to theta."""
    return policy.logprob(model, theta, batch) - batch["logp_ref"]


def kl_estimates(logp, logp_ref):
    """Per-sample estimators of KL(pi_theta || pi_ref) from y ~ pi_theta: k1 = Delta (unbiased, used in
    the loss) and k3 = e^{-Delta} - 1 + Delta (unbiased, >= 0, logged only)."""
    delta = logp - logp_ref
    return delta, torch.expm1(-delta) + delta


def standardised(reward_fn, ref_batch: dict):
    """The reward scale of §1: r -> (r - mean) / std over pi_ref's samples `ref_batch` of the prompts."""
    with torch.no_grad():
        r = reward_fn(ref_batch)
    mean, std = r.mean(), r.std().clamp_min(1e-6)

    def standardised_reward(batch):
        return (reward_fn(batch) - mean) / std

    return standardised_reward


@dataclass
class RMConfig:
    steps: int = 400  # Bradley-Terry steps (1) of the vanilla RM
    batch_size: int = 32  # pairs per step
    lr: float = 1e-3  # Adam on phi


@dataclass
class AdaptConfig:
    beta: float = 0.5  # KL coefficient beta of Eq. (3)
    steps: int = 25  # policy-gradient steps
    prompts_per_step: int = 16
    samples: int = 4  # responses per prompt (RLOO needs >= 2)
    lr: float = 1e-2  # Adam on theta
    max_new_tokens: int = 16


def adapt(model, prompts, reward_fn, cfg: AdaptConfig, generator, theta0: dict | None = None):
    """Eq. (3), the meta-test of both papers (Jia: regularised policy optimisation; Dou et al.: PPO), by on-policy RLOO
    with the sequence-level k1 penalty r - beta Delta_theta: each step samples cfg.samples responses per prompt of
    pi_theta (temperature 1, no top-k); a sample's baseline is the mean penalised reward of its prompt's other samples.
    reward_fn(batch) -> (B,), standardised by the caller; theta0: start there instead of at theta_ref. Returns (theta,
    per-step reward, kl_k1, kl_k3)."""
    theta = policy.adapted_params(model) if theta0 is None else policy.copy_params(theta0)
    opt = torch.optim.Adam(theta.values(), lr=cfg.lr)
    log, n = [], cfg.samples
    for step in range(cfg.steps):
        rows = torch.tensor(policy.draw(len(prompts), cfg.prompts_per_step, generator), device=prompts.device)
        batch = policy.sample(model, theta, prompts[rows].repeat_interleave(n, dim=0), cfg.max_new_tokens, generator)
        logp = policy.logprob(model, theta, batch)
        with torch.no_grad():
            r = reward_fn(batch)
            k1, k3 = kl_estimates(logp, batch["logp_ref"])
            R = (r - cfg.beta * k1).view(-1, n)  # (B, n) penalised reward
            baseline = (R.sum(1, keepdim=True) - R) / (n - 1)  # leave-one-out
            A = (R - baseline).view(-1)
        loss = -(A * logp).mean()
        check_finite(loss.detach(), "adaptation loss (3)", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append({"reward": r.mean().item(), "kl_k1": k1.mean().item(), "kl_k3": k3.mean().item()})
    return {n_: p.detach() for n_, p in theta.items()}, log


def rm_bt_loss(rm, phi: dict, chosen: dict, rejected: dict):
    """Eq. (1); Dou et al. Eq. (1), for the reward model r_phi on encoded pair batches: (loss, accuracy, margins)."""
    return bt_loss(policy.reward(rm, phi, chosen), policy.reward(rm, phi, rejected))


def train_reward_model(
    rm, phi: dict, pairs, cfg: RMConfig, generator, opt=None, steps: int | None = None, progress=None
):
    """Eq. (1) (Dou et al. Eq. (1); the vanilla RM's loss in both papers) minimised by Adam on phi, in place: cfg.steps
    steps (or `steps`) on batches of cfg.batch_size pairs drawn from pairs = (chosen, rejected); opt continues an
    earlier run's optimiser; progress: a tqdm bar that shows each step's loss (None: nothing shown). Returns (per-step
    loss and accuracy, the optimiser)."""
    opt = opt or torch.optim.Adam(phi.values(), lr=cfg.lr)
    chosen, rejected = pairs
    log = []
    for step in range(cfg.steps if steps is None else steps):
        rows = policy.draw(len(chosen["idx"]), cfg.batch_size, generator)
        loss, acc, _ = rm_bt_loss(rm, phi, policy.rows_of(chosen, rows), policy.rows_of(rejected, rows))
        check_finite(loss.detach(), "reward-model loss (1)", step)
        apply_gradient(opt, phi, torch.autograd.grad(loss, list(phi.values())))
        log.append({"loss": loss.item(), "acc": acc.item()})
        policy.show(progress, log[-1])
    return log, opt


# ==== 2. The bilevel meta-learned reward model (Jia), Eqs. (4)-(8) ===============================
def importance_weights(delta, K: int):
    """Eq. (4); Jia, meta-training's lower level (this project's formalisation): w_k(theta; x) = softmax_k
    Delta_theta(x, y_k), (B, K); w = 1/K at theta = theta_ref."""
    return torch.softmax(delta.view(-1, K), dim=-1)


def inner_objective(delta, r, K: int, beta: float):
    """Eq. (5) without its proximal term (Jia's lower level, this project's formalisation): E_x[-sum_k w_k r_k + beta
    sum_k w_k log(K w_k)], w = Eq. (4), with log w = log_softmax (finite where a weight underflows). Over free weights
    the minimiser is w* = softmax_k(r_k / beta). Args: delta (B K,), r (B, K)."""
    log_w = torch.log_softmax(delta.view(-1, K), dim=-1)
    w = log_w.exp()
    kl = (w * (log_w + math.log(K))).sum(-1)  # KL(w || uniform) <= log K
    return (-(w * r).sum(-1) + beta * kl).mean()


def inner_loss(model, theta, r, cand, K: int, beta: float, rho: float, theta_ref):
    """Eq. (5); Jia, the lower level (this project's formalisation): g_d(theta, phi) = inner_objective + rho/2 |theta -
    theta_ref|^2; r (B, K): the rewards r_phi(x, y_k) of the candidates (phi enters g only through them), cand: their
    encoded batch."""
    prox = sum(((theta[n] - theta_ref[n]) ** 2).sum() for n in theta)
    return inner_objective(implicit_reward(model, theta, cand), r, K, beta) + 0.5 * rho * prox


def outer_dpo(model, theta, chosen: dict, rejected: dict, beta_dpo: float):
    """Eq. (7), one domain's term (Jia, the upper level; this project's formalisation): L_DPO(theta; P_d) on encoded
    chosen / rejected batches."""
    return dpo_loss(implicit_reward(model, theta, chosen), implicit_reward(model, theta, rejected), beta_dpo)[0]


@dataclass
class BilevelConfig:
    beta: float = 0.5  # KL coefficient of the inner problem (5), as at meta-test
    beta_dpo: float = 0.1  # DPO temperature in the outer objective (7), chosen on dev (README)
    lam: float = 0.3  # weight of L_BT in (7)
    K: int = 4  # candidates per prompt
    prompts_per_domain: int = 8  # prompts of a domain whose candidates are drawn at each outer step
    T: int = 10  # inner gradient steps (6), warm-started from the domain's last theta*
    inner_lr: float = 0.0  # set with rho by calibrate, from the curvature at theta* (§2.1)
    rho: float = 0.0  # proximal weight of (5)
    solver: str = "cg"  # cg | neumann | unrolled
    cg_iters: int = 10
    cg_tol: float = 1e-3  # relative residual
    outer_steps: int = 40
    domains_per_step: int = 2
    pairs_per_domain: int = 32
    lr: float = 1e-3  # Adam on phi
    recalibrate_every: int = 20  # outer steps between curvature checks at theta* (0: never)
    rho_factor: float = 1.5  # rho = rho_factor (-lambda_min)_+ at theta* (rho_from; > 1; METHOD.md §5.4 M4: 1.1)
    max_new_tokens: int = 16


def candidate_rewards(rm, phi: dict, cand: dict, K: int):
    """r_phi(x, y_k) (B, K), standardised over the candidates (standardised_candidates); the graph to phi is kept."""
    return standardised_candidates(policy.reward(rm, phi, cand), K)


def standardised_candidates(r, K: int):
    """Candidates' rewards r (B K,) -> (B, K), standardised over all of them as rewards are at meta-test (§1), so
    that beta means the same in (5) as in (3)."""
    return ((r - r.mean()) / r.std().clamp_min(1e-8)).view(-1, K)


def level_functions(model, prob: dict, cfg: BilevelConfig, theta_ref):
    """One domain's g = Eq. (5) and f = its L_DPO term of Eq. (7) -- Jia's lower and upper levels, this project's
    formalisation -- as functions (theta, {"r": rewards}). A problem with a "gold" entry (the candidates' gold rewards,
    (B K,)) has instead f = -E_x sum_k w_k(theta) gold_k, the gold value of the inner policy on its own candidates:
    not the paper's, the capacity diagnostic of METHOD.md §5.4 (the path given perfect information)."""

    def g(theta, outer):
        return inner_loss(model, theta, outer["r"], prob["cand"], cfg.K, cfg.beta, cfg.rho, theta_ref)

    def f(theta, outer):
        if "gold" in prob:
            w = importance_weights(implicit_reward(model, theta, prob["cand"]), cfg.K)
            return -(w * prob["gold"].view(-1, cfg.K)).sum(-1).mean()
        return outer_dpo(model, theta, prob["chosen"], prob["rejected"], cfg.beta_dpo)

    return g, f


def hypergradient(model, rm, phi, prob: dict, cfg: BilevelConfig, theta_ref, theta0=None):
    """Eq. (8) for one domain (Jia: the hypergradient of the upper level; by the implicit function theorem here,
    this project's choice): (dF_d/dr (B, K), the candidates' rewards r with graph to phi, info). phi enters g only
    through r = r_phi(x, y_k): bilevel.py differentiates with respect to r, one backward pass through the RM
    carries it to phi. theta0: start of the cfg.T inner steps (6) (default theta_ref). cfg.solver: cg | neumann
    (cfg.cg_iters iterations, Neumann's step the inner step) | unrolled (through the T steps)."""
    r = candidate_rewards(rm, phi, prob["cand"], cfg.K)
    outer = {"r": r.detach()}
    g, f = level_functions(model, prob, cfg, theta_ref)
    start = theta_ref if theta0 is None else theta0
    if cfg.solver == "unrolled":
        grad, info = bilevel.hypergrad_unrolled(f, g, start, outer, cfg.T, cfg.inner_lr)
    else:
        theta_star, _ = bilevel.inner_solve(g, start, outer, cfg.T, cfg.inner_lr)
        if cfg.solver == "cg":
            kw = dict(max_iter=cfg.cg_iters, tol=cfg.cg_tol)
        else:
            kw = dict(alpha=cfg.inner_lr, J=cfg.cg_iters)
        grad, info = bilevel.hypergrad_implicit(f, g, theta_star, outer, solver=cfg.solver, **kw)
        info["theta"] = theta_star
    info["F"] = f(info["theta"], outer).item()
    return grad["r"], r, info


def curvature(model, theta, r, cand, cfg: BilevelConfig, theta_ref, iters: int = 20):
    """(lambda_min, lambda_max) of grad^2_theta g_d with rho = 0, at theta, by Lanczos with HVPs (§2.1)."""

    def g0(theta):
        return inner_loss(model, theta, r, cand, cfg.K, cfg.beta, 0.0, theta_ref)

    def hessian_times(v):
        return bilevel.hvp(g0, theta, v)

    lo, hi, _ = bilevel.lanczos_eigs(hessian_times, lanczos_start(theta), iters)
    return lo, hi


def lanczos_start(theta: dict) -> dict:
    """Lanczos' start vector for the curvature of (5): N(0, 1) per parameter, each from a generator seeded 0, so that
    every measurement of the same problem starts alike."""
    v0 = {}
    for n, p in theta.items():
        v0[n] = torch.randn(p.shape, generator=policy.generator(0, p.device), device=p.device, dtype=p.dtype)
    return v0


def set_rho(cfg: BilevelConfig, eigs: list):
    """§2.1's choice from (lambda_min, lambda_max) pairs: rho the largest rho_from over them, the inner step
    1 / (the largest lambda_max + rho)."""
    cfg.rho = max(rho_from(lo, hi, cfg.rho_factor) for lo, hi in eigs)
    cfg.inner_lr = 1.0 / (max(hi for _, hi in eigs) + cfg.rho)


def raise_rho(cfg: BilevelConfig, lam_min: float, lam_max: float):
    """§2.1's re-check rule: where lambda_min + rho < rho / 2, rho is raised to rho_from(lambda_min, lambda_max)
    (never lowered) and the inner step follows (never raised)."""
    if lam_min + cfg.rho < 0.5 * cfg.rho:
        cfg.rho = max(cfg.rho, rho_from(lam_min, lam_max, cfg.rho_factor))
        cfg.inner_lr = min(cfg.inner_lr, 1.0 / (lam_max + cfg.rho))


def rho_from(lam_min: float, lam_max: float, factor: float = 1.5) -> float:
    """§2.1: rho = max(factor (-lambda_min)_+, 0.01 lambda_max), above -lambda_min for any factor > 1 (local strong
    convexity) and a condition number of at most ~100; factor 1.5 by default (BilevelConfig.rho_factor)."""
    return max(factor * max(0.0, -lam_min), 0.01 * lam_max)


def calibrate(model, rm, phi, problems: dict, cfg: BilevelConfig, theta_ref, rounds: int = 3) -> dict:
    """Set cfg.rho and cfg.inner_lr from the curvature at theta* (§2.1), worst case over `problems`, by a
    fixed point: curvature at theta_ref -> rho -> solve -> curvature at theta* -> rho ... (rounds times)."""
    r = {d: candidate_rewards(rm, phi, p["cand"], cfg.K).detach() for d, p in problems.items()}
    eigs = [curvature(model, theta_ref, r[d], p["cand"], cfg, theta_ref) for d, p in problems.items()]
    for _ in range(rounds):
        set_rho(cfg, eigs)
        eigs = []
        for d, p in problems.items():
            g, _ = level_functions(model, p, cfg, theta_ref)
            theta_star, _ = bilevel.inner_solve(g, theta_ref, {"r": r[d]}, 4 * cfg.T, cfg.inner_lr)
            eigs.append(curvature(model, theta_star, r[d], p["cand"], cfg, theta_ref))
    lam_min, lam_max = min(lo for lo, _ in eigs), max(hi for _, hi in eigs)
    return {
        "at": "theta*",
        "lambda_min": lam_min,
        "lambda_max": lam_max,
        "rho": cfg.rho,
        "inner_lr": cfg.inner_lr,
        "margin": lam_min + cfg.rho,
    }


def recheck_rho(model, rm, phi, problems: dict, warm: dict, cfg: BilevelConfig, theta_ref) -> float:
    """§2.1 during the run: lambda_min + rho at the drawn domains' current theta*; below rho / 2, rho is
    raised to rho_from(lambda_min, lambda_max) and the inner step follows. Returns lambda_min + rho."""
    eigs = [
        curvature(model, warm[d], candidate_rewards(rm, phi, p["cand"], cfg.K).detach(), p["cand"], cfg, theta_ref)
        for d, p in problems.items()
    ]
    lam_min, lam_max = min(lo for lo, _ in eigs), max(hi for _, hi in eigs)
    raise_rho(cfg, lam_min, lam_max)
    return lam_min + cfg.rho


def outer_gradient(model, rm, phi, problems: dict, pairs, cfg: BilevelConfig, theta_ref, n_domains=None, warm=None):
    """Eqs. (7)(8); Jia, the upper level's gradient (this project's formalisation): grad_phi F for
    F(phi) = (N/n) sum_{d drawn} L_DPO(theta*_d(phi); P_d) + lam L_BT(phi; pairs). problems: n domains drawn from
    the N = n_domains of D_train (default n = N); N/n makes their sum unbiased. warm: domain -> start of its inner
    solve, updated to the new theta*. Returns (gradients in phi's order, F, info: HVPs, per-domain DPO terms)."""
    surrogate, F_value, info = 0.0, 0.0, {"hvps": 0, "dpo": {}, "unconverged": 0}
    scale = (n_domains or len(problems)) / max(1, len(problems))
    for d, prob in problems.items():
        theta0 = None if warm is None else warm.get(d)
        dF_dr, r, h_info = hypergradient(model, rm, phi, prob, cfg, theta_ref, theta0=theta0)
        if warm is not None:
            warm[d] = h_info["theta"]
        surrogate = surrogate + scale * (r * dF_dr).sum()  # its phi-gradient is (dr/dphi)^T dF/dr
        F_value += scale * h_info["F"]
        info["hvps"] += h_info["hvps"]
        info["unconverged"] += h_info.get("converged") is False
        info["dpo"][d] = h_info["F"]
    if cfg.lam > 0:
        bt = rm_bt_loss(rm, phi, *pairs)[0]
        surrogate, F_value = surrogate + cfg.lam * bt, F_value + cfg.lam * bt.item()
    return list(torch.autograd.grad(surrogate, list(phi.values()))), F_value, info


def draw_problem(model, prompts, pairs, cfg: BilevelConfig, generator) -> dict:
    """One domain's data for one outer step (§2.1): cfg.prompts_per_domain prompts of F_d with K fresh
    candidates each from pi_ref, and cfg.pairs_per_domain pairs drawn from all of P_d."""
    rows = torch.tensor(policy.draw(len(prompts), cfg.prompts_per_domain, generator), device=prompts.device)
    cand = policy.sample(model, {}, prompts[rows].repeat_interleave(cfg.K, dim=0), cfg.max_new_tokens, generator)
    chosen, rejected = pairs
    picks = policy.draw(len(chosen["idx"]), cfg.pairs_per_domain, generator)
    return {"cand": cand, "chosen": policy.rows_of(chosen, picks), "rejected": policy.rows_of(rejected, picks)}


def draw_outer_batch(model, domains: dict, bt_pairs, cfg: BilevelConfig, generator, bt_generator):
    """One outer step's data: cfg.pairs_per_domain pooled pairs for (7)'s lam term (from bt_generator), then
    cfg.domains_per_step of the domains and each one's problem (draw_problem, from generator). Two generators, so
    that the lam term's pairs are the same whatever the domains draw. A domain given as (prompts, pairs, gold) with
    gold a function of an encoded batch gets its candidates' gold rewards in the problem (level_functions: the
    diagnostic of METHOD.md §5.4; the draws are the same). Returns (problems, lam_pairs)."""
    chosen, rejected = bt_pairs
    rows = policy.draw(len(chosen["idx"]), cfg.pairs_per_domain, bt_generator)
    lam_pairs = (policy.rows_of(chosen, rows), policy.rows_of(rejected, rows))
    names = list(domains)
    picks = torch.randperm(len(names), generator=generator, device=generator.device)[: cfg.domains_per_step]
    problems = {}
    for i in picks.tolist():
        prompts, pairs, *gold = domains[names[i]]
        problems[names[i]] = draw_problem(model, prompts, pairs, cfg, generator)
        if gold:
            problems[names[i]]["gold"] = gold[0](problems[names[i]]["cand"])
    return problems, lam_pairs


def train_bilevel(
    model,
    rm,
    phi,
    domains: dict,
    bt_pairs,
    cfg: BilevelConfig,
    theta_ref,
    generator,
    bt_generator,
    steps: int | None = None,
    state: dict | None = None,
    progress=None,
):
    """Eqs. (6)-(8); Jia, meta-training: Adam on phi, in place, along the hypergradient of F. domains: d ->
    (prompts F_d, encoded P_d) of (5) and of (7)'s DPO term; with no domain, F is lam L_BT alone. Each outer step
    draws its data by draw_outer_batch; each inner solve starts from the domain's last theta*; rho is re-checked at
    every cfg.recalibrate_every-th step. state: where an earlier call stopped ({"step", "warm": domain -> its last
    theta*, "opt": Adam on phi}), so that a run can be taken in parts with the same result. steps: how many to
    take (default: up to cfg.outer_steps). Returns (the log, the state); the log has per step F, grad_norm, hvps,
    unconverged, dpo (each drawn domain's L_DPO term) and, at a re-check, margin. Solves that stop at cg_iters
    above cg_tol are expected (the tolerance is loose by design) and counted per step, not warned about. progress:
    a tqdm bar that shows each step's F, |grad F| and HVPs (None: nothing shown)."""
    if domains and cfg.inner_lr <= 0:
        raise ValueError("BilevelConfig.inner_lr must be > 0: set it (and rho) with metarm.calibrate (§2.1)")
    if not domains and cfg.lam == 0:
        raise ValueError("no domains and lam = 0: F is 0 and phi would not move (use the vanilla RM)")
    if state is None:
        state = {"step": 0, "warm": {}, "opt": torch.optim.Adam(phi.values(), lr=cfg.lr)}
    first = state["step"]
    last = cfg.outer_steps if steps is None else first + steps
    log, warm = [], state["warm"]
    for step in range(first, last):
        problems, lam_pairs = draw_outer_batch(model, domains, bt_pairs, cfg, generator, bt_generator)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="cg did not converge")
            try:
                grads, F_value, info = outer_gradient(
                    model, rm, phi, problems, lam_pairs, cfg, theta_ref, n_domains=len(domains), warm=warm
                )
            except FloatingPointError as e:  # a solve that diverged: name the step
                raise FloatingPointError(f"{e} at step {step}") from None
        check_finite(torch.tensor([F_value] + [g.norm() for g in grads]), "bilevel F or hypergradient", step)
        apply_gradient(state["opt"], phi, grads)
        entry = {"F": F_value, "grad_norm": torch.sqrt(sum((g**2).sum() for g in grads)).item(), **info}
        if problems and cfg.recalibrate_every and step % cfg.recalibrate_every == 0:
            entry["margin"] = recheck_rho(model, rm, phi, problems, warm, cfg, theta_ref)
        log.append(entry)
        policy.show(progress, {"F": entry["F"], "grad_norm": entry["grad_norm"], "hvps": entry["hvps"]})
    state["step"] = last
    return log, state


# ==== 3. MetaRM (Dou et al.), Eqs. (9)-(11), and its rounds ======================================
def distinct_pairs(idx, k: int):
    """(B, k(k-1)/2) bool: which response pairs (i < j) of each prompt differ (duplicates dropped)."""
    seqs = idx.view(-1, k, idx.shape[1])
    i, j = torch.triu_indices(k, k, 1)
    return (seqs[:, i] != seqs[:, j]).any(-1)


def difference_loss(r, k: int, distinct):
    """Eq. (9); Dou et al. Eq. (2): J = E_x (2/k^2) sum_{i<j} sigmoid(|r(x, s_i) - r(x, s_j)|) over the distinct pairs,
    the mean over the batch's prompts (a sum would rescale eta). r (B k,), distinct (B, k(k-1)/2)."""
    r = r.view(-1, k)
    i, j = torch.triu_indices(k, k, 1)
    terms = torch.sigmoid((r[:, i] - r[:, j]).abs()) * distinct
    return (2.0 / k**2) * terms.sum(1).mean()


def metarm_grad(rm, phi, chosen, rejected, meta, distinct, k: int, eta: float, second_order: bool = False):
    """Eqs. (10)(11); Dou et al. Eqs. (3)-(5): the gradient of phi -> L_BT(phi'), phi' = phi + eta grad J(phi; X_s);
    second_order=False (default): the gradient taken at phi', applied to phi -- the authors' update; True: the exact
    (I + eta grad^2 J(phi)) g, g = grad L_BT(phi'), one HVP. chosen, rejected: X_t; meta: X_s, k responses
    per shifted prompt (prompt-major). Returns (gradient, L_BT(phi'), J(phi))."""
    phi = {n: p.detach().requires_grad_(True) for n, p in phi.items()}

    def J_fn(params):
        return difference_loss(policy.reward(rm, params, meta), k, distinct)

    J = J_fn(phi)
    gJ = torch.autograd.grad(J, list(phi.values()))
    # Eq. (10); Dou et al. Eq. (3): gradient *ascent* on the difference loss
    phi_prime = {n: (p + eta * gj).detach().requires_grad_(True) for (n, p), gj in zip(phi.items(), gJ)}
    loss = rm_bt_loss(rm, phi_prime, chosen, rejected)[0]
    g = dict(zip(phi, torch.autograd.grad(loss, list(phi_prime.values()))))
    if second_order and eta != 0.0:
        # Eq. (11) by the exact chain rule through (10) (Dou et al. take the first-order update):
        # grad_phi L_BT(phi') = (I + eta grad^2 J(phi)) grad L_BT(phi')
        Hg = bilevel.hvp(J_fn, phi, g)
        g = {n: g[n] + eta * Hg[n] for n in g}
    return g, loss.detach(), J.detach()


@dataclass
class MetaRMConfig:
    eta: float = 0.1  # ascent step (10)
    k: int = 5  # responses per shifted prompt (the paper's k = 5)
    meta_prompts: int = 8  # shifted prompts per step
    temperature: float = 1.2  # sampling temperature of the shifted set ("a bit higher")
    steps: int = 40  # RM updates per round
    batch_size: int = 32  # pairs X_t per step
    rounds: int = 2  # rounds of [adapt -> sample -> update]; the last round's policy counts
    second_order: bool = False


def train_metarm(rm, phi, opt, pairs, meta, cfg: MetaRMConfig, generator, meta_generator):
    """Eqs. (9)-(11); Dou et al.'s loop (their Eqs. (2)-(5)), cfg.steps times: draw X_t (from `generator`) and shifted
    prompts X_s (from `meta_generator`, so that eta = 0 draws the same X_t), ascend on J, take the Bradley-Terry
    gradient at phi' and step phi with it (opt: Adam, its state carried over from the vanilla RM)."""
    chosen, rejected = pairs
    distinct = distinct_pairs(meta["idx"], cfg.k)
    n_prompts = len(distinct)
    log = []
    for step in range(cfg.steps):
        rows = policy.draw(len(chosen["idx"]), cfg.batch_size, generator)
        m = torch.tensor(policy.draw(n_prompts, cfg.meta_prompts, meta_generator), device=distinct.device)
        meta_rows = (m[:, None] * cfg.k + torch.arange(cfg.k, device=m.device)).flatten()
        g, loss, J = metarm_grad(
            rm,
            phi,
            policy.rows_of(chosen, rows),
            policy.rows_of(rejected, rows),
            policy.rows_of(meta, meta_rows),
            distinct[m],
            cfg.k,
            cfg.eta,
            cfg.second_order,
        )
        check_finite(loss, "MetaRM loss (11)", step)
        apply_gradient(opt, phi, list(g.values()))
        log.append({"loss": loss.item(), "J": J.item()})
    return log


def reward_spread(r, k: int) -> float:
    """§3's diagnostic (Dou et al.: the variance of within-prompt reward differences shrinks in PPO): the std of
    r(x, s_i) - r(x, s_j) over the pairs of responses to the same prompt, divided by the reward std on the same
    samples (ascent on J inflates the scale)."""
    r = r.view(-1, k)
    i, j = torch.triu_indices(k, k, 1)
    return ((r[:, i] - r[:, j]).std() / r.std().clamp_min(1e-8)).item()


def sample_meta_set(model, theta: dict, prompts, cfg: MetaRMConfig, max_new_tokens: int, generator) -> dict:
    """X_s of (9) (Dou et al.: the previous round's policy, k responses per prompt, a raised temperature): cfg.k
    samples of pi_theta per prompt at cfg.temperature, prompt-major (row i k + j: prompt i's j-th response)."""
    k_each = prompts.repeat_interleave(cfg.k, dim=0)
    return policy.sample(model, theta, k_each, max_new_tokens, generator, temperature=cfg.temperature)


def metarm_rounds(
    model,
    prompts,
    ref_batch,
    rm,
    phi,
    opt,
    pairs,
    cfg: MetaRMConfig,
    adapt_cfg: AdaptConfig,
    adapt_seed: int,
    sample_generator,
    pair_generator,
    meta_generator,
    theta_first=None,
):
    """MetaRM out of distribution (§3; Dou et al.'s OOD setting: the meta set sampled on the OOD domain's prompts),
    on one domain: cfg.rounds rounds of [adapt (3) from theta_ref with the current RM -> sample the policy at
    cfg.temperature, k per prompt -> MetaRM update (train_metarm) on the training pairs with those samples as X_s];
    the last round stops after its adaptation, whose policy counts. ref_batch: pi_ref's samples, the reward scale of
    §1. phi, opt: the reward model and its optimiser, updated in place. Every round's adaptation draws from a
    generator seeded with adapt_seed (the same draws each round); sample_generator draws X_s; pair_generator and
    meta_generator are train_metarm's. theta_first: round 1's policy, when it is already known (adapted with the
    same RM and adapt_seed). Returns (theta, the shifted set X_s of each update round)."""

    def reward_fn(batch):
        return policy.reward(rm, phi, batch)

    meta_sets = []
    for t in range(cfg.rounds):
        if t == 0 and theta_first is not None:
            theta = theta_first
        else:
            adapt_gen = policy.generator(adapt_seed, prompts.device)
            theta = adapt(model, prompts, standardised(reward_fn, ref_batch), adapt_cfg, adapt_gen)[0]
        if t == cfg.rounds - 1:
            return theta, meta_sets
        meta = sample_meta_set(model, theta, prompts, cfg, adapt_cfg.max_new_tokens, sample_generator)
        train_metarm(rm, phi, opt, pairs, meta, cfg, pair_generator, meta_generator)
        meta_sets.append(meta)
