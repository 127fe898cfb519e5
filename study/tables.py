"""The README's claims table and the report's tables, generated from the committed runs in results/ (METHOD.md §5.3):
every number in them is read from a run's results.json or from study.analysis's pooled analyses, never typed. Tests
check that README.md and study/REPORT.md show these tables as generated (study/test_layout.py). Pure Python.
"""

import json
import re
from pathlib import Path

REPORT = "study/REPORT.md"
CONFIRMATORY = f"[Confirmatory run]({REPORT}#the-confirmatory-run-fresh-seeds-1019)"
CONTROLS = f"[Positive controls]({REPORT}#can-the-machinery-show-an-effect-at-all-positive-controls)"
# (the paper's claim, the primary comparison) in the claims table's order
PRIMARY_CLAIMS = (
    ("Jia: the meta-learned RM guides adaptation better than a vanilla RM", "bilevel - vanilla_rm"),
    ("… because of its bilevel path (the DPO term through the hypergradient)", "bilevel - bilevel_bt_only"),
    ("Dou et al.: MetaRM's RM guides adaptation better out of distribution", "metarm - vanilla_rm"),
    ("… because of the ascent on the difference loss", "metarm - metarm_eta0"),
    ("a control: more Bradley–Terry updates alone", "vanilla_rm_long - vanilla_rm"),
)
ROUND_CLAIMS = (  # (the rounds' metric, the paper's claim, what is measured)
    ("gold", "Dou et al.: the policy improves further over RLHF rounds", "MetaRM − η = 0, rounds"),
    (
        "rm_accuracy",
        "Dou et al.: MetaRM keeps the RM telling the shifted samples apart",
        "the RM's pair accuracy, rounds",
    ),
)
PAIRED_ROWS = (  # the report's paired table: comparison -> what it isolates
    ("bilevel - vanilla_rm", "Jia"),
    ("bilevel - bilevel_bt_only", "the DPO term"),
    ("metarm - vanilla_rm", "Dou et al."),
    ("metarm - metarm_eta0", "the ascent on J"),
    ("vanilla_rm_long - vanilla_rm", "more updates alone"),
    ("dpo - sft", "DPO tuned on dev"),
    ("dpo - vanilla_rm", ""),
    ("in_domain_rm - vanilla_rm", "reachable headroom"),
    ("oracle - vanilla_rm", ""),
)


def markdown(header: str, rows: list) -> str:
    """A markdown table: the header line, its separator (one column per cell of the header), the rows."""
    return "\n".join([header, "|" + "---|" * (header.count("|") - 1), *rows]) + "\n"


def acted(widening: dict) -> str:
    """MetaRM's mechanism in words (METHOD.md §5.3): acted iff the interval is above 0; without a delta, an interval
    that is not reads "did not act detectably", and one below 0 says that the ascent narrowed the differences."""
    if widening["acted"]:
        return "acted"
    return "narrowed them" if widening["ci95"] and widening["ci95"][1] < 0 else "did not act detectably"


def num(x: float, digits: int = 3) -> str:
    """A signed number with a typographic minus, as the README and the report print it."""
    return f"{x:+.{digits}f}".replace("-", "−")


def ci(iv, digits: int = 3) -> str:
    return f"[{num(iv[0], digits)}, {num(iv[1], digits)}]"


def plain(iv, digits: int = 3) -> str:
    """'mean [lo, hi]' of an interval dict, unsigned; 'n/a' for None."""
    if iv is None:
        return "n/a"
    text = f"{iv['mean']:.{digits}f}".replace("-", "−")
    if iv.get("ci95") is None:
        return text
    return text + f" [{iv['ci95'][0]:.{digits}f}, {iv['ci95'][1]:.{digits}f}]".replace("-", "−")


def name(comparison: str) -> str:
    return comparison.replace(" - ", " − ")


def load(folder: Path, run: str):
    path = folder / run / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ==== The README's claims table ======================================================================================
