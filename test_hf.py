"""Tests of hf.py, the optional Hugging Face extra: MetaRM, Eqs. (9)-(11) of METHOD.md, in trl.RewardTrainer.

Skipped as a whole, with the reason, when the extra is not installed (pip install -r requirements-hf.txt).
Truths, in float64 on tiny Llama reward models built from the toy vocabulary (nothing is downloaded):
    test_toy_tokenizer_separator_eos_and_pad           prompt + completion -> the toy world's own token ids
    test_eta0_is_plain_reward_trainer                  eta = 0 through the ascent path == RewardTrainer, exactly
    test_applied_gradient_is_first_order_update_by_hand  the gradient the optimiser gets == grad L_BT(phi')
                                                         with phi' = phi + eta grad J(phi; X_s), by hand
    test_two_processes_match_the_rule                  DDP on 2 CPU processes: identical ranks, == one process
                                                         with the global batch and the same X_s
    test_engines_other_than_ddp_are_refused            DeepSpeed / FSDP are refused with a clear error
Commands: test_shifted_command_*, test_train_command_smoke (a smoke test, not a truth), test_bad_input_*; the
extra's documented names: test_the_extra_s_documented_names_resolve_and_nothing_imports_it.
"""

import importlib
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import data

REASON = "the optional Hugging Face extra is not installed: pip install -r requirements.txt -r requirements-hf.txt"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
trl = pytest.importorskip("trl", reason=REASON)
peft = pytest.importorskip("peft", reason=REASON)
datasets = pytest.importorskip("datasets", reason=REASON)
transformers = pytest.importorskip("transformers", reason=REASON)
hf = importlib.import_module("hf")  # it imports trl: only once the extra is known to be installed

REPO = Path(__file__).resolve().parent


# ---- tiny problems -----------------------------------------------------------------------------------------
def toy_pairs(world, domain: str, n: int) -> list:
    """n of the domain's labelled pairs as text records (as data.save_pairs_jsonl writes, separator added)."""
    out = []
    for p in world.pairs[domain][:n]:
        x = world.decode(p.prompt)
        out.append({"prompt": x, "chosen": " " + world.decode(p.chosen), "rejected": " " + world.decode(p.rejected)})
    return out


def toy_shifted_records(world, n: int, k: int) -> list:
    """n held-out prompts with k distinct behaviour responses each (a stand-in for a policy's samples)."""
    records = []
    for i, p in enumerate(world.eval_pairs["bakery"][:n]):
        responses = [world.decode(q.chosen) for q in world.eval_pairs["camera"][i * k : (i + 1) * k]]
        assert len(set(responses)) == k
        records.append({"prompt": world.decode(p.prompt), "responses": [" " + s for s in responses]})
    return records


TINY = dict(
    steps=2, batch=4, accum=1, eta=0.5, k=3, shifted_batch_size=2, optim="adamw_torch", lr=1e-2, checkpointing=False
)


def tiny_trainer(tokenizer, pairs, records, out, metarm=True, callbacks=None, **settings):
    """A float64 trainer (MetaRM's, or with metarm=False plain trl.RewardTrainer) on a 1-layer, 32-wide Llama
    reward model, seed 0, constant learning rate, no clipping; settings override TINY."""
    s = {**TINY, **settings}
    model = hf.toy_reward_model(tokenizer, hidden=32, layers=1, seed=0, dtype=torch.float64)
    common = dict(
        output_dir=str(out),
        max_steps=s["steps"],
        per_device_train_batch_size=s["batch"],
        gradient_accumulation_steps=s["accum"],
        learning_rate=s["lr"],
        lr_scheduler_type="constant",
        optim=s["optim"],
        max_grad_norm=0.0,
        seed=0,
        bf16=False,
        activation_checkpointing=s["checkpointing"],
        max_length=None,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1000,
        use_cpu=True,
    )
    kw = dict(train_dataset=datasets.Dataset.from_list(pairs), processing_class=tokenizer, callbacks=callbacks)
    if not metarm:
        return trl.RewardTrainer(model, args=trl.RewardConfig(**common), **kw)
    k = s["k"]
    args = hf.MetaRMRewardConfig(
        **common, eta=s["eta"], k=k, shifted_batch_size=s["shifted_batch_size"], shifted_seed=0
    )
    return hf.MetaRMRewardTrainer(
        model, args=args, shifted=hf.ShiftedSamples.from_records(records, tokenizer, k), **kw
    )


