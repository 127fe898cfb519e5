"""The results table and figures of METHOD.md §5, drawn from a results.json: `python -m study.plots runs/latest`.

train.py calls results_markdown and make_all at the end of a run; this file only formats and draws (the run
computes every interval, study/summary.py), so a figure can be restyled without re-running. Given several runs of
different worlds (`python -m study.plots runs/world_0 runs/world_1 ...`), it prints their pooled table instead
(METHOD.md §5.1, worlds; summary.pool_worlds).
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from study import summary
from study.methods import METHODS

# every method's colour is the table's (study/methods.py); the hypergradient solvers' are these
COLORS = {
    **{m: row.color for m, row in METHODS.items()},
    "cg": "tab:green",
    "neumann": "tab:red",
    "unrolled": "tab:brown",
}


def fmt(iv, digits: int = 3) -> str:
    """'mean [lo, hi]' of an interval dict, 'n/a' for None."""
    if iv is None:
        return "n/a"
    text = f"{iv['mean']:.{digits}f}"
    return text if iv.get("ci95") is None else text + f" [{iv['ci95'][0]:.{digits}f}, {iv['ci95'][1]:.{digits}f}]"


def fmt_ci(ci) -> str:
    """'[lo, hi]' of a paired 95 % interval, signed, 'n/a' for None."""
    return "n/a" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def results_markdown(results: dict) -> str:
    """results.md: the main table, the paired comparisons with verdicts, the ceilings and the premises."""
    cfg = results["config"]
    lines = [
        f"# metarm results ({cfg['domains']} domains: {', '.join(results['domains'])}; {cfg['seeds']} seed(s); "
        f"beta = {cfg['beta']})"
        + (
            " — the bilevel positive control, --outer-data own (METHOD.md §5.2)"
            if cfg.get("outer_data") == "own"
            else ""
        ),
        "",
        "Mean over seeds of each seed's mean over domains, with its 95 % t-interval over seeds.",
        "",
        "| method | gold reward | win rate vs π_ref | RM accuracy (held-out pairs) | KL(π‖π_ref) |",
        "|---|---|---|---|---|",
    ]
    for m, r in results["methods"].items():
        lines.append(
            f"| {m} | " + " | ".join(fmt(r[k]) for k in ("gold_reward", "win_rate", "rm_accuracy", "kl")) + " |"
        )
    delta = results["delta"]["gold_reward"]
    lines += [
        "",
        f"Paired differences in gold reward (the seed is the unit); verdicts by the pre-registered rule, "
        f"delta = {delta} (METHOD.md §5.1):",
        "",
        f"| comparison | mean | 95 % CI | seeds > 0 | verdict | benefit >= {delta} excluded | MDE (80 % power) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in results["paired"].items():
        ci = fmt_ci(p["ci95"])
        excluded = {True: "yes", False: "no"}.get(p.get("benefit_excluded"), "n/a")
        mde = "n/a" if p.get("mde80") is None else f"{p['mde80']:.3f}"
        row = (
            f"| {name} | {p['mean']:+.3f} | {ci} | {p['wins']}/{p['n_seeds']} | {p['verdict']} | {excluded} | {mde} |"
        )
        lines.append(row)
    for name, p in results.get("paired_rm_accuracy", {}).items():
        lines += [
            "",
            f"MetaRM's mechanism, RM accuracy against the gold order (delta = {p['delta']}): {name}: "
            f"{p['mean']:+.3f} {fmt_ci(p['ci95'])}, {p['wins']}/{p['n_seeds']} seeds > 0, {p['verdict']}.",
        ]
    if results.get("dpo_training"):
        end = results["dpo_training"]["end_all_training_pairs"]
        mass = results.get("unseen_mass_dpo_minus_sft")
        lines += [
            "",
            f"DPO at the end of training, on every training pair: Delta chosen {fmt(end['delta_chosen'])}, Delta "
            f"rejected {fmt(end['delta_rejected'])} (log pi_theta - log pi_ref); log pi_theta chosen "
            f"{fmt(end['logp_chosen'])}, rejected {fmt(end['logp_rejected'])}"
            + (
                "."
                if mass is None
                else f"; probability on tokens no training response contains, dpo - sft: {fmt(mass)}."
            ),
        ]
    widening = results.get("mechanism_widening")
    if widening:
        lines += [
            "",
            "MetaRM's mechanism (METHOD.md §5.3): metarm - metarm_eta0 in the within-prompt |r_i - r_j| on its shifted"
            f" samples X_s, each RM on its own scale: {fmt(widening)}; the ascent "
            f"{'widened them' if widening['acted'] else 'did not widen them (interval not above 0)'}.",
        ]
    rule = results.get("headroom_rule")
    if rule:
        ratio = "n/a" if rule["ratio"] is None else f"{rule['ratio']:.2f}"
        lines += [
            "",
            f"Headroom rule: in_domain_rm - vanilla_rm = {rule['headroom']:+.3f} is {ratio} x the widest "
            f"half-width of the {len(rule['compared'])} comparisons ({rule['widest_half_width']:.3f}); 3 x is "
            f"required: {'met' if rule['met'] else 'NOT met'}.",
        ]
    if results.get("premises"):
        lines += ["", "Premises, measured with the vanilla RM:", "", "| measurement | value |", "|---|---|"]
        for k, v in results["premises"].items():
            if k == "collapse_ratio":  # MetaRM's premise (METHOD.md §5.2)
                verdict = "holds" if v["holds"] else "does not hold"
                if v["ci95"] is None:
                    verdict = "is undetermined (no interval)"
                lines.append(f"| {k} | {fmt(v)}: the premise {verdict} (threshold {v['threshold']}) |")
            elif k == "accuracy_drop_split":  # METHOD.md §5.3: the drop split in both orders
                lines += [f"| accuracy drop, {part} | {fmt(iv)} |" for part, iv in v.items()]
            else:
                lines.append(f"| {k} | {fmt(v)} |")
    return "\n".join(lines) + "\n"


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def errorbar(ax, x, ivs, **kw):
    """Means with their 95 % intervals as error bars (no bar where there is no interval)."""
    means = [iv["mean"] for iv in ivs]
    err = [
        [m - (iv["ci95"] or [m, m])[0] for m, iv in zip(means, ivs)],
        [(iv["ci95"] or [m, m])[1] - m for m, iv in zip(means, ivs)],
    ]
    ax.errorbar(x, means, yerr=err, capsize=3, **kw)


def paired_rows(ax, rows: list, delta: float | None, xlabel: str):
    """Horizontal paired differences (name, interval dict, verdict or None), top to bottom, each mean with its 95 %
    interval; the band -delta .. +delta shaded when delta is given; each row's verdict written at the right edge."""
    for i, (name, p, verdict) in enumerate(rows):
        lo, hi = p["ci95"] or [p["mean"], p["mean"]]
        ax.plot([lo, hi], [i, i], color="black", lw=1.5)
        ax.plot([p["mean"]], [i], "o", color="black", ms=4)
        if verdict:
            ax.annotate(verdict, (1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=8)
    if delta is not None:
        ax.axvspan(-delta, delta, color="tab:green", alpha=0.12, lw=0, label=f"±δ = {delta}")
        ax.legend(fontsize=7, loc="lower left")
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(range(len(rows)), [name for name, _, _ in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(xlabel, fontsize=8)


def gold_and_paired(results, path, primary: list):
    """Figure 1: gold reward per method with its interval; the primary comparisons on their own scale with the
    registered +-delta band and each verdict beside its row; the baselines', controls' and ceilings' differences in
    a panel of their own (all paired over seeds, 95 % intervals)."""
    fig = plt.figure(figsize=(11, 7.5))
    grid = fig.add_gridspec(2, 2, height_ratios=(1, 1), width_ratios=(1, 1.25))
    a, b, c = fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 1])
    methods = list(results["methods"])
    for i, m in enumerate(methods):
        iv = results["methods"][m]["gold_reward"]
        lo, hi = iv["ci95"] or [iv["mean"], iv["mean"]]
        a.errorbar([iv["mean"]], [i], xerr=[[iv["mean"] - lo], [hi - iv["mean"]]], fmt="o", capsize=3, color=COLORS[m])
    a.set_yticks(range(len(methods)), [METHODS[m].label for m in methods], fontsize=8)
    a.set_ylim(len(methods) - 0.5, -0.5)
    a.set_xlabel("gold reward (mean over domains), 95 % CI", fontsize=8)
    a.set_title(f"{len(results['domains'])} domains, {results['config']['seeds']} seeds", fontsize=9)
    delta = results["delta"]["gold_reward"]
    names = [n for n in primary if n in results["paired"]]
    rows = [(n, results["paired"][n], results["paired"][n]["verdict"]) for n in names]
    paired_rows(b, rows, delta, "paired difference in gold reward")
    b.set_title("the primary comparisons (pre-registered)", fontsize=9)
    others = [n for n in results["paired"] if n not in names]
    rows = [
        (n, results["paired"][n], results["paired"][n]["verdict"].replace("n/a (a ceiling)", "ceiling"))
        for n in others
    ]
    paired_rows(c, rows, None, "paired difference in gold reward")
    c.set_title("baselines, controls and ceilings", fontsize=9)
    save(fig, path)


def frontier(fig_data, path):
    """Figure 2: gold reward vs KL as beta varies, mean and 95 % CI over seeds for both axes."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row, (m, by_beta) in enumerate(fig_data["points"].items()):
        betas = sorted(by_beta, key=float)
        kl = [by_beta[b]["kl"]["mean"] for b in betas]
        ax.plot(kl, [by_beta[b]["gold_reward"]["mean"] for b in betas], "-", color=COLORS[m], alpha=0.5)
        for b in betas:
            gi, ki = by_beta[b]["gold_reward"], by_beta[b]["kl"]
            ax.errorbar(
                [ki["mean"]],
                [gi["mean"]],
                xerr=[[ki["mean"] - ki["ci95"][0]], [ki["ci95"][1] - ki["mean"]]] if ki["ci95"] else None,
                yerr=[[gi["mean"] - gi["ci95"][0]], [gi["ci95"][1] - gi["mean"]]] if gi["ci95"] else None,
                fmt="o",
                color=COLORS[m],
                capsize=2,
                label=METHODS[m].label if b == betas[0] else None,
            )
            offset = (6, -10 - 8 * row)  # each method's labels a line lower: two methods' points can coincide
            ax.annotate(f"β={b}", (ki["mean"], gi["mean"]), xytext=offset, textcoords="offset points", fontsize=7)
    ax.set_xlabel("KL(π‖π_ref)")
    ax.set_ylabel("gold reward")
    ax.set_title(
        f"{', '.join(fig_data['domains'])}; {len(fig_data['seeds'])} seeds, 95 % CI\n"
        "β = 0.5: the main table's adaptations; the other β: a separate experiment",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    save(fig, path)


def hypergradient_error(fig_data, path, seed: int = 0):
    """Figure 3: relative error of the hypergradient vs HVPs for CG, Neumann and unrolled (the run's first seed)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, rows in fig_data["curves"].items():
        ax.loglog(
            [r["hvps"] for r in rows], [max(r["error"], 1e-16) for r in rows], "o-", color=COLORS[name], label=name
        )
    t = fig_data["training_setting"]
    ax.loglog(
        [t["hvps"]], [t["error"]], "*", ms=12, color="black", label=f"cold: T={t['T']} steps from theta_ref, then CG"
    )
    ax.set_xlabel("Hessian-vector products")
    ax.set_ylabel("relative error of dF/dr")
    ax.set_title(
        f"a separate experiment on {fig_data['domain']}'s inner problem, seed {seed}'s bilevel RM;\n"
        f"its reference agrees with finite differences to {fig_data['fd_check_rel_error']:.1e}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    save(fig, path)


def outer_convergence(fig_data, path):
    """Figure 4: ||grad F(phi_k)||^2 / ||grad F(phi_0)||^2 and its running minimum, per beta, 95 % CI over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key in zip(axes, ("ratio", "running_min")):
        for i, (beta, ivs) in enumerate(fig_data[key].items()):
            errorbar(ax, [s + 0.4 * i for s in fig_data["steps"]], ivs, fmt="o-", label=f"β = {beta}")
        ax.set_yscale("log")
        ax.set_xlabel("outer step k")
        ax.set_title("raw, full batch" if key == "ratio" else "running minimum", fontsize=9)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("‖∇F(φ_k)‖² / ‖∇F(φ_0)‖²")
    fig.suptitle(
        "a separate experiment: fixed candidates and pairs, ρ and the inner step held fixed; "
        f"{len(fig_data['seeds'])} seeds, 95 % CI",
        fontsize=9,
    )
    save(fig, path)


def rlhf_rounds(fig_data, path, premise=None):
    """Figure 5: iterative RLHF, MetaRM - eta = 0 per round as a paired difference with its interval and the
    registered +-delta band, in the policy's gold reward and in the RM's accuracy on the round's samples, each later
    round's verdict beside it; and MetaRM's premise, the collapse ratio against its registered threshold."""
    panels = 3 if premise else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
    rounds = list(range(1, fig_data["rounds"] + 1))
    deltas = {"gold": 0.10, "rm_accuracy": 0.05}
    titles = {"gold": "gold reward of the round's policy", "rm_accuracy": "RM pair accuracy on the round's samples"}
    for ax, key in zip(axes, ("gold", "rm_accuracy")):
        verdicts = {v["round"]: v for v in fig_data["verdicts"][key]}
        delta = next(iter(verdicts.values()))["delta"] if verdicts else deltas[key]
        ax.axhspan(-delta, delta, color="tab:green", alpha=0.12, lw=0, label=f"±δ = {delta}")
        ax.axhline(0, color="gray", lw=0.8)
        for r, iv in zip(rounds, fig_data["metarm - metarm_eta0"][key]):
            if iv is None:
                continue
            errorbar(ax, [r], [iv], fmt="o", color="tab:orange")
            if r in verdicts:
                ax.annotate(
                    verdicts[r]["verdict"].split(" (")[0],
                    (r, 1.02),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    fontsize=7,
                )
        ax.set_xticks(rounds)
        ax.set_xlim(0.5, rounds[-1] + 0.5)
        ax.set_xlabel("RLHF round (round 1: the same run for both)", fontsize=8)
        ax.set_ylabel("MetaRM − η = 0, paired over seeds", fontsize=8)
        ax.set_title(titles[key], fontsize=9, pad=14)
        ax.legend(fontsize=7, loc="lower left")
    if premise:
        ax = axes[2]
        errorbar(ax, [0], [premise], fmt="o", color="tab:blue")
        ax.axhline(premise["threshold"], color="tab:red", ls="--", lw=1, label=f"threshold {premise['threshold']}")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_xticks([0], ["the vanilla RM, this run's evaluation domains"], fontsize=8)
        ax.set_ylim(0, max(1.1, (premise["ci95"] or [0, premise["mean"]])[1] * 1.1))
        ax.set_ylabel("collapse ratio (adapted / π_ref)", fontsize=8)
        ax.set_title("MetaRM's premise: " + ("holds" if premise["holds"] else "does not hold"), fontsize=9, pad=14)
        ax.legend(fontsize=7)
    fig.suptitle(f"{len(fig_data['seeds'])} seeds; a separate experiment on the training domains' prompts", fontsize=9)
    save(fig, path)


def training_curves(fig_data, path, seed: int = 0):
    """Figure 6: SFT loss, the vanilla RM's loss and the bilevel objective F (the run's first seed)."""
    panels = [(k, v) for k, v in fig_data.items() if v]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3))
    for ax, (name, values) in zip(axes if len(panels) > 1 else [axes], panels):
        w = 5  # moving average: single-batch values are noisy
        smooth = [
            sum(values[max(0, i - w + 1) : i + 1]) / len(values[max(0, i - w + 1) : i + 1]) for i in range(len(values))
        ]
        ax.plot(values, color="tab:blue", alpha=0.3, label="logged")
        ax.plot(smooth, color="tab:blue", label=f"mean of last {w}")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"drawn from seed {seed}'s training logs (logs.jsonl holds every seed's)", fontsize=9)
    save(fig, path)


def worlds_markdown(pooled: dict) -> str:
    """The per-world and pooled table of summary.pool_worlds: each world's interval and verdict (conditional
    on that world), the pooled interval over worlds and its verdict, the between-world spread."""
    lines = [
        "| comparison | per world: mean [95 % CI] verdict | pooled over worlds | verdict | between-world sd |",
        "|---|---|---|---|---|",
    ]
    for name, p in pooled.items():
        worlds = "; ".join(
            f"world {w}: {q['mean']:+.3f} {fmt_ci(q['ci95'])} {q['verdict']}" for w, q in p["per_world"].items()
        )
        sd = "n/a" if p["between_world_sd"] is None else f"{p['between_world_sd']:.3f}"
        verdict = p["pooled"]["verdict"] + (" (worlds differ)" if p["verdicts_differ"] else "")
        lines.append(
            f"| {name} | {worlds} | {p['pooled']['mean']:+.3f} {fmt_ci(p['pooled']['ci95'])} | {verdict} | {sd} |"
        )
    return "\n".join(lines) + "\n"


def make_all(results, out_dir, prereg: dict):
    """Every figure whose data is in results, as PNGs in out_dir; prereg (summary.read_preregistration) names the
    primary comparisons."""
    out_dir = Path(out_dir)
    primary = [f"{a} - {b}" for a, b in prereg["primary"]]
    gold_and_paired(results, out_dir / "gold_reward.png", primary)
    figs = results.get("figures", {})
    for key, draw in [
        ("frontier", frontier),
        ("hypergradient_error", hypergradient_error),
        ("outer_convergence", outer_convergence),
        ("training_curves", training_curves),
    ]:
        if key in figs and key in ("hypergradient_error", "training_curves"):  # drawn from the run's first seed
            draw(figs[key], out_dir / f"{key}.png", results["config"].get("first_seed", 0))
        elif key in figs:
            draw(figs[key], out_dir / f"{key}.png")
    if "rlhf_rounds" in figs:
        rlhf_rounds(
            figs["rlhf_rounds"], out_dir / "rlhf_rounds.png", results.get("premises", {}).get("collapse_ratio")
        )


def main(argv=None) -> int:
    """One run folder: its figures (PNGs beside its results.json). Several runs of different worlds: their
    pooled table on stdout."""
    folders = [Path(f) for f in (sys.argv[1:] if argv is None else argv)] or [Path("runs/latest")]
    for folder in folders:
        if not (folder / "results.json").is_file():
            print(f"study.plots: error: no results.json in {folder}", file=sys.stderr)
            return 2
    runs = [json.loads((folder / "results.json").read_text()) for folder in folders]
    prereg = summary.read_preregistration()
    if len(runs) == 1:
        make_all(runs[0], folders[0], prereg)
        return 0
    seeds = [run["config"].get("world_seed", 0) for run in runs]
    if len(set(seeds)) < len(seeds):
        print(f"study.plots: error: the runs must be of different worlds (world seeds {seeds})", file=sys.stderr)
        return 2
    pooled = summary.pool_worlds(dict(zip(seeds, runs)), prereg)
    print(worlds_markdown(pooled), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
