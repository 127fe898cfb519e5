"""MetaRM on Hugging Face models: Eqs. (9)-(11) of METHOD.md inside `trl.RewardTrainer` (an optional extra).

Dou et al., "MetaRM: Shifted Distributions Alignment via Meta-Learning" (arXiv 2405.00438), METHOD.md §3.
`metarm.py` runs MetaRM on the toy world's own small reward model; this module runs the same update on any
`AutoModelForSequenceClassification` with TRL, so that a reader can take it from the toy to their model. It
needs `requirements-hf.txt`; no core module imports it. Nothing is downloaded: models are built from a config
or read from a local path.

Symbols -> names (METHOD.md §3):
    phi        the reward model's trainable parameters (all of them; with LoRA: the adapters and the score head)
    X_t        a batch of preference pairs: the trainer's own dataset (prompt / chosen / rejected)
    X_s        a batch of shifted prompts, each with k responses of the current policy (`ShiftedSamples`)
    k, eta     responses per shifted prompt; the ascent step of Eq. (10)
    J          the difference loss, Eq. (9): `metarm.difference_loss` over `metarm.distinct_pairs`
    delta      eta grad_phi J(phi; X_s), taken as a constant (stop-gradient): phi' = phi + delta

How the update sits in TRL (trl 1.16, transformers 5.23; see `MetaRMRewardTrainer`):
    - `training_step` is overridden: before the micro-batch's forward and backward it takes delta (Eqs. (9)(10))
      once per optimiser step, and the Bradley-Terry loss of `RewardTrainer.compute_loss` is then evaluated at
      phi' by `torch.func.functional_call` with phi + delta in place of phi. Its backward lands on phi, so the
      optimiser steps phi along grad L_BT(phi'): the authors' first-order update, Eq. (11). No parameter is
      changed in place and restored.
    - Gradient accumulation: one draw of X_s and one delta per optimiser step, taken at the first micro-batch of
      the accumulation cycle (phi does not change within it); every micro-batch of the cycle uses that phi'.
    - Data parallel (DDP through accelerate): every rank draws the SAME X_s (one generator, same seed, advanced
      once per optimiser step) and computes the same delta, with no communication, so phi' is the same on every
      rank and DDP averages gradients taken at one point. The cost: each rank computes grad J on the whole X_s.
      The forward at phi' goes through the DDP wrapper, whose hooks average the gradients as usual.
    - Engines: single process and DDP (CPU or GPU). DeepSpeed, FSDP and tensor / context parallelism are refused
      (not verified; DeepSpeed steps inside backward and shards phi, so phi + delta needs its gathered parameters).
    - Text: `RewardTrainer` concatenates prompt + completion with nothing between and appends eos; here a space
      is put before a completion when neither side has one (`with_separator`), and the shifted samples are
      tokenized the same way (prompt + response + eos) by their own loader, never through the trainer's dataset.
      The toy tokenizer has `<eos>` as eos and a distinct `<pad>`.
    - Resuming from a checkpoint restarts the draws of X_s (their generator is not saved in checkpoints).

What `RewardTrainer` does (trl 1.16.0, read from its source) and what `train` sets:
    - loss -log sigmoid(r(x, y_w) - r(x, y_l)) (minus a `margin` column if the dataset has one), plus
      center_rewards_coefficient * mean((r_w + r_l)^2) if that is set (default None: no term); all of it is
      evaluated at phi'. The model must have num_labels = 1; the trainer sets config.pad_token_id from the
      tokenizer, whose pad falls back to eos; the reward is read at the last non-pad token.
    - columns prompt / chosen / rejected are tokenized as prompt + chosen and prompt + rejected (chosen /
      rejected alone: as they are), eos appended when missing; other columns are dropped.
    - defaults that `train` overrides: bf16 = True (autocast, also on CPU), gradient checkpointing on,
      max_length = 1024 (longer pairs are dropped silently; `train`: None), linear learning-rate decay
      (`train`: constant). Dropout is disabled (disable_dropout = True).

Commands (`python hf.py shifted --help`, `python hf.py train --help`):
    shifted   write X_s as JSONL, one record per prompt: {"prompt": str, "responses": [str] * k}, from the toy
              policy (pi_ref after a short SFT) or from a local Hugging Face causal LM
    train     train a reward model with MetaRM on JSONL pairs (`prompt` / `chosen` / `rejected`, as train.py
              writes them) and a shifted-samples JSONL; writes the model (or its LoRA adapter), its tokenizer
              and metrics.json: config, world_size, train_loss (mean L_BT(phi') over the steps), loss_log,
              J (J(phi; X_s) per step), eval_accuracy (on --eval-pairs, ties 1/2), n_eval_pairs, seconds
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.func import functional_call
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
)
from trl import RewardConfig, RewardTrainer

import data
import metarm
import policy
from study import cli
from study.cli import BadInput, option

UNK = "<unk>"  # the toy tokenizer's one added word (unknown words are refused before they reach it)


# ==== Text: the separator, the JSONL records, the shifted samples' own loader ==============================
def with_separator(prompt: str, completion: str) -> str:
    """The completion as it is appended to the prompt: a space first when neither side has one."""
    if prompt and completion and not prompt[-1].isspace() and not completion[0].isspace():
        return " " + completion
    return completion


def read_jsonl(path: str, fields: dict) -> list:
    """The records of a JSONL file, each a JSON object whose `fields` (name -> type) are present and typed;
    other fields are dropped. Raises BadInput naming file:line on the first bad record."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise BadInput(f"{path}:{lineno}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise BadInput(f"{path}:{lineno}: a record must be a JSON object")
        missing = [k for k, kind in fields.items() if not isinstance(rec.get(k), kind)]
        if missing:
            raise BadInput(f"{path}:{lineno}: missing or mistyped fields {missing} (needs {list(fields)})")
        records.append({k: rec[k] for k in fields})
    if not records:
        raise BadInput(f"{path}: no records")
    return records


