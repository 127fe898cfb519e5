"""A compact GPT for the policy pi and the reward model r_phi (METHOD.md §0, §2.4).

nanoGPT-like causal transformer with attention written out, softmax(QK^T/sqrt(d) + causal mask) V,
so that double backward and forward-mode AD (torch.func.jvp) work through it on every device. One
class serves both roles: the policy has a head to |V| logits, the reward model the same trunk with a
head to one scalar read at the last real token of the response.

Symbols -> names:
    pi_ref, pi_theta   policy GPT; theta = its adapted parameters (a dict, see `adapted_params`)
    r_phi              reward GPT (n_out=1); phi = its trained parameters (all of them by default)
    x, y               prompt, response token ids; a batch is one tensor `idx` (B, T) = [x | y | pad]
    resp_mask          (B, T) 1.0 on the response tokens y (its <eos> included), 0 on prompt and pad
    log pi(y|x)        sum over the response tokens only (prompt excluded), `sequence_logprob`
"""
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
    vocab_size: int = 230
    block_size: int = 32       # prompts have 6 tokens, responses at most 23
    n_layer: int = 2
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
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x, past=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        S = k.shape[2]                                         # keys: S = past + T positions
        # softmax(Q K^T / sqrt(hs) + causal mask) V; query i sits at absolute position S - T + i
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])                     # (B, nh, T, S)
        causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        x = x + self.mlp(self.ln_2(x))
        return x, (k, v)


class GPT(nn.Module):
    """Token + position embeddings, n_layer blocks, final LayerNorm, linear head to n_out outputs."""

    def __init__(self, cfg: GPTConfig, n_out: int):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, n_out)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx, past=None, head=True):
        """idx (B, T) -> (head outputs (B, T, n_out), or hidden states if head=False; new cache)."""
        t0 = 0 if past is None else past[0][0].shape[2]
        pos = torch.arange(t0, t0 + idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)                      # (B, T, C)
        present = []
        for i, block in enumerate(self.h):
            x, kv = block(x, None if past is None else past[i])
            present.append(kv)
        x = self.ln_f(x)
        if not head:
            return x, present
        return (self.head(x) if self.head.out_features == 1 else never_special(self.head(x))), present


# ---- parameters ---------------------------------------------------------------------------------
def adapted_params(model: GPT, adapt: str = "head") -> dict:
    """theta (or phi): a detached, trainable copy of the adapted parameters, for functional_call.

    adapt="head": the output head only (the frozen trunk's features are shared with pi_ref, §2.4);
    adapt="all": every parameter. Parameters left out of the dict are the model's own (frozen).
    """
    if adapt not in ("head", "all"):
        raise ValueError(f"adapt must be 'head' or 'all', got {adapt!r}")
    return copy_params({n: p for n, p in model.named_parameters() if adapt == "all" or n.startswith("head.")})


def copy_params(params: dict) -> dict:
    """A detached, trainable copy of a parameter dict (its own storage: training it leaves params be)."""
    return {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}


def never_special(logits):
    """The policy never emits <pad> or <bos>: their logits are pinned at -1e9 (finite, so that a
    masked-out pad position times zero stays zero)."""
    return logits.index_fill(-1, torch.tensor([PAD_ID, BOS_ID], device=logits.device), -1e9)


def head_logits(params: dict, h):
    """The policy head applied to trunk features h (B, T, C) with the head in `params`."""
    return never_special(F.linear(h, params["head.weight"], params["head.bias"]))


def make_reward_model(policy: GPT, generator: torch.Generator) -> GPT:
    """r_phi: a GPT with pi_ref's trunk (copied) and a fresh scalar head."""
    w = policy.head.weight
    rm = GPT(policy.cfg, n_out=1).to(device=w.device, dtype=w.dtype)
    trunk = {k: v for k, v in policy.state_dict().items() if not k.startswith("head.")}
    rm.load_state_dict(trunk, strict=False)
    with torch.no_grad():
        rm.head.weight.copy_(torch.randn(rm.head.weight.shape, generator=generator,
                                         device=generator.device, dtype=w.dtype) * 0.02)
        rm.head.bias.zero_()
    return rm


def draw(n: int, size: int, generator: torch.Generator) -> list:
    """`size` indices in [0, n), uniformly with replacement, from the generator (on any device)."""
    return torch.randint(n, (size,), generator=generator, device=generator.device).tolist()


