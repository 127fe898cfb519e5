"""The experiment's numbers, summarised (METHOD.md §5): per-seed metrics -> results.json's intervals, paired
comparisons and verdicts, ceilings, the headroom rule and the premises; Jia's frontier at matched KL; the pooled
table over worlds. Pure Python over numbers (no torch); the pre-registration is read by read_preregistration and
passed in by whoever needs it.
"""

import json
import math
import statistics
from pathlib import Path

from study import stats
from study.methods import METHODS

PREREGISTRATION = Path(__file__).with_name("preregistration.json")  # METHOD.md §5.1, §5.2
# results.json's metrics per method, in this order
METRICS = ("gold_reward", "win_rate", "rm_accuracy", "kl", "unseen_mass", "shifted_accuracy", "shifted_widening")
CEILINGS = tuple(m for m, row in METHODS.items() if row.role == "ceiling")
# MetaRM's premise holds when the collapse ratio's 95 % interval lies below this (METHOD.md §5.2, registered)
COLLAPSE_THRESHOLD = 0.5


def read_preregistration(path=PREREGISTRATION) -> dict:
    """The registered delta, comparisons and verdict rule (METHOD.md §5.1) and the positive controls (§5.2)."""
    return json.loads(Path(path).read_text())


def rule(prereg: dict) -> dict:
    """The verdict rule's parameters stats.decide takes besides delta: alpha, power and the minimum of seeds."""
    return {"alpha": prereg["alpha"], "power": prereg["power"], "min_seeds": prereg["min_seeds"]}


def pairs(names) -> tuple:
    """[["a", "b"], ...] as the pre-registration lists comparisons -> (("a", "b"), ...)."""
    return tuple(tuple(pair) for pair in names)


def summarise(config: dict, per_seed: list, prereg: dict) -> dict:
    """The results dict: per-method means with intervals, paired comparisons, ceilings, premises.

    config: the run's settings as results.json keeps them; per_seed: one {"metrics": metrics[method][domain][metric],
    "premises": premises[domain]} per seed; prereg: read_preregistration's."""
    methods = list(per_seed[0]["metrics"])
    domains = list(per_seed[0]["metrics"][methods[0]])

    def seed_value(run: dict, m: str, k: str) -> float:
        """One seed's value of metric k for method m: the mean over the evaluation domains."""
        return stats.mean([run["metrics"][m][d][k] for d in domains])

    out = {
        "config": config,
        "domains": domains,
        "delta": prereg["delta"],
        "methods": {},
    }
    for m in methods:
        out["methods"][m] = {}
        for k in METRICS:
            if per_seed[0]["metrics"][m][domains[0]].get(k) is None:
                out["methods"][m][k] = None
                continue
            per_domain = {d: stats.mean([run["metrics"][m][d][k] for run in per_seed]) for d in domains}
            out["methods"][m][k] = {
                **stats.interval([seed_value(run, m, k) for run in per_seed]),
                "per_domain": per_domain,
            }
    out["paired"] = {}
    judged_pairs = judged_comparisons(config["outer_data"], methods, prereg)
    for a, b in judged_pairs + (("in_domain_rm", "vanilla_rm"), ("oracle", "vanilla_rm")):
        if a not in methods or b not in methods:
            continue
        diffs = [seed_value(run, a, "gold_reward") - seed_value(run, b, "gold_reward") for run in per_seed]
        per_domain = {}
        for d in domains:
            per_domain[d] = stats.mean(
                [run["metrics"][a][d]["gold_reward"] - run["metrics"][b][d]["gold_reward"] for run in per_seed]
            )
        if (a, b) in judged_pairs:
            judged = stats.decide(diffs, prereg["delta"]["gold_reward"], **rule(prereg))
        else:
            judged = {**stats.interval(diffs), "verdict": "n/a (a ceiling)"}
        out["paired"][f"{a} - {b}"] = {
            **judged,
            "wins": sum(x > 0 for x in diffs),
            "per_seed": diffs,
            "per_domain": per_domain,
        }
    compared = [f"{a} - {b}" for a, b in pairs(prereg["primary"]) if f"{a} - {b}" in out["paired"]]
    head = out["paired"].get("in_domain_rm - vanilla_rm")
    if head and head["ci95"] and compared:
        # the headroom rule (README): headroom >= 3 x the widest half-width
        widest = max((out["paired"][c]["ci95"][1] - out["paired"][c]["ci95"][0]) / 2 for c in compared)
        out["headroom_rule"] = {
            "headroom": head["mean"],
            "widest_half_width": widest,
            "compared": compared,
            "ratio": head["mean"] / widest if widest > 0 else None,
            "met": head["mean"] >= 3 * widest,
        }
    if "metarm" in methods and "metarm_eta0" in methods:
        # MetaRM's mechanism, paired against eta = 0 on the same shifted samples (METHOD.md §5.2)
        diffs = [
            difference(
                seed_value(run, "metarm", "shifted_accuracy"), seed_value(run, "metarm_eta0", "shifted_accuracy")
            )
            for run in per_seed
        ]
        out["paired_rm_accuracy"] = {
            "metarm - metarm_eta0 (accuracy on MetaRM's shifted samples X_s)": {
                **stats.decide(diffs, prereg["delta"]["rm_accuracy"], **rule(prereg)),
                "wins": sum(x is not None and x > 0 for x in diffs),
                "per_seed": diffs,
            }
        }
        if per_seed[0]["metrics"]["metarm"][domains[0]].get("shifted_widening") is not None:
            # did the ascent widen the within-prompt differences it targets, on each RM's own scale (METHOD.md §5.3)?
            diffs = [
                seed_value(run, "metarm", "shifted_widening") - seed_value(run, "metarm_eta0", "shifted_widening")
                for run in per_seed
            ]
            iv = stats.interval(diffs)
            out["mechanism_widening"] = {**iv, "acted": bool(iv["ci95"] and iv["ci95"][0] > 0), "per_seed": diffs}
    if "dpo" in methods and "sft" in methods:
        # likelihood displacement (METHOD.md §5.2): more probability on tokens no training response contains
        diffs = [seed_value(run, "dpo", "unseen_mass") - seed_value(run, "sft", "unseen_mass") for run in per_seed]
        out["unseen_mass_dpo_minus_sft"] = {**stats.interval(diffs), "per_seed": diffs}
    out["ceilings"] = {}
    for m in CEILINGS:
        if m in methods:
            out["ceilings"][m] = stats.interval([seed_value(run, m, "gold_reward") for run in per_seed])
    if "vanilla_rm" in methods:
        out["premises"] = {}
        for k in per_seed[0]["premises"][domains[0]]:
            values = [stats.mean([run["premises"][d][k] for d in domains]) for run in per_seed]
            out["premises"][k] = stats.interval(values)
        if "absdiff_median_adapted" in per_seed[0]["premises"][domains[0]]:
            out["premises"]["collapse_ratio"] = collapse(per_seed, domains)
        if "gold_absdiff_median_adapted" in per_seed[0]["premises"][domains[0]]:
            out["premises"].update(gold_collapse(per_seed, domains))
            out["premises"]["accuracy_drop_split"] = drop_split(per_seed, domains)
    return out