def read_pairs(path: str) -> list:
    """Preference pairs {prompt, chosen, rejected} (strings), the completions separated from the prompt."""
    pairs = read_jsonl(path, {"prompt": str, "chosen": str, "rejected": str})
    for p in pairs:
        p["chosen"] = with_separator(p["prompt"], p["chosen"])
        p["rejected"] = with_separator(p["prompt"], p["rejected"])
    return pairs


def read_shifted(path: str, k: int) -> list:
    """X_s records {prompt, responses}: exactly k string responses per prompt (Eq. (9) pairs them up)."""
    records = read_jsonl(path, {"prompt": str, "responses": list})
    for lineno, rec in enumerate(records, 1):
        n = len(rec["responses"])
        if n != k or not all(isinstance(s, str) for s in rec["responses"]):
            raise BadInput(
                f"{path}: record {lineno} has {n} responses (or a non-string one), expected k = {k} strings"
            )
        rec["responses"] = [with_separator(rec["prompt"], s) for s in rec["responses"]]
    return records


def token_ids(tokenizer, prompt: str, completion: str) -> list:
    """Token ids of prompt + completion + eos, as `RewardTrainer` tokenizes a pair's side (eos not doubled)."""
    text = prompt + completion
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text=text)["input_ids"]


def padded(seqs: list, pad_token_id: int, device) -> tuple:
    """Token-id lists -> (input_ids (B, T) right-padded, attention_mask (B, T))."""
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
    return input_ids.to(device), attention_mask.to(device)


@dataclass
class ShiftedSamples:
    """X_s, tokenized once: seqs[i * k + j] = prompt i + response j + eos (prompt-major, like metarm.py)."""

    seqs: list
    k: int

    @classmethod
    def from_records(cls, records: list, tokenizer, k: int):
        return cls([token_ids(tokenizer, r["prompt"], s) for r in records for s in r["responses"]], k)

    @property
    def n_prompts(self) -> int:
        return len(self.seqs) // self.k

    def batch(self, rows: list, pad_token_id: int, device) -> tuple:
        """The k responses of each prompt in rows: (input_ids (len(rows) k, T), attention_mask)."""
        return padded([self.seqs[i * self.k + j] for i in rows for j in range(self.k)], pad_token_id, device)


