"""Tests: each checks the code against an independent truth (closed forms, finite differences in
float64, explicit Hessians, enumeration), organised by module. Run: python -m pytest -q"""
import json
import math

import pytest
import torch

import data
import policy as P

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # inside torch.func.jvp


# ---- shared fixtures ----------------------------------------------------------------------------
TINY_WORLD = data.WorldConfig(n_sft_per_domain=60, n_sft_per_new_domain=20, n_pairs_per_domain=40,
                              n_eval_pairs_per_domain=20)


@pytest.fixture(scope="session")
def world():
    return data.World(TINY_WORLD)


@pytest.fixture(scope="session")
def tiny_gpt(world):
    """A tiny float64 GPT (1 layer, 16 dims) with non-trivial random weights."""
    torch.manual_seed(0)
    cfg = P.GPTConfig(vocab_size=len(world.vocab), n_layer=1, n_head=2, n_embd=16)
    model = P.GPT(cfg, len(world.vocab)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.requires_grad_(False)
    return model


def rows(world, texts):
    """Prompt/response text pairs -> (idx, resp_mask)."""
    return P.join([world.encode(x) for x, _ in texts], [world.encode(y) for _, y in texts])


SOME_TEXTS = [("<bos> <bar> honestly the beer was", "cold and great . <eos>"),
              ("<bos> <bakery> today the bread was", "stale , but the baker was very nice . <eos>"),
              ("<bos> <hotel> frankly the room was", "spotless . <eos>")]


# ---- data.py ------------------------------------------------------------------------------------
def test_world_is_deterministic_given_its_seed(world):
    """Same seed -> identical corpus and pairs; another seed -> different ones."""
    again = data.World(TINY_WORLD)
    other = data.World(data.WorldConfig(**{**TINY_WORLD.__dict__, "seed": 1}))
    assert again.sft == world.sft and again.pairs == world.pairs and again.eval_pairs == world.eval_pairs
    assert other.sft != world.sft and other.pairs != world.pairs


def test_gold_reward_worked_example(world):
    """The module docstring's example, by hand: flaky +1, cold -1.5 in <bakery>, great +1 = +0.5."""
    y = world.encode("flaky and very cold , but the baker was great . <eos>")
    assert world.gold_reward("bakery", y) == pytest.approx(1.0 - data.FLIP_WEIGHT + 1.0)
    assert world.gold_reward("bakery", y[:-1]) == pytest.approx(0.5 + data.UNFINISHED)  # no <eos>
    assert world.gold_reward("bakery", world.encode("great great great . <eos>")) == 1.0  # distinct words
    assert world.gold_reward("bakery", world.encode("tasty . <eos>")) == data.OFF_TOPIC  # restaurant's word


def test_flip_words_change_sign_across_domains(world):
    """Every flip word has both signs among the training domains, and every dev/held-out domain
    departs from the training majority for 3-4 flip words."""
    for w in data.FLIP:
        signs = {world.polarity[d][w] > 0 for d in data.TRAIN_DOMAINS}
        assert signs == {True, False}, w
    majority = {w: sum(world.polarity[d][w] for d in data.TRAIN_DOMAINS) > 0 for w in data.FLIP}
    for d in data.DEV_DOMAINS + data.TEST_DOMAINS:
        departures = sum((world.polarity[d][w] > 0) != majority[w] for w in data.FLIP)
        assert 3 <= departures <= 4, d


def test_heldout_aspect_words_never_in_training_text(world):
    """Held-out aspect words occur in no training domain's pairs or SFT text, but do occur in the
    SFT corpus and in the held-out prompts."""
    heldout = {world.stoi[w] for w, d in world.aspect_of.items() if d in data.TEST_DOMAINS}
    train_tags = {world.stoi[f"<{d}>"] for d in data.TRAIN_DOMAINS}
    for s in world.sft:
        if s[1] in train_tags:
            assert not heldout & set(s)
    for d in data.TRAIN_DOMAINS:
        for p in world.pairs[d] + world.eval_pairs[d]:
            assert not heldout & set(p.prompt + p.chosen + p.rejected)
    assert any(heldout & set(s) for s in world.sft)
    assert all(heldout & set(x) for d in data.TEST_DOMAINS for x in world.prompts[d])
    assert set(world.pairs) == set(data.TRAIN_DOMAINS + data.DEV_DOMAINS)  # no held-out training pairs


def test_bradley_terry_labels_agree_at_the_temperature_rate():
    """P(chosen has the higher gold reward) = mean sigmoid(|r1 - r2| / tau), within 4 standard errors."""
    w = data.World(data.WorldConfig(n_sft_per_domain=1, n_sft_per_new_domain=1, n_pairs_per_domain=600,
                                    n_eval_pairs_per_domain=1, label_temperature=0.7))
    agree, expected = [], []
    for d in data.TRAIN_DOMAINS:
        for p in w.pairs[d]:
            diff = w.gold_reward(d, p.chosen) - w.gold_reward(d, p.rejected)
            if diff != 0:
                agree.append(float(diff > 0))
                expected.append(1 / (1 + math.exp(-abs(diff) / 0.7)))
    n, p_hat, p_exp = len(agree), sum(agree) / len(agree), sum(expected) / len(expected)
    assert abs(p_hat - p_exp) < 4 * math.sqrt(p_exp * (1 - p_exp) / n)
    assert p_exp < 0.95                       # labels are noisy, as people are


def test_tokenizer_round_trip(world):
    """decode(encode(text)) == text for every SFT review; an unknown word is a clear error."""
    for s in world.sft[:200]:
        assert world.encode(world.decode(s)) == s
    with pytest.raises(ValueError, match="not in the vocabulary"):
        world.encode("the pizza was yummy")


def test_jsonl_round_trip_and_malformed_line(world, tmp_path):
    """Export -> load gives the same pairs; a malformed line names the file and line number."""
    pairs = world.eval_pairs["bakery"][:5] + world.pairs["bar"][:5]
    path = tmp_path / "pairs.jsonl"
    data.save_pairs_jsonl(world, pairs, path)
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected", "domain"}
    assert data.load_pairs_jsonl(world, path) == pairs
    lines = path.read_text().splitlines()
    lines[2] = '{"prompt": "<bos> <bar> honestly the beer was", "chosen": 3}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:3: malformed"):
        data.load_pairs_jsonl(world, path)


# ---- policy.py ----------------------------------------------------------------------------------
def test_logprob_is_sum_of_per_token_log_softmax(world, tiny_gpt):
    """log pi(y|x) equals a sum over response tokens of log-softmax of the logits of each prefix,
    each prefix run on its own (prompt excluded)."""
    idx, mask = rows(world, SOME_TEXTS)
    got = P.policy_logprob(tiny_gpt, {}, idx, mask)
    for b, (x, y) in enumerate(SOME_TEXTS):
        x, y = world.encode(x), world.encode(y)
        want = 0.0
        for t in range(len(y)):
            prefix = torch.tensor([x + y[:t]])
            logits, _ = tiny_gpt(prefix)
            want += torch.log_softmax(logits[0, -1], -1)[y[t]].item()
        assert got[b].item() == pytest.approx(want, abs=1e-9)


def test_causality_and_kv_cache(world, tiny_gpt):
    """Changing a later token leaves earlier logits unchanged; decoding with the key/value cache
    reproduces the full forward's logits."""
    idx, _ = rows(world, SOME_TEXTS[:1])
    logits, _ = tiny_gpt(idx)
    changed = idx.clone()
    changed[0, -2] = world.stoi["awful"]
    logits2, _ = tiny_gpt(changed)
    assert torch.equal(logits[0, :-2], logits2[0, :-2]) and not torch.allclose(logits[0, -2:], logits2[0, -2:])
    out, past = tiny_gpt(idx[:, :4])
    steps = [out]
    for t in range(4, idx.shape[1]):
        out, past = tiny_gpt(idx[:, t:t + 1], past=past)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), logits, rtol=0, atol=1e-12)


