"""What the bilevel method's hypergradient (8) is worth (METHOD.md §2.3, §2.5): measured, never assumed.

- hypergradient_accuracy: the gradient one outer step of training used, recomputed from what that step saw (phi,
  the warm starts, the drawn problems, the configuration; `checkpoints` collects them while training runs), against
  a float64 reference at the Newton-solved inner problems (`newton_reference`, built here from bilevel.newton_solve).
- hypergradient_error: the error of dF/dr against HVPs for CG, Neumann and unrolled on one real inner problem (a
  figure; study/bench.py times it).
"""

import copy
import statistics
import time
import warnings
from dataclasses import asdict, replace

import torch

import bilevel
import metarm
import policy


def to_float64(x):
    """A float64 CPU copy of a tensor, or of every tensor in a (nested) dict or tuple; other values as they are."""
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu() if x.is_floating_point() else x.detach().cpu()
    if isinstance(x, dict):
        return {k: to_float64(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(to_float64(v) for v in x)
    return x


def hypergradient_error(
    model,
    rm,
    theta_ref: dict,
    world,
    phi: dict,
    bcfg: metarm.BilevelConfig,
    curv: dict,
    domain: str = "restaurant",
    ns=(1, 2, 4, 8, 16, 32),
    timed: bool = False,
) -> dict:
    """Error of dF/dr against a reference vs HVPs, for CG (n iterations), Neumann and unrolled (4n terms
    or steps), on the real inner problem of one training domain at seed 0's bilevel RM (float64 copies).
    CG and Neumann solve at theta* (Newton, |grad g| <= 1e-9); unrolled runs its own inner steps from
    theta_ref. Reference: CG at theta* to a relative residual of 1e-12, itself checked against a central
    finite difference of F. training_setting: the hypergradient as one outer step would compute it from a
    cold start (T inner steps from theta_ref, then CG with cg_iters / cg_tol; training warm-starts).
    timed: add each row's seconds (bench.py only). model, rm: pi_ref and the reward model's architecture;
    curv: metarm.calibrate's result (rho and the inner step)."""
    model = copy.deepcopy(model).double().cpu()
    rm = copy.deepcopy(rm).double().cpu()
    phi = to_float64(phi)
    theta_ref = to_float64(theta_ref)
    bcfg = metarm.BilevelConfig(**{**asdict(bcfg), "rho": curv["rho"], "inner_lr": curv["inner_lr"]})
    prompts = torch.tensor(world.prompts[domain])
    candidate_prompts = prompts.repeat_interleave(bcfg.K, 0)
    cand = policy.sample(model, {}, candidate_prompts, bcfg.max_new_tokens, policy.generator(0))
    pairs = policy.encode_pairs(model, world.pairs[domain][:64])
    prob = {"cand": cand, "chosen": pairs[0], "rejected": pairs[1]}
    g, f = metarm.level_functions(model, prob, bcfg, theta_ref)
    with torch.no_grad():
        outer = {"r": metarm.candidate_rewards(rm, phi, cand, bcfg.K)}
    theta_gd, _ = bilevel.inner_solve(g, theta_ref, outer, 10 * bcfg.T, bcfg.inner_lr)  # g is not convex at theta_ref
    theta_star, newton = bilevel.newton_solve(g, theta_gd, outer, tol=1e-9)
    ref, _ = bilevel.hypergrad_implicit(f, g, theta_star, outer, "cg", max_iter=2000, tol=1e-12)

    def F(up):
        return f(bilevel.newton_solve(g, theta_star, up, tol=1e-9)[0], up)

    u = {"r": torch.randn(outer["r"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    fd = bilevel.hypergrad_fd(F, outer, u, eps=1e-4)
    solvers = {
        "cg": lambda n: bilevel.hypergrad_implicit(f, g, theta_star, outer, "cg", max_iter=n, tol=0.0),
        "neumann": lambda n: bilevel.hypergrad_implicit(
            f, g, theta_star, outer, "neumann", alpha=bcfg.inner_lr, J=4 * n
        ),
        "unrolled": lambda n: bilevel.hypergrad_unrolled(f, g, theta_ref, outer, 4 * n, bcfg.inner_lr),
    }

    def error(gr):
        return bilevel.norm(bilevel.add(gr, ref, -1.0)) / bilevel.norm(ref)

    curves = {name: [] for name in solvers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncated solves warn by design
        for name, solve in solvers.items():
            for n in ns:
                t = time.perf_counter()
                gr, info = solve(n)
                row = {"iters": n if name == "cg" else 4 * n, "hvps": info["hvps"], "error": error(gr)}
                curves[name].append({**row, "seconds": time.perf_counter() - t} if timed else row)
        theta_T, inner = bilevel.inner_solve(g, theta_ref, outer, bcfg.T, bcfg.inner_lr)
        gr, info = bilevel.hypergrad_implicit(f, g, theta_T, outer, "cg", max_iter=bcfg.cg_iters, tol=bcfg.cg_tol)
    training = {
        "T": bcfg.T,
        "cg_iters": bcfg.cg_iters,
        "cg_tol": bcfg.cg_tol,
        "hvps": info["hvps"],
        "inner_grad_norm": inner["grad_norm"],
        "error": error(gr),
    }
    return {
        "domain": domain,
        "newton_grad_norm": newton["grad_norm"],
        "fd_check_rel_error": abs(fd - bilevel.dot(ref, u).item()) / abs(fd),
        "curves": curves,
        "training_setting": training,
    }


# Below this cosine between the hypergradient training used and its reference (an outer step more than 37 degrees
# off), a run warns (report). The dev run's 30 checks gave 0.904 at the least: 0.8 leaves room for
# another machine's rounding and still catches a broken solve (one inner step and one CG iteration: about 0.5-0.7).
HYPERGRADIENT_COSINE_WARNING = 0.8


def hypergradient_accuracy(model, rm, theta_ref: dict, inputs: dict, n_domains: int, newton_tol: float = 1e-8) -> dict:
    """How accurate the hypergradient (8) that training used was, carried to phi: one outer step of
    metarm.train_bilevel recomputed from what it was computed from (`inputs`: phi, the warm starts, the
    drawn problems, cfg; the same float32 code, so the same numbers) against a float64 reference at the
    solved inner problem (newton_reference: 100 gradient steps then Newton to |grad g| <= newton_tol from the same
    warm starts, then CG to a relative residual of 1e-10). The lam L_BT term is left out of both: it is exact, and
    would only hide the error of the rest. Returns cosine, relative error ||g - g_ref|| / ||g_ref|| and ||g||."""
    cfg = replace(inputs["cfg"], lam=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="cg did not converge")  # as in training: cg_tol is loose by design
        used = metarm.outer_gradient(
            model, rm, inputs["phi"], inputs["problems"], None, cfg, theta_ref, n_domains, warm=dict(inputs["warm"])
        )[0]
    model64, rm64 = copy.deepcopy(model).double().cpu(), copy.deepcopy(rm).double().cpu()
    phi64 = {name: p.requires_grad_(True) for name, p in to_float64(inputs["phi"]).items()}
    # whatever --solver training used, the reference is CG: 100 gradient steps, then Newton, then CG to 1e-10
    ref_cfg = replace(cfg, solver="cg", T=10, cg_iters=2000, cg_tol=1e-10)
    ref = newton_reference(
        model64,
        rm64,
        phi64,
        to_float64(inputs["problems"]),
        ref_cfg,
        to_float64(theta_ref),
        n_domains,
        to_float64(inputs["warm"]),
        newton_tol,
    )
    g = torch.cat([x.detach().double().cpu().flatten() for x in used])
    g_ref = torch.cat([x.flatten() for x in ref])
    cosine = (g @ g_ref / (g.norm() * g_ref.norm())).item()
    return {"cosine": cosine, "rel_error": ((g - g_ref).norm() / g_ref.norm()).item(), "norm": g.norm().item()}


def newton_reference(model, rm, phi, problems: dict, cfg, theta_ref, n_domains: int, warm: dict, newton_tol: float):
    """The DPO part of metarm.outer_gradient's (7)(8), with each domain's inner problem (6) solved to
    |grad g| <= newton_tol so that the implicit function theorem's assumption holds: from the domain's warm start
    (else theta_ref), 10 T gradient steps (g is not convex far from theta*), then bilevel.newton_solve; v by CG to
    cfg.cg_tol; N/n scaling as in training. Raises FloatingPointError when Newton does not get there."""
    surrogate = 0.0
    scale = n_domains / max(1, len(problems))
    for d, prob in problems.items():
        r = metarm.candidate_rewards(rm, phi, prob["cand"], cfg.K)
        outer = {"r": r.detach()}
        g, f = metarm.level_functions(model, prob, cfg, theta_ref)
        theta_star, _ = bilevel.inner_solve(g, warm.get(d, theta_ref), outer, 10 * cfg.T, cfg.inner_lr)
        theta_star, newton = bilevel.newton_solve(g, theta_star, outer, tol=newton_tol)
        if not newton["converged"]:
            raise FloatingPointError(f"the inner problem was not solved to |grad g| <= {newton_tol}")
        dF, _ = bilevel.hypergrad_implicit(f, g, theta_star, outer, "cg", max_iter=cfg.cg_iters, tol=cfg.cg_tol)
        surrogate = surrogate + scale * (r * dF["r"]).sum()
    return list(torch.autograd.grad(surrogate, list(phi.values())))


def clone_generator(generator: torch.Generator) -> torch.Generator:
    """A generator on the same device in the same state: it draws what `generator` would draw next."""
    clone = torch.Generator(generator.device)
    clone.set_state(generator.get_state())
    return clone


def train_with_checkpoints(
    model, rm, phi, domains, bt_pairs, cfg, theta_ref, generator, bt_generator, steps=(), progress=None
):
    """metarm.train_bilevel, taken in parts so that before each outer step in `steps` what that step's
    hypergradient is computed from is kept (hypergradient_accuracy's inputs): phi, the warm starts, cfg (rho and the
    inner step as the step uses them) and the step's problems and lam-term pairs, drawn by metarm.draw_outer_batch
    from copies of the generators (the run itself is unchanged), and Adam's second moments before the step (zeros
    before the first; study.path_checks); steps outside the run are not kept. Returns (the training log, the inputs
    in step order)."""
    log, inputs, state = [], [], None
    for stop in sorted({k for k in steps if 0 <= k < cfg.outer_steps}) + [cfg.outer_steps]:
        done = 0 if state is None else state["step"]
        if stop > done:
            part, state = metarm.train_bilevel(
                model,
                rm,
                phi,
                domains,
                bt_pairs,
                cfg,
                theta_ref,
                generator,
                bt_generator,
                stop - done,
                state,
                progress,
            )
            log += part
        if stop < cfg.outer_steps:
            problems, lam_pairs = metarm.draw_outer_batch(
                model, domains, bt_pairs, cfg, clone_generator(generator), clone_generator(bt_generator)
            )
            warm = {} if state is None else dict(state["warm"])
            kept = {"phi": policy.copy_params(phi), "warm": warm, "problems": problems, "cfg": replace(cfg)}
            adam = {} if state is None else state["opt"].state  # Adam's second moments before the step (§5.4)
            second = [adam[p]["exp_avg_sq"].clone() if p in adam else torch.zeros_like(p) for p in phi.values()]
            inputs.append({"step": stop, **kept, "lam_pairs": lam_pairs, "exp_avg_sq": second})
    return log, inputs


def accuracy_checks(model, rm, theta_ref: dict, inputs: list, n_domains: int, progress=None) -> list:
    """hypergradient_accuracy of each kept step (train_with_checkpoints' inputs): {"step", "cosine", "rel_error",
    "norm"}; where the reference's Newton solve failed, cosine and rel_error None and "failed": why (the run goes
    on, and report warns). progress: a bar that shows each check's cosine."""
    checks = []
    for kept in inputs:
        try:
            accuracy = hypergradient_accuracy(model, rm, theta_ref, kept, n_domains)
        except FloatingPointError as e:
            accuracy = {"cosine": None, "rel_error": None, "failed": str(e)}
        checks.append({"step": kept["step"], **accuracy})
        policy.show(progress, {"step": kept["step"], "cosine": accuracy["cosine"]})
    return checks


def accuracy_steps(outer_steps: int) -> list:
    """The outer steps whose hypergradient is checked: the first (a cold start), the middle and the last."""
    return sorted({0, outer_steps // 2, outer_steps - 1})


def accuracy_summary(per_seed: list) -> dict:
    """results.json's hypergradient_accuracy: per_seed[seed] = [{"step", "cosine", "rel_error"}, ...]; the
    smallest and median cosine and the median and largest relative error, over all checks and per step. A
    check whose reference could not be computed (cosine None, "failed": why) is counted apart."""
    checks = [c for seed_checks in per_seed for c in seed_checks if c["cosine"] is not None]
    failed = sum(c["cosine"] is None for seed_checks in per_seed for c in seed_checks)

    def spread(rows: list) -> dict:
        cosines = [c["cosine"] for c in rows]
        errors = [c["rel_error"] for c in rows]
        return {
            "n": len(rows),
            "cosine_min": min(cosines),
            "cosine_median": statistics.median(cosines),
            "rel_error_median": statistics.median(errors),
            "rel_error_max": max(errors),
        }

    steps = sorted({c["step"] for c in checks})
    return {
        "what": "the hypergradient (8) training used, carried to phi (lam term left out), against a float64 "
        "reference at the Newton-solved inner problem",
        "warn_below_cosine": HYPERGRADIENT_COSINE_WARNING,
        "failed_checks": failed,
        "all": spread(checks) if checks else None,
        "by_step": {str(step): spread([c for c in checks if c["step"] == step]) for step in steps},
        "per_seed": per_seed,
    }


def report(summary: dict):
    """One line on the hypergradient's accuracy (accuracy_summary); a warning only for what a user must act on: a
    cosine below the stated threshold, or a check whose reference could not be computed."""
    if summary["failed_checks"]:
        warnings.warn(
            f"bilevel: {summary['failed_checks']} hypergradient accuracy check(s) could not compute their "
            "reference (results.json: hypergradient_accuracy, per_seed)"
        )
    accuracy = summary["all"]
    if accuracy is None:
        return
    print(
        f"hypergradient accuracy ({accuracy['n']} checks): cosine min {accuracy['cosine_min']:.4f}, median "
        f"{accuracy['cosine_median']:.4f}; relative error median {accuracy['rel_error_median']:.3f}, max "
        f"{accuracy['rel_error_max']:.3f}"
    )
    if accuracy["cosine_min"] < HYPERGRADIENT_COSINE_WARNING:
        warnings.warn(
            f"bilevel: a hypergradient training used has cosine {accuracy['cosine_min']:.3f} < "
            f"{HYPERGRADIENT_COSINE_WARNING} with its reference: raise --T or BilevelConfig.cg_iters "
            "(README, Troubleshooting)"
        )
