"""The bilevel reward model on Hugging Face models, its hypergradient through the policy's LoRA adapters (an optional
extra; one process).

Jia, "Generalizing Reward Modeling for Out-of-Distribution Preference Learning" (arXiv 2402.14760), METHOD.md §2.
`metarm.py` runs the method on the toy world's own small models; this module runs the same equations -- with
`bilevel.py` unchanged and the toy's own loss functions -- on any local `AutoModelForSequenceClassification` (the
reward model r_phi) and `AutoModelForCausalLM` (the policy), so that a reader can take it from the toy to their
model. As in the toy, Eqs. (4), (5) and (7) are this project's formalisation of the paper (METHOD.md §2 says where
the paper leaves it open), not the paper's code. It needs `requirements-hf.txt`; no core module imports it; nothing
is downloaded (models are built from a config or read from a local folder).

Symbols -> names (METHOD.md §2):
    phi            the reward model's trainable parameters (those with requires_grad: all of them, or with
                   --rm-lora its LoRA adapters and score head), trained in place by Adam
    theta          the policy's LoRA-FA adapters (Lora): every adapter's B (A frozen, drawn from the seed; B = 0 at
                   theta_ref, so pi_theta_ref = pi_ref exactly and the weights of (4) start uniform); with
                   --lora-full the A's too (Lora's docstring: why rho must then come from Lanczos)
    Delta_theta    log pi_theta(y|x) - log pi_ref(y|x) of a response, eos included (`implicit_reward`)
    K, beta        candidates per prompt, sampled from pi_ref (`sample`); the KL coefficient of (5)
    rho, T         the proximal weight of (5); inner gradient steps (6) of size 1 / (lambda_max + rho)
    lam, beta_dpo  the weight of L_BT in (7); the DPO temperature in (7)
    F              (7): (N/n) sum over the n drawn domains of L_DPO(theta*_d; P_d) + lam L_BT(phi; pooled pairs)

Why a plain loop, not a TRL trainer: a TRL trainer steps one model on the gradient of a loss of a batch. Here the
loss of phi is F(phi) = f(theta*(phi)), with theta*_d solved to a fixed point per drawn domain (warm-started from
its last solve), and its gradient is (8): conjugate gradients with Hessian-vector products of the inner loss
through the policy, then one backward through the reward model. No trainer has that step; a loop of 30 lines does,
with `accelerate` for the device and, under `accelerate launch`, several processes (train's docstring: each rank
solves its own domains, the phi-gradients are averaged across ranks, rho is reduced by its maximum).

Safe for second order: an HVP differentiates the forward twice. The loaders pick eager attention (fused kernels
have no double backward) and switch dropout off; a model object given from Python is refused, in one line, with
another attention implementation, activation checkpointing (a recomputed layer would see the module's own weights,
not theta), dropout (CG needs the same symmetric matvec at every product) or, for the policy, half precision. Every
differentiated forward passes use_cache=False.

Candidates come from `sample`, not `generate()`: `generate` draws from the global random state and applies the
model's generation config (top-k 50 by default), so its samples are not pi_ref's and the weights of (4) would be
biased. `sample` draws with an explicit generator at temperature 1, no top-k or top-p, with a key/value cache.

Text is re-encoded per model: the policy reads prompt ids + response ids (+ eos; a labelled completion split as
prompt + completion is), the reward model reads prompt + response + eos in its own tokenizer (`hf.token_ids`, as
`trl.RewardTrainer` does; its config's pad id must be its tokenizer's); the two tokenizers may differ. rho is
re-checked every --recheck-every outer steps (1 by default, so that lambda_min and lambda_max are logged at every
step; the toy re-checks every 20th). Resuming a run is not supported.

Command (`python hf_bilevel.py --help`): train a reward model on the pairs JSONL that train.py writes (prompt /
chosen / rejected / domain); writes the reward model (its LoRA adapter with --rm-lora) and tokenizer by
`save_pretrained`, and metrics.json: per outer step F, |grad F|, rho, lambda_min, lambda_max, HVPs, CG residuals;
the calibration; one outer step's cost in forwards and gradients. Python: `hf_bilevel.train(...)`. The meta-test
(3) on your policy: `rloo_reward` gives TRL's RLOOTrainer the trained reward model as a reward callable.
"""

import functools
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.func import functional_call
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.pytorch_utils import Conv1D

import bilevel
import data
import hf
import metarm
import policy
from study import cli
from study.cli import BadInput, option


# ==== Data: labelled pairs per domain, prompts per domain ====================================================
def read_domains(pairs_path: str, prompts_path: str = "") -> dict:
    """{domain: {"pairs": [{prompt, chosen, rejected}], "prompts": [str]}} from a pairs JSONL with a `domain` per
    record (as train.py writes them) and, optionally, a prompts JSONL ({prompt, domain}); without it a domain's
    prompts are the distinct prompts of its pairs. BadInput (one line) on a missing field, an empty domain name, a
    domain of the prompts file without pairs, or a domain with no prompt."""
    records = hf.read_jsonl(pairs_path, {"prompt": str, "chosen": str, "rejected": str, "domain": str})
    domains = {}
    for lineno, rec in enumerate(records, 1):
        if not rec["domain"].strip():
            raise BadInput(f"{pairs_path}: record {lineno} has an empty domain")
        pair = {"prompt": rec["prompt"]}
        for side in ("chosen", "rejected"):
            pair[side] = hf.with_separator(rec["prompt"], rec[side])
        domains.setdefault(rec["domain"], {"pairs": [], "prompts": []})["pairs"].append(pair)
    if prompts_path:
        for lineno, rec in enumerate(hf.read_jsonl(prompts_path, {"prompt": str, "domain": str}), 1):
            if rec["domain"] not in domains:
                raise BadInput(
                    f"{prompts_path}: record {lineno}: domain {rec['domain']!r} has no pairs in {pairs_path}"
                )
            domains[rec["domain"]]["prompts"].append(rec["prompt"])
    for d, v in domains.items():
        if not v["prompts"] and prompts_path:
            raise BadInput(f"{prompts_path}: domain {d!r} has no prompt")
        v["prompts"] = list(dict.fromkeys(v["prompts"] or [p["prompt"] for p in v["pairs"]]))
    return domains


