"""Tests: each checks the code against an independent truth (closed forms, finite differences in
float64, explicit Hessians, enumeration), organised by module. Run: python -m pytest -q"""
import json
import math
import warnings

import pytest
import torch

import bilevel
import data
import metarm
import policy as P

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # inside torch.func.jvp


# ---- shared fixtures -----------------------------------------------------------------------------
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


# ---- data.py -------------------------------------------------------------------------------------
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


# ---- policy.py -----------------------------------------------------------------------------------
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


f64 = torch.float64


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=f64)


def _sym(n, cond, gen, shift=0.0):
    """Random symmetric matrix with eigenvalues log-spaced in [1, cond], minus shift."""
    Q = torch.linalg.qr(_randn(gen, n, n))[0]
    eigs = torch.logspace(0, math.log10(cond), n, dtype=f64) - shift
    return Q @ torch.diag(eigs) @ Q.T


def _matvec(A):
    """u -> A u for a dict holding one vector "x"."""
    return lambda u: {"x": A @ u["x"]}


def _flat(theta):
    return torch.cat([theta["a"], theta["b"].reshape(-1)])


def _unflat(w):
    return {"a": w[:3], "b": w[3:].reshape(2, -1)}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def quadratic(n=9, p=4, cond=20.0, seed=0, gamma=0.3):
    """g = ½θᵀAθ - θᵀ(Bφ + c), f = ½‖θ - θ_t‖² + ½γ‖φ‖², θ a two-key dict (n entries).
    Closed forms: θ* = A⁻¹(Bφ + c), v* = A⁻¹(θ* - θ_t), ∇F = Bᵀv* + γφ."""
    gen = torch.Generator().manual_seed(seed)
    A, B, c, target = _sym(n, cond, gen), _randn(gen, n, p), _randn(gen, n), _randn(gen, n)
    phi = {"phi": _randn(gen, p)}
    g = lambda th, ph: 0.5 * _flat(th) @ A @ _flat(th) - _flat(th) @ (B @ ph["phi"] + c)
    f = lambda th, ph: (0.5 * ((_flat(th) - target) ** 2).sum()
                        + 0.5 * gamma * (ph["phi"] ** 2).sum())
    theta_star = torch.linalg.solve(A, B @ phi["phi"] + c)
    v_star = torch.linalg.solve(A, theta_star - target)
    return dict(A=A, B=B, g=g, f=f, phi=phi, theta_star=_unflat(theta_star), v_star=v_star,
                theta0=_unflat(torch.zeros(n, dtype=f64)), grad=B.T @ v_star + gamma * phi["phi"],
                eigs=torch.linalg.eigvalsh(A))


def logistic(m=60, d=5, seed=0):
    """L2-regularised logistic regression, φ = log per-feature strengths; f = validation loss."""
    gen = torch.Generator().manual_seed(seed)
    X, Xv, w = _randn(gen, m, d), _randn(gen, m, d), _randn(gen, d)
    y, yv = torch.sign(X @ w + _randn(gen, m)), torch.sign(Xv @ w + _randn(gen, m))
    sp = torch.nn.functional.softplus
    g = lambda th, ph: (sp(-y * (X @ th["w"])).mean()
                        + 0.5 * (ph["log_lam"].exp() * th["w"] ** 2).sum())
    f = lambda th, ph: sp(-yv * (Xv @ th["w"])).mean()
    return g, f, {"log_lam": -3.0 + _randn(gen, d)}, {"w": torch.zeros(d, dtype=f64)}


# ---- bilevel.py: second-order products -----------------------------------------------------------
def test_hvp_matches_explicit_hessian_both_modes():
    """hvp (double backward, forward-over-reverse) equals torch.autograd.functional.hessian @ v."""
    gen = torch.Generator().manual_seed(1)
    W, x = _randn(gen, 4, 3), _randn(gen, 3)
    fn = lambda p: (torch.tanh(p["W"] @ x + p["b"]) ** 2).sum() + (p["b"] ** 3).sum()
    params, v = {"W": W, "b": _randn(gen, 4)}, {"W": _randn(gen, 4, 3), "b": _randn(gen, 4)}
    flat_fn = lambda z: fn({"W": z[:12].view(4, 3), "b": z[12:]})
    H = torch.autograd.functional.hessian(flat_fn, torch.cat([W.reshape(-1), params["b"]]))
    expected = H @ torch.cat([v["W"].reshape(-1), v["b"]])
    for mode in ["rev", "fwd"]:
        hv = bilevel.hvp(fn, params, v, mode=mode)
        assert torch.allclose(torch.cat([hv["W"].reshape(-1), hv["b"]]), expected, atol=1e-12)


def test_mixed_vjp_matches_explicit_jacobian():
    """mixed_vjp equals (∂_φ ∇_θ g)ᵀ v, the matrix from torch.autograd.functional.jacobian."""
    gen = torch.Generator().manual_seed(2)
    M, theta, phi, v = _randn(gen, 5, 3), _randn(gen, 5), _randn(gen, 3), _randn(gen, 5)
    g = lambda th, ph: (torch.sin(th["t"] @ M @ ph["p"])
                        + (th["t"] ** 2).sum() * (ph["p"] ** 2).sum())
    grad_theta = lambda ph: torch.func.grad(lambda t: g({"t": t}, {"p": ph}))(theta)  # (5,)
    mixed = torch.autograd.functional.jacobian(grad_theta, phi)  # (5, 3) = ∂_φ ∇_θ g
    out = bilevel.mixed_vjp(g, {"t": theta}, {"p": phi}, {"t": v})
    assert torch.allclose(out["p"], mixed.T @ v, atol=1e-12)


