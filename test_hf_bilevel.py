"""Tests of hf_bilevel.py, the optional Hugging Face extra's bilevel reward model: Eqs. (4)-(8) of METHOD.md with
theta = the policy's LoRA-FA adapters.

Skipped as a whole, with the reason, when the extra is not installed (pip install -r requirements-hf.txt).
Truths, in float64 on tiny Llamas built from config (nothing is downloaded); Llama's float32 casts in RMSNorm and in
the eager softmax are patched to keep float64 (`float64_llama`), or float64 checks could not reach their tolerances:
    test_theta_exposure_b0_is_the_base_and_b_merges_by_hand    B = 0: the base model's log-probabilities exactly;
                                                               random B: those of W + (alpha/r) B A merged by hand
    test_lora_fa_targets_conv1d_and_dotted_names_and_a_bpe_tokenizer  GPT-2's Conv1D as a target; a BPE tokenizer's
                                                               completion ids == the tail of prompt + completion
    test_hvp_against_central_differences_and_symmetric         H v against differences of grad_theta g; u'Hv = v'Hu
    test_hypergradient_against_central_differences_of_F         Eq. (8) and lam L_BT against float64 differences of
                                                               F along three directions, F by a Newton-solved (6)
    test_reduction_to_the_toy                                  the toy GPT behind a thin wrapper, theta = its head:
                                                               metarm.hypergradient's and metarm.calibrate's numbers,
                                                               then two outer steps with the re-check of rho
    test_sampler_cache_seed_eos_and_distribution               cached log-probabilities == a full forward; the same
                                                               seed, the same candidates; eos kept and last; the
                                                               first token's frequencies == softmax (chi-square)
    test_two_tokenizers_each_model_reads_its_own               the reward model reads the same text in its own ids
    test_full_lora_flat_directions_indefinite_at_b0_and_the_calibrated_rho  g under (S A, B S^-1); the A-A block
                                                               at B = 0; H + rho I positive definite at theta*
Several processes: test_two_processes_match_one_process_simulating_both (accelerate launch, 2 CPU processes, against
the ranks written out by hand). The hand-over: test_rloo_reward_is_the_reward_model_scored_by_hand_and_drives_rloo
(the callable by hand; a smoke run of trl.RLOOTrainer). Refusals: test_models_unsafe_for_second_order_are_refused,
test_bad_input_is_one_line_and_writes_nothing; test_command_smoke (a smoke test, not a truth).
"""

import copy
import importlib
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import bilevel
import data
import metarm
import policy
from study import stats

REASON = "the optional Hugging Face extra is not installed: pip install -r requirements.txt -r requirements-hf.txt"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
transformers = pytest.importorskip("transformers", reason=REASON)
pytest.importorskip("peft", reason=REASON)
pytest.importorskip("trl", reason=REASON)
hf = importlib.import_module("hf")
hfb = importlib.import_module("hf_bilevel")
llama = importlib.import_module("transformers.models.llama.modeling_llama")
BadInput = hfb.BadInput


# ---- float64 Llamas ------------------------------------------------------------------------------------------
def rms_norm_float64(self, hidden_states):
    """LlamaRMSNorm.forward without its cast to float32."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def eager_attention_float64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """modeling_llama.eager_attention_forward with its softmax in the inputs' dtype (no float32 cast)."""
    key = llama.repeat_kv(key, module.num_key_value_groups)
    value = llama.repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@pytest.fixture(autouse=True)
def float64_llama(monkeypatch):
    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", rms_norm_float64)
    monkeypatch.setattr(llama, "eager_attention_forward", eager_attention_float64)


@pytest.fixture(scope="module")
def world():
    return hfb.toy_world()


@pytest.fixture(scope="module")
def tokenizer(world):
    return hfb.toy_tokenizer()


def pair_records(world, domains=("taxi", "pizzeria"), n=6) -> dict:
    """read_domains's dict for n labelled pairs of each domain, as train.py writes them."""
    out = {}
    for d in domains:
        pairs = []
        for p in world.pairs[d][:n]:
            x = world.decode(p.prompt)
            pairs.append(
                {"prompt": x, "chosen": " " + world.decode(p.chosen), "rejected": " " + world.decode(p.rejected)}
            )
        out[d] = {"pairs": pairs, "prompts": list(dict.fromkeys(p["prompt"] for p in pairs))}
    return out


TINY = metarm.BilevelConfig(K=3, prompts_per_domain=2, pairs_per_domain=4, T=5, max_new_tokens=4, lam=0.3)


def tiny_setup(world, tokenizer, rank=2, seed=0, full=False):
    """(policy with LoRA-FA -- full LoRA with full --, theta_ref, reward model, one domain's problem, the encoder):
    16-wide one-layer float64 Llamas."""
    lm, rm, _ = hfb.toy_models(16, 1, seed, torch.float64)
    lm, theta_ref = hfb.with_lora(lm, hfb.Lora(rank=rank, alpha=2.0 * rank, seed=seed, full=full))
    encoder = hfb.Encoder(lm, tokenizer, rm, tokenizer, pair_records(world), theta_ref)
    prob = encoder.problem("taxi", TINY, policy.generator(seed))
    return lm, theta_ref, rm, prob, encoder


@torch.no_grad()
def shift(params: dict, u: dict, eps: float):
    """params += eps u, in place."""
    for n, p in params.items():
        p.add_(eps * u[n])


def random_like(params: dict, seed: int, scale: float = 1.0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}


