"""The losses and both methods: Eqs. (1)-(11) of METHOD.md.

Bilevel meta-learned reward model: Jia, "Generalizing Reward Modeling for Out-of-Distribution
Preference Learning" (arXiv 2402.14760). MetaRM: Dou et al., "MetaRM: Shifted Distributions
Alignment via Meta-Learning" (arXiv 2405.00438).

Symbols -> names:
    beta        KL coefficient of Eq. (3), of the lower level (5) and of meta-test adaptation
    beta_dpo    temperature of the DPO loss (2), also inside the upper level (7)
    theta       the policy's adapted parameters (the output head by default); theta_ref = pi_ref's
    phi         the reward model's trained parameters (all of them by default)
    K, T, rho   candidates per prompt, inner steps, proximal weight of the lower level (5)
    lam         weight of the Bradley-Terry term in the upper level (7)
    eta, k      MetaRM's ascent step (10) and responses per shifted prompt (9)
    r           rewards, Delta = log pi_theta - log pi_ref (the policy's implicit reward, up to beta)
"""
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bilevel
import policy as P


def check_finite(value, what: str, step: int):
    """Stop a training loop at the first non-finite loss or gradient, naming it and the step."""
    if not torch.isfinite(torch.as_tensor(value)).all():
        raise FloatingPointError(f"non-finite {what} at step {step}")


# ---- Eq. (1) and Eq. (2): the baseline losses ------------------------------------------------------
def bt_loss(r_chosen, r_rejected):
    """Eq. (1): L_BT = -E log sigmoid(r(x, y_w) - r(x, y_l)).

    Args: rewards of the chosen and rejected responses, (B,) each.
    Returns: (loss, accuracy with a tie counting 1/2, margins r_w - r_l (B,)).
    """
    margins = r_chosen - r_rejected
    acc = ((margins > 0).float() + 0.5 * (margins == 0).float()).mean()
    return -F.logsigmoid(margins).mean(), acc, margins


def dpo_loss(delta_chosen, delta_rejected, beta_dpo: float = 0.1):
    """Eq. (2): L_DPO = -E log sigmoid(beta_dpo [Delta(x, y_w) - Delta(x, y_l)]).

    Args: Delta = log pi_theta(y|x) - log pi_ref(y|x) of chosen and rejected responses, (B,) each.
    Returns: (loss, accuracy with a tie counting 1/2, margins beta_dpo (Delta_w - Delta_l)).
    """
    return bt_loss(beta_dpo * delta_chosen, beta_dpo * delta_rejected)


# ---- Eq. (3): KL-regularised policy optimisation (the meta-test procedure) -------------------------
@dataclass
class AdaptConfig:
    beta: float = 0.5          # KL coefficient of Eq. (3) (defaults here = train.Config's)
    steps: int = 60            # policy-gradient steps
    prompts_per_step: int = 16
    k: int = 4                 # samples per prompt (RLOO needs k >= 2)
    lr: float = 1e-2           # Adam on theta
    max_new_tokens: int = 24


def kl_estimates(logp, logp_ref):
    """Per-sample estimators of KL(pi_theta || pi_ref) from y ~ pi_theta.

    k1 = Delta (unbiased, used in the loss); k3 = e^{-Delta} - 1 + Delta (unbiased, >= 0, logged only).
    """
    delta = logp - logp_ref
    return delta, torch.expm1(-delta) + delta


def standardised(reward_fn, ref_idx):
    """The reward scale of §1: r -> (r - mean) / std over pi_ref's samples `ref_idx` of the prompts."""
    with torch.no_grad():
        r = reward_fn(ref_idx)
    mean, std = r.mean(), r.std().clamp_min(1e-6)
    return lambda idx: (reward_fn(idx) - mean) / std


