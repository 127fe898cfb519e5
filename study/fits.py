"""The study's fits beyond the reference's own loops (METHOD.md §5, §5.2): the bilevel reward model as train.py runs
it (calibrated on probe domains, trained with checkpoints for the hypergradient's accuracy check), its matched
control bilevel_bt_only, the bilevel positive control on each evaluation domain's own pairs, and the DPO baseline
with its training log. Each draws from generators seeded from the run's seed, the same for a method and its control.
`s` is train.py's Setup.
"""

from dataclasses import replace

import torch

import metarm
import policy
from study import hypergradient_checks, measure, path_checks


def fit_bilevel(seed: int, s, phi: dict, domains: dict, bt_pairs, probe_domains=(), check_steps=(), progress=None):
    """Eqs. (6)-(8) on phi in place (metarm.train_bilevel): domains -> (prompts, encoded pairs) of (5) and of (7)'s
    DPO term, bt_pairs for its lam term; rho and the inner step first calibrated at theta* on one problem of each of
    probe_domains (metarm.calibrate). With no domain it is the control bilevel_bt_only: the same lam-term batches
    (the same generator), no DPO term, nothing to calibrate. check_steps: the outer steps whose inputs are kept for
    hypergradient_checks.accuracy_checks. Returns (the training log, the curvature with the rho re-checks' margins
    and the final rho -- None for the control --, the kept inputs). progress: a bar for train_bilevel's steps."""
    bcfg, curvature = replace(s.bilevel_cfg), None
    if domains:
        probe = {}
        for d in probe_domains:
            prompts, pairs = domains[d][:2]  # (a third entry, the diagnostic's gold, does not enter (5))
            probe[d] = metarm.draw_problem(
                s.model, prompts, pairs, bcfg, policy.generator(measure.stream(seed, 3), s.device)
            )
        curvature = metarm.calibrate(s.model, s.rm, phi, probe, bcfg, s.theta_ref)
    generator = policy.generator(measure.stream(seed, 4), s.device)
    bt_generator = policy.generator(measure.stream(seed, 5), s.device)
    log, inputs = hypergradient_checks.train_with_checkpoints(
        s.model, s.rm, phi, domains, bt_pairs, bcfg, s.theta_ref, generator, bt_generator, check_steps, progress
    )
    if domains:
        curvature["margins"] = [e["margin"] for e in log if "margin" in e]
        curvature["rho_final"] = bcfg.rho
    return log, curvature, inputs


OUTER = {  # --outer-data own: what (7)'s domain term is for each method (METHOD.md §5.2, §5.4)
    "bilevel": "dpo",  # L_DPO on the domain's own pairs
    "bilevel_bt_only": None,  # no domain term: lam L_BT alone (the control)
    "bilevel_swapped": "swapped",  # L_DPO on the same pairs, chosen and rejected swapped (M3)
    "bilevel_gold": "gold",  # the inner policy's gold value on its own candidates (M4)
}


def own_data_bilevel(seed: int, s, phi: dict, outer: str | None, progress=None):
    """The positive control of the bilevel path (METHOD.md §5.2): for each evaluation domain d, (7) on d's own
    labelled pairs with (5) on d's prompts, from a copy of the vanilla RM phi, the same draws for every `outer`
    (OUTER): "dpo", (7)'s DPO term; None, no domain term (bilevel_bt_only); "swapped", the DPO term on d's pairs
    with chosen and rejected swapped; "gold", the gold value of the inner policy on its candidates. lam L_BT is on
    d's pairs as they are. Returns ({d: phi_d}, {d: curvature with each outer step's F} -- {d: None} without a domain
    term --, {d: the path's signal at the first, middle and last outer step (study.path_checks.signal, §5.4 M1)}
    for "dpo" -- else {})."""
    phis, curvature, signals = {}, {}, {}
    for d in s.domains:
        chosen, rejected = s.own_pairs[d]
        if outer is None:
            one_domain = {}
        elif outer == "gold":
            one_domain = {d: (s.prompts[d], (chosen, rejected), measure.gold_fn(s.world))}
        else:
            one_domain = {d: (s.prompts[d], (rejected, chosen) if outer == "swapped" else (chosen, rejected))}
        phis[d] = policy.copy_params(phi)
        steps = hypergradient_checks.accuracy_steps(s.bilevel_cfg.outer_steps) if outer == "dpo" else ()
        log, curvature[d], kept = fit_bilevel(seed, s, phis[d], one_domain, s.own_pairs[d], [d], steps, progress)
        if outer is not None:
            curvature[d]["F"] = [e["F"] for e in log]
        if outer == "dpo":
            signals[d] = [path_checks.signal(s.model, s.rm, s.theta_ref, k, 1, measure.gold_fn(s.world)) for k in kept]
    return phis, curvature, signals


def train_dpo(model, pairs, steps: int, batch_size: int, lr: float, beta_dpo: float, generator, progress=None):
    """The DPO baseline: Eq. (2) on the pooled training pairs, Adam on the same theta as meta-test adaptation.

    Returns (theta, log): per step, on the step's pairs before its update, the loss and the means of
    log pi_theta(y|x) and Delta = log pi_theta - log pi_ref of the chosen and of the rejected responses;
    the log's last entry ("end") is the same on every training pair, after the last step (METHOD.md §5.2:
    likelihood displacement). progress: a bar that shows each step's loss."""
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
        policy.show(progress, {"loss": log[-1]["loss"]})
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
