"""Tests of the study's machinery: the measurements (study/measure.py) by hand or against a forward pass written out
(conftest.py), the study's fits (study/fits.py), the hypergradient's accuracy check (study/hypergradient_checks.py),
and train.py end to end -- tiny runs of the whole pipeline, its schema, determinism, every flag at its boundary, bad
input. Run with the reference's tests: python -m pytest -q.
"""

import functools
import json
import math
import subprocess
from dataclasses import replace
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch

import data
import metarm
import policy
import train
from conftest import (
    ROOT,
    T64,
    THREADS,
    TINY_WORLD,
    G,
    batch_of,
    earlier_run,
    f64,
    jitter,
    manual_logprob,
    manual_reward,
    manual_stream,
    micro_batches,
    one_line_error,
)
from study import bench, figures, fits, hypergradient_checks, measure, summary
from study.methods import DEFAULT_METHODS, METHODS

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated", "ignore:cg did not converge")
PREREG = summary.read_preregistration()


def test_s1_reward_functions_standardise_every_adaptation_reward(world, tiny_gpt):
    """§1: measure.reward_functions gives each RM's and each oracle's reward as (r - mean) / std over pi_ref's samples
    (checked on others too), by the table's adapts_with; sft, metarm none."""
    rm, phi = policy.make_reward_model(tiny_gpt, G(5))
    phi, prompts = jitter(phi, 0.3, 5), torch.tensor(world.prompts["bar"])
    ref, other = (policy.sample(tiny_gpt, {}, prompts, 8, G(s)) for s in (5, 6))
    methods = ["vanilla_rm", "bilevel", "in_domain_rm", "oracle", "agnostic_oracle", "sft", "metarm"]
    rms = {"vanilla_rm": phi, "bilevel": phi, "in_domain_rm": {"bar": phi}}
    out = measure.reward_functions(SimpleNamespace(world=world, methods=methods, rm=rm), rms, "bar", ref)

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


def test_s1_rlhf_rounds_standardise_every_round(micro, rounds):
    """§1, §3: the figure's iterative RLHF (figures.rlhf_rounds) adapts R times with R MetaRM updates, each time with
    the current RM's reward standardised on pi_ref's samples."""
    x, opt = rounds, torch.optim.SGD(rounds.phi.values(), lr=0.5)
    history = figures.rlhf_rounds(
        micro, x.prompts, x.ref, x.rm, x.phi, opt, x.pairs, *x.configs, 2, lambda b: b["mask"].sum(1), G(8), G(9)
    )
    assert len(history) == 2
    assert len(x.calls) == 2
    assert x.calls[0][2] != x.calls[1][2]  # the RM moved in between
    assert all(mu == pytest.approx(0, abs=1e-10) and sd == pytest.approx(1, rel=1e-10) for mu, sd, _ in x.calls)