def dpo_training(per_seed: list) -> dict:
    """DPO's training log over seeds (train_dpo): per step, the mean over seeds of the loss and of the chosen
    and rejected responses' log pi_theta and Delta; at the end, on every training pair, each with its interval."""
    keys = [k for k in per_seed[0][-1] if k != "step"]
    steps = []
    for entries in zip(*[log[:-1] for log in per_seed]):
        steps.append(
            {"step": entries[0]["step"], **{k: stats.mean([e[k] for e in entries]) for k in entries[0] if k != "step"}}
        )
    end = {k: stats.interval([log[-1][k] for log in per_seed]) for k in keys}
    return {"per_step": steps, "end_all_training_pairs": end}


def difference(a, b):
    """a - b, None when either is None (a seed whose pairs all tie in gold: left out of the interval)."""
    return None if a is None or b is None else a - b


def judged_comparisons(outer_data: str, methods: list, prereg: dict) -> tuple:
    """The comparisons a run judges by the verdict rule: the primary ones, those of the bilevel positive control
    with --outer-data own (and of §5.4's diagnostics that ran), DPO's when dpo and sft run (METHOD.md §5.1, §5.2,
    §5.4); each once, in that order."""
    judged = list(pairs(prereg["primary"]))
    if outer_data == "own":
        judged += pairs(prereg["positive_controls"]["bilevel_own_data"]["comparisons"])
        judged += [pair for pair in pairs(prereg["path"]["comparisons"]) if set(pair) <= set(methods)]
    if "dpo" in methods and "sft" in methods:
        judged += pairs(prereg["positive_controls"]["dpo"]["comparisons"])
    return tuple(dict.fromkeys(judged))