# ---- bilevel.py: solvers -------------------------------------------------------------------------
def test_cg_solves_spd_system_and_a_norm_error_decreases():
    """CG vs torch.linalg.solve: the A-norm error falls at every iteration; tol reached in ≈ n."""
    n, gen = 30, torch.Generator().manual_seed(3)
    A, b = _sym(n, 100.0, gen), {"x": _randn(gen, n)}
    x_true = torch.linalg.solve(A, b["x"])
    x, info = bilevel.cg(_matvec(A), b, max_iter=3 * n, tol=1e-12)
    assert info["converged"] and info["iterations"] <= 1.5 * n
    assert info["hvps"] == info["iterations"] and _rel(x["x"], x_true) < 1e-10
    a_norm = lambda e: float(torch.sqrt(e @ A @ e))
    errors = [a_norm(x_true)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a run truncated at k iterations returns the k-th iterate
        for k in range(1, info["iterations"] + 1):
            xk, info_k = bilevel.cg(_matvec(A), b, max_iter=k, tol=1e-12)
            errors.append(a_norm(xk["x"] - x_true))
            if info_k["residual_norm"] < 1e-10 * info["residual_norms"][0]:
                break
    assert len(errors) > n // 2 and all(e1 < e0 for e0, e1 in zip(errors, errors[1:]))


def test_cg_damping_solves_shifted_system():
    """cg with damping δ solves (H + δI) x = b for an indefinite H made PD by δ (linalg.solve)."""
    gen = torch.Generator().manual_seed(4)
    H, b, delta = _sym(10, 10.0, gen, shift=2.0), {"x": _randn(gen, 10)}, 3.0  # eigs in [-1, 8]
    x, info = bilevel.cg(_matvec(H), b, max_iter=50, tol=1e-13, damping=delta)
    assert info["converged"]
    assert _rel(x["x"], torch.linalg.solve(H + delta * torch.eye(10, dtype=f64), b["x"])) < 1e-10


def test_cg_warns_on_non_spd_and_max_iter_and_raises_on_nan():
    """cg warns with the residual on an indefinite H and at max_iter; NaN in b or in H u raises."""
    gen = torch.Generator().manual_seed(5)
    A, b = _sym(10, 10.0, gen), {"x": _randn(gen, 10)}
    with pytest.warns(UserWarning, match="not SPD.*residual norm"):
        _, info = bilevel.cg(_matvec(A - 5.0 * torch.eye(10, dtype=f64)), b, 50, 1e-12)
    assert not info["converged"] and info["negative_curvature"]
    with pytest.warns(UserWarning, match=r"max_iter\): residual norm"):
        _, info = bilevel.cg(_matvec(A), b, max_iter=2, tol=1e-12)
    assert info["iterations"] == 2 and not info["converged"]
    with pytest.raises(FloatingPointError):
        bilevel.cg(_matvec(A), {"x": torch.full((10,), float("nan"), dtype=f64)}, 5, 1e-8)
    with pytest.raises(FloatingPointError):
        bilevel.cg(lambda u: {"x": u["x"] * float("nan")}, b, max_iter=5, tol=1e-8)


def test_neumann_error_within_spectral_bound():
    """Neumann: v_J - v* = -(I - αA)^{J+1} v*, so ‖v_J - v*‖ ≤ max|1-αλ|^{J+1}‖v*‖, and the ∇F
    error ≤ ‖B‖₂ times that bound."""
    q = quadratic()
    alpha = 1.5 / float(q["eigs"].max())  # 0 < α < 2/λ_max
    rate = float((1 - alpha * q["eigs"]).abs().max())
    B_norm = float(torch.linalg.matrix_norm(q["B"], 2))
    I = torch.eye(len(q["eigs"]), dtype=f64)
    for J in [5, 20, 80]:
        bound = rate ** (J + 1) * float(q["v_star"].norm())
        grad, info = bilevel.hypergrad_implicit(q["f"], q["g"], q["theta_star"], q["phi"],
                                                "neumann", alpha=alpha, J=J)
        error = -torch.linalg.matrix_power(I - alpha * q["A"], J + 1) @ q["v_star"]
        assert torch.allclose(_flat(info["v"]) - q["v_star"], error, atol=1e-10)
        assert float((_flat(info["v"]) - q["v_star"]).norm()) <= bound * (1 + 1e-8)
        assert float((grad["phi"] - q["grad"]).norm()) <= B_norm * bound * (1 + 1e-8)
        assert info["hvps"] == J + 2  # J terms, 1 residual check, 1 mixed product


def test_neumann_damping_and_nan():
    """neumann with damping converges to (H + δI)⁻¹ b (linalg.solve); a NaN matvec raises."""
    gen = torch.Generator().manual_seed(6)
    H, b, delta = _sym(8, 5.0, gen), {"x": _randn(gen, 8)}, 0.5
    x, info = bilevel.neumann(_matvec(H), b, alpha=1 / (5.0 + delta), J=300, damping=delta,
                              tol=1e-10)
    assert info["converged"]
    assert _rel(x["x"], torch.linalg.solve(H + delta * torch.eye(8, dtype=f64), b["x"])) < 1e-10
    with pytest.raises(FloatingPointError):
        bilevel.neumann(lambda u: {"x": u["x"] * float("nan")}, b, alpha=0.1, J=3)


def test_lanczos_extreme_eigenvalues_of_indefinite_matrix():
    """Lanczos vs torch.linalg.eigvalsh: exact at m = n; Ritz values in [λ_min, λ_max] for m < n."""
    gen = torch.Generator().manual_seed(7)
    H = _sym(12, 20.0, gen, shift=4.0)  # eigenvalues in [-3, 16]
    eigs, v0 = torch.linalg.eigvalsh(H), {"x": _randn(gen, 12)}
    lo, hi, info = bilevel.lanczos_eigs(_matvec(H), v0, m=12)
    assert abs(lo - eigs[0]) < 1e-9 and abs(hi - eigs[-1]) < 1e-9 and lo < 0
    lo, hi, info = bilevel.lanczos_eigs(_matvec(H), v0, m=6)
    assert eigs[0] - 1e-12 <= lo <= hi <= eigs[-1] + 1e-12 and info["hvps"] == 6


# ---- bilevel.py: the lower level -----------------------------------------------------------------
def test_inner_solve_gd_rate_and_newton_on_quadratic():
    """GD error ≤ (1 - λ_min/λ_max)^T ‖θ0 - θ*‖ at lr = 1/λ_max; Newton reaches the closed form."""
    q, T = quadratic(), 50
    lam_min, lam_max = float(q["eigs"].min()), float(q["eigs"].max())
    theta, info = bilevel.inner_solve(q["g"], q["theta0"], q["phi"], T, 1 / lam_max)
    error = float((_flat(theta) - _flat(q["theta_star"])).norm())
    assert error <= (1 - lam_min / lam_max) ** T * float(_flat(q["theta_star"]).norm())
    assert info["steps"] == T and len(info["grad_norms"]) == T
    theta, info = bilevel.newton_solve(q["g"], q["theta0"], q["phi"], tol=1e-10)
    assert info["converged"] and _rel(_flat(theta), _flat(q["theta_star"])) < 1e-12


# ---- bilevel.py: hypergradients ------------------------------------------------------------------
def test_implicit_cg_matches_closed_form_quadratic():
    """Eq. (8) with CG equals the closed-form ∇F = BᵀA⁻¹(θ* - θ_t) + γφ to 1e-8 relative."""
    q = quadratic()
    for mode in ["rev", "fwd"]:
        grad, info = bilevel.hypergrad_implicit(q["f"], q["g"], q["theta_star"], q["phi"], "cg",
                                                hvp_mode=mode, max_iter=100, tol=1e-12)
        assert info["converged"] and _rel(grad["phi"], q["grad"]) < 1e-8


def test_unrolled_error_shrinks_with_T():
    """Unrolled hypergradient error vs the closed form: at T = 1000 < 1e-3 × its error at T = 10."""
    q = quadratic()
    lr = 1 / float(q["eigs"].max())
    error = {T: _rel(bilevel.hypergrad_unrolled(q["f"], q["g"], q["theta0"], q["phi"], T, lr)[0]
                     ["phi"], q["grad"]) for T in [10, 1000]}
    assert error[1000] < 1e-3 * error[10]


def test_implicit_ridge_regression_analytic_derivative():
    """Ridge: Eq. (8) equals ∇f_val · dθ*/dλ with dθ*/dλ = -(XᵀX + λI)⁻¹θ* (analytic)."""
    gen = torch.Generator().manual_seed(8)
    X, y, Xv, yv = _randn(gen, 40, 6), _randn(gen, 40), _randn(gen, 20, 6), _randn(gen, 20)
    lam = torch.tensor(0.7, dtype=f64)
    g = lambda th, ph: 0.5 * ((X @ th["w"] - y) ** 2).sum() + 0.5 * ph["lam"] * (th["w"] ** 2).sum()
    f = lambda th, ph: ((Xv @ th["w"] - yv) ** 2).mean()
    K = X.T @ X + lam * torch.eye(6, dtype=f64)
    theta_star = torch.linalg.solve(K, X.T @ y)
    expected = (2 / 20) * (Xv.T @ (Xv @ theta_star - yv)) @ -torch.linalg.solve(K, theta_star)
    grad, _ = bilevel.hypergrad_implicit(f, g, {"w": theta_star}, {"lam": lam}, "cg",
                                         max_iter=50, tol=1e-13)
    assert abs(float(grad["lam"]) - float(expected)) <= 1e-9 * abs(float(expected))


def test_implicit_logistic_matches_finite_differences():
    """Logistic regression: Eq. (8) at the Newton-solved θ* vs central differences, ≤ 1e-5 rel."""
    g, f, phi, theta0 = logistic()
    theta_star, info = bilevel.newton_solve(g, theta0, phi, tol=1e-12)
    assert info["converged"]
    grad, _ = bilevel.hypergrad_implicit(f, g, theta_star, phi, "cg", max_iter=100, tol=1e-12)
    F = lambda ph: f(bilevel.newton_solve(g, theta0, ph, tol=1e-12)[0], ph)
    assert _rel(grad["log_lam"], bilevel.hypergrad_fd_full(F, phi)["log_lam"]) < 1e-5
    d = {"log_lam": torch.linspace(-1, 1, 5, dtype=f64)}
    fd = bilevel.hypergrad_fd(F, phi, d)
    assert abs(fd - float(bilevel.dot(grad, d))) < 1e-5 * bilevel.norm(grad) * bilevel.norm(d)


def test_hypergrad_fd_on_known_function():
    """hypergrad_fd of F(φ) = Σ sin φ along d equals Σ cos(φ)·d to O(ε²)."""
    phi, d = {"p": torch.tensor([0.3, -1.2], dtype=f64)}, {"p": torch.tensor([1.0, 2.0], dtype=f64)}
    exact = float((torch.cos(phi["p"]) * d["p"]).sum())
    assert abs(bilevel.hypergrad_fd(lambda ph: torch.sin(ph["p"]).sum(), phi, d) - exact) < 1e-9


# ---- metarm.py: losses and Eq. (3) ---------------------------------------------------------------
def test_bt_and_dpo_losses_by_hand():
    """Eq. (1) and Eq. (2) on two pairs, computed by hand; a tie counts 1/2 in the accuracy."""
    loss, acc, margins = metarm.bt_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    want = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    assert loss.item() == pytest.approx(want) and acc.item() == 0.75 and margins.tolist() == [1.0, 0.0]
    loss, acc, _ = metarm.dpo_loss(torch.tensor([3.0, -1.0]), torch.tensor([1.0, 2.0]), beta_dpo=0.1)
    want = (math.log(1 + math.exp(-0.2)) + math.log(1 + math.exp(0.3))) / 2
    assert loss.item() == pytest.approx(want) and acc.item() == 0.5


@pytest.fixture(scope="module")
def enumerable():
    """A policy over 5 tokens (pad, bos, eos, a, b), prompt = <bos>, responses of at most 2 tokens:
    7 possible responses, so that every expectation can be computed exactly."""
    torch.manual_seed(0)
    model = P.GPT(P.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8), 5).double()
    model.requires_grad_(False)
    ys = [[2], [3, 2], [4, 2], [3, 3], [3, 4], [4, 3], [4, 4]]
    idx, mask = P.join([[1]] * len(ys), ys)
    reward = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -0.5, 1.5], dtype=torch.float64)
    return model, idx, mask, reward