def test_eq8_hypergradient_accuracy_recomputes_training_and_sees_its_error(bl, recwarn):
    """hypergradient_checks.train_with_checkpoints is metarm.train_bilevel's run (the same log and phi, bit for bit)
    and keeps what each checked step saw; hypergradient_accuracy recomputes the gradient that step used (its norm = the
    step's logged grad_norm, lam = 0; at step 1 from warm starts) and compares it with the Newton-solved IFT
    reference: about exact when the step's own solves are tight (T = 1000, CG to 1e-12), clearly off when they are
    cut (T = 1, one CG iteration). report warns below the stated cosine, and only there."""
    s = bl
    args = (s["model"], s["rm"]), (s["domains"], s["pairs"]), s["theta_ref"]

    def checked(cfg, steps):
        phi = policy.copy_params(s["phi"])
        log, inputs = hypergradient_checks.train_with_checkpoints(
            *args[0], phi, *args[1], replace(cfg), args[2], G(0), G(1), steps=steps
        )
        checks = hypergradient_checks.accuracy_checks(s["model"], s["rm"], s["theta_ref"], inputs, n_domains=3)
        return phi, log, inputs, checks

    cut = replace(s["cfg"], T=1, cg_iters=1, lam=0.0, outer_steps=2)
    phi, log, inputs, checks = checked(cut, (0, 1))
    alone = policy.copy_params(s["phi"])
    assert log == metarm.train_bilevel(*args[0], alone, *args[1], replace(cut), args[2], G(0), G(1))[0]
    assert all(torch.equal(phi[n], alone[n]) for n in phi)
    assert [kept["step"] for kept in inputs] == [c["step"] for c in checks] == [0, 1]
    assert inputs[0]["warm"] == {} and set(inputs[1]["warm"]) == set(log[0]["dpo"])
    for check, entry in zip(checks, log):
        assert check["norm"] == pytest.approx(entry["grad_norm"], rel=1e-12)
    errors = {(1, 0.0): checks[0]}
    for lam in (0.0, 0.4):
        tight = replace(s["cfg"], T=1000, cg_iters=300, lam=lam, outer_steps=1)
        _, log, _, checks = checked(tight, (0,))
        if lam == 0:
            assert checks[0]["norm"] == pytest.approx(log[0]["grad_norm"], rel=1e-12)
        errors[(1000, lam)] = checks[0]
    # with lam > 0 the step used grad F + lam grad L_BT, and the check leaves the exact lam term out
    assert errors[(1000, 0.4)]["norm"] == pytest.approx(errors[(1000, 0.0)]["norm"], rel=1e-12)
    errors = {T: errors[(T, 0.0)] for T in (1000, 1)}
    assert errors[1000]["rel_error"] < 1e-6
    assert errors[1000]["cosine"] > 1 - 1e-10
    assert errors[1]["rel_error"] > 0.5
    assert errors[1]["cosine"] < 0.9
    checks = [{"step": 0, "cosine": 0.95, "rel_error": 0.2}, {"step": 3, "cosine": 0.999, "rel_error": 0.01}]
    checked = hypergradient_checks.accuracy_summary([checks, [{"step": 0, "cosine": 0.75, "rel_error": 0.4}]])
    assert checked["all"] == {
        "n": 3,
        "cosine_min": 0.75,
        "cosine_median": 0.95,
        "rel_error_median": 0.2,
        "rel_error_max": 0.4,
    }
    assert checked["by_step"]["0"]["cosine_median"] == pytest.approx(0.85)
    assert checked["failed_checks"] == 0
    hypergradient_checks.report(hypergradient_checks.accuracy_summary([checks]))
    assert len(recwarn) == 0
    with pytest.warns(UserWarning, match="cosine 0.750 < 0.8"):
        hypergradient_checks.report(checked)
    failed = hypergradient_checks.accuracy_summary(
        [[{"step": 0, "cosine": None, "rel_error": None, "failed": "Newton"}]]
    )
    assert failed["failed_checks"] == 1
    assert failed["all"] is None
    with pytest.warns(UserWarning, match="1 hypergradient accuracy check"):
        hypergradient_checks.report(failed)


def test_eq8_newton_reference_is_the_exact_outer_gradient(bl):
    """hypergradient_checks.newton_reference (lam = 0) solves each inner problem itself, from the fixture's theta* or
    from theta_ref, to the same gradient as metarm.outer_gradient started at the Newton-solved theta* (which the (7)(8)
    tests check against central differences); a Newton solve that cannot get there raises, with the tolerance."""
    s = bl
    cfg = replace(s["cfg"], T=30)  # 300 gradient steps from theta_ref before Newton (g is not convex there)
    exact = metarm.outer_gradient(
        s["model"], s["rm"], s["phi"], s["problems"], None, cfg, s["theta_ref"], n_domains=3, warm=dict(s["warm"])
    )[0]
    for warm in (dict(s["warm"]), {}):
        ref = hypergradient_checks.newton_reference(
            s["model"], s["rm"], s["phi"], s["problems"], cfg, s["theta_ref"], 3, warm, 1e-10
        )
        for a, b in zip(ref, exact):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    with pytest.raises(FloatingPointError, match="not solved to"), pytest.warns(UserWarning, match="newton_solve"):
        hypergradient_checks.newton_reference(
            s["model"], s["rm"], s["phi"], s["problems"], replace(cfg, T=0), s["theta_ref"], 3, {}, 1e-300
        )


def test_stage_names_the_method_and_seed(bl):
    """train.stage puts the method and the seed before a training loop's own message (which names the step)."""
    bad = policy.copy_params(bl["phi"])
    bad["head.weight"] = torch.full_like(bad["head.weight"], math.nan)
    with (
        pytest.raises(FloatingPointError, match=r"^vanilla_rm, seed 7: non-finite reward-model loss \(1\) at step 0$"),
        train.stage("vanilla_rm", 7),
    ):
        metarm.train_reward_model(bl["rm"], bad, bl["pairs"], metarm.RMConfig(steps=3, batch_size=4), G(0))
    with (
        pytest.raises(FloatingPointError, match=r"^bilevel, seed 3: .*finite.* at step 0$"),
        train.stage("bilevel", 3),
    ):
        metarm.train_bilevel(
            bl["model"], bl["rm"], bad, bl["domains"], bl["pairs"], replace(bl["cfg"]), bl["theta_ref"], G(0), G(1), 1
        )