def claims_table(folder: Path, analysis: dict) -> str:
    """What the papers claim and what this project measured: the primary comparisons from the confirmatory run (its
    verdict after Holm, the registered claim, and unadjusted) and pooled over worlds 0-2 (random effects, the primary
    pool); the rest exploratory, or from the positive controls' held-out runs where those are in FOLDER (DPO: the main
    run)."""
    confirm = load(folder, "confirmatory")
    own, steps100, main = load(folder, "bilevel_own_data"), load(folder, "metarm_steps100"), load(folder, "main")
    header = (
        "| the paper's claim | measured: method − control [95 % CI] | verdict | pooled, worlds 0–2, every seed "
        "(random effects) | more |"
    )
    rows = []
    for claim, comparison in PRIMARY_CLAIMS:
        c, pool = analysis["confirmatory"][comparison], analysis["pooled"][comparison]
        re = pool["random_effects"]
        differ = " (worlds differ)" if pool["worlds_differ"] else ""
        rows.append(
            f"| {claim} | {name(comparison)}: {num(c['mean'])} {ci(c['ci95'])} | **{c['verdict_holm']}** (Holm); "
            f"unadjusted: {c['verdict']} | {num(re['mean'])} {ci(re['ci95'])}: {re['verdict']}{differ} | "
            f"{CONFIRMATORY} |"
        )
        if comparison == "bilevel - bilevel_bt_only":
            kl = confirm["figures"]["frontier"]["matched_kl"]
            rows.append(
                f"| Jia: more gold reward at matched KL | at the vanilla RM's KL: {num(kl['mean'])} {ci(kl['ci95'])} "
                f"| {kl['verdict']} (exploratory) | | {CONFIRMATORY} |"
            )
            if own:  # the positive control's held-out run
                both, path = own["paired"]["bilevel - vanilla_rm"], own["paired"]["bilevel - bilevel_bt_only"]
                rows.append(
                    "| … and where a domain's own labels are given (positive control) | bilevel − vanilla_rm: "
                    f"{num(both['mean'])} {ci(both['ci95'])}; the path, bilevel − bilevel_bt_only: "
                    f"{num(path['mean'])} {ci(path['ci95'])} | {both['verdict']}; {path['verdict']} | | {CONTROLS} |"
                )
        if comparison == "metarm - metarm_eta0":
            rounds = confirm["figures"]["rlhf_rounds"]["verdicts"]
            for key, claim_text, what in ROUND_CLAIMS:
                judged = rounds[key]
                cells = ", ".join(f"{num(v['mean'])} {ci(v['ci95'])}" for v in judged)
                verdicts = ", ".join(v["verdict"] for v in judged)
                which = ", ".join(str(v["round"]) for v in judged)
                rows.append(
                    f"| {claim_text} | {what} {which}: {cells} | {verdicts} (exploratory) | | {CONFIRMATORY} |"
                )
            widening = confirm["mechanism_widening"]
            rows.append(
                "| … by widening the reward differences on the shifted samples (its target) | metarm − metarm_eta0, "
                f"within-prompt \\|Δr\\| on X_s over each RM's own scale: {num(widening['mean'])} "
                f"{ci(widening['ci95'])} | {acted(widening)} (exploratory) | | "
                f"{CONFIRMATORY} |"
            )
            if steps100:  # MetaRM where its premise holds
                mechanism = next(iter(steps100["paired_rm_accuracy"].values()))
                rows.append(
                    "| … where its premise holds (`--adapt-steps 100`), on its own shifted samples | metarm − "
                    f"metarm_eta0, pair accuracy: {num(mechanism['mean'])} {ci(mechanism['ci95'])} | "
                    f"{mechanism['verdict']} | | {CONTROLS} |"
                )
            premise, gold = confirm["premises"]["collapse_ratio"], confirm["premises"]["gold_collapse_ratio"]
            rows.append(
                "| Dou et al.'s premise: the RM's within-prompt differences collapse on the adapted policy | collapse "
                f"ratio (adapted / π_ref): {plain(premise)}; gold's own: {plain(gold)} | "
                f"{'holds' if premise['holds'] else 'does not hold'} (below 0.5; exploratory) | | {CONFIRMATORY} |"
            )
    judged = main["paired"]["dpo - sft"]  # DPO draws from its own streams: the positive control's run gives the same
    rows.append(
        "| a baseline: DPO, tuned on dev like the methods (world 0, seeds 0–9) | dpo − sft: "
        f"{num(judged['mean'])} {ci(judged['ci95'])} | {judged['verdict']} | | {CONTROLS} |"
    )
    return markdown(header, rows)


