"""A compact GPT for the policy pi, and the reward model r_phi on its trunk (METHOD.md §0, §2.4).

nanoGPT-like causal transformer with attention written out, softmax(QK^T/sqrt(d) + causal mask) V,
so that double backward and forward-mode AD (torch.func.jvp) work through it on every device.

After SFT, pi_ref is frozen and shared: every adapted policy and every reward model starts from
features it computes once per sequence.
    pi_theta   pi_ref's trunk + an output head to |V| logits on its final features h; theta = the head
               (26 k parameters, the default adapter of §2.4) or every parameter ("all").
    r_phi      a reward model: its own copy of pi_ref's last block and final LayerNorm, and a scalar
               head, on pi_ref's features *before* that block (h_mid); r_phi(x, y) is the head's value
               summed over the response tokens. phi = the copy and the head (the same set for every
               RM method); the trunk below it is shared, so an RM never recomputes it.
So a batch of sequences is encoded once (`encode`, or `sample`, which collects the features while it
samples) and then scored by any policy head and any reward model: this is what makes the experiment
fit a laptop CPU.

Symbols -> names:
    x, y               prompt, response token ids; a batch is one tensor `idx` (B, T) = [x | y | pad]
    resp_mask          (B, T) 1.0 on the response tokens y (its <eos> included), 0 on prompt and pad
    log pi(y|x)        sum over the response tokens only (prompt excluded), `sequence_logprob`
    batch              dict: idx, mask, h and h_mid (pi_ref's features), logp_ref = log pi_ref(y|x)
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass
class GPTConfig:
    vocab_size: int = 264  # world v3; train.py passes len(world.vocab)
    block_size: int = 24  # prompts have 6 tokens, responses at most 16
    n_layer: int = 1
    n_head: int = 4
    n_embd: int = 96


class Block(nn.Module):
    """Pre-norm transformer block; attention is explicit and can extend a key/value cache."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        )

    def forward(self, x, past=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        S = k.shape[2]  # keys: S = past + T positions
        # softmax(Q K^T / sqrt(hs) + causal mask) V; query i sits at absolute position S - T + i
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, nh, T, S)
        if T > 1:  # one new token sees every key
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            att = att.masked_fill(~causal, float("-inf"))
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        x = x + self.mlp(self.ln_2(x))
        return x, (k, v)