def test_s3_rm_accuracy_evaluate_and_premises_by_hand(monkeypatch):
    """study/measure.py, reward/sample/logprob stubbed: rm_accuracy (gold ties out, RM ties 1/2, MetaRM's repeats
    averaged); evaluate (win rate, ties 1/2; KL = mean log-ratio); measure_premises (rows i, i + n/2 share a prompt):
    accuracy, §3 spread."""
    monkeypatch.setattr(measure.policy, "reward", lambda rm, phi, b: b["r"] * phi)

    def B(**k):
        return {key: torch.tensor(v, dtype=f64) for key, v in k.items()}

    pairs = (B(r=[1.0, 0.0, 2.0, -1.0, 0.0]), B(r=[0.0] * 5))
    s = SimpleNamespace(rm=None, eval_pairs={"d": pairs}, gold_margins={"d": T64(1, 1, 1, 0, 0)})
    assert measure.rm_accuracy(s, {"vanilla_rm": 1.0}, "vanilla_rm", "d") == pytest.approx((1 + 0.5 + 1) / 3)
    rms = {"metarm": {("d", 0): 1.0, ("d", 1): -1.0, ("e", 0): 5.0}}  # d's two repeats: 5/6 and 1/6
    assert measure.rm_accuracy(s, rms, "metarm", "d") == pytest.approx((5 / 6 + 1 / 6) / 2)
    batch = B(g=[1.0, 0.0, 2.0, 1.0], logp_ref=[0.0, -1.0, 0.0, 0.0], lp=[0.5, 0.0, -0.5, 1.0])
    monkeypatch.setattr(measure.policy, "sample", lambda *a, **k: batch)
    monkeypatch.setattr(measure.policy, "logprob", lambda model, theta, b: b["lp"])
    monkeypatch.setattr(measure, "unseen_mass", lambda model, theta, b, unseen: unseen)
    gold_of = B(g=[0.0, 0.0, 2.0, 1.0])
    res = measure.evaluate(None, {}, torch.zeros(4, 1), gold_of, lambda b: b["g"], None, 1, 0.25)[0]
    assert [res[k] for k in ("win_rate", "kl", "gold_reward")] == pytest.approx([(1 + 0.5 + 0.5 + 0.5) / 4, 0.5, 1.0])
    assert res["unseen_mass"] == 0.25
    ref = B(r=[0, 0, 0, 1, 2, 4], g=[0, 5, 1, 2, 1, 0])
    adapted = B(r=[2, 1, 0, 0, 1, 2], g=[1, 0, 0, 0, 0, 1])  # 3 prompts, n = 2
    out = measure.measure_premises(None, 1.0, ref, adapted, lambda b: b["g"], 2)
    assert [
        out[k] for k in ("acc_pi_ref_samples", "spread_pi_ref", "acc_adapted_samples", "spread_adapted")
    ] == pytest.approx([1 / 3, math.sqrt(7 / 3) / math.sqrt(77 / 30), 1.0, math.sqrt(5)])
    # rows p and 3 + p share prompt p: |dr| on pi_ref's samples 1, 2, 4; on the adapted ones 2, 0, 2
    assert out["absdiff_median_pi_ref"] == pytest.approx(2.0)
    assert out["absdiff_q25_pi_ref"] == pytest.approx(1.5)
    assert out["absdiff_median_adapted"] == pytest.approx(2.0)
    assert out["absdiff_q25_adapted"] == pytest.approx(1.0)


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

    out = measure.within_prompt_differences(r, g, 3)
    assert [out["absdiff_q25"], out["absdiff_median"], out["absdiff_q75"]] == pytest.approx([1.125, 1.75, 2.0])
    assert [quantile(0.25), quantile(0.5), quantile(0.75)] == pytest.approx([1.125, 1.75, 2.0])
    # |g_i - g_j|: prompt 1: 2, 3, 5 (bin 3); prompt 2: 0 (a gold tie, bin 0), 1.7, 1.7 (bin 2)
    shares = [out[f"share_bin{b}"] for b in range(4)]
    assert shares == pytest.approx([1 / 6, 0.0, 2 / 6, 3 / 6])
    # bin 3: (0,1) right, (0,2) wrong, (1,2) an RM tie; bin 2: both right; bins 0 (only a gold tie) and 1: no pair
    assert [out[f"acc_bin{b}"] for b in range(4)] == [None, None, pytest.approx(1.0), pytest.approx(0.5)]
    # §5.3: gold's median |g_i - g_j| over (0, 1.7, 1.7, 2, 3, 5) is 1.85; margin >= 1: the same five pairs, 3.5 / 5
    assert out["gold_absdiff_median"] == pytest.approx(1.85)
    assert out["acc_margin_ge1"] == pytest.approx(3.5 / 5)


