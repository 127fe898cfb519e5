"""How the methods are measured at meta-test (METHOD.md §4, §5) and the papers' premises (§3, §5.2).

Per evaluation domain: the gold reward of the adapted policy's samples, its win rate against pi_ref's, KL(pi_theta ||
pi_ref), the probability it puts on tokens no training response contains, each reward model's accuracy against the
gold order; the premises, measured with the vanilla RM; MetaRM's mechanism on its own shifted samples. `s` below is
train.py's Setup, what every seed of a run shares.
"""

import math

import torch

import data
import metarm
import policy
from study.methods import METHODS
from study.stats import mean

MAX_NEW = metarm.AdaptConfig.max_new_tokens  # the longest response, everywhere
# the gold-margin bins of MetaRM's premise (METHOD.md §5.2): [0, 0.5), [0.5, 1), [1, 2), [2, inf)
MARGIN_BINS = (0.0, 0.5, 1.0, 2.0, math.inf)


FIRST_FRESH_SEED = 10  # from this seed on, a seed's random streams are its own (stream)


def stream(seed: int, k: int = 0) -> int:
    """The generator seed of a run's seed's k-th random stream (0 <= k < 1000). Seeds 0-9 keep the streams they were
    published with, seed + k, which adjacent seeds share: seed s's stream 1 (the extra Bradley-Terry batches) is seed
    s + 1's stream 0. A seed >= 10 (--first-seed 10: the confirmatory run, METHOD.md §5.3) owns 1000 * seed + k, which
    no other seed's stream or common-random-number key (crn_seed) touches."""
    return seed + k if seed < FIRST_FRESH_SEED else 1000 * seed + k


def crn_seed(seed: int, domain_index: int, repeat: int) -> int:
    """The generator seed of one (seed, domain, repeat): every method uses it (common random numbers)."""
    return 1_000_000 * (stream(seed) + 1) + 1000 * domain_index + repeat


def reward_functions(s, rms: dict, d: str, ref: dict) -> dict:
    """method -> the reward its adaptation (3) uses on domain d (METHODS' adapts_with), standardised on pi_ref's
    samples (§1). Methods not adapted (sft, dpo) and MetaRM's rounds (their own) have none."""
    out = {}
    for m in s.methods:
        if METHODS[m].adapts_with == "gold":
            fn = gold_fn(s.world)
        elif METHODS[m].adapts_with == "agnostic gold":
            fn = gold_fn(s.world, agnostic=True)
        elif METHODS[m].adapts_with == "rm":
            fn = reward_fn(s.rm, phi_of(rms, m, d))
        else:
            continue
        out[m] = metarm.standardised(fn, ref)
    return out


def phi_of(rms: dict, m: str, d: str) -> dict:
    """Method m's reward model on domain d: one per domain (in_domain_rm; the bilevel RMs of --outer-data
    own), a dict keyed by domain names, or one for all, keyed by parameter names."""
    per_domain = isinstance(rms[m], dict) and all(k in data.DOMAINS for k in rms[m])
    return rms[m][d] if per_domain else rms[m]


def reward_fn(rm, phi: dict):
    """r_phi as a function of an encoded batch."""

    def r(batch):
        return policy.reward(rm, phi, batch)

    return r


def gold_fn(world, agnostic: bool = False):
    """r*_d of an encoded batch as a tensor (the domain is read from each prompt's tag); agnostic: the
    domain-agnostic gold reward of the agnostic_oracle ceiling."""

    def gold(batch):
        idx = batch["idx"]
        return torch.tensor(world.gold_rewards(idx.tolist(), agnostic), dtype=torch.float32, device=idx.device)

    return gold


def evaluate(model, theta, prompts, ref_eval, gold, gen, n: int, unseen_tokens=None):
    """Gold reward of pi_theta's samples, win rate against pi_ref's samples ref_eval of the same prompts
    (judged by the gold reward, ties 1/2), KL(pi_theta || pi_ref) (k1 on the policy's samples) and, given
    unseen_tokens, the probability pi_theta puts on them along its samples (unseen_mass)."""
    batch = policy.sample(model, theta, prompts.repeat(n, 1), MAX_NEW, gen)
    g = gold(batch)
    kl = (policy.logprob(model, theta, batch) - batch["logp_ref"]).mean()
    res = {
        "gold_reward": g.mean().item(),
        "win_rate": metarm.tie_accuracy(g - gold(ref_eval)).item(),
        "kl": kl.item(),
    }
    if unseen_tokens is not None:
        res["unseen_mass"] = unseen_mass(model, theta, batch, unseen_tokens)
    return res, batch, g