def params_of(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def world():
    return data.World()


@pytest.fixture(scope="module")
def tokenizer(world):
    return hf.toy_tokenizer(world)


# ---- truths --------------------------------------------------------------------------------------------------
def test_toy_tokenizer_separator_eos_and_pad(world, tokenizer):
    """prompt + completion is split into the toy world's own ids; eos is <eos>, pad is a distinct <pad>."""
    p = world.pairs["bar"][0]
    x, y = world.decode(p.prompt), world.decode(p.chosen)
    assert hf.with_separator(x, y) == " " + y and hf.with_separator(x + " ", y) == y
    assert hf.token_ids(tokenizer, x, hf.with_separator(x, y)) == p.prompt + p.chosen  # y ends in <eos>: not doubled
    assert hf.token_ids(tokenizer, x, " great") == p.prompt + [world.stoi["great"], world.stoi[data.EOS]]
    assert (tokenizer.eos_token, tokenizer.pad_token) == (data.EOS, data.PAD)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_eta0_is_plain_reward_trainer(world, tokenizer, tmp_path):
    """eta = 0, through the ascent path (grad J is computed and multiplied by 0), gives exactly the parameters of
    trl.RewardTrainer after 3 AdamW steps of 2 accumulated micro-batches (same seed, same data order)."""
    pairs, records = toy_pairs(world, "bar", 16), toy_shifted_records(world, 4, 3)
    final = {}
    for metarm in (False, True):
        trainer = tiny_trainer(
            tokenizer, pairs, records, tmp_path / str(metarm), metarm=metarm, steps=3, accum=2, eta=0.0
        )
        start = params_of(trainer.model)
        trainer.train()
        final[metarm] = params_of(trainer.model)
    assert len(trainer.J_log) == 3  # one J (one phi') per optimiser step, not per micro-batch
    assert any(not torch.equal(start[n], final[True][n]) for n in start)  # it trained
    for n in final[False]:
        assert torch.equal(final[False][n], final[True][n]), n


class RecordStep(transformers.TrainerCallback):
    """phi and the gradient the optimiser is about to apply, at every optimiser step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.steps.append(({n: p.detach().clone() for n, p in named}, {n: p.grad.clone() for n, p in named}))


def by_hand_update(model, tokenizer, phi, pairs, records, k, eta):
    """The authors' first-order update, written out: phi' = phi + eta grad J(phi; X_s), J of Eq. (9) summed over
    i < j by loops; then grad L_BT at phi', Eq. (11). Returns that gradient and grad L_BT at phi itself."""

    def reward(params, texts):
        seqs = [tokenizer(text=t)["input_ids"] for t in texts]
        T = max(len(s) for s in seqs)
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (T - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        return functional_call(model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}).logits[:, 0]

    def bt_loss(params):
        r_c = reward(params, [p["prompt"] + p["chosen"] for p in pairs])
        r_r = reward(params, [p["prompt"] + p["rejected"] for p in pairs])
        return -torch.nn.functional.logsigmoid(r_c - r_r).mean()

    phi = {n: v.clone().requires_grad_(True) for n, v in phi.items()}
    J = 0.0
    for rec in records:
        r = reward(phi, [rec["prompt"] + s for s in rec["responses"]])
        J = J + sum(2.0 / k**2 * torch.sigmoid((r[i] - r[j]).abs()) for i in range(k) for j in range(i + 1, k))
    J = J / len(records)
    grad_J = torch.autograd.grad(J, list(phi.values()))
    phi_prime = {n: (v + eta * g).detach().requires_grad_(True) for (n, v), g in zip(phi.items(), grad_J)}
    g_prime = torch.autograd.grad(bt_loss(phi_prime), list(phi_prime.values()))
    g_plain = torch.autograd.grad(bt_loss(phi), list(phi.values()))
    return dict(zip(phi, g_prime)), dict(zip(phi, g_plain))


@pytest.mark.parametrize("n_prompts,shifted_batch_size", [(3, 3), (5, 2)])
def test_applied_gradient_is_first_order_update_by_hand(world, tokenizer, tmp_path, n_prompts, shifted_batch_size):
    """eta = 0.5, SGD, 2 optimiser steps of 2 accumulated micro-batches of 4 pairs (all 8 pairs each step): the
    gradient handed to the optimiser equals the by-hand grad L_BT(phi + eta grad J(phi; X_s)) at the phi of
    that step, to 1e-10 (float64). X_s: all 3 prompts, or the documented draw -- the first 2 of
    torch.randperm(5) from a generator seeded with shifted_seed, one draw per optimiser step."""
    k, eta = 3, 0.5
    pairs, records = toy_pairs(world, "bar", 8), toy_shifted_records(world, n_prompts, k)
    rec = RecordStep()
    sgd = dict(steps=2, accum=2, eta=eta, k=k, shifted_batch_size=shifted_batch_size, optim="sgd", lr=0.5)
    trainer = tiny_trainer(tokenizer, pairs, records, tmp_path, callbacks=[rec], **sgd)
    trainer.train()
    generator = torch.Generator().manual_seed(0)
    assert len(rec.steps) == 2
    for phi, applied in rec.steps:
        rows = torch.randperm(n_prompts, generator=generator)[:shifted_batch_size].tolist()
        expected, plain = by_hand_update(trainer.model, tokenizer, phi, pairs, [records[i] for i in rows], k, eta)
        for n in phi:
            torch.testing.assert_close(applied[n], expected[n], rtol=1e-10, atol=1e-13, msg=n)
        assert max((expected[n] - plain[n]).abs().max().item() for n in phi) > 1e-4  # the ascent matters


DDP_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import json, torch, data, hf, test_hf
from accelerate import PartialState
tokenizer = hf.toy_tokenizer(data.World())
pairs, records = json.load(open({inputs!r}))
trainer = test_hf.tiny_trainer(tokenizer, pairs, records, {out!r}, steps=3, eta=0.5, k=3, shifted_batch_size=2)
trainer.train()
state = PartialState()
world, kind = state.num_processes, state.distributed_type.value
saved = {{"params": test_hf.params_of(trainer.model), "world": world, "type": kind}}
torch.save(saved, {out!r} + f"/rank{{state.process_index}}.pt")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_the_rule(world, tokenizer, tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 with no GPU visible (DDP over gloo on CPU; `--cpu` alone
    would start one process without mpirun), 3 AdamW steps of 4 pairs per rank: both ranks end with identical
    parameters, equal (1e-10) to one process taking 8 pairs per step with the same X_s -- the stated rule: every
    rank draws the same X_s, so phi' is the same on every rank and DDP averages gradients taken at one point."""
    pairs, records = toy_pairs(world, "bar", 8), toy_shifted_records(world, 5, 3)
    (tmp_path / "inputs.json").write_text(json.dumps([pairs, records]))
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), inputs=str(tmp_path / "inputs.json"), out=str(tmp_path)))
    launch = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no"
    port = ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    cmd = [sys.executable, *launch.split(), *port, str(script)]
    env = dict(
        os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1"
    )
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    assert [(r["world"], r["type"]) for r in ranks] == [(2, "MULTI_CPU")] * 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: on CPU, float64 gradients differ at ~1e-8 with the thread count
    try:
        single = tiny_trainer(
            tokenizer, pairs, records, tmp_path / "single", steps=3, batch=8, eta=0.5, k=3, shifted_batch_size=2
        )
        start = params_of(single.model)
        single.train()
    finally:
        torch.set_num_threads(threads)
    one = params_of(single.model)
    assert any(not torch.equal(start[n], one[n]) for n in one)
    for n in one:
        assert torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]), n
        torch.testing.assert_close(ranks[0]["params"][n], one[n], rtol=1e-10, atol=1e-12, msg=n)