def test_within_prompt_accuracy_by_hand_and_crn_seeds_distinct():
    """The RM's accuracy on all pairs of samples of the same prompt (MetaRM's mechanism, the rounds' figure) by hand;
    the common-random-number seeds of (seed, domain, repeat) are distinct."""
    # 2 prompts x k = 3. Prompt 1: pairs (0,1) right, (0,2) wrong, (1,2) an RM tie (1/2); prompt 2: one gold tie
    r = T64(3.0, 1.0, 1.0, 0.0, 1.0, 2.0)
    g = T64(2.0, 0.0, 5.0, 1.0, 1.0, 3.0)
    assert measure.within_prompt_accuracy(r, g, 3) == pytest.approx((1 + 0 + 0.5 + 1 + 1) / 5)
    assert measure.within_prompt_accuracy(r, torch.zeros(6, dtype=f64), 3) is None
    assert len({measure.crn_seed(s, d, j) for s in range(12) for d in range(6) for j in range(3)}) == 12 * 6 * 3


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
    assert measure.unseen_tokens(world, "cpu").tolist() == truth
    assert 0 < sum(truth) < len(truth)
    assert measure.unseen_mass(tiny_gpt, theta, batch, unseen) == pytest.approx(sum(masses) / len(masses), rel=1e-10)


def test_s52_train_dpo_logs_log_probabilities_of_a_manual_forward(micro):
    """train_dpo's log: step 0 at theta_ref (Delta 0, loss log 2, log pi of the step's pairs); the end entry's Delta
    on every pair is manual_logprob(theta) - manual_logprob(theta_ref) of the theta it returns."""
    _, chosen, rejected = micro_batches(micro, G(5), 6)
    theta, log = fits.train_dpo(micro, (chosen, rejected), 3, 4, 0.05, 0.1, G(9))
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
    training = summary.dpo_training([log, log])
    assert [e["step"] for e in training["per_step"]] == [0, 1, 2]
    assert training["per_step"][1]["loss"] == pytest.approx(log[1]["loss"])
    assert training["end_all_training_pairs"]["delta_rejected"]["mean"] == pytest.approx(log[-1]["delta_rejected"])


def test_s52_own_data_bilevel_sees_each_domain_s_own_pairs_and_prompts(monkeypatch):
    """--outer-data own: per evaluation domain, (7) gets that domain's own pairs (DPO and lam term) and (5) its
    prompts, from a copy of the vanilla RM; the control gets no domain (the DPO term off), the same pairs and draws,
    and no calibration; measure.phi_of reads the per-domain RM."""
    calls, calibrated = [], []
    monkeypatch.setattr(metarm, "draw_problem", lambda *a: "probe")
    monkeypatch.setattr(metarm, "calibrate", lambda model, rm, phi, probe, cfg, tr: calibrated.append(probe) or {})

    def fake_train(model, rm, phi, domains, bt_pairs, cfg, theta_ref, gen, bt_gen, steps=None, state=None, bar=None):
        calls.append((domains, bt_pairs, gen.initial_seed(), bt_gen.initial_seed()))
        phi["w"].data += len(calls)
        return [{"F": 1.0, "margin": 0.5}], {"step": cfg.outer_steps}

    monkeypatch.setattr(metarm, "train_bilevel", fake_train)
    monkeypatch.setattr(fits.hypergradient_checks, "accuracy_steps", lambda steps: ())  # no kept step to measure
    own = {"a": ("A chosen", "A rejected"), "b": ("B chosen", "B rejected")}
    s = SimpleNamespace(domains=["a", "b"], prompts={"a": "A prompts", "b": "B prompts"}, own_pairs=own)
    s.model, s.rm, s.device, s.theta_ref, s.bilevel_cfg = None, None, "cpu", {}, metarm.BilevelConfig()
    phi = {"w": torch.zeros(1)}
    phis, curvature, signals = fits.own_data_bilevel(0, s, phi, "dpo")
    assert [c[0] for c in calls] == [{"a": ("A prompts", own["a"])}, {"b": ("B prompts", own["b"])}]
    assert [c[1] for c in calls] == [own["a"], own["b"]]
    assert [c[2:] for c in calls] == [(4, 5), (4, 5)]  # seed 0's draws for every domain, and for the control
    assert curvature["a"]["margins"] == [0.5]
    assert curvature["a"]["F"] == [1.0]
    assert calibrated == [{"a": "probe"}, {"b": "probe"}]
    assert phis["a"]["w"].item() == 1.0
    assert phis["b"]["w"].item() == 2.0
    assert phi["w"].item() == 0.0  # the vanilla RM itself is untouched
    per_domain = {"bakery": phis["a"], "camera": phis["b"]}  # keyed by domain names, as train.py keys them
    assert measure.phi_of({"bilevel": per_domain}, "bilevel", "camera") is phis["b"]
    assert measure.phi_of({"bilevel": phi}, "bilevel", "b") is phi
    calls.clear()
    phis, curvature, signals = fits.own_data_bilevel(0, s, phi, None)
    assert [c[:2] for c in calls] == [({}, own["a"]), ({}, own["b"])]
    assert [c[2:] for c in calls] == [(4, 5), (4, 5)]
    assert curvature == {"a": None, "b": None} and signals == {}
    assert len(calibrated) == 2
    calls.clear()  # METHOD.md §5.4 M3: the DPO term's chosen and rejected swapped, lam L_BT's pairs as they are
    fits.own_data_bilevel(0, s, phi, "swapped")
    assert [c[0] for c in calls] == [{"a": ("A prompts", own["a"][::-1])}, {"b": ("B prompts", own["b"][::-1])}]
    assert [c[1] for c in calls] == [own["a"], own["b"]] and [c[2:] for c in calls] == [(4, 5), (4, 5)]
    calls.clear()  # M4: the domain's problems carry a gold function (metarm.draw_outer_batch adds the candidates')
    s.world = None
    fits.own_data_bilevel(0, s, phi, "gold")
    assert [c[0]["a"][:2] for c in calls[:1]] == [("A prompts", own["a"])] and callable(calls[0][0]["a"][2])
    assert [c[2:] for c in calls] == [(4, 5), (4, 5)]


