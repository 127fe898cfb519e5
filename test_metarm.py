"""Tests of METHOD.md by equation, each against an independent truth: a hand computation, a closed form, float64
central differences, an explicit Hessian, enumeration, or a forward pass written out in conftest.py (manual_*) that
shares no code with GPT.features, policy.encode/logprob/reward. Run: python -m pytest -q (METARM_TEST_THREADS sets
torch's threads).

Index, equation -> tests:
  (1) Bradley-Terry     test_eq1_bt_loss_and_tie_accuracy_by_hand, test_eq1_rm_bt_loss_of_manual_rewards
  (2) DPO               test_eq2_dpo_loss_by_hand_and_outer_dpo_of_a_manual_forward
  (3) adaptation        test_eq3_adapt_step_is_the_rloo_k1_gradient, test_eq3_kl_estimates_match_exact_kl,
                        test_eq3_adaptation_approaches_the_kl_optimum
  §1 standardisation    test_s1_standardised_by_hand_and_every_adaptation_reward_is_standardised,
                        test_s1_metarm_and_rlhf_rounds_standardise_every_round
  (4)(5) inner problem  test_eq4_importance_weights_against_a_full_forward, test_eq5_inner_loss_by_hand,
                        test_eq5_inner_objective_is_exact_in_float64,
                        test_eq5_free_weight_minimiser_is_softmax_r_over_beta
  (6)-(8) outer level   test_eq8_dF_dr_matches_finite_differences,
                        test_eq7_eq8_outer_gradient_matches_finite_differences,
                        test_eq7_lam_term_is_lam_grad_bt, test_eq7_domain_subsets_rescaled_by_N_over_n,
                        test_eq5_shift_invariance_and_rho_from_explicit_hessian,
                        test_eq6_eq8_unrolled_and_training_path_converge, test_s22_reduction_to_rescaled_bradley_terry,
                        test_eq6_train_bilevel_needs_rho_and_nan_stops_training
  (9)-(11) MetaRM       test_eq9_difference_loss_by_hand, test_eq10_eq11_second_minus_first_order_is_eta_hessian_term,
                        test_eq11_eta0_metarm_is_plain_bradley_terry
  §3 spread             test_s3_reward_spread_by_hand, test_s3_rm_accuracy_evaluate_and_premises_by_hand
  §5.2 positive controls
                        test_s52_within_prompt_differences_by_enumeration, test_s52_collapse_ratio_by_hand,
                        test_s52_unseen_mass_against_a_manual_forward,
                        test_s52_train_dpo_logs_log_probabilities_of_a_manual_forward,
                        test_s52_summarise_pairs_shifted_accuracy_and_unseen_mass_by_seed,
                        test_s52_own_data_bilevel_sees_each_domain_s_own_pairs_and_prompts,
                        test_s52_shifted_accuracy_and_judged_comparisons_by_hand,
                        test_own_data_run_judges_the_positive_control_s_comparisons
  bilevel.py, data.py (world v3), policy.py, train.py (statistics, pipeline, bad input): the sections below.
"""

import copy
import functools
import json
import math
from dataclasses import replace
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import bench
import bilevel
import data
import evaluation
import metarm
import plots
import policy
import train
from conftest import (
    T64,
    THREADS,
    TINY_WORLD,
    G,
    batch_of,
    dot,
    f64,
    flat_fn,
    jitter,
    manual_logprob,
    manual_reward,
    manual_stream,
    micro_batches,
    noisy_gpt,
    randn_like,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated", "ignore:cg did not converge")


# ==== (1) Bradley-Terry ==============================================================================================
def test_eq1_bt_loss_and_tie_accuracy_by_hand():
    """(1): -E log sigmoid(r_w - r_l) and margins by hand; tie_accuracy: a tie counts 1/2, gold ties are left out."""
    loss, acc, margins = metarm.bt_loss(T64(2.0, 0.0, -1.0), T64(1.0, 0.0, 1.0))
    want = (math.log(1 + math.exp(-1.0)) + math.log(2.0) + math.log(1 + math.exp(2.0))) / 3
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert acc.item() == 0.5
    assert margins.tolist() == [1.0, 0.0, -2.0]
    m, gold = T64(1.0, 0.0, -1.0, 0.0, 2.0), T64(2.0, -1.0, -3.0, 0.0, -1.0)  # right, tie, right, (gold tie), wrong
    assert metarm.tie_accuracy(m).item() == pytest.approx(3 / 5)
    assert metarm.tie_accuracy(m, gold).item() == pytest.approx(2.5 / 4)


def test_eq1_rm_bt_loss_of_manual_rewards(micro):
    """(1) on the reward model: rm_bt_loss = -mean log sigmoid of the difference of manual_reward."""
    rm, phi = policy.make_reward_model(micro, G(3))
    phi, (_, c, r) = jitter(phi, 0.5, 3), micro_batches(micro, G(3), 6)
    want = -F.logsigmoid(
        manual_reward(micro, rm, phi, c["idx"], c["mask"]) - manual_reward(micro, rm, phi, r["idx"], r["mask"])
    )
    assert metarm.rm_bt_loss(rm, phi, c, r)[0].item() == pytest.approx(want.mean().item(), rel=1e-12)


# ==== (2) DPO ========================================================================================================
def test_eq2_dpo_loss_by_hand_and_outer_dpo_of_a_manual_forward(micro):
    """(2) by hand (beta_dpo = 0.1); outer_dpo (7) = L_DPO with Delta = log pi_theta - log pi_ref from
    manual_logprob."""
    loss, acc, margins = metarm.dpo_loss(T64(3.0, -1.0), T64(1.0, 2.0), 0.1)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(0.3))) / 2, rel=1e-12)
    assert acc.item() == 0.5
    assert margins.tolist() == pytest.approx([0.2, -0.3], rel=1e-12)
    (_, c, r), theta = micro_batches(micro, G(4), 5), jitter(policy.adapted_params(micro), 0.5, 4)

    def d(b):
        return manual_logprob(micro, b["idx"], b["mask"], theta) - manual_logprob(micro, b["idx"], b["mask"])

    assert metarm.outer_dpo(micro, theta, c, r, 0.3).item() == pytest.approx(
        -F.logsigmoid(0.3 * (d(c) - d(r))).mean().item(), rel=1e-12
    )


# ==== (3) KL-regularised adaptation (RLOO, k1 penalty) and §1 reward standardisation ================================
@pytest.fixture(scope="module")
def enumerable():
    """A policy over 5 tokens (pad, bos, eos, a, b), prompt <bos>, responses of at most 2 tokens: 7 in all."""
    model = noisy_gpt(policy.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8), 0.5)
    ys = [[2], [3, 2], [4, 2], [3, 3], [3, 4], [4, 3], [4, 4]]
    reward = T64(0.0, 1.0, -1.0, 2.0, 0.5, -0.5, 1.5)
    table = {tuple(y): r for y, r in zip(ys, reward.tolist())}

    def reward_fn(b):
        return torch.tensor([table[tuple(t for t in row[1:].tolist() if t)] for row in b["idx"]], dtype=f64)

    return model, *policy.join([[1]] * len(ys), ys), reward, reward_fn


def exact_logprobs(model, theta, idx, mask):
    """log pi_theta(y) of every enumerated response (checked to sum to one) and log pi_ref(y)."""
    logp = manual_logprob(model, idx, mask, theta)
    assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-12)
    return logp.detach(), manual_logprob(model, idx, mask)


def test_eq3_adapt_step_is_the_rloo_k1_gradient(enumerable, monkeypatch):
    """(3): one adapt step (Adam -> SGD, lr 0.1) on a batch sampled from theta moves theta by -lr grad -mean(A log pi)
    with A = R - (sum of the prompt's other R) / (n - 1), R = r - beta (log pi_theta - log pi_ref) (k1), all by
    manual_logprob."""
    model, _, _, _, reward_fn = enumerable
    theta0, seen, sample = jitter(policy.adapted_params(model), 0.7, 0), [], policy.sample
    monkeypatch.setattr(
        metarm.policy,
        "sample",
        lambda m, th, *a, **k: seen.append((policy.copy_params(th), sample(m, th, *a, **k))) or seen[-1][1],
    )
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: torch.optim.SGD(params, lr=lr))
    cfg = metarm.AdaptConfig(beta=0.7, steps=1, prompts_per_step=3, samples=3, lr=0.1, max_new_tokens=2)
    theta1, log = metarm.adapt(model, torch.ones(2, 1, dtype=torch.long), reward_fn, cfg, G(0), theta0=theta0)
    ((th_used, batch),) = seen
    assert all(torch.equal(th_used[n], theta0[n]) for n in theta0)
    logp = manual_logprob(model, batch["idx"], batch["mask"], leaf := policy.copy_params(theta0))
    k1 = (logp - manual_logprob(model, batch["idx"], batch["mask"])).detach()
    R = (reward_fn(batch) - 0.7 * k1).view(3, 3)
    A = torch.stack([R[:, i] - (R.sum(1) - R[:, i]) / 2 for i in range(3)], 1).view(-1)
    for (n, p), gr in zip(theta0.items(), torch.autograd.grad(-(A * logp).mean(), list(leaf.values()))):
        torch.testing.assert_close(theta1[n], p - 0.1 * gr, rtol=0, atol=1e-12)
    assert [log[0][k] for k in ("reward", "kl_k1", "kl_k3")] == pytest.approx(
        [reward_fn(batch).mean().item(), k1.mean().item(), (torch.exp(-k1) - 1 + k1).mean().item()], rel=1e-10
    )


def test_eq3_kl_estimates_match_exact_kl(enumerable):
    """k1 and k3 on 20000 samples of pi_theta are within 5 standard errors of KL(pi_theta || pi_ref) by enumeration."""
    (model, idx, mask, _, _), theta = enumerable, jitter(policy.adapted_params(enumerable[0]), 0.8, 0)
    logp, logp_ref = exact_logprobs(model, theta, idx, mask)
    exact = (logp.exp() * (logp - logp_ref)).sum().item()
    batch = policy.sample(model, theta, torch.ones(20000, 1, dtype=torch.long), 2, G(0))
    k1, k3 = metarm.kl_estimates(policy.logprob(model, theta, batch), batch["logp_ref"])
    torch.testing.assert_close(k3, torch.expm1(-k1) + k1)
    assert exact > 0.05
    assert all(abs(e.mean().item() - exact) < 5 * e.std().item() / math.sqrt(len(e)) for e in (k1, k3))


def test_eq3_adaptation_approaches_the_kl_optimum(enumerable):
    """(3): exact KL(pi_theta || pi*), pi* ~ pi_ref exp(r/beta), ends under 1/4 of pi_ref's and under the 2beta, beta/2
    optima's."""
    model, idx, mask, reward, reward_fn = enumerable
    logp_ref = manual_logprob(model, idx, mask)

    def star(b):
        return torch.log_softmax(logp_ref + reward / b, 0)

    def kl(logp, logq):
        return (logp.exp() * (logp - logq)).sum().item()

    cfg = metarm.AdaptConfig(beta=1.0, steps=150, prompts_per_step=16, samples=4, lr=0.05, max_new_tokens=2)
    theta, log = metarm.adapt(model, torch.ones(1, 1, dtype=torch.long), reward_fn, cfg, G(1))
    logp = exact_logprobs(model, theta, idx, mask)[0]
    assert kl(logp, star(1.0)) < min(
        0.25 * kl(logp_ref, star(1.0)), kl(star(0.5), star(1.0)), kl(star(2.0), star(1.0))
    )
    assert len(log) == 150


def test_s1_standardised_by_hand_and_every_adaptation_reward_is_standardised(world, tiny_gpt):
    """§1: r = 2x + 1 on x = 1, 2, 3, 6 is 3, 5, 7, 13: mean 7, unbiased std sqrt(56/3). evaluation.reward_functions
    gives each RM's and each oracle's reward as (r - mean) / std over pi_ref's samples (checked on others too); sft,
    metarm none."""
    x = T64(1.0, 2.0, 3.0, 6.0)
    fn = metarm.standardised(lambda x: 2 * x + 1, x)
    assert fn(T64(4.0)).item() == pytest.approx((9 - 7) / math.sqrt(56 / 3), rel=1e-12)
    assert fn(x).mean().item() == pytest.approx(0, abs=1e-12)
    assert fn(x).std().item() == pytest.approx(1, rel=1e-12)
    rm, phi = policy.make_reward_model(tiny_gpt, G(5))
    phi, prompts = jitter(phi, 0.3, 5), torch.tensor(world.prompts["bar"])
    ref, other = (policy.sample(tiny_gpt, {}, prompts, 8, G(s)) for s in (5, 6))
    methods = ["vanilla_rm", "bilevel", "in_domain_rm", "oracle", "agnostic_oracle", "sft", "metarm"]
    rms = {"vanilla_rm": phi, "bilevel": phi, "in_domain_rm": {"bar": phi}}
    out = evaluation.reward_functions(SimpleNamespace(world=world, methods=methods, rm=rm), rms, "bar", ref)

    def gold(agnostic):
        return lambda b: torch.tensor(world.gold_rewards(b["idx"].tolist(), agnostic), dtype=f64)

    def rm_fn(b):
        return manual_reward(tiny_gpt, rm, phi, b["idx"], b["mask"])

    raw = {
        "vanilla_rm": rm_fn,
        "in_domain_rm": rm_fn,
        "bilevel": rm_fn,
        "oracle": gold(False),
        "agnostic_oracle": gold(True),
    }
    assert set(out) == set(raw)
    for m, fn in raw.items():
        r = fn(ref)
        assert r.std() > 0.1
        for b in (ref, other):
            torch.testing.assert_close(out[m](b).double(), (fn(b) - r.mean()) / r.std(), rtol=0, atol=1e-5)


