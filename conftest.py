"""Shared test fixtures, small helpers and the reference forward pass written out, for test_metarm.py.

The manual_* functions recompute pi_ref's residual stream, log-probabilities and the reward model's output
from the model's submodules, sharing no code with GPT.features or policy.encode / logprob / reward: the
tests compare the project's fast paths against them. METARM_TEST_THREADS sets torch's threads (default 1:
safe on a busy 2-core machine).
"""

import math
import os

import pytest
import torch

import data
import policy

THREADS = int(os.environ.get("METARM_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)
f64 = torch.float64
TINY_WORLD = data.WorldConfig(
    n_sft_per_domain=60, n_sft_per_new_domain=20, n_pairs_per_domain=40, n_eval_pairs_per_domain=20
)


# ---- small helpers --------------------------------------------------------------------------------------------------
def G(seed: int) -> torch.Generator:
    """A CPU generator with this seed."""
    return torch.Generator().manual_seed(seed)


def T64(*xs) -> torch.Tensor:
    """A float64 vector of the given numbers."""
    return torch.tensor(xs, dtype=f64)


def noisy_gpt(cfg, scale):
    """A float64 GPT with every parameter moved by scale * N(0, 1) (a fixed seed), frozen."""
    torch.manual_seed(0)
    model = policy.GPT(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.requires_grad_(False)


def jitter(params, scale, seed):
    """params + scale * N(0, 1), detached, from G(seed)."""
    gen = G(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}


def randn_like(params, seed):
    """A random direction with params' names and shapes."""
    return jitter({n: 0 * p.detach() for n, p in params.items()}, 1.0, seed)


def dot(a, b) -> float:
    """<a, b> over two parameter dicts."""
    return sum((a[n] * b[n]).sum() for n in a).item()


def flat_fn(params, fn):
    """(fn(dict) as a function of one flat vector, that vector at params)."""
    sizes = [p.numel() for p in params.values()]

    def unflat(x):
        return {n: t.view(p.shape) for (n, p), t in zip(params.items(), x.split(sizes))}

    def flat(x):
        return fn(unflat(x))

    return flat, torch.cat([p.detach().flatten() for p in params.values()])


def batch_of(model, prompts, responses):
    """Prompts and responses (token lists) joined and encoded by pi_ref."""
    return policy.encode(model, *policy.join(prompts, responses))


def micro_batches(model, gen, n):
    """n random prompts [<bos>, t, t] and two random responses each (1-3 tokens and <eos>), encoded."""

    def tokens(k):
        return torch.randint(3, 12, (k,), generator=gen).tolist()

    def responses():
        return [tokens(int(torch.randint(1, 4, (1,), generator=gen))) + [policy.EOS_ID] for _ in range(n)]

    prompts = [[policy.BOS_ID] + tokens(2) for _ in range(n)]
    return prompts, batch_of(model, prompts, responses()), batch_of(model, prompts, responses())


# ---- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def world():
    return data.World(TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_gpt(world):
    """float64 GPT over the world's vocabulary, 2 layers (so that h_mid is not the embedding)."""
    return noisy_gpt(policy.GPTConfig(vocab_size=len(world.vocab), n_layer=2, n_head=2, n_embd=16), 0.3)


@pytest.fixture(scope="session")
def micro():
    """float64 GPT over 12 tokens: a 108-parameter head, so that Hessians over theta are explicit."""
    return noisy_gpt(policy.GPTConfig(vocab_size=12, block_size=12, n_layer=2, n_head=2, n_embd=8), 0.3)


# ---- the reference forward pass, written out -----------------------------------------------------------------------
def manual_stream(model, idx):
    """(h after ln_f, the residual stream before the last block), written out: embeddings, blocks, ln_f."""
    x = model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))
    for block in model.h:
        mid, x = x, block(x)[0]
    return model.ln_f(x), mid


def manual_logprob(model, idx, mask, theta=None, h=None):
    """log pi(y|x): the head on manual_stream's h, <pad>/<bos> at -inf, log-softmax, response tokens summed."""
    h = manual_stream(model, idx)[0] if h is None else h
    th = theta or {"head.weight": model.head.weight, "head.bias": model.head.bias}
    vocab = torch.arange(th["head.bias"].shape[0])
    never = (vocab == policy.PAD_ID) | (vocab == policy.BOS_ID)
    logits = (h @ th["head.weight"].T + th["head.bias"]).masked_fill(never, -math.inf)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, idx[:, 1:, None])[..., 0]
    return torch.where(mask[:, 1:] > 0, logp, torch.zeros_like(logp)).sum(-1)


def manual_reward(model, rm, phi, idx, mask):
    """r_phi(x, y) = sum over the response tokens of head(ln(block(h_mid))), by rm's submodules with phi in place."""
    params = {**dict(rm.named_parameters()), **phi}

    def sub(name, x):
        own = {k[len(name) + 1 :]: v for k, v in params.items() if k.startswith(name + ".")}
        return torch.func.functional_call(getattr(rm, name), own, (x,))

    h_mid = manual_stream(model, idx)[1]
    return (sub("head", sub("ln", sub("block", h_mid)[0]))[..., 0] * mask).sum(1)