def test_s52_shifted_accuracy_by_hand(monkeypatch):
    """MetaRM's mechanism: each RM's accuracy against the gold order on every within-prompt pair of the same shifted
    samples (by hand)."""
    monkeypatch.setattr(measure.policy, "reward", lambda rm, phi, b: b["r"] * phi)
    s = SimpleNamespace(metarm_cfg=SimpleNamespace(k=3), rm=None)
    samples = {"r": T64(3.0, 1.0, 1.0, 0.0, 1.0, 2.0), "g": T64(2.0, 0.0, 5.0, 1.0, 1.0, 3.0)}
    out = measure.shifted_accuracy(s, {"vanilla_rm": 1.0, "metarm_eta0": -1.0}, 0.0, samples, lambda b: b["g"])
    # pairs: right, wrong, RM tie; gold tie (left out), right, right -> 3.5 / 5; phi = -1 flips every non-tie;
    # phi = 0 ties every pair
    assert out == {"metarm": pytest.approx(0.5), "vanilla_rm": pytest.approx(0.7), "metarm_eta0": pytest.approx(0.3)}


def test_s53_fresh_seeds_own_their_streams():
    """METHOD.md §5.3: seeds 0-9 keep seed + k; the streams (k < 1000) and common-random-number keys (any domain
    index < 10, repeat < 100, offset < 1000 as evaluate_seed adds) of seeds 10-19 meet neither each other's nor those
    of seeds 0-9 (under the old rule, seed + k, seed 9's stream 1 would be seed 10's stream 0)."""
    assert all(measure.stream(s, k) == s + k for s in range(10) for k in range(1000))

    def streams(seeds):
        out = {}
        for s in seeds:
            keys = {measure.stream(s, k) for k in range(1000)}
            keys |= {measure.crn_seed(s, i, j) + o for i in range(10) for j in range(100) for o in (0, 1, 3, 500, 600)}
            out[s] = keys
        return out

    fresh, old = streams(range(10, 20)), streams(range(10))
    everything_old = set().union(*old.values())
    for s, keys in fresh.items():
        assert not keys & everything_old
        assert all(not keys & other for t, other in fresh.items() if t != s)


def test_s53_shifted_widening_by_hand(monkeypatch):
    """MetaRM's mechanism, its target: each RM's mean within-prompt |r_i - r_j| on the shifted samples over its own
    reward std on pi_ref's samples (by hand); a rescaled RM (phi = 2) gives the same number."""
    monkeypatch.setattr(measure.policy, "reward", lambda rm, phi, b: b["r"] * phi)
    s = SimpleNamespace(metarm_cfg=SimpleNamespace(k=3), rm=None)
    samples, ref = {"r": T64(3.0, 1.0, 1.0, 0.0, 1.0, 2.0)}, {"r": T64(0.0, 2.0)}  # ref std: sqrt(2)
    out = measure.shifted_widening(s, {"vanilla_rm": 1.0, "metarm_eta0": 2.0}, -1.0, samples, ref)
    # |differences|: (2, 2, 0) and (1, 2, 1) -> mean 8/6
    assert out == {
        "metarm": pytest.approx(8 / 6 / math.sqrt(2)),
        "vanilla_rm": pytest.approx(8 / 6 / math.sqrt(2)),
        "metarm_eta0": pytest.approx(8 / 6 / math.sqrt(2)),
    }