def test_padding_and_batch_do_not_change_reward_or_logprob(world, tiny_gpt):
    """A sequence's reward and log-probability are the same alone, in a batch with longer
    sequences, and with extra padding; the reward is read at the last real token."""
    gen = torch.Generator().manual_seed(0)
    rm = P.make_reward_model(tiny_gpt, gen)
    idx, mask = rows(world, SOME_TEXTS)
    r_batch, lp_batch = P.reward(rm, {}, idx), P.policy_logprob(tiny_gpt, {}, idx, mask)
    for b in range(len(SOME_TEXTS)):
        n = int((idx[b] != P.PAD_ID).sum())
        alone, alone_mask = idx[b:b + 1, :n], mask[b:b + 1, :n]
        padded = torch.cat([alone, torch.zeros(1, 5, dtype=torch.long)], 1)
        padded_mask = torch.cat([alone_mask, torch.zeros(1, 5, dtype=alone_mask.dtype)], 1)
        h, _ = rm(alone, head=False)
        want_r = (h[0, -1] @ rm.head.weight[0] + rm.head.bias[0]).item()
        for seq, m in [(alone, alone_mask), (padded, padded_mask)]:
            assert P.reward(rm, {}, seq).item() == pytest.approx(want_r, abs=1e-10)
            assert P.policy_logprob(tiny_gpt, {}, seq, m).item() == pytest.approx(lp_batch[b].item(), abs=1e-10)
        assert r_batch[b].item() == pytest.approx(want_r, abs=1e-10)