def exact_logprobs(model, theta, idx, mask):
    """log pi_theta(y) and log pi_ref(y) of every enumerated response (they sum to one: checked)."""
    logp, logp_ref = P.logprob_and_ref(model, theta, idx, mask)
    assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-10)
    return logp.detach(), logp_ref


def test_kl_estimates_match_exact_kl(enumerable):
    """Sampled k1 and k3 estimates of KL(pi_theta || pi_ref) are within 5 standard errors of the
    exact KL computed by enumeration, at a pi_theta != pi_ref."""
    model, idx, mask, _ = enumerable
    gen = torch.Generator().manual_seed(0)
    theta = {n: p + 0.8 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
             for n, p in P.adapted_params(model, "head").items()}
    logp, logp_ref = exact_logprobs(model, theta, idx, mask)
    exact = (logp.exp() * (logp - logp_ref)).sum().item()
    assert exact > 0.05
    samples, smask = P.sample(model, theta, torch.ones(20000, 1, dtype=torch.long), 2, gen)
    k1, k3 = metarm.kl_estimates(*P.logprob_and_ref(model, theta, samples, smask))
    for est in (k1, k3):
        assert abs(est.mean().item() - exact) < 5 * est.std().item() / math.sqrt(len(est))


def test_adaptation_moves_policy_toward_the_kl_optimum(enumerable):
    """Eq. (3) by RLOO: the exact KL(pi_theta || pi*) with pi* proportional to pi_ref exp(r / beta)
    falls below half its value at pi_ref."""
    model, idx, mask, reward = enumerable
    beta = 1.0
    table = {tuple(row.tolist()): r for row, r in zip(idx, reward)}
    reward_fn = lambda s: torch.tensor([table[tuple(row.tolist())] for row in s], dtype=torch.float64)

    def kl_to_optimum(theta):
        logp, logp_ref = exact_logprobs(model, theta, idx, mask)
        log_star = torch.log_softmax(logp_ref + reward / beta, 0)
        return (logp.exp() * (logp - log_star)).sum().item()

    cfg = metarm.AdaptConfig(beta=beta, steps=150, prompts_per_step=16, k=4, lr=0.05, max_new_tokens=2)
    before = kl_to_optimum(P.adapted_params(model, "head"))
    theta, log = metarm.adapt(model, torch.ones(1, 1, dtype=torch.long), reward_fn, cfg,
                              torch.Generator().manual_seed(1))
    assert kl_to_optimum(theta) < 0.5 * before
    assert len(log) == cfg.steps and {"step", "reward", "kl_k1", "kl_k3", "gold"} <= set(log[0])