def adapt(policy, prompts, reward_fn, cfg: AdaptConfig, generator, gold_fn=None,
          adapt_params: str = "head", theta0=None, progress=None):
    """Eq. (3) by on-policy RLOO with the sequence-level k1 penalty r - beta * Delta_theta.

    Each step samples k responses per prompt from exactly pi_theta (temperature 1, no top-k); the
    baseline of a sample is the mean penalised reward of the other k - 1 samples of its prompt.
    Args: prompts (N, P) long; reward_fn(idx) -> (B,) (standardised by the caller); gold_fn likewise,
    for logging only.
    theta0 (optional) continues from an earlier theta instead of theta_ref.
    Returns: (theta, log) with log a list of dicts (step, reward, gold, kl_k1, kl_k3).
    """
    theta = P.adapted_params(policy, adapt_params) if theta0 is None else P.copy_params(theta0)
    opt = torch.optim.Adam(theta.values(), lr=cfg.lr)
    log = []
    for step in range(cfg.steps):
        rows = torch.tensor(P.draw(len(prompts), cfg.prompts_per_step, generator), device=prompts.device)
        x = prompts[rows].repeat_interleave(cfg.k, dim=0)                       # (B k, P)
        idx, mask = P.sample(policy, theta, x, cfg.max_new_tokens, generator)
        logp, logp_ref = P.logprob_and_ref(policy, theta, idx, mask)
        with torch.no_grad():
            r = reward_fn(idx)
            k1, k3 = kl_estimates(logp.detach(), logp_ref)
            R = (r - cfg.beta * k1).view(-1, cfg.k)                            # (B, k)
            baseline = (R.sum(1, keepdim=True) - R) / (cfg.k - 1)              # leave-one-out
            A = (R - baseline).view(-1)
        loss = -(A * logp).mean()
        check_finite(loss.detach(), "adaptation loss (3)", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append({"step": step, "reward": r.mean().item(), "kl_k1": k1.mean().item(),
                    "kl_k3": k3.mean().item(),
                    "gold": None if gold_fn is None else gold_fn(idx).mean().item()})
        if progress is not None:
            progress.update(1)
    return {n: p.detach() for n, p in theta.items()}, log


# ---- reward-model training: vanilla (Eq. 1) and MetaRM (Eqs. 9-11) --------------------------------
def pair_tensors(pairs, device="cpu"):
    """Pairs -> ((chosen idx, mask), (rejected idx, mask)), each (B, T), prompt + response."""
    return (P.join([p.prompt for p in pairs], [p.chosen for p in pairs], device),
            P.join([p.prompt for p in pairs], [p.rejected for p in pairs], device))


def rm_bt_loss(rm, phi, chosen, rejected):
    """Eq. (1) for the reward model r_phi on a batch of pairs: (loss, accuracy, margins)."""
    return bt_loss(P.reward(rm, phi, chosen), P.reward(rm, phi, rejected))


def distinct_pairs(idx, k: int):
    """(B, k(k-1)/2) bool: which response pairs (i < j) of each prompt differ (duplicates dropped)."""
    seqs = idx.view(-1, k, idx.shape[1])
    i, j = torch.triu_indices(k, k, 1)
    return (seqs[:, i] != seqs[:, j]).any(-1)


def difference_loss(r, k: int, distinct):
    """Eq. (9): J = E_x (2/k^2) sum_{i<j} sigmoid(|r(x, s_i) - r(x, s_j)|), duplicate pairs dropped.

    Args: r (B k,) rewards of k responses for each of B shifted prompts; distinct (B, k(k-1)/2).
    """
    r = r.view(-1, k)
    i, j = torch.triu_indices(k, k, 1)
    terms = torch.sigmoid((r[:, i] - r[:, j]).abs()) * distinct
    return (2.0 / k ** 2) * terms.sum(1).mean()


def metarm_grad(rm, phi, chosen, rejected, meta_idx, distinct, k: int, eta: float,
                second_order: bool = True):
    """Eqs. (10)(11): the gradient of phi -> L_BT(phi'), phi' = phi + eta grad J(phi; X_s).

    second_order=True: exact, (I + eta H_J(phi)) g with g = grad L_BT(phi') -- one HVP of J.
    second_order=False: g itself, the gradient taken at phi' applied to phi (the authors' update).
    Returns: (gradient dict, L_BT(phi'), J(phi)).
    """
    phi = {n: p.detach().requires_grad_(True) for n, p in phi.items()}
    J_fn = lambda p: difference_loss(P.reward(rm, p, meta_idx), k, distinct)
    J = J_fn(phi)
    gJ = torch.autograd.grad(J, list(phi.values()))
    # Eq. (10): gradient *ascent* on the difference loss
    phi_prime = {n: (p + eta * gj).detach().requires_grad_(True) for (n, p), gj in zip(phi.items(), gJ)}
    loss, _, _ = rm_bt_loss(rm, phi_prime, chosen, rejected)
    g = dict(zip(phi, torch.autograd.grad(loss, list(phi_prime.values()))))
    if second_order and eta != 0.0:
        # Eq. (11): grad_phi L_BT(phi') = (I + eta grad^2 J(phi)) grad L_BT(phi')
        Hg = bilevel.hvp(J_fn, phi, g)
        g = {n: g[n] + eta * Hg[n] for n in g}
    return g, loss.detach(), J.detach()


@dataclass
class RMConfig:
    steps: int = 400
    batch_size: int = 32       # pairs per step
    lr: float = 1.5e-3         # Adam on phi
    eta: float = 0.03          # MetaRM ascent step (10)
    k: int = 4                 # MetaRM responses per shifted prompt
    meta_prompts: int = 8      # MetaRM shifted prompts per step
    second_order: bool = True


def train_reward_model(rm, phi, pairs, cfg: RMConfig, generator, steps=None, meta_set=None,
                       progress=None):
    """Adam on phi with the Bradley-Terry loss (1), or with MetaRM's update (9)-(11) if meta_set.

    meta_set: (idx (N k, T), distinct (N, k(k-1)/2)): k responses to each of N shifted prompts,
    unlabelled; each step draws cfg.meta_prompts of them as X_s.
    Returns: a list of per-step dicts (loss, accuracy, J).
    """
    opt = torch.optim.Adam(phi.values(), lr=cfg.lr)
    device = next(iter(phi.values())).device
    log = []
    for step in range(cfg.steps if steps is None else steps):
        rows = P.draw(len(pairs), cfg.batch_size, generator)
        (chosen, _), (rejected, _) = pair_tensors([pairs[i] for i in rows], device)
        if meta_set is None:
            loss, acc, _ = rm_bt_loss(rm, phi, chosen, rejected)
            grads, J = torch.autograd.grad(loss, list(phi.values())), None
        else:
            meta_idx, distinct = meta_set
            m = P.draw(len(distinct), cfg.meta_prompts, generator)
            x_s = meta_idx.view(len(distinct), cfg.k, -1)[m].reshape(-1, meta_idx.shape[1])
            g, loss, J = metarm_grad(rm, phi, chosen, rejected, x_s, distinct[m], cfg.k, cfg.eta,
                                     cfg.second_order)
            grads, acc, J = list(g.values()), torch.tensor(float("nan")), J.item()
        check_finite(loss.detach(), "reward-model loss", step)
        for p, gr in zip(phi.values(), grads):
            p.grad = gr
        opt.step()
        log.append({"loss": loss.item(), "acc": acc.item(), "J": J})
        if progress is not None:
            progress.update(1)
    return log


# ---- Eqs. (4)-(8): the bilevel meta-learned reward model -----------------------------------------
def prepare(policy, idx, resp_mask, theta):
    """A batch for implicit_reward: tokens, mask, log pi_ref and, when theta is the head alone, the
    frozen trunk's features h (B, T, C), computed once."""
    with torch.no_grad():
        h, _ = policy(idx, head=False)
        batch = {"idx": idx, "mask": resp_mask,
                 "logp_ref": P.sequence_logprob(P.never_special(policy.head(h)), idx, resp_mask)[0]}
    if all(n.startswith("head.") for n in theta):
        batch["h"] = h
    return batch


def implicit_reward(policy, theta, batch):
    """Delta_theta(x, y) = log pi_theta(y|x) - log pi_ref(y|x), (B,)."""
    if "h" in batch:
        logits = P.head_logits(theta, batch["h"])
    else:
        logits, _ = P.functional_call(policy, theta, (batch["idx"],))
    return P.sequence_logprob(logits, batch["idx"], batch["mask"])[0] - batch["logp_ref"]


def importance_weights(delta, K: int):
    """Eq. (4): w_k(theta; x) = softmax_k Delta_theta(x, y_k), (B, K); w = 1/K at theta = theta_ref."""
    return torch.softmax(delta.view(-1, K), dim=-1)


def lower_objective(delta, r, K: int, beta: float):
    """Eq. (5) without its proximal term: E_x[-sum_k w_k r_k + beta sum_k w_k log(K w_k)], w = Eq. (4).

    Over free weights its minimiser is w* = softmax_k(r_k / beta). Args: delta (B K,), r (B, K).
    A weight that underflows to 0 (a log-ratio gap of ~100 nats in float32) makes w log(K w) NaN;
    the training loops then stop with a named error (check_finite) instead of carrying it on.
    """
    w = importance_weights(delta, K)
    kl = (w * torch.log(K * w)).sum(-1)                        # KL(w || uniform) <= log K
    return (-(w * r).sum(-1) + beta * kl).mean()


def inner_loss(policy, theta, r, cand, K: int, beta: float, rho: float, theta_ref):
    """Eq. (5): g_d(theta, phi) = E_x[-sum_k w_k r_k + beta sum_k w_k log(K w_k)] + rho/2 |theta - theta_ref|^2.

    Args: r (B, K) rewards r_phi(x, y_k) of the candidates (phi enters g only through them);
    cand: a `prepare`d batch of the B K candidates y_k ~ pi_ref(.|x), prompt-major.
    """
    prox = sum(((theta[n] - theta_ref[n]) ** 2).sum() for n in theta)
    return lower_objective(implicit_reward(policy, theta, cand), r, K, beta) + 0.5 * rho * prox


def outer_dpo(policy, theta, chosen, rejected, beta_dpo: float):
    """Eq. (7), one domain's term: L_DPO(theta; P_d) on `prepare`d chosen/rejected batches."""
    return dpo_loss(implicit_reward(policy, theta, chosen), implicit_reward(policy, theta, rejected),
                    beta_dpo)[0]


@dataclass
class BilevelConfig:
    beta: float = 0.5          # KL coefficient of the lower level (5), as at meta-test
    beta_dpo: float = 0.1      # DPO temperature of the upper level (7)
    lam: float = 0.3           # weight of L_BT in (7)
    K: int = 4                 # candidates per prompt
    T: int = 20                # inner gradient steps (6)
    inner_lr: float = 0.0      # must be set: train.calibrate sets it and rho from `curvature` (§2.1)
    rho: float = 0.0           # proximal weight of (5); 0 only where g_d is known to be convex
    solver: str = "cg"         # cg | neumann | unrolled
    cg_iters: int = 10
    cg_tol: float = 1e-3       # relative residual (README, figure 3: error ~1e-3 with T = 20)
    outer_steps: int = 100
    domains_per_step: int = 2
    pairs_per_domain: int = 32
    lr: float = 3e-4           # Adam on phi


def domain_problem(policy, theta, cands, pairs):
    """One domain's fixed data for the bilevel problem: prepared candidates and pair batches."""
    chosen, rejected = pair_tensors(pairs, cands["idx"].device)
    return {"cand": cands, "chosen": prepare(policy, *chosen, theta),
            "rejected": prepare(policy, *rejected, theta)}


def candidate_rewards(rm, phi, cand, K: int):
    """r_phi(x, y_k) of the candidates, (B, K), standardised over them as rewards are at meta-test
    (§1, 'Reward scale'), so that beta means the same in (5) as in (3); the graph to phi is kept."""
    r = P.reward(rm, phi, cand["idx"])
    return ((r - r.mean()) / r.std().clamp_min(1e-8)).view(-1, K)


def level_functions(policy, prob, cfg: BilevelConfig, theta_ref):
    """One domain's lower and upper losses as functions (theta, {"r": rewards}) -> scalar, the form
    bilevel.py works with: g = Eq. (5), f = that domain's L_DPO term of Eq. (7)."""
    g = lambda th, up: inner_loss(policy, th, up["r"], prob["cand"], cfg.K, cfg.beta, cfg.rho, theta_ref)
    f = lambda th, up: outer_dpo(policy, th, prob["chosen"], prob["rejected"], cfg.beta_dpo)
    return g, f


def hypergradient(policy, rm, phi, prob, cfg: BilevelConfig, theta_ref, solver=None, iters=None,
                  newton_tol=None):
    """Eq. (8) for one domain: (dF_d/dr (B, K), the candidates' rewards r (B, K) with graph to phi, info).

    The lower level depends on phi only through the candidates' rewards r = r_phi(x, y_k), so the
    hypergradient is taken with respect to r by bilevel.py and carried to phi by one backward pass
    through the reward model (chain rule): grad_phi F_d = (dr/dphi)^T dF_d/dr.
    solver: cg | neumann (iters = CG/Neumann iterations) | unrolled (iters = T). newton_tol: solve
    the lower level by Newton to this gradient norm instead of T gradient steps (tests, references).
    """
    solver = solver or cfg.solver
    r = candidate_rewards(rm, phi, prob["cand"], cfg.K)
    upper = {"r": r.detach()}
    g, f = level_functions(policy, prob, cfg, theta_ref)
    if solver == "unrolled":
        grad, info = bilevel.hypergrad_unrolled(f, g, theta_ref, upper, iters or cfg.T, cfg.inner_lr)
        theta_star = info["theta"]
    else:
        if newton_tol:
            theta_star, _ = bilevel.newton_solve(g, theta_ref, upper, tol=newton_tol)
        else:
            theta_star, _ = bilevel.inner_solve(g, theta_ref, upper, cfg.T, cfg.inner_lr)
        kw = dict(max_iter=iters or cfg.cg_iters, tol=cfg.cg_tol) if solver == "cg" else \
            dict(alpha=cfg.inner_lr, J=iters or cfg.cg_iters)
        grad, info = bilevel.hypergrad_implicit(f, g, theta_star, upper, solver=solver, **kw)
    info["F"] = f(theta_star, upper).item()
    return grad["r"], r, info


def curvature(policy, theta_ref, r, cand, cfg: BilevelConfig, iters: int = 20):
    """lambda_min and lambda_max of grad^2_theta g (rho = 0) at theta_ref and at theta*, by Lanczos
    with HVPs, and the rho and inner step they give (§2.1): rho = max(2 (-lambda_min)_+, 0.01
    lambda_max) -- above -lambda_min, and large enough that the condition number stays <= ~100 --
    and inner_lr = 1 / (lambda_max + rho)."""
    g0 = lambda th: inner_loss(policy, th, r, cand, cfg.K, cfg.beta, 0.0, theta_ref)
    v0 = {n: torch.randn(p.shape, generator=torch.Generator(p.device).manual_seed(0), device=p.device,
                         dtype=p.dtype) for n, p in theta_ref.items()}
    lo_ref, hi_ref, _ = bilevel.lanczos_eigs(lambda v: bilevel.hvp(g0, theta_ref, v), v0, iters)
    rho = max(2 * max(0.0, -lo_ref), 0.01 * hi_ref)
    lr = 1.0 / (hi_ref + rho)
    g = lambda th, up: inner_loss(policy, th, up["r"], cand, cfg.K, cfg.beta, rho, theta_ref)
    theta_star, _ = bilevel.inner_solve(g, theta_ref, {"r": r}, cfg.T, lr)
    lo, hi, _ = bilevel.lanczos_eigs(lambda v: bilevel.hvp(g0, theta_star, v), v0, iters)
    rho = max(rho, 2 * max(0.0, -lo), 0.01 * hi)
    return {"lambda_min_ref": lo_ref, "lambda_max_ref": hi_ref, "lambda_min_star": lo,
            "lambda_max_star": hi, "rho": rho, "inner_lr": 1.0 / (hi + rho)}


def outer_gradient(policy, rm, phi, problems: dict, pairs, cfg: BilevelConfig, theta_ref,
                   scale: float = 1.0, **hyper_kw):
    """grad_phi F for F(phi) = scale sum_d L_DPO(theta*_d(phi); P_d) + lam L_BT(phi; pairs), Eqs. (7)(8).

    Returns: (gradient list in phi's order, F, info with the HVPs used and per-domain DPO losses).
    """
    surrogate, F, info = 0.0, 0.0, {"hvps": 0, "dpo": {}, "unconverged": 0}
    for d, prob in problems.items():
        dF_dr, r, h_info = hypergradient(policy, rm, phi, prob, cfg, theta_ref, **hyper_kw)
        surrogate = surrogate + scale * (r * dF_dr).sum()    # its phi-gradient is (dr/dphi)^T dF/dr
        F += scale * h_info["F"]
        info["hvps"] += h_info["hvps"]
        info["unconverged"] += h_info.get("converged") is False
        info["dpo"][d] = h_info["F"]
    if cfg.lam > 0:
        (chosen, _), (rejected, _) = pair_tensors(pairs, r.device)
        bt = rm_bt_loss(rm, phi, chosen, rejected)[0]
        surrogate, F = surrogate + cfg.lam * bt, F + cfg.lam * bt.item()
    return list(torch.autograd.grad(surrogate, list(phi.values()))), F, info


def train_bilevel(policy, rm, phi, problems: dict, pairs, cfg: BilevelConfig, theta_ref, generator,
                  steps=None, opt=None, progress=None):
    """Eqs. (6)-(8): Adam on phi along the hypergradient of F (see outer_gradient).

    Each outer step draws cfg.domains_per_step training domains (the sum over D_train estimated
    without bias) and cfg.pairs_per_domain pooled pairs for the lam term.
    steps defaults to cfg.outer_steps; opt (to continue a run in chunks) to a new Adam.
    A linear solve that stops at cfg.cg_iters before cfg.cg_tol is counted ("unconverged") and
    reported in one warning at the end instead of one per solve.
    Returns: a list of per-step dicts (F, grad_norm, hvps, unconverged, dpo of the drawn domains).
    """
    if cfg.inner_lr <= 0:
        raise ValueError("BilevelConfig.inner_lr must be > 0: set it, or rho and it by train.calibrate (§2.1)")
    opt = opt or torch.optim.Adam(phi.values(), lr=cfg.lr)
    domains = list(problems)
    log = []
    for step in range(cfg.outer_steps if steps is None else steps):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="cg did not converge")
            log.append(_outer_step(policy, rm, phi, problems, domains, pairs, cfg, theta_ref, generator, opt, step))
        if progress is not None:
            progress.update(1)
    missed = sum(entry["unconverged"] for entry in log)
    if missed:
        warnings.warn(f"bilevel: {missed} of {len(log) * cfg.domains_per_step} linear solves stopped at "
                      f"cg_iters={cfg.cg_iters} above cg_tol={cfg.cg_tol} (counted per step in the log)")
    return log