# ==== The report's tables of one run =================================================================================
def methods_table(results: dict) -> str:
    """Per method: gold reward, win rate against pi_ref, RM accuracy on the held-out pairs, KL, with intervals."""
    header = "| method | gold reward | win rate vs π_ref | RM accuracy (held-out pairs) | KL(π‖π_ref) |"
    rows = []
    for m, r in results["methods"].items():
        win, kl = f"{r['win_rate']['mean']:.3f}", f"{r['kl']['mean']:.2f}"
        rows.append(f"| {m} | {plain(r['gold_reward'])} | {win} | {plain(r['rm_accuracy'])} | {kl} |")
    return markdown(header, rows)


OWN_DATA_ROWS = (  # the bilevel positive control's held-out table (METHOD.md §5.2)
    ("bilevel - bilevel_bt_only", "the hypergradient path: success?"),
    ("bilevel - vanilla_rm", "closes headroom?"),
    ("bilevel_bt_only - vanilla_rm", ""),
    ("bilevel - in_domain_rm", "40 steps"),
    ("in_domain_rm - vanilla_rm", "the budget-matched ceiling"),
)
STEPS100_ROWS = (  # MetaRM where its premise holds (METHOD.md §5.2)
    ("metarm - vanilla_rm", ""),
    ("metarm - metarm_eta0", ""),
    ("vanilla_rm_long - vanilla_rm", ""),
)


def paired_table(results: dict, which=PAIRED_ROWS) -> str:
    """The paired differences in gold reward: mean, interval, seeds > 0, verdict, benefit excluded, MDE; with
    MetaRM's mechanism (its RM's accuracy on its shifted samples) where the run has it and `which` is not the main
    table's."""
    header = "| comparison | mean | 95 % CI | seeds > 0 | verdict | benefit ≥ δ excluded | MDE (80 %) |"
    rows = []
    judged = dict(results["paired"])
    if which is STEPS100_ROWS:
        mechanism = next(iter(results["paired_rm_accuracy"].values()))
        judged["mechanism"] = mechanism
        which = which + (("mechanism", "RM accuracy on MetaRM's own shifted samples X_s, δ = 0.05"),)
    for comparison, what in which:
        p = judged.get(comparison)
        if p is None:
            continue
        label = f"{name(comparison)} ({what})" if what else name(comparison)
        excluded = "" if "benefit_excluded" not in p else ("yes" if p["benefit_excluded"] else "no")
        mde = "" if p.get("mde80") is None else f"{p['mde80']:.3f}"
        verdict = p["verdict"] if p["verdict"].startswith("n/a") else f"**{p['verdict']}**"
        rows.append(
            f"| {label} | {num(p['mean'])} | {ci(p['ci95'])} | {p['wins']}/{p['n_seeds']} | {verdict} | {excluded} "
            f"| {mde} |"
        )
    return markdown(header, rows)