def collapse(per_seed: list, domains: list) -> dict:
    """MetaRM's premise (METHOD.md §5.2): per seed, the median within-prompt |r_i - r_j| of the vanilla RM on
    the adapted policy's samples over that on pi_ref's (each averaged over domains first); "holds" when the
    95 % interval's upper end is below the registered threshold."""
    values = []
    for run in per_seed:
        adapted = stats.mean([run["premises"][d]["absdiff_median_adapted"] for d in domains])
        reference = stats.mean([run["premises"][d]["absdiff_median_pi_ref"] for d in domains])
        values.append(adapted / reference)
    out = stats.interval(values)
    out["threshold"] = COLLAPSE_THRESHOLD
    out["holds"] = out["ci95"] is not None and out["ci95"][1] < COLLAPSE_THRESHOLD
    return out


def path_signal(per_seed: list) -> dict:
    """METHOD.md §5.4 M1 over seeds: per seed (its {domain: [study.path_checks.signal per kept step]}), the sign
    agreement pooled over domains, steps and pairs, and the means of the norm ratio, the cosine and the DPO term's
    Adam share; each with its 95 % interval over seeds, and "signal" iff the agreement's lower end is above 0.5."""
    rows = {"sign_agreement": [], "ratio": [], "cosine": [], "share_dpo": []}
    for signals in per_seed:
        steps = [step for by_step in signals.values() for step in by_step]
        pairs = sum(step["pairs"] for step in steps)
        rows["sign_agreement"].append(sum(step["score"] for step in steps) / pairs if pairs else None)
        for key in ("ratio", "cosine", "share_dpo"):
            rows[key].append(stats.mean([step[key] for step in steps]))
    out = {key: stats.interval(values) for key, values in rows.items()}
    agreement = out["sign_agreement"]
    out["signal"] = bool(agreement and agreement["ci95"] and agreement["ci95"][0] > 0.5)
    return out


def domain_means(run: dict, domains: list, key: str):
    """One seed's premise `key`, the mean over the evaluation domains."""
    return stats.mean([run["premises"][d][key] for d in domains])


def gold_collapse(per_seed: list, domains: list) -> dict:
    """Gold's own collapse beside the RM's (METHOD.md §5.3): per seed, the median within-prompt |g_i - g_j| on the
    adapted policy's samples over that on pi_ref's, and the RM's collapse ratio over gold's (1: the RM's
    differences shrink only as much as the gold differences between the samples do)."""
    gold, relative = [], []
    for run in per_seed:
        reference = domain_means(run, domains, "gold_absdiff_median_pi_ref")
        if not reference:  # over half of pi_ref's within-prompt pairs tie in gold: no ratio for this seed
            gold.append(None)
            relative.append(None)
            continue
        ratio = domain_means(run, domains, "gold_absdiff_median_adapted") / reference
        rm = domain_means(run, domains, "absdiff_median_adapted") / domain_means(run, domains, "absdiff_median_pi_ref")
        gold.append(ratio)
        relative.append(rm / ratio if ratio > 0 else None)
    return {"gold_collapse_ratio": stats.interval(gold), "collapse_ratio_rm_over_gold": stats.interval(relative)}


def drop_split(per_seed: list, domains: list) -> dict:
    """The vanilla RM's accuracy drop from pi_ref's samples to the adapted policy's, over the within-prompt pairs
    binned by gold margin (METHOD.md §5.3), split in both orders: with w_b the share of (non-tied) pairs in bin b
    and a_b the accuracy there (0: pi_ref's samples, 1: the adapted policy's), total = sum w1 a1 - sum w0 a0;
    mix first: mix = sum w1 a0 - sum w0 a0, ranking = sum w1 a1 - sum w1 a0; ranking first: ranking = sum w0 a1 -
    sum w0 a0, mix = sum w1 a1 - sum w0 a1. A bin without an accuracy on either side is left out and the shares
    renormalised over the rest: bin 0, [0, 0.5), holds only gold ties, because gold rewards lie on a 0.5 grid. Per
    seed (each premise the mean over domains), intervals over seeds."""
    keys = sorted(
        {k[len("share_bin") :].split("_")[0] for k in per_seed[0]["premises"][domains[0]] if "share_bin" in k}
    )
    rows = {
        k: [] for k in ("total", "mix_first.mix", "mix_first.ranking", "ranking_first.ranking", "ranking_first.mix")
    }
    for run in per_seed:
        w, a = {}, {}
        for side in ("pi_ref", "adapted"):
            w[side] = {b: domain_means(run, domains, f"share_bin{b}_{side}") for b in keys}
            a[side] = {b: domain_means(run, domains, f"acc_bin{b}_{side}") for b in keys}
        kept = [b for b in keys if a["pi_ref"][b] is not None and a["adapted"][b] is not None]
        for side in w:
            total = sum(w[side][b] for b in kept)
            w[side] = {b: w[side][b] / total for b in kept}

        def mixed(weights, accuracies):  # the accuracy with one side's margin mix and one side's per-bin accuracies
            return sum(w[weights][b] * a[accuracies][b] for b in kept)

        rows["total"].append(mixed("adapted", "adapted") - mixed("pi_ref", "pi_ref"))
        rows["mix_first.mix"].append(mixed("adapted", "pi_ref") - mixed("pi_ref", "pi_ref"))
        rows["mix_first.ranking"].append(mixed("adapted", "adapted") - mixed("adapted", "pi_ref"))
        rows["ranking_first.ranking"].append(mixed("pi_ref", "adapted") - mixed("pi_ref", "pi_ref"))
        rows["ranking_first.mix"].append(mixed("adapted", "adapted") - mixed("pi_ref", "adapted"))
    return {k: stats.interval(v) for k, v in rows.items()}