def test_s1_metarm_and_rlhf_rounds_standardise_every_round(micro, monkeypatch):
    """§1, §3: metarm_rounds adapts R times (R - 1 MetaRM updates between), rlhf_rounds R times (R updates), each
    time with the current RM's reward standardised on pi_ref's samples."""
    (rm, phi), (prompts, c, r), calls = policy.make_reward_model(micro, G(6)), micro_batches(micro, G(6), 4), []
    prompts = torch.tensor(prompts)
    ref = policy.sample(micro, {}, prompts.repeat(4, 1), 4, G(7))

    def fake_adapt(model, pr, reward_fn, cfg, generator, theta0=None):
        z = reward_fn(ref)
        calls.append(
            (z.mean().item(), z.std().item(), manual_reward(micro, rm, phi, ref["idx"], ref["mask"]).tolist())
        )
        return policy.adapted_params(micro), []

    monkeypatch.setattr(metarm, "adapt", fake_adapt)
    args = (
        metarm.MetaRMConfig(eta=0.5, k=2, meta_prompts=2, steps=3, rounds=3, batch_size=4),
        metarm.AdaptConfig(max_new_tokens=4),
    )

    def sgd():
        return torch.optim.SGD(phi.values(), lr=0.5)

    assert len(metarm.metarm_rounds(micro, prompts, ref, rm, phi, sgd(), (c, r), *args, (1, 2, 3, 4))[1]) == 2
    assert len(calls) == 3
    assert (
        len(
            evaluation.rlhf_rounds(
                micro, prompts, ref, rm, phi, sgd(), (c, r), *args, 2, lambda b: b["mask"].sum(1), G(8), G(9)
            )
        )
        == 2
    )
    assert len(calls) == 5
    assert all(calls[i][2] != calls[i + 1][2] for i in (0, 1, 3))  # the RM moved in between
    assert all(mu == pytest.approx(0, abs=1e-10) and sd == pytest.approx(1, rel=1e-10) for mu, sd, _ in calls)


# ==== (4)(5) the inner problem =======================================================================================
def test_eq4_importance_weights_against_a_full_forward(world, tiny_gpt):
    """(4): w = 1/K at theta_ref, else softmax_k(log pi_theta - log pi_ref) from plain model(idx) passes (theta in a
    deepcopy)."""
    K, theta_ref = 4, policy.adapted_params(tiny_gpt)
    prompts = torch.tensor([world.prompts[d][0] for d in ("bar", "hotel", "phone")]).repeat_interleave(K, 0)
    cand = policy.sample(tiny_gpt, {}, prompts, 8, G(0))
    w = metarm.importance_weights(metarm.implicit_reward(tiny_gpt, theta_ref, cand), K)
    torch.testing.assert_close(w, torch.full((3, K), 1 / K, dtype=f64), rtol=0, atol=1e-12)
    theta, moved = jitter(theta_ref, 0.3, 1), copy.deepcopy(tiny_gpt)
    moved.head.load_state_dict({"weight": theta["head.weight"], "bias": theta["head.bias"]})

    def plain_logprob(model):
        logp = torch.log_softmax(model(cand["idx"])[0][:, :-1], -1).gather(-1, cand["idx"][:, 1:, None])[..., 0]
        return (logp * cand["mask"][:, 1:]).sum(-1)

    w = metarm.importance_weights(metarm.implicit_reward(tiny_gpt, theta, cand), K)
    torch.testing.assert_close(
        w, torch.softmax((plain_logprob(moved) - plain_logprob(tiny_gpt)).view(-1, K), -1), rtol=1e-10, atol=1e-12
    )
    assert (w - 1 / K).abs().max() > 1e-2  # theta really moved the weights


def test_eq5_inner_loss_by_hand(micro):
    """(5): g = mean_x[-sum w r + beta sum w log(K w)] + rho/2 |theta - theta_ref|^2 by hand; inner_objective w/o
    prox."""
    K, beta, rho = 4, 0.7, 0.3
    cand = policy.sample(micro, {}, torch.tensor(micro_batches(micro, G(7), 3)[0]).repeat_interleave(K, 0), 5, G(7))
    cand_im = cand["idx"], cand["mask"]
    theta, r = jitter(theta_ref := policy.adapted_params(micro), 0.4, 7), torch.randn(3, K, generator=G(8), dtype=f64)
    w = torch.softmax((manual_logprob(micro, *cand_im, theta) - manual_logprob(micro, *cand_im)).view(3, K), -1)
    objective = (-(w * r).sum(1) + beta * (w * torch.log(K * w)).sum(1)).mean().item()
    prox = rho / 2 * sum(((theta[n] - theta_ref[n]) ** 2).sum().item() for n in theta)
    assert abs(objective) > 0.1
    assert prox > 0.1
    assert metarm.inner_loss(micro, theta, r, cand, K, beta, rho, theta_ref).item() == pytest.approx(
        objective + prox, rel=1e-7
    )
    assert metarm.inner_objective(metarm.implicit_reward(micro, theta, cand), r, K, beta).item() == pytest.approx(
        objective, rel=1e-7
    )


def test_eq5_inner_objective_is_exact_in_float64():
    """(5) in float64 to 1e-12: w = 1/2, 1/2, r = 0: beta sum w log(K w) = 0 exactly; log K must not be rounded to
    float32."""
    assert metarm.inner_objective(T64(0.3, 0.3), torch.zeros(1, 2, dtype=f64), 2, 1.0).item() == pytest.approx(
        0.0, abs=1e-12
    )


def test_eq5_free_weight_minimiser_is_softmax_r_over_beta():
    """(5) minimised over free weight logits (the last of each prompt pinned at 0: shift invariance) is w* =
    softmax(r/beta)."""
    r = torch.tensor([[1.0, -0.5, 0.3, 2.0], [0.0, 0.1, -1.0, 0.5]], dtype=f64)

    def delta(th):
        return torch.cat([th["z"], torch.zeros(2, 1, dtype=f64)], 1).flatten()

    def g(th, up):
        return metarm.inner_objective(delta(th), up["r"], 4, 0.7)

    theta, _ = bilevel.inner_solve(g, {"z": torch.zeros(2, 3, dtype=f64)}, {"r": r}, T=200, lr=2.0)
    theta, info = bilevel.newton_solve(g, theta, {"r": r}, tol=1e-11)  # not convex at delta = 0
    assert info["converged"]
    torch.testing.assert_close(
        metarm.importance_weights(delta(theta), 4), torch.softmax(r / 0.7, -1), rtol=0, atol=1e-9
    )


# ==== (6)-(8) the hypergradient and the outer objective ==============================================================
@pytest.fixture(scope="module")
def bl(micro):
    """Domains a, b, c: 3 prompts x K = 4 candidates, 6 pairs each; an RM with a unit-scale head; rho, inner step from
    calibrate; beta_dpo 0.3. warm: theta*_d by 300 GD steps + Newton (rho is sized at theta*: Newton from theta_ref
    does not converge)."""
    rm, phi = policy.make_reward_model(micro, gen := G(0))
    phi["head.weight"] = torch.randn(phi["head.weight"].shape, generator=gen, dtype=f64).requires_grad_()
    cfg = metarm.BilevelConfig(
        beta=0.5,
        beta_dpo=0.3,
        lam=0.0,
        K=4,
        prompts_per_domain=3,
        pairs_per_domain=6,
        cg_iters=300,
        cg_tol=1e-12,
        max_new_tokens=5,
    )
    domains = {}
    for d in "abc":
        prompts, chosen, rejected = micro_batches(micro, gen, 8)
        domains[d] = (torch.tensor(prompts), (chosen, rejected))
    problems = {d: metarm.draw_problem(micro, *domains[d], cfg, gen) for d in domains}
    theta_ref = {n: p.detach() for n, p in policy.adapted_params(micro).items()}
    s = dict(
        model=micro,
        rm=rm,
        phi=phi,
        cfg=cfg,
        problems=problems,
        domains=domains,
        theta_ref=theta_ref,
        pairs=domains["a"][1],
        curv=metarm.calibrate(micro, rm, phi, problems, cfg, theta_ref),
        warm={},
    )
    for d, prob in problems.items():
        g, r = lower_ref(s, prob), {"r": std_rewards(s, phi, prob["cand"])}
        s["warm"][d], info = bilevel.newton_solve(
            g, bilevel.inner_solve(g, theta_ref, r, 300, cfg.inner_lr)[0], r, tol=1e-12
        )
        assert info["converged"]
    return s


def lower_ref(s, prob):
    """Eq. (5) of one domain written out on manual_logprob (the candidates' features computed once)."""
    cfg, theta_ref, c, K = s["cfg"], s["theta_ref"], prob["cand"], s["cfg"].K
    h = manual_stream(s["model"], c["idx"])[0]

    def lp(th):
        return manual_logprob(s["model"], c["idx"], c["mask"], th, h)

    lp0 = lp(theta_ref)

    def g(th, up):
        w = torch.softmax((lp(th) - lp0).view(-1, K), -1)
        prox = sum(((th[n] - theta_ref[n]) ** 2).sum() for n in th)
        return (-(w * up["r"]).sum(-1) + cfg.beta * (w * torch.log(K * w)).sum(-1)).mean() + cfg.rho / 2 * prox

    return g


def std_rewards(s, phi, batch):
    r = manual_reward(s["model"], s["rm"], phi, batch["idx"], batch["mask"])
    return ((r - r.mean()) / r.std()).view(-1, s["cfg"].K)


def F_of_r(s, d, r):
    """One domain's L_DPO(theta*(r)) (beta_dpo of cfg), theta* by Newton to |grad g| <= 1e-10 from warm[d]."""
    theta, info = bilevel.newton_solve(lower_ref(s, s["problems"][d]), s["warm"][d], {"r": r}, tol=1e-10)

    def delta(b):
        return manual_logprob(s["model"], b["idx"], b["mask"], theta) - manual_logprob(s["model"], b["idx"], b["mask"])

    assert info["converged"]
    return (
        -F.logsigmoid(s["cfg"].beta_dpo * (delta(s["problems"][d]["chosen"]) - delta(s["problems"][d]["rejected"])))
        .mean()
        .item()
    )


def F_ref(s, phi, lam=0.0, domains="abc", n_domains=3):
    """Eq. (7) written out: (N/n) sum_d L_DPO(theta*_d(phi)) + lam L_BT(phi), rewards standardised per domain."""
    phi, (c, r) = {n: p.detach() for n, p in phi.items()}, s["pairs"]

    def rew(b):
        return manual_reward(s["model"], s["rm"], phi, b["idx"], b["mask"])

    dpo = sum(F_of_r(s, d, std_rewards(s, phi, s["problems"][d]["cand"])) for d in domains)
    return n_domains / max(1, len(domains)) * dpo + lam * -F.logsigmoid(rew(c) - rew(r)).mean().item()


def outer(s, lam=0.0, problems=None):
    """metarm.outer_gradient with lam, N = 3, Newton inner solves (warm-started): (gradient dict, F)."""
    cfg = metarm.BilevelConfig(**{**s["cfg"].__dict__, "lam": lam})
    g, Fv, _ = metarm.outer_gradient(
        s["model"],
        s["rm"],
        s["phi"],
        problems or s["problems"],
        s["pairs"],
        cfg,
        s["theta_ref"],
        n_domains=3,
        warm=dict(s["warm"]),
        newton_tol=1e-10,
    )
    return dict(zip(s["phi"], g)), Fv


def test_eq8_dF_dr_matches_finite_differences(bl):
    """(8) alone: dF_d/dr of hypergradient (IFT + CG, Newton theta*) vs central differences of the written-out F_d,
    1e-6 rel."""
    prob = bl["problems"]["a"]
    dF_dr, r, info = metarm.hypergradient(
        bl["model"], bl["rm"], bl["phi"], prob, bl["cfg"], bl["theta_ref"], bl["warm"]["a"], newton_tol=1e-10
    )
    torch.testing.assert_close(r.detach(), std_rewards(bl, bl["phi"], prob["cand"]), rtol=0, atol=1e-12)
    assert info["converged"]
    assert info["F"] == pytest.approx(F_of_r(bl, "a", r.detach()), rel=1e-10)
    for seed in (1, 2):
        u = torch.randn(r.shape, generator=G(seed), dtype=f64)
        fd = bilevel.hypergrad_fd(lambda x: F_of_r(bl, "a", x["r"]), {"r": r.detach()}, {"r": u})
        assert (dF_dr * u).sum().item() == pytest.approx(fd, rel=1e-6)


def test_eq7_eq8_outer_gradient_matches_finite_differences(bl):
    """(7)(8), lam = 0, through the RM and the candidates' standardisation: grad_phi F vs central differences, 1e-5
    rel."""
    grad, Fv = outer(bl)
    assert Fv == pytest.approx(F_ref(bl, bl["phi"]), rel=1e-10)
    for u in (randn_like(bl["phi"], 3), grad):
        assert dot(grad, u) == pytest.approx(bilevel.hypergrad_fd(lambda p: F_ref(bl, p), bl["phi"], u), rel=1e-5)


def test_eq7_lam_term_is_lam_grad_bt(bl):
    """(7): the lam term adds lam L_BT to F and lam grad L_BT (central differences of the written-out L_BT) to grad
    F."""
    lam, (g0, F0), (g1, F1) = 0.4, outer(bl), outer(bl, 0.4)

    def bt(p):
        return F_ref(bl, p, lam=1.0, domains="")

    assert F1 - F0 == pytest.approx(lam * bt(bl["phi"]), rel=1e-10)
    for u in (randn_like(bl["phi"], 4), randn_like(bl["phi"], 5)):
        assert dot({n: g1[n] - g0[n] for n in g0}, u) == pytest.approx(
            lam * bilevel.hypergrad_fd(bt, bl["phi"], u), rel=1e-6
        )