def trends_table(results: dict) -> str:
    """The papers' trends at the figures' seeds: Jia's matched KL, MetaRM's rounds (gold, RM accuracy), the outer
    stationarity at the last measured step per beta, and the hypergradient's error per solver."""
    figures = results["figures"]
    header = "| the paper's trend | measured | verdict | MDE |"
    rows = []
    kl = figures["frontier"]["matched_kl"]
    rows.append(
        "| Jia: more gold reward at matched KL (fig. 2) | bilevel − vanilla_rm at the vanilla RM's KL (β = 0.5): "
        f"{num(kl['mean'])} {ci(kl['ci95'])}; {kl['extended_seeds']} seed(s) extended, {kl['undefined_seeds']} "
        f"undefined | {kl['verdict']} | {kl['mde80']:.3f} |"
    )
    for key, claim, what in ROUND_CLAIMS:
        judged = figures["rlhf_rounds"]["verdicts"][key]
        which = ", ".join(str(v["round"]) for v in judged)
        cells = ", ".join(f"{num(v['mean'])} {ci(v['ci95'])}" for v in judged)
        verdicts = ", ".join(v["verdict"] for v in judged)
        mdes = ", ".join(f"{v['mde80']:.3f}" for v in judged)
        rows.append(f"| {claim} (fig. 5) | {what} {which}: {cells} | {verdicts} | {mdes} |")
    conv = figures["outer_convergence"]
    last = [
        f"{ivs[-1]['mean']:.3f} [{ivs[-1]['ci95'][0]:.3f}, {ivs[-1]['ci95'][1]:.3f}]" for ivs in conv["ratio"].values()
    ]
    below = all(ivs[-1]["ci95"][1] < 1 for ivs in conv["ratio"].values())
    rows.append(
        "| Jia: outer stationarity tightens with outer iterations (fig. 4) | ‖∇F(φ_k)‖² / ‖∇F(φ_0)‖² (raw) at step "
        f"{conv['steps'][-1]}, β = {', '.join(conv['ratio'])}: {', '.join(last)} | "
        f"{'every interval below 1' if below else 'not every interval below 1'} (no δ: not a paired comparison) | |"
    )
    curves = figures["hypergradient_error"]["curves"]
    solvers = []
    for solver, points in curves.items():
        solvers.append(f"{solver} " + " → ".join(f"{point['error']:.0e} ({point['hvps']})" for point in points))
    shown = "; ".join(solvers)
    rows.append(
        f"| hypergradient error → 0 as solver iterations grow (fig. 3) | relative error (HVPs): {shown} | shown (one "
        "problem, no seeds) | |"
    )
    return markdown(header, rows)


def accuracy_table(results: dict) -> str:
    """The hypergradient training used against its float64 reference, per checked outer step."""
    header = "| outer step | checks | cosine: min, median | relative error: median, max |"
    rows = []
    for step, s in results["hypergradient_accuracy"]["by_step"].items():
        rows.append(
            f"| {step} | {s['n']} | {s['cosine_min']:.3f}, {s['cosine_median']:.4f} | "
            f"{s['rel_error_median']:.3f}, {s['rel_error_max']:.3f} |"
        )
    return markdown(header, rows)


PREMISE_ROWS = (
    ("acc_behaviour_pairs", "accuracy on the behaviour pairs (its training distribution)"),
    ("acc_pi_ref_samples", "accuracy on π_ref's samples"),
    ("acc_adapted_samples", "accuracy on the samples of the policy adapted with it"),
    ("spread_pi_ref", "normalised spread (§3) on π_ref's samples"),
    ("spread_adapted", "normalised spread on the adapted policy's samples"),
    ("acc_margin_ge1_pi_ref", "accuracy on within-prompt pairs with a gold margin ≥ 1: π_ref's samples"),
    ("acc_margin_ge1_adapted", "… the adapted policy's samples"),
    (
        "collapse_ratio",
        "collapse ratio: median within-prompt \\|r_i − r_j\\|, adapted / π_ref's samples (0.5 registered)",
    ),
    ("gold_collapse_ratio", "gold's own collapse ratio: median within-prompt \\|g_i − g_j\\|, adapted / π_ref's"),
    ("collapse_ratio_rm_over_gold", "the RM's collapse ratio over gold's"),
)