def gold_at_kl(points: list, kl: float) -> tuple:
    """Gold reward at `kl` on the piecewise-linear curve through points [(kl_i, gold_i)] in log KL (METHOD.md
    §5.1); outside the points' range the nearest segment is extended. Returns (gold, extended), or (None,
    False) where log KL is undefined or the curve is not a function of it: a KL estimate <= 0 (k1 can be
    negative after a few steps) or two points at the same KL."""
    if kl <= 0 or any(k <= 0 for k, _ in points) or len({k for k, _ in points}) < len(points):
        return None, False
    points = sorted((math.log(k), g) for k, g in points)
    x = math.log(kl)
    i = 0
    while i < len(points) - 2 and x > points[i + 1][0]:
        i += 1
    (x0, g0), (x1, g1) = points[i], points[i + 1]
    extended = x < points[0][0] or x > points[-1][0]
    return g0 + (g1 - g0) * (x - x0) / (x1 - x0), extended


def matched_kl(values: dict, beta: str, seeds: list, delta: float, verdict_rule: dict) -> dict:
    """Jia's frontier trend, pre-registered (METHOD.md §5.1): per seed, bilevel's gold reward read at the
    vanilla RM's KL at `beta` on bilevel's gold-vs-log-KL curve, minus the vanilla RM's gold reward there; judged
    with delta and verdict_rule (rule's)."""
    diffs, extended = [], 0
    for i, _ in enumerate(seeds):
        target_kl = values["vanilla_rm"][beta]["kl"][i]
        curve = [(by_beta["kl"][i], by_beta["gold_reward"][i]) for by_beta in values["bilevel"].values()]
        gold, outside = gold_at_kl(curve, target_kl)
        diffs.append(None if gold is None else gold - values["vanilla_rm"][beta]["gold_reward"][i])
        extended += outside
    return {
        **stats.decide(diffs, delta, **verdict_rule),
        "per_seed": diffs,
        "at_beta": beta,
        "extended_seeds": extended,
        "undefined_seeds": diffs.count(None),
    }


def pool_worlds(per_world: dict, prereg: dict) -> dict:
    """METHOD.md §5.1, worlds: per primary comparison, each world's paired mean, interval and verdict (conditional
    on that world), and the pooled estimate -- the mean of the per-world means with a t-interval over worlds (W - 1
    degrees of freedom), judged by the same rule, and the between-world spread (standard deviation of the
    per-world means). per_world: world seed -> a run's results.json (decidable worlds only)."""
    names = [f"{a} - {b}" for a, b in prereg["primary"]]
    out = {}
    for name in names:
        worlds = {w: r["paired"][name] for w, r in per_world.items() if name in r["paired"]}
        means = [p["mean"] for p in worlds.values()]
        verdicts = {w: p["verdict"] for w, p in worlds.items()}
        out[name] = {
            "per_world": {w: {k: p[k] for k in ("mean", "ci95", "n_seeds", "verdict")} for w, p in worlds.items()},
            "pooled": stats.decide(means, prereg["delta"]["gold_reward"], **{**rule(prereg), "min_seeds": 2}),
            "between_world_sd": statistics.stdev(means) if len(means) > 1 else None,
            "verdicts_differ": len(set(verdicts.values())) > 1,
        }
    return out