# ---- metarm.py: the lower level, Eqs. (4)(5) -----------------------------------------------------
@pytest.fixture(scope="module")
def candidates(world, tiny_gpt):
    """3 prompts x K=4 candidates sampled from the tiny pi_ref, prepared for the head adapter."""
    theta_ref = {n: p.detach() for n, p in P.adapted_params(tiny_gpt, "head").items()}
    prompts = torch.tensor([world.prompts[d][0] for d in ("bar", "hotel", "phone")]).repeat_interleave(4, 0)
    idx, mask = P.sample(tiny_gpt, {}, prompts, 10, torch.Generator().manual_seed(0))
    return theta_ref, metarm.prepare(tiny_gpt, idx, mask, theta_ref)


def test_importance_weights_uniform_at_theta_ref_and_softmax_of_log_ratios_elsewhere(tiny_gpt, candidates):
    """Eq. (4): w = 1/K at theta = theta_ref; at another theta, w = softmax_k of log pi_theta -
    log pi_ref computed by a full forward pass of the model (not from the cached trunk features)."""
    theta_ref, cand = candidates
    w = metarm.importance_weights(metarm.implicit_reward(tiny_gpt, theta_ref, cand), 4)
    torch.testing.assert_close(w, torch.full_like(w, 0.25), rtol=0, atol=1e-12)
    gen = torch.Generator().manual_seed(1)
    theta = {n: p + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in theta_ref.items()}
    w = metarm.importance_weights(metarm.implicit_reward(tiny_gpt, theta, cand), 4)
    logp, logp_ref = P.logprob_and_ref(tiny_gpt, theta, cand["idx"], cand["mask"])
    torch.testing.assert_close(w, torch.softmax((logp - logp_ref).view(-1, 4), -1), rtol=1e-9, atol=1e-12)
    assert (w - 0.25).abs().max() > 1e-3                       # theta really moved the weights