def premises_table(results: dict) -> str:
    """The premises, measured with the vanilla RM (rows present in the run only)."""
    header = "| measurement (vanilla RM) | held-out |"
    rows = []
    for key, label in PREMISE_ROWS:
        if key in results["premises"]:
            rows.append(f"| {label} | {plain(results['premises'][key])} |")
    return markdown(header, rows)


def headroom_table(results: dict, primary: list) -> str:
    """The headroom rule on the run's held-out domains: the ceilings over the vanilla RM, the vanilla RM against the
    domain-agnostic oracle, the five comparisons' half-widths, and the ratio (3 required), also with the headroom's
    lower 95 % end."""
    paired, methods = results["paired"], results["methods"]
    halves = [(paired[c]["ci95"][1] - paired[c]["ci95"][0]) / 2 for c in primary]
    head = paired["in_domain_rm - vanilla_rm"]
    ratio, low = head["mean"] / max(halves), head["ci95"][0] / max(halves)
    header = "| | held-out (10 seeds) |"
    rows = [
        f"| oracle − vanilla_rm | {num(paired['oracle - vanilla_rm']['mean'])} "
        f"{ci(paired['oracle - vanilla_rm']['ci95'])} |",
        f"| in_domain_rm − vanilla_rm (reachable headroom) | {num(head['mean'])} {ci(head['ci95'])} |",
        f"| vanilla_rm vs agnostic_oracle (means) | {methods['vanilla_rm']['gold_reward']['mean']:.3f} vs "
        f"{methods['agnostic_oracle']['gold_reward']['mean']:.3f} |".replace("-", "−"),
        f"| half-widths of the five paired method differences | {min(halves):.3f}–{max(halves):.3f} |",
        f"| headroom / widest half-width (3 required) | **{ratio:.2f}: {'met' if ratio >= 3 else 'not met'}** |",
        f"| the same with the headroom's lower 95 % end | {low:.2f}: {'met' if low >= 3 else 'not met'} |",
    ]
    return markdown(header, rows)


def dpo_table(results: dict) -> str:
    """DPO at its dev-tuned default, from a run that has it: gold reward, dpo - sft with its verdict, KL, Delta of
    the chosen and rejected training responses at the end of training, and the unseen mass over pi_ref's."""
    dpo, paired, end = results["methods"]["dpo"], results["paired"]["dpo - sft"], results["dpo_training"]
    end = end["end_all_training_pairs"]
    header = (
        "| DPO | gold reward | dpo − sft | KL | Δ chosen at the end | Δ rejected at the end | unseen mass, dpo − sft |"
    )
    rows = [
        f"| tuned (Adam 1e-3) | {plain(dpo['gold_reward'])} | {num(paired['mean'])} {ci(paired['ci95'])}, "
        f"**{paired['verdict']}** | {dpo['kl']['mean']:.2f} | {plain(end['delta_chosen'], 2)} | "
        f"{plain(end['delta_rejected'], 2)} | {num(results['unseen_mass_dpo_minus_sft']['mean'])} "
        f"{ci(results['unseen_mass_dpo_minus_sft']['ci95'])} |",
    ]
    return markdown(header, rows)