@torch.no_grad()
def unseen_mass(model, theta: dict, batch: dict, unseen_tokens) -> float:
    """The probability pi_theta gives the tokens in unseen_tokens (V,) bool, averaged over the response
    positions of batch: the mean of sum_{v unseen} pi_theta(v | x, y_<t) over every response token y_t.
    With unseen_tokens the tokens no training pair's response contains, it measures the mass DPO can move
    to tokens its pairs never show (METHOD.md §5.2, likelihood displacement)."""
    if policy.is_head(theta):
        logits = policy.head_logits(theta, batch["h"])
    else:
        logits, _ = torch.func.functional_call(model, theta, (batch["idx"],))
    mass = torch.softmax(logits[:, :-1], dim=-1)[..., unseen_tokens].sum(-1)  # position t predicts token t + 1
    mask = batch["mask"][:, 1:]
    return ((mass * mask).sum() / mask.sum()).item()


@torch.no_grad()
def rm_accuracy(s, rms: dict, m: str, d: str) -> float:
    """The RM's accuracy on d's labelled evaluation pairs against the noise-free gold ordering (gold
    ties excluded, RM ties 1/2); MetaRM's RMs (one per repeat) are averaged."""
    if m == "metarm":
        phis = [phi for (domain, _), phi in rms[m].items() if domain == d]
    else:
        phis = [phi_of(rms, m, d)]
    chosen, rejected = s.eval_pairs[d]
    accuracies = []
    for phi in phis:
        margins = policy.reward(s.rm, phi, chosen) - policy.reward(s.rm, phi, rejected)
        accuracies.append(metarm.tie_accuracy(margins, s.gold_margins[d]).item())
    return mean(accuracies)


@torch.no_grad()
def measure_premises(rm, phi: dict, ref_eval: dict, adapted: dict, gold, n: int) -> dict:
    """The papers' premises, measured with the vanilla RM (§4): its accuracy on gold-labelled pairs of
    two samples of the same prompt, from pi_ref and from the policy adapted with it; its normalised
    reward-difference spread (§3) on the same samples; and MetaRM's premise as the paper shows it (METHOD.md
    §5.2, within_prompt_differences): the within-prompt |r_i - r_j| at this fixed phi, and the accuracy
    binned by gold margin. Batches hold n samples per prompt, repeat-major (row = repeat x prompts + prompt)."""
    out = {}
    for name, batch in (("pi_ref", ref_eval), ("adapted", adapted)):
        r, g = policy.reward(rm, phi, batch), gold(batch)
        half = len(r) // 2  # rows i and i + half share a prompt
        acc = metarm.tie_accuracy(r[:half] - r[half : 2 * half], g[:half] - g[half : 2 * half]).item()
        out[f"acc_{name}_samples"] = None if math.isnan(acc) else acc  # NaN: every pair tied in gold
        r_by_prompt, g_by_prompt = r.view(n, -1).T.reshape(-1), g.view(n, -1).T.reshape(-1)  # prompt-major
        out[f"spread_{name}"] = metarm.reward_spread(r_by_prompt, n)
        for k, v in within_prompt_differences(r_by_prompt, g_by_prompt, n).items():
            out[f"{k}_{name}"] = v
    return out


def within_prompt_differences(r, g, k: int) -> dict:
    """Every pair i < j of two of the k samples of a prompt (prompt-major): the quartiles of |r_i - r_j|
    (absdiff_q25, _median, _q75), the median of |g_i - g_j| (gold_absdiff_median), the RM's accuracy against the
    gold order on the pairs with |g_i - g_j| >= 1 (acc_margin_ge1), and for each gold-margin bin b of MARGIN_BINS
    (|g_i - g_j| in [lo, hi)) the share of pairs in it (share_bin{b}) and the RM's accuracy against the gold order
    there (acc_bin{b}; gold ties left out, RM ties 1/2; None for a bin without a pair that is not a gold tie)."""
    dr, dg = within_prompt_pairs(r, k), within_prompt_pairs(g, k)
    q = torch.quantile(dr.abs().double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=dr.device))
    out = {"absdiff_q25": q[0].item(), "absdiff_median": q[1].item(), "absdiff_q75": q[2].item()}
    out["gold_absdiff_median"] = torch.quantile(dg.abs().double(), 0.5).item()  # gold's own collapse (METHOD.md §5.3)
    wide = dg.abs() >= 1.0  # pairs with a gold margin of 1 or more
    acc = metarm.tie_accuracy(dr[wide], dg[wide]).item() if wide.any() else math.nan
    out["acc_margin_ge1"] = None if math.isnan(acc) else acc
    for b, (lo, hi) in enumerate(zip(MARGIN_BINS, MARGIN_BINS[1:])):
        inside = (dg.abs() >= lo) & (dg.abs() < hi)
        out[f"share_bin{b}"] = inside.double().mean().item()
        acc = metarm.tie_accuracy(dr[inside], dg[inside]).item() if inside.any() else math.nan
        out[f"acc_bin{b}"] = None if math.isnan(acc) else acc
    return out