# ---- truths --------------------------------------------------------------------------------------------------
def test_theta_exposure_b0_is_the_base_and_b_merges_by_hand(world, tokenizer):
    """theta = the adapters' B: at B = 0 the policy's log-probabilities are the base model's, bit for bit; at a
    random B they are those of the base model with W + (alpha / r) B A written into its weights by hand; A is the
    same for the same seed, another for another."""
    lm, _, _ = hfb.toy_models(16, 1, 0, torch.float64)
    base = copy.deepcopy(lm)
    lora = hfb.Lora(rank=2, alpha=3.0, target_modules=("q_proj", "v_proj"), seed=0)
    lm, theta_ref = hfb.with_lora(lm, lora)
    pairs = pair_records(world)["taxi"]["pairs"]
    prompts = [tokenizer(text=p["prompt"])["input_ids"] for p in pairs]
    responses = [hfb.response_ids(tokenizer, x, p["prompt"], p["chosen"]) for x, p in zip(prompts, pairs)]
    batch = hfb.policy_batch(lm, prompts, responses, 0, theta_ref)
    plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(
        hfb.logprob(lm, theta_ref, batch), policy.sequence_logprob(plain, batch["input_ids"], batch["mask"])
    )

    theta = random_like(theta_ref, 1)
    merged = copy.deepcopy(base)
    weights = dict(lm.named_parameters())
    with torch.no_grad():
        for name, B in theta.items():
            module = name.removeprefix("base_model.model.").removesuffix(".lora_B.default.weight")
            A = weights[name.replace(".lora_B.", ".lora_A.")]
            merged.get_parameter(module + ".weight").add_((lora.alpha / lora.rank) * B @ A)
    logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = policy.sequence_logprob(logits, batch["input_ids"], batch["mask"])
    torch.testing.assert_close(hfb.logprob(lm, theta, batch), expected, rtol=1e-12, atol=1e-12)
    assert len(theta) == 2 and (hfb.logprob(lm, theta, batch) - expected).abs().max() < 1e-12
    assert not torch.allclose(expected, hfb.logprob(lm, theta_ref, batch))  # B moves the policy
    again, _ = hfb.with_lora(hfb.toy_models(16, 1, 0, torch.float64)[0], lora)  # A is drawn from the seed
    other, _ = hfb.with_lora(hfb.toy_models(16, 1, 0, torch.float64)[0], hfb.Lora(2, 3.0, seed=1))
    for name, A in weights.items():
        if ".lora_A." in name:
            assert torch.equal(again.get_parameter(name), A) and not torch.equal(other.get_parameter(name), A)


def test_lora_fa_targets_conv1d_and_dotted_names_and_a_bpe_tokenizer(world):
    """LoRA-FA on a GPT-2-style policy, whose attention is transformers' Conv1D, named by a dotted tail as peft
    matches it: theta holds that layer's B and moves the policy. A legacy SentencePiece-style BPE tokenizer (trained
    here on the toy's text): a labelled completion's ids are the tail of prompt + completion tokenised together,
    then eos -- not the completion tokenised alone, which would start with an extra "▁"."""
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=4, n_positions=32)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    lm, theta_ref = hfb.with_lora(
        transformers.GPT2LMHeadModel(config).double().eval(), hfb.Lora(2, 4.0, ("attn.c_attn",))
    )
    assert [n.split(".lora_B")[0] for n in theta_ref] == ["base_model.model.transformer.h.0.attn.c_attn"]
    batch = hfb.policy_batch(lm, [[1, 2, 3]], [[4, 5, 6]], 0, theta_ref)
    assert (hfb.logprob(lm, random_like(theta_ref, 1), batch) - batch["logp_ref"]).abs().item() > 1e-6

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    pairs = pair_records(world, n=40)["taxi"]["pairs"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))  # the legacy Llama-2 way: "▁" prepended, spaces to "▁"
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    corpus = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    bpe = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    alone = 0
    for p in pairs[:10]:
        prompt_ids = bpe(text=p["prompt"])["input_ids"]
        ids = hfb.response_ids(bpe, prompt_ids, p["prompt"], p["chosen"])
        assert (
            prompt_ids + ids[:-1] == bpe(text=p["prompt"] + p["chosen"])["input_ids"] and ids[-1] == bpe.eos_token_id
        )
        alone += ids[:-1] != bpe(text=p["chosen"], add_special_tokens=False)["input_ids"]
    assert alone == 10  # tokenised alone, each completion would start with a "▁" that pi_ref never reads there


def test_hvp_against_central_differences_and_symmetric(world, tokenizer):
    """H v of g (Eq. (5)) by double backward == (grad g(theta + eps v) - grad g(theta - eps v)) / 2 eps in float64,
    and u'Hv = v'Hu, at a random theta with random rewards."""
    lm, theta_ref, _, prob, _ = tiny_setup(world, tokenizer)
    cfg = metarm.BilevelConfig(**{**TINY.__dict__, "rho": 0.1})
    g, _ = hfb.level_functions(lm, prob, cfg, theta_ref)
    r = {
        "r": torch.randn(
            TINY.prompts_per_domain, TINY.K, generator=torch.Generator().manual_seed(2), dtype=torch.float64
        )
    }
    theta, v, u = random_like(theta_ref, 3, 0.3), random_like(theta_ref, 4), random_like(theta_ref, 5)

    def grad_at(t):
        leaves = {n: x.detach().requires_grad_(True) for n, x in t.items()}
        return dict(zip(leaves, torch.autograd.grad(g(leaves, r), list(leaves.values()))))

    Hv = bilevel.hvp(lambda th: g(th, r), theta, v)
    eps = 1e-5
    plus, minus = grad_at(bilevel.add(theta, v, eps)), grad_at(bilevel.add(theta, v, -eps))
    for n in theta:
        torch.testing.assert_close(Hv[n], (plus[n] - minus[n]) / (2 * eps), rtol=1e-6, atol=1e-9)
    Hu = bilevel.hvp(lambda th: g(th, r), theta, u)
    assert abs(bilevel.dot(u, Hv).item() - bilevel.dot(v, Hu).item()) < 1e-12 * bilevel.norm(Hv) * bilevel.norm(u)