def world_premises_table(folder: Path, primary: list) -> str:
    """Premises and ceilings per world's held-out run (vanilla RM): the headroom, the oracle's, the widest half-width
    of the primary comparisons and the ratio, and the vanilla RM's accuracies."""
    runs = {"0 (seeds 0–9)": "main", "0 (seeds 10–19)": "confirmatory", "1": "world_1", "2": "world_2"}
    header = (
        "| world | held-out headroom (in_domain_rm − vanilla_rm) | oracle − vanilla_rm | widest half-width; ratio | "
        "vanilla RM accuracy: behaviour pairs, π_ref's samples, adapted policy's samples |"
    )
    rows = []
    for world, run in runs.items():
        results = load(folder, run)
        paired, prem = results["paired"], results["premises"]
        head = paired["in_domain_rm - vanilla_rm"]
        widest = max((paired[c]["ci95"][1] - paired[c]["ci95"][0]) / 2 for c in primary)
        accuracies = ", ".join(
            f"{prem[k]['mean']:.3f}" for k in ("acc_behaviour_pairs", "acc_pi_ref_samples", "acc_adapted_samples")
        )
        rows.append(
            f"| {world} | {num(head['mean'])} {ci(head['ci95'])} | {num(paired['oracle - vanilla_rm']['mean'])} | "
            f"{widest:.3f}; {head['mean'] / widest:.2f} | {accuracies} |"
        )
    return markdown(header, rows)


def drop_split_table(results: dict) -> str:
    """The vanilla RM's accuracy drop split into the margin mix and the ranking at equal margin, both orders."""
    split = results["premises"]["accuracy_drop_split"]
    header = "| the accuracy drop (adapted − π_ref's samples), binned | mean [95 % CI] |"
    rows = []
    labels = {
        "total": "total",
        "mix_first.mix": "mix first: the margin mix",
        "mix_first.ranking": "… then the ranking at equal margin",
        "ranking_first.ranking": "ranking first: the ranking at equal margin",
        "ranking_first.mix": "… then the margin mix",
    }
    for key, label in labels.items():
        rows.append(f"| {label} | {num(split[key]['mean'])} {ci(split[key]['ci95'])} |")
    return markdown(header, rows)


def worlds_table(folder: Path, analysis: dict) -> str:
    """Per primary comparison, each world's run with its verdict (worlds 0, 1, 2 at seeds 0-9; world 0 also at
    10-19); the pools over every seed are the pooled table's."""
    runs = {
        "world 0, seeds 0–9": "main",
        "world 0, seeds 10–19": "confirmatory",
        "world 1": "world_1",
        "world 2": "world_2",
    }
    loaded = {label: load(folder, run) for label, run in runs.items()}
    header, rows = "| comparison | " + " | ".join(runs) + " |", []
    for comparison in analysis["pooled"]:
        cells = []
        for results in loaded.values():
            p = results["paired"][comparison]
            cells.append(f"{num(p['mean'])} {ci(p['ci95'])} {p['verdict']}")
        rows.append(f"| {name(comparison)} | {' | '.join(cells)} |")
    return markdown(header, rows)


def confirmatory_table(analysis: dict) -> str:
    """The confirmatory run's primary comparisons: the registered verdict, the Bonferroni interval, the Holm-adjusted
    p-values and verdict, the verdict at each sensitivity delta, and the chance "absent" had at the observed SE."""
    header = (
        "| comparison | mean [95 % CI] | 99 % CI (Bonferroni, 5) | Holm-adjusted p: > 0, < 0, TOST | verdict after "
        "Holm (the confirmatory claim) | unadjusted verdict | at δ = 0.075 / 0.094 / 0.125 | P(absent reachable) |"
    )
    rows = []
    for comparison, c in analysis["confirmatory"].items():
        holm = ", ".join(f"{c['p_holm'][k]:.3f}" for k in ("p_greater", "p_less", "p_tost"))
        rows.append(
            f"| {name(comparison)} | {num(c['mean'])} {ci(c['ci95'])} | {ci(c['ci_bonferroni'])} | {holm} | "
            f"**{c['verdict_holm']}** | {c['verdict']} | {' / '.join(c['sensitivity'].values())} | "
            f"{c['absent_reachable']:.2f} |"
        )
    return markdown(header, rows)


