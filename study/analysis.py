"""The confirmatory verdicts, Holm's adjustment, the sensitivity and the two pooled analyses of METHOD.md §5.3, from
the committed runs (`python -m study.analysis [FOLDER] [--docs]`, FOLDER = results/ by default): writes
FOLDER/analysis.json and FOLDER/claims.md (the README's claims table; the positive controls' rows where their runs
are there) and prints the tables; --docs also fills the generated tables of README.md and study/REPORT.md.
Pure Python over the runs' results.json (no torch, nothing re-run).

The runs it reads, each FOLDER/<name>/results.json (provenance.json beside it says how it was made): main (world 0,
seeds 0-9: the main table, post hoc), confirmatory (world 0, seeds 10-19), world_1 and world_2 (seeds 0-9 each);
bilevel_own_data and metarm_steps100 (the positive controls' held-out runs) for the claims table; path_* and
dpo_corner_* (METHOD.md §5.4, dev domains) for the report's path section, where committed.
"""

import json
import sys
from pathlib import Path

from study import stats, summary, tables

ROOT = Path(__file__).parents[1]
POST_HOC = "post hoc (delta fixed after these intervals were seen)"
# per world, the runs whose seeds it pools (METHOD.md §5.3): world 0 is the main table's run and the confirmatory run
WORLDS = {"0": ("main", "confirmatory"), "1": ("world_1",), "2": ("world_2",)}


def names(prereg: dict) -> list:
    return [f"{a} - {b}" for a, b in prereg["primary"]]


def confirmatory(results: dict, prereg: dict) -> dict:
    """Per primary comparison of the confirmatory run: its registered verdict (results.json's), the Bonferroni
    interval (t at 0.995), the three p-values and their Holm adjustment within the five, the adjusted verdict, the
    verdict at each sensitivity delta, and the probability that "absent" could be reached at the observed SE."""
    delta, config = prereg["delta"]["gold_reward"], prereg["confirmatory"]
    comparisons = names(prereg)
    diffs = {name: results["paired"][name]["per_seed"] for name in comparisons}
    p = {name: stats.p_values(diffs[name], delta) for name in comparisons}
    adjusted = {
        kind: stats.holm([p[name][kind] for name in comparisons]) for kind in ("p_greater", "p_less", "p_tost")
    }
    out = {}
    for i, name in enumerate(comparisons):
        judged = results["paired"][name]
        holm_p = {kind: adjusted[kind][i] for kind in adjusted}
        se = stats.standard_error(diffs[name])
        out[name] = {
            "mean": judged["mean"],
            "ci95": judged["ci95"],
            "n_seeds": judged["n_seeds"],
            "verdict": judged["verdict"],
            "ci_bonferroni": stats.interval(diffs[name], 1 - 0.05 / len(comparisons) / 2)["ci95"],
            "p": p[name],
            "p_holm": holm_p,
            "verdict_holm": stats.verdict_from_p(holm_p),
            "sensitivity": {str(d): stats.verdict(judged["ci95"], d) for d in config["sensitivity_deltas"]},
            "absent_reachable": stats.absent_reachable(se, judged["n_seeds"], delta),
        }
    return out


def post_hoc(results: dict, prereg: dict) -> dict:
    """The main table's world 0 verdicts (seeds 0-9), relabelled, with the same sensitivity and reachability."""
    delta = prereg["delta"]["gold_reward"]
    out = {}
    for name in names(prereg):
        judged = results["paired"][name]
        out[name] = {
            "mean": judged["mean"],
            "ci95": judged["ci95"],
            "verdict": judged["verdict"],
            "label": POST_HOC,
            "sensitivity": {
                str(d): stats.verdict(judged["ci95"], d) for d in prereg["confirmatory"]["sensitivity_deltas"]
            },
            "absent_reachable": stats.absent_reachable(
                stats.standard_error(judged["per_seed"]), judged["n_seeds"], delta
            ),
        }
    return out


