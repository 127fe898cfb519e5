"""What the hypergradient path carries (METHOD.md §5.4, issue 31): the measurements of M1 at a kept outer step.

- sign_agreement: does -dF/dr order a prompt's candidates as their gold rewards do (0.5 is chance)?
- adam_shares: how much of Adam's step each term of (7) would set, given the step's second-moment estimate;
- ratio_and_cosine: the two terms' gradients against each other;
- signal: all three at one outer step of a bilevel fit, recomputed from what the step was computed from
  (study.hypergradient_checks.train_with_checkpoints' inputs); study.fits measures it on the own-data fits.
"""

import warnings

import torch

import metarm


def sign_agreement(dF_dr, gold, K: int) -> tuple:
    """Over every pair i < j of a prompt's K candidates (prompt-major, dF_dr and gold of shape (B K,)) whose gold
    rewards differ: 1 where -dF/dr orders them as gold does (sign(-dF_i + dF_j) = sign(g_i - g_j)), 1/2 where dF/dr
    ties, 0 otherwise. Returns (the sum of those scores, the number of such pairs), so that scores pool over
    prompts, domains and steps before they are divided."""
    i, j = torch.triu_indices(K, K, 1)
    push = -dF_dr.reshape(-1, K)  # the direction the outer objective moves each candidate's reward
    g = gold.reshape(-1, K)
    dp, dg = (push[:, i] - push[:, j]).flatten(), (g[:, i] - g[:, j]).flatten()
    counted = dg != 0
    score = torch.where(dp == 0, torch.full_like(dp, 0.5), (torch.sign(dp) == torch.sign(dg)).to(dp.dtype))
    return score[counted].sum().item(), int(counted.sum().item())


def adam_shares(grads: dict, exp_avg_sq: list, step: int, betas=(0.9, 0.999), eps: float = 1e-8) -> dict:
    """Each term's share of Adam's step: with v_hat = exp_avg_sq / (1 - beta2^step) per parameter (the optimiser's
    state after the step), term t's step is g_t / (sqrt(v_hat) + eps) and its share ||that||^2 over the sum of every
    term's. grads: term name -> list of gradients in the parameters' order."""
    correction = 1 - betas[1] ** step
    scaled = {}
    for term, gs in grads.items():
        scaled[term] = sum(((g / ((v / correction).sqrt() + eps)) ** 2).sum().item() for g, v in zip(gs, exp_avg_sq))
    total = sum(scaled.values())
    return {term: value / total for term, value in scaled.items()}


def ratio_and_cosine(a: list, b: list) -> tuple:
    """||a|| / ||b|| and the cosine between two gradients given as lists of tensors (the parameters of phi)."""
    dot = sum((x * y).sum() for x, y in zip(a, b)).item()
    na = sum((x**2).sum() for x in a).item() ** 0.5
    nb = sum((y**2).sum() for y in b).item() ** 0.5
    return na / nb, dot / (na * nb)


ADAM_BETA2 = 0.999  # torch.optim.Adam's default, which metarm.train_bilevel uses


def term_gradients(model, rm, theta_ref: dict, kept: dict, n_domains: int, gold) -> tuple:
    """At one kept outer step: the hypergradient (8) of each drawn domain recomputed as the step computed it (the same
    warm starts, problems and phi, so the same numbers), the sign agreement of -dF/dr with gold(candidates) summed
    over the domains, and the phi-gradients of (7)'s two terms: the DPO term's, N/n sum of (r . dF/dr), and lam
    L_BT's on the step's pairs (None at lam = 0). Returns (g_dpo, g_bt, agreement score, pairs)."""
    cfg, phi = kept["cfg"], kept["phi"]
    scale = n_domains / max(1, len(kept["problems"]))
    surrogate, score, pairs = 0.0, 0.0, 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="cg did not converge")  # as in training: cg_tol is loose by design
        for d, prob in kept["problems"].items():
            dF_dr, r, _ = metarm.hypergradient(model, rm, phi, prob, cfg, theta_ref, theta0=kept["warm"].get(d))
            s, n = sign_agreement(dF_dr.detach().flatten(), gold(prob["cand"]), cfg.K)
            score, pairs = score + s, pairs + n
            surrogate = surrogate + scale * (r * dF_dr).sum()
    params = list(phi.values())
    g_dpo = list(torch.autograd.grad(surrogate, params))
    if cfg.lam == 0:
        return g_dpo, None, score, pairs
    g_bt = list(torch.autograd.grad(cfg.lam * metarm.rm_bt_loss(rm, phi, *kept["lam_pairs"])[0], params))
    return g_dpo, g_bt, score, pairs


def second_moment_after(kept: dict, g: list) -> list:
    """Adam's second moment after the kept step, from the one before it and the step's gradient g:
    beta2 v + (1 - beta2) g^2 (torch.optim.Adam's update, which metarm.train_bilevel uses)."""
    return [ADAM_BETA2 * v + (1 - ADAM_BETA2) * x**2 for v, x in zip(kept["exp_avg_sq"], g)]


def signal(model, rm, theta_ref: dict, kept: dict, n_domains: int, gold) -> dict:
    """M1 at one kept outer step (term_gradients): the sign agreement (its score and number of pairs, to pool), the
    norm ratio and cosine of the DPO term's gradient against lam L_BT's, and the DPO term's share of Adam's step
    with the second moment after the step, bias-corrected at step + 1. At lam = 0 the ratio and cosine are None and
    the DPO term's share is 1."""
    g_dpo, g_bt, score, pairs = term_gradients(model, rm, theta_ref, kept, n_domains, gold)
    out = {"step": kept["step"], "score": score, "pairs": pairs}
    if g_bt is None:
        return {**out, "ratio": None, "cosine": None, "share_dpo": 1.0}
    ratio, cosine = ratio_and_cosine(g_dpo, g_bt)
    after = second_moment_after(kept, [a + b for a, b in zip(g_dpo, g_bt)])
    shares = adam_shares({"dpo": g_dpo, "bt": g_bt}, after, kept["step"] + 1)
    return {**out, "ratio": ratio, "cosine": cosine, "share_dpo": shares["dpo"]}