def post_hoc_table(analysis: dict) -> str:
    """World 0's verdicts at seeds 0-9 (the main table), labelled post hoc, with the same sensitivity."""
    header = (
        "| comparison | world 0, seeds 0–9: mean [95 % CI] | verdict (post hoc: δ fixed after these intervals were "
        "seen) | at δ = 0.075 / 0.094 / 0.125 | P(absent reachable) |"
    )
    rows = []
    for comparison, c in analysis["world_0_post_hoc"].items():
        rows.append(
            f"| {name(comparison)} | {num(c['mean'])} {ci(c['ci95'])} | {c['verdict']} | "
            f"{' / '.join(c['sensitivity'].values())} | {c['absent_reachable']:.2f} |"
        )
    return markdown(header, rows)


def pooled_table(analysis: dict) -> str:
    """Both registered pools over every seed: each world's mean (world 0: 20 seeds), the common effect, the random
    effects (primary), Q with its p-value, I^2, and whether the worlds differ (p(Q) < 0.10)."""
    header = (
        "| comparison | world 0 / 1 / 2 (seeds) | common effect (t on Σ(n − 1) df) | random effects (Hartung–Knapp "
        "truncated, t on W − 1 df): primary | untruncated | Q (p), I² | worlds differ |"
    )
    rows = []
    for comparison, p in analysis["pooled"].items():
        worlds = " / ".join(f"{num(w['mean'])} ({w['n_seeds']})" for w in p["per_world"].values())
        ce, re = p["common_effect"], p["random_effects"]
        if ce is None:  # a world with fewer than two seeds or SE 0: no pool (METHOD.md §5.3, amendment)
            rows.append(f"| {name(comparison)} | {worlds} | n/a | n/a | n/a | n/a | n/a |")
            continue
        rows.append(
            f"| {name(comparison)} | {worlds} | {num(ce['mean'])} {ci(ce['ci95'])} {ce['verdict']} ({ce['df']} df) | "
            f"{num(re['mean'])} {ci(re['ci95'])} **{re['verdict']}** ({re['df']} df) | {ci(re['ci95_untruncated'])} | "
            f"{re['Q']:.2f} ({re['Q_p']:.2f}), {re['I2']:.2f} | {'yes' if p['worlds_differ'] else 'no'} |"
        )
    return markdown(header, rows)


def judged_cell(entry: dict) -> str:
    return f"{num(entry['mean'])} {ci(entry['ci95'])}, **{entry['verdict']}**"


def path_table(path: dict) -> str:
    """METHOD.md §5.4's four measurements on the dev domains (10 seeds each), with the registered criteria."""
    m1 = path["M1"]
    signal = "signal" if m1["signal"] else "no signal"
    rows = [
        f"| M1(a) sign agreement of −dF/dr with gold (0.5: chance), λ = 0.3 | {plain(m1['sign_agreement'])} | "
        f"{signal} (lower end above 0.5) |",
        f"| … the same at λ = 0 (the M2 run; not registered) | {plain(path['M1_at_lam_0'])} | |",
        f"| M1(b) ‖∇φ DPO term‖ / ‖∇φ λ·L_BT‖ | {plain(m1['ratio'])} | below λ·L_BT iff the upper end < 1 |",
        f"| M1(b) their cosine | {plain(m1['cosine'])} | |",
        f"| M1(c) the DPO term's share of Adam's step | {plain(m1['share_dpo'])} | "
        "below λ·L_BT iff the upper end < 0.5 |",
        f"| M2 the path alone (λ = 0): bilevel − vanilla_rm | {judged_cell(path['M2'])} | |",
        f"| … its ceiling: in_domain_rm − vanilla_rm, 40 steps | {judged_cell(path['M2_ceiling'])} | |",
        f"| M3 true − swapped labels (λ = 0): bilevel − bilevel_swapped | {judged_cell(path['M3'])} | "
        f"its mean over M2's: {num(path['M3']['over_M2'], 1) if path['M3']['over_M2'] is not None else 'n/a'} "
        "(signal ≈ 2, noise ≈ 0) |",
    ]
    for e in path["M4"]:
        rows.append(
            f"| M4 the path given gold (λ = 0), {e['setting']}: bilevel_gold − vanilla_rm | {judged_cell(e)} | |"
        )
        over = e["over_ceiling"]
        rows.append(
            f"| … not registered: bilevel_gold − in_domain_rm, paired | {num(over['mean'])} {ci(over['ci95'])} | |"
        )
    rows.append(f"| **reading (METHOD.md §5.4)** | **{path['reading']}** | |")
    at_lam = judged_cell(path["path_at_lam_0.3"])
    rows.append(f"| not registered: bilevel − bilevel_bt_only at λ = 0.3 (the M1 run) | {at_lam} | |")
    for name, interval in path["rm_accuracy"].items():
        what = f"not registered: the RM's accuracy on the evaluation pairs (gold order), {name}"
        rows.append(f"| {what} | {plain(interval)} | |")
    return markdown("| measurement (dev domains, 10 seeds) | value [95 % CI] | registered criterion |", rows)


