"""Tests of the reference (METHOD.md, by equation), each against an independent truth: a hand computation, a closed
form, float64 central differences, an explicit Hessian, enumeration, or a forward pass written out in conftest.py
(manual_*) that shares no code with GPT.features, policy.encode/logprob/reward. They import the reference alone
(data, policy, bilevel, metarm); the study's tests are in study/. Run: python -m pytest -q (both; METARM_TEST_THREADS
sets torch's threads).

Index, equation -> tests:
  (1) Bradley-Terry     test_eq1_bt_loss_and_tie_accuracy_by_hand, test_eq1_rm_bt_loss_of_manual_rewards
  (2) DPO               test_eq2_dpo_loss_by_hand_and_outer_dpo_of_a_manual_forward
  (3) adaptation        test_eq3_adapt_step_is_the_rloo_k1_gradient, test_eq3_kl_estimates_match_exact_kl,
                        test_eq3_adaptation_approaches_the_kl_optimum
  §1 standardisation    test_s1_standardised_by_hand, test_s1_metarm_rounds_standardise_every_round
  (4)(5) inner problem  test_eq4_importance_weights_against_a_full_forward, test_eq5_inner_loss_by_hand,
                        test_eq5_inner_objective_is_exact_in_float64,
                        test_eq5_free_weight_minimiser_is_softmax_r_over_beta
  (6)-(8) outer level   test_eq8_dF_dr_matches_finite_differences,
                        test_eq7_eq8_outer_gradient_matches_finite_differences,
                        test_eq7_lam_term_is_lam_grad_bt, test_eq7_domain_subsets_rescaled_by_N_over_n,
                        test_eq5_shift_invariance_and_rho_from_explicit_hessian,
                        test_eq6_eq8_unrolled_and_training_path_converge, test_s22_reduction_to_rescaled_bradley_terry,
                        test_eq6_train_bilevel_in_parts_and_without_domains,
                        test_eq6_train_bilevel_needs_rho_and_nan_stops_training
  (9)-(11) MetaRM       test_eq9_difference_loss_by_hand, test_eq10_eq11_second_minus_first_order_is_eta_hessian_term,
                        test_eq11_eta0_metarm_is_plain_bradley_terry
  §3 spread             test_s3_reward_spread_by_hand
  bilevel.py, data.py (world v3), policy.py: the sections below.
"""

import copy
import json
import math
from dataclasses import replace
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

import bilevel
import data
import metarm
import policy
from conftest import (
    T64,
    TINY_WORLD,
    G,
    batch_of,
    dot,
    f64,
    flat_fn,
    jitter,
    lower_ref,
    manual_logprob,
    manual_reward,
    manual_stream,
    micro_batches,
    noisy_gpt,
    randn_like,
    std_rewards,
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


def test_s1_standardised_by_hand():
    """§1: r = 2x + 1 on x = 1, 2, 3, 6 is 3, 5, 7, 13: mean 7, unbiased std sqrt(56/3); the standardised reward is
    (r - mean) / std over the reference batch, on any batch."""
    x = T64(1.0, 2.0, 3.0, 6.0)
    fn = metarm.standardised(lambda x: 2 * x + 1, x)
    assert fn(T64(4.0)).item() == pytest.approx((9 - 7) / math.sqrt(56 / 3), rel=1e-12)
    assert fn(x).mean().item() == pytest.approx(0, abs=1e-12)
    assert fn(x).std().item() == pytest.approx(1, rel=1e-12)


def test_s1_metarm_rounds_standardise_every_round(micro, rounds):
    """§1, §3: metarm_rounds adapts R times (R - 1 MetaRM updates between), each time with the current RM's reward
    standardised on pi_ref's samples."""
    x, opt = rounds, torch.optim.SGD(rounds.phi.values(), lr=0.5)
    _, meta_sets = metarm.metarm_rounds(
        micro, x.prompts, x.ref, x.rm, x.phi, opt, x.pairs, *x.configs, 1, G(2), G(3), G(4)
    )
    assert len(meta_sets) == 2
    assert len(x.calls) == 3
    assert all(x.calls[i][2] != x.calls[i + 1][2] for i in (0, 1))  # the RM moved in between
    assert all(mu == pytest.approx(0, abs=1e-10) and sd == pytest.approx(1, rel=1e-10) for mu, sd, _ in x.calls)


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


# ==== (6)-(8) the hypergradient and the outer objective (fixture bl: conftest.py) ====================================
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
    """metarm.outer_gradient with lam, N = 3, its inner solves started at the fixture's Newton-solved theta* (so
    exact): (gradient dict, F)."""
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
    )
    return dict(zip(s["phi"], g)), Fv