def pooled(runs: dict, prereg: dict) -> dict:
    """Per primary comparison, both registered pools over every seed of worlds 0-2 (METHOD.md §5.3): each world's
    paired mean and SE over all its seeds, the common effect (t on sum(n_i - 1) df) and the random effects
    (DerSimonian-Laird, Hartung-Knapp), each with its verdict by the §5.1 rule; "worlds differ" iff p(Q) < 0.10."""
    delta = prereg["delta"]["gold_reward"]
    out = {}
    for name in names(prereg):
        per_world = {}
        for world, run_names in WORLDS.items():
            diffs = [x for run in run_names for x in runs[run]["paired"][name]["per_seed"] if x is not None]
            se = stats.standard_error(diffs) or 0.0  # fewer than two seeds: no pool
            per_world[world] = {"mean": stats.mean(diffs), "se": se, "n_seeds": len(diffs)}
        y = [w["mean"] for w in per_world.values()]
        ses = [w["se"] for w in per_world.values()]
        common = stats.common_effect(y, ses, [w["n_seeds"] for w in per_world.values()])
        random = stats.random_effects(y, ses)
        if common is None or random is None:  # a world with SE 0: no pool (METHOD.md §5.3, amendment)
            out[name] = {"per_world": per_world, "common_effect": None, "random_effects": None, "worlds_differ": None}
            continue
        out[name] = {
            "per_world": per_world,
            "common_effect": {**common, "verdict": stats.verdict(common["ci95"], delta)},
            "random_effects": {**random, "verdict": stats.verdict(random["ci95"], delta)},
            "primary": "random_effects (Hartung-Knapp truncated at max(1, q))",
            "worlds_differ": random["Q_p"] < 0.10,
        }
    return out


# METHOD.md §5.4's runs (dev domains, own data): M1's, M2's and M3's, M4's and its settings in the registered order,
# and M5's three DPO rows; each FOLDER/<name>/results.json where committed
PATH_RUNS = {"M1": "path_m1", "M2_M3": "path_m2_m3"}
M4_RUNS = (
    ("K = 4, 40 steps, ρ = 1.5·(−λ_min)₊", "path_m4"),
    ("K = 8", "path_m4_k8"),
    ("80 outer steps (an 80-step ceiling)", "path_m4_steps80"),
    ("ρ = 1.1·(−λ_min)₊", "path_m4_rho11"),
)
CEILING = "in_domain_rm - vanilla_rm"  # Bradley-Terry on the domain's own labels at the same budget
DPO_CORNER = (
    ("Adam 1e-3, 25 steps (the grid's choice)", "dpo_corner_chosen"),
    ("Adam 3e-4, 25 steps", "dpo_corner_lr3e-4"),
    ("Adam 1e-3, 10 steps", "dpo_corner_steps10"),
)


def judged(run: dict, comparison: str) -> dict:
    """A run's paired comparison: mean, interval and verdict (no per-seed list)."""
    entry = run["paired"][comparison]
    return {"mean": entry["mean"], "ci95": entry["ci95"], "verdict": entry["verdict"], "n_seeds": entry["n_seeds"]}


def path_reading(signal: bool, ratio_hi, share_hi, m2: str, m3: str, m4: list) -> str:
    """METHOD.md §5.4's registered reading from the outcomes: E2 (swamped) iff signal, M2 reproduced and the DPO
    term below lam L_BT (the ratio's upper end < 1 or the Adam share's < 0.5); E1 or E3 iff no signal, M2 and M3
    not reproduced and M4 reproduced at one of its settings (m4: their verdicts in order, as run); E4 iff M2 is not
    reproduced and M4 ran at all four settings, none reproduced; otherwise not decided."""
    below = (ratio_hi is not None and ratio_hi < 1) or (share_hi is not None and share_hi < 0.5)
    if signal and m2 == "reproduced" and below:
        return "E2"
    if not signal and m2 != "reproduced" and m3 != "reproduced" and "reproduced" in m4:
        return "E1 or E3"
    if m2 != "reproduced" and len(m4) == len(M4_RUNS) and "reproduced" not in m4:
        return "E4"
    return "not decided"


def upper_end(interval: dict | None):
    """An interval's upper end; None without one (at lam = 0 there is no ratio)."""
    return interval["ci95"][1] if interval and interval.get("ci95") else None