def _outer_step(policy, rm, phi, problems, domains, pairs, cfg, theta_ref, generator, opt, step):
    """One Adam step of train_bilevel on cfg.domains_per_step drawn domains."""
    picks = torch.randperm(len(domains), generator=generator, device=generator.device)[:cfg.domains_per_step].tolist()
    rows = P.draw(len(pairs), cfg.pairs_per_domain, generator)
    try:
        grads, F, info = outer_gradient(policy, rm, phi, {domains[i]: problems[domains[i]] for i in picks},
                                        [pairs[i] for i in rows], cfg, theta_ref, scale=len(domains) / len(picks))
    except FloatingPointError as e:                          # a solve that diverged: name the step
        raise FloatingPointError(f"{e} at step {step}") from None
    check_finite(torch.tensor([F] + [gr.norm() for gr in grads]), "bilevel F or hypergradient", step)
    for p, gr in zip(phi.values(), grads):
        p.grad = gr
    opt.step()
    return {"step": step, "F": F, "grad_norm": torch.sqrt(sum((gr ** 2).sum() for gr in grads)).item(), **info}


# ---- baselines and iterative RLHF -----------------------------------------------------------------
def train_dpo(policy, pairs, steps: int, batch_size: int, lr: float, beta_dpo: float, generator,
              adapt_params: str = "head"):
    """Eq. (2) on the pooled training pairs, Adam on the same theta as meta-test adaptation."""
    theta = P.adapted_params(policy, adapt_params)
    opt = torch.optim.Adam(theta.values(), lr=lr)
    device = next(iter(theta.values())).device
    for step in range(steps):
        rows = P.draw(len(pairs), batch_size, generator)
        chosen, rejected = pair_tensors([pairs[i] for i in rows], device)
        loss = outer_dpo(policy, theta, prepare(policy, *chosen, theta), prepare(policy, *rejected, theta),
                         beta_dpo)
        check_finite(loss.detach(), "DPO loss (2)", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {n: p.detach() for n, p in theta.items()}


def reward_spread(r, k: int) -> float:
    """§3's diagnostic: std of r(x, s_i) - r(x, s_j) over pairs i < j of responses to the same
    prompt, divided by the reward std over the same samples (ascent on J inflates the scale)."""
    r = r.view(-1, k)
    i, j = torch.triu_indices(k, k, 1)
    return ((r[:, i] - r[:, j]).std() / r.std().clamp_min(1e-8)).item()


def rlhf_rounds(policy, rm, phi, pairs, prompts, rounds: int, adapt_cfg: AdaptConfig, rm_cfg: RMConfig,
                rm_steps: int, generator, gold_fn, use_metarm: bool):
    """Iterative RLHF (§3): each round optimises the policy (3) with the current RM, samples it, and
    updates the RM on the original pairs -- with MetaRM (9)-(11) on the policy's samples as X_s, or
    with L_BT alone. Records, per round, the normalised reward-difference spread and gold reward of
    the policy's samples under the RM that produced them.
    """
    k = rm_cfg.k
    ref_idx, _ = P.sample(policy, {}, prompts.repeat_interleave(k, 0), adapt_cfg.max_new_tokens, generator)
    theta, history = None, []
    for t in range(rounds):
        reward_fn = standardised(lambda idx: P.reward(rm, phi, idx), ref_idx)
        theta, _ = adapt(policy, prompts, reward_fn, adapt_cfg, generator, theta0=theta)
        idx, _ = P.sample(policy, theta, prompts.repeat_interleave(k, 0), adapt_cfg.max_new_tokens, generator)
        with torch.no_grad():
            r = P.reward(rm, phi, idx)
        history.append({"round": t, "spread": reward_spread(r, k), "gold": gold_fn(idx).mean().item()})
        meta_set = (idx, distinct_pairs(idx, k)) if use_metarm else None
        train_reward_model(rm, phi, pairs, rm_cfg, generator, steps=rm_steps, meta_set=meta_set)
    return history