def test_eq8_dF_dr_matches_finite_differences(bl):
    """(8) alone: dF_d/dr of hypergradient (IFT + CG, from the Newton-solved theta*) vs central differences of the
    written-out F_d, 1e-6 rel."""
    prob = bl["problems"]["a"]
    dF_dr, r, info = metarm.hypergradient(
        bl["model"], bl["rm"], bl["phi"], prob, bl["cfg"], bl["theta_ref"], bl["warm"]["a"]
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


def test_eq5_shift_invariance_and_rho_from_explicit_hessian(bl, monkeypatch):
    """(5)/§2.1, with the explicit 108 x 108 Hessian of g: at rho = 0 it is indefinite at theta_ref and annihilates
    the shift direction (W + 1u^T, b + 1); calibrate's rho makes it positive definite at theta*; rho_from and the
    re-check's rule (raise_rho) by hand."""
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
    assert metarm.rho_from(-2.0, 10.0, factor=1.1) == pytest.approx(2.2)  # METHOD.md §5.4 M4's less damping
    # the re-check's rule (metarm.raise_rho), by hand: only where lambda_min + rho < rho / 2, rho never lowered
    cfg = replace(bl["cfg"], rho=0.2, inner_lr=1.0, rho_factor=1.5)
    metarm.raise_rho(cfg, -0.09, 4.0)  # margin 0.11 >= 0.1: nothing changes
    assert (cfg.rho, cfg.inner_lr) == (0.2, 1.0)
    metarm.raise_rho(cfg, -0.11, 4.0)  # margin 0.09 < 0.1: rho_from = 0.165 < 0.2 keeps rho; the step 1 / 4.2
    assert cfg.rho == 0.2 and cfg.inner_lr == pytest.approx(1 / 4.2)
    metarm.raise_rho(cfg, -0.5, 4.0)  # rho_from = 0.75; the step 1 / 4.75
    assert cfg.rho == pytest.approx(0.75) and cfg.inner_lr == pytest.approx(1 / 4.75)
    factors, rho_from = [], metarm.rho_from
    monkeypatch.setattr(
        metarm, "rho_from", lambda lo, hi, factor=1.5: factors.append(factor) or rho_from(lo, hi, factor)
    )
    cfg = replace(bl["cfg"], rho_factor=1.1)
    metarm.calibrate(bl["model"], bl["rm"], bl["phi"], bl["problems"], cfg, bl["theta_ref"])  # passes the factor on
    assert factors and set(factors) == {1.1}


def test_eq6_eq8_unrolled_and_training_path_converge(bl):
    """(6)(8): dF/dr unrolled, and by CG at theta_T (the training path): error at T = 300 < 5 % of the error at T =
    5."""
    s, prob = bl, bl["problems"]["b"]

    def hyper(T=10, solver="cg", theta0=None):
        cfg = replace(s["cfg"], T=T, solver=solver)
        return metarm.hypergradient(s["model"], s["rm"], s["phi"], prob, cfg, s["theta_ref"], theta0)[0]

    exact = hyper(theta0=s["warm"]["b"])  # from the Newton-solved theta*

    def err(g):
        return ((g - exact).norm() / exact.norm()).item()

    for path in (lambda T: hyper(T, "unrolled"), lambda T: hyper(T)):
        assert err(path(300)) < 0.05 * err(path(5))


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


def test_eq6_train_bilevel_in_parts_and_without_domains(bl):
    """(6)-(8): train_bilevel taken in parts (its state carried) is the run taken in one call, bit for bit, rho's
    re-checks included. With no domain, (7) is lam L_BT alone: each step is Adam on lam times (1) of manual_reward on
    the pairs drawn from bt_generator, and F is that loss."""
    s = bl
    cfg = replace(s["cfg"], lam=0.4, outer_steps=3, recalibrate_every=2, domains_per_step=2)

    def train(phi, domains, gen, bt_gen, cfg, steps=None, state=None):
        return metarm.train_bilevel(
            s["model"], s["rm"], phi, domains, s["pairs"], cfg, s["theta_ref"], gen, bt_gen, steps, state
        )

    whole, parted = policy.copy_params(s["phi"]), policy.copy_params(s["phi"])
    log, state = train(whole, s["domains"], G(0), G(1), replace(cfg))  # (a re-check may change rho: copies)
    gen, bt_gen, cfg_parts = G(0), G(1), replace(cfg)
    first, part = train(parted, s["domains"], gen, bt_gen, cfg_parts, steps=1)
    second, part = train(parted, s["domains"], gen, bt_gen, cfg_parts, state=part)
    assert first + second == log
    assert [("margin" in e) for e in log] == [True, False, True]
    assert part["step"] == state["step"] == 3
    assert all(torch.equal(whole[n], parted[n]) for n in whole)
    phi, by_hand = policy.copy_params(s["phi"]), policy.copy_params(s["phi"])
    log, _ = train(phi, {}, G(0), G(1), cfg)
    opt, bt_gen, (c, r) = torch.optim.Adam(by_hand.values(), lr=cfg.lr), G(1), s["pairs"]
    for entry in log:
        rows = torch.randint(len(c["idx"]), (cfg.pairs_per_domain,), generator=bt_gen)

        def rew(b):
            return manual_reward(s["model"], s["rm"], by_hand, b["idx"][rows], b["mask"][rows])

        loss = 0.4 * -F.logsigmoid(rew(c) - rew(r)).mean()
        assert entry["F"] == pytest.approx(loss.item(), rel=1e-10)
        assert entry["hvps"] == 0 and "margin" not in entry
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n in phi:
        torch.testing.assert_close(phi[n], by_hand[n], rtol=1e-9, atol=1e-12)
    assert not torch.equal(phi["head.weight"], s["phi"]["head.weight"])


def test_eq6_train_bilevel_needs_rho_and_nan_stops_training(bl):
    """train_bilevel refuses an uncalibrated inner step and, with no domain at lam = 0, an objective that is 0
    (nothing to differentiate); an RM gone NaN stops bilevel and Bradley-Terry training at step 0, named."""
    s, bad = bl, policy.copy_params(bl["phi"])

    def run(phi, cfg, domains):
        return metarm.train_bilevel(
            s["model"], s["rm"], phi, domains, s["pairs"], cfg, s["theta_ref"], G(0), G(1), steps=2
        )

    with pytest.raises(ValueError, match="inner_lr"):
        run(policy.copy_params(s["phi"]), metarm.BilevelConfig(K=4), s["domains"])
    with pytest.raises(ValueError, match="lam = 0"):
        run(policy.copy_params(s["phi"]), s["cfg"], {})
    bad["head.weight"] = torch.full_like(bad["head.weight"], math.nan)
    with pytest.raises(FloatingPointError, match=r"^.*finite.* at step 0$"):
        run(bad, replace(s["cfg"], domains_per_step=2), s["domains"])
    with pytest.raises(FloatingPointError, match=r"^non-finite reward-model loss \(1\) at step 0$"):
        metarm.train_reward_model(s["rm"], bad, s["pairs"], metarm.RMConfig(steps=3, batch_size=4), G(0))


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
        1,
        G(2),
        G(9),
        G(4),
    )  # eta 0, k 3, 2 prompts: 3 rounds x 2 updates
    opt = metarm.train_reward_model(rm, b, (c, r), rm_cfg := metarm.RMConfig(steps=6, batch_size=4, lr=0.05), G(9))[1]
    assert all(torch.equal(a[n], b[n]) and not torch.equal(a[n], phi[n]) for n in phi)
    before = copy.deepcopy(opt.state_dict())
    b_before = policy.copy_params(b)  # continue_from: a copy, its own optimiser state
    metarm.train_reward_model(rm, (b2 := policy.continue_from(b, opt, 0.05))[0], (c, r), rm_cfg, G(11), b2[1])
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