def test_reward_spread_and_standardised_by_hand():
    """§3's spread: two prompts, k = 2, r = (0, 1 | 0, 3): differences -1, -3 (std sqrt 2), reward
    std sqrt 2, spread 1; unchanged by r -> 5 r and by a constant per prompt in the numerator.
    §1's scale: standardised rewards have mean 0 and std 1 on the reference samples."""
    r = torch.tensor([0.0, 1.0, 0.0, 3.0])
    assert metarm.reward_spread(r, 2) == pytest.approx(1.0)
    assert metarm.reward_spread(5 * r, 2) == pytest.approx(1.0)
    shifted = r + torch.tensor([2.0, 2.0, -1.0, -1.0])
    assert metarm.reward_spread(shifted, 2) * shifted.std().item() == pytest.approx(math.sqrt(2))
    ref = torch.tensor([1.0, 2.0, 3.0, 6.0])
    f = metarm.standardised(lambda x: 2 * x + 1, ref)
    assert f(ref).mean().item() == pytest.approx(0.0, abs=1e-6) and f(ref).std().item() == pytest.approx(1.0)
    assert f(torch.tensor([4.0])).item() == pytest.approx((9.0 - 7.0) / (2 * ref.std().item()))


def test_lower_level_minimiser_over_free_weights_is_softmax_r_over_beta():
    """Eq. (5) minimised over free weight logits reaches the closed form w* = softmax(r / beta)."""
    r = torch.tensor([[1.0, -0.5, 0.3, 2.0], [0.0, 0.1, -1.0, 0.5]], dtype=torch.float64)
    beta = 0.7
    # one free logit per candidate, the last of each prompt pinned at 0 (the softmax's shift invariance)
    delta = lambda th: torch.cat([th["z"], torch.zeros(2, 1, dtype=torch.float64)], 1).flatten()
    g = lambda th, up: metarm.lower_objective(delta(th), up["r"], 4, beta)
    theta, _ = bilevel.inner_solve(g, {"z": torch.zeros(2, 3, dtype=torch.float64)}, {"r": r}, T=200, lr=2.0)
    theta, info = bilevel.newton_solve(g, theta, {"r": r}, tol=1e-11)      # not convex at delta = 0
    assert info["converged"]
    w = metarm.importance_weights(delta(theta), 4)
    torch.testing.assert_close(w, torch.softmax(r / beta, -1), rtol=0, atol=1e-9)


def test_inner_gradient_matches_finite_differences(tiny_gpt, candidates):
    """grad_theta g of Eq. (5) (head adapter, rho > 0) against float64 central differences."""
    theta_ref, cand = candidates
    r = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = lambda th: metarm.inner_loss(tiny_gpt, th, r, cand, 4, 0.5, 0.3, theta_ref)
    gen = torch.Generator().manual_seed(3)
    theta = {n: (p + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)).requires_grad_(True)
             for n, p in theta_ref.items()}
    grad = torch.autograd.grad(g(theta), list(theta.values()))
    u = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in theta.items()}
    eps = 1e-6
    fd = (g({n: theta[n] + eps * u[n] for n in theta}) - g({n: theta[n] - eps * u[n] for n in theta})) / (2 * eps)
    analytic = sum((gr * u[n]).sum() for gr, n in zip(grad, theta))
    assert analytic.item() == pytest.approx(fd.item(), rel=1e-7)


# ---- metarm.py: the bilevel hypergradient, Eqs. (6)-(8) ------------------------------------------
@pytest.fixture(scope="module")
def bilevel_setup(world, tiny_gpt):
    """Two domains x 3 prompts x K=4 fixed candidates from the tiny float64 pi_ref, 6 pairs each,
    a tiny float64 reward model (phi = all of its parameters), rho and the inner step from the
    measured curvature, damping 0."""
    gen = torch.Generator().manual_seed(0)
    theta_ref = {n: p.detach() for n, p in P.adapted_params(tiny_gpt, "head").items()}
    rm = P.make_reward_model(tiny_gpt, gen)
    with torch.no_grad():
        rm.head.weight.normal_(0.0, 1.0, generator=gen)
    phi = {n: p.detach().clone() for n, p in rm.named_parameters()}
    cfg = metarm.BilevelConfig(beta=0.5, beta_dpo=0.1, lam=0.5, K=4, cg_iters=500, cg_tol=1e-12)
    problems = {}
    for d in ("bar", "hotel"):
        prompts = torch.tensor(world.prompts[d][:3]).repeat_interleave(cfg.K, 0)
        idx, mask = P.sample(tiny_gpt, {}, prompts, 10, gen)
        problems[d] = metarm.domain_problem(tiny_gpt, theta_ref, metarm.prepare(tiny_gpt, idx, mask, theta_ref),
                                            world.pairs[d][:6])
    curv = [metarm.curvature(tiny_gpt, theta_ref, metarm.candidate_rewards(rm, phi, p["cand"], cfg.K).detach(),
                             p["cand"], cfg) for p in problems.values()]
    cfg.rho = max(c["rho"] for c in curv)
    cfg.inner_lr = min(c["inner_lr"] for c in curv)
    pairs = world.pairs["bar"][:4] + world.pairs["hotel"][:4]
    return rm, phi, theta_ref, problems, pairs, cfg, curv


def F_by_newton(tiny_gpt, rm, phi, theta_ref, problems, pairs, cfg):
    """F(phi) of Eq. (7), each lower level solved by Newton to |grad g| <= 1e-10."""
    F = 0.0
    for prob in problems.values():
        upper = {"r": metarm.candidate_rewards(rm, phi, prob["cand"], cfg.K).detach()}
        g, f = metarm.level_functions(tiny_gpt, prob, cfg, theta_ref)
        theta, info = bilevel.newton_solve(g, theta_ref, upper, tol=1e-10)
        assert info["converged"]
        F += f(theta, upper).item()
    (c, _), (rj, _) = metarm.pair_tensors(pairs)
    return F + cfg.lam * metarm.rm_bt_loss(rm, phi, c, rj)[0].item()