class GPT(nn.Module):
    """Token + position embeddings, n_layer blocks, final LayerNorm, linear head to |V| logits."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)

    def features(self, idx, past=None):
        """idx (B, T) -> (h (B, T, C) after the final LayerNorm, h_mid (B, T, C) the residual stream
        before the last block, new key/value cache)."""
        t0 = 0 if past is None else past[0][0].shape[2]
        pos = torch.arange(t0, t0 + idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        present = []
        for i, block in enumerate(self.h):
            if i == len(self.h) - 1:
                h_mid = x
            x, kv = block(x, None if past is None else past[i])
            present.append(kv)
        return self.ln_f(x), h_mid, present

    def forward(self, idx, past=None):
        """idx (B, T) -> (logits (B, T, V), new key/value cache)."""
        h, _, present = self.features(idx, past)
        return never_special(self.head(h)), present


# ---- parameters ---------------------------------------------------------------------------------
def adapted_params(model: GPT, which: str = "head") -> dict:
    """theta: a detached, trainable copy of the adapted parameters, for functional_call.

    which="head": the output head only (the frozen trunk's features are shared with pi_ref, §2.4);
    which="all": every parameter. Parameters left out of the dict are the model's own (frozen).
    """
    if which not in ("head", "all"):
        raise ValueError(f"adapted parameters must be 'head' or 'all', got {which!r}")
    return copy_params({n: p for n, p in model.named_parameters() if which == "all" or n.startswith("head.")})


def copy_params(params: dict) -> dict:
    """A detached, trainable copy of a parameter dict (its own storage: training it leaves params be)."""
    return {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}


def continue_from(phi: dict, opt, lr: float):
    """A copy of phi with a copy of its optimiser's state: training it leaves phi and opt be."""
    phi2 = copy_params(phi)
    opt2 = torch.optim.Adam(phi2.values(), lr=lr)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict alone would share the tensors
    return phi2, opt2


def is_head(theta: dict) -> bool:
    """True when theta holds the output head only, so that pi_ref's features serve pi_theta."""
    return all(n.startswith("head.") for n in theta)


def never_special(logits):
    """The policy never emits <pad> or <bos>: their logits are pinned at -1e9 (finite, so that a
    masked-out pad position times zero stays zero)."""
    return logits.index_fill(-1, torch.tensor([PAD_ID, BOS_ID], device=logits.device), -1e9)


def head_logits(theta: dict, h):
    """The policy head in theta applied to trunk features h (B, T, C)."""
    return never_special(F.linear(h, theta["head.weight"], theta["head.bias"]))


def check_finite(value, what: str, step: int):
    """Stop a training loop at the first non-finite loss or gradient, naming it and the step."""
    if not torch.isfinite(torch.as_tensor(value)).all():
        raise FloatingPointError(f"non-finite {what} at step {step}")


def apply_gradient(opt, params: dict, grads):
    """One optimiser step along the given gradients (a list in params' order)."""
    for p, g in zip(params.values(), grads):
        p.grad = g
    opt.step()


def show(progress, numbers: dict):
    """One step of a progress bar (tqdm) with the step's numbers in its postfix; None: nothing shown."""
    if progress is not None:
        progress.set_postfix(numbers, refresh=False)
        progress.update()


def generator(seed: int, device="cpu") -> torch.Generator:
    """A fresh random-number generator on `device`, seeded: every random draw names its own."""
    return torch.Generator(device).manual_seed(seed)


def draw(n: int, size: int, generator: torch.Generator) -> list:
    """`size` indices in [0, n), uniformly with replacement, from the generator (on any device)."""
    return torch.randint(n, (size,), generator=generator, device=generator.device).tolist()


# ---- batches: tokens, features, log-probabilities ------------------------------------------------
def pad_batch(seqs, device="cpu"):
    """List of token-id lists -> LongTensor (B, T) right-padded with PAD_ID."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s)
    return out.to(device)


def join(prompts, responses, device="cpu"):
    """Prompt + response token lists -> (idx (B, T), resp_mask (B, T) float)."""
    idx = pad_batch([list(x) + list(y) for x, y in zip(prompts, responses)], device)
    mask = torch.zeros(idx.shape, device=device)
    for i, (x, y) in enumerate(zip(prompts, responses)):
        mask[i, len(x) : len(x) + len(y)] = 1.0
    return idx, mask


def sequence_logprob(logits, idx, resp_mask):
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over response tokens, (B,).

    Args: logits (B, T, V) computed from idx (B, T), where position t predicts token t + 1; resp_mask (B, T).
    """
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    return (logp * resp_mask[:, 1:]).sum(-1)


@torch.no_grad()
def encode(model: GPT, idx, resp_mask, h=None, h_mid=None) -> dict:
    """A batch dict: tokens, mask, pi_ref's features h and h_mid (B, T, C) and log pi_ref(y|x) (B,);
    the features are computed unless given."""
    if h is None:
        h, h_mid, _ = model.features(idx)
    return {
        "idx": idx,
        "mask": resp_mask,
        "h": h,
        "h_mid": h_mid,
        "logp_ref": sequence_logprob(never_special(model.head(h)), idx, resp_mask),
    }


def rows_of(batch: dict, rows) -> dict:
    """The sub-batch of the given row indices."""
    return {k: v[rows] for k, v in batch.items()}


def logprob(model: GPT, theta: dict, batch: dict):
    """log pi_theta(y|x) (B,), with the graph to theta. A head theta reads the batch's features; a
    theta with trunk parameters runs the whole model with them (functional_call)."""
    if is_head(theta):
        logits = head_logits(theta, batch["h"])
    else:
        logits, _ = functional_call(model, theta, (batch["idx"],))
    return sequence_logprob(logits, batch["idx"], batch["mask"])


# ---- the reward model r_phi ----------------------------------------------------------------------
class RewardModel(nn.Module):
    """r_phi: a copy of pi_ref's last block and final LayerNorm, and a scalar head, read at every
    response token and summed: r_phi(x, y) = sum_{t in y} head(ln(block(h_mid))_t)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.block = Block(model.cfg)
        self.ln = nn.LayerNorm(model.cfg.n_embd)
        self.head = nn.Linear(model.cfg.n_embd, 1)

    def forward(self, h_mid, resp_mask):
        x, _ = self.block(h_mid)
        return (self.head(self.ln(x))[..., 0] * resp_mask).sum(1)


def make_reward_model(model: GPT, generator: torch.Generator):
    """(r_phi, phi): the block and LayerNorm copied from pi_ref, a fresh head (w ~ N(0, 0.02^2), b = 0);
    phi is a trainable dict of all of the reward model's parameters (functional_call)."""
    rm = RewardModel(model).to(model.head.weight.device, model.head.weight.dtype)
    rm.block.load_state_dict(model.h[-1].state_dict())
    rm.ln.load_state_dict(model.ln_f.state_dict())
    with torch.no_grad():
        rm.head.weight.copy_(
            torch.randn(rm.head.weight.shape, generator=generator, device=generator.device, dtype=rm.head.weight.dtype)
            * 0.02
        )
        rm.head.bias.zero_()
    rm.requires_grad_(False)
    return rm, copy_params(dict(rm.named_parameters()))


def reward(rm: RewardModel, phi: dict, batch: dict):
    """r_phi(x, y) (B,) of an encoded batch, with phi in place of rm's own parameters."""
    return functional_call(rm, phi, (batch["h_mid"], batch["mask"]))


# ---- sampling with a key/value cache -------------------------------------------------------------
@torch.no_grad()
def sample(
    model: GPT, theta: dict, prompts, max_new_tokens: int, generator: torch.Generator, temperature: float = 1.0
) -> dict:
    """Sample responses y ~ pi_theta(.|x)^(1/temperature) for equal-length prompts, stopping at <eos>.

    Args: prompts (B, P) long; theta: the policy's adapted parameters ({} = pi_ref); an explicit
    generator on the model's device.
    Returns: the encoded batch (see `encode`): idx (B, P + L) = [x | y | pad], mask (1 on y, <eos>
    included), pi_ref's features -- collected while sampling when theta is a head -- and logp_ref.
    """
    head = is_head(theta)
    B, P = prompts.shape
    idx, past, inp, hs, mids = prompts, None, prompts, [], []
    done = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    for t in range(max_new_tokens + 1):
        if head:
            h, h_mid, past = model.features(inp, past)  # pi_ref's features of the fed tokens
            hs.append(h)
            mids.append(h_mid)
            logits = head_logits(theta, h[:, -1]) if theta else never_special(model.head(h[:, -1]))
        else:
            logits, past = functional_call(model, theta, (inp, past))
            logits = logits[:, -1]
        if t == max_new_tokens or done.all():
            break
        # inverse-CDF sampling, one uniform per row (cheaper on CPU than torch.multinomial); u > 0
        # never picks a zero-probability token before the first positive one
        u = 1.0 - torch.rand(B, 1, generator=generator, device=prompts.device, dtype=logits.dtype)  # (0, 1]
        nxt = ((logits / temperature).softmax(-1).cumsum(-1) < u).sum(-1).clamp_max(logits.shape[-1] - 1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        done = done | (nxt == EOS_ID)
        inp = nxt[:, None]
    resp_mask = (idx != PAD_ID).float()
    resp_mask[:, :P] = 0.0
    if head:
        return encode(model, idx, resp_mask, torch.cat(hs, 1), torch.cat(mids, 1))
    return encode(model, idx, resp_mask)


@torch.no_grad()
def encode_pairs(model: GPT, pairs, device="cpu", chunk: int = 2048):
    """Encoded (chosen, rejected) batches of a list of pairs, prompt + response; the trunk runs in chunks."""
    out = []
    for which in ("chosen", "rejected"):
        idx, mask = join([p.prompt for p in pairs], [getattr(p, which) for p in pairs], device)
        parts = [model.features(idx[i : i + chunk])[:2] for i in range(0, len(idx), chunk)]
        out.append(encode(model, idx, mask, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return out[0], out[1]


# ---- supervised fine-tuning of pi_ref ------------------------------------------------------------
def lm_loss(model: GPT, idx):
    """Next-token cross-entropy over every non-pad target token."""
    logits, _ = model(idx)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1), ignore_index=PAD_ID)


@torch.no_grad()
def perplexity(model: GPT, seqs, device="cpu", batch_size: int = 512) -> float:
    """exp(mean next-token cross-entropy) over the tokens of seqs."""
    total, n = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        idx = pad_batch(seqs[i : i + batch_size], device)
        k = int((idx[:, 1:] != PAD_ID).sum())
        total, n = total + lm_loss(model, idx).item() * k, n + k
    return math.exp(total / n)


def sft(
    model: GPT,
    corpus,
    steps: int,
    generator: torch.Generator,
    device="cpu",
    batch_size: int = 64,
    lr: float = 1.5e-3,
    progress: bool = True,
) -> list:
    """Train pi_ref on the unlabelled corpus with AdamW, 100 warm-up steps and a cosine schedule.

    Returns the training losses. (A learning rate much above 1.5e-3 left an earlier, 2-layer version of
    this model on a plateau where it ignored the previous adjective and never learned word polarity.)
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    losses = []
    bar = tqdm(total=steps, desc="SFT pi_ref", disable=not progress, leave=False, mininterval=0.5)
    for _ in range(steps):
        rows = draw(len(corpus), batch_size, generator)
        loss = lm_loss(model, pad_batch([corpus[i] for i in rows], device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        show(bar, {"loss": losses[-1]})
    bar.close()
    return losses


SFT_VALIDATION = 1000  # the corpus's first reviews, held out of SFT for the validation perplexity


def train_pi_ref(world, steps: int, seed: int = 0, device="cpu", progress: bool = True):
    """pi_ref as every script makes it: a GPT over the world's vocabulary from torch.manual_seed(seed), `sft` for
    `steps` on the corpus less its first SFT_VALIDATION reviews (generator seeded with seed), then frozen.
    Returns (model, the SFT losses)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=len(world.vocab))).to(device)
    losses = sft(model, world.sft[SFT_VALIDATION:], steps, generator(seed, device), device, progress=progress)
    return model.requires_grad_(False), losses