def path(folder: Path) -> dict | None:
    """METHOD.md §5.4 from its committed runs (None until M1's and M2's are there): M1's signal, M2 (the path
    alone) beside its ceiling, M3 (true - swapped) and its mean over M2's, M4 at the settings that ran, M5's DPO
    rows, and the registered reading."""
    runs = {key: tables.load(folder, name) for key, name in PATH_RUNS.items()}
    if None in runs.values():
        return None
    m1 = runs["M1"]["path_signal"]
    m2_run = runs["M2_M3"]
    m2, m3 = judged(m2_run, "bilevel - vanilla_rm"), judged(m2_run, "bilevel - bilevel_swapped")
    m4 = []
    for setting, name in M4_RUNS:
        run = tables.load(folder, name)
        if run is None:
            break
        gold, ceiling = (run["paired"][c]["per_seed"] for c in ("bilevel_gold - vanilla_rm", CEILING))
        over = [a - b for a, b in zip(gold, ceiling)]
        m4.append(
            {
                "setting": setting,
                "run": name,
                **judged(run, "bilevel_gold - vanilla_rm"),
                "over_ceiling": stats.interval(over),  # not registered: bilevel_gold - in_domain_rm, paired
            }
        )
    corner = []
    for row, name in DPO_CORNER:
        run = tables.load(folder, name)
        if run is not None:
            corner.append({"row": row, "run": name, **judged(run, "dpo - sft")})
    accuracy = {  # not registered: the RM's accuracy on the dev domains' evaluation pairs (gold order)
        f"{m}, lam = {run['config']['lam']:g}": run["methods"][m]["rm_accuracy"]
        for run, methods in ((runs["M1"], ("vanilla_rm", "bilevel")), (m2_run, ("bilevel", "bilevel_swapped")))
        for m in methods
    }
    out = {
        "M1": m1,
        "path_at_lam_0.3": judged(runs["M1"], "bilevel - bilevel_bt_only"),
        "rm_accuracy": accuracy,
        "M1_at_lam_0": m2_run["path_signal"]["sign_agreement"],
        "M2": m2,
        "M2_ceiling": judged(m2_run, CEILING),
        "M3": {**m3, "over_M2": m3["mean"] / m2["mean"] if m2["mean"] else None},
        "M4": m4,
        "M5": corner,
        "M5_inside_grid": None,
    }
    if len(corner) == len(DPO_CORNER):
        out["M5_inside_grid"] = all(row["mean"] <= corner[0]["mean"] for row in corner[1:])
    out["reading"] = path_reading(
        m1["signal"],
        upper_end(m1["ratio"]),
        upper_end(m1["share_dpo"]),
        m2["verdict"],
        m3["verdict"],
        [e["verdict"] for e in m4],
    )
    return out


def analyse(folder: Path, prereg: dict) -> dict:
    runs = {
        name: json.loads((folder / name / "results.json").read_text())
        for name in ("main", "confirmatory", "world_1", "world_2")
    }
    return {
        "confirmatory": confirmatory(runs["confirmatory"], prereg),
        "world_0_post_hoc": post_hoc(runs["main"], prereg),
        "pooled": pooled(runs, prereg),
        "disclosure": prereg["confirmatory"]["pooled"]["disclosure"],
        "path": path(folder),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    docs = "--docs" in argv
    argv = [a for a in argv if a != "--docs"]
    folder = Path(argv[0] if argv else "results")
    missing = [
        n for n in ("main", "confirmatory", "world_1", "world_2") if not (folder / n / "results.json").is_file()
    ]
    if len(argv) > 1 or missing:
        print(
            f"study.analysis: error: give one folder holding main, confirmatory, world_1 and world_2 runs "
            f"(missing in {folder}: {', '.join(missing) or 'none'})",
            file=sys.stderr,
        )
        return 2
    analysis = analyse(folder, summary.read_preregistration())
    (folder / "analysis.json").write_text(json.dumps(analysis, indent=1) + "\n")
    print(tables.analysis_markdown(analysis), end="")
    claims = tables.claims_table(folder, analysis)
    (folder / "claims.md").write_text(claims)
    print(f"wrote {folder / 'analysis.json'} and {folder / 'claims.md'} (the README's claims table)")
    if docs:  # the generated tables into README.md and the report (study/test_layout.py checks they are there)
        generated = {"claims": claims, **tables.report_tables(folder, analysis)}
        for path in (ROOT / "README.md", ROOT / tables.REPORT):
            path.write_text(tables.fill(path.read_text(), generated))
            print(f"filled the generated tables of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