@pytest.mark.parametrize("full", [False, True], ids=["lora_fa", "full_lora"])
def test_hypergradient_against_central_differences_of_F(world, tokenizer, full):
    """grad_phi F (Eqs. (7)(8): hf_bilevel.outer_gradient, CG to 1e-12 at a Newton-solved theta*) along three
    random unit directions u of phi (every reward-model parameter) == (F(phi + eps u) - F(phi - eps u)) / 2 eps,
    each F = (N/n) L_DPO(theta*(phi)) + lam L_BT(phi), one drawn domain of N = 2, with theta*(phi) solved by Newton
    (bilevel.newton_solve) to 1e-12; theta = LoRA-FA's B's, and full LoRA's A's and B's."""
    lm, theta_ref, rm, prob, encoder = tiny_setup(world, tokenizer, rank=1, full=full)
    # rho = 2, well above -lambda_min (about 0.4 here), so that pure Newton converges from theta_ref
    cfg = metarm.BilevelConfig(**{**TINY.__dict__, "rho": 2.0, "inner_lr": 0.3, "cg_iters": 200, "cg_tol": 1e-12})
    lam_pairs = encoder.lam_pairs(cfg, policy.generator(7))
    g, f = hfb.level_functions(lm, prob, cfg, theta_ref)
    phi = {n: p for n, p in rm.named_parameters()}

    def solve():
        r = hfb.candidate_rewards(rm, prob, cfg.K).detach()
        return bilevel.newton_solve(g, theta_ref, {"r": r}, tol=1e-12)[0], r

    def F():
        with torch.no_grad():
            bt = metarm.bt_loss(hfb.reward(rm, lam_pairs[0]), hfb.reward(rm, lam_pairs[1]))[0]
        theta_star, r = solve()
        return 2 * f(theta_star, {"r": r}).item() + cfg.lam * bt.item()

    warm = {"taxi": solve()[0]}
    # the drawn domain stands for N = 2: (7)'s DPO term counts twice
    grads, F0, _ = hfb.outer_gradient(lm, rm, phi, {"taxi": prob}, lam_pairs, cfg, theta_ref, 2, warm)
    assert abs(F0 - F()) < 1e-10
    eps = 1e-5
    for seed in (11, 12, 13):
        u = random_like(phi, seed)
        u = bilevel.scale(1 / bilevel.norm(u), u)  # a unit direction
        shift(phi, u, eps)
        F_plus = F()  # outside no_grad: the Newton solve differentiates g
        shift(phi, u, -2 * eps)
        F_minus = F()
        shift(phi, u, eps)
        fd = (F_plus - F_minus) / (2 * eps)
        analytic = sum((gr * u[n]).sum().item() for gr, n in zip(grads, phi))
        assert abs(analytic - fd) <= 1e-6 * abs(fd), (analytic, fd)  # measured: about 3e-8


def explicit_hessian(g, theta: dict, outer: dict):
    """The Hessian of g(., outer) at theta as a matrix, one HVP per column (parameters flattened in theta's order)."""
    sizes = [p.numel() for p in theta.values()]
    columns = []
    for j in range(sum(sizes)):
        e = torch.zeros(sum(sizes), dtype=torch.float64)
        e[j] = 1.0
        v = dict(zip(theta, (x.view_as(p) for x, p in zip(e.split(sizes), theta.values()))))
        columns.append(torch.cat([h.flatten() for h in bilevel.hvp(lambda th: g(th, outer), theta, v).values()]))
    H = torch.stack(columns, 1)
    return (H + H.T) / 2