def test_s54_gold_outer_objective_by_hand_and_finite_differences(bl):
    """The capacity diagnostic of METHOD.md §5.4 (not the paper's): a problem that carries its candidates' gold
    rewards has f = -E_x sum_k w_k(theta) gold_k, (4)'s weights written out on manual_logprob; its dF/dr (IFT + CG
    from the Newton-solved theta*) matches central differences of that written-out F, 1e-6 rel."""
    prob = {**bl["problems"]["a"]}
    prob["gold"] = torch.randn(len(prob["cand"]["idx"]), generator=G(5), dtype=f64)
    K, c = bl["cfg"].K, prob["cand"]

    def gold_value(theta):
        delta = manual_logprob(bl["model"], c["idx"], c["mask"], theta) - manual_logprob(
            bl["model"], c["idx"], c["mask"]
        )
        return -(torch.softmax(delta.view(-1, K), -1) * prob["gold"].view(-1, K)).sum(-1).mean()

    _, f = metarm.level_functions(bl["model"], prob, bl["cfg"], bl["theta_ref"])
    assert f(bl["warm"]["a"], {}).item() == pytest.approx(gold_value(bl["warm"]["a"]).item(), rel=1e-12)
    dF_dr, r, info = metarm.hypergradient(
        bl["model"], bl["rm"], bl["phi"], prob, bl["cfg"], bl["theta_ref"], bl["warm"]["a"]
    )
    assert info["converged"]

    def F_of(x):
        theta, newton = bilevel.newton_solve(lower_ref(bl, prob), bl["warm"]["a"], x, tol=1e-10)
        assert newton["converged"]
        return gold_value(theta).item()

    for seed in (1, 2):
        u = torch.randn(r.shape, generator=G(seed), dtype=f64)
        fd = bilevel.hypergrad_fd(F_of, {"r": r.detach()}, {"r": u})
        assert (dF_dr * u).sum().item() == pytest.approx(fd, rel=1e-6)


def test_s54_draw_outer_batch_adds_the_candidates_gold_with_the_same_draws(bl):
    """A domain given with a gold function gets its candidates' gold rewards in the problem; every draw (domains,
    candidates, pairs, the lam term's pairs) is the same as without it."""
    cfg = replace(bl["cfg"], domains_per_step=2)

    def gold(batch):
        return batch["idx"].sum(-1).to(f64)

    plain, lam_plain = metarm.draw_outer_batch(bl["model"], bl["domains"], bl["pairs"], cfg, G(0), G(1))
    with_gold = {d: (*v, gold) for d, v in bl["domains"].items()}
    gilded, lam_gilded = metarm.draw_outer_batch(bl["model"], with_gold, bl["pairs"], cfg, G(0), G(1))
    assert list(plain) == list(gilded) and torch.equal(lam_plain[0]["idx"], lam_gilded[0]["idx"])
    for d in plain:
        assert torch.equal(plain[d]["cand"]["idx"], gilded[d]["cand"]["idx"])
        assert torch.equal(plain[d]["chosen"]["idx"], gilded[d]["chosen"]["idx"]) and "gold" not in plain[d]
        torch.testing.assert_close(gilded[d]["gold"], gold(gilded[d]["cand"]), rtol=0, atol=0)