# ==== MetaRM in TRL, Eqs. (9)-(11) ===========================================================================
@dataclass
class MetaRMRewardConfig(RewardConfig):
    """`trl.RewardConfig` plus MetaRM's three settings and the seed of X_s's draws."""

    eta: float = option(0.1, "ascent step eta of Eq. (10); 0 gives plain RewardTrainer")
    # phi' exists only during the forward (functional_call): a checkpointed layer recomputed in backward would
    # see phi, and its gradient would silently be taken there. RewardConfig's default is on (through the
    # deprecated alias gradient_checkpointing = True, which transformers copies into this field when it is None).
    activation_checkpointing: bool = option(False, "must stay False (refused by MetaRMRewardTrainer)")
    k: int = option(5, "responses per shifted prompt, Eq. (9)")
    shifted_batch_size: int = option(8, "shifted prompts per optimiser step (|X_s|)")
    shifted_seed: int = option(0, "seed of the draws of X_s (the same on every rank)")


class MetaRMRewardTrainer(RewardTrainer):
    """`trl.RewardTrainer` with the authors' first-order MetaRM update, Eqs. (9)-(11) of METHOD.md.

    Each optimiser step: draw X_s (the first shifted_batch_size prompts of a permutation, without replacement,
    from one generator seeded with shifted_seed: the same rows on every rank); delta = eta grad J(phi; X_s),
    Eqs. (9)(10); then every micro-batch's Bradley-Terry loss -- `RewardTrainer.compute_loss`, unchanged -- is
    evaluated at phi' = phi + delta by functional_call, and its gradient, taken at phi', is applied to phi by
    the trainer's optimiser, Eq. (11). With eta = 0, phi' = phi exactly and this is `RewardTrainer`.

    Args: as `RewardTrainer`, args a `MetaRMRewardConfig`, and shifted: X_s (`ShiftedSamples`) with args.k
    responses per prompt and at least args.shifted_batch_size prompts.
    """

    def __init__(self, model, args: MetaRMRewardConfig, shifted: ShiftedSamples, **kwargs):
        super().__init__(model, args=args, **kwargs)
        engine = self.accelerator.distributed_type
        parallel = self.accelerator.parallelism_config
        if engine not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU) or (
            parallel is not None and (parallel.non_data_parallel_size > 1 or parallel.dp_shard_enabled)
        ):
            raise ValueError(
                f"MetaRMRewardTrainer supports one process or DDP only (not {engine.value} or sharded / tensor "
                "parallelism): phi + delta needs every rank's full, unsharded parameters"
            )
        if args.activation_checkpointing:
            raise ValueError(
                "MetaRMRewardTrainer refuses activation (gradient) checkpointing: its backward would recompute "
                "layers at phi, not at phi' = phi + delta"
            )
        if shifted.k != args.k:
            raise ValueError(f"the shifted samples have k = {shifted.k} responses per prompt, args.k = {args.k}")
        if not 1 <= args.shifted_batch_size <= shifted.n_prompts:
            raise ValueError(f"shifted_batch_size = {args.shifted_batch_size} must be in 1 .. {shifted.n_prompts}")
        self.shifted = shifted
        self.shifted_generator = torch.Generator().manual_seed(args.shifted_seed)
        self.delta, self.delta_step = None, -1  # delta and the optimiser step it was taken at
        self.at_phi_prime = False  # True while training_step runs: compute_loss then evaluates at phi'
        self.J_log = []  # J(phi; X_s) at every optimiser step

    def _send_telemetry(self):
        """No usage report: this extra neither downloads nor uploads anything."""

    def draw_shifted_rows(self) -> list:
        """The rows of X_s for one optimiser step: shifted_batch_size distinct prompts."""
        permutation = torch.randperm(self.shifted.n_prompts, generator=self.shifted_generator)
        return permutation[: self.args.shifted_batch_size].tolist()

    def ascent_delta(self) -> tuple:
        """Eqs. (9)(10) at the current phi: (delta = eta grad_phi J(phi; X_s) by name, detached; J (float)).
        The unwrapped model is called (never the DDP wrapper: no gradient of J is averaged across ranks)."""
        model = self.model.train()  # the mode of the Bradley-Terry forward that follows
        phi = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters() if p.requires_grad}
        pad = self.processing_class.pad_token_id
        if pad is None:  # a tokenizer without a pad token: TRL pads with eos, and so do we
            pad = self.processing_class.eos_token_id
        input_ids, attention_mask = self.shifted.batch(self.draw_shifted_rows(), pad, self.accelerator.device)
        with self.compute_loss_context_manager():  # autocast, if any, as for L_BT
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
            r = functional_call(model, phi, args=(), kwargs=kwargs).logits.squeeze(-1)  # (|X_s| k,) r_phi(x, s_i)
        # Eq. (9): J = E_x (2/k^2) sum_{i<j} sigmoid(|r(x, s_i) - r(x, s_j)|), identical responses dropped
        J = metarm.difference_loss(r, self.args.k, metarm.distinct_pairs(input_ids, self.args.k))
        if not torch.isfinite(J):
            raise FloatingPointError(f"MetaRM: J(phi; X_s) = {J.item()} at optimiser step {self.state.global_step}")
        grad_J = torch.autograd.grad(J, list(phi.values()))
        # Eq. (10): phi' = phi + eta grad J(phi; X_s), a gradient-ascent step; delta carries no graph
        return {n: self.args.eta * g for n, g in zip(phi, grad_J)}, J.item()

    def phi_prime(self, model) -> dict:
        """phi' = phi + delta, named as in `model` (the DDP wrapper prefixes `module.`), with the graph to phi."""
        own_names = [n for n, _ in self.model.named_parameters()]
        named = list(model.named_parameters())
        assert [p for _, p in named] == [p for _, p in self.model.named_parameters()], "a wrapper reordered phi"
        return {name: p + self.delta[own] for (name, p), own in zip(named, own_names) if own in self.delta}

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Eqs. (9)-(11) for one micro-batch of X_t: delta once per optimiser step (at the accumulation cycle's
        first micro-batch), then `RewardTrainer`'s training step -- forward, L_BT, backward -- at phi'."""
        if self.delta_step != self.state.global_step:
            self.delta, J = self.ascent_delta()
            self.delta_step = self.state.global_step
            self.J_log.append(J)
            self._metrics["train"]["J"].append(J)
        self.at_phi_prime = True
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self.at_phi_prime = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`RewardTrainer.compute_loss` (Eq. (1), Bradley-Terry) with the model evaluated at phi' during
        training steps and at phi otherwise (evaluation)."""
        if not self.at_phi_prime:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        params = self.phi_prime(model)

        def model_at_phi_prime(**kwargs):
            return functional_call(model, params, args=(), kwargs=kwargs)

        return super().compute_loss(model_at_phi_prime, inputs, return_outputs, num_items_in_batch)