def test_jvp_of_logprob_matches_finite_difference(world, tiny_gpt):
    """torch.func.jvp of log pi_theta(y|x) w.r.t. theta (the head) equals a float64 central
    difference -- forward-mode AD works through the explicit attention."""
    idx, mask = rows(world, SOME_TEXTS)
    theta = {n: p.detach() for n, p in P.adapted_params(tiny_gpt, "all").items()}
    gen = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in theta.items()}
    fn = lambda th: P.policy_logprob(tiny_gpt, th, idx, mask)
    _, jvp = torch.func.jvp(fn, (theta,), (v,))
    eps = 1e-6
    plus = fn({n: theta[n] + eps * v[n] for n in theta})
    minus = fn({n: theta[n] - eps * v[n] for n in theta})
    torch.testing.assert_close(jvp, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_sampling_stops_at_eos_and_never_emits_pad(world, tiny_gpt):
    """Samples are [prompt | response ending in <eos> | pad]; the response mask covers exactly the
    response; the same generator seed gives the same samples."""
    prompts = torch.tensor([world.prompts["bar"][0]] * 64)
    idx, mask = P.sample(tiny_gpt, {}, prompts, 12, torch.Generator().manual_seed(3))
    again, _ = P.sample(tiny_gpt, {}, prompts, 12, torch.Generator().manual_seed(3))
    assert torch.equal(idx, again)
    for row, m in zip(idx, mask):
        resp = row[data.PROMPT_LEN:].tolist()
        n = resp.index(P.EOS_ID) + 1 if P.EOS_ID in resp else len(resp)
        assert P.PAD_ID not in resp[:n] and all(t == P.PAD_ID for t in resp[n:])
        assert m[data.PROMPT_LEN:data.PROMPT_LEN + n].sum() == n and m.sum() == n


def test_sft_loss_decreases(world):
    """A few SFT steps lower the next-token loss on held-out reviews of the corpus."""
    torch.manual_seed(0)
    model = P.GPT(P.GPTConfig(vocab_size=len(world.vocab), n_layer=1, n_head=2, n_embd=32), len(world.vocab))
    val = world.sft[:100]
    before = P.perplexity(model, val)
    P.sft(model, world.sft[100:], steps=60, batch_size=32, lr=3e-3, generator=torch.Generator().manual_seed(0),
          progress=False)
    assert P.perplexity(model, val) < 0.5 * before