def test_eq7_domain_subsets_rescaled_by_N_over_n(bl):
    """(7)(8): the mean of outer_gradient(n_domains = 3) over the C(3, 2) domain pairs = over all 3 domains (lam = 0),
    1e-10."""
    full, F_full = outer(bl)
    subsets = [outer(bl, problems={d: bl["problems"][d] for d in pair}) for pair in combinations("abc", 2)]
    for n in full:
        torch.testing.assert_close(sum(g[n] for g, _ in subsets) / 3, full[n], rtol=1e-10, atol=1e-12)
    assert sum(Fv for _, Fv in subsets) / 3 == pytest.approx(F_full, rel=1e-10)


def test_eq5_shift_invariance_and_rho_from_explicit_hessian(bl):
    """(5)/§2.1, with the explicit 108 x 108 Hessian of g: at rho = 0 it is indefinite at theta_ref and annihilates
    the shift direction (W + 1u^T, b + 1); calibrate's rho makes it positive definite at theta*; rho_from by hand."""
    s, prob = bl, bl["problems"]["a"]
    r = std_rewards(s, s["phi"], prob["cand"])
    g = metarm.level_functions(s["model"], prob, s["cfg"], s["theta_ref"])[0]
    g0 = metarm.level_functions(
        s["model"], prob, metarm.BilevelConfig(**{**s["cfg"].__dict__, "rho": 0.0}), s["theta_ref"]
    )[0]

    def hess(fn, th):
        return torch.autograd.functional.hessian(*flat_fn(th, lambda p: fn(p, {"r": r})))

    H_ref, u = hess(g0, s["theta_ref"]), torch.randn(1, 8, generator=G(0), dtype=f64)
    shift = torch.cat([(torch.ones(12, 1, dtype=f64) @ u).flatten(), torch.ones(12, dtype=f64)])
    assert (H_ref @ shift).norm() < 1e-10 * H_ref.norm()
    assert torch.linalg.eigvalsh(H_ref)[0] < -1e-3
    theta, info = bilevel.newton_solve(g, s["warm"]["a"], {"r": r}, tol=1e-10)
    assert info["converged"]
    assert s["cfg"].rho > 0
    assert torch.linalg.eigvalsh(hess(g, theta))[0] > 0
    assert metarm.rho_from(-2.0, 10.0) == 3.0
    assert metarm.rho_from(1.0, 500.0) == 5.0


def test_eq6_eq8_unrolled_and_training_path_converge(bl):
    """(6)(8): dF/dr unrolled, and by CG at theta_T (the training path): error at T = 300 < 5 % of the error at T =
    5."""
    s, prob = bl, bl["problems"]["b"]

    def hyper(T=10, **kw):
        return metarm.hypergradient(
            s["model"],
            s["rm"],
            s["phi"],
            prob,
            metarm.BilevelConfig(**{**s["cfg"].__dict__, "T": T}),
            s["theta_ref"],
            **kw,
        )[0]

    exact = hyper(newton_tol=1e-10, theta0=s["warm"]["b"])

    def err(g):
        return ((g - exact).norm() / exact.norm()).item()

    for path in (lambda T: hyper(solver="unrolled", iters=T), lambda T: hyper(T=T)):
        assert err(path(300)) < 0.05 * err(path(5))


def test_eq8_hypergradient_accuracy_recomputes_training_and_sees_its_error(bl, recwarn):
    """evaluation.hypergradient_accuracy recomputes the gradient a training step used (its norm = the step's logged
    grad_norm, lam = 0) and compares it with the Newton-solved IFT reference (outer_gradient with newton_tol, checked
    against finite differences in test_eq7_eq8_outer_gradient_matches_finite_differences): about exact when the
    step's own solves are tight (T = 1000, CG to 1e-12), clearly off when they are cut (T = 1, one CG iteration).
    report_accuracy warns below the stated cosine, and only there."""
    s = bl
    errors = {}
    for T, cg_iters, lam in ((1000, 300, 0.0), (1, 1, 0.0), (1000, 300, 0.4)):
        cfg = replace(s["cfg"], T=T, cg_iters=cg_iters, lam=lam)
        phi = policy.copy_params(s["phi"])
        log = metarm.train_bilevel(
            s["model"],
            s["rm"],
            phi,
            s["domains"],
            s["pairs"],
            cfg,
            s["theta_ref"],
            G(0),
            G(1),
            steps=1,
            keep_steps=(0,),
        )
        assert "inputs" in log[0]
        acc = evaluation.hypergradient_accuracy(s["model"], s["rm"], s["theta_ref"], log[0]["inputs"], n_domains=3)
        if lam == 0:
            assert acc["norm"] == pytest.approx(log[0]["grad_norm"], rel=1e-12)
        errors[(T, lam)] = acc
    # with lam > 0 the step used grad F + lam grad L_BT, and the check leaves the exact lam term out
    assert errors[(1000, 0.4)]["norm"] == pytest.approx(errors[(1000, 0.0)]["norm"], rel=1e-12)
    errors = {T: errors[(T, 0.0)] for T in (1000, 1)}
    assert errors[1000]["rel_error"] < 1e-6
    assert errors[1000]["cosine"] > 1 - 1e-10
    assert errors[1]["rel_error"] > 0.5
    assert errors[1]["cosine"] < 0.9
    checks = [{"step": 0, "cosine": 0.95, "rel_error": 0.2}, {"step": 3, "cosine": 0.999, "rel_error": 0.01}]
    summary = evaluation.accuracy_summary([checks, [{"step": 0, "cosine": 0.75, "rel_error": 0.4}]])
    assert summary["all"] == {
        "n": 3,
        "cosine_min": 0.75,
        "cosine_median": 0.95,
        "rel_error_median": 0.2,
        "rel_error_max": 0.4,
    }
    assert summary["by_step"]["0"]["cosine_median"] == pytest.approx(0.85)
    assert summary["failed_checks"] == 0
    train.report_accuracy(evaluation.accuracy_summary([checks]))
    assert len(recwarn) == 0
    with pytest.warns(UserWarning, match="cosine 0.750 < 0.8"):
        train.report_accuracy(summary)
    failed = evaluation.accuracy_summary([[{"step": 0, "cosine": None, "rel_error": None, "failed": "Newton"}]])
    assert failed["failed_checks"] == 1
    assert failed["all"] is None
    with pytest.warns(UserWarning, match="1 hypergradient accuracy check"):
        train.report_accuracy(failed)


def test_s22_reduction_to_rescaled_bradley_terry():
    """§2.2: free logits over candidates containing the pairs' responses: F(r) = L_BT((beta_dpo / beta) r), and its
    gradient."""
    K, beta, beta_dpo = 5, 0.4, 0.1
    r = torch.tensor([[0.3, -1.2, 0.8, 2.0, -0.1]], dtype=f64)
    win = torch.tensor([3, 0, 2, 4])
    lose = torch.tensor([1, 1, 0, 1])

    def delta(th):
        return torch.cat([th["z"], torch.zeros(1, dtype=f64)])

    def g(th, up):
        return metarm.inner_objective(delta(th), up["r"], K, beta)

    def f(th, up):
        return metarm.dpo_loss(delta(th)[win], delta(th)[lose], beta_dpo)[0]

    theta, _ = bilevel.inner_solve(g, {"z": torch.zeros(K - 1, dtype=f64)}, {"r": r}, T=2000, lr=1.0)
    theta, info = bilevel.newton_solve(g, theta, {"r": r}, tol=1e-12)
    grad, _ = bilevel.hypergrad_implicit(f, g, theta, {"r": r}, solver="cg", max_iter=50, tol=1e-13)
    r_leaf = r.clone().requires_grad_(True)
    bt = -F.logsigmoid(beta_dpo / beta * (r_leaf[0, win] - r_leaf[0, lose])).mean()
    assert info["converged"]
    assert f(theta, None).item() == pytest.approx(bt.item(), rel=1e-10)
    torch.testing.assert_close(grad["r"], torch.autograd.grad(bt, r_leaf)[0], rtol=1e-8, atol=1e-12)


def test_eq6_train_bilevel_needs_rho_and_nan_stops_training(bl):
    """train_bilevel refuses an uncalibrated inner step and, at lam = 0, a run without the DPO term (nothing to
    differentiate); an RM gone NaN stops bilevel and BT training at step 0, named."""
    s, bad = bl, policy.copy_params(bl["phi"])

    def run(phi, cfg):
        return metarm.train_bilevel(
            s["model"], s["rm"], phi, s["domains"], s["pairs"], cfg, s["theta_ref"], G(0), G(1), steps=2
        )

    with pytest.raises(ValueError, match="inner_lr"):
        run(policy.copy_params(s["phi"]), metarm.BilevelConfig(K=4))
    with pytest.raises(ValueError, match="lam = 0"):
        metarm.train_bilevel(
            s["model"],
            s["rm"],
            s["phi"],
            s["domains"],
            s["pairs"],
            s["cfg"],
            s["theta_ref"],
            G(0),
            G(1),
            dpo_term=False,
        )
    bad["head.weight"] = torch.full_like(bad["head.weight"], math.nan)
    with (
        pytest.raises(FloatingPointError, match=r"^bilevel, seed 3: .*finite.* at step 0$"),
        train.stage("bilevel", 3),
    ):
        run(bad, metarm.BilevelConfig(**{**s["cfg"].__dict__, "domains_per_step": 2}))
    with (
        pytest.raises(FloatingPointError, match=r"^vanilla_rm, seed 7: non-finite reward-model loss \(1\) at step 0$"),
        train.stage("vanilla_rm", 7),
    ):
        train.train_reward_model(s["rm"], bad, s["pairs"], metarm.RMConfig(steps=3, batch_size=4), G(0))


# ==== (9)-(11) MetaRM ================================================================================================
def test_eq9_difference_loss_by_hand():
    """(9), 2 prompts x k = 3: the mean over prompts of (2/k^2) sum_{i<j} sigmoid(|r_i - r_j|), duplicate pairs
    dropped."""
    r = T64(0.0, 1.0, 3.0, 2.0, 2.5, 0.0)

    def s(x):
        return 1 / (1 + math.exp(-x))

    idx = torch.tensor([[5, 6, 2], [7, 2, 0], [5, 6, 2], [4, 2, 0], [5, 2, 0], [6, 2, 0]])  # prompt 1: y_0 = y_2
    distinct = metarm.distinct_pairs(idx, 3)
    assert distinct.tolist() == [[True, False, True], [True, True, True]]  # pairs (0,1), (0,2), (1,2)
    second = s(0.5) + s(2.0) + s(2.5)
    assert metarm.difference_loss(r, 3, torch.ones(2, 3, dtype=torch.bool)).item() == pytest.approx(
        2 / 9 * (s(1) + s(3) + s(2) + second) / 2, rel=1e-12
    )
    assert metarm.difference_loss(r, 3, distinct).item() == pytest.approx(
        2 / 9 * (s(1) + s(2) + second) / 2, rel=1e-12
    )


@pytest.fixture(scope="module")
def meta(micro):
    """phi = head, LayerNorm and c_proj of the micro RM (97 parameters: explicit grad^2 J); 6 pairs; 3 prompts x k =
    3."""
    rm, phi = policy.make_reward_model(micro, G(8))
    phi = jitter({n: p for n, p in phi.items() if n.startswith(("head", "ln", "block.c_proj"))}, 0.5, 8)
    prompts, c, r = micro_batches(micro, G(8), 6)
    meta = batch_of(
        micro, [p for p in prompts[:3] for _ in range(3)], [[3 + i, 4 + j, 2] for i in range(3) for j in range(3)]
    )
    return rm, phi, c, r, meta, metarm.distinct_pairs(meta["idx"], 3)


def test_eq10_eq11_second_minus_first_order_is_eta_hessian_term(meta):
    """(10)(11): first order = grad L_BT(phi'), phi' = phi + eta grad J (ascent); second - first = eta grad^2 J grad
    L_BT(phi') (explicit Hessian); second = central difference of L_BT(phi + eta grad J(phi)); eta = 0: both grad
    L_BT(phi)."""
    rm, phi, c, r, batch, distinct = meta
    eta = 0.3
    Jx, x = flat_fn(phi, lambda p: metarm.difference_loss(policy.reward(rm, p, batch), 3, distinct))
    BTx, _ = flat_fn(phi, lambda p: metarm.rm_bt_loss(rm, p, c, r)[0])
    g_prime, H_J = torch.func.grad(BTx)(x + eta * torch.func.grad(Jx)(x)), torch.autograd.functional.hessian(Jx, x)

    def grad(e, so):
        return torch.cat(
            [t.flatten() for t in metarm.metarm_grad(rm, phi, c, r, batch, distinct, 3, e, so)[0].values()]
        )

    first, second = grad(eta, False), grad(eta, True)
    torch.testing.assert_close(first, g_prime, rtol=1e-10, atol=1e-13)
    assert (H_J @ g_prime).norm() > 1e-3 * g_prime.norm()  # the Hessian term matters
    torch.testing.assert_close(second - first, eta * H_J @ g_prime, rtol=1e-8, atol=1e-13)
    u = torch.randn(x.shape, generator=G(2), dtype=f64)
    fd = bilevel.hypergrad_fd(
        lambda y: BTx(y["x"] + eta * torch.func.grad(Jx)(y["x"])).item(), {"x": x}, {"x": u}, 1e-6
    )
    assert (second @ u).item() == pytest.approx(fd, rel=1e-6)
    for so in (True, False):
        torch.testing.assert_close(grad(0.0, so), torch.func.grad(BTx)(x), rtol=1e-12, atol=1e-14)