# ==== Models safe for second order ===========================================================================
def check_second_order(model, what: str, is_policy: bool):
    """BadInput (one line) for a model whose forward cannot be differentiated twice as (8) needs (module docstring):
    attention other than eager, activation checkpointing, dropout, or (the policy) half precision."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl != "eager":
        raise BadInput(
            f"{what}: attention implementation {impl!r}; load it with attn_implementation='eager' "
            "(fused attention kernels have no double backward)"
        )
    if getattr(model, "is_activation_checkpointing", False):
        raise BadInput(
            f"{what}: activation checkpointing is on; a recomputed layer would see its own weights, not theta"
        )
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropouts or getattr(config, "attention_dropout", 0.0) > 0:
        p = max(dropouts or [config.attention_dropout])
        raise BadInput(
            f"{what}: dropout is on (p = {p}); each HVP of CG would see another random function "
            "(hf_bilevel.without_dropout sets it to 0)"
        )
    dtype = next(model.parameters()).dtype
    if is_policy and dtype in (torch.float16, torch.bfloat16):
        raise BadInput(f"{what}: {dtype} weights; the policy's HVPs and CG need float32 or float64")


def without_dropout(model):
    """model in eval mode with every dropout probability set to 0 (as TRL's disable_dropout_in_model does)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
    return model.eval()


def load(path: str, kind, dtype, what: str):
    """(model, tokenizer) from a local folder, eager attention, dropout off; kind: AutoModelForCausalLM or
    AutoModelForSequenceClassification (num_labels = 1; a causal LM gets a fresh score head)."""
    hf.check_model_path(path)
    extra = {"num_labels": 1} if kind is AutoModelForSequenceClassification else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = kind.from_pretrained(path, dtype=dtype, attn_implementation="eager", local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise BadInput(f"{path}: cannot be loaded as {what} ({str(e).splitlines()[0]})") from None
    if tokenizer.eos_token is None:
        raise BadInput(f"{path}: its tokenizer has no eos token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # the reward is read at the last token that is not padding
        model.config.pad_token_id = tokenizer.pad_token_id
    return without_dropout(model), tokenizer


def load_policy(path: str, dtype=torch.float32) -> tuple:
    """(causal LM, tokenizer) from a local folder, safe for second order (load)."""
    return load(path, AutoModelForCausalLM, dtype, "a causal LM")


def load_reward_model(path: str, dtype=torch.float32) -> tuple:
    """(sequence classifier with one label, tokenizer) from a local folder, safe for second order (load)."""
    return load(path, AutoModelForSequenceClassification, dtype, "a reward model")


@functools.cache
def toy_world() -> data.World:
    """The toy world, built once per process: data.World() takes seconds."""
    return data.World()


@functools.cache
def toy_tokenizer():
    """The word-level tokenizer of the toy world's vocabulary (hf.toy_tokenizer), built once."""
    return hf.toy_tokenizer(toy_world())


def toy_models(hidden: int, layers: int, seed: int, dtype) -> tuple:
    """(policy, reward model, tokenizer): tiny Llamas over the toy world's vocabulary, one word-level tokenizer
    (toy_tokenizer), eager attention, initialised from seed and seed + 1."""
    tokenizer = toy_tokenizer()
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(hf.toy_llama_config(tokenizer, hidden, layers)).to(dtype)
    rm = hf.toy_reward_model(tokenizer, hidden, layers, seed + 1, dtype)
    return without_dropout(lm), without_dropout(rm), tokenizer


# ==== theta: the policy's LoRA adapters ======================================================================
@dataclass
class Lora:
    """theta: LoRA-FA by default, the B of every adapter, with A frozen; full=True frees A too. A is drawn from seed
    as peft draws it (Kaiming-uniform, a = sqrt(5)), B starts at 0.

    Full LoRA, honestly: g depends on theta only through B A, so the Hessian of (5) has flat directions
    (A -> S A, B -> B S^-1 for any invertible S) and, at B = 0, a zero A-A block beside a nonzero A-B block: it is
    indefinite there. CG needs H + rho I positive definite, so rho > -lambda_min must come from Lanczos at theta*
    (calibrate) and be kept by the re-check: full LoRA is refused with --recheck-every 0."""

    rank: int = 8
    alpha: float = 16.0  # the update is (alpha / rank) B A
    target_modules: tuple = ("q_proj", "v_proj")  # the LoRA paper's choice and peft's default for Llama
    seed: int = 0
    full: bool = False  # False: LoRA-FA (theta = the B's); True: theta = the A's and the B's


def with_lora(lm, lora: Lora) -> tuple:
    """(the policy with LoRA adapters, theta_ref): the model's own weights frozen, A drawn from an explicit generator
    seeded lora.seed, B = 0 (so the model as it is stays pi_ref); theta_ref holds every B as zeros and, with
    lora.full, every A as drawn."""
    check_targets(lm, lora.target_modules)
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), lora_dropout=0.0, bias="none"
    )
    lm = get_peft_model(lm, config)
    lm.requires_grad_(False)
    generator = torch.Generator().manual_seed(lora.seed)
    theta_ref = {}
    for name, p in lm.named_parameters():
        if ".lora_A." in name:
            with torch.no_grad():
                p.copy_(
                    nn.init.kaiming_uniform_(torch.empty(p.shape, dtype=p.dtype), a=math.sqrt(5), generator=generator)
                )
            if lora.full:
                theta_ref[name] = p.detach().clone()
        elif ".lora_B." in name:
            theta_ref[name] = torch.zeros_like(p)
    return without_dropout(lm), theta_ref


def check_targets(lm, targets):
    """BadInput unless every LoRA target names a linear layer of the policy (nn.Linear, or transformers' Conv1D
    of GPT-2-style models), as peft matches a name: the whole module name or its dotted tail."""
    linear = [name for name, m in lm.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linear)]
    if missing:
        raise BadInput(f"LoRA target modules {missing}: no linear layer of the policy has that name")