def test_full_lora_flat_directions_indefinite_at_b0_and_the_calibrated_rho(world, tokenizer):
    """Full LoRA (A and B free), the inner objective of (5) without rho: unchanged under A -> S A, B -> B S^-1 at
    a random point (1e-12); at B = 0 the A-A block of its Hessian is zero (an HVP along A's has no A part) while the
    A-B block is not, and the Hessian written out column by column is indefinite; with calibrate's rho, H + rho I
    at calibrate's theta* is positive definite (eigvalsh of the explicit matrix, not Lanczos). Without the re-check
    of rho, full LoRA is refused."""
    lm, theta_ref, rm, prob, _ = tiny_setup(world, tokenizer, rank=2, full=True)
    g0, _ = hfb.level_functions(lm, prob, replace(TINY, rho=0.0), theta_ref)
    r = {"r": hfb.candidate_rewards(rm, prob, TINY.K).detach()}
    theta = bilevel.add(theta_ref, random_like(theta_ref, 3), 0.3)
    S = torch.randn(2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 2 * torch.eye(2)
    moved = {n: S @ t if ".lora_A." in n else t @ torch.linalg.inv(S) for n, t in theta.items()}
    assert abs(g0(moved, r).item() - g0(theta, r).item()) < 1e-12
    along_a = {n: torch.randn_like(t) if ".lora_A." in n else torch.zeros_like(t) for n, t in theta_ref.items()}
    Hv = bilevel.hvp(lambda th: g0(th, r), theta_ref, along_a)
    assert max(Hv[n].abs().max().item() for n in Hv if ".lora_A." in n) < 1e-12
    assert max(Hv[n].abs().max().item() for n in Hv if ".lora_B." in n) > 1e-6
    eigenvalues = torch.linalg.eigvalsh(explicit_hessian(g0, theta_ref, r))
    assert eigenvalues[0] < -1e-6 and eigenvalues[-1] > 1e-6  # indefinite at B = 0

    cfg = replace(TINY)
    hfb.calibrate(lm, rm, {"taxi": prob}, cfg, theta_ref)
    g, _ = hfb.level_functions(lm, prob, cfg, theta_ref)
    theta_star, _ = bilevel.inner_solve(g, theta_ref, r, 4 * cfg.T, cfg.inner_lr)  # calibrate's last theta*
    assert torch.linalg.eigvalsh(explicit_hessian(g0, theta_star, r))[0] + cfg.rho > 0
    with pytest.raises(BadInput, match="full LoRA needs rho re-checked"):
        hfb.check_setup(
            hfb.toy_models(16, 1, 0, torch.float64)[0],
            rm,
            tokenizer,
            replace(TINY, recalibrate_every=0),
            hfb.Lora(full=True),
            2,
        )


class ToyPolicy(nn.Module):
    """The toy GPT as a Hugging Face causal LM would be called: forward(input_ids, ...) -> an object with logits."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.gpt(input_ids)[0])


class ToyRewardModel(nn.Module):
    """The toy reward model as a sequence classifier would be called. The toy RM sums over the response tokens,
    which a classifier does not know: the batch's attention_mask carries the response mask here."""

    def __init__(self, gpt, rm):
        super().__init__()
        self.gpt, self.rm = gpt, rm

    def forward(self, input_ids, attention_mask, use_cache=False):
        return SimpleNamespace(logits=self.rm(self.gpt.features(input_ids)[1], attention_mask)[:, None])


def test_reduction_to_the_toy(world):
    """The toy GPT behind ToyPolicy with theta = its head, the toy reward model behind ToyRewardModel: hf_bilevel's
    hypergradient (dF/dr, r, theta*, F) and calibrate (rho, the inner step, lambda_min, lambda_max) give
    metarm.hypergradient's and metarm.calibrate's numbers to 1e-12 on the toy's own problem; then two outer steps
    as metarm.train_bilevel takes them (outer_gradient with warm starts and lam L_BT, Adam, the re-check that
    raises rho) give the same F, gradients, rho, inner step and warm starts (1e-10)."""
    torch.manual_seed(0)
    gpt = policy.GPT(policy.GPTConfig(vocab_size=len(world.vocab), n_embd=32)).double().eval().requires_grad_(False)
    rm, phi = policy.make_reward_model(gpt, policy.generator(1))
    d = data.TRAIN_DOMAINS[0]
    prompts = torch.tensor(world.prompts[d])
    cfg = metarm.BilevelConfig(K=3, prompts_per_domain=2, pairs_per_domain=4, T=5, max_new_tokens=4)
    toy = metarm.draw_problem(gpt, prompts, policy.encode_pairs(gpt, world.pairs[d][:8]), cfg, policy.generator(2))
    toy["cand"] = policy.encode(gpt, toy["cand"]["idx"], toy["cand"]["mask"])  # features by a full forward
    theta_ref = policy.adapted_params(gpt, "head")

    wrapped_rm = ToyRewardModel(gpt, copy.deepcopy(rm))
    with torch.no_grad():
        for n, p in phi.items():
            wrapped_rm.rm.get_parameter(n).copy_(p)
    wrapped_rm.rm.requires_grad_(True)

    def as_hf(batch):
        return {
            "input_ids": batch["idx"],
            "attention_mask": batch["mask"],
            "mask": batch["mask"],
            "logp_ref": batch["logp_ref"],
        }

    prob = {"cand": as_hf(toy["cand"]), "chosen": as_hf(toy["chosen"]), "rejected": as_hf(toy["rejected"])}
    prob["cand_rm"] = {"input_ids": toy["cand"]["idx"], "attention_mask": toy["cand"]["mask"]}
    hf_theta_ref = {"gpt." + n: p.detach() for n, p in theta_ref.items()}

    toy_cfg, hf_cfg = copy.copy(cfg), copy.copy(cfg)
    expected = metarm.calibrate(gpt, rm, phi, {d: toy}, toy_cfg, theta_ref)
    got = hfb.calibrate(ToyPolicy(gpt), wrapped_rm, {d: prob}, hf_cfg, hf_theta_ref)
    for key in ("lambda_min", "lambda_max", "rho", "inner_lr"):
        assert abs(got[key] - expected[key]) <= 1e-12 * max(1.0, abs(expected[key])), key

    dF_dr, r, info = metarm.hypergradient(gpt, rm, phi, toy, toy_cfg, theta_ref)
    hf_dF_dr, hf_r, hf_info = hfb.hypergradient(ToyPolicy(gpt), wrapped_rm, prob, hf_cfg, hf_theta_ref)
    torch.testing.assert_close(hf_r, r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hf_dF_dr, dF_dr, rtol=1e-12, atol=1e-12)
    assert abs(hf_info["F"] - info["F"]) < 1e-12
    for n, t in info["theta"].items():
        torch.testing.assert_close(hf_info["theta"]["gpt." + n], t, rtol=1e-12, atol=1e-12)
    toy_phi_grad = torch.autograd.grad((r * dF_dr).sum(), list(phi.values()))
    hf_phi = {n: wrapped_rm.rm.get_parameter(n) for n in phi}
    for a, b in zip(torch.autograd.grad((hf_r * hf_dF_dr).sum(), list(hf_phi.values())), toy_phi_grad):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # two outer steps as metarm.train_bilevel takes them: (7)(8) with warm starts and lam L_BT, Adam, the re-check
    # of rho -- started from a rho too small, so that the re-check raises it
    toy_cfg.rho = hf_cfg.rho = 1e-3
    toy_opt, hf_opt = torch.optim.Adam(phi.values(), lr=0.01), torch.optim.Adam(hf_phi.values(), lr=0.01)
    lam_toy = (toy["chosen"], toy["rejected"])
    lam_hf = tuple({"input_ids": b["idx"], "attention_mask": b["mask"]} for b in lam_toy)
    toy_warm, hf_warm = {}, {}
    for _ in range(2):
        g_toy, F_toy, _ = metarm.outer_gradient(gpt, rm, phi, {d: toy}, lam_toy, toy_cfg, theta_ref, 3, toy_warm)
        g_hf, F_hf, _ = hfb.outer_gradient(
            ToyPolicy(gpt), wrapped_rm, hf_phi, {d: prob}, lam_hf, hf_cfg, hf_theta_ref, 3, hf_warm
        )
        assert abs(F_hf - F_toy) <= 1e-12 * abs(F_toy)
        for a, b in zip(g_hf, g_toy):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        policy.apply_gradient(toy_opt, phi, g_toy)
        policy.apply_gradient(hf_opt, hf_phi, g_hf)
        margin = metarm.recheck_rho(gpt, rm, phi, {d: toy}, toy_warm, toy_cfg, theta_ref)
        curvature = hfb.recheck(ToyPolicy(gpt), wrapped_rm, {d: prob}, hf_warm, hf_cfg, hf_theta_ref)
        assert abs(curvature["lambda_min"] + hf_cfg.rho - margin) <= 1e-10 * abs(margin)
        assert hf_cfg.rho == pytest.approx(toy_cfg.rho, rel=1e-10) and hf_cfg.rho > 1e-3  # raised, alike
        assert hf_cfg.inner_lr == pytest.approx(toy_cfg.inner_lr, rel=1e-10)
    for n, t in toy_warm[d].items():
        torch.testing.assert_close(hf_warm[d]["gpt." + n], t, rtol=1e-10, atol=1e-12)


def tiny_llama(vocab_size: int):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, attn_implementation="eager",
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_config(config).double().eval()


def test_sampler_cache_seed_eos_and_distribution():
    """On a tiny Llama over 5 tokens (eos = 1, so that responses stop): the log-probabilities summed from the
    sampler's cached logits == a full forward of prompt + response (1e-12); the same seed gives the same
    candidates, another seed others; each response keeps its eos as its last token and has no other, and with two
    stop ids it stops at the first of either; over 64 tokens the first token's frequencies in 20,000 draws match
    the model's softmax (temperature 1, no top-k or top-p: a top-k of 50 would leave 14 tokens empty; chi-square)."""
    lm = tiny_llama(5)
    prompts = [[0, 2, 3], [4, 2]]
    responses, logps = hfb.sample(lm, prompts, 6, 8, 1, policy.generator(0))
    assert responses == hfb.sample(lm, prompts, 6, 8, 1, policy.generator(0))[0]
    assert responses != hfb.sample(lm, prompts, 6, 8, 1, policy.generator(1))[0]
    assert all(1 <= len(y) <= 8 and 1 not in y[:-1] for y in responses)
    assert any(y[-1] == 1 and len(y) < 8 for y in responses) and any(1 not in y for y in responses)
    repeated = [x for x in prompts for _ in range(6)]
    batch = hfb.policy_batch(lm, repeated, responses, 0, {})
    torch.testing.assert_close(logps, batch["logp_ref"], rtol=1e-12, atol=1e-12)
    two_stops, logps = hfb.sample(lm, prompts, 6, 8, {1, 3}, policy.generator(0))
    assert all(not {1, 3} & set(y[:-1]) for y in two_stops) and any(y[-1] == 3 for y in two_stops)
    batch = hfb.policy_batch(lm, repeated, two_stops, 0, {})  # nothing sampled after a stop counts
    torch.testing.assert_close(logps, batch["logp_ref"], rtol=1e-12, atol=1e-12)

    n, lm = 20000, tiny_llama(64)
    first, _ = hfb.sample(lm, [prompts[0]], n, 1, 1, policy.generator(3))
    counts = torch.bincount(torch.tensor([y[0] for y in first]), minlength=64).double()
    probs = torch.softmax(lm(input_ids=torch.tensor([prompts[0]])).logits[0, -1], -1).detach()
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum().item()
    assert stats.chi2_sf(chi2, 63) > 0.001, (chi2, counts / n, probs)


def test_two_tokenizers_each_model_reads_its_own(world, tokenizer):
    """A reward model with its own tokenizer (the toy vocabulary in reverse order): the candidates and the lam
    pairs reach it as its own tokenizer's ids of the same text the policy's ids spell (prompt + response + eos)."""
    vocab = {w: i for i, w in enumerate(reversed(world.vocab + [hf.UNK]))}
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab, unk_token=hf.UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rm_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=data.BOS, eos_token=data.EOS, pad_token=data.PAD, unk_token=hf.UNK
    )
    lm, rm, _ = hfb.toy_models(16, 1, 0, torch.float64)
    rm.config.pad_token_id = rm_tokenizer.pad_token_id
    lm, theta_ref = hfb.with_lora(lm, hfb.Lora(rank=2, seed=0))
    encoder = hfb.Encoder(lm, tokenizer, rm, rm_tokenizer, pair_records(world), theta_ref)
    prob = encoder.problem("taxi", TINY, policy.generator(0))
    specials = set(tokenizer.all_special_tokens) - {data.EOS}
    for i, (ids, attention) in enumerate(zip(prob["cand"]["input_ids"], prob["cand"]["attention_mask"])):
        words = tokenizer.convert_ids_to_tokens(ids[attention.bool()].tolist())
        prompt_len = int((attention - prob["cand"]["mask"][i]).sum())
        response = [w for w in words[prompt_len:] if w not in specials]
        expected = words[:prompt_len] + response + ([] if response[-1:] == [data.EOS] else [data.EOS])
        rm_ids = prob["cand_rm"]["input_ids"][i][prob["cand_rm"]["attention_mask"][i].bool()].tolist()
        assert rm_tokenizer.convert_ids_to_tokens(rm_ids) == expected
        assert rm_ids != ids[attention.bool()].tolist()
    chosen, _ = encoder.lam_pairs(TINY, policy.generator(1))
    for ids, attention in zip(chosen["input_ids"], chosen["attention_mask"]):
        assert ids[attention.bool()].tolist()[-1] == rm_tokenizer.eos_token_id