def test_rho_is_above_minus_lambda_min(tiny_gpt, bilevel_setup):
    """The measured lambda_min is negative (g is not convex) and rho exceeds -lambda_min; power
    iteration on (lambda_max I - H) at theta* confirms H + rho I is positive definite."""
    rm, phi, theta_ref, problems, _, cfg, curv = bilevel_setup
    assert min(c["lambda_min_ref"] for c in curv) < 0
    prob = problems["bar"]
    upper = {"r": metarm.candidate_rewards(rm, phi, prob["cand"], cfg.K).detach()}
    g, _ = metarm.level_functions(tiny_gpt, prob, cfg, theta_ref)
    theta, _ = bilevel.newton_solve(g, theta_ref, upper, tol=1e-10)
    H = lambda v: bilevel.hvp(lambda th: g(th, upper), theta, v)
    top = max(c["lambda_max_star"] for c in curv) + cfg.rho + 1.0
    v = {n: torch.ones_like(p) for n, p in theta.items()}
    for _ in range(2000):                       # power iteration on top I - H -> top - lambda_min(H)
        v = bilevel.add(bilevel.scale(top, v), H(v), -1.0)
        v = bilevel.scale(1 / bilevel.norm(v), v)
    Hv = H(v)
    lam_min = bilevel.dot(v, Hv).item()
    residual = bilevel.norm(bilevel.add(Hv, v, -lam_min))
    assert residual < 1e-3 * top                # v is an eigenvector, so lam_min is an eigenvalue ...
    assert lam_min > 0                          # ... the lowest one, and it is positive


def test_hypergradient_matches_finite_differences(tiny_gpt, bilevel_setup):
    """THE key test. Eq. (8) by IFT + CG (lower levels solved by Newton to 1e-10, damping 0) agrees
    with central finite differences of F along random directions to 1e-4 relative; the unrolled
    hypergradient's error at T = 400 is far below its error at T = 5, and so is the error of the
    path training takes (IFT + CG at theta_T, T inner gradient steps instead of Newton)."""
    rm, phi, theta_ref, problems, pairs, cfg, _ = bilevel_setup
    phi_leaf = P.copy_params(phi)
    grads, F, _ = metarm.outer_gradient(tiny_gpt, rm, phi_leaf, problems, pairs, cfg, theta_ref, newton_tol=1e-10)
    assert F == pytest.approx(F_by_newton(tiny_gpt, rm, phi, theta_ref, problems, pairs, cfg), rel=1e-10)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        u = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in phi.items()}
        ifd = sum((gr * u[n]).sum() for gr, n in zip(grads, phi)).item()
        eps = 1e-5
        fd = (F_by_newton(tiny_gpt, rm, {n: phi[n] + eps * u[n] for n in phi}, theta_ref, problems, pairs, cfg)
              - F_by_newton(tiny_gpt, rm, {n: phi[n] - eps * u[n] for n in phi}, theta_ref, problems, pairs, cfg)) / (2 * eps)
        assert abs(ifd - fd) <= 1e-4 * abs(fd)
    cfg_no_bt = metarm.BilevelConfig(**{**cfg.__dict__, "lam": 0.0})
    flat = lambda grads: torch.cat([g.flatten() for g in grads])
    exact = flat(metarm.outer_gradient(tiny_gpt, rm, phi_leaf, problems, pairs, cfg_no_bt, theta_ref, newton_tol=1e-10)[0])
    error = lambda grads: (flat(grads) - exact).norm().item() / exact.norm().item()
    unrolled = {T: metarm.outer_gradient(tiny_gpt, rm, phi_leaf, problems, pairs, cfg_no_bt, theta_ref,
                                         solver="unrolled", iters=T)[0] for T in (5, 400)}
    assert error(unrolled[400]) < 0.05 * error(unrolled[5])
    at_theta_T = {T: metarm.outer_gradient(tiny_gpt, rm, phi_leaf, problems, pairs,
                                           metarm.BilevelConfig(**{**cfg_no_bt.__dict__, "T": T}), theta_ref)[0]
                  for T in (5, 400)}
    assert error(at_theta_T[400]) < 0.05 * error(at_theta_T[5])


def test_reduction_to_rescaled_bradley_terry():
    """§2.2: with theta = free per-response logits over candidates that contain the pairs'
    responses (rho = 0, lam = 0), F(phi) = L_BT((beta_dpo / beta) r) and the IFT hypergradient
    equals that loss's gradient."""
    K, beta, beta_dpo = 5, 0.4, 0.1
    r = torch.tensor([[0.3, -1.2, 0.8, 2.0, -0.1]], dtype=torch.float64)
    win, lose = torch.tensor([3, 0, 2, 4]), torch.tensor([1, 1, 0, 1])       # pairs (y_w, y_l) by index
    # the softmax's shift invariance is removed by pinning the last logit at 0 (so rho = 0 is allowed)
    delta = lambda th: torch.cat([th["z"], torch.zeros(1, dtype=torch.float64)])
    g = lambda th, up: metarm.lower_objective(delta(th), up["r"], K, beta)
    f = lambda th, up: metarm.dpo_loss(delta(th)[win], delta(th)[lose], beta_dpo)[0]
    theta, _ = bilevel.inner_solve(g, {"z": torch.zeros(K - 1, dtype=torch.float64)}, {"r": r}, T=2000, lr=1.0)
    theta, info = bilevel.newton_solve(g, theta, {"r": r}, tol=1e-12)   # g is not convex at z = 0
    assert info["converged"]
    grad, _ = bilevel.hypergrad_implicit(f, g, theta, {"r": r}, solver="cg", max_iter=50, tol=1e-13)
    r_leaf = r.clone().requires_grad_(True)
    bt = metarm.bt_loss(beta_dpo / beta * r_leaf[0, win], beta_dpo / beta * r_leaf[0, lose])[0]
    assert f(theta, None).item() == pytest.approx(bt.item(), rel=1e-10)
    torch.testing.assert_close(grad["r"], torch.autograd.grad(bt, r_leaf)[0], rtol=1e-8, atol=1e-12)