def dpo_corner_table(path: dict) -> str:
    """M5: DPO's grid past its corner (dev, 3 seeds), each row's dpo − sft."""
    rows = [f"| {e['row']} | {num(e['mean'])} {ci(e['ci95'])} |" for e in path["M5"]]
    return markdown("| DPO (β_DPO 0.1), dev, 3 seeds | dpo − sft [95 % CI] |", rows)


def analysis_markdown(analysis: dict) -> str:
    """study.analysis's tables, as `python -m study.analysis` prints them."""
    return "\n".join((confirmatory_table(analysis), post_hoc_table(analysis), pooled_table(analysis)))


def report_tables(folder: Path, analysis: dict) -> dict:
    """Every generated table the report shows, by name: the main run's (world 0, seeds 0-9), the confirmatory run's
    premises and the drop split, the worlds, and study.analysis's confirmatory table."""
    main, confirm = load(folder, "main"), load(folder, "confirmatory")
    own, steps100 = load(folder, "bilevel_own_data"), load(folder, "metarm_steps100")
    controls = {}  # the positive controls' held-out runs, where they are committed
    if own:
        controls["own data paired"] = paired_table(own, OWN_DATA_ROWS)
    if steps100:
        controls["steps100 paired"] = paired_table(steps100, STEPS100_ROWS)
        controls["steps100 premises"] = premises_table(steps100)
    if analysis.get("path"):
        controls["path"] = path_table(analysis["path"])
        controls["dpo corner"] = dpo_corner_table(analysis["path"])
    return {
        **controls,
        "main methods": methods_table(main),
        "main paired": paired_table(main),
        "main trends": trends_table(main),
        "main hypergradient accuracy": accuracy_table(main),
        "main premises": premises_table(main),
        "main headroom": headroom_table(main, list(analysis["confirmatory"])),
        "main dpo": dpo_table(main),
        "confirmatory methods": methods_table(confirm),
        "confirmatory paired": paired_table(confirm),
        "confirmatory trends": trends_table(confirm),
        "confirmatory premises": premises_table(confirm),
        "confirmatory drop split": drop_split_table(confirm),
        "confirmatory verdicts": confirmatory_table(analysis),
        "post hoc": post_hoc_table(analysis),
        "pooled": pooled_table(analysis),
        "worlds": worlds_table(folder, analysis),
        "world premises": world_premises_table(folder, list(analysis["confirmatory"])),
    }


def fill(text: str, generated: dict) -> str:
    """text with every block `<!-- table: NAME -->` (a line of its own) ... `<!-- /table -->` holding generated[NAME]
    (a block whose name is not generated is left as it is): what README.md and REPORT.md show, tested to be unchanged
    by it."""
    block = re.compile(r"^<!-- table: ([^\n]+?) -->\n(.*?)^<!-- /table -->", re.S | re.M)
    return block.sub(lambda m: f"<!-- table: {m[1]} -->\n{generated.get(m[1], m[2])}<!-- /table -->", text)