def test_engines_other_than_ddp_are_refused(world, tokenizer, tmp_path, monkeypatch):
    """A DeepSpeed or FSDP accelerator (as reported by accelerate) is refused with a clear error; so is activation
    checkpointing (its backward would recompute layers at phi, not phi'), which MetaRMRewardConfig leaves off
    although trl.RewardConfig turns it on."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    pairs, records = toy_pairs(world, "bar", 4), toy_shifted_records(world, 2, 3)
    cpu = dict(output_dir=str(tmp_path), bf16=False, use_cpu=True)
    assert trl.RewardConfig(**cpu).activation_checkpointing is True
    assert hf.MetaRMRewardConfig(**cpu).activation_checkpointing is False
    with pytest.raises(ValueError, match="refuses activation"):
        tiny_trainer(tokenizer, pairs, records, tmp_path, checkpointing=True)
    for engine in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self, e=engine: e))
        with pytest.raises(ValueError, match="one process or DDP only"):
            tiny_trainer(tokenizer, pairs, records, tmp_path)


# ---- the commands ---------------------------------------------------------------------------------------------
TOY_SHIFTED = "shifted --k 4 --sft-steps 20 --max-prompts 24"  # pi_ref after 20 SFT steps: near-random text


def run_main(command: str, capsys):
    """hf.main on a command line (split on spaces): (exit code, stdout, stderr)."""
    code = hf.main(command.split())
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(world, tmp_path_factory):
    """The toy world's training pairs (every 5th: 2,000) and 40 evaluation pairs per training domain, as train.py
    writes them (JSONL), and X_s of the toy pi_ref (TOY_SHIFTED)."""
    d = tmp_path_factory.mktemp("files")
    data.save_pairs_jsonl(world, world.pooled_pairs(data.TRAIN_DOMAINS)[::5], d / "train_pairs.jsonl")
    data.save_pairs_jsonl(world, [p for t in data.TRAIN_DOMAINS for p in world.eval_pairs[t][:40]], d / "eval.jsonl")
    assert hf.main(f"{TOY_SHIFTED} --out {d}/shifted.jsonl".split()) == 0
    return d


def test_shifted_command_toy_policy(world, files, tmp_path, capsys):
    """X_s from the toy pi_ref: one record per held-out prompt (in world.prompts order), k = 4 responses of words
    of the vocabulary; the same seed writes the same file."""
    text = (files / "shifted.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    expected = [world.decode(x) for d in data.TEST_DOMAINS for x in world.prompts[d]][:24]
    assert [r["prompt"] for r in records] == expected
    assert all(len(r["responses"]) == 4 for r in records)
    assert all(w in world.stoi for r in records for s in r["responses"] for w in s.split())
    assert run_main(f"{TOY_SHIFTED} --out {tmp_path}/again.jsonl", capsys)[0] == 0
    assert (tmp_path / "again.jsonl").read_text() == text


def test_shifted_command_causal_lm(tokenizer, files, tmp_path, capsys):
    """X_s from a local Hugging Face causal LM (a tiny Llama saved to a folder): k responses per distinct prompt
    of the pairs file, in order of first appearance."""
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(hf.toy_llama_config(tokenizer, 32, 1))
    lm.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    command = f"shifted --policy {tmp_path}/lm --prompts {files}/train_pairs.jsonl --k 2 --max-prompts 3"
    assert run_main(f"{command} --max-new-tokens 5 --out {tmp_path}/s.jsonl", capsys)[0] == 0
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in (files / "train_pairs.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == list(dict.fromkeys(prompts))[:3]
    assert all(len(r["responses"]) == 2 and all(1 <= len(s.split()) <= 5 for s in r["responses"]) for r in records)


def test_train_command_smoke(files, capsys):
    """Smoke test, not a truth: 150 MetaRM steps (eta 0.1, k 4, 4 shifted prompts and 32 pairs per step) on every
    5th training pair of the 10 training domains (2,000 pairs), X_s from TOY_SHIFTED; the held-out pair accuracy
    on 40 evaluation pairs per training domain (world.eval_pairs, 400 pairs) must exceed 0.7 (chance: 0.5). Then
    a --lora run of 5 steps from the saved model (a local checkpoint) writes an adapter and finite metrics."""
    given = f"--pairs {files}/train_pairs.jsonl --shifted {files}/shifted.jsonl --k 4"
    command = f"train {given} --shifted-batch-size 4 --eval-pairs {files}/eval.jsonl --steps 150 --out {files}/rm"
    code, _, err = run_main(command, capsys)
    assert code == 0, err
    metrics = json.loads((files / "rm" / "metrics.json").read_text())
    assert len(metrics["J"]) == 150 and metrics["n_eval_pairs"] == 400
    assert metrics["eval_accuracy"] > 0.7, metrics["eval_accuracy"]
    assert (files / "rm" / "model.safetensors").is_file() and (files / "rm" / "tokenizer.json").is_file()
    code, _, err = run_main(f"train {given} --model {files}/rm --lora --steps 5 --out {files}/lora", capsys)
    assert code == 0, err
    lora = json.loads((files / "lora" / "metrics.json").read_text())
    assert (files / "lora" / "adapter_config.json").is_file() and all(map(math.isfinite, lora["J"]))


def test_bad_input_is_one_line_and_keeps_earlier_outputs(files, tmp_path, capsys):
    """Missing columns, k not matching the records, a folder that is not a model, unreadable JSON, a missing file
    and an unknown word: each is one 'hf.py: error:' line on stderr, exit code 2, and an earlier run survives."""
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "metrics.json").write_text("{}")
    x = "<bos> <bar> honestly the beer was"
    (tmp_path / "no_rejected.jsonl").write_text(json.dumps({"prompt": x, "chosen": "great . <eos>"}) + "\n")
    (tmp_path / "unknown.jsonl").write_text(json.dumps({"prompt": x, "chosen": "yummy", "rejected": "bad"}) + "\n")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x", "responses": ["a", "b"\n')
    good = f"train --pairs {files}/train_pairs.jsonl --shifted {files}/shifted.jsonl --out {tmp_path}/earlier"
    cases = [
        ("missing or mistyped fields ['rejected']", f"{good} --k 4 --pairs {tmp_path}/no_rejected.jsonl"),
        ("expected k = 5", f"{good} --k 5"),
        ("not a local model folder", f"{good} --k 4 --model {tmp_path}"),
        ("not JSON", f"{good} --k 4 --shifted {tmp_path}/broken.jsonl"),
        ("cannot be read", f"{good} --k 4 --eval-pairs {tmp_path}/missing.jsonl"),
        ("not in the toy world's vocabulary", f"{good} --k 4 --pairs {tmp_path}/unknown.jsonl"),
        ("not a local model folder", f"shifted --policy {tmp_path} --prompts {files}/eval.jsonl --out {tmp_path}/s"),
        ("must be a command", "fit"),
        ("--eta must be a finite number >= 0", f"{good} --k 4 --eta -1"),
        ("--lr a finite number > 0", f"{good} --k 4 --lr inf"),
        ("a multiple of 4", f"{good} --k 4 --hidden 30"),
        ("--layers must be >= 1", f"{good} --k 4 --layers 0"),
        ("--sft-steps must be >= 1", f"shifted --sft-steps 0 --out {tmp_path}/s"),
        ("--max-new-tokens must be in 1 .. 18", f"shifted --max-new-tokens 19 --out {tmp_path}/s"),
    ]
    for message, command in cases:
        code, out, err = run_main(command, capsys)
        assert code == 2 and err.startswith("hf.py: error: ") and err.count("\n") == 1, (message, err)
        assert message in err, (message, err)
    assert (tmp_path / "earlier" / "metrics.json").read_text() == "{}" and not (tmp_path / "s").exists()


def test_the_extra_s_documented_names_resolve_and_nothing_imports_it():
    """Every `hf.name` and `hf_bilevel.name` that README.md and METHOD.md name exists (the core's names:
    study/test_layout.py); no module of the reference or the study imports hf or hf_bilevel."""
    from conftest import ROOT, documented_names, resolve

    names = [n for n in documented_names() if n.split(".")[0] in ("hf", "hf_bilevel")]
    assert all(resolve(n) for n in names), [n for n in names if not resolve(n)]
    extra = ("hf.py", "test_hf.py", "hf_bilevel.py", "test_hf_bilevel.py")
    for path in list(ROOT.glob("*.py")) + list((ROOT / "study").glob("*.py")):
        if path.name not in extra:
            assert not re.search(r"^\s*(import|from) hf(_bilevel)?\b", path.read_text(), re.M), path