def test_eq11_eta0_metarm_is_plain_bradley_terry(meta, micro, monkeypatch):
    """(11), eta = 0: metarm_rounds over R - 1 rounds = train_reward_model on the same draws, exactly; continue_from
    leaves phi, opt be."""
    rm, phi, c, r, batch, _ = meta
    monkeypatch.setattr(metarm, "adapt", lambda model, *args, **kw: (policy.adapted_params(model), []))
    a = policy.copy_params(phi)
    b = policy.copy_params(phi)
    mcfg = metarm.MetaRMConfig(0.0, 3, 2, steps=2, rounds=4, batch_size=4)
    metarm.metarm_rounds(
        micro,
        batch["idx"][::3, :3],
        batch,
        rm,
        a,
        torch.optim.Adam(a.values(), lr=0.05),
        (c, r),
        mcfg,
        metarm.AdaptConfig(max_new_tokens=2),
        (1, 2, 9, 4),
    )  # eta 0, k 3, 2 prompts: 3 rounds x 2 updates
    opt = train.train_reward_model(rm, b, (c, r), rm_cfg := metarm.RMConfig(steps=6, batch_size=4, lr=0.05), G(9))[1]
    assert all(torch.equal(a[n], b[n]) and not torch.equal(a[n], phi[n]) for n in phi)
    before = copy.deepcopy(opt.state_dict())
    b_before = policy.copy_params(b)  # continue_from: a copy, its own optimiser state
    train.train_reward_model(rm, (b2 := policy.continue_from(b, opt, 0.05))[0], (c, r), rm_cfg, G(11), b2[1])
    assert all(torch.equal(b[n], b_before[n]) and not torch.equal(b2[0][n], b[n]) for n in b)
    assert all(
        torch.equal(v, before["state"][i][k]) for i, st in opt.state_dict()["state"].items() for k, v in st.items()
    )


# ==== §3 spread =====================================================================================================
def test_s3_reward_spread_by_hand():
    """§3: r = (0, 1 | 0, 3): differences -1, -3 (std sqrt 2) / reward std sqrt 2 = 1; r -> 5r keeps it; shifts per
    prompt."""
    r, shifted = T64(0.0, 1.0, 0.0, 3.0), T64(2.0, 3.0, -1.0, 2.0)
    assert metarm.reward_spread(r, 2) == pytest.approx(1.0)
    assert metarm.reward_spread(5 * r, 2) == pytest.approx(1.0)
    assert metarm.reward_spread(shifted, 2) == pytest.approx(math.sqrt(2) / shifted.std().item())


def test_s3_rm_accuracy_evaluate_and_premises_by_hand(monkeypatch):
    """evaluation.py, reward/sample/logprob stubbed: rm_accuracy (gold ties out, RM ties 1/2, MetaRM's repeats
    averaged); evaluate (win rate, ties 1/2; KL = mean log-ratio); measure_premises (rows i, i + n/2 share a prompt):
    accuracy, §3 spread."""
    monkeypatch.setattr(evaluation.policy, "reward", lambda rm, phi, b: b["r"] * phi)

    def B(**k):
        return {key: torch.tensor(v, dtype=f64) for key, v in k.items()}

    pairs = (B(r=[1.0, 0.0, 2.0, -1.0, 0.0]), B(r=[0.0] * 5))
    s = SimpleNamespace(rm=None, eval_pairs={"d": pairs}, gold_margins={"d": T64(1, 1, 1, 0, 0)})
    assert evaluation.rm_accuracy(s, {"vanilla_rm": 1.0}, "vanilla_rm", "d") == pytest.approx((1 + 0.5 + 1) / 3)
    rms = {"metarm": {("d", 0): 1.0, ("d", 1): -1.0, ("e", 0): 5.0}}  # d's two repeats: 5/6 and 1/6
    assert evaluation.rm_accuracy(s, rms, "metarm", "d") == pytest.approx((5 / 6 + 1 / 6) / 2)
    batch = B(g=[1.0, 0.0, 2.0, 1.0], logp_ref=[0.0, -1.0, 0.0, 0.0], lp=[0.5, 0.0, -0.5, 1.0])
    monkeypatch.setattr(evaluation.policy, "sample", lambda *a, **k: batch)
    monkeypatch.setattr(evaluation.policy, "logprob", lambda model, theta, b: b["lp"])
    monkeypatch.setattr(evaluation, "unseen_mass", lambda model, theta, b, unseen: unseen)
    gold_of = B(g=[0.0, 0.0, 2.0, 1.0])
    res = evaluation.evaluate(None, {}, torch.zeros(4, 1), gold_of, lambda b: b["g"], None, 1, 0.25)[0]
    assert [res[k] for k in ("win_rate", "kl", "gold_reward")] == pytest.approx([(1 + 0.5 + 0.5 + 0.5) / 4, 0.5, 1.0])
    assert res["unseen_mass"] == 0.25
    ref = B(r=[0, 0, 0, 1, 2, 4], g=[0, 5, 1, 2, 1, 0])
    adapted = B(r=[2, 1, 0, 0, 1, 2], g=[1, 0, 0, 0, 0, 1])  # 3 prompts, n = 2
    out = evaluation.measure_premises(None, 1.0, ref, adapted, lambda b: b["g"], 2)
    assert [
        out[k] for k in ("acc_pi_ref_samples", "spread_pi_ref", "acc_adapted_samples", "spread_adapted")
    ] == pytest.approx([1 / 3, math.sqrt(7 / 3) / math.sqrt(77 / 30), 1.0, math.sqrt(5)])
    # rows p and 3 + p share prompt p: |dr| on pi_ref's samples 1, 2, 4; on the adapted ones 2, 0, 2
    assert out["absdiff_median_pi_ref"] == pytest.approx(2.0)
    assert out["absdiff_q25_pi_ref"] == pytest.approx(1.5)
    assert out["absdiff_median_adapted"] == pytest.approx(2.0)
    assert out["absdiff_q25_adapted"] == pytest.approx(1.0)


# ==== §5.2 positive controls: the bilevel path on own data, MetaRM's premise and mechanism, DPO's log ===============
def test_s52_within_prompt_differences_by_enumeration():
    """MetaRM's premise measures (METHOD.md §5.2): quartiles of |r_i - r_j| over every within-prompt pair (linear
    interpolation, written out), and per gold-margin bin the share of pairs and the accuracy against the gold order."""
    r = T64(3.0, 1.0, 1.0, 0.0, 1.0, 2.5)  # 2 prompts x k = 3, prompt-major
    g = T64(2.0, 0.0, 5.0, 1.0, 1.0, 2.7)
    pairs = [(p * 3 + i, p * 3 + j) for p in range(2) for i, j in combinations(range(3), 2)]
    absdiff = sorted(abs(r[a].item() - r[b].item()) for a, b in pairs)  # 0, 1, 1.5, 2, 2, 2.5

    def quantile(q):
        pos = q * (len(absdiff) - 1)
        lo = math.floor(pos)
        return absdiff[lo] + (pos - lo) * (absdiff[min(lo + 1, len(absdiff) - 1)] - absdiff[lo])

    out = evaluation.within_prompt_differences(r, g, 3)
    assert [out["absdiff_q25"], out["absdiff_median"], out["absdiff_q75"]] == pytest.approx([1.125, 1.75, 2.0])
    assert [quantile(0.25), quantile(0.5), quantile(0.75)] == pytest.approx([1.125, 1.75, 2.0])
    # |g_i - g_j|: prompt 1: 2, 3, 5 (bin 3); prompt 2: 0 (a gold tie, bin 0), 1.7, 1.7 (bin 2)
    shares = [out[f"share_bin{b}"] for b in range(4)]
    assert shares == pytest.approx([1 / 6, 0.0, 2 / 6, 3 / 6])
    # bin 3: (0,1) right, (0,2) wrong, (1,2) an RM tie; bin 2: both right; bins 0 (only a gold tie) and 1: no pair
    assert [out[f"acc_bin{b}"] for b in range(4)] == [None, None, pytest.approx(1.0), pytest.approx(0.5)]


def test_s52_collapse_ratio_by_hand():
    """The collapse ratio per seed = (adapted medians averaged over domains) / (pi_ref's likewise); the premise holds
    only when the 95 % interval lies strictly below the registered 0.5."""

    def run(adapted, reference):
        prem = {
            d: {"absdiff_median_adapted": a, "absdiff_median_pi_ref": b}
            for d, a, b in zip(("x", "y"), adapted, reference)
        }
        return {"premises": prem}

    # seed 1: (1 + 2) / 2 over (1 + 5) / 2 = 0.5 (the mean of the domains' ratios would be 0.7); seed 2: 0.25
    out = train.collapse([run((1.0, 2.0), (1.0, 5.0)), run((1.0, 1.0), (4.0, 4.0))], ["x", "y"])
    assert out["mean"] == pytest.approx(0.375)
    assert out["ci95"] == pytest.approx([0.375 - 12.706205 * 0.125, 0.375 + 12.706205 * 0.125], rel=1e-6)
    assert out["holds"] is False
    assert out["threshold"] == 0.5
    assert train.collapse([run((1.0, 1.0), (4.0, 4.0))] * 3, ["x", "y"])["holds"] is True
    assert train.collapse([run((2.0, 2.0), (4.0, 4.0))] * 3, ["x", "y"])["holds"] is False  # 0.5 is not below 0.5


def test_s52_unseen_mass_against_a_manual_forward(world, tiny_gpt):
    """unseen_mass: sum over the unseen tokens of softmax(head(h)) at every position that predicts a response token,
    averaged over those positions, with the head and softmax written out (manual_stream); unseen_tokens by
    enumeration."""
    prompts = [world.encode("<bos> <bakery>")[:2]] * 2
    responses = [world.encode("fresh bread <eos>"), world.encode("stale <eos>")]
    batch = batch_of(tiny_gpt, prompts, responses)
    theta = jitter(policy.adapted_params(tiny_gpt), 0.5, 7)
    unseen = torch.zeros(len(world.vocab), dtype=torch.bool)
    unseen[world.encode("stale crumbly dry")] = True
    h = manual_stream(tiny_gpt, batch["idx"])[0]
    vocab = torch.arange(len(world.vocab))
    never = (vocab == policy.PAD_ID) | (vocab == policy.BOS_ID)
    probs = torch.softmax((h @ theta["head.weight"].T + theta["head.bias"]).masked_fill(never, -math.inf), -1)
    masses = []
    for row in range(2):
        for t in range(batch["idx"].shape[1] - 1):
            if batch["mask"][row, t + 1] > 0:  # position t predicts response token t + 1
                masses.append(probs[row, t, unseen].sum().item())
    assert len(masses) == 3 + 2
    pairs = world.pooled_pairs(data.TRAIN_DOMAINS)  # unseen_tokens by enumeration of every token and pair
    truth = [not any(v in p.chosen or v in p.rejected for p in pairs) for v in range(len(world.vocab))]
    assert train.unseen_tokens(world, "cpu").tolist() == truth
    assert 0 < sum(truth) < len(truth)
    assert evaluation.unseen_mass(tiny_gpt, theta, batch, unseen) == pytest.approx(
        sum(masses) / len(masses), rel=1e-10
    )


def test_s52_train_dpo_logs_log_probabilities_of_a_manual_forward(micro):
    """train_dpo's log: step 0 at theta_ref (Delta 0, loss log 2, log pi of the step's pairs); the end entry's Delta
    on every pair is manual_logprob(theta) - manual_logprob(theta_ref) of the theta it returns."""
    _, chosen, rejected = micro_batches(micro, G(5), 6)
    theta, log = train.train_dpo(micro, (chosen, rejected), 3, 4, 0.05, 0.1, G(9))
    rows = policy.draw(6, 4, G(9))  # step 0's draw

    def lp(b, th=None):
        return manual_logprob(micro, b["idx"], b["mask"], th)

    assert [e["step"] for e in log] == [0, 1, 2, "end"]
    assert log[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-12)
    assert log[0]["delta_chosen"] == pytest.approx(0.0, abs=1e-12)
    assert log[0]["logp_chosen"] == pytest.approx(lp(chosen)[rows].mean().item(), rel=1e-12)
    assert log[0]["logp_rejected"] == pytest.approx(lp(rejected)[rows].mean().item(), rel=1e-12)
    for name, b in (("chosen", chosen), ("rejected", rejected)):
        assert log[-1][f"delta_{name}"] == pytest.approx((lp(b, theta) - lp(b)).mean().item(), rel=1e-10)
        assert log[-1][f"logp_{name}"] == pytest.approx(lp(b, theta).mean().item(), rel=1e-10)
    assert log[-1]["delta_chosen"] != 0.0
    summary = train.dpo_training([log, log])
    assert [e["step"] for e in summary["per_step"]] == [0, 1, 2]
    assert summary["per_step"][1]["loss"] == pytest.approx(log[1]["loss"])
    assert summary["end_all_training_pairs"]["delta_rejected"]["mean"] == pytest.approx(log[-1]["delta_rejected"])


def test_s52_summarise_pairs_shifted_accuracy_and_unseen_mass_by_seed():
    """summarise: MetaRM's mechanism as a paired difference in accuracy on X_s (delta 0.05) and DPO's unseen mass
    against pi_ref, each per seed from the domain means; dpo - sft and dpo - vanilla_rm judged in gold reward."""
    doms = ("taxi", "pizzeria")

    def seed(shift, mass):
        values = {  # method -> (gold_reward, shifted_accuracy, unseen_mass)
            "sft": (0.0, None, 0.1),
            "dpo": (shift, None, 0.1 + mass),
            "vanilla_rm": (1.0, 0.6, 0.1),
            "vanilla_rm_long": (1.0, None, 0.1),
            "metarm": (1.0, 0.6 + shift, 0.1),
            "metarm_eta0": (1.0, 0.6, 0.1),
        }
        return {
            m: {
                d: {"gold_reward": g, "win_rate": 0.5, "kl": 1.0, "shifted_accuracy": a, "unseen_mass": u + i / 10}
                for i, d in enumerate(doms)
            }
            for m, (g, a, u) in values.items()
        }

    per_seed = [
        {"metrics": seed(x, y), "premises": {d: {"acc": 0.5} for d in doms}} for x, y in ((0.1, 0.2), (0.3, 0.0))
    ]
    out = train.summarise(train.Config(), per_seed)
    mechanism = out["paired_rm_accuracy"]["metarm - metarm_eta0 (accuracy on MetaRM's shifted samples X_s)"]
    assert mechanism["per_seed"] == [pytest.approx(0.1), pytest.approx(0.3)]
    assert mechanism["delta"] == 0.05
    assert mechanism["wins"] == 2
    assert out["unseen_mass_dpo_minus_sft"]["per_seed"] == [pytest.approx(0.2), pytest.approx(0.0)]
    assert out["paired"]["dpo - sft"]["per_seed"] == [pytest.approx(0.1), pytest.approx(0.3)]
    assert out["paired"]["dpo - vanilla_rm"]["per_seed"] == [pytest.approx(-0.9), pytest.approx(-0.7)]
    assert out["methods"]["sft"]["shifted_accuracy"] is None


