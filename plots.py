"""The figures of METHOD.md §5, drawn from a results.json: `python plots.py runs/latest`.

train.py calls make_all at the end of a run; this file only draws, so a figure can be restyled
without re-running the experiment.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"sft": "tab:gray", "vanilla_rm": "tab:blue", "dpo": "tab:purple", "metarm": "tab:orange",
          "bilevel": "tab:green", "oracle": "black", "cg": "tab:green", "neumann": "tab:red",
          "unrolled": "tab:brown"}


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gold_bars(results, path):
    """(1) Held-out gold reward per method and domain, bars with +- std over seeds."""
    methods = list(results["methods"])
    domains = list(results["methods"][methods[0]]["gold_reward"]["per_domain"])
    per_seed = results["per_seed"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [[s[m][d]["gold_reward"] for s in per_seed] for d in domains] + \
               [results["methods"][m]["gold_reward"]["per_seed"]]
        mean = [sum(v) / len(v) for v in vals]
        std = [(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0 for v, mu in zip(vals, mean)]
        ax.bar([j + i * width for j in range(len(vals))], mean, width, yerr=std, capsize=2, label=m,
               color=COLORS[m])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains) + 1)], domains + ["mean"])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("gold reward r*_d of samples")
    ax.set_title(f"held-out domains, mean ± std over {len(per_seed)} seed(s)")
    ax.legend(ncol=3, fontsize=8)
    save(fig, path)


def frontier(fig_data, path):
    """(2) Gold reward vs KL(pi || pi_ref) from a beta sweep of meta-test adaptation."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for m, pts in fig_data["points"].items():
        ax.plot([p["kl"] for p in pts], [p["gold_reward"] for p in pts], "o-", color=COLORS[m], label=m)
        for p in pts:
            ax.annotate(f"β={p['beta']:g}", (p["kl"], p["gold_reward"]), fontsize=6)
    ax.set_xlabel("KL(π‖π_ref)")
    ax.set_ylabel("gold reward")
    ax.set_title("reward-vs-KL frontier (" + ", ".join(fig_data["domains"]) + ")")
    ax.legend(fontsize=8)
    save(fig, path)


def hypergradient_error(fig_data, path):
    """(3) Relative error of the hypergradient vs HVPs on the real bilevel problem."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, pts in fig_data["curves"].items():
        ax.loglog([p["hvps"] for p in pts], [p["error"] for p in pts], "o-", color=COLORS[name], label=name)
    if "training_setting" in fig_data:                 # the setting training uses: T inner steps, then CG
        t = fig_data["training_setting"]
        ax.loglog([t["hvps"]], [t["error"]], "*", ms=12, color="k",
                  label=f"training (T={t['T']}, CG≤{t['cg_iters']})")
    ax.set_xlabel("Hessian-vector products")
    ax.set_ylabel("relative error of dF/dr")
    ax.set_title(f"hypergradient error ({fig_data['domain']}; reference vs FD: "
                 f"{fig_data['fd_check_rel_error']:.1e})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    save(fig, path)


def outer_convergence(fig_data, path):
    """(4) Raw full-batch ||grad F(phi_k)||^2 / ||grad F(phi_0)||^2 and its running minimum."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for i, (beta, pts) in enumerate(fig_data.items()):
        k, ratio = [p["step"] for p in pts], [p["ratio"] for p in pts]
        running = [min(ratio[:j + 1]) for j in range(len(ratio))]
        color = f"C{i}"
        ax.semilogy(k, ratio, "o-", color=color, label=f"β={beta} raw")
        ax.semilogy(k, running, "--", color=color, alpha=0.6, label=f"β={beta} running min")
    ax.set_xlabel("outer step k")
    ax.set_ylabel("‖∇F(φ_k)‖² / ‖∇F(φ_0)‖²")
    ax.legend(fontsize=7)
    save(fig, path)


def rlhf_rounds(fig_data, path):
    """(5) Normalised reward-difference spread and gold reward over iterative RLHF rounds."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for name, hist in fig_data.items():
        rounds = [h["round"] for h in hist]
        axes[0].plot(rounds, [h["spread"] for h in hist], "o-", color=COLORS[name], label=name)
        axes[1].plot(rounds, [h["gold"] for h in hist], "o-", color=COLORS[name], label=name)
    axes[0].set_ylabel("std(r_i - r_j) / std(r), same prompt")
    axes[1].set_ylabel("gold reward of the policy")
    for ax in axes:
        ax.set_xlabel("RLHF round")
        ax.set_xticks(rounds)
        ax.legend(fontsize=8)
    save(fig, path)


def training_curves(fig_data, path):
    """(6) SFT loss, reward-model losses and the bilevel objective F."""
    panels = [(k, v) for k, v in fig_data.items() if v]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3))
    for ax, (name, values) in zip(axes if len(panels) > 1 else [axes], panels):
        w = 5                                             # moving average: single-batch values are noisy
        smooth = [sum(values[max(0, i - w + 1):i + 1]) / len(values[max(0, i - w + 1):i + 1]) for i in range(len(values))]
        ax.plot(values, color="tab:blue", alpha=0.3, label="logged")
        ax.plot(smooth, color="tab:blue", label=f"mean of last {w}")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
        ax.set_xlabel("logged step" if name in ("sft_loss", "vanilla_rm_loss") else "step")
    save(fig, path)


def make_all(results, out_dir):
    """Every figure whose data is in results, as PNGs in out_dir."""
    out_dir = Path(out_dir)
    gold_bars(results, out_dir / "gold_reward.png")
    figs = results.get("figures", {})
    for key, draw in [("frontier", frontier), ("hypergradient_error", hypergradient_error),
                      ("outer_convergence", outer_convergence), ("rlhf_rounds", rlhf_rounds),
                      ("training_curves", training_curves)]:
        if key in figs:
            draw(figs[key], out_dir / f"{key}.png")


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/latest")
    if not (folder / "results.json").is_file():
        print(f"plots.py: error: no results.json in {folder}", file=sys.stderr)
        sys.exit(2)
    make_all(json.loads((folder / "results.json").read_text()), folder)
