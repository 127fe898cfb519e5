"""Shared test fixtures, small helpers and the reference forward pass written out, for test_metarm.py and study/.

The manual_* functions recompute pi_ref's residual stream, log-probabilities and the reward model's output
from the model's submodules, sharing no code with GPT.features or policy.encode / logprob / reward: the
tests compare the project's fast paths against them. METARM_TEST_THREADS sets torch's threads (default 1:
safe on a busy 2-core machine).
"""

import importlib
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bilevel
import data
import metarm
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


def earlier_run(tmp_path):
    (tmp_path / "out").mkdir(), (tmp_path / "out" / "results.json").write_text("earlier run")
    return tmp_path / "out"


def one_line_error(capsys) -> str:  # the stderr of a refused command: one line, no traceback
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


ROOT = Path(__file__).parent
# the modules a document may name as `module.name`: the project's (study: study.<name>), and those that moved into
# study/, so that a name left behind fails to resolve
PROJECT_MODULES = ("data", "policy", "bilevel", "metarm", "train", "conftest", "hf", "hf_bilevel", "study")
FORMER_MODULES = ("evaluation", "plots", "cli", "bench")
DOCUMENTS = ("README.md", "METHOD.md", "study/REPORT.md")


def documented_names() -> list:
    """Every `module.name` or `module.name(...)` in backticks in the documents, module one of PROJECT_MODULES or
    FORMER_MODULES (file names such as `train.py` left out), each once, in order."""
    names = []
    for doc in DOCUMENTS:
        for span in re.findall(r"`([^`\n]+)`", (ROOT / doc).read_text()):
            m = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(\(.*\))?", span)
            if not m or m.group(1).split(".")[-1] in ("py", "md", "json"):
                continue
            if m.group(1).split(".")[0] in PROJECT_MODULES + FORMER_MODULES:
                names.append(m.group(1))
    return list(dict.fromkeys(names))


def resolve(name: str) -> bool:
    """Whether a dotted name is a module of the project, or an attribute (function, class, constant, field) of one."""
    parts = name.split(".")
    if parts[0] in FORMER_MODULES:
        return False
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


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


@pytest.fixture
def rounds(micro, monkeypatch):
    """For the §1 tests of every round's standardisation: a micro RM (phi), 4 prompts with a pair each, pi_ref's
    samples of the prompts (ref), MetaRM's configs, and metarm.adapt replaced by a recorder that appends, per call,
    the mean and std of the reward it is given on ref and the RM's raw rewards there (calls)."""
    (rm, phi), (prompts, c, r), calls = policy.make_reward_model(micro, G(6)), micro_batches(micro, G(6), 4), []
    prompts = torch.tensor(prompts)
    ref = policy.sample(micro, {}, prompts.repeat(4, 1), 4, G(7))

    def fake_adapt(model, pr, reward_fn, cfg, generator, theta0=None):
        z = reward_fn(ref)
        calls.append(
            (z.mean().item(), z.std().item(), manual_reward(micro, rm, phi, ref["idx"], ref["mask"]).tolist())
        )
        return policy.adapted_params(micro), []

    monkeypatch.setattr(metarm, "adapt", fake_adapt)
    configs = (
        metarm.MetaRMConfig(eta=0.5, k=2, meta_prompts=2, steps=3, rounds=3, batch_size=4),
        metarm.AdaptConfig(max_new_tokens=4),
    )
    return SimpleNamespace(rm=rm, phi=phi, prompts=prompts, pairs=(c, r), ref=ref, calls=calls, configs=configs)


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


# ---- a bilevel problem with its exact inner solutions (the (6)-(8) tests, the hypergradient accuracy check) -----
@pytest.fixture(scope="module")
def bl(micro):
    """Domains a, b, c: 3 prompts x K = 4 candidates, 6 pairs each; an RM with a unit-scale head; rho, inner step from
    calibrate; beta_dpo 0.3. warm: theta*_d by 300 GD steps + Newton (rho is sized at theta*: Newton from theta_ref
    does not converge)."""
    rm, phi = policy.make_reward_model(micro, gen := G(0))
    phi["head.weight"] = torch.randn(phi["head.weight"].shape, generator=gen, dtype=f64).requires_grad_()
    cfg = metarm.BilevelConfig(
        beta=0.5,
        beta_dpo=0.3,
        lam=0.0,
        K=4,
        prompts_per_domain=3,
        pairs_per_domain=6,
        cg_iters=300,
        cg_tol=1e-12,
        max_new_tokens=5,
    )
    domains = {}
    for d in "abc":
        prompts, chosen, rejected = micro_batches(micro, gen, 8)
        domains[d] = (torch.tensor(prompts), (chosen, rejected))
    problems = {d: metarm.draw_problem(micro, *domains[d], cfg, gen) for d in domains}
    theta_ref = {n: p.detach() for n, p in policy.adapted_params(micro).items()}
    s = dict(
        model=micro,
        rm=rm,
        phi=phi,
        cfg=cfg,
        problems=problems,
        domains=domains,
        theta_ref=theta_ref,
        pairs=domains["a"][1],
        curv=metarm.calibrate(micro, rm, phi, problems, cfg, theta_ref),
        warm={},
    )
    for d, prob in problems.items():
        g, r = lower_ref(s, prob), {"r": std_rewards(s, phi, prob["cand"])}
        s["warm"][d], info = bilevel.newton_solve(
            g, bilevel.inner_solve(g, theta_ref, r, 300, cfg.inner_lr)[0], r, tol=1e-12
        )
        assert info["converged"]
    return s


def lower_ref(s, prob):
    """Eq. (5) of one domain written out on manual_logprob (the candidates' features computed once)."""
    cfg, theta_ref, c, K = s["cfg"], s["theta_ref"], prob["cand"], s["cfg"].K
    h = manual_stream(s["model"], c["idx"])[0]

    def lp(th):
        return manual_logprob(s["model"], c["idx"], c["mask"], th, h)

    lp0 = lp(theta_ref)

    def g(th, up):
        w = torch.softmax((lp(th) - lp0).view(-1, K), -1)
        prox = sum(((th[n] - theta_ref[n]) ** 2).sum() for n in th)
        return (-(w * up["r"]).sum(-1) + cfg.beta * (w * torch.log(K * w)).sum(-1)).mean() + cfg.rho / 2 * prox

    return g


def std_rewards(s, phi, batch):
    r = manual_reward(s["model"], s["rm"], phi, batch["idx"], batch["mask"])
    return ((r - r.mean()) / r.std()).view(-1, s["cfg"].K)