def test_s52_own_data_bilevel_sees_each_domain_s_own_pairs_and_prompts(monkeypatch):
    """--outer-data own: per evaluation domain, (7) gets that domain's own pairs (DPO and lam term) and (5) its
    prompts, from a copy of the vanilla RM; the control gets the same with the DPO term off and no calibration;
    phi_of reads the per-domain RM."""
    calls, calibrated = [], []
    monkeypatch.setattr(train.metarm, "draw_problem", lambda *a: "probe")
    monkeypatch.setattr(
        train.metarm, "calibrate", lambda model, rm, phi, probe, cfg, tr: calibrated.append(probe) or {}
    )

    def fake_train(model, rm, phi, domains, bt_pairs, cfg, theta_ref, gen, bt_gen, dpo_term=True, keep_steps=()):
        calls.append((domains, bt_pairs, dpo_term, gen.initial_seed(), bt_gen.initial_seed()))
        phi["w"].data += len(calls)
        return [{"F": 1.0, "margin": 0.5}]

    monkeypatch.setattr(train.metarm, "train_bilevel", fake_train)
    own = {"a": ("A chosen", "A rejected"), "b": ("B chosen", "B rejected")}
    s = SimpleNamespace(domains=["a", "b"], prompts={"a": "A prompts", "b": "B prompts"}, own_pairs=own)
    s.model, s.rm, s.device, s.theta_ref = None, None, "cpu", {}
    phi = {"w": torch.zeros(1)}
    phis, curvature = train.train_own_data_bilevel(0, train.Config(), s, phi, dpo_term=True)
    assert [c[0] for c in calls] == [{"a": ("A prompts", own["a"])}, {"b": ("B prompts", own["b"])}]
    assert [c[1] for c in calls] == [own["a"], own["b"]]
    assert [c[2] for c in calls] == [True, True]
    assert [c[3:] for c in calls] == [(4, 5), (4, 5)]  # seed 0's draws for every domain, and for the control
    assert curvature["a"]["margins"] == [0.5]
    assert calibrated == [{"a": "probe"}, {"b": "probe"}]
    assert phis["a"]["w"].item() == 1.0
    assert phis["b"]["w"].item() == 2.0
    assert phi["w"].item() == 0.0  # the vanilla RM itself is untouched
    per_domain = {"bakery": phis["a"], "camera": phis["b"]}  # keyed by domain names, as train.py keys them
    assert evaluation.phi_of({"bilevel": per_domain}, "bilevel", "camera") is phis["b"]
    assert evaluation.phi_of({"bilevel": phi}, "bilevel", "b") is phi
    calls.clear()
    train.train_own_data_bilevel(0, train.Config(), s, phi, dpo_term=False)
    assert [c[2] for c in calls] == [False, False]
    assert [c[3:] for c in calls] == [(4, 5), (4, 5)]
    assert len(calibrated) == 2


def test_s52_shifted_accuracy_and_judged_comparisons_by_hand(monkeypatch):
    """MetaRM's mechanism: each RM's accuracy against the gold order on every within-prompt pair of the same shifted
    samples (by hand); the comparisons a run judges: primary, then the positive control's and DPO's, each once."""
    monkeypatch.setattr(train.policy, "reward", lambda rm, phi, b: b["r"] * phi)
    s = SimpleNamespace(metarm_cfg=SimpleNamespace(k=3), rm=None)
    samples = {"r": T64(3.0, 1.0, 1.0, 0.0, 1.0, 2.0), "g": T64(2.0, 0.0, 5.0, 1.0, 1.0, 3.0)}
    out = train.shifted_accuracy(s, {"vanilla_rm": 1.0, "metarm_eta0": -1.0}, 0.0, samples, lambda b: b["g"])
    # pairs: right, wrong, RM tie; gold tie (left out), right, right -> 3.5 / 5; phi = -1 flips every non-tie;
    # phi = 0 ties every pair
    assert out == {"metarm": pytest.approx(0.5), "vanilla_rm": pytest.approx(0.7), "metarm_eta0": pytest.approx(0.3)}
    every = list(train.METHODS)
    assert train.judged_comparisons(train.Config(), every) == train.COMPARISONS + (
        ("dpo", "sft"),
        ("dpo", "vanilla_rm"),
    )
    own = train.judged_comparisons(train.Config(outer_data="own"), ["vanilla_rm", "bilevel", "bilevel_bt_only"])
    assert own == train.COMPARISONS + (("bilevel_bt_only", "vanilla_rm"), ("bilevel", "in_domain_rm"))


# ==== bilevel.py: products, solvers and hypergradients on closed-form problems =======================================
def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=f64)


def _sym(n, cond, gen, shift=0.0):
    """Random symmetric matrix with eigenvalues log-spaced in [1, cond], minus shift."""
    Q = torch.linalg.qr(_randn(gen, n, n))[0]
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=f64) - shift) @ Q.T


def _mv(A):
    return lambda u: {"x": A @ u["x"]}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _eye(n):
    return torch.eye(n, dtype=f64)


# bilevel.quadratic_problem's closed forms (θ*, v*, ∇F by torch.linalg.solve) share no code with the solvers
# under test
def quadratic():
    return bilevel.quadratic_problem(G(0), n=9, p=4, cond=20.0, gamma=0.3)


def test_hvp_both_modes_and_mixed_vjp_match_explicit_derivatives():
    """hvp (both modes) = explicit Hessian @ v; mixed_vjp = (d_phi grad_theta g)^T v from the explicit Jacobian."""
    x, params, v = (
        _randn(gen := G(1), 3),
        {"W": _randn(gen, 4, 3), "b": _randn(gen, 4)},
        {"W": _randn(gen, 4, 3), "b": _randn(gen, 4)},
    )

    def fn(p):
        return (torch.tanh(p["W"] @ x + p["b"]) ** 2).sum() + (p["b"] ** 3).sum()

    H = torch.autograd.functional.hessian(*flat_fn(params, fn))
    for mode in ["rev", "fwd"]:
        torch.testing.assert_close(
            flat_fn(bilevel.hvp(fn, params, v, mode=mode), None)[1], H @ flat_fn(v, None)[1], rtol=0, atol=1e-12
        )
    M, theta, phi, u = _randn(gen, 5, 3), _randn(gen, 5), _randn(gen, 3), _randn(gen, 5)

    def g(th, ph):
        return torch.sin(th["t"] @ M @ ph["p"]) + (th["t"] ** 2).sum() * (ph["p"] ** 2).sum()

    mixed = torch.autograd.functional.jacobian(
        lambda ph: torch.func.grad(lambda t: g({"t": t}, {"p": ph}))(theta), phi
    )
    torch.testing.assert_close(
        bilevel.mixed_vjp(g, {"t": theta}, {"p": phi}, {"t": u})["p"], mixed.T @ u, rtol=0, atol=1e-12
    )


def test_cg_solves_spd_systems_warns_and_raises():
    """CG vs linalg.solve in <= 1.5 n iterations, A-norm error falling at every k; damping; warnings; NaN raises."""
    n, gen = 30, G(3)
    A, b = _sym(n, 100.0, gen), {"x": _randn(gen, n)}
    x_true = torch.linalg.solve(A, b["x"])
    x, info = bilevel.cg(_mv(A), b, max_iter=3 * n, tol=1e-12)
    assert info["converged"]
    assert info["iterations"] <= 1.5 * n
    assert info["hvps"] == info["iterations"]
    assert _rel(x["x"], x_true) < 1e-10

    def a_norm(e):
        return float(torch.sqrt(e @ A @ e))

    with pytest.warns(UserWarning, match=r"max_iter\): residual norm"):
        errors = [a_norm(x_true)] + [
            a_norm(bilevel.cg(_mv(A), b, max_iter=k, tol=1e-12)[0]["x"] - x_true) for k in range(1, 17)
        ]
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:]))
    H, b = _sym(10, 10.0, gen, shift=2.0), {"x": _randn(gen, 10)}
    x, info = bilevel.cg(_mv(H), b, max_iter=50, tol=1e-13, damping=3.0)
    assert info["converged"]
    assert _rel(x["x"], torch.linalg.solve(H + 3.0 * _eye(10), b["x"])) < 1e-10
    with pytest.warns(UserWarning, match="not SPD.*residual norm"):
        _, info = bilevel.cg(_mv(H - 5.0 * _eye(10)), b, 50, 1e-12)
    assert not info["converged"]
    assert info["negative_curvature"]
    for bb, mv in (({"x": torch.full((10,), math.nan, dtype=f64)}, _mv(H)), (b, lambda u: {"x": u["x"] * math.nan})):
        with pytest.raises(FloatingPointError):
            bilevel.cg(mv, bb, 5, 1e-8)


def test_neumann_error_within_spectral_bound_and_damping():
    """Neumann: v_J - v* = -(I - aA)^{J+1} v*, grad F error <= |B| max|1 - a lambda|^{J+1} |v*|; damping; NaN
    raises."""
    q = quadratic()
    alpha = 1.5 / float(q["eigs"].max())
    rate, B_norm = float((1 - alpha * q["eigs"]).abs().max()), float(torch.linalg.matrix_norm(q["B"], 2))
    for J in [5, 20, 80]:
        grad, info = bilevel.hypergrad_implicit(q["f"], q["g"], q["theta_star"], q["phi"], "neumann", alpha=alpha, J=J)
        error = -torch.linalg.matrix_power(_eye(len(q["eigs"])) - alpha * q["A"], J + 1) @ q["v_star"]
        torch.testing.assert_close(q["flat"](info["v"]) - q["v_star"], error, rtol=0, atol=1e-10)
        assert float((grad["phi"] - q["exact"]["phi"]).norm()) <= B_norm * rate ** (J + 1) * float(
            q["v_star"].norm()
        ) * (1 + 1e-8)
        assert info["hvps"] == J + 2  # J terms, the residual check, the mixed product
    H, b = _sym(8, 5.0, G(6)), {"x": _randn(G(7), 8)}
    x, info = bilevel.neumann(_mv(H), b, alpha=1 / 5.5, J=300, damping=0.5, tol=1e-10)
    assert info["converged"]
    assert _rel(x["x"], torch.linalg.solve(H + 0.5 * _eye(8), b["x"])) < 1e-10
    with pytest.raises(FloatingPointError):
        bilevel.neumann(lambda u: {"x": u["x"] * math.nan}, b, alpha=0.1, J=3)


def test_lanczos_extremes_and_inner_solvers_on_quadratic():
    """Lanczos vs eigvalsh (exact at m = n, inside for m < n); GD error <= (1 - 1/cond)^T |theta*|; Newton reaches
    theta*."""
    H = _sym(12, 20.0, gen := G(7), shift=4.0)
    eigs, v0 = torch.linalg.eigvalsh(H), {"x": _randn(gen, 12)}
    lo, hi, _ = bilevel.lanczos_eigs(_mv(H), v0, m=12)
    assert abs(lo - eigs[0]) < 1e-9
    assert abs(hi - eigs[-1]) < 1e-9
    assert lo < 0
    lo, hi, info = bilevel.lanczos_eigs(_mv(H), v0, m=6)
    assert eigs[0] - 1e-12 <= lo <= hi <= eigs[-1] + 1e-12
    assert info["hvps"] == 6
    q, T = quadratic(), 50
    lam_min, lam_max = float(q["eigs"].min()), float(q["eigs"].max())
    theta, info = bilevel.inner_solve(q["g"], q["theta0"], q["phi"], T, 1 / lam_max)
    assert float((q["flat"](theta) - q["flat"](q["theta_star"])).norm()) <= (1 - lam_min / lam_max) ** T * float(
        q["flat"](q["theta_star"]).norm()
    )
    assert info["steps"] == T
    assert len(info["grad_norms"]) == T
    theta, info = bilevel.newton_solve(q["g"], q["theta0"], q["phi"], tol=1e-10)
    assert info["converged"]
    assert _rel(q["flat"](theta), q["flat"](q["theta_star"])) < 1e-12


def test_implicit_cg_closed_form_and_unrolled_error_shrinks():
    """(8) by CG = B^T A^-1 (theta* - theta_t) + gamma phi (both HVP modes); unrolled error(T = 1000) < 1e-3 error(T =
    10)."""
    q = quadratic()
    for mode in ["rev", "fwd"]:
        grad, info = bilevel.hypergrad_implicit(
            q["f"], q["g"], q["theta_star"], q["phi"], "cg", hvp_mode=mode, max_iter=100, tol=1e-12
        )
        assert info["converged"]
        assert _rel(grad["phi"], q["exact"]["phi"]) < 1e-8
    lr = 1 / float(q["eigs"].max())
    error = {
        T: _rel(bilevel.hypergrad_unrolled(q["f"], q["g"], q["theta0"], q["phi"], T, lr)[0]["phi"], q["exact"]["phi"])
        for T in [10, 1000]
    }
    assert error[1000] < 1e-3 * error[10]