# ---- log-probabilities and rewards ---------------------------------------------------------------
def pad_batch(seqs, device="cpu"):
    """List of token-id lists -> LongTensor (B, T) right-padded with PAD_ID."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s)
    return out.to(device)


def join(prompts, responses, device="cpu"):
    """Prompt + response token lists -> (idx (B, T), resp_mask (B, T) float)."""
    idx = pad_batch([list(x) + list(y) for x, y in zip(prompts, responses)], device)
    mask = torch.zeros(idx.shape, device=device)
    for i, (x, y) in enumerate(zip(prompts, responses)):
        mask[i, len(x):len(x) + len(y)] = 1.0
    return idx, mask


def sequence_logprob(logits, idx, resp_mask):
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over response tokens, and the per-token values.

    Args: logits (B, T, V) computed from idx (B, T); resp_mask (B, T).
    Returns: (B,) sums and (B, T-1) per-token log-probs (zero off the response), where entry t-1
    is the log-probability of token t.
    """
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, idx[:, 1:, None]).squeeze(-1)
    per_token = logp * resp_mask[:, 1:]
    return per_token.sum(-1), per_token


def policy_logprob(model: GPT, params: dict, idx, resp_mask):
    """log pi_params(y|x) (B,), with `params` overriding the model's own (functional_call)."""
    logits, _ = functional_call(model, params, (idx,))
    return sequence_logprob(logits, idx, resp_mask)[0]


def logprob_and_ref(model: GPT, theta: dict, idx, resp_mask):
    """(log pi_theta(y|x), log pi_ref(y|x)), both (B,); pi_ref is the model's own parameters.

    When theta is the head alone the trunk runs once and its features serve both heads.
    """
    with torch.no_grad():
        h, _ = model(idx, head=False)
        logp_ref = sequence_logprob(never_special(model.head(h)), idx, resp_mask)[0]
    if all(n.startswith("head.") for n in theta):
        return sequence_logprob(head_logits(theta, h), idx, resp_mask)[0], logp_ref
    return policy_logprob(model, theta, idx, resp_mask), logp_ref


def reward(rm: GPT, phi: dict, idx):
    """r_phi(x, y) (B,): the scalar head at the last real (non-pad) token of each sequence."""
    out, _ = functional_call(rm, phi, (idx,))              # (B, T, 1)
    last = (idx != PAD_ID).sum(1) - 1                      # right padding: last real token
    return out[torch.arange(idx.shape[0], device=idx.device), last, 0]


# ---- sampling with a key/value cache -------------------------------------------------------------
@torch.no_grad()
def sample(model: GPT, params: dict, prompts, max_new_tokens: int, generator: torch.Generator,
           temperature: float = 1.0, top_k: int | None = None):
    """Sample responses y ~ pi_params(.|x) for a batch of equal-length prompts, stopping at <eos>.

    Args: prompts (B, P) long; params override the model's parameters (e.g. theta); an explicit
    generator on the model's device.
    Returns: idx (B, P + L) = [x | y | pad] and resp_mask (B, P + L) (1 on y, <eos> included).
    """
    B, P = prompts.shape
    idx, past, inp = prompts, None, prompts
    done = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    for _ in range(max_new_tokens):
        logits, past = functional_call(model, params, (inp,), {"past": past})
        logits = logits[:, -1] / temperature                               # (B, V)
        if top_k is not None:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        done = done | (nxt == EOS_ID)
        if done.all():
            break
        inp = nxt[:, None]
    resp_mask = (idx != PAD_ID).float()
    resp_mask[:, :P] = 0.0
    return idx, resp_mask


# ---- supervised fine-tuning of pi_ref ------------------------------------------------------------
def lm_loss(model: GPT, idx):
    """Next-token cross-entropy over every non-pad target token."""
    logits, _ = model(idx)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1),
                           ignore_index=PAD_ID)


@torch.no_grad()
def perplexity(model: GPT, seqs, device="cpu", batch_size: int = 512) -> float:
    """exp(mean next-token cross-entropy) over the tokens of seqs."""
    total, n = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        idx = pad_batch(seqs[i:i + batch_size], device)
        k = int((idx[:, 1:] != PAD_ID).sum())
        total, n = total + lm_loss(model, idx).item() * k, n + k
    return math.exp(total / n)


def sft(model: GPT, corpus, steps: int, batch_size: int, lr: float, generator: torch.Generator,
        device="cpu", progress: bool = True) -> list:
    """Train pi_ref on the unlabelled corpus with AdamW, 100 warm-up steps and a cosine schedule.

    Returns the training losses. (A learning rate much above 1.5e-3 leaves this model on a plateau
    where it ignores the previous adjective and never learns word polarity; see README.)
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for _ in tqdm(range(steps), desc="SFT pi_ref", disable=not progress, leave=False):
        rows = draw(len(corpus), batch_size, generator)
        loss = lm_loss(model, pad_batch([corpus[i] for i in rows], device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