# ---- metarm.py: MetaRM, Eqs. (9)-(11) ------------------------------------------------------------
def test_difference_loss_by_hand_and_duplicates_dropped():
    """Eq. (9) on k = 3 responses: (2/k^2) sum_{i<j} sigmoid(|r_i - r_j|); a duplicate pair is dropped."""
    r = torch.tensor([0.0, 1.0, 3.0])
    s = lambda x: 1 / (1 + math.exp(-x))
    idx = torch.tensor([[5, 6, 2], [7, 2, 0], [5, 6, 2]])                   # responses 0 and 2 identical
    distinct = metarm.distinct_pairs(idx, 3)
    assert distinct.tolist() == [[True, False, True]]                      # pairs (0,1), (0,2), (1,2)
    assert metarm.difference_loss(r, 3, torch.ones(1, 3, dtype=torch.bool)).item() == pytest.approx(
        2 / 9 * (s(1) + s(3) + s(2)))
    assert metarm.difference_loss(r, 3, distinct).item() == pytest.approx(2 / 9 * (s(1) + s(2)))


@pytest.fixture(scope="module")
def tiny_rm():
    """A ~340-parameter float64 reward model over 12 tokens, 6 pairs and 3 shifted prompts x k=3."""
    torch.manual_seed(0)
    rm = P.GPT(P.GPTConfig(vocab_size=12, block_size=8, n_layer=1, n_head=1, n_embd=4), 1).double()
    with torch.no_grad():
        for p in rm.parameters():
            p.add_(0.5 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    tokens = lambda n: torch.randint(3, 12, (n, 6), generator=gen)
    chosen, rejected, meta = tokens(6), tokens(6), tokens(9)
    phi = {n: p.detach().clone() for n, p in rm.named_parameters()}
    return rm, phi, chosen, rejected, meta, metarm.distinct_pairs(meta, 3)


def flat_fn(phi, fn):
    """fn(phi dict) as a function of one flat vector (for explicit Hessians and differences)."""
    shapes = [(n, p.shape, p.numel()) for n, p in phi.items()]

    def unflat(x):
        out, i = {}, 0
        for n, shape, k in shapes:
            out[n] = x[i:i + k].view(shape)
            i += k
        return out
    return (lambda x: fn(unflat(x))), torch.cat([p.flatten() for p in phi.values()]), unflat


def test_metarm_second_order_minus_first_order_is_eta_hessian_term(tiny_rm):
    """(11): the exact gradient minus the first-order one equals eta grad^2 J(phi) grad L_BT(phi'),
    with the Hessian built explicitly; the exact gradient matches finite differences of
    phi -> L_BT(phi + eta grad J(phi)); with eta = 0 both are the plain Bradley-Terry gradient."""
    rm, phi, chosen, rejected, meta, distinct = tiny_rm
    eta = 0.3
    J = lambda p: metarm.difference_loss(P.reward(rm, p, meta), 3, distinct)
    BT = lambda p: metarm.rm_bt_loss(rm, p, chosen, rejected)[0]
    d = P.reward(rm, phi, meta).view(-1, 3)
    assert (d[:, :, None] - d[:, None, :]).abs()[distinct.new_ones(3, 3).triu(1).expand(3, 3, 3)].min() > 1e-3
    Jx, x, unflat = flat_fn(phi, J)
    BTx, _, _ = flat_fn(phi, BT)
    grad_J = torch.func.grad(Jx)(x)
    x_prime = x + eta * grad_J                                            # Eq. (10)
    g_prime = torch.func.grad(BTx)(x_prime)
    H_J = torch.autograd.functional.hessian(Jx, x, vectorize=True)   # double backward: see README on LayerNorm
    flat = lambda g: torch.cat([t.flatten() for t in g.values()])
    second = flat(metarm.metarm_grad(rm, phi, chosen, rejected, meta, distinct, 3, eta, True)[0])
    first = flat(metarm.metarm_grad(rm, phi, chosen, rejected, meta, distinct, 3, eta, False)[0])
    torch.testing.assert_close(first, g_prime, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second - first, eta * H_J @ g_prime, rtol=1e-8, atol=1e-12)
    meta_objective = lambda y: BTx(y + eta * torch.func.grad(Jx)(y))
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    eps = 1e-6
    fd = (meta_objective(x + eps * u) - meta_objective(x - eps * u)) / (2 * eps)
    assert (second @ u).item() == pytest.approx(fd.item(), rel=1e-6)
    plain = torch.func.grad(BTx)(x)
    for order in (True, False):
        torch.testing.assert_close(flat(metarm.metarm_grad(rm, phi, chosen, rejected, meta, distinct, 3, 0.0, order)[0]),
                                   plain, rtol=1e-12, atol=1e-14)


# ---- train.py: the pipeline at a tiny scale, bad input, non-finite values -------------------------
import train  # noqa: E402

TINY_RUN = ["--quick", "--domains", "dev", "--sft-steps", "100", "--rm-steps", "20", "--adapt-steps", "12",
            "--adapt-lr", "0.03", "--metarm-steps", "2", "--bilevel-steps", "2", "--T", "5", "--eval-samples", "4",
            "--threads", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two tiny runs of the whole pipeline with the same seed, into two folders."""
    outs = [tmp_path_factory.mktemp("run") / "out" for _ in range(2)]
    for out in outs:
        assert train.main(TINY_RUN + ["--out", str(out)]) == 0
    return outs


def test_pipeline_writes_every_output_with_the_documented_schema(tiny_run):
    out = tiny_run[0]
    for name in ("results.json", "results.md", "samples.jsonl", "timings.json", "train_pairs.jsonl",
                 "dev_pairs.jsonl", "eval_pairs.jsonl", "gold_reward.png"):
        assert (out / name).is_file(), name
    assert not out.with_name("out.partial").exists() and not out.with_name("out.old").exists()
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(train.METHODS) and "out" not in results["config"]
    for m, metrics in results["methods"].items():
        assert set(metrics) == set(train.METRICS)
        for k, v in metrics.items():
            if k == "rm_accuracy" and m not in train.RM_METHODS:
                assert v is None
                continue
            assert v["std"] is None and len(v["per_seed"]) == 1 and v["mean"] == v["per_seed"][0]
            assert set(v["per_domain"]) == set(data.DEV_DOMAINS) and all(map(math.isfinite, v["per_domain"].values()))
    assert results["methods"]["sft"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(train.METHODS) * len(data.DEV_DOMAINS) * 32
    assert set(samples[0]) == {"method", "domain", "seed", "prompt", "response", "gold_reward"}
    world = data.World()
    for s in samples[:40]:                                   # gold rewards recomputed from the decoded text
        assert s["gold_reward"] == pytest.approx(world.gold_reward(s["domain"], world.encode(s["response"])))
    assert len(data.load_pairs_jsonl(world, out / "dev_pairs.jsonl")) == sum(len(world.pairs[d]) for d in data.DEV_DOMAINS)
    assert "| oracle |" in (out / "results.md").read_text()


def test_pipeline_oracle_beats_sft_in_gold_reward(tiny_run):
    methods = json.loads((tiny_run[0] / "results.json").read_text())["methods"]
    assert methods["oracle"]["gold_reward"]["mean"] > methods["sft"]["gold_reward"]["mean"] + 0.2


def test_same_seed_gives_the_same_results_json(tiny_run):
    assert (tiny_run[0] / "results.json").read_bytes() == (tiny_run[1] / "results.json").read_bytes()


def earlier_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("earlier run")
    return out


def one_line_error(capsys) -> str:
    """The stderr of a refused command: one line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0"], "--seeds"), (["--seeds", "1.5"], "--seeds"), (["--beta", "-1"], "--beta"),
    (["--beta", "nan"], "--beta"), (["--device", "tpu"], "--device"), (["--methods", "sft,ppo"], "--methods"),
    (["--figures", "maybe"], "--figures"), (["--no-such-flag"], "unrecognized")])