def test_implicit_ridge_analytic_and_logistic_finite_differences():
    """Ridge: (8) = grad f . (-(X^T X + lam I)^-1 theta*); logistic: (8) vs hypergrad_fd_full (1e-5); hypergrad_fd of
    sin."""
    X, y, Xv, yv = _randn(gen := G(8), 40, 6), _randn(gen, 40), _randn(gen, 20, 6), _randn(gen, 20)

    def g(th, ph):
        return 0.5 * ((X @ th["w"] - y) ** 2).sum() + 0.5 * ph["lam"] * (th["w"] ** 2).sum()

    def f(th, ph):
        return ((Xv @ th["w"] - yv) ** 2).mean()

    K = X.T @ X + 0.7 * _eye(6)
    theta_star = torch.linalg.solve(K, X.T @ y)
    expected = (2 / 20) * (Xv.T @ (Xv @ theta_star - yv)) @ -torch.linalg.solve(K, theta_star)
    grad, _ = bilevel.hypergrad_implicit(f, g, {"w": theta_star}, {"lam": T64(0.7)[0]}, "cg", max_iter=50, tol=1e-13)
    assert float(grad["lam"]) == pytest.approx(float(expected), rel=1e-9)
    q = bilevel.logistic_problem(gen, m=60, d=5, log_lam=-3.0)
    theta_star, info = bilevel.newton_solve(q["g"], q["theta0"], q["phi"], tol=1e-12)
    grad, _ = bilevel.hypergrad_implicit(q["f"], q["g"], theta_star, q["phi"], "cg", max_iter=100, tol=1e-12)
    assert info["converged"]
    assert _rel(grad["log_lam"], bilevel.hypergrad_fd_full(q["F"], q["phi"])["log_lam"]) < 1e-5
    p, d = {"p": T64(0.3, -1.2)}, {"p": T64(1.0, 2.0)}
    assert bilevel.hypergrad_fd(lambda ph: torch.sin(ph["p"]).sum(), p, d) == pytest.approx(
        dot({"p": torch.cos(p["p"])}, d), abs=1e-9
    )


# ==== data.py: the world (v3) ========================================================================================
def test_world_is_deterministic_and_round_trips(world, tmp_path):
    """Same seed, same world; decode(encode) round trip, unknown words refused; JSONL round trip, a bad line named
    file:line."""
    again, other = data.World(TINY_WORLD), data.World(data.WorldConfig(**{**TINY_WORLD.__dict__, "seed": 1}))
    assert again.sft == world.sft
    assert again.pairs == world.pairs
    assert again.eval_pairs == world.eval_pairs
    assert other.sft != world.sft
    assert other.pairs != world.pairs
    assert all(world.encode(world.decode(s)) == s for s in world.sft[:200])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        world.encode("the pizza was yummy")
    pairs, path = world.eval_pairs["bakery"][:5] + world.pairs["bar"][:5], tmp_path / "pairs.jsonl"
    data.save_pairs_jsonl(world, pairs, path)
    assert set(json.loads(path.read_text().splitlines()[0])) == {"prompt", "chosen", "rejected", "domain"}
    assert data.load_pairs_jsonl(world, path) == pairs
    path.write_text(
        "\n".join(path.read_text().splitlines()[:2] + ['{"prompt": "<bos> <bar> honestly the beer", "chosen": 3}'])
    )
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: malformed"):
        data.load_pairs_jsonl(world, path)


def test_gold_reward_worked_example_and_agnostic_reward(world):
    """data.py's worked example by hand; no <eos> -1; distinct words; off-topic -0.5; agnostic: shared words only;
    tags."""
    y = world.encode("flaky and very cold , but the baker was great . <eos>")
    assert world.gold_reward("bakery", y) == pytest.approx(0.5)
    assert world.gold_reward("bakery", y[:-1]) == pytest.approx(-0.5)
    assert world.gold_reward("bakery", world.encode("great great great . <eos>")) == 1.0
    assert world.gold_reward("bakery", world.encode("tasty . <eos>")) == data.OFF_TOPIC
    assert world.agnostic_reward(y) == 1.0
    assert world.agnostic_reward(world.encode("cold and bad")) == -1.5
    assert world.gold_rewards([world.encode("<bos> <laptop> honestly the fan was cold . <eos>")]) == [1.5]


def test_world_categories_fix_the_flip_signs(world):
    """Flip-word polarity = +-FLIP_WEIGHT by the category's signs (cold: food -, tech +); each new domain's category
    has exactly two training domains and departs from their majority on 2-4 flip words; prompts use the category's
    nouns."""
    assert set(world.category) == set(data.DOMAINS)
    assert set(world.category.values()) == set(data.CATEGORIES)
    assert (world.polarity["bakery"]["cold"], world.polarity["laptop"]["cold"], world.polarity["spa"]["long"]) == (
        -1.5,
        1.5,
        1.5,
    )
    for d, cat in world.category.items():
        signs = data.CATEGORIES[cat][1]
        assert [world.polarity[d][w] for w in data.FLIP] == [data.FLIP_WEIGHT * (1 if s == "+" else -1) for s in signs]
        assert all(any(world.stoi[n] in x for x in world.prompts[d]) for n in data.CATEGORIES[cat][0].split())
    majority = {w: sum(world.polarity[t][w] for t in data.TRAIN_DOMAINS) > 0 for w in data.FLIP}
    for d in data.DEV_DOMAINS + data.TEST_DOMAINS:
        assert sum(world.category[t] == world.category[d] for t in data.TRAIN_DOMAINS) == 2, d
        assert 2 <= sum((world.polarity[d][w] > 0) != majority[w] for w in data.FLIP) <= 4, d


def test_sft_reviews_have_two_clauses_of_two_adjectives(world):
    """Every SFT review: <bos> <d> opener the N was A and B , and|but the N2 was C and D . <eos> (+ intensifiers)."""
    adjectives = (
        set(data.SHARED) | set(data.FLIP) | {w for v in data.DOMAINS.values() for w in (v[2] + " " + v[3]).split()}
    )
    for s in world.sft:
        w = [x for x in world.decode(s).split() if x not in data.INTENSIFIERS]
        assert len(w) == 19
        assert w[3] == w[11] == "the"
        assert w[5] == w[13] == "was"
        assert w[9] == ","
        assert w[10] in ("and", "but")
        assert w[7] == w[15] == "and"
        assert w[17:] == [".", data.EOS]
        assert w[6] != w[8]
        assert w[14] != w[16]
        assert {w[6], w[8], w[14], w[16]} <= adjectives, world.decode(s)


def test_pairs_everywhere_and_new_aspect_words_only_in_their_own_text(world):
    """Pairs for every domain; a new domain's aspect words occur in no training domain's text, pairs or prompts, but in
    the SFT corpus and that domain's prompts."""
    assert all(len(world.pairs[d]) == 40 and len(world.eval_pairs[d]) == 20 for d in data.DOMAINS)
    train_tags = {world.stoi[f"<{t}>"] for t in data.TRAIN_DOMAINS}
    train_texts = (
        [s for s in world.sft if s[1] in train_tags]
        + [x for t in data.TRAIN_DOMAINS for x in world.prompts[t]]
        + [p.prompt + p.chosen + p.rejected for t in data.TRAIN_DOMAINS for p in world.pairs[t] + world.eval_pairs[t]]
    )
    for d in data.DEV_DOMAINS + data.TEST_DOMAINS:
        new = {world.stoi[w] for w, dd in world.aspect_of.items() if dd == d}
        assert not any(new & set(x) for x in train_texts)
        assert any(new & set(s) for s in world.sft)
        assert any(new & set(x) for x in world.prompts[d])


def test_bradley_terry_labels_agree_at_the_temperature_rate():
    """P(chosen has the higher gold reward) = mean sigmoid(|r1 - r2| / tau), within 4 standard errors."""
    w = data.World(
        data.WorldConfig(
            n_sft_per_domain=1,
            n_sft_per_new_domain=1,
            n_pairs_per_domain=600,
            n_eval_pairs_per_domain=1,
            label_temperature=0.7,
        )
    )
    diffs = [
        x
        for x in (
            w.gold_reward(d, p.chosen) - w.gold_reward(d, p.rejected) for d in data.TRAIN_DOMAINS for p in w.pairs[d]
        )
        if x
    ]
    p_hat = sum(x > 0 for x in diffs) / len(diffs)
    p_exp = sum(1 / (1 + math.exp(-abs(x) / 0.7)) for x in diffs) / len(diffs)
    assert abs(p_hat - p_exp) < 4 * math.sqrt(p_exp * (1 - p_exp) / len(diffs))
    assert p_exp < 0.95


# ==== policy.py ======================================================================================================
SOME_TEXTS = [
    ("<bos> <bar> honestly the beer was", "cold and great . <eos>"),
    ("<bos> <bakery> today the bread was", "stale , but the baker was very nice . <eos>"),
    ("<bos> <hotel> frankly the room was", "spotless . <eos>"),
]


def texts(world, model, items=SOME_TEXTS):
    return batch_of(model, [world.encode(x) for x, _ in items], [world.encode(y) for _, y in items])


def test_features_and_logits_match_the_manual_forward(world, tiny_gpt):
    """GPT.features: h = ln_f(final stream), h_mid = the stream before the last block; model(idx) = head(h),
    <pad>/<bos> pinned."""
    idx = texts(world, tiny_gpt)["idx"]
    (h, h_mid, _), (want_h, want_mid), logits = tiny_gpt.features(idx), manual_stream(tiny_gpt, idx), tiny_gpt(idx)[0]
    torch.testing.assert_close(h, want_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_mid, want_mid, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits[..., 2:], tiny_gpt.head(want_h)[..., 2:], rtol=0, atol=1e-12)
    assert (logits[..., :2] < -1e8).all()


def test_logprob_is_sum_of_per_prefix_log_softmax(world, tiny_gpt):
    """logprob (head path) = sum of log-softmax of each prefix run alone = logp_ref at theta_ref = logprob("all"
    path)."""
    b = texts(world, tiny_gpt)
    got = policy.logprob(tiny_gpt, policy.adapted_params(tiny_gpt), b)
    for i, (x, y) in enumerate(SOME_TEXTS):
        x, y = world.encode(x), world.encode(y)
        want = sum(
            torch.log_softmax(tiny_gpt(torch.tensor([x + y[:t]]))[0][0, -1], -1)[y[t]].item() for t in range(len(y))
        )
        assert got[i].item() == pytest.approx(want, abs=1e-10)
    torch.testing.assert_close(got, b["logp_ref"], rtol=0, atol=1e-12)
    torch.testing.assert_close(
        policy.logprob(tiny_gpt, policy.adapted_params(tiny_gpt, "all"), b), got, rtol=0, atol=1e-12
    )
    with pytest.raises(ValueError):
        policy.adapted_params(tiny_gpt, "trunk")


def test_sample_structure_and_collected_features(world, tiny_gpt):
    """Samples: [prompt | response ending in <eos> | pad], mask on the response, reproducible; the features collected
    while sampling (key/value cache) equal a fresh encode; theta is the policy that samples."""
    prompts = torch.tensor([world.prompts["bar"][0]] * 64)
    b = policy.sample(tiny_gpt, {}, prompts, 12, G(3))
    assert torch.equal(b["idx"], policy.sample(tiny_gpt, {}, prompts, 12, G(3))["idx"])
    for row, m in zip(b["idx"], b["mask"]):
        resp = row[data.PROMPT_LEN :].tolist()
        n = resp.index(policy.EOS_ID) + 1 if policy.EOS_ID in resp else len(resp)
        assert policy.PAD_ID not in resp[:n]
        assert all(t == policy.PAD_ID for t in resp[n:])
        assert m[data.PROMPT_LEN :].sum() == n == m.sum()
    fresh = policy.encode(tiny_gpt, b["idx"], b["mask"])
    for k in ("h", "h_mid", "logp_ref"):
        torch.testing.assert_close(b[k], fresh[k], rtol=0, atol=1e-10)
    theta = {
        **policy.adapted_params(tiny_gpt),
        "head.bias": tiny_gpt.head.bias.index_fill(0, torch.tensor([policy.EOS_ID]), 1e4),
    }  # stops
    assert (policy.sample(tiny_gpt, theta, prompts, 12, G(0))["idx"][:, data.PROMPT_LEN] == policy.EOS_ID).all()


def test_reward_model_is_a_copy_of_the_last_block_summed_over_the_response(world, tiny_gpt):
    """make_reward_model copies pi_ref's last block and ln_f, new head; reward = manual_reward, unchanged by batch or
    padding."""
    rm, phi = policy.make_reward_model(tiny_gpt, G(0))
    assert all(torch.equal(phi["block." + n], p) for n, p in tiny_gpt.h[-1].named_parameters())
    assert torch.equal(phi["ln.weight"], tiny_gpt.ln_f.weight)
    assert (phi["head.bias"] == 0).all()
    assert phi["head.weight"].std() > 0
    phi, b = jitter(phi, 0.3, 1), texts(world, tiny_gpt)
    r = policy.reward(rm, phi, b)
    torch.testing.assert_close(r, manual_reward(tiny_gpt, rm, phi, b["idx"], b["mask"]), rtol=0, atol=1e-12)
    for i, item in enumerate(SOME_TEXTS):
        one = texts(world, tiny_gpt, [item])
        for bb in (one, policy.encode(tiny_gpt, F.pad(one["idx"], (0, 5)), F.pad(one["mask"], (0, 5)))):
            assert policy.reward(rm, phi, bb).item() == pytest.approx(r[i].item(), abs=1e-10)
            assert policy.logprob(tiny_gpt, policy.adapted_params(tiny_gpt), bb).item() == pytest.approx(
                b["logp_ref"][i].item(), abs=1e-10
            )


