"""Tests of the study's statistics and summaries (study/stats.py, study/summary.py, study/methods.py and the tables
of study/plots.py), by hand: pure numbers in, every interval, verdict, MDE and pooled estimate worked out in the test.
The verdict rule's parameters are the registered ones (study/preregistration.json).
"""

import json
import math

import pytest

from conftest import one_line_error
from study import plots, stats, summary
from study.methods import METHODS

PREREG = summary.read_preregistration()
RULE = summary.rule(PREREG)  # alpha 0.05, power 0.8, at least 10 seeds
CONFIG = {"domains": "dev", "seeds": 2, "beta": 0.5, "outer_data": "train"}  # what summarise and results.md read


def test_t_quantile_and_interval():
    """t quantiles (tables); interval = mean +- t(n - 1) s / sqrt(n) by hand."""
    assert [stats.t_quantile(df) for df in (9, 2, 29)] == pytest.approx([2.262157, 4.302653, 2.045230], abs=1e-4)
    iv, half = stats.interval([1.0, 2.0, 4.0]), 4.302653 * math.sqrt(7 / 3 / 3)  # mean 7/3, s^2 = 7/3
    assert iv["n_seeds"] == 3
    assert iv["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half], abs=1e-5)
    assert stats.interval([0.5]) == {"mean": 0.5, "ci95": None, "n_seeds": 1}


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
    assert [stats.verdict(ci, 0.1, d) for ci, d, _ in cases] == [v for _, _, v in cases]
    t2 = {p: math.sqrt(2 * (2 * p - 1) ** 2 / (1 - (2 * p - 1) ** 2)) for p in (0.975, 0.8)}
    se = math.sqrt(7 / 9)  # diffs 3, 4, 6: s^2 = 7/3, n = 3; interval 13/3 +- 4.3027 se: about [0.54, 8.13]
    out = stats.decide([3.0, 4.0, 6.0], 0.5, **{**RULE, "min_seeds": 3})
    assert out["verdict"] == "reproduced"
    assert out["delta"] == 0.5
    assert out["benefit_excluded"] is False
    assert out["mde80"] == pytest.approx((t2[0.975] + t2[0.8]) * se, rel=1e-6)
    small = stats.decide([0.01, 0.02, 0.04], 0.5, **{**RULE, "min_seeds": 3})  # 7/300 +- 4.3027 se / 100
    assert small["verdict"] == "absent"
    assert small["benefit_excluded"] is True
    assert small["mde80"] == pytest.approx((t2[0.975] + t2[0.8]) * se / 100, rel=1e-6)
    flipped = stats.decide([-3.0, -4.0, -6.0], 0.5, direction=-1, **{**RULE, "min_seeds": 3})
    assert flipped["verdict"] == "reproduced"
    assert flipped["benefit_excluded"] is False
    assert stats.decide([0.3], 0.1, **{**RULE, "min_seeds": 1}) == {
        "mean": 0.3,
        "ci95": None,
        "n_seeds": 1,
        "delta": 0.1,
        "verdict": "undetermined",
        "benefit_excluded": None,
        "mde80": None,
    }
    # the registered minimum, 10 seeds: below it no verdict, whatever the interval; None values do not count
    assert RULE == {"alpha": 0.05, "power": 0.8, "min_seeds": 10}
    assert stats.decide([3.0, 4.0, 6.0], 0.5, **RULE)["verdict"] == "undetermined (fewer than 10 seeds)"
    ten = [3.0, 4.0, 6.0] * 3 + [4.0, None]
    assert stats.decide(ten, 0.5, **RULE)["verdict"] == "reproduced"
    assert stats.decide(ten[:-2] + [None, None], 0.5, **RULE)["verdict"] == "undetermined (fewer than 10 seeds)"


def test_matched_kl_by_hand():
    """Jia's frontier at matched KL (METHOD.md §5.1): gold on the piecewise-linear curve in log KL, inside a segment,
    at a point, extended beyond either end, undefined at KL <= 0 or two points at one KL; matched_kl's per-seed
    differences and counts, judged with the registered rule."""
    e = math.e
    curve = [(1.0, 0.0), (e, 1.0), (e**3, 2.0)]  # log KL 0, 1, 3
    assert summary.gold_at_kl(curve, e**0.5) == (pytest.approx(0.5), False)
    assert summary.gold_at_kl(curve, e**2) == (pytest.approx(1.5), False)
    assert summary.gold_at_kl(curve, e) == (pytest.approx(1.0), False)
    assert summary.gold_at_kl(list(reversed(curve)), e**4) == (pytest.approx(2.5), True)
    assert summary.gold_at_kl(curve, e**-1) == (pytest.approx(-1.0), True)
    assert summary.gold_at_kl(curve, 0.0) == (None, False)
    assert summary.gold_at_kl([(1.0, 0.0), (1.0, 1.0), (e, 2.0)], 1.5) == (None, False)
    assert summary.gold_at_kl([(-0.1, 0.0), (e, 1.0), (e**3, 2.0)], 1.5) == (None, False)
    values = {
        "vanilla_rm": {"0.5": {"kl": [e, e**2, e, e**4], "gold_reward": [0.5, 1.0, 0.0, 2.0]}},
        "bilevel": {
            "0.25": {"kl": [e**3, e**3, -1.0, e**3], "gold_reward": [2.0, 2.0, 0.0, 2.0]},
            "0.5": {"kl": [e, e, e, e], "gold_reward": [1.0, 1.0, 0.0, 1.0]},
            "1.0": {"kl": [1.0, 1.0, 1.0, 1.0], "gold_reward": [0.0, 0.0, 0.0, 0.0]},
        },
    }
    out = summary.matched_kl(values, "0.5", [0, 1, 2, 3], PREREG["delta"]["gold_reward"], RULE)
    # 1.0 - 0.5; 1.5 - 1.0; KL -1: undefined; log KL 4 beyond the curve: 2.5 - 2.0 on the extended last segment
    assert out["per_seed"] == [pytest.approx(0.5), pytest.approx(0.5), None, pytest.approx(0.5)]
    assert (out["n_seeds"], out["undefined_seeds"], out["extended_seeds"]) == (3, 1, 1)
    assert out["ci95"] == [pytest.approx(0.5), pytest.approx(0.5)]  # three equal differences: s = 0
    assert out["verdict"] == "undetermined (fewer than 10 seeds)"


def test_pool_worlds_by_hand(tmp_path, capsys):
    """METHOD.md §5.1, worlds: per-world means 0.1, 0.2, 0.6 pool to 0.3 with the t-interval over W = 3 worlds
    (df 2: t = 4.302653), s = sqrt(0.07), so the between-world spread is sqrt(0.07); differing verdicts are flagged;
    a comparison missing from a world is pooled over the others. `python -m study.plots` of two worlds' runs prints the
    table; two runs of one world are refused in one line."""
    names = [f"{a} - {b}" for a, b in PREREG["primary"]]

    def run(mean, verdict):
        return {
            "paired": {
                n: {"mean": mean, "ci95": [mean - 1, mean + 1], "n_seeds": 10, "verdict": verdict} for n in names
            }
        }

    worlds = {0: run(0.1, "absent"), 1: run(0.2, "absent"), 2: run(0.6, "reproduced")}
    del worlds[2]["paired"][names[1]]
    out = summary.pool_worlds(worlds, PREREG)
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


def test_summarise_pairs_methods_by_seed():
    """summarise: seeds' means over domains, paired difference with wins and interval by hand, ceilings."""
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
    out = summary.summarise(
        CONFIG, [{"metrics": metrics(v, o), "premises": prem} for v, o in ((0.0, 1.0), (1.0, 3.0))], PREREG
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
        out = summary.summarise(CONFIG, per_seed, PREREG)  # in_domain: headroom -+ 3 (half-width 3 t)
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
    out = summary.collapse([run((1.0, 2.0), (1.0, 5.0)), run((1.0, 1.0), (4.0, 4.0))], ["x", "y"])
    assert out["mean"] == pytest.approx(0.375)
    assert out["ci95"] == pytest.approx([0.375 - 12.706205 * 0.125, 0.375 + 12.706205 * 0.125], rel=1e-6)
    assert out["holds"] is False
    assert out["threshold"] == 0.5
    assert summary.collapse([run((1.0, 1.0), (4.0, 4.0))] * 3, ["x", "y"])["holds"] is True
    assert summary.collapse([run((2.0, 2.0), (4.0, 4.0))] * 3, ["x", "y"])["holds"] is False  # 0.5 is not below 0.5


def test_s53_gold_collapse_and_the_drop_split_by_hand():
    """Gold's collapse ratio and RM / gold per seed (domain means first); the accuracy drop split in both orders over
    the bins with an accuracy on both sides (bin 0, gold ties only, left out and the shares renormalised)."""
    prem = {
        "absdiff_median_pi_ref": 2.0,
        "absdiff_median_adapted": 0.5,
        "gold_absdiff_median_pi_ref": 2.0,
        "gold_absdiff_median_adapted": 1.0,
        # pi_ref's samples: shares (0.2 ties, 0.2, 0.6) -> renormalised (0.25, 0.75), accuracies (0.6, 0.9)
        # adapted: shares (0.2 ties, 0.6, 0.2) -> (0.75, 0.25), accuracies (0.5, 0.7)
        "share_bin0_pi_ref": 0.2,
        "acc_bin0_pi_ref": None,
        "share_bin1_pi_ref": 0.2,
        "acc_bin1_pi_ref": 0.6,
        "share_bin2_pi_ref": 0.6,
        "acc_bin2_pi_ref": 0.9,
        "share_bin0_adapted": 0.2,
        "acc_bin0_adapted": None,
        "share_bin1_adapted": 0.6,
        "acc_bin1_adapted": 0.5,
        "share_bin2_adapted": 0.2,
        "acc_bin2_adapted": 0.7,
    }
    per_seed = [{"premises": {"x": prem, "y": prem}}] * 2
    gold = summary.gold_collapse(per_seed, ["x", "y"])
    assert gold["gold_collapse_ratio"]["mean"] == pytest.approx(0.5)
    assert gold["collapse_ratio_rm_over_gold"]["mean"] == pytest.approx(0.25 / 0.5)
    split = {k: v["mean"] for k, v in summary.drop_split(per_seed, ["x", "y"]).items()}
    a00, a11 = 0.25 * 0.6 + 0.75 * 0.9, 0.75 * 0.5 + 0.25 * 0.7  # 0.825, 0.55
    a10, a01 = 0.75 * 0.6 + 0.25 * 0.9, 0.25 * 0.5 + 0.75 * 0.7  # adapted's mix at pi_ref's accuracies; and back
    assert split == pytest.approx(
        {
            "total": a11 - a00,
            "mix_first.mix": a10 - a00,
            "mix_first.ranking": a11 - a10,
            "ranking_first.ranking": a01 - a00,
            "ranking_first.mix": a11 - a01,
        }
    )
    assert split["mix_first.mix"] + split["mix_first.ranking"] == pytest.approx(split["total"])


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
    out = summary.summarise(CONFIG, per_seed, PREREG)
    mechanism = out["paired_rm_accuracy"]["metarm - metarm_eta0 (accuracy on MetaRM's shifted samples X_s)"]
    assert mechanism["per_seed"] == [pytest.approx(0.1), pytest.approx(0.3)]
    assert mechanism["delta"] == 0.05
    assert mechanism["wins"] == 2
    assert out["unseen_mass_dpo_minus_sft"]["per_seed"] == [pytest.approx(0.2), pytest.approx(0.0)]
    assert out["paired"]["dpo - sft"]["per_seed"] == [pytest.approx(0.1), pytest.approx(0.3)]
    assert out["paired"]["dpo - vanilla_rm"]["per_seed"] == [pytest.approx(-0.9), pytest.approx(-0.7)]
    assert out["methods"]["sft"]["shifted_accuracy"] is None


def test_s52_judged_comparisons():
    """The comparisons a run judges: the primary ones, then the positive control's (--outer-data own) and DPO's (dpo
    and sft both run), each once, in that order."""
    primary = summary.pairs(PREREG["primary"])
    every = list(METHODS)
    assert summary.judged_comparisons("train", every, PREREG) == primary + (
        ("dpo", "sft"),
        ("dpo", "vanilla_rm"),
    )
    own = summary.judged_comparisons("own", ["vanilla_rm", "bilevel", "bilevel_bt_only"], PREREG)
    assert own == primary + (("bilevel_bt_only", "vanilla_rm"), ("bilevel", "in_domain_rm"))
    # METHOD.md §5.4: the diagnostics' comparisons only where they ran
    with_swap = summary.judged_comparisons("own", ["vanilla_rm", "bilevel", "bilevel_swapped"], PREREG)
    assert with_swap == own + (("bilevel", "bilevel_swapped"),)


def test_methods_table_is_data_the_pipeline_and_plots_read():
    """study/methods.py: every method's matched control is a method, and (method, control) a registered comparison
    (primary, or a positive control's); a reused run is a method with a reward model; the ceilings are
    summary.CEILINGS; every figure colour and label is the table's, colours distinct."""
    registered = set(summary.pairs(PREREG["primary"]))
    for control in PREREG["positive_controls"].values():
        if isinstance(control, dict) and isinstance(control.get("comparisons"), list):
            registered |= set(summary.pairs(control["comparisons"]))
    for m, row in METHODS.items():
        assert row.role in ("baseline", "method", "control", "ceiling", "diagnostic")
        assert row.adapts_with in (None, "rm", "gold", "agnostic gold", "rounds")
        if row.control:
            assert (m, row.control) in registered
        if row.reuses:
            assert METHODS[row.reuses].has_rm and row.has_rm
    assert [m for m, row in METHODS.items() if row.role == "method"] == ["bilevel", "metarm"]
    assert summary.CEILINGS == ("oracle", "in_domain_rm", "agnostic_oracle")
    assert all(plots.COLORS[m] == row.color for m, row in METHODS.items())
    assert len({row.color for row in METHODS.values()}) == len(METHODS)
    assert len({row.label for row in METHODS.values()}) == len(METHODS)


def test_paired_rows_draw_the_band_and_each_verdict():
    """Figure 1's panels (study/plots.py): one row per comparison with its interval, top to bottom, the registered
    +-delta band shaded, each verdict written beside its row; no band where no delta is given."""
    import matplotlib.pyplot as plt

    rows = [("a - b", {"mean": 0.1, "ci95": [0.0, 0.2]}, "undetermined"), ("c - d", {"mean": -0.05, "ci95": None}, "")]
    fig, (ax, bare) = plt.subplots(1, 2)
    plots.paired_rows(ax, rows, 0.1, "x")
    plots.paired_rows(bare, rows, None, "x")
    assert [t.get_text() for t in ax.texts] == ["undetermined"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a - b", "c - d"]
    band = [p for p in ax.patches]
    assert len(band) == 1 and band[0].get_x() == pytest.approx(-0.1) and band[0].get_width() == pytest.approx(0.2)
    assert not bare.patches
    assert [list(line.get_xdata()) for line in ax.lines[:2]] == [[0.0, 0.2], [0.1]]
    plt.close(fig)


# ==== METHOD.md §5.3: the confirmatory run's p-values, Holm, and the pooled analyses ================================
def test_s53_t_cdf_and_chi2_sf_against_closed_forms():
    """t with 1 df is Cauchy, 0.5 + atan(x)/pi; with 2 df 0.5 + x / (2 sqrt(2 + x^2)); t_cdf(t_quantile(p)) = p.
    chi^2 survival: exp(-q/2) on 2 df, erfc(sqrt(q/2)) on 1 df, exp(-q/2)(1 + q/2) on 4 df."""
    for x in (-1500.0, -3.0, -0.7, 0.4, 1.3, 12.0, 40.0, 2500.0):
        assert stats.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, rel=1e-10, abs=1e-13)
        assert stats.t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), rel=1e-10, abs=1e-13)
        s3 = x / math.sqrt(3)  # 3 df: 1/2 + (s / (1 + s^2) + atan s) / pi, s = x / sqrt(3)
        assert stats.t_cdf(x, 3) == pytest.approx(0.5 + (s3 / (1 + s3 * s3) + math.atan(s3)) / math.pi, abs=1e-12)
    assert 1 - stats.t_cdf(1500.0, 1) == pytest.approx(0.5 - math.atan(1500.0) / math.pi, rel=1e-6)  # the far tail
    for df, p in ((9, 0.975), (29, 0.975), (9, 0.995), (2, 0.975)):  # the quantiles' own CDF (Simpson) agrees
        assert stats.t_cdf(stats.t_quantile(df, p), df) == pytest.approx(p, abs=1e-9)
    for q in (0.3, 2.2, 7.5, 30.0):
        assert stats.chi2_sf(q, 2) == pytest.approx(math.exp(-q / 2), rel=1e-9)
        assert stats.chi2_sf(q, 1) == pytest.approx(math.erfc(math.sqrt(q / 2)), rel=1e-6)
        assert stats.chi2_sf(q, 4) == pytest.approx(math.exp(-q / 2) * (1 + q / 2), rel=1e-6)