# ==== Models and tokenizers: the toy's, or a local checkpoint ==============================================
def toy_tokenizer(world: data.World) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the toy world's vocabulary (same ids as world.stoi, then <unk>): words split
    on whitespace, <eos> the eos, <pad> the pad (distinct), <bos> already written in every prompt."""
    vocab = {w: i for i, w in enumerate(world.vocab + [UNK])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: decode joins the words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=data.BOS, eos_token=data.EOS, pad_token=data.PAD, unk_token=UNK
    )


def toy_llama_config(tokenizer, hidden: int, layers: int, num_labels: int | None = None) -> LlamaConfig:
    """A tiny Llama (eager attention) over the toy vocabulary; num_labels=1 makes it a reward model."""
    extra = {} if num_labels is None else {"num_labels": num_labels}
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
        **extra,
    )


def toy_reward_model(tokenizer, hidden: int = 64, layers: int = 1, seed: int = 0, dtype=torch.float32):
    """A tiny Llama AutoModelForSequenceClassification (num_labels=1), initialised from torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    config = toy_llama_config(tokenizer, hidden, layers, num_labels=1)
    return AutoModelForSequenceClassification.from_config(config).to(dtype)


def check_model_path(path: str):
    """A local model folder (a config.json in it), else BadInput (nothing is looked up on the Hub)."""
    if not (Path(path) / "config.json").is_file():
        raise BadInput(f"{path}: not a local model folder (no config.json in it)")


def load_reward_model(path: str, dtype):
    """(model, tokenizer) from a local checkpoint: AutoModelForSequenceClassification with num_labels=1 (a
    causal LM gets a fresh score head) and its AutoTokenizer; BadInput if either cannot be read."""
    check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"{path}: cannot be loaded as a reward model ({str(e).splitlines()[0]})") from None
    if tokenizer.eos_token is None:
        raise BadInput(f"{path}: its tokenizer has no eos token")
    return model, tokenizer