def within_prompt_pairs(x, k: int):
    """x_i - x_j over every pair i < j of two of the k samples of a prompt (prompt-major), flattened."""
    i, j = torch.triu_indices(k, k, 1)
    x = x.view(-1, k)
    return (x[:, i] - x[:, j]).flatten()


def within_prompt_accuracy(r, g, k: int):
    """The RM's accuracy against the gold order over every pair of two samples of the same prompt (k per
    prompt, prompt-major): gold ties left out, RM ties 1/2; None if every pair ties in gold."""
    accuracy = metarm.tie_accuracy(within_prompt_pairs(r, k), within_prompt_pairs(g, k)).item()
    return None if math.isnan(accuracy) else accuracy


def unseen_tokens(world, device) -> torch.Tensor:
    """(V,) bool: the tokens that no training pair's response (chosen or rejected) contains."""
    seen = {t for pair in world.pooled_pairs(data.TRAIN_DOMAINS) for t in pair.chosen + pair.rejected}
    unseen = torch.ones(len(world.vocab), dtype=torch.bool)
    unseen[sorted(seen)] = False
    return unseen.to(device)


@torch.no_grad()
def shifted_accuracy(s, rms: dict, metarm_phi: dict, samples: dict, gold) -> dict:
    """MetaRM's mechanism (METHOD.md §5.2): on the shifted samples X_s of its last update round (k per prompt),
    the accuracy against the gold order over every within-prompt pair of MetaRM's RM after the updates, of
    the eta = 0 RM on the same samples (vanilla_rm_long's, whose X_t draws are the same) and of the vanilla RM."""
    k, g = s.metarm_cfg.k, gold(samples)
    phis = {"metarm": metarm_phi, "vanilla_rm": rms["vanilla_rm"]}
    if "metarm_eta0" in rms:
        phis["metarm_eta0"] = rms["metarm_eta0"]
    return {m: within_prompt_accuracy(policy.reward(s.rm, phi, samples), g, k) for m, phi in phis.items()}


@torch.no_grad()
def shifted_widening(s, rms: dict, metarm_phi: dict, samples: dict, ref: dict) -> dict:
    """MetaRM's mechanism, its own target (METHOD.md §5.3): on the shifted samples X_s of its last update round (k
    per prompt), the mean within-prompt |r_i - r_j| of each RM -- MetaRM's after the updates, eta = 0's, the
    vanilla RM's, as in shifted_accuracy -- over that RM's own reward std on pi_ref's samples `ref` (the §1 scale):
    did the ascent on J (9) widen the differences it targets, beyond rescaling the reward?"""
    k = s.metarm_cfg.k
    phis = {"metarm": metarm_phi, "vanilla_rm": rms["vanilla_rm"]}
    if "metarm_eta0" in rms:
        phis["metarm_eta0"] = rms["metarm_eta0"]
    out = {}
    for m, phi in phis.items():
        r = policy.reward(s.rm, phi, samples)
        scale = policy.reward(s.rm, phi, ref).std().clamp_min(1e-6)
        out[m] = (within_prompt_pairs(r, k).abs().mean() / scale).item()
    return out


def sample_records(world, method: str, domain: str, seed: int, batch: dict, gold_rewards, n: int = 8) -> list:
    """The first n evaluation samples of a method, decoded, for samples.jsonl."""
    records = []
    for row, gold_reward in list(zip(batch["idx"].tolist(), gold_rewards.tolist()))[:n]:
        records.append(
            {
                "method": method,
                "domain": domain,
                "seed": seed,
                "response": world.decode(row[data.PROMPT_LEN :]),
                "prompt": world.decode(row[: data.PROMPT_LEN]),
                "gold_reward": gold_reward,
            }
        )
    return records