def test_s53_p_values_are_the_interval_rule_read_as_tests():
    """Duality, on 200 random sets of 10 paired differences: p_greater < 0.025 iff the 95 % interval's lo > 0,
    p_less < 0.025 iff hi < 0, p_tost < 0.025 iff the interval lies inside +-delta; so verdict_from_p of the
    unadjusted p-values is the registered verdict. And p_greater + p_less = 1."""
    import random

    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        mu, sd = rng.uniform(-0.15, 0.15), rng.uniform(0.01, 0.2)
        diffs = [rng.gauss(mu, sd) for _ in range(10)]
        p, iv = stats.p_values(diffs, 0.1), stats.interval(diffs)
        assert (p["p_greater"] < 0.025) == (iv["ci95"][0] > 0)
        assert (p["p_less"] < 0.025) == (iv["ci95"][1] < 0)
        assert (p["p_tost"] < 0.025) == (-0.1 < iv["ci95"][0] and iv["ci95"][1] < 0.1)
        assert p["p_greater"] + p["p_less"] == pytest.approx(1.0)
        assert stats.verdict_from_p(p) == stats.verdict(iv["ci95"], 0.1)
        seen.add(stats.verdict(iv["ci95"], 0.1))
    assert seen == {"reproduced", "contradicted", "absent", "undetermined"}