def check_words(records: list, keys: tuple, vocab: dict, path: str):
    """Every whitespace-separated word of the records' texts is in the toy vocabulary, else BadInput."""
    for lineno, rec in enumerate(records, 1):
        for key in keys:
            for text in rec[key] if isinstance(rec[key], list) else [rec[key]]:
                unknown = [w for w in text.split() if w not in vocab]
                if unknown:
                    raise BadInput(
                        f"{path}: record {lineno}: word {unknown[0]!r} is not in the toy world's vocabulary "
                        "(give --model for your own model and tokenizer)"
                    )


@torch.no_grad()
def rewards(model, tokenizer, prompts: list, completions: list, batch_size: int = 256) -> torch.Tensor:
    """r_phi(x, y) (B,) of prompt + completion + eos, in batches."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch_size):
        chunk = zip(prompts[i : i + batch_size], completions[i : i + batch_size])
        seqs = [token_ids(tokenizer, x, y) for x, y in chunk]
        input_ids, attention_mask = padded(seqs, tokenizer.pad_token_id, device)
        out.append(model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float().cpu())
    return torch.cat(out)


def pair_accuracy(model, tokenizer, pairs: list) -> float:
    """Share of pairs with r(chosen) > r(rejected), a tie counting 1/2 (metarm.tie_accuracy)."""
    prompts = [p["prompt"] for p in pairs]
    r_chosen = rewards(model, tokenizer, prompts, [p["chosen"] for p in pairs])
    r_rejected = rewards(model, tokenizer, prompts, [p["rejected"] for p in pairs])
    return metarm.tie_accuracy(r_chosen - r_rejected).item()


# ==== Command `shifted`: X_s from a policy ===================================================================
@dataclass
class ShiftedArgs:
    out: str = option("", "the JSONL file to write (required)")
    policy: str = option("toy", "'toy' (pi_ref of the toy world) or a local causal LM folder")
    k: int = option(5, "responses per prompt (Eq. (9))")
    domains: str = option(",".join(data.TEST_DOMAINS), "toy policy: the domains whose prompts are used")
    prompts: str = option("", "a causal LM: JSONL with a 'prompt' per record (a pairs file works)")
    max_prompts: int = option(0, "use the first N distinct prompts (0: all)")
    sft_steps: int = option(300, "toy policy: SFT steps of pi_ref before sampling")
    temperature: float = option(1.2, "sampling temperature (the paper: a bit above 1)")
    max_new_tokens: int = option(16, "longest response")
    seed: int = option(0, "seed of SFT and sampling")


def toy_shifted(a: ShiftedArgs) -> list:
    """Records of X_s from the toy pi_ref: SFT for a.sft_steps (policy.sft), then k samples per prompt of
    a.domains at a.temperature (policy.sample, an explicit generator)."""
    domains = [d for d in a.domains.split(",") if d]
    unknown = [d for d in domains if d not in data.DOMAINS]
    if unknown or not domains:
        raise BadInput(f"--domains: unknown domains {unknown} (known: {', '.join(data.DOMAINS)})")
    world = data.World()
    model, _ = policy.train_pi_ref(world, a.sft_steps, seed=a.seed, progress=False)
    prompts = [x for d in domains for x in world.prompts[d]]
    if a.max_prompts:
        prompts = prompts[: a.max_prompts]
    generator = torch.Generator().manual_seed(a.seed)
    batch = policy.sample(
        model, {}, torch.tensor(prompts).repeat_interleave(a.k, dim=0), a.max_new_tokens, generator, a.temperature
    )
    idx = batch["idx"]  # (n k, P + L) = [x | y | pad]
    return [
        {
            "prompt": world.decode(x),
            "responses": [world.decode(idx[i * a.k + j, data.PROMPT_LEN :]) for j in range(a.k)],
        }
        for i, x in enumerate(prompts)
    ]


def causal_lm_shifted(a: ShiftedArgs) -> list:
    """Records of X_s from a local causal LM: k samples per distinct prompt of a.prompts (model.generate at
    a.temperature, no top-k / top-p, seeded with a.seed); a response stops after its first eos."""
    check_model_path(a.policy)
    if not a.prompts:
        raise BadInput("--prompts is required with a causal LM policy (a JSONL file with a 'prompt' per record)")
    prompts = list(dict.fromkeys(r["prompt"] for r in read_jsonl(a.prompts, {"prompt": str})))
    if a.max_prompts:
        prompts = prompts[: a.max_prompts]
    try:
        tokenizer = AutoTokenizer.from_pretrained(a.policy, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(a.policy, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise BadInput(f"{a.policy}: cannot be loaded as a causal LM ({str(e).splitlines()[0]})") from None
    torch.manual_seed(a.seed)
    records = []
    for x in prompts:
        enc = tokenizer(text=x, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=a.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=a.max_new_tokens,
                num_return_sequences=a.k,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        responses = []
        for y in out[:, enc["input_ids"].shape[1] :].tolist():  # (k, L) new tokens; after an eos: padding
            if tokenizer.eos_token_id in y:
                y = y[: y.index(tokenizer.eos_token_id) + 1]
            responses.append(tokenizer.decode(y).strip())
        records.append({"prompt": x, "responses": responses})
    return records


def write_jsonl(records: list, path: Path):
    """Write records as JSONL, atomically (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    tmp.replace(path)


def shifted_command(a: ShiftedArgs):
    if not a.out:
        raise BadInput("--out is required")
    if a.k < 2:
        raise BadInput("--k must be at least 2 (Eq. (9) compares responses to the same prompt)")
    if not (math.isfinite(a.temperature) and a.temperature > 0):
        raise BadInput("--temperature must be a finite number > 0")
    if a.sft_steps < 1:
        raise BadInput("--sft-steps must be >= 1")
    longest = policy.GPTConfig.block_size - data.PROMPT_LEN
    if a.policy == "toy" and not 1 <= a.max_new_tokens <= longest:
        raise BadInput(
            f"--max-new-tokens must be in 1 .. {longest} with the toy policy "
            f"(a {data.PROMPT_LEN}-token prompt, a {policy.GPTConfig.block_size}-token context)"
        )
    if a.max_new_tokens < 1:
        raise BadInput("--max-new-tokens must be >= 1")
    out = Path(a.out).resolve()
    if not out.parent.is_dir() or out.is_dir():
        raise BadInput(f"--out {out}: not a file in an existing folder")
    if a.policy == "toy" and a.prompts:
        raise BadInput("--prompts is for a causal LM policy; the toy policy samples the prompts of --domains")
    records = toy_shifted(a) if a.policy == "toy" else causal_lm_shifted(a)
    write_jsonl(records, out)
    print(f"wrote {len(records)} prompts x {a.k} responses to {out}")


# ==== Command `train`: a MetaRM reward model with TRL ========================================================
@dataclass
class TrainArgs:
    pairs: str = option("", "JSONL preference pairs: prompt, chosen, rejected (required)")
    shifted: str = option("", "JSONL shifted samples X_s: prompt, responses (required)")
    out: str = option("", "output folder: model, tokenizer, metrics.json (required)")
    eval_pairs: str = option("", "JSONL pairs for held-out accuracy (optional)")
    model: str = option("", "a local checkpoint folder; empty: a tiny Llama on the toy vocabulary")
    eta: float = option(0.1, "ascent step eta of Eq. (10) (0: plain Bradley-Terry)")
    k: int = option(5, "responses per shifted prompt; every record must have k")
    shifted_batch_size: int = option(8, "shifted prompts per optimiser step")
    steps: int = option(200, "optimiser steps")
    batch_size: int = option(32, "pairs per device per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    lr: float = option(1e-3, "AdamW learning rate (constant)")
    lora: bool = option(False, "train LoRA adapters and the score head (peft)")
    lora_r: int = option(8, "LoRA rank")
    hidden: int = option(64, "tiny Llama: hidden size")
    layers: int = option(1, "tiny Llama: layers")
    dtype: str = option("float32", "float32 or float64")
    seed: int = option(0, "seed of the model, the pairs' order and X_s's draws")


def train_command(a: TrainArgs):
    # ---- check every input before anything is written
    for name in ("pairs", "shifted", "out"):
        if not getattr(a, name):
            raise BadInput(f"--{name} is required")
    out = Path(a.out).resolve()
    cli.check_out(out, "metrics.json")  # on every rank before any work (prepare_out runs on the main process only)
    if a.dtype not in ("float32", "float64"):
        raise BadInput("--dtype must be float32 or float64")
    if a.k < 2 or a.steps < 1 or a.batch_size < 1 or a.grad_accum < 1 or a.shifted_batch_size < 1 or a.lora_r < 1:
        raise BadInput("--k must be >= 2 and --steps, --batch-size, --grad-accum, --shifted-batch-size, --lora-r >= 1")
    if not (math.isfinite(a.eta) and a.eta >= 0 and math.isfinite(a.lr) and a.lr > 0):
        raise BadInput("--eta must be a finite number >= 0 and --lr a finite number > 0")
    if not a.model and (a.layers < 1 or a.hidden < 4 or a.hidden % 4):
        raise BadInput("--layers must be >= 1 and --hidden a multiple of 4 (the tiny Llama's 4 heads), >= 4")
    pairs = read_pairs(a.pairs)
    shifted = read_shifted(a.shifted, a.k)
    eval_pairs = read_pairs(a.eval_pairs) if a.eval_pairs else None
    if a.shifted_batch_size > len(shifted):
        raise BadInput(f"--shifted-batch-size {a.shifted_batch_size} > the {len(shifted)} prompts of {a.shifted}")
    dtype = getattr(torch, a.dtype)
    if a.model:
        model, tokenizer = load_reward_model(a.model, dtype)
    else:
        tokenizer = toy_tokenizer(data.World())
        vocab = tokenizer.get_vocab()
        check_words(pairs, ("prompt", "chosen", "rejected"), vocab, a.pairs)
        check_words(shifted, ("prompt", "responses"), vocab, a.shifted)
        if eval_pairs:
            check_words(eval_pairs, ("prompt", "chosen", "rejected"), vocab, a.eval_pairs)
        model = toy_reward_model(tokenizer, a.hidden, a.layers, a.seed, dtype)
    tmp = out.with_name(out.name + ".partial")  # cli.prepare_out makes it on the main process

    # ---- train
    t0 = time.time()
    peft_config = None
    if a.lora:
        peft_config = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, target_modules="all-linear", task_type="SEQ_CLS")
    args = MetaRMRewardConfig(
        output_dir=str(tmp),
        eta=a.eta,
        k=a.k,
        shifted_batch_size=a.shifted_batch_size,
        shifted_seed=a.seed,
        max_steps=a.steps,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        seed=a.seed,
        bf16=False,
        activation_checkpointing=False,
        max_length=None,
        logging_steps=max(1, a.steps // 20),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )
    state = PartialState()  # the process group the config set up (one process, or one per rank)
    if state.is_main_process:
        cli.prepare_out(out, "metrics.json")
    state.wait_for_everyone()  # the folder exists before any rank writes into it
    trainer = MetaRMRewardTrainer(
        model,
        args=args,
        shifted=ShiftedSamples.from_records(shifted, tokenizer, a.k),
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    result = trainer.train()
    trainer.save_model(str(tmp))

    # ---- metrics (main process), then the finished folder replaces any earlier run
    if state.is_main_process:
        model = trainer.model.eval()
        log = [e for e in trainer.state.log_history if "loss" in e]
        metrics = {
            "config": asdict(a),
            "world_size": state.num_processes,
            "train_loss": result.training_loss,
            "loss_log": [{"step": e["step"], "loss": e["loss"], "J": e.get("J")} for e in log],
            "J": trainer.J_log,
            "eval_accuracy": pair_accuracy(model, tokenizer, eval_pairs) if eval_pairs else None,
            "n_eval_pairs": len(eval_pairs) if eval_pairs else 0,
            "seconds": time.time() - t0,
        }
        cli.write_json(tmp / "metrics.json", metrics)
        cli.publish(tmp, out)
        print(
            f"train loss {result.training_loss:.4f}, J {trainer.J_log[0]:.4f} -> {trainer.J_log[-1]:.4f}, "
            f"held-out accuracy {metrics['eval_accuracy']}; wrote {out}"
        )
    state.wait_for_everyone()


COMMANDS = {
    "shifted": (ShiftedArgs, shifted_command, "write shifted samples X_s (JSONL) from a policy"),
    "train": (TrainArgs, train_command, "train a MetaRM reward model with TRL"),
}


def main(argv: list) -> int:
    """`python hf.py {shifted,train} --flags`; a bad input is one line on stderr and exit code 2."""
    try:
        if not argv or argv[0] not in COMMANDS:
            raise BadInput(f"the first argument must be a command: {', '.join(COMMANDS)}")
        config_cls, command, description = COMMANDS[argv[0]]
        command(config_cls(**cli.parse(config_cls, argv[1:], f"hf.py {argv[0]}: {description}")))
    except cli.BadInput as e:
        print(f"hf.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