# ==== train.py end to end: tiny runs, the schema, bad input ==========================================================
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
    "--first-seed",  # not its boundary (0, the default run's): a fresh seed's own streams, through the figures too
    "10",
]
# the positive control (METHOD.md §5.2), one bilevel RM per evaluation domain from its own pairs; §5.4's diagnostics


OWN_DATA_RUN = TINY_RUN + [
    "--outer-data",
    "own",
    "--ceiling-steps",
    "2",
    "--methods",
    "vanilla_rm,bilevel,bilevel_bt_only,in_domain_rm,bilevel_swapped,bilevel_gold",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two tiny runs of the whole pipeline with the same seed, into two folders, the second without progress bars; a
    third with every numeric flag at
    its boundary (BOUNDARY_RUN), figures included, their fixed budgets cut to one step (only the time changes); a
    fourth of the bilevel positive control (OWN_DATA_RUN)."""
    outs = [tmp_path_factory.mktemp("run") / "out" for _ in range(4)]
    with pytest.MonkeyPatch.context() as mp:
        small_world(mp)
        assert train.main(TINY_RUN + ["--out", str(outs[0])]) == 0
        assert train.main(TINY_RUN + ["--progress", "0", "--out", str(outs[1])]) == 0  # no bars: the same numbers
        mp.setattr(
            hypergradient_checks,
            "hypergradient_error",
            functools.partial(hypergradient_checks.hypergradient_error, ns=(1,)),
        )
        mp.setattr(figures, "outer_convergence", functools.partial(figures.outer_convergence, steps=1, every=1))
        assert train.main(BOUNDARY_RUN + ["--out", str(outs[2])]) == 0
        assert train.main(OWN_DATA_RUN + ["--out", str(outs[3])]) == 0
    return outs


def test_own_data_run_judges_the_positive_control_s_comparisons(tiny_run):
    """OWN_DATA_RUN: the positive control's comparisons judged by the verdict rule, in_domain_rm a ceiling, one
    calibration per evaluation domain, no hypergradient accuracy check (its reference is the main run's)."""
    res = json.loads((tiny_run[3] / "results.json").read_text())
    judged = [f"{a} - {b}" for a, b in PREREG["positive_controls"]["bilevel_own_data"]["comparisons"]]
    assert set(judged) <= set(res["paired"])
    assert all(res["paired"][c]["verdict"] == "undetermined (fewer than 10 seeds)" for c in judged)
    assert res["paired"]["in_domain_rm - vanilla_rm"]["verdict"] == "n/a (a ceiling)"
    assert list(res["bilevel_curvature"][0]) == data.DEV_DOMAINS
    assert "hypergradient_accuracy" not in res
    assert res["methods"]["bilevel"]["gold_reward"] != res["methods"]["bilevel_bt_only"]["gold_reward"]
    # METHOD.md §5.4: the diagnostics ran and their comparisons are judged; M1 measured on the own-data fits
    assert {"bilevel - bilevel_swapped", "bilevel_gold - vanilla_rm"} <= set(res["paired"])
    assert res["methods"]["bilevel_swapped"]["gold_reward"] != res["methods"]["bilevel"]["gold_reward"]
    assert res["methods"]["bilevel_gold"]["gold_reward"] != res["methods"]["bilevel"]["gold_reward"]
    assert {"sign_agreement", "ratio", "cosine", "share_dpo", "signal"} <= set(res["path_signal"])
    assert 0 <= res["path_signal"]["sign_agreement"]["mean"] <= 1 and res["path_signal"]["signal"] is False


def test_every_flag_at_its_boundary_runs_and_its_reused_runs_are_exact(tiny_run):
    """BOUNDARY_RUN ran through every stage, the figures' too. At eta = 0 metarm's own rounds give metarm_eta0's every
    metric; at lam = 0 bilevel_bt_only is the vanilla RM's run (no step to take), and results.json says so."""
    res = json.loads((tiny_run[2] / "results.json").read_text())
    assert res["config"]["eta"] == 0 and res["config"]["lam"] == 0 and res["config"]["K"] == 2
    assert set(res["methods"]) == set(DEFAULT_METHODS)
    assert set(res["figures"]) == {
        "frontier",
        "rlhf_rounds",
        "hypergradient_error",
        "outer_convergence",
        "training_curves",
    }
    assert res["methods"]["metarm"] == res["methods"]["metarm_eta0"]
    # (the vanilla RM's shifted_accuracy and _widening are measured on MetaRM's samples X_s: a reference, not a run)
    vanilla = {**res["methods"]["vanilla_rm"], "shifted_accuracy": None, "shifted_widening": None}
    assert res["methods"]["bilevel_bt_only"] == vanilla
    assert list(res["reused_runs"]) == ["bilevel_bt_only"]
    assert "reused_runs" not in json.loads((tiny_run[0] / "results.json").read_text())
    # --first-seed 10: seed 10 everywhere, and only there in the config (a default run's results.json as before it)
    assert (
        res["config"]["first_seed"] == 10
        and "first_seed" not in json.loads((tiny_run[0] / "results.json").read_text())["config"]
    )
    assert res["figures"]["frontier"]["seeds"] == [10] and res["figures"]["rlhf_rounds"]["seeds"] == [10]
    rows = [json.loads(line) for line in (tiny_run[2] / "logs.jsonl").read_text().splitlines()]
    assert {row["seed"] for row in rows if "seed" in row} == {10}
    provenance = json.loads((tiny_run[2] / "provenance.json").read_text())
    assert provenance["command"].startswith("python train.py --quick --domains dev") and provenance["threads"] >= 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert provenance["commit"] == (head.stdout.strip() if head.returncode == 0 else None)  # None: not a checkout
    assert {"torch", "cpu", "started_utc", "seconds", "uncommitted_changes"} <= set(provenance)


def test_pipeline_is_deterministic_writes_the_schema_and_the_oracle_beats_sft(tiny_run):
    """Byte-identical results.json with and without progress bars; every output; logs.jsonl holds the numbers the
    bars show, the same in both runs; results.json's schema (paired, ceilings, premises); samples' gold rewards
    recomputed from their text; SFT has KL 0; the oracle beats SFT."""
    out = tiny_run[0]
    assert (out / "results.json").read_bytes() == (tiny_run[1] / "results.json").read_bytes()
    assert (out / "logs.jsonl").read_bytes() == (tiny_run[1] / "logs.jsonl").read_bytes()
    rows = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    phases = {row["phase"] for row in rows}
    assert {"sft", "vanilla_rm", "vanilla_rm_long", "in_domain_rm", "bilevel", "bilevel_bt_only", "dpo"} <= phases
    assert {"hypergradient_accuracy", "adaptation"} <= phases
    bilevel = [row for row in rows if row["phase"] == "bilevel"]
    assert [row["step"] for row in bilevel] == [0, 1] and {"F", "grad_norm", "hvps"} <= set(bilevel[0])
    vanilla = [row["loss"] for row in rows if row["phase"] == "vanilla_rm"]
    assert len(vanilla) == 20 and all(math.isfinite(x) for x in vanilla)  # TINY_RUN: --rm-steps 20
    adapted = [m for m in DEFAULT_METHODS if METHODS[m].adapts_with in ("rm", "gold", "agnostic gold")]  # 7
    assert len([row for row in rows if row["phase"] == "adaptation"]) == len(adapted) * len(data.DEV_DOMAINS)
    names = (
        "results.json",
        "results.md",
        "samples.jsonl",
        "logs.jsonl",
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
    assert set(res["methods"]) == set(DEFAULT_METHODS)
    assert res["domains"] == data.DEV_DOMAINS
    assert {"gold_collapse_ratio", "collapse_ratio_rm_over_gold", "accuracy_drop_split"} <= set(res["premises"])
    assert res["mechanism_widening"]["per_seed"] == [
        res["methods"]["metarm"]["shifted_widening"]["mean"]
        - res["methods"]["metarm_eta0"]["shifted_widening"]["mean"]
    ]
    for m, metrics in res["methods"].items():
        for k, v in metrics.items():
            no_rm = k == "rm_accuracy" and not METHODS[m].has_rm
            not_on_x_s = k.startswith("shifted_") and m not in ("metarm", "metarm_eta0", "vanilla_rm")
            assert (v is None) == (no_rm or not_on_x_s), (m, k)
            assert v is None or (
                v["n_seeds"] == 1
                and v["ci95"] is None
                and set(v["per_domain"]) == set(data.DEV_DOMAINS)
                and all(map(math.isfinite, v["per_domain"].values()))
            )
    assert {f"{a} - {b}" for a, b in summary.judged_comparisons("train", list(METHODS), PREREG)} <= set(res["paired"])
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
    assert set(res["ceilings"]) == set(summary.CEILINGS)
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
    assert len(samples) == len(DEFAULT_METHODS) * len(data.DEV_DOMAINS) * 8
    assert all(
        row["gold_reward"] == pytest.approx(w.gold_reward(row["domain"], w.encode(row["response"])))
        for row in samples[:40]
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--seeds", "99999999999999999999"],
        ["--adapt-steps", "10000000000"],
        ["--repeats", "-1"],
        ["--threads", "-2"],
        ["--seeds", "0"],
        ["--first-seed", "995", "--seeds", "10"],
        ["--rho-factor", "1"],
        ["--methods", "vanilla_rm,bilevel,bilevel_swapped"],  # a §5.4 diagnostic without --outer-data own
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


# ==== METHOD.md §5.4: what the hypergradient path carries (issue 31), the measurements by hand =====================
def test_s54_sign_agreement_adam_shares_and_ratio_by_hand():
    """Sign agreement over a prompt's candidate pairs with different gold rewards (ties in dF/dr 1/2); each term's
    share of Adam's step from the bias-corrected second moment; the norm ratio and cosine -- all worked out here."""
    from study import path_checks

    dF = T64(-1.0, 0.0, 2.0, 1.0, 1.0, 0.0)  # -dF/dr: (1, 0, -2) and (-1, -1, 0)
    gold = T64(3.0, 1.0, 1.0, 0.0, 2.0, 1.0)
    # prompt 1: (0,1) agree, (0,2) agree, (1,2) a gold tie (left out); prompt 2: (0,1) a dF tie 1/2, (0,2) agree,
    # (1,2) disagree -> 3.5 over 5 pairs
    assert path_checks.sign_agreement(dF, gold, 3) == (pytest.approx(3.5), 5)
    # v_hat = (4, 1) / (1 - 0.999) = (4000, 1000): a's step 1/4000 + 1/1000, b's 4/1000
    shares = path_checks.adam_shares({"dpo": [T64(1.0, 1.0)], "bt": [T64(0.0, 2.0)]}, [T64(4.0, 1.0)], step=1, eps=0.0)
    assert shares == {"dpo": pytest.approx(0.00125 / 0.00525), "bt": pytest.approx(0.004 / 0.00525)}
    assert path_checks.ratio_and_cosine([T64(3.0, 4.0)], [T64(0.0, 5.0)]) == (pytest.approx(1.0), pytest.approx(0.8))


def test_s54_signal_recomputes_the_step_training_took(bl):
    """path_checks.term_gradients at a kept step: the DPO term's and lam L_BT's gradients add up to the gradient the
    step applied (its logged norm), and second_moment_after is the second moment torch's Adam holds after that step
    (read from a run stopped there); signal's pairs are the within-prompt candidate pairs with different gold."""
    from study import path_checks

    s = bl
    cfg = replace(s["cfg"], T=2, cg_iters=5, lam=0.4, outer_steps=3)
    phi = policy.copy_params(s["phi"])
    log, kept = hypergradient_checks.train_with_checkpoints(
        s["model"], s["rm"], phi, s["domains"], s["pairs"], replace(cfg), s["theta_ref"], G(0), G(1), steps=(0, 2)
    )

    def gold(batch):  # any gold reward of the candidates will do: here a function of their tokens
        return (batch["idx"] % 3).sum(-1).to(f64)

    for k in kept:
        g_dpo, g_bt, score, pairs = path_checks.term_gradients(s["model"], s["rm"], s["theta_ref"], k, 3, gold)
        total = [a + b for a, b in zip(g_dpo, g_bt)]
        assert torch.cat([x.flatten() for x in total]).norm().item() == pytest.approx(
            log[k["step"]]["grad_norm"], rel=1e-10
        )
        stopped = policy.copy_params(s["phi"])
        _, state = metarm.train_bilevel(
            s["model"],
            s["rm"],
            stopped,
            s["domains"],
            s["pairs"],
            replace(cfg),
            s["theta_ref"],
            G(0),
            G(1),
            k["step"] + 1,
        )
        adam = [state["opt"].state[p]["exp_avg_sq"] for p in stopped.values()]
        for ours, torch_s in zip(path_checks.second_moment_after(k, total), adam):
            assert torch.allclose(ours, torch_s, rtol=1e-10, atol=1e-300)
        assert 0 < pairs <= sum(len(p["cand"]["idx"]) // cfg.K * 6 for p in k["problems"].values())
        out = path_checks.signal(s["model"], s["rm"], s["theta_ref"], k, 3, gold)
        assert 0 <= out["score"] <= out["pairs"] == pairs and 0 < out["share_dpo"] < 1 and -1 <= out["cosine"] <= 1