def test_bad_input_exits_2_with_one_line_and_keeps_earlier_results(tmp_path, capsys, args, words):
    out = earlier_run(tmp_path)
    assert train.main(args + ["--out", str(out)]) == 2
    assert words in one_line_error(capsys)
    assert (out / "results.json").read_text() == "earlier run" and not (tmp_path / "out.partial").exists()


def test_out_that_is_not_an_earlier_run_is_refused(tmp_path, capsys, monkeypatch):
    """`--out .` in a folder with other files must not swap that folder away."""
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--out", "."]) == 2
    assert "not an earlier run" in one_line_error(capsys)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path.parent / (tmp_path.name + ".partial")).exists()


def test_unwritable_out_is_bad_input(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert train.main(["--out", str(blocker / "sub" / "out")]) == 2
    assert "cannot be written" in one_line_error(capsys)


def test_non_finite_loss_stops_with_method_seed_and_step(world, tiny_gpt):
    rm = P.make_reward_model(tiny_gpt, torch.Generator().manual_seed(0))
    phi = P.adapted_params(rm, "all")
    with torch.no_grad():
        next(iter(phi.values())).fill_(float("nan"))
    cfg = metarm.RMConfig(steps=3, batch_size=4)
    with pytest.raises(FloatingPointError, match=r"vanilla_rm, seed 7: non-finite reward-model loss at step 0"):
        with train.stage("vanilla_rm", 7):
            metarm.train_reward_model(rm, phi, world.pooled_pairs(data.TRAIN_DOMAINS), cfg, torch.Generator().manual_seed(0))


def test_non_finite_hypergradient_stops_with_method_seed_and_step(tiny_gpt, bilevel_setup):
    """A reward model gone NaN: the first outer step stops, whichever check sees it first."""
    rm, phi, theta_ref, problems, pairs, cfg, _ = bilevel_setup
    bad = P.copy_params(phi)
    with torch.no_grad():
        bad["head.weight"].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"^bilevel, seed 3: .*finite.* at step 0$"):
        with train.stage("bilevel", 3):
            metarm.train_bilevel(tiny_gpt, rm, bad, problems, pairs, cfg, theta_ref,
                                 torch.Generator().manual_seed(0), steps=2)


def test_interrupted_run_leaves_earlier_results_and_no_partial_folder(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the run has started writing: exit 130, the earlier results.json untouched."""
    out = earlier_run(tmp_path)

    def interrupt(*args, **kwargs):
        assert (tmp_path / "out.partial" / "train_pairs.jsonl").is_file()   # the new run had begun writing
        raise KeyboardInterrupt
    monkeypatch.setattr(train.P, "sft", interrupt)
    assert train.main(["--quick", "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "earlier run"
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.old").exists()


@pytest.mark.parametrize("args", [["--device", "tpu"], ["--repeats", "-1"], ["--quick", "sometimes"]])
def test_bench_bad_input_exits_2_with_one_line(tmp_path, capsys, args):
    import bench
    assert bench.main(args + ["--out", str(tmp_path / "b")]) == 2
    assert one_line_error(capsys).startswith("bench.py: error:")
    assert not (tmp_path / "b").exists()
