"""What the hypergradient path carries (METHOD.md §5.4, issue 31): the measurements of M1 at a kept outer step.

- sign_agreement: does -dF/dr order a prompt's candidates as their gold rewards do (0.5 is chance)?
- adam_shares: how much of Adam's step each term of (7) would set, given the step's second-moment estimate.
Pure functions over tensors; where they are measured (the own-data fit's kept steps) is study.fits'.
"""

import torch


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