# ==== Encoded batches: the policy's and the reward model's =====================================================
def response_ids(tokenizer, prompt_ids: list, prompt: str, completion: str) -> list:
    """A labelled completion's token ids as the policy reads them after its prompt, eos appended (not doubled):
    the tail of prompt + completion tokenised together where its head is the prompt's ids (so that a SentencePiece
    or byte-level tokenizer splits the completion as it would continue the prompt), else the completion alone."""
    joint = tokenizer(text=prompt + completion)["input_ids"]
    if joint[: len(prompt_ids)] == prompt_ids:
        ids = joint[len(prompt_ids) :]
    else:
        ids = tokenizer(text=completion, add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def logprob(lm, theta: dict, batch: dict):
    """log pi_theta(y|x) (B,), the sum over response tokens (eos included), with theta in place of the adapters'
    B by functional_call; the graph to theta is kept."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    logits = functional_call(lm, theta, args=(), kwargs=kwargs).logits
    return policy.sequence_logprob(logits, batch["input_ids"], batch["mask"])


def implicit_reward(lm, theta: dict, batch: dict):
    """Delta_theta(x, y) = log pi_theta(y|x) - log pi_ref(y|x), (B,)."""
    return logprob(lm, theta, batch) - batch["logp_ref"]


def policy_batch(lm, prompts: list, responses: list, pad_id: int, theta_ref: dict) -> dict:
    """Prompt + response id lists -> {input_ids, attention_mask (right-padded), mask (1 on response tokens),
    logp_ref = log pi_ref(y|x)}."""
    device = next(lm.parameters()).device
    input_ids, attention_mask = hf.padded([x + y for x, y in zip(prompts, responses)], pad_id, device)
    mask = torch.zeros(input_ids.shape, dtype=next(lm.parameters()).dtype, device=device)
    for i, (x, y) in enumerate(zip(prompts, responses)):
        mask[i, len(x) : len(x) + len(y)] = 1.0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mask": mask}
    with torch.no_grad():
        batch["logp_ref"] = logprob(lm, theta_ref, batch)
    return batch


def reward(rm, batch: dict):
    """r_phi(x, y) (B,), phi the reward model's own parameters (graph kept)."""
    out = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits[:, 0]


def rm_batch(rm, tokenizer, prompts: list, completions: list) -> dict:
    """prompt + completion + eos in the reward model's tokenizer (hf.token_ids), right-padded."""
    seqs = [hf.token_ids(tokenizer, x, y) for x, y in zip(prompts, completions)]
    input_ids, attention_mask = hf.padded(seqs, tokenizer.pad_token_id, next(rm.parameters()).device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ==== Candidates from pi_ref ===================================================================================
def stop_ids(lm, tokenizer) -> set:
    """The ids a sample stops at: the tokenizer's eos and the generation config's (an id, a list, or None), as
    generate() and TRL's RLOO stop."""
    stops = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if isinstance(stops, int):
        stops = [stops]
    return {tokenizer.eos_token_id, *(stops or [])}


@torch.no_grad()
def sample(lm, prompt_ids: list, K: int, max_new_tokens: int, eos_ids, generator: torch.Generator) -> tuple:
    """K responses per prompt from lm as it is (pi_ref: every B is 0): temperature 1, no top-k or top-p, one draw
    per token from `generator`, a key/value cache; a response stops at its first token of eos_ids (an id or a
    collection: a chat model may end a turn with another), which it keeps. Returns (responses: id lists,
    prompt-major; their log-probabilities (n K,) summed from the cached logits)."""
    device = next(lm.parameters()).device
    stops = torch.tensor(sorted({eos_ids} if isinstance(eos_ids, int) else set(eos_ids)), device=device)
    responses, logps = [], []
    for x in prompt_ids:
        out = lm(input_ids=torch.tensor([x] * K, device=device), use_cache=True)
        tokens, done = [], torch.zeros(K, dtype=torch.bool, device=device)
        logp = torch.zeros(K, dtype=out.logits.dtype, device=device)
        for _ in range(max_new_tokens):
            log_probs = torch.log_softmax(out.logits[:, -1], dim=-1)
            nxt = torch.multinomial(log_probs.exp(), 1, generator=generator)[:, 0]
            logp = logp + torch.where(done, 0.0, log_probs.gather(-1, nxt[:, None])[:, 0])
            tokens.append(torch.where(done, stops[0], nxt))
            done = done | torch.isin(nxt, stops)
            if done.all():
                break
            out = lm(input_ids=tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
        for y in torch.stack(tokens, 1).tolist():
            ends = [t for t, token in enumerate(y) if token in stops.tolist()]
            responses.append(y[: ends[0] + 1] if ends else y)
        logps.append(logp)
    return responses, torch.cat(logps)


# ==== Eqs. (4)-(8) on the two models ===========================================================================
def level_functions(lm, prob: dict, cfg: metarm.BilevelConfig, theta_ref: dict):
    """One domain's g = Eq. (5) (metarm.inner_objective + the proximal term) and f = its L_DPO term of Eq. (7)
    (metarm.dpo_loss), as functions (theta, {"r": the candidates' rewards (B, K)}): Jia's lower and upper levels,
    this project's formalisation, as metarm.level_functions has them for the toy."""

    def g(theta, outer):
        delta = implicit_reward(lm, theta, prob["cand"])
        prox = sum(((theta[n] - theta_ref[n]) ** 2).sum() for n in theta)
        return metarm.inner_objective(delta, outer["r"], cfg.K, cfg.beta) + 0.5 * cfg.rho * prox

    def f(theta, outer):
        chosen = implicit_reward(lm, theta, prob["chosen"])
        return metarm.dpo_loss(chosen, implicit_reward(lm, theta, prob["rejected"]), cfg.beta_dpo)[0]

    return g, f


def candidate_rewards(rm, prob: dict, K: int):
    """r_phi(x, y_k) (B, K), standardised over the candidates as in the toy (metarm.standardised_candidates)."""
    return metarm.standardised_candidates(reward(rm, prob["cand_rm"]), K)


def hypergradient(lm, rm, prob: dict, cfg: metarm.BilevelConfig, theta_ref: dict, theta0=None):
    """Eq. (8) for one domain by the implicit function theorem and CG (bilevel.hypergrad_implicit): (dF_d/dr (B, K),
    r with its graph to phi, info with theta*, F, the inner gradient norm and CG's residuals). phi enters g only
    through r, so one backward through the reward model carries dF/dr to phi (outer_gradient)."""
    r = candidate_rewards(rm, prob, cfg.K)
    outer = {"r": r.detach()}
    g, f = level_functions(lm, prob, cfg, theta_ref)
    theta_star, solve = bilevel.inner_solve(g, theta_ref if theta0 is None else theta0, outer, cfg.T, cfg.inner_lr)
    grad, info = bilevel.hypergrad_implicit(f, g, theta_star, outer, max_iter=cfg.cg_iters, tol=cfg.cg_tol)
    info.update(theta=theta_star, F=f(theta_star, outer).item(), inner_grad_norm=solve["grad_norm"])
    return grad["r"], r, info


def curvature(lm, theta: dict, r, prob: dict, cfg: metarm.BilevelConfig, theta_ref: dict, iters: int = 20) -> tuple:
    """(lambda_min, lambda_max, the HVPs used) of the Hessian of g_d in theta with rho = 0, at theta, by Lanczos
    (§2.1), from the toy's start vector (metarm.lanczos_start)."""
    g, _ = level_functions(lm, prob, replace(cfg, rho=0.0), theta_ref)
    start = metarm.lanczos_start(theta)
    lo, hi, info = bilevel.lanczos_eigs(lambda v: bilevel.hvp(lambda th: g(th, {"r": r}), theta, v), start, iters)
    return lo, hi, info["hvps"]


def calibrate(lm, rm, problems: dict, cfg: metarm.BilevelConfig, theta_ref: dict, rounds: int = 3) -> dict:
    """cfg.rho and cfg.inner_lr from the curvature at theta* (§2.1), the worst case over `problems`, by the fixed
    point of metarm.calibrate: curvature at theta_ref -> rho -> solve (4 T steps) -> curvature at theta* ..."""
    r = {d: candidate_rewards(rm, p, cfg.K).detach() for d, p in problems.items()}
    eigs = [curvature(lm, theta_ref, r[d], p, cfg, theta_ref) for d, p in problems.items()]
    for _ in range(rounds):
        metarm.set_rho(cfg, [(lo, hi) for lo, hi, _ in eigs])
        eigs = []
        for d, p in problems.items():
            g, _ = level_functions(lm, p, cfg, theta_ref)
            theta_star, _ = bilevel.inner_solve(g, theta_ref, {"r": r[d]}, 4 * cfg.T, cfg.inner_lr)
            eigs.append(curvature(lm, theta_star, r[d], p, cfg, theta_ref))
    lam_min, lam_max = min(lo for lo, _, _ in eigs), max(hi for _, hi, _ in eigs)
    return {"lambda_min": lam_min, "lambda_max": lam_max, "rho": cfg.rho, "inner_lr": cfg.inner_lr}


def recheck(lm, rm, problems: dict, warm: dict, cfg: metarm.BilevelConfig, theta_ref: dict) -> dict:
    """§2.1 during the run, as metarm.recheck_rho: lambda_min and lambda_max at the drawn domains' current theta*
    (and Lanczos' HVPs); where lambda_min + rho < rho / 2, rho is raised to rho_from(lambda_min, lambda_max) and
    the step follows. Under several processes lambda_min and lambda_max are first reduced over the ranks (their
    minimum and maximum), so that every rank applies the rule to the same numbers, as one process re-checking all
    the ranks' domains would."""
    eigs = []
    for d, p in problems.items():
        eigs.append(curvature(lm, warm[d], candidate_rewards(rm, p, cfg.K).detach(), p, cfg, theta_ref))
    device = next(lm.parameters()).device
    lam_min = across_processes(torch.tensor(min(lo for lo, _, _ in eigs), dtype=torch.float64, device=device), "min")
    lam_max = across_processes(torch.tensor(max(hi for _, hi, _ in eigs), dtype=torch.float64, device=device), "max")
    lam_min, lam_max = lam_min.item(), lam_max.item()
    metarm.raise_rho(cfg, lam_min, lam_max)
    hvps = across_processes(torch.tensor(sum(n for _, _, n in eigs), device=device), "sum").item()
    return {"lambda_min": lam_min, "lambda_max": lam_max, "lanczos_hvps": int(hvps)}


def outer_gradient(lm, rm, phi: dict, problems: dict, lam_pairs, cfg, theta_ref: dict, n_domains: int, warm: dict):
    """Eqs. (7)(8): grad_phi F, F = (N/n) sum over the drawn domains of L_DPO(theta*_d) + lam L_BT(phi; lam_pairs),
    as metarm.outer_gradient; warm: domain -> its last theta*, updated. Returns (gradients in phi's order, F, info:
    HVPs, CG residuals and inner gradient norms per domain)."""
    surrogate, F_value = 0.0, 0.0
    info = {"hvps": 0, "cg_residual": {}, "cg_iterations": {}, "inner_grad_norm": {}}
    scale = n_domains / len(problems)
    for d, prob in problems.items():
        dF_dr, r, h = hypergradient(lm, rm, prob, cfg, theta_ref, theta0=warm.get(d))
        warm[d] = h["theta"]
        surrogate = surrogate + scale * (r * dF_dr).sum()  # its phi-gradient is (dr/dphi)^T dF/dr
        F_value += scale * h["F"]
        info["hvps"] += h["hvps"]
        info["cg_residual"][d] = h["residual_norm"] / max(h["residual_norms"][0], 1e-300)  # relative
        info["cg_iterations"][d] = h["iterations"]
        info["inner_grad_norm"][d] = h["inner_grad_norm"]
    if cfg.lam > 0:
        bt = metarm.bt_loss(reward(rm, lam_pairs[0]), reward(rm, lam_pairs[1]))[0]
        surrogate, F_value = surrogate + cfg.lam * bt, F_value + cfg.lam * bt.item()
    return list(torch.autograd.grad(surrogate, list(phi.values()))), F_value, info


# ==== The data of one outer step ===============================================================================
class Encoder:
    """The domains' text, tokenised once for each model, and the draws of one outer step's problems (§2.1): a
    domain's prompts_per_domain prompts with K candidates each from pi_ref, and pairs_per_domain of its pairs;
    pairs_per_domain pooled pairs for lam L_BT, from their own generator (the same whatever the domains draw)."""

    def __init__(self, lm, lm_tokenizer, rm, rm_tokenizer, domains: dict, theta_ref: dict):
        self.lm, self.tok, self.rm, self.rm_tok, self.theta_ref = lm, lm_tokenizer, rm, rm_tokenizer, theta_ref
        self.pad_id = lm_tokenizer.pad_token_id if lm_tokenizer.pad_token_id is not None else lm_tokenizer.eos_token_id
        self.eos_ids = stop_ids(lm, lm_tokenizer)
        self.domains = domains
        self.prompt_ids = {d: [lm_tokenizer(text=x)["input_ids"] for x in v["prompts"]] for d, v in domains.items()}
        self.pooled = [p for v in domains.values() for p in v["pairs"]]

    def labelled(self, pairs: list) -> tuple:
        """(chosen, rejected) policy batches of pairs, with log pi_ref."""
        prompts = [self.tok(text=p["prompt"])["input_ids"] for p in pairs]
        batches = []
        for side in ("chosen", "rejected"):
            responses = [response_ids(self.tok, x, p["prompt"], p[side]) for x, p in zip(prompts, pairs)]
            batches.append(policy_batch(self.lm, prompts, responses, self.pad_id, self.theta_ref))
        return tuple(batches)

    def problem(self, d: str, cfg: metarm.BilevelConfig, generator) -> dict:
        """Domain d's data for one outer step, drawn from generator (metarm.draw_problem's order): the candidates
        (policy batch "cand" and the reward model's "cand_rm") and the labelled pairs of (7)'s DPO term."""
        rows = policy.draw(len(self.prompt_ids[d]), cfg.prompts_per_domain, generator)
        prompts = [self.prompt_ids[d][i] for i in rows]
        responses, _ = sample(self.lm, prompts, cfg.K, cfg.max_new_tokens, self.eos_ids, generator)
        repeated = [x for x in prompts for _ in range(cfg.K)]
        texts = [self.domains[d]["prompts"][i] for i in rows for _ in range(cfg.K)]
        completions = [self.completion(x, y) for x, y in zip(texts, responses)]
        pairs = [
            self.domains[d]["pairs"][i]
            for i in policy.draw(len(self.domains[d]["pairs"]), cfg.pairs_per_domain, generator)
        ]
        chosen, rejected = self.labelled(pairs)
        return {
            "cand": policy_batch(self.lm, repeated, responses, self.pad_id, self.theta_ref),
            "cand_rm": rm_batch(self.rm, self.rm_tok, texts, completions),
            "chosen": chosen,
            "rejected": rejected,
        }

    def completion(self, prompt: str, response: list) -> str:
        """A sampled response as the reward model reads it: decoded without special tokens, separated."""
        return hf.with_separator(prompt, self.tok.decode(response, skip_special_tokens=True).strip())

    def lam_pairs(self, cfg: metarm.BilevelConfig, bt_generator) -> tuple:
        """(chosen, rejected) reward-model batches of pooled pairs for lam L_BT."""
        pairs = [self.pooled[i] for i in policy.draw(len(self.pooled), cfg.pairs_per_domain, bt_generator)]
        prompts = [p["prompt"] for p in pairs]
        return tuple(rm_batch(self.rm, self.rm_tok, prompts, [p[s] for p in pairs]) for s in ("chosen", "rejected"))

    def pick(self, count: int, generator) -> list:
        """count of the domains, drawn without replacement."""
        names = list(self.domains)
        return [names[i] for i in torch.randperm(len(names), generator=generator, device=generator.device)[:count]]


# ==== Meta-training: the outer loop ============================================================================
def processes():
    """accelerate's state: one process, or one per rank under `accelerate launch` (on CPU: gloo)."""
    return PartialState(cpu=not torch.cuda.is_available())


def across_processes(x: torch.Tensor, op: str) -> torch.Tensor:
    """x reduced over the processes of `accelerate launch` ("sum", "max" or "min"), in place; x itself in one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x, getattr(torch.distributed.ReduceOp, op.upper()))
    return x


def step_cost(lm, prob: dict, cfg: metarm.BilevelConfig, theta: dict, theta_ref: dict, repeats: int = 3) -> dict:
    """Seconds of one forward of the policy on a problem's candidates and of one gradient of g there (median of
    repeats), the units in which an outer step's cost is reported."""
    g, _ = level_functions(lm, prob, cfg, theta_ref)
    mask = prob["cand"]["mask"]
    r = {"r": torch.zeros(len(mask) // cfg.K, cfg.K, dtype=mask.dtype, device=mask.device)}
    forward, gradient = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            logprob(lm, theta, prob["cand"])
        forward.append(time.perf_counter() - t)
        leaves = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
        t = time.perf_counter()
        torch.autograd.grad(g(leaves, r), list(leaves.values()))
        gradient.append(time.perf_counter() - t)
    return {"forward_seconds": statistics.median(forward), "gradient_seconds": statistics.median(gradient)}


def check_setup(lm, rm, rm_tokenizer, cfg: metarm.BilevelConfig, lora: Lora, n_domains: int, world: int = 1):
    """BadInput (one line) for what train cannot run: a model unsafe for second order, more domains per outer step
    over the processes (world) than there are (n_domains), a solver other than CG, K < 2, no outer step, a reward
    model without trainable parameters or whose configured pad id is not its tokenizer's (the reward is read at the
    last token that is not padding), the models on two devices, a LoRA target that names no linear layer, or full
    LoRA without the re-check of rho."""
    check_second_order(lm, "the policy", is_policy=True)
    check_second_order(rm, "the reward model", is_policy=False)
    if world * cfg.domains_per_step > n_domains:
        raise BadInput(
            f"{world} process(es) x {cfg.domains_per_step} domains per step > the {n_domains} domains: each outer "
            "step draws them without replacement"
        )
    if cfg.solver != "cg" or cfg.K < 2 or cfg.outer_steps < 1:
        raise BadInput("hf_bilevel.py computes (8) by CG only, with K >= 2 and at least one outer step")
    if not any(p.requires_grad for p in rm.parameters()):
        raise BadInput("the reward model has no trainable parameter (phi is empty)")
    if rm.config.pad_token_id != rm_tokenizer.pad_token_id:
        raise BadInput(
            f"the reward model's config.pad_token_id {rm.config.pad_token_id} is not its tokenizer's pad id "
            f"{rm_tokenizer.pad_token_id}: the reward would be read at a padding position"
        )
    if next(lm.parameters()).device != next(rm.parameters()).device:
        raise BadInput("the policy and the reward model are on two devices")
    if isinstance(lm, PeftModel):
        raise BadInput("the policy already has adapters (a PeftModel): give the base model; train adds theta's")
    check_targets(lm, lora.target_modules)
    if lora.full and not cfg.recalibrate_every:
        raise BadInput("full LoRA needs rho re-checked at theta* (--recheck-every >= 1): its Hessian is indefinite")


def train(
    lm,
    lm_tokenizer,
    rm,
    rm_tokenizer,
    domains: dict,
    cfg: metarm.BilevelConfig,
    lora: Lora = Lora(),
    seed: int = 0,
    probe_domains: int = 4,
    progress=None,
) -> dict:
    """Eqs. (6)-(8), meta-training: Adam on rm's trainable parameters phi, in place, along the hypergradient of F.
    lm: the policy (a causal LM, frozen; theta = its LoRA adapters, added here: lora); domains: read_domains's dict.
    rho and the inner step are calibrated first on one problem of each of the first probe_domains domains (as
    train.py does on four), then re-checked on the drawn domains every cfg.recalibrate_every outer steps. Returns
    the metrics (module docstring); rm is trained in place, lm gets the adapters in place (peft).

    Several processes (`accelerate launch`): one generator, the same seed on every rank, draws world_size x n
    domains per outer step without replacement and rank i takes the i-th n; each rank draws its problems from its
    own generator and solves them from its own warm starts. Neither model is wrapped for data parallelism (DDP's
    all-reduce does not see torch.autograd.grad): the phi-gradients and F are averaged across the ranks here, so
    that phi stays the same on every rank, and phi starts from rank 0's; the calibration's rho is reduced by its
    maximum and the inner step by its minimum, and a re-check applies §2.1's rule to the ranks' joint lambda_min
    and lambda_max (recheck), so that every rank takes the same rho and step."""
    world, rank = processes().num_processes, processes().process_index
    check_setup(lm, rm, rm_tokenizer, cfg, lora, len(domains), world)
    cfg = replace(cfg)
    lm, theta_ref = with_lora(lm, lora)
    phi = {n: p for n, p in rm.named_parameters() if p.requires_grad}
    if world > 1:  # the same phi on every rank, whatever initialised it
        for p in phi.values():
            torch.distributed.broadcast(p.data, src=0)
    device = next(lm.parameters()).device
    domain_generator, bt_generator = policy.generator(seed, device), policy.generator(seed + 1, device)
    generator = policy.generator(seed + 10 + rank, device)  # this rank's problems
    encoder = Encoder(lm, lm_tokenizer, rm, rm_tokenizer, domains, theta_ref)
    n = cfg.domains_per_step
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="cg did not converge")  # counted per step instead
        probe_generator = policy.generator(seed + 2, device)  # the same probes on every rank
        probes = {d: encoder.problem(d, cfg, probe_generator) for d in list(domains)[:probe_domains]}
        calibration = calibrate(lm, rm, probes, cfg, theta_ref)
        # the same on every rank even where the ranks' devices round the probes differently
        cfg.rho = across_processes(torch.tensor(cfg.rho, dtype=torch.float64, device=device), "max").item()
        cfg.inner_lr = across_processes(torch.tensor(cfg.inner_lr, dtype=torch.float64, device=device), "min").item()
        opt = torch.optim.Adam(phi.values(), lr=cfg.lr)
        log, warm = [], {}
        for step in range(cfg.outer_steps):
            t = time.perf_counter()
            lam_pairs = encoder.lam_pairs(cfg, bt_generator)  # the same on every rank
            picks = encoder.pick(world * n, domain_generator)
            problems = {d: encoder.problem(d, cfg, generator) for d in picks[rank * n : (rank + 1) * n]}
            drawn = time.perf_counter() - t  # sampling the candidates and encoding the step's data
            grads, F_value, info = outer_gradient(lm, rm, phi, problems, lam_pairs, cfg, theta_ref, len(domains), warm)
            grads = [across_processes(g, "sum") / world for g in grads]  # the mean over the ranks
            F_value = across_processes(torch.tensor(F_value, dtype=torch.float64, device=device), "sum").item() / world
            info["hvps"] = int(across_processes(torch.tensor(info["hvps"], device=device), "sum").item())
            policy.check_finite(torch.tensor([F_value] + [g.norm() for g in grads]), "F or its hypergradient", step)
            policy.apply_gradient(opt, phi, grads)
            entry = {"step": step, "drawn": [picks[r * n : (r + 1) * n] for r in range(world)], "F": F_value}
            entry["grad_norm"] = math.sqrt(sum((g**2).sum().item() for g in grads))
            entry.update(info, rho=cfg.rho, inner_lr=cfg.inner_lr, lambda_min=None, lambda_max=None, lanczos_hvps=0)
            if cfg.recalibrate_every and step % cfg.recalibrate_every == 0:
                entry.update(recheck(lm, rm, problems, warm, cfg, theta_ref))
            entry.update(seconds=time.perf_counter() - t, draw_seconds=drawn)
            log.append(entry)
            policy.show(progress, {"F": entry["F"], "grad_norm": entry["grad_norm"]})
        d = next(iter(problems))
        cost = step_cost(lm, problems[d], cfg, warm[d], theta_ref)
    outer_seconds = statistics.median(e["seconds"] for e in log)
    cost.update(
        outer_step_seconds=outer_seconds,
        draw_share=sum(e["draw_seconds"] for e in log) / sum(e["seconds"] for e in log),
        in_forwards=outer_seconds / cost["forward_seconds"],
        in_gradients=outer_seconds / cost["gradient_seconds"],
    )
    return {"calibration": calibration, "log": log, "cost": cost, "seconds": time.perf_counter() - t0}


# ==== The hand-over to the meta-test: a reward for TRL's RLOOTrainer ===========================================
def reference_samples(lm, tokenizer, prompts: list, k: int, max_new_tokens: int, seed: int = 0) -> tuple:
    """pi_ref's samples of prompts, k each (sample, before any RL step: the scale of §1), as text: (the prompt of
    each sample, its completion decoded without special tokens, as RLOO decodes)."""
    prompt_ids = [tokenizer(text=x)["input_ids"] for x in prompts]
    generator = policy.generator(seed, next(lm.parameters()).device)
    responses, _ = sample(lm, prompt_ids, k, max_new_tokens, stop_ids(lm, tokenizer), generator)
    repeated = [x for x in prompts for _ in range(k)]
    return repeated, [tokenizer.decode(y, skip_special_tokens=True).strip() for y in responses]


def rloo_reward(rm, rm_tokenizer, reference_prompts: list, reference_completions: list, batch_size: int = 64):
    """The meta-test's reward (3) for `trl.RLOOTrainer(reward_funcs=...)`: a callable (prompts, completions,
    **kwargs) -> [float] on the trained reward model's own tokenisation -- prompt, separator, completion, eos
    (hf.token_ids), as it was trained; given the model itself, RLOO would feed it prompt + completion with no
    separator and no eos, and it decodes completions without special tokens -- standardised by the mean and
    standard deviation of r over pi_ref's reference samples (reference_samples; §1's scale, as the toy's meta-test
    standardises, so that RLOO's KL coefficient means what beta means in (3) and (5); RLOO itself does not)."""

    def separated(prompts, completions):
        return [hf.with_separator(x, y.strip()) for x, y in zip(prompts, completions)]

    if len(reference_prompts) < 2:
        raise BadInput("rloo_reward needs at least two reference samples (their standard deviation is the scale)")
    reference = hf.rewards(rm, rm_tokenizer, reference_prompts, separated(reference_prompts, reference_completions))
    mean, std = reference.mean().item(), max(reference.std().item(), 1e-6)

    def bilevel_reward(prompts, completions, **kwargs):
        if not all(isinstance(x, str) for x in list(prompts) + list(completions)):
            raise TypeError("rloo_reward scores text prompts and completions, not conversations (messages)")
        r = hf.rewards(rm, rm_tokenizer, list(prompts), separated(prompts, completions), batch_size)
        return ((r - mean) / std).tolist()

    return bilevel_reward


# ==== The command ==============================================================================================
@dataclass
class Args:
    pairs: str = option("", "JSONL pairs with a domain: prompt, chosen, rejected, domain (required; train.py's)")
    out: str = option("", "output folder: the reward model, its tokenizer, metrics.json (required)")
    prompts: str = option("", "JSONL prompts of (5) per domain: prompt, domain (default: the pairs' own prompts)")
    policy: str = option("", "a local causal LM folder; empty: a tiny Llama on the toy vocabulary")
    reward_model: str = option("", "a local reward model folder; empty: a tiny Llama on the toy vocabulary")
    rm_lora: bool = option(False, "phi = the reward model's LoRA adapters and score head (peft), not all of it")
    rm_lora_r: int = option(8, "the reward model's LoRA rank (--rm-lora)")
    lora_r: int = option(Lora.rank, "theta: the rank of the policy's LoRA adapters")
    lora_alpha: float = option(Lora.alpha, "theta: LoRA alpha (the update is alpha / r B A)")
    lora_targets: str = option(",".join(Lora.target_modules), "theta: the policy's adapted modules, by name")
    lora_full: bool = option(False, "theta: A and B free (full LoRA), not LoRA-FA's B alone")
    outer_steps: int = option(metarm.BilevelConfig.outer_steps, "outer steps of Adam on phi")
    lr: float = option(metarm.BilevelConfig.lr, "Adam's step size on phi")
    lam: float = option(metarm.BilevelConfig.lam, "lambda, the weight of L_BT in (7)")
    beta: float = option(metarm.BilevelConfig.beta, "beta, the KL coefficient of the inner problem (5)")
    beta_dpo: float = option(metarm.BilevelConfig.beta_dpo, "beta_DPO in (7)")
    K: int = option(metarm.BilevelConfig.K, "K, candidates per prompt from pi_ref (4)(5)")
    T: int = option(metarm.BilevelConfig.T, "T, inner gradient steps (6), warm-started")
    prompts_per_domain: int = option(metarm.BilevelConfig.prompts_per_domain, "prompts of (5) per drawn domain")
    pairs_per_domain: int = option(metarm.BilevelConfig.pairs_per_domain, "pairs of (7) per drawn domain and for L_BT")
    domains_per_step: int = option(metarm.BilevelConfig.domains_per_step, "domains drawn per outer step (n of N)")
    cg_iters: int = option(metarm.BilevelConfig.cg_iters, "CG iterations of (8)")
    cg_tol: float = option(metarm.BilevelConfig.cg_tol, "CG's relative residual")
    rho_factor: float = option(metarm.BilevelConfig.rho_factor, "rho = rho-factor (-lambda_min)_+ at theta* (> 1)")
    recheck_every: int = option(1, "outer steps between the curvature checks at theta* (0: never)")
    probe_domains: int = option(4, "calibrate rho and the inner step on this many domains (the file's first)")
    max_new_tokens: int = option(metarm.BilevelConfig.max_new_tokens, "the longest candidate")
    hidden: int = option(64, "tiny Llamas: hidden size")
    layers: int = option(1, "tiny Llamas: layers")
    dtype: str = option("float32", "float32 or float64")
    seed: int = option(0, "seed of the tiny models, A, and every draw")


def check_args(a: Args):
    """Every value checked before anything is read or written; BadInput names the flag and what is allowed."""
    for name in ("pairs", "out"):
        if not getattr(a, name):
            raise BadInput(f"--{name} is required")
    counts = (
        "rm_lora_r",
        "lora_r",
        "outer_steps",
        "K",
        "T",
        "prompts_per_domain",
        "pairs_per_domain",
        "probe_domains",
    )
    small = [c for c in counts + ("domains_per_step", "cg_iters", "max_new_tokens") if getattr(a, c) < 1]
    if small or a.K < 2:
        raise BadInput(f"--{(small or ['K'])[0].replace('_', '-')} must be >= 1 (--k >= 2: (4) weighs candidates)")
    rates = {"lr": a.lr, "beta": a.beta, "beta-dpo": a.beta_dpo, "cg-tol": a.cg_tol, "lora-alpha": a.lora_alpha}
    bad = [n for n, x in rates.items() if not (math.isfinite(x) and x > 0)]
    if bad:
        raise BadInput(f"--{bad[0]} must be a finite number > 0")
    if not (math.isfinite(a.lam) and a.lam >= 0):
        raise BadInput("--lam must be a finite number >= 0")
    if not (math.isfinite(a.rho_factor) and a.rho_factor > 1):
        raise BadInput("--rho-factor must be a finite number > 1 (rho above -lambda_min)")
    if a.recheck_every < 0:
        raise BadInput("--recheck-every must be >= 0")
    if a.dtype not in ("float32", "float64"):
        raise BadInput("--dtype must be float32 or float64")
    if not (a.policy or a.reward_model) and (a.layers < 1 or a.hidden < 4 or a.hidden % 4):
        raise BadInput("--layers must be >= 1 and --hidden a multiple of 4 (the tiny Llama's 4 heads), >= 4")
    if bool(a.policy) != bool(a.reward_model):
        raise BadInput("--policy and --reward-model go together (the tiny models share the toy tokenizer)")
    if not [t for t in a.lora_targets.split(",") if t]:
        raise BadInput("--lora-targets must name at least one module")


def command(a: Args):
    check_args(a)
    out = Path(a.out).resolve()
    cli.check_out(out, "metrics.json")
    domains = read_domains(a.pairs, a.prompts)
    dtype = getattr(torch, a.dtype)
    state = processes()
    device = state.device
    torch.manual_seed(a.seed)  # a causal LM loaded as a reward model gets a fresh score head; --rm-lora's A
    if a.policy:
        lm, lm_tokenizer = load_policy(a.policy, dtype)
        rm, rm_tokenizer = load_reward_model(a.reward_model, dtype)
    else:
        lm, rm, lm_tokenizer = toy_models(a.hidden, a.layers, a.seed, dtype)
        rm_tokenizer = lm_tokenizer
        vocab = lm_tokenizer.get_vocab()
        for v in domains.values():
            hf.check_words(v["pairs"], ("prompt", "chosen", "rejected"), vocab, a.pairs)
            hf.check_words([{"prompt": x} for x in v["prompts"]], ("prompt",), vocab, a.prompts or a.pairs)
    if a.rm_lora:
        config = LoraConfig(
            r=a.rm_lora_r, lora_alpha=2 * a.rm_lora_r, target_modules="all-linear", task_type="SEQ_CLS"
        )
        rm = without_dropout(get_peft_model(rm, config))
    cfg = metarm.BilevelConfig(
        beta=a.beta,
        beta_dpo=a.beta_dpo,
        lam=a.lam,
        K=a.K,
        prompts_per_domain=a.prompts_per_domain,
        T=a.T,
        cg_iters=a.cg_iters,
        cg_tol=a.cg_tol,
        outer_steps=a.outer_steps,
        domains_per_step=a.domains_per_step,
        pairs_per_domain=a.pairs_per_domain,
        lr=a.lr,
        recalibrate_every=a.recheck_every,
        rho_factor=a.rho_factor,
        max_new_tokens=a.max_new_tokens,
    )
    lora = Lora(a.lora_r, a.lora_alpha, tuple(t for t in a.lora_targets.split(",") if t), a.seed, a.lora_full)
    lm, rm = lm.to(device), rm.to(device)
    check_setup(lm, rm, rm_tokenizer, cfg, lora, len(domains), state.num_processes)  # before anything is written
    tmp, failure = out.with_name(out.name + ".partial"), None
    if state.is_main_process:
        try:
            cli.prepare_out(out, "metrics.json")
        except BadInput as e:
            failure = e
    ready = torch.tensor(0.0 if failure else 1.0, device=device)
    if across_processes(ready, "min").item() == 0:  # every rank stops, not only the main process
        raise failure or BadInput(f"--out {out}: the main process could not prepare it")
    bar = cli.bar("outer steps", a.outer_steps, show=sys.stderr.isatty() and state.is_main_process)
    metrics = train(lm, lm_tokenizer, rm, rm_tokenizer, domains, cfg, lora, a.seed, a.probe_domains, bar)
    bar.close()
    if state.is_main_process:  # phi is the same on every rank: the main process writes it
        write_outputs(a, out, tmp, lm, rm, rm_tokenizer, domains, metrics, state.num_processes)
    state.wait_for_everyone()  # the output is in place on return, on every rank


def write_outputs(a: Args, out: Path, tmp: Path, lm, rm, rm_tokenizer, domains: dict, metrics: dict, world: int):
    """The reward model, its tokenizer and metrics.json into tmp, then tmp swapped in as out (cli.publish)."""
    rm.save_pretrained(tmp)
    rm_tokenizer.save_pretrained(tmp)
    sizes = {
        "theta": sum(
            p.numel() for n, p in lm.named_parameters() if ".lora_B." in n or (a.lora_full and ".lora_A." in n)
        )
    }
    sizes["phi"] = sum(p.numel() for p in rm.parameters() if p.requires_grad)
    header = {"config": asdict(a), "world_size": world, "sizes": sizes}
    header["domains"] = {d: len(v["pairs"]) for d, v in domains.items()}
    cli.write_json(tmp / "metrics.json", {**header, **metrics})
    cli.publish(tmp, out)
    last = metrics["log"][-1]
    print(
        f"F {metrics['log'][0]['F']:.4f} -> {last['F']:.4f}, rho {last['rho']:.3g}, one outer step "
        f"{metrics['cost']['outer_step_seconds']:.2f} s = {metrics['cost']['in_gradients']:.0f} gradients; wrote {out}"
    )


def main(argv: list) -> int:
    """`python hf_bilevel.py --flags`; a bad input is one line on stderr, exit code 2, nothing written."""
    try:
        command(
            Args(**cli.parse(Args, argv, "hf_bilevel.py: train a bilevel reward model (Jia) on Hugging Face models"))
        )
    except BadInput as e:
        print(f"hf_bilevel.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