def test_s53_holm_by_hand_and_as_r_p_adjust():
    """Holm (1979) step-down: sorted p (0.005, 0.01, 0.03, 0.04) times (4, 3, 2, 1) = (0.02, 0.03, 0.06, 0.04), the
    running maximum makes the last 0.06; back in the given order -- R's p.adjust(c(.01, .04, .03, .005), "holm")."""
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([0.2]) == [0.2]
    assert stats.holm([0.01, None, 0.04]) == [pytest.approx(0.02), None, pytest.approx(0.04)]  # no test: out of m
    assert stats.p_values([0.25] * 10, 0.1) == {"p_greater": None, "p_less": None, "p_tost": None}  # SE = 0
    assert stats.verdict_from_p(stats.p_values([0.3], 0.1)) == "undetermined"


def test_s53_absent_reachable_by_hand():
    """2 Phi((delta - t SE)/SE) - 1 with t = t(0.975, 9): the issue's world 0 (SE = 0.0795 / 2.262, about 0.44) and a
    world whose t SE exceeds delta (0)."""
    import random

    t, se = stats.t_quantile(9), 0.0795 / stats.t_quantile(9)
    rng = random.Random(1)  # by simulation: the share of N(0, SE^2) means whose interval m +- t SE lies inside +-delta
    inside = sum(abs(rng.gauss(0.0, se)) + t * se < 0.1 for _ in range(200_000)) / 200_000
    assert stats.absent_reachable(se, 10, 0.1) == pytest.approx(inside, abs=0.005)
    assert stats.absent_reachable(se, 10, 0.1) == pytest.approx(0.44, abs=0.01)
    assert stats.absent_reachable(0.119 / t, 10, 0.1) == 0.0
    assert stats.absent_reachable(0.0, 10, 0.1) is None and stats.absent_reachable(0.1, 1, 0.1) is None