def test_jvp_of_logprob_and_sft(world, tiny_gpt):
    """jvp of log pi_theta over every parameter = a central difference; 60 SFT steps halve held-out perplexity."""
    b, theta = texts(world, tiny_gpt), {n: p.detach() for n, p in policy.adapted_params(tiny_gpt, "all").items()}
    v = randn_like(theta, 1)

    def fn(th):
        return policy.logprob(tiny_gpt, th, b)

    fd = (fn(bilevel.add(theta, v, 1e-6)) - fn(bilevel.add(theta, v, -1e-6))) / 2e-6  # per row: not a scalar F
    torch.testing.assert_close(torch.func.jvp(fn, (theta,), (v,))[1], fd, rtol=1e-6, atol=1e-8)
    torch.manual_seed(0)
    model = policy.GPT(policy.GPTConfig(vocab_size=len(world.vocab), n_layer=1, n_head=2, n_embd=32))
    before = policy.perplexity(model, world.sft[:100])
    policy.sft(model, world.sft[100:], steps=60, batch_size=32, lr=3e-3, generator=G(0), progress=False)
    assert policy.perplexity(model, world.sft[:100]) < 0.5 * before


# ==== train.py: statistics, the pipeline, bad input (evaluation: §3 above) ==========================================
def test_t_quantile_and_interval():
    """t quantiles (tables); interval = mean +- t(n - 1) s / sqrt(n) by hand."""
    assert [evaluation.t_quantile(df) for df in (9, 2, 29)] == pytest.approx([2.262157, 4.302653, 2.045230], abs=1e-4)
    iv, half = evaluation.interval([1.0, 2.0, 4.0]), 4.302653 * math.sqrt(7 / 3 / 3)  # mean 7/3, s^2 = 7/3
    assert iv["n_seeds"] == 3
    assert iv["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half], abs=1e-5)
    assert evaluation.interval([0.5]) == {"mean": 0.5, "ci95": None, "n_seeds": 1}


def test_decide_by_hand_on_every_case_and_boundary():
    """METHOD.md §5.1 with delta = 0.1: each verdict, its precedence, each boundary (lo = 0, hi = 0, lo = -delta,
    hi = delta fall to the next case), the paper's direction; decide's benefit-excluded flag and MDE by hand, with
    the df = 1 and df = 2 t quantiles in closed form: tan(pi (p - 1/2)) and sqrt(2 a^2 / (1 - a^2)), a = 2p - 1."""
    cases = [
        ([0.05, 0.3], 1, "reproduced"),
        ([0.0, 0.3], 1, "undetermined"),  # lo = 0: not above 0
        ([0.01, 0.05], 1, "reproduced"),  # inside +-delta too: reproduced comes first
        ([-0.3, -0.05], 1, "contradicted"),
        ([-0.3, 0.0], 1, "undetermined"),  # hi = 0: not below 0
        ([-0.05, -0.01], 1, "contradicted"),  # inside +-delta too: contradicted comes first
        ([-0.05, 0.05], 1, "absent"),
        ([-0.0999, 0.0999], 1, "absent"),
        ([-0.1, 0.05], 1, "undetermined"),  # lo = -delta: not strictly inside
        ([-0.05, 0.1], 1, "undetermined"),  # hi = delta: not strictly inside
        ([-0.3, -0.05], -1, "reproduced"),
        ([0.05, 0.3], -1, "contradicted"),
        ([-0.05, 0.05], -1, "absent"),
        (None, 1, "undetermined"),
    ]
    assert [evaluation.verdict(ci, 0.1, d) for ci, d, _ in cases] == [v for _, _, v in cases]
    t2 = {p: math.sqrt(2 * (2 * p - 1) ** 2 / (1 - (2 * p - 1) ** 2)) for p in (0.975, 0.8)}
    se = math.sqrt(7 / 9)  # diffs 3, 4, 6: s^2 = 7/3, n = 3; interval 13/3 +- 4.3027 se: about [0.54, 8.13]
    out = evaluation.decide([3.0, 4.0, 6.0], 0.5, min_seeds=3)
    assert out["verdict"] == "reproduced"
    assert out["delta"] == 0.5
    assert out["benefit_excluded"] is False
    assert out["mde80"] == pytest.approx((t2[0.975] + t2[0.8]) * se, rel=1e-6)
    small = evaluation.decide(
        [0.01, 0.02, 0.04], 0.5, min_seeds=3
    )  # interval 7/300 +- 4.3027 se / 100: about [-0.015, 0.061]
    assert small["verdict"] == "absent"
    assert small["benefit_excluded"] is True
    assert small["mde80"] == pytest.approx((t2[0.975] + t2[0.8]) * se / 100, rel=1e-6)
    flipped = evaluation.decide([-3.0, -4.0, -6.0], 0.5, direction=-1, min_seeds=3)
    assert flipped["verdict"] == "reproduced"
    assert flipped["benefit_excluded"] is False
    assert evaluation.decide([0.3], 0.1, min_seeds=1) == {
        "mean": 0.3,
        "ci95": None,
        "n_seeds": 1,
        "delta": 0.1,
        "verdict": "undetermined",
        "benefit_excluded": None,
        "mde80": None,
    }
    # the registered minimum, 10 seeds: below it no verdict, whatever the interval; None values do not count
    assert evaluation.decide([3.0, 4.0, 6.0], 0.5)["verdict"] == "undetermined (fewer than 10 seeds)"
    ten = [3.0, 4.0, 6.0] * 3 + [4.0, None]
    assert evaluation.decide(ten, 0.5)["verdict"] == "reproduced"
    assert evaluation.decide(ten[:-2] + [None, None], 0.5)["verdict"] == "undetermined (fewer than 10 seeds)"


def test_matched_kl_and_within_prompt_accuracy_by_hand():
    """Jia's frontier at matched KL (METHOD.md §5.1): gold on the piecewise-linear curve in log KL, inside a segment,
    at a point, extended beyond either end, undefined at KL <= 0 or two points at one KL; matched_kl's per-seed
    differences and counts. The RM's accuracy on all pairs of samples of the same prompt (rlhf_rounds) by hand."""
    e = math.e
    curve = [(1.0, 0.0), (e, 1.0), (e**3, 2.0)]  # log KL 0, 1, 3
    assert evaluation.gold_at_kl(curve, e**0.5) == (pytest.approx(0.5), False)
    assert evaluation.gold_at_kl(curve, e**2) == (pytest.approx(1.5), False)
    assert evaluation.gold_at_kl(curve, e) == (pytest.approx(1.0), False)
    assert evaluation.gold_at_kl(list(reversed(curve)), e**4) == (pytest.approx(2.5), True)
    assert evaluation.gold_at_kl(curve, e**-1) == (pytest.approx(-1.0), True)
    assert evaluation.gold_at_kl(curve, 0.0) == (None, False)
    assert evaluation.gold_at_kl([(1.0, 0.0), (1.0, 1.0), (e, 2.0)], 1.5) == (None, False)
    assert evaluation.gold_at_kl([(-0.1, 0.0), (e, 1.0), (e**3, 2.0)], 1.5) == (None, False)
    values = {
        "vanilla_rm": {"0.5": {"kl": [e, e**2, e, e**4], "gold_reward": [0.5, 1.0, 0.0, 2.0]}},
        "bilevel": {
            "0.25": {"kl": [e**3, e**3, -1.0, e**3], "gold_reward": [2.0, 2.0, 0.0, 2.0]},
            "0.5": {"kl": [e, e, e, e], "gold_reward": [1.0, 1.0, 0.0, 1.0]},
            "1.0": {"kl": [1.0, 1.0, 1.0, 1.0], "gold_reward": [0.0, 0.0, 0.0, 0.0]},
        },
    }
    out = evaluation.matched_kl(values, "0.5", [0, 1, 2, 3])
    # 1.0 - 0.5; 1.5 - 1.0; KL -1: undefined; log KL 4 beyond the curve: 2.5 - 2.0 on the extended last segment
    assert out["per_seed"] == [pytest.approx(0.5), pytest.approx(0.5), None, pytest.approx(0.5)]
    assert (out["n_seeds"], out["undefined_seeds"], out["extended_seeds"]) == (3, 1, 1)
    assert out["ci95"] == [pytest.approx(0.5), pytest.approx(0.5)]  # three equal differences: s = 0
    assert out["verdict"] == "undetermined (fewer than 10 seeds)"
    # 2 prompts x k = 3. Prompt 1: pairs (0,1) right, (0,2) wrong, (1,2) an RM tie (1/2); prompt 2: one gold tie
    r = T64(3.0, 1.0, 1.0, 0.0, 1.0, 2.0)
    g = T64(2.0, 0.0, 5.0, 1.0, 1.0, 3.0)
    assert evaluation.within_prompt_accuracy(r, g, 3) == pytest.approx((1 + 0 + 0.5 + 1 + 1) / 5)
    assert evaluation.within_prompt_accuracy(r, torch.zeros(6, dtype=f64), 3) is None


def test_pool_worlds_by_hand(tmp_path, capsys):
    """METHOD.md §5.1, worlds: per-world means 0.1, 0.2, 0.6 pool to 0.3 with the t-interval over W = 3 worlds
    (df 2: t = 4.302653), s = sqrt(0.07), so the between-world spread is sqrt(0.07); differing verdicts are flagged;
    a comparison missing from a world is pooled over the others. `python plots.py` of two worlds' runs prints the
    table; two runs of one world are refused in one line."""
    names = [f"{a} - {b}" for a, b in evaluation.PREREGISTRATION["primary"]]

    def run(mean, verdict):
        return {
            "paired": {
                n: {"mean": mean, "ci95": [mean - 1, mean + 1], "n_seeds": 10, "verdict": verdict} for n in names
            }
        }

    worlds = {0: run(0.1, "absent"), 1: run(0.2, "absent"), 2: run(0.6, "reproduced")}
    del worlds[2]["paired"][names[1]]
    out = evaluation.pool_worlds(worlds)
    first = out[names[0]]
    half = 4.302653 * math.sqrt(0.07 / 3)
    assert first["pooled"]["mean"] == pytest.approx(0.3)
    assert first["pooled"]["ci95"] == pytest.approx([0.3 - half, 0.3 + half], abs=1e-5)
    assert first["pooled"]["n_seeds"] == 3
    assert first["pooled"]["verdict"] == "undetermined"  # over worlds: no 10-seed minimum
    assert first["between_world_sd"] == pytest.approx(math.sqrt(0.07))
    assert first["verdicts_differ"] is True
    assert first["per_world"][2]["verdict"] == "reproduced"
    second = out[names[1]]
    assert second["pooled"]["mean"] == pytest.approx(0.15)
    assert second["verdicts_differ"] is False
    assert list(second["per_world"]) == [0, 1]

    def write(folder, seed, mean):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({**run(mean, "absent"), "config": {"world_seed": seed}}))

    write(tmp_path / "w0", 0, 0.1)
    write(tmp_path / "w1", 1, 0.2)
    write(tmp_path / "w1b", 1, 0.6)
    assert plots.main([str(tmp_path / "w0"), str(tmp_path / "w1")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + len(names)
    assert table[2].startswith(f"| {names[0]} | world 0: +0.100 [-0.900, +1.100] absent; world 1: +0.200")
    assert plots.main([str(tmp_path / "w1"), str(tmp_path / "w1b")]) == 2
    assert "different worlds" in one_line_error(capsys)


def test_summarise_pairs_methods_by_seed_and_crn_seeds():
    """summarise: seeds' means over domains, paired difference with wins and interval by hand, ceilings; crn_seed
    distinct."""
    doms = ("taxi", "pizzeria")

    def methods(v, o):
        return (("vanilla_rm", v), ("bilevel", v + o), ("oracle", 3.0))

    def metrics(v, o):
        return {
            m: {
                d: {
                    "gold_reward": x + i,
                    "win_rate": 0.5,
                    "kl": 1.0,
                    "rm_accuracy": 0.7 if m == "vanilla_rm" else None,
                }
                for i, d in enumerate(doms)
            }
            for m, x in methods(v, o)
        }

    prem = {d: {"acc_pi_ref_samples": 0.6} for d in doms}
    out = train.summarise(
        train.Config(), [{"metrics": metrics(v, o), "premises": prem} for v, o in ((0.0, 1.0), (1.0, 3.0))]
    )
    assert out["methods"]["vanilla_rm"]["gold_reward"]["mean"] == pytest.approx(1.0)  # seeds: 0.5, 1.5
    pd, half = out["paired"]["bilevel - vanilla_rm"], 12.706205  # diffs 1, 3: s / sqrt n = 1
    assert pd["per_seed"] == [1.0, 3.0]
    assert pd["wins"] == 2
    assert pd["ci95"] == pytest.approx([2 - half, 2 + half], abs=1e-4)
    assert pd["verdict"] == "undetermined (fewer than 10 seeds)"
    assert pd["delta"] == 0.1
    assert pd["benefit_excluded"] is False
    assert pd["mde80"] == pytest.approx(12.706205 + math.tan(0.3 * math.pi), rel=1e-6)  # df = 1, SE = 1
    assert out["delta"] == {"gold_reward": 0.1, "rm_accuracy": 0.05}
    assert out["ceilings"]["oracle"]["mean"] == pytest.approx(3.5)
    assert out["methods"]["bilevel"]["rm_accuracy"] is None
    assert out["premises"]["acc_pi_ref_samples"]["mean"] == pytest.approx(0.6)
    assert len({evaluation.crn_seed(s, d, j) for s in range(12) for d in range(6) for j in range(3)}) == 12 * 6 * 3


def test_headroom_rule_by_hand():
    """The headroom rule: in_domain_rm - vanilla_rm against 3 x the widest half-width of the compared methods only (the
    ceilings' wider intervals do not count); met just above 3 x, not met just below; the line in results.md."""
    doms, t = ("taxi", "pizzeria"), 12.706205  # 2 seeds: half-width = t * |d1 - d2| / 2

    def seed(v, o, h):
        return {
            m: {d: {"gold_reward": x, "win_rate": 0.5, "kl": 1.0, "rm_accuracy": None} for d in doms}
            for m, x in (
                ("vanilla_rm", v),
                ("bilevel", v + o),
                ("metarm", v + 2 * o - 1),
                ("in_domain_rm", v + h),
                ("oracle", v + 4 * o),
            )
        }

    for headroom, met in (
        (3.02 * 2 * t, True),
        (2.98 * 2 * t, False),
    ):  # bilevel: diffs 1, 3; metarm: 1, 5 (the widest)
        per_seed = [
            {"metrics": seed(v, o, headroom + 3 * (o - 2)), "premises": {d: {"acc": 0.5} for d in doms}}
            for v, o in ((0.0, 1.0), (5.0, 3.0))
        ]
        out = train.summarise(train.Config(), per_seed)  # in_domain: headroom -+ 3 (half-width 3 t)
        rule = out["headroom_rule"]
        assert rule["compared"] == ["bilevel - vanilla_rm", "metarm - vanilla_rm"]
        assert rule["met"] is met
        assert rule["widest_half_width"] == pytest.approx(2 * t, rel=1e-6)
        assert rule["ratio"] == pytest.approx(headroom / (2 * t), rel=1e-6)
        line = [x for x in plots.results_markdown(out).splitlines() if x.startswith("Headroom")]
        assert line == [
            f"Headroom rule: in_domain_rm - vanilla_rm = {headroom:+.3f} is {headroom / (2 * t):.2f} x the widest "
            f"half-width of the 2 comparisons ({2 * t:.3f}); 3 x is required: {'met' if met else 'NOT met'}."
        ]


SMALL_WORLD = data.WorldConfig(
    n_sft_per_domain=150, n_sft_per_new_domain=40, n_pairs_per_domain=100, n_eval_pairs_per_domain=40
)
TINY_RUN = [
    "--quick",
    "--domains",
    "dev",
    "--sft-steps",
    "100",
    "--rm-steps",
    "20",
    "--adapt-steps",
    "5",
    "--eval-samples",
    "2",
    "--extra-steps",
    "2",
    "--T",
    "3",
    "--threads",
    str(THREADS),
]


def small_world(monkeypatch):
    """train.py's World() replaced by a smaller one (same vocabulary and rewards; encoding 10 000 pairs takes ~9 s)."""
    world_cls = data.World
    monkeypatch.setattr(train.data, "World", lambda *a, **k: world_cls(SMALL_WORLD))


# Every numeric flag at its boundary: 0 where >= 0 is allowed, else the smallest allowed integer (--eval-samples: 2).
BOUNDARY_RUN = [
    "--quick",
    "--domains",
    "dev",
    "--seeds",
    "1",
    "--threads",
    "0",
    "--sft-steps",
    "1",
    "--rm-steps",
    "1",
    "--ceiling-steps",
    "1",
    "--adapt-steps",
    "1",
    "--extra-steps",
    "1",
    "--repeats",
    "1",
    "--eval-samples",
    "2",
    "--K",
    "2",
    "--T",
    "1",
    "--metarm-k",
    "2",
    "--rounds",
    "2",
    "--eta",
    "0",
    "--lam",
    "0",
    "--figures",
    "1",
    "--figure-seeds",
    "1",
    "--dpo-steps",
    "1",
]
# the bilevel positive control (METHOD.md §5.2): one RM per evaluation domain from its own pairs
OWN_DATA_RUN = TINY_RUN + [
    "--outer-data",
    "own",
    "--ceiling-steps",
    "2",
    "--methods",
    "vanilla_rm,bilevel,bilevel_bt_only,in_domain_rm",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two tiny runs of the whole pipeline with the same seed, into two folders; a third with every numeric flag at
    its boundary (BOUNDARY_RUN), figures included, their fixed budgets cut to one step (only the time changes); a
    fourth of the bilevel positive control (OWN_DATA_RUN)."""
    outs = [tmp_path_factory.mktemp("run") / "out" for _ in range(4)]
    with pytest.MonkeyPatch.context() as mp:
        small_world(mp)
        assert train.main(TINY_RUN + ["--out", str(outs[0])]) == 0
        assert train.main(TINY_RUN + ["--out", str(outs[1])]) == 0
        mp.setattr(evaluation, "hypergradient_error", functools.partial(evaluation.hypergradient_error, ns=(1,)))
        mp.setattr(evaluation, "outer_convergence", functools.partial(evaluation.outer_convergence, steps=1, every=1))
        assert train.main(BOUNDARY_RUN + ["--out", str(outs[2])]) == 0
        assert train.main(OWN_DATA_RUN + ["--out", str(outs[3])]) == 0
    return outs


def test_own_data_run_judges_the_positive_control_s_comparisons(tiny_run):
    """OWN_DATA_RUN: the positive control's comparisons judged by the verdict rule, in_domain_rm a ceiling, one
    calibration per evaluation domain, no hypergradient accuracy check (its reference is the main run's)."""
    res = json.loads((tiny_run[3] / "results.json").read_text())
    judged = [f"{a} - {b}" for a, b in train.OWN_DATA_COMPARISONS]
    assert set(judged) <= set(res["paired"])
    assert all(res["paired"][c]["verdict"] == "undetermined (fewer than 10 seeds)" for c in judged)
    assert res["paired"]["in_domain_rm - vanilla_rm"]["verdict"] == "n/a (a ceiling)"
    assert list(res["bilevel_curvature"][0]) == data.DEV_DOMAINS
    assert "hypergradient_accuracy" not in res
    assert res["methods"]["bilevel"]["gold_reward"] != res["methods"]["bilevel_bt_only"]["gold_reward"]


def test_every_flag_at_its_boundary_runs_and_its_reused_runs_are_exact(tiny_run):
    """BOUNDARY_RUN ran through every stage, the figures' too. At eta = 0 metarm's own rounds give metarm_eta0's every
    metric; at lam = 0 bilevel_bt_only is the vanilla RM's run (no step to take), and results.json says so."""
    res = json.loads((tiny_run[2] / "results.json").read_text())
    assert res["config"]["eta"] == 0 and res["config"]["lam"] == 0 and res["config"]["K"] == 2
    assert set(res["methods"]) == set(train.METHODS)
    assert set(res["figures"]) == {
        "frontier",
        "rlhf_rounds",
        "hypergradient_error",
        "outer_convergence",
        "training_curves",
    }
    assert res["methods"]["metarm"] == res["methods"]["metarm_eta0"]
    # (the vanilla RM's shifted_accuracy is measured on MetaRM's samples X_s, a reference, not a reused run)
    assert res["methods"]["bilevel_bt_only"] == {**res["methods"]["vanilla_rm"], "shifted_accuracy": None}
    assert list(res["reused_runs"]) == ["bilevel_bt_only"]
    assert "reused_runs" not in json.loads((tiny_run[0] / "results.json").read_text())


def test_pipeline_is_deterministic_writes_the_schema_and_the_oracle_beats_sft(tiny_run):
    """Byte-identical results.json; every output; results.json's schema (paired, ceilings, premises); samples' gold
    rewards recomputed from their text; SFT has KL 0; the oracle beats SFT."""
    out = tiny_run[0]
    assert (out / "results.json").read_bytes() == (tiny_run[1] / "results.json").read_bytes()
    names = (
        "results.json",
        "results.md",
        "samples.jsonl",
        "timings.json",
        "train_pairs.jsonl",
        "dev_pairs.jsonl",
        "eval_pairs.jsonl",
    )
    assert all((out / n).is_file() for n in names)
    assert not out.with_name("out.partial").exists()
    assert not out.with_name("out.old").exists()
    res = json.loads((out / "results.json").read_text())
    assert {
        "config",
        "domains",
        "methods",
        "paired",
        "ceilings",
        "premises",
        "world_version",
        "sft_val_perplexity",
        "bilevel_curvature",
    } <= set(res)
    assert "out" not in res["config"]
    assert res["world_version"] == data.WORLD_VERSION
    assert set(res["methods"]) == set(train.METHODS)
    assert res["domains"] == data.DEV_DOMAINS
    for m, metrics in res["methods"].items():
        for k, v in metrics.items():
            no_rm = k == "rm_accuracy" and m not in train.RM_METHODS
            not_on_x_s = k == "shifted_accuracy" and m not in ("metarm", "metarm_eta0", "vanilla_rm")
            assert (v is None) == (no_rm or not_on_x_s), (m, k)
            assert v is None or (
                v["n_seeds"] == 1
                and v["ci95"] is None
                and set(v["per_domain"]) == set(data.DEV_DOMAINS)
                and all(map(math.isfinite, v["per_domain"].values()))
            )
    assert {f"{a} - {b}" for a, b in train.COMPARISONS + train.DPO_COMPARISONS} <= set(res["paired"])
    assert [e["step"] for e in res["dpo_training"]["per_step"]] == list(range(10))  # --quick: 10 DPO steps
    assert set(res["dpo_training"]["end_all_training_pairs"]) == {
        "logp_chosen",
        "delta_chosen",
        "logp_rejected",
        "delta_rejected",
    }
    assert list(res["paired_rm_accuracy"]) == ["metarm - metarm_eta0 (accuracy on MetaRM's shifted samples X_s)"]
    assert (
        res["paired_rm_accuracy"]["metarm - metarm_eta0 (accuracy on MetaRM's shifted samples X_s)"]["delta"] == 0.05
    )
    assert res["unseen_mass_dpo_minus_sft"]["n_seeds"] == 1
    assert set(res["ceilings"]) == set(train.CEILINGS)
    assert {
        "acc_pi_ref_samples",
        "spread_pi_ref",
        "acc_adapted_samples",
        "spread_adapted",
        "acc_behaviour_pairs",
        "absdiff_median_pi_ref",
        "absdiff_median_adapted",
        "acc_bin3_adapted",
        "share_bin0_pi_ref",
        "collapse_ratio",
    } <= set(res["premises"])
    assert res["methods"]["sft"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert res["methods"]["oracle"]["gold_reward"]["mean"] > res["methods"]["sft"]["gold_reward"]["mean"] + 1.0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    w = data.World(TINY_WORLD)
    assert len(samples) == len(train.METHODS) * len(data.DEV_DOMAINS) * 8
    assert all(
        row["gold_reward"] == pytest.approx(w.gold_reward(row["domain"], w.encode(row["response"])))
        for row in samples[:40]
    )


def earlier_run(tmp_path):
    (tmp_path / "out").mkdir(), (tmp_path / "out" / "results.json").write_text("earlier run")
    return tmp_path / "out"


def one_line_error(capsys) -> str:  # the stderr of a refused command: one line, no traceback
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "args",
    [
        ["--seeds", "99999999999999999999"],
        ["--adapt-steps", "10000000000"],
        ["--repeats", "-1"],
        ["--threads", "-2"],
        ["--seeds", "0"],
        ["--seeds", "1.5"],
        ["--beta", "-1"],
        ["--beta", "nan"],
        ["--eta", "inf"],
        ["--device", "tpu"],
        ["--methods", "sft,ppo"],
        ["--figures", "maybe"],
        ["--eval-samples", "3"],
        ["--K", "1"],
        ["--rounds", "1"],
        ["--rounds", "4"],
        ["--no-such-flag"],
        ["--methods", "vanilla_rm,metarm_eta0"],
        ["--outer-data", "target"],
        ["--outer-data", "own"],
        ["--outer-data", "own", "--figures", "0", "--extra-steps", "40", "--ceiling-steps", "300"],
        ["--outer-lr", "0"],
        ["bench", "--device", "tpu"],
        ["bench", "--repeats", "-1"],
        ["bench", "--quick", "sometimes"],
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_flag_and_keeps_earlier_results(tmp_path, capsys, args):
    out, (main, args) = earlier_run(tmp_path), (bench.main, args[1:]) if args[0] == "bench" else (train.main, args)
    assert main(args + ["--out", str(out)]) == 2
    assert (args[0] if args[0] != "--no-such-flag" else "unrecognized") in one_line_error(capsys)
    assert (out / "results.json").read_text() == "earlier run"
    assert not (tmp_path / "out.partial").exists()


def test_out_that_is_not_an_earlier_run_or_unwritable_is_refused(tmp_path, capsys, monkeypatch):
    """`--out .` in a folder with other files must not swap that folder away; an unwritable --out is bad input."""
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--out", "."]) == 2
    assert "not an earlier run" in one_line_error(capsys)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path.parent / (tmp_path.name + ".partial")).exists()
    assert train.main(["--out", str(tmp_path / "notes.txt" / "sub" / "out")]) == 2
    assert "cannot be written" in one_line_error(capsys)


def test_world_seed_reaches_the_world(tmp_path, monkeypatch):
    """--world-seed is the seed data.World draws from (corpus, pairs, evaluation pairs); 0, the default, is world v3's
    seed. The run is stopped once the world is built."""
    seen = []

    def world(cfg=data.WorldConfig()):
        seen.append(cfg.seed)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.data, "World", world)
    assert train.main(["--quick", "--world-seed", "2", "--out", str(tmp_path / "a")]) == 130
    assert train.main(["--quick", "--out", str(tmp_path / "b")]) == 130
    assert seen == [2, 0] and data.WorldConfig().seed == 0


def test_interrupted_run_leaves_earlier_results_and_no_partial_folder(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the run has started writing: exit 130, the earlier results.json untouched, no .partial left."""
    out = earlier_run(tmp_path)
    small_world(monkeypatch)

    def interrupt(*args, **kwargs):
        assert (tmp_path / "out.partial" / "train_pairs.jsonl").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(train.policy, "sft", interrupt)
    assert train.main(["--quick", "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "earlier run"
    assert not (tmp_path / "out.partial").exists()
    assert not (tmp_path / "out.old").exists()