# ---- refusals and the command ---------------------------------------------------------------------------------
def test_models_unsafe_for_second_order_are_refused(world, tokenizer):
    """A policy or reward model with fused (sdpa) attention, activation checkpointing or dropout, and a policy in
    half precision, are refused by train in one BadInput line before anything runs; a LoRA target that names no
    linear layer too. The reward model gets the same checks, but a bfloat16 one passes (the policy's HVPs and CG
    need float32 or float64; the reward model is differentiated once)."""
    domains = pair_records(world)

    def tiny(**config):
        torch.manual_seed(0)
        c = hf.toy_llama_config(tokenizer, 16, 1)
        for key, value in config.items():
            setattr(c, key, value)
        return transformers.AutoModelForCausalLM.from_config(c).eval()

    checkpointed = tiny()
    checkpointed.gradient_checkpointing_enable()
    _, rm, _ = hfb.toy_models(16, 1, 0, torch.float32)
    cases = [
        ("attention implementation 'sdpa'", transformers.AutoModelForCausalLM.from_config(
            hf.toy_llama_config(tokenizer, 16, 1), attn_implementation="sdpa")),
        ("activation checkpointing", checkpointed),
        ("dropout is on", tiny(attention_dropout=0.1)),
        ("bfloat16 weights", tiny().to(torch.bfloat16)),
    ]  # fmt: skip
    for message, model in cases:
        with pytest.raises(BadInput, match=message):
            hfb.train(model, tokenizer, rm, tokenizer, domains, TINY)
        if message != "bfloat16 weights":  # the reward model gets the same checks but precision's
            with pytest.raises(BadInput, match=message):
                hfb.check_second_order(model, "the reward model", is_policy=False)
    hfb.check_second_order(cases[-1][1], "the reward model", is_policy=False)
    with_module = tiny()
    with_module.model.extra_dropout = nn.Dropout(0.1)  # a dropout module, not the config's attention dropout
    with pytest.raises(BadInput, match="dropout is on"):
        hfb.check_second_order(with_module, "the policy", is_policy=True)
    _, other_pad, _ = hfb.toy_models(16, 1, 0, torch.float32)
    other_pad.config.pad_token_id = tokenizer.eos_token_id
    with pytest.raises(BadInput, match="is not its tokenizer's pad id"):
        hfb.train(tiny(), tokenizer, other_pad, tokenizer, domains, TINY)
    with pytest.raises(BadInput, match="K >= 2"):
        hfb.train(tiny(), tokenizer, rm, tokenizer, domains, metarm.BilevelConfig(K=1))
    wrapped, _ = hfb.with_lora(tiny(), hfb.Lora(rank=2))
    with pytest.raises(BadInput, match="already has adapters"):
        hfb.train(wrapped, tokenizer, rm, tokenizer, domains, TINY)
    with pytest.raises(BadInput, match="no linear layer of the policy has that name"):
        hfb.with_lora(tiny(), hfb.Lora(target_modules=("q_proj", "attention")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_main(argv: str, capsys):
    """hf_bilevel.main on a command line (split on spaces): (exit code, stdout, stderr)."""
    code = hfb.main(argv.split())
    out, err = capsys.readouterr()
    return code, out, err


TINY_COMMAND = "--outer-steps 2 --K 2 --prompts-per-domain 1 --pairs-per-domain 2 --T 2 --max-new-tokens 3 --hidden 8"


@pytest.fixture(scope="module")
def pairs_file(world, tmp_path_factory):
    """6 labelled pairs of each of two domains as train.py writes them (data.save_pairs_jsonl, with the domain)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    data.save_pairs_jsonl(world, [p for d in ("taxi", "pizzeria") for p in world.pairs[d][:6]], path)
    return path


def test_command_smoke(pairs_file, tmp_path, capsys):
    """Smoke test, not a truth: two outer steps on tiny Llamas write a reward model that loads again, its tokenizer
    and metrics.json with every outer step's F, |grad F|, rho, lambda_min, lambda_max, HVPs and CG residuals, and
    the step's cost; --rm-lora writes an adapter."""
    code, out, err = run_main(f"--pairs {pairs_file} --out {tmp_path}/rm {TINY_COMMAND}", capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert [e["step"] for e in metrics["log"]] == [0, 1] and metrics["domains"] == {"taxi": 6, "pizzeria": 6}
    for e in metrics["log"]:
        assert all(math.isfinite(e[k]) for k in ("F", "grad_norm", "rho", "lambda_min", "lambda_max"))
        assert e["hvps"] > 0 and set(e["cg_residual"]) <= {"taxi", "pizzeria"}
    assert metrics["cost"]["in_forwards"] > 1 and metrics["cost"]["in_gradients"] > 1
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert rm.config.num_labels == 1 and (tmp_path / "rm" / "tokenizer.json").is_file()
    code, _, err = run_main(f"--pairs {pairs_file} --out {tmp_path}/lora {TINY_COMMAND} --rm-lora", capsys)
    assert code == 0, err
    assert (tmp_path / "lora" / "adapter_config.json").is_file()


def test_bad_input_is_one_line_and_writes_nothing(pairs_file, tmp_path, capsys, monkeypatch):
    """Pairs without a domain, an empty domain, a prompts file whose domain has no pairs, a missing or malformed
    file, an unknown word, values out of range, a folder that is not a model, more domains per step over two
    processes than there are: each is one
    'hf_bilevel.py: error:' line, exit code 2; an earlier run survives and nothing else is written."""
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "metrics.json").write_text("{}")
    x = "<bos> <taxi> honestly the driver was"
    record = {"prompt": x, "chosen": " great . <eos>", "rejected": " awful . <eos>"}
    (tmp_path / "no_domain.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "empty.jsonl").write_text(json.dumps({**record, "domain": " "}) + "\n")
    (tmp_path / "unknown.jsonl").write_text(json.dumps({**record, "chosen": "yummy", "domain": "taxi"}) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": x, "domain": "bakery"}) + "\n")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x", "domain": \n')
    good = f"--pairs {pairs_file} --out {tmp_path}/earlier"
    cases = [
        ("missing or mistyped fields ['domain']", f"{good} --pairs {tmp_path}/no_domain.jsonl"),
        ("has an empty domain", f"{good} --pairs {tmp_path}/empty.jsonl"),
        ("domain 'bakery' has no pairs", f"{good} --prompts {tmp_path}/prompts.jsonl"),
        ("cannot be read", f"{good} --pairs {tmp_path}/missing.jsonl"),
        ("not JSON", f"{good} --prompts {tmp_path}/broken.jsonl"),
        ("not in the toy world's vocabulary", f"{good} --pairs {tmp_path}/unknown.jsonl --domains-per-step 1"),
        ("1 process(es) x 3 domains per step > the 2 domains", f"{good} --domains-per-step 3"),
        ("--K must be >= 1", f"{good} --K 1"),
        ("--rho-factor must be a finite number > 1", f"{good} --rho-factor 1"),
        ("--lam must be a finite number >= 0", f"{good} --lam nan"),
        ("--dtype must be float32 or float64", f"{good} --dtype float16"),
        ("go together", f"{good} --policy {tmp_path}"),
        ("not a local model folder", f"{good} --policy {tmp_path} --reward-model {tmp_path}"),
        ("no linear layer of the policy has that name", f"{good} --lora-targets q_proj,attn"),
        ("--out is required", f"--pairs {pairs_file}"),
    ]
    for message, command in cases:
        code, out, err = run_main(command, capsys)
        assert code == 2 and err.startswith("hf_bilevel.py: error: ") and err.count("\n") == 1, (message, err)
        assert message in err, (message, err)
    monkeypatch.setattr(hfb, "processes", lambda: SimpleNamespace(num_processes=2, device=torch.device("cpu")))
    code, _, err = run_main(f"--pairs {pairs_file} --out {tmp_path}/two {TINY_COMMAND}", capsys)  # 2 x 2 domains
    assert code == 2 and "2 process(es) x 2 domains per step > the 2 domains" in err and err.count("\n") == 1
    assert (tmp_path / "earlier" / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["earlier"]  # no out, no out.partial


def test_rloo_reward_is_the_reward_model_scored_by_hand_and_drives_rloo(world, tokenizer, tmp_path):
    """The meta-test's reward for TRL's RLOOTrainer: the callable's value == r_phi of prompt + " " + completion + eos
    run one sequence at a time (no padding), minus the mean over pi_ref's reference samples scored the same way, over
    their standard deviation (1e-5: hf.rewards returns float32). Then a smoke run, not a truth: two steps of
    trl.RLOOTrainer on a tiny saved policy with the callable as its reward log a finite reward."""
    trl = pytest.importorskip("trl", reason=REASON)
    datasets = pytest.importorskip("datasets", reason=REASON)
    lm, rm, _ = hfb.toy_models(16, 1, 0, torch.float64)
    pairs = pair_records(world)["taxi"]["pairs"]
    prompts = [p["prompt"] for p in pairs]
    ref_prompts, ref_completions = hfb.reference_samples(lm, tokenizer, prompts[:3], 2, 5)
    reward = hfb.rloo_reward(rm, tokenizer, ref_prompts, ref_completions)
    with pytest.raises(BadInput, match="at least two reference samples"):
        hfb.rloo_reward(rm, tokenizer, ref_prompts[:1], ref_completions[:1])
    with pytest.raises(TypeError, match="not conversations"):
        reward(prompts=[[{"role": "user", "content": "hi"}]], completions=[[{"role": "assistant", "content": "yo"}]])

    def by_hand(x, y):
        ids = tokenizer(text=x + " " + y)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            return rm(input_ids=torch.tensor([ids])).logits[0, 0].item()

    reference = torch.tensor([by_hand(x, y) for x, y in zip(ref_prompts, ref_completions)], dtype=torch.float64)
    completions = [p["chosen"].replace(data.EOS, "").strip() for p in pairs]  # as RLOO decodes them: no eos
    expected = [
        (by_hand(x, y) - reference.mean().item()) / reference.std().item() for x, y in zip(prompts, completions)
    ]
    torch.testing.assert_close(
        torch.tensor(reward(prompts=prompts, completions=completions)), torch.tensor(expected), rtol=1e-5, atol=1e-5
    )

    policy_dir = tmp_path / "policy"
    lm.float().save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    args = trl.RLOOConfig(
        output_dir=str(tmp_path / "rloo"), num_generations=2, max_steps=2, per_device_train_batch_size=4,
        max_completion_length=6, use_cpu=True, report_to="none", bf16=False, logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    dataset = datasets.Dataset.from_list([{"prompt": x} for x in prompts])
    trainer = trl.RLOOTrainer(
        model=str(policy_dir), reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    logged = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    assert len(logged) == 2 and all(math.isfinite(x) for x in logged)


MULTI = metarm.BilevelConfig(
    K=2,
    prompts_per_domain=1,
    pairs_per_domain=2,
    T=3,
    max_new_tokens=3,
    outer_steps=3,
    domains_per_step=1,
    lam=0.3,
    recalibrate_every=1,
)
MULTI_DOMAINS = ("taxi", "pizzeria", "tablet", "yoga")
MULTI_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import torch, test_hf_bilevel as t
from accelerate import PartialState
torch.set_num_threads(1)
t.llama.LlamaRMSNorm.forward = t.rms_norm_float64
t.llama.eager_attention_forward = t.eager_attention_float64
lm, rm, tokenizer = t.hfb.toy_models(16, 1, 0, torch.float64)
domains = t.pair_records(t.hfb.toy_world(), t.MULTI_DOMAINS)
metrics = t.hfb.train(lm, tokenizer, rm, tokenizer, domains, t.MULTI, t.hfb.Lora(2, 4.0), 0, 2)
state = PartialState()
phi = {{n: p.detach().clone() for n, p in rm.named_parameters()}}
saved = {{"phi": phi, "log": metrics["log"], "world": state.num_processes}}
torch.save(saved, {out!r} + f"/rank{{state.process_index}}.pt")
command = f"--pairs {pairs} --out {out}/command {{t.TINY_COMMAND}} --domains-per-step 1 --dtype float64"
assert t.hfb.main(command.split()) == 0  # the command: the main process writes
"""


def test_two_processes_match_one_process_simulating_both(world, tokenizer, tmp_path, pairs_file):
    """accelerate launch --multi_gpu --num_processes 2 with no GPU visible (gloo on CPU), three outer steps, one
    domain per rank and step: the ranks draw different domains (the same draws on both), rho and the inner step are
    equal on both (the re-check raises rho from the ranks' joint lambda_min), phi ends bitwise equal across the ranks,
    and equal (1e-12, float64) to one process that takes both ranks' draws and warm starts in turn and steps on the
    mean of their gradients (both_ranks_by_hand). The command in the same launch: one output, world size 2."""
    script = tmp_path / "ranks.py"
    repo = str(Path(__file__).resolve().parent)
    script.write_text(MULTI_SCRIPT.format(repo=repo, out=str(tmp_path), pairs=str(pairs_file)))
    launch = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no"
    port = ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    env = dict(
        os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1"
    )
    run = subprocess.run(
        [sys.executable, *launch.split(), *port, str(script)], capture_output=True, text=True, timeout=240, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for a, b in zip(*(r["log"] for r in ranks)):
        assert a["drawn"] == b["drawn"] and not set(a["drawn"][0]) & set(a["drawn"][1])
        assert (a["rho"], a["inner_lr"], a["lambda_min"]) == (b["rho"], b["inner_lr"], b["lambda_min"])
    for n in ranks[0]["phi"]:
        assert torch.equal(ranks[0]["phi"][n], ranks[1]["phi"][n]), n
    metrics = json.loads((tmp_path / "command" / "metrics.json").read_text())  # written once, by the main process
    assert metrics["world_size"] == 2 and all(len(e["drawn"]) == 2 for e in metrics["log"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["command"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        phi, log = both_ranks_by_hand(world, tokenizer)
    finally:
        torch.set_num_threads(threads)
    assert [e["drawn"] for e in log] == [e["drawn"] for e in ranks[0]["log"]]
    assert [e["rho"] for e in log] == pytest.approx([e["rho"] for e in ranks[0]["log"]], rel=1e-12)
    assert log[-1]["rho"] > log[0]["rho"]  # the re-check raised rho: the reduction of lambda_min matters
    for n, p in phi.items():
        torch.testing.assert_close(ranks[0]["phi"][n], p.detach(), rtol=1e-12, atol=1e-12, msg=n)


def both_ranks_by_hand(world, tokenizer) -> tuple:
    """MULTI's two ranks in one process, written out from the module's pieces: the calibration on the first two
    domains, then per outer step the lam pairs and 2 x 1 domains from the shared generators, each rank's problem
    from its own generator (seed + 10 + rank) solved from its own warm starts, Adam on the mean of the two ranks'
    gradients, the re-check over both ranks' drawn domains (each at its own rank's theta*).
    Returns (phi, per step: the ranks' domains and rho)."""
    lm, rm, _ = hfb.toy_models(16, 1, 0, torch.float64)
    lm, theta_ref = hfb.with_lora(lm, hfb.Lora(2, 4.0))
    domains = pair_records(world, MULTI_DOMAINS)
    encoder = hfb.Encoder(lm, tokenizer, rm, tokenizer, domains, theta_ref)
    cfg = replace(MULTI)
    probe_generator = policy.generator(2)
    hfb.calibrate(lm, rm, {d: encoder.problem(d, cfg, probe_generator) for d in MULTI_DOMAINS[:2]}, cfg, theta_ref)
    phi = {n: p for n, p in rm.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(phi.values(), lr=cfg.lr)
    domain_generator, bt_generator = policy.generator(0), policy.generator(1)
    generators, warm, log = [policy.generator(10), policy.generator(11)], [{}, {}], []
    for _ in range(cfg.outer_steps):
        lam_pairs = encoder.lam_pairs(cfg, bt_generator)
        picks = encoder.pick(2, domain_generator)
        problems = [{picks[r]: encoder.problem(picks[r], cfg, generators[r])} for r in (0, 1)]
        grads = [
            hfb.outer_gradient(lm, rm, phi, problems[r], lam_pairs, cfg, theta_ref, 4, warm[r])[0] for r in (0, 1)
        ]
        policy.apply_gradient(opt, phi, [(a + b) / 2 for a, b in zip(*grads)])
        log.append({"drawn": [[picks[0]], [picks[1]]], "rho": cfg.rho})
        union = {**problems[0], **problems[1]}  # the re-check over both ranks' domains at their own theta*
        hfb.recheck(lm, rm, union, {d: warm[r][d] for r in (0, 1) for d in problems[r]}, cfg, theta_ref)
    return phi, log