def test_s53_pooled_analyses_by_hand():
    """y = (0, 2, 5), SE = 1 each: Q = 114/9 (weights 1, mean 7/3), I^2 = (Q - 2)/Q, DerSimonian-Laird tau^2 =
    (Q - 2)/(3 - 3/3) = 48/9, equal weights 9/57, mean 7/3, Hartung-Knapp SE = sqrt((9/57)(114/9) / (2 * 27/57)) =
    sqrt(57/27), interval on 2 df; common effect: SE = 1/sqrt(3), t on 3 * (10 - 1) = 27 df; Q's p = exp(-Q/2)."""
    re = stats.random_effects([0.0, 2.0, 5.0], [1.0, 1.0, 1.0])
    q = 114 / 9
    assert re["Q"] == pytest.approx(q) and re["Q_p"] == pytest.approx(math.exp(-q / 2))
    assert re["I2"] == pytest.approx((q - 2) / q) and re["tau2"] == pytest.approx(48 / 9)
    assert re["mean"] == pytest.approx(7 / 3) and re["se"] == pytest.approx(math.sqrt(57 / 27))
    half = stats.t_quantile(2) * math.sqrt(57 / 27)
    assert re["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half])
    ce = stats.common_effect([0.0, 2.0, 5.0], [1.0, 1.0, 1.0], [10, 10, 10])
    half = stats.t_quantile(27) / math.sqrt(3)
    assert ce["df"] == 27 and ce["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half])
    assert re["ci95_untruncated"] == pytest.approx(re["ci95"])  # q = 1 exactly here: the truncation does not bite
    zero = stats.random_effects([1.0, 1.0], [0.5, 2.0])  # Q = 0 < df: tau^2 floored; q = 0, truncated to 1
    assert zero["tau2"] == 0.0 and zero["ci95_untruncated"] == pytest.approx([1.0, 1.0])
    half = stats.t_quantile(1) * math.sqrt(1 / (4 + 1 / 4))
    assert zero["ci95"] == pytest.approx([1.0 - half, 1.0 + half])
    assert stats.common_effect([1.0, 2.0], [0.0, 1.0], [10, 10]) is None and stats.random_effects([1.0], [0.0]) is None


def test_s53_random_effects_weights_by_hand_with_unequal_errors():
    """y = (0, 1, 3), SE = (1, 1/2, 1): w = (1, 4, 1), mean 7/6, Q = 174/36, DerSimonian-Laird tau^2 = (Q - 2) /
    (6 - 18/6) = 17/18, so w* = 1/(SE^2 + 17/18) = (18/35, 36/43, 18/35), unequal weights that the pool must use;
    q = sum w* (y - mu*)^2 / 2 and the Hartung-Knapp SE sqrt(max(1, q) / sum w*), all in exact fractions."""
    from fractions import Fraction as Fr

    y, se = [Fr(0), Fr(1), Fr(3)], [Fr(1), Fr(1, 2), Fr(1)]
    w = [1 / s**2 for s in se]
    q_value = sum(wi * (yi - sum(a * b for a, b in zip(w, y)) / sum(w)) ** 2 for wi, yi in zip(w, y))
    assert q_value == Fr(174, 36)
    tau2 = (q_value - 2) / (sum(w) - sum(wi**2 for wi in w) / sum(w))
    assert tau2 == Fr(17, 18)
    ws = [1 / (s**2 + tau2) for s in se]
    assert ws == [Fr(18, 35), Fr(36, 43), Fr(18, 35)]
    mu = sum(a * b for a, b in zip(ws, y)) / sum(ws)
    q = sum(wi * (yi - mu) ** 2 for wi, yi in zip(ws, y)) / 2
    out = stats.random_effects([float(v) for v in y], [float(v) for v in se])
    assert out["tau2"] == pytest.approx(float(tau2)) and out["mean"] == pytest.approx(float(mu))
    assert out["Q"] == pytest.approx(float(q_value)) and out["I2"] == pytest.approx(float((q_value - 2) / q_value))
    assert out["se"] == pytest.approx(math.sqrt(max(1.0, float(q)) / float(sum(ws))))
    assert out["mean"] != pytest.approx(sum(float(a * b) for a, b in zip(w, y)) / float(sum(w)))  # not w's mean


def test_s53_pools_are_equivariant():
    """Perturbations with a known answer: shifting every world's mean by c shifts both pools and their intervals by
    c; scaling means and errors by k scales them by k (Q and I^2 unchanged); the worlds' order does not matter."""
    y, se, n = [0.02, -0.05, 0.11], [0.03, 0.05, 0.04], [20, 10, 10]
    for pool in (lambda a, b: stats.common_effect(a, b, n), stats.random_effects):
        base = pool(y, se)
        shifted = pool([v + 0.3 for v in y], se)
        assert shifted["mean"] == pytest.approx(base["mean"] + 0.3)
        assert shifted["ci95"] == pytest.approx([v + 0.3 for v in base["ci95"]])
        scaled = pool([2 * v for v in y], [2 * s for s in se])
        assert scaled["ci95"] == pytest.approx([2 * v for v in base["ci95"]])
        assert scaled["Q"] == pytest.approx(base["Q"]) and scaled["I2"] == pytest.approx(base["I2"])
        if pool is stats.random_effects:
            permuted = pool(y[::-1], se[::-1])
            assert permuted["ci95"] == pytest.approx(base["ci95"]) and permuted["tau2"] == pytest.approx(base["tau2"])


def test_s53_pooled_analyses_reproduce_the_independent_review():
    """The review behind METHOD.md §5.3 pooled worlds 0-2's bilevel - vanilla_rm from the report's intervals (SE =
    half-width / t(0.975, 9)): Q = 1.25 (p 0.54, I^2 = 0), common effect +0.042 [-0.001, +0.084] on 27 df,
    Hartung-Knapp [-0.029, +0.112]; and Q about 6.8 (metarm - vanilla_rm) and 8.2 (vanilla_rm_long - vanilla_rm)."""
    t9 = stats.t_quantile(9)

    def pool(*worlds):
        y, se = [w[0] for w in worlds], [(hi - lo) / 2 / t9 for _, lo, hi in worlds]
        return stats.common_effect(y, se, [10] * 3), stats.random_effects(y, se)

    ce, re = pool((0.017, -0.063, 0.096), (0.023, -0.096, 0.142), (0.065, -0.001, 0.132))
    assert ce["Q"] == pytest.approx(1.25, abs=0.01) and ce["Q_p"] == pytest.approx(0.54, abs=0.01)
    assert ce["I2"] == 0.0 and ce["mean"] == pytest.approx(0.042, abs=0.001) and ce["se"] == pytest.approx(0.021, 0.02)
    assert ce["ci95"] == pytest.approx([-0.001, 0.084], abs=0.001)
    assert re["ci95_untruncated"] == pytest.approx([-0.029, 0.112], abs=0.001)  # as the review computed it
    assert re["ci95"][0] < ce["ci95"][0] and re["ci95"][1] > ce["ci95"][1]  # truncated: never inside the common one
    ce, _ = pool((-0.079, -0.178, 0.020), (0.055, -0.013, 0.124), (-0.023, -0.121, 0.074))
    assert ce["Q"] == pytest.approx(6.8, abs=0.1)
    ce, _ = pool((-0.049, -0.110, 0.012), (0.086, -0.026, 0.198), (0.069, -0.044, 0.182))
    assert ce["Q"] == pytest.approx(8.2, abs=0.1)


def test_s53_analysis_of_a_results_folder(tmp_path, capsys):
    """study.analysis on four written runs: world 0 pools the main run's and the confirmatory run's seeds (20), the
    Holm-adjusted p-values are holm() of the per-comparison ones, the verdicts come from the intervals; a folder
    without the runs is one line and exit 2."""
    from study import analysis, tables

    names = analysis.names(PREREG)
    shifts = {"main": 0.0, "confirmatory": 0.05, "world_1": 0.1, "world_2": -0.02}
    judged = {"mean": 0.25, "ci95": [-0.5, 1.0], "verdict": "undetermined", "round": 2}
    exploratory = {  # what the claims table reads besides the primary comparisons
        "figures": {
            "frontier": {"matched_kl": judged},
            "rlhf_rounds": {"verdicts": {"gold": [judged], "rm_accuracy": []}},
        },
        "mechanism_widening": {**judged, "acted": False},
        "premises": {"collapse_ratio": {**judged, "holds": False}, "gold_collapse_ratio": judged},
    }
    for run, shift in shifts.items():
        per_seed = {n: [shift + 0.01 * i * (k + 1) - 0.04 for i in range(10)] for k, n in enumerate(names)}
        per_seed["dpo - sft"] = [0.01 * i for i in range(10)]  # mean 0.045
        paired = {n: {**stats.decide(d, 0.1, **RULE), "per_seed": d} for n, d in per_seed.items()}
        (tmp_path / run).mkdir()
        (tmp_path / run / "results.json").write_text(json.dumps({"paired": paired, **exploratory}))
    assert analysis.main([str(tmp_path)]) == 0
    out = json.loads((tmp_path / "analysis.json").read_text())
    first = names[0]
    world0 = [0.01 * i - 0.04 for i in range(10)] + [0.05 + 0.01 * i - 0.04 for i in range(10)]
    assert out["pooled"][first]["per_world"]["0"]["n_seeds"] == 20
    assert out["pooled"][first]["per_world"]["0"]["mean"] == pytest.approx(sum(world0) / 20)
    assert out["pooled"][first]["common_effect"]["df"] == 19 + 9 + 9
    p = [stats.p_values([0.05 + 0.01 * i * (k + 1) - 0.04 for i in range(10)], 0.1)["p_tost"] for k in range(5)]
    assert [out["confirmatory"][n]["p_holm"]["p_tost"] for n in names] == pytest.approx(stats.holm(p))
    for c in out["confirmatory"].values():
        assert c["ci_bonferroni"][0] < c["ci95"][0] and c["ci95"][1] < c["ci_bonferroni"][1]
    # the confirmatory run's first comparison: 0.01 + 0.01 i, mean 0.055, s = 0.0303, hi = 0.055 + 2.262 * 0.00957
    c = out["confirmatory"][first]
    assert c["mean"] == pytest.approx(0.055) and c["verdict"] == "reproduced" and c["verdict_holm"] == "reproduced"
    assert c["sensitivity"] == {"0.075": "reproduced", "0.094": "reproduced", "0.125": "reproduced"}
    assert "Holm" in capsys.readouterr().out
    claims = (tmp_path / "claims.md").read_text()  # the positive controls' rows only where their runs are
    c = out["confirmatory"][first]
    assert f"{tables.num(c['mean'])} {tables.ci(c['ci95'])} | **{c['verdict']}**" in claims
    assert "positive control" not in claims and "+0.250 [−0.500, +1.000] | undetermined (exploratory)" in claims
    assert "dpo − sft: +0.045 [" in claims  # from the main run
    assert "did not act detectably (exploratory)" in claims  # widening [-0.5, +1.0]: not above 0, not below
    assert tables.acted({"acted": False, "ci95": [-0.2, -0.1]}) == "narrowed them"
    assert tables.acted({"acted": True, "ci95": [0.1, 0.2]}) == "acted"
    (tmp_path / "world_2" / "results.json").unlink()
    assert analysis.main([str(tmp_path)]) == 2
    assert "world_2" in one_line_error(capsys)


def test_s53_fill_replaces_only_named_blocks():
    """study.tables.fill: each `<!-- table: NAME -->` block gets generated[NAME]; other text, unknown blocks stay."""
    from study import tables

    text = "a\n<!-- table: x -->\nold\n<!-- /table -->\nb\n<!-- table: y -->\nkept\n<!-- /table -->\nc"
    assert tables.fill(text, {"x": "new\n"}) == text.replace("old\n", "new\n")
    assert tables.fill(tables.fill(text, {"x": "new\n"}), {"x": "new\n"}) == text.replace("old\n", "new\n")
    decoy = "in a sentence <!-- table: x -->\nnot a block <!-- /table -->\n" + text  # markers inside lines
    assert tables.fill(decoy, {"x": "new\n"}) == decoy.replace("old\n", "new\n")


def test_s54_path_signal_pools_pairs_and_averages_steps_by_hand():
    """M1 over seeds: each seed's agreement is its scores over its pairs (domains and steps pooled), its ratio,
    cosine and share the means over steps (None left out); "signal" iff the agreement's interval is above 0.5."""
    seed = {
        "a": [{"score": 3.0, "pairs": 4, "ratio": 0.5, "cosine": 0.1, "share_dpo": 0.2}],
        "b": [{"score": 1.0, "pairs": 2, "ratio": 1.5, "cosine": None, "share_dpo": 0.4}],
    }
    other = {"a": [{"score": 7.0, "pairs": 8, "ratio": 1.0, "cosine": 0.3, "share_dpo": 0.3}]}
    out = summary.path_signal([seed, other])
    assert out["sign_agreement"]["mean"] == pytest.approx((4 / 6 + 7 / 8) / 2)  # pooled: not (3/4 + 1/2) / 2
    assert out["ratio"]["mean"] == pytest.approx((1.0 + 1.0) / 2) and out["cosine"]["mean"] == pytest.approx(0.2)
    assert out["share_dpo"]["mean"] == pytest.approx((0.3 + 0.3) / 2)
    assert out["signal"] is False  # two seeds: t(1) makes the interval wide
    assert summary.path_signal([other] * 3)["signal"] is True  # no spread: an interval of width 0 at 0.875


def test_s54_path_reading_by_the_registered_pattern():
    """METHOD.md §5.4's readings, case by case: E2 needs signal, M2 reproduced and the DPO term below lam L_BT by
    either measure; E1 or E3 needs no signal, M2 and M3 not reproduced and M4 reproduced at some setting; E4 needs
    all four M4 settings run and none reproduced (and M2 not reproduced); anything else is not decided."""
    from study.analysis import path_reading

    undetermined, four_nulls = "undetermined", ["absent", "undetermined", "undetermined", "absent"]
    assert path_reading(True, 0.9, 0.8, "reproduced", undetermined, []) == "E2"  # the ratio's upper end < 1
    assert path_reading(True, 1.2, 0.45, "reproduced", undetermined, []) == "E2"  # the share's upper end < 0.5
    assert path_reading(True, 1.0, 0.5, "reproduced", undetermined, []) == "not decided"  # both at the bound
    assert path_reading(False, 0.5, 0.2, "reproduced", undetermined, []) == "not decided"  # no signal
    assert path_reading(True, None, 1.0, "reproduced", undetermined, []) == "not decided"  # lam = 0: no ratio
    assert path_reading(False, 2.0, 0.9, "absent", undetermined, [undetermined, "reproduced"]) == "E1 or E3"
    assert path_reading(False, 2.0, 0.9, "absent", "reproduced", [undetermined, "reproduced"]) == "not decided"
    assert path_reading(True, 2.0, 0.9, "absent", undetermined, ["reproduced"]) == "not decided"  # signal
    assert path_reading(True, 2.0, 0.9, undetermined, undetermined, four_nulls) == "E4"
    assert path_reading(False, 2.0, 0.9, undetermined, undetermined, four_nulls[:3]) == "not decided"
    assert path_reading(False, 2.0, 0.9, "reproduced", undetermined, four_nulls) == "not decided"


def test_s54_path_analysis_of_a_results_folder(tmp_path):
    """study.analysis.path on written runs: nothing until M1's and M2's runs are there; then M1 as the run recorded
    it, M2, M3 and M3's mean over M2's, M4 at the settings that ran (in the registered order, stopping at a gap),
    and DPO's corner: inside the grid iff neither further row's mean beats the chosen row's."""
    from study import analysis

    def entry(mean, verdict):
        per_seed = [mean + 0.01 * (i - 4.5) for i in range(10)]
        return {
            "mean": mean,
            "ci95": [mean - 0.1, mean + 0.1],
            "verdict": verdict,
            "n_seeds": 10,
            "per_seed": per_seed,
        }

    def write(name, obj):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(obj))

    interval = {"mean": 0.6, "ci95": [0.55, 0.65]}
    signal = {"sign_agreement": interval, "ratio": interval, "cosine": interval, "share_dpo": interval, "signal": True}
    accuracy = {
        m: {"rm_accuracy": {"mean": 0.8, "ci95": [0.7, 0.9]}} for m in ("vanilla_rm", "bilevel", "bilevel_swapped")
    }
    m1_paired = {"bilevel - bilevel_bt_only": entry(0.05, "undetermined")}
    write("path_m1", {"path_signal": signal, "paired": m1_paired, "config": {"lam": 0.3}, "methods": accuracy})
    assert analysis.path(tmp_path) is None
    paired = {
        "bilevel - vanilla_rm": entry(0.2, "reproduced"),
        "bilevel - bilevel_swapped": entry(0.3, "reproduced"),
        "in_domain_rm - vanilla_rm": entry(3.0, "reproduced"),
    }
    lam0 = {"paired": paired, "config": {"lam": 0.0}, "methods": accuracy}
    write("path_m2_m3", {**lam0, "path_signal": {**signal, "sign_agreement": {"mean": 0.7, "ci95": None}}})
    ceiling = {"in_domain_rm - vanilla_rm": entry(0.2, "n/a (a ceiling)")}
    write("path_m4", {"paired": {"bilevel_gold - vanilla_rm": entry(0.05, "undetermined"), **ceiling}})
    write("path_m4_steps80", {"paired": {"bilevel_gold - vanilla_rm": entry(0.5, "reproduced")}})  # after a gap
    for name, mean in (("dpo_corner_chosen", -0.1), ("dpo_corner_lr3e-4", -0.2), ("dpo_corner_steps10", -0.1)):
        write(name, {"paired": {"dpo - sft": entry(mean, "undetermined (fewer than 10 seeds)")}})
    out = analysis.path(tmp_path)
    assert out["M1"] == signal and out["M1_at_lam_0"]["mean"] == 0.7
    assert out["M2"]["verdict"] == "reproduced" and out["M3"]["over_M2"] == pytest.approx(1.5)
    assert out["M2_ceiling"]["mean"] == 3.0 and out["path_at_lam_0.3"]["mean"] == 0.05
    assert list(out["rm_accuracy"]) == [
        "vanilla_rm, lam = 0.3",
        "bilevel, lam = 0.3",
        "bilevel, lam = 0",
        "bilevel_swapped, lam = 0",
    ]
    assert [e["run"] for e in out["M4"]] == ["path_m4"]  # K = 8 is missing: the later setting does not count
    assert out["M4"][0]["over_ceiling"]["mean"] == pytest.approx(0.05 - 0.2)  # paired, seed by seed
    assert out["M5_inside_grid"] is True and [e["mean"] for e in out["M5"]] == [-0.1, -0.2, -0.1]
    assert out["reading"] == "E2"  # signal, M2 reproduced, the ratio's upper end 0.65 < 1
    (tmp_path / "dpo_corner_steps10" / "results.json").write_text(
        json.dumps({"paired": {"dpo - sft": entry(-0.09, "undetermined (fewer than 10 seeds)")}})
    )
    assert analysis.path(tmp_path)["M5_inside_grid"] is False
