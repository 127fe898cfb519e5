"""Hypergradients of a bilevel problem over parameter dicts: §2.3 of METHOD.md.

The bilevel paper (Jia, arXiv 2402.14760) differentiates F(φ) = f(θ*(φ), φ) with
θ*(φ) = argmin_θ g(θ, φ). Here are the pieces of Eq. (8) -- Hessian-vector products (HVPs), the
mixed product, the CG and Neumann solvers, Lanczos for the curvature of §2.1 -- the inner solve of
Eq. (6), the unrolled alternative and the finite-difference reference: pure functions over
parameter dicts (name -> tensor; a vector is a dict with the same keys and shapes) that know nothing
of language models. Each returns (result, info: HVPs used, residual norm). `python bilevel.py`: error vs HVPs.

Symbols (METHOD.md) -> names:
    θ, φ                theta, phi    inner (lower-level) and outer (upper-level) parameter dicts
    g(θ, φ)             g             inner loss, Eq. (5): g(theta, phi) -> scalar tensor
    f(θ, φ)             f             outer loss, F(φ) = f(θ*(φ), φ), Eq. (7): f(theta, phi)
    θ*(φ)               theta_star    argmin_θ g(θ, φ), Eq. (6)
    H = ∇²_θθ g(θ*, φ)  matvec        the inner Hessian, only ever applied to a vector
    v = H⁻¹ ∇_θ f       v             solution of the linear system of Eq. (8)
    δ                   damping       the solvers solve (H + δI) x = b
    α, J                alpha, J      Neumann step size and number of terms
    T, lr               T, lr         inner gradient-descent steps and their step size, Eq. (6)
    m, ε                m, eps        Lanczos iterations, finite-difference step
"""

import math
import warnings
from typing import Callable

import torch
from torch.func import grad as func_grad
from torch.func import jvp

Params = dict[str, torch.Tensor]


# ---- vectors in parameter space -----------------------------------------------------------------
def dot(a: Params, b: Params) -> torch.Tensor:
    """Inner product Σ_k <a[k], b[k]> over all entries (0-dim tensor)."""
    return sum((a[k] * b[k]).sum() for k in a)


def add(a: Params, b: Params, alpha: float = 1.0) -> Params:
    """a + alpha·b."""
    return {k: a[k] + alpha * b[k] for k in a}


def scale(alpha: float, a: Params) -> Params:
    """alpha·a."""
    return {k: alpha * a[k] for k in a}


def norm(a: Params) -> float:
    """Euclidean norm over all entries, as a Python float."""
    return math.sqrt(float(dot(a, a).detach()))


def _detach(a: Params) -> Params:
    return {k: t.detach() for k, t in a.items()}


def _leaves(a: Params) -> Params:
    """Fresh leaf tensors that require grad (the caller's tensors are not touched)."""
    return {k: t.detach().requires_grad_(True) for k, t in a.items()}


def _grads(out: torch.Tensor, *dicts: Params, create_graph: bool = False) -> list[Params]:
    """∂out/∂(each dict), one dict per argument; zeros where out does not depend on a tensor."""
    flat = [t for d in dicts for t in d.values()]
    gs = iter(
        torch.autograd.grad(out, flat, create_graph=create_graph, allow_unused=True, materialize_grads=True)
        if out.requires_grad
        else [torch.zeros_like(t) for t in flat]
    )
    return [{k: next(gs) for k in d} for d in dicts]


def _check_finite(x, what: str):
    """Raise instead of propagating NaN/inf: a solver that diverged says so."""
    if not all(bool(torch.isfinite(t).all()) for t in (x.values() if isinstance(x, dict) else [x])):
        raise FloatingPointError(f"{what} is not finite (NaN or inf): the solve diverged")


# ---- second-order products ----------------------------------------------------------------------
def hvp(fn: Callable[[Params], torch.Tensor], params: Params, v: Params, mode: str = "rev") -> Params:
    """Hessian-vector product H v, H = ∇² fn(params): the unit of cost of §2.3.

    Args:
        fn: params dict -> scalar tensor, twice differentiable.  v: dict shaped like params.
        params: the point where H is taken (treated as a constant; not modified).
        mode: "rev" = double backward, ∇[∇fn · v] (the default: the cheaper one here, README: Performance);
            "fwd" = forward-over-reverse, the JVP of ∇fn along v (torch.func: no in-place ops, no .item()).
    Returns: H v, a dict of detached tensors.
    """
    if mode == "rev":
        params = _leaves(params)
        grad = _grads(fn(params), params, create_graph=True)[0]
        return _detach(_grads(dot(grad, _detach(v)), params)[0])
    if mode == "fwd":
        return _detach(jvp(func_grad(fn), (_detach(params),), (_detach(v),))[1])
    raise ValueError(f"mode must be 'rev' or 'fwd', got {mode!r}")


def mixed_vjp(g: Callable, theta: Params, phi: Params, v: Params) -> Params:
    """The mixed product ∂_φ [∇_θ g(θ, φ) · v] of Eq. (8), v held constant (cost ≈ one HVP).

    Args: g(theta, phi) -> scalar; theta, phi: where it is taken; v: dict shaped like theta.
    Returns: a dict shaped like phi (detached).
    """
    theta, phi = _leaves(theta), _leaves(phi)
    grad_theta = _grads(g(theta, phi), theta, create_graph=True)[0]
    return _detach(_grads(dot(grad_theta, _detach(v)), phi)[0])


# ---- linear solvers and curvature ---------------------------------------------------------------
def damped(matvec: Callable[[Params], Params], damping: float) -> Callable[[Params], Params]:
    """u -> (H + damping I) u, from u -> H u (matvec itself when damping is 0)."""
    if not damping:
        return matvec

    def damped_matvec(u):
        return add(matvec(u), u, damping)

    return damped_matvec


def cg(
    matvec: Callable[[Params], Params],
    b: Params,
    max_iter: int,
    tol: float,
    damping: float = 0.0,
    x0: Params | None = None,
) -> tuple[Params, dict]:
    """Conjugate gradient for (H + δI) x = b, the solve v = H⁻¹ ∇_θ f of Eq. (8).

    Assumes H + δI symmetric positive definite (hence ρ > -λ_min in Eq. (5)). One matvec per
    iteration; the residual r = b - (H + δI)x is tracked by the recurrence (no extra matvec).
    Stops at ‖r‖ ≤ tol·‖b‖ (relative). Warns with the residual norm if max_iter comes first or on
    pᵀ(H + δI)p ≤ 0 (stops there: not SPD). Raises FloatingPointError on a non-finite value.

    Args: matvec: u -> H u on dicts.  b: right-hand side.  max_iter.  tol: relative.
        damping: δ ≥ 0.  x0: initial guess (default zero; a given one costs one more matvec).
    Returns: x, info = {"iterations", "hvps", "residual_norm", "residual_norms" (per iterate,
        x0 first), "converged", "negative_curvature"}.
    """
    A = damped(matvec, damping)
    _check_finite(b, "cg: right-hand side b")
    if x0 is None:
        x, r, hvps = {k: torch.zeros_like(t) for k, t in b.items()}, dict(b), 0
    else:
        x, r, hvps = dict(x0), add(b, A(x0), -1.0), 1
    p, rr, b_norm = r, dot(r, r), norm(b)
    history, iterations, negative_curvature = [math.sqrt(float(rr))], 0, False
    while history[-1] > tol * b_norm and iterations < max_iter:
        Ap = A(p)
        hvps, iterations = hvps + 1, iterations + 1
        pAp = dot(p, Ap)
        _check_finite(pAp, "cg: pᵀ(H + δI)p")
        if pAp <= 0:
            negative_curvature = True
            break
        # x ← x + a p, r ← r - a (H + δI)p, a = rᵀr / pᵀ(H + δI)p
        a = rr / pAp
        x, r = add(x, p, a), add(r, Ap, -a)
        rr_new = dot(r, r)
        _check_finite(rr_new, "cg: residual")
        p, rr = add(r, p, rr_new / rr), rr_new  # next direction, (H + δI)-conjugate to the others
        history.append(math.sqrt(float(rr)))
    converged = history[-1] <= tol * b_norm
    if not converged:
        why = "pᵀ(H + δI)p ≤ 0: H + δI is not SPD" if negative_curvature else "max_iter"
        warnings.warn(
            f"cg did not converge ({why}): residual norm {history[-1]:.3e} > "
            f"tol·‖b‖ = {tol * b_norm:.3e} after {iterations} iterations"
        )
    return x, {
        "iterations": iterations,
        "hvps": hvps,
        "residual_norm": history[-1],
        "residual_norms": history,
        "converged": converged,
        "negative_curvature": negative_curvature,
    }


def neumann(
    matvec: Callable[[Params], Params], b: Params, alpha: float, J: int, damping: float = 0.0, tol: float | None = None
) -> tuple[Params, dict]:
    """Neumann series x_J = α Σ_{j=0..J} (I - αA)^j b ≈ A⁻¹ b, A = H + δI: the solve of Eq. (8).

    Assumes A symmetric with eigenvalues λ_i in (0, 2/α), i.e. 0 < α < 2/λ_max. Then
    x_J - x* = -(I - αA)^{J+1} x*: the error shrinks like max_i |1 - αλ_i|^{J+1}. J matvecs make
    the series and one more the exact final residual ‖A x_J - b‖ = ‖(I - αA)^{J+1} b‖, so
    hvps = J + 1. Warns if that residual exceeds ‖b‖ (not contracting: α too large or H not PD)
    or a given tol·‖b‖. Raises FloatingPointError on a non-finite value.

    Args: matvec: u -> H u.  b: right-hand side.  alpha: α.  J: terms after the first.
        damping: δ ≥ 0.  tol: optional relative tolerance, only for the "converged" flag.
    Returns: x, info = {"iterations" (= J), "hvps", "residual_norm", "residual_norms" (of
        x_0..x_J), "converged" (None without tol)}.
    """
    A = damped(matvec, damping)
    _check_finite(b, "neumann: right-hand side b")
    r, x, history = dict(b), scale(alpha, b), []  # r_j = (I - αA)^j b = b - A x_{j-1}; x_0 = α b
    for j in range(J + 1):
        # A⁻¹ = α Σ_j (I - αA)^j:  r_{j+1} = (I - αA) r_j,  x_{j+1} = x_j + α r_{j+1}
        r = add(r, A(r), -alpha)
        _check_finite(r, "neumann: term (I - αA)^j b")
        history.append(norm(r))
        if j < J:
            x = add(x, r, alpha)
    b_norm = norm(b)
    converged = None if tol is None else history[-1] <= tol * b_norm
    if history[-1] > b_norm or converged is False:
        warnings.warn(
            f"neumann: residual norm {history[-1]:.3e} after J = {J} (‖b‖ = "
            f"{b_norm:.3e}); it contracts only for 0 < α < 2/λ_max and H + δI PD"
        )
    return x, {
        "iterations": J,
        "hvps": J + 1,
        "residual_norm": history[-1],
        "residual_norms": history,
        "converged": converged,
    }


def lanczos_eigs(matvec: Callable[[Params], Params], v0: Params, m: int) -> tuple[float, float, dict]:
    """λ_min and λ_max of a symmetric H by m Lanczos iterations with full reorthogonalisation
    (§2.1: measure λ_min(∇²_θθ g) to choose the proximal ρ > -λ_min). The Ritz values (eigenvalues
    of the tridiagonal T = QᵀHQ) lie in [λ_min, λ_max], approach the extremes first, and are exact
    once m ≥ dim (or an invariant subspace is found).

    Args: matvec: u -> H u.  v0: start vector (nonzero).  m: iterations (= HVPs).
    Returns: (lambda_min, lambda_max, info = {"iterations", "hvps", "ritz_values"}).
    """
    Q, alphas, betas = [scale(1.0 / norm(v0), v0)], [], []
    for j in range(m):
        w = matvec(Q[j])
        _check_finite(w, "lanczos: H q")
        alphas.append(float(dot(Q[j], w)))
        for _ in range(2):  # w ← w - Σ_i (q_iᵀw) q_i: subsumes the three-term recurrence
            for q in Q:
                w = add(w, q, -float(dot(q, w)))
        beta = norm(w)
        if j == m - 1 or beta <= 1e-10 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        Q.append(scale(1.0 / beta, w))
    off = torch.diag(torch.tensor(betas, dtype=torch.float64), 1)  # (len(alphas), len(alphas))
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64)) + off + off.T  # tridiagonal QᵀHQ
    ritz = torch.linalg.eigvalsh(T)
    return (
        float(ritz[0]),
        float(ritz[-1]),
        {"iterations": len(alphas), "hvps": len(alphas), "ritz_values": ritz.tolist()},
    )


# ---- the inner problem, Eq. (6) -----------------------------------------------------------------
def inner_solve(
    g: Callable, theta0: Params, phi: Params, T: int, lr: float, create_graph: bool = False
) -> tuple[Params, dict]:
    """Eq. (6): T steps of gradient descent θ_{t+1} = θ_t - lr ∇_θ g(θ_t, φ) from θ_0.

    Args:
        g: g(theta, phi) -> scalar.  theta0: start, treated as a constant.  phi: outer dict.
        T: steps.  lr: step size (converges for lr < 2/λ_max when g is strongly convex).
        create_graph: keep every step's graph so that θ_T can be differentiated w.r.t. phi (whose
            tensors must then require grad): the unrolled hypergradient.
    Returns: theta_T (detached unless create_graph), info = {"steps", "grads" (T + 1), "grad_norm"
        (‖∇_θ g‖ at θ_T, one extra gradient), "grad_norms" (at θ_0..θ_{T-1})}.
    """
    theta, history = _leaves(theta0), []
    for _ in range(T):
        grad = _grads(g(theta, phi), theta, create_graph=create_graph)[0]
        _check_finite(grad, "inner_solve: ∇_θ g")
        history.append(norm(grad))
        theta = add(theta, grad, -lr)
        theta = theta if create_graph else _leaves(theta)
    last = _leaves(theta)
    grad_norm = norm(_grads(g(last, _detach(phi)), last)[0])
    theta = theta if create_graph else _detach(theta)
    return theta, {"steps": T, "grads": T + 1, "grad_norm": grad_norm, "grad_norms": history}


def newton_solve(
    g: Callable,
    theta0: Params,
    phi: Params,
    tol: float = 1e-10,
    max_iter: int = 50,
    cg_max_iter: int = 200,
    cg_tol: float = 1e-12,
) -> tuple[Params, dict]:
    """Eq. (6) solved to ‖∇_θ g‖ ≤ tol, so that the IFT's assumption ∇_θ g(θ*, φ) = 0 holds.

    Newton steps θ ← θ - H⁻¹ ∇_θ g(θ, φ), with H⁻¹ applied by cg and hvp. Assumes g strongly
    convex on the path (pure Newton, no line search). Warns if tol is not reached in max_iter.
    Returns: theta (detached), info = {"steps", "hvps", "grad_norm", "grad_norms", "converged"}.
    """
    theta, phi, history, hvps = _detach(theta0), _detach(phi), [], 0
    for step in range(max_iter + 1):
        leaves = _leaves(theta)
        grad = _detach(_grads(g(leaves, phi), leaves)[0])
        _check_finite(grad, "newton_solve: ∇_θ g")
        history.append(norm(grad))
        if history[-1] <= tol or step == max_iter:
            break
        newton_step, info = cg(lambda u: hvp(lambda th: g(th, phi), theta, u), grad, cg_max_iter, cg_tol)
        theta, hvps = add(theta, newton_step, -1.0), hvps + info["hvps"]
    if history[-1] > tol:
        warnings.warn(f"newton_solve: ‖∇_θ g‖ = {history[-1]:.3e} > tol after {step} steps")
    return theta, {
        "steps": step,
        "hvps": hvps,
        "grad_norm": history[-1],
        "grad_norms": history,
        "converged": history[-1] <= tol,
    }


# ---- hypergradients of F(φ) = f(θ*(φ), φ) -------------------------------------------------------
def hypergrad_implicit(
    f: Callable,
    g: Callable,
    theta_star: Params,
    phi: Params,
    solver: str = "cg",
    hvp_mode: str = "rev",
    **solver_kwargs,
) -> tuple[Params, dict]:
    """Eq. (8) of METHOD.md, by the implicit function theorem:
    ∇F(φ) = ∇_φ f(θ*, φ) - ∂_φ [∇_θ g(θ*, φ) · v],
    v = H⁻¹ ∇_θ f(θ*, φ),  H = ∇²_θθ g(θ*, φ).

    Assumes ∇_θ g(θ*, φ) = 0 (solve the inner problem to tolerance) and H SPD (ρ in Eq. (5), or
    damping). An error in v propagates linearly: ∇F is off by ∂_φ[∇_θ g · (v - v_exact)].

    Args:
        f, g: (theta, phi) -> scalar.  theta_star: the (approximate) inner solution.
        phi: any dict (e.g. {"r": rewards}; the caller chains the result back to its parameters).
        solver: "cg" (kwargs max_iter, tol, damping, x0) or "neumann" (alpha, J, damping, tol).
        hvp_mode: "rev" or "fwd", see hvp.
    Returns: grad (shaped like phi), info = the solver's info + {"solver", "v", "hvps" (the
        solver's + 1 for the mixed product)}.
    """
    theta, phi = _leaves(theta_star), _leaves(phi)
    f_theta, f_phi = (_detach(d) for d in _grads(f(theta, phi), theta, phi))
    phi_c = _detach(phi)

    def matvec(u):
        return hvp(lambda th: g(th, phi_c), theta, u, hvp_mode)

    if solver not in ("cg", "neumann"):
        raise ValueError(f"solver must be 'cg' or 'neumann', got {solver!r}")
    v, info = (cg if solver == "cg" else neumann)(matvec, f_theta, **solver_kwargs)
    # Eq. (8): ∇F = ∇_φ f - ∂_φ[∇_θ g · v]
    grad = add(f_phi, mixed_vjp(g, theta, phi, v), -1.0)
    return grad, {**info, "solver": solver, "v": v, "hvps": info["hvps"] + 1}


def hypergrad_unrolled(
    f: Callable, g: Callable, theta0: Params, phi: Params, T: int, lr: float
) -> tuple[Params, dict]:
    """Unrolled hypergradient (§2.3): ∇_φ f(θ_T(φ), φ) by reverse mode through the T steps of
    Eq. (6): T HVPs and T mixed products, all T iterates kept. Exact for the truncated problem, it
    tends to Eq. (8) as T → ∞ (lr < 2/λ_max, g strongly convex).

    Returns: grad (shaped like phi), info = inner_solve's info + {"hvps" (= T), "theta" (θ_T)}.
    """
    phi = _leaves(phi)
    theta_T, info = inner_solve(g, theta0, phi, T, lr, create_graph=True)
    grad = _detach(_grads(f(theta_T, phi), phi)[0])
    return grad, {**info, "hvps": T, "theta": _detach(theta_T)}


def hypergrad_fd(F: Callable[[Params], torch.Tensor], phi: Params, direction: Params, eps: float = 1e-5) -> float:
    """Central difference (F(φ + εd) - F(φ - εd)) / 2ε = ∇F(φ)·d + O(ε²), the reference that tests
    compare Eq. (8) against (§2.3). F: phi -> scalar, e.g. an inner solve followed by f."""
    phi, direction = _detach(phi), _detach(direction)
    return (float(F(add(phi, direction, eps))) - float(F(add(phi, direction, -eps)))) / (2 * eps)


def hypergrad_fd_full(F: Callable[[Params], torch.Tensor], phi: Params, eps: float = 1e-5) -> Params:
    """∇F(φ) coordinate by coordinate with hypergrad_fd: 2·dim(φ) evaluations of F."""
    grad = {k: torch.zeros_like(t) for k, t in phi.items()}
    for k, t in phi.items():
        for i in range(t.numel()):
            e = {kk: torch.zeros_like(tt) for kk, tt in phi.items()}
            e[k].view(-1)[i] = 1.0
            grad[k].view(-1)[i] = hypergrad_fd(F, phi, e, eps)
    return grad


# ---- closed-form problems (the self-demonstration's and the tests'): python bilevel.py ------------
def quadratic_problem(gen, n=30, p=5, cond=50.0, gamma=1.0) -> dict:
    """g = ½θᵀAθ - θᵀ(Bφ + c), f = ½‖θ - θ_t‖² + ½γ‖φ‖², A's spectrum log-spaced in [1, cond];
    θ is split into two tensors {"a", "b"} (flat(θ) joins them). Closed forms: θ* = A⁻¹(Bφ + c),
    v* = A⁻¹(θ* - θ_t) (the solve of Eq. (8)) and ∇F = Bᵀv* + γφ."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    Q = torch.linalg.qr(randn(n, n))[0]
    A = Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ Q.T
    B, c, target, phi = randn(n, p), randn(n), randn(n), {"phi": randn(p)}

    def flat(th):
        return torch.cat([th["a"], th["b"]])

    def split(w):
        return {"a": w[:3], "b": w[3:]}

    def g(th, ph):
        return 0.5 * flat(th) @ A @ flat(th) - flat(th) @ (B @ ph["phi"] + c)

    def f(th, ph):
        return 0.5 * ((flat(th) - target) ** 2).sum() + 0.5 * gamma * (ph["phi"] ** 2).sum()

    theta_star = torch.linalg.solve(A, B @ phi["phi"] + c)
    v_star = torch.linalg.solve(A, theta_star - target)
    return dict(
        f=f,
        g=g,
        phi=phi,
        theta_star=split(theta_star),
        theta0=split(torch.zeros(n, dtype=torch.float64)),
        v_star=v_star,
        exact={"phi": B.T @ v_star + gamma * phi["phi"]},
        A=A,
        B=B,
        eigs=torch.linalg.eigvalsh(A),
        flat=flat,
    )


def logistic_problem(gen, m=200, d=10, log_lam=-4.0) -> dict:
    """L2-regularised logistic regression, φ = log per-feature strengths, f = validation log-loss;
    F(φ) = f(θ*(φ), φ) with θ* by Newton to 1e-13 (for central differences of F)."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    X, X_val, w_true = randn(m, d), randn(m, d), randn(d)
    y, y_val = torch.sign(X @ w_true + randn(m)), torch.sign(X_val @ w_true + randn(m))
    softplus = torch.nn.functional.softplus

    def g(th, ph):
        return softplus(-y * (X @ th["w"])).mean() + 0.5 * (ph["log_lam"].exp() * th["w"] ** 2).sum()

    def f(th, ph):
        return softplus(-y_val * (X_val @ th["w"])).mean()

    theta0 = {"w": torch.zeros(d, dtype=torch.float64)}
    return dict(
        f=f,
        g=g,
        phi={"log_lam": log_lam + randn(d)},
        theta0=theta0,
        F=lambda ph: f(newton_solve(g, theta0, ph, tol=1e-13)[0], ph),
    )


def _demo():
    gen = torch.Generator().manual_seed(0)
    print(f"{'problem':<10} {'method':<9} {'iters':>6} {'HVPs':>6} {'rel. error':>11}")
    for name, problem in [("quadratic", quadratic_problem), ("logistic", logistic_problem)]:
        q = problem(gen)
        f, g, theta0, phi = q["f"], q["g"], q["theta0"], q["phi"]
        theta_star = q.get("theta_star") or newton_solve(g, theta0, phi, tol=1e-13)[0]
        exact = q.get("exact") or hypergrad_fd_full(q["F"], phi)
        v0 = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in theta0.items()}

        def lam_max(th):
            return lanczos_eigs(lambda u: hvp(lambda t: g(t, phi), th, u), v0, 20)[1]

        alpha, lr = 1 / lam_max(theta_star), 1 / lam_max(theta0)  # logistic: larger at θ_0
        runs = {
            "cg": (
                [2, 5, 10, 20, 40],
                lambda n: hypergrad_implicit(f, g, theta_star, phi, "cg", max_iter=n, tol=1e-14),
            ),
            "neumann": (
                [10, 100, 1000],
                lambda n: hypergrad_implicit(f, g, theta_star, phi, "neumann", alpha=alpha, J=n),
            ),
            "unrolled": ([10, 100, 1000], lambda n: hypergrad_unrolled(f, g, theta0, phi, n, lr)),
        }
        for method, (sizes, run) in runs.items():
            for n in sizes:
                with warnings.catch_warnings():  # truncated solves warn by design
                    warnings.simplefilter("ignore")
                    grad, info = run(n)
                error = norm(add(grad, exact, -1.0)) / norm(exact)
                print(
                    f"{name:<10} {method:<9} {info['iterations'] if method == 'cg' else n:>6} "
                    f"{info['hvps']:>6} {error:>11.2e}"
                )
                if info.get("converged"):
                    break
    print(
        "HVPs include the mixed product of Eq. (8) and Neumann's residual check. Reference: closed form (quadratic),\n"
        "central differences of F with θ* by Newton (logistic; floor ≈ 1e-9)"
    )


if __name__ == "__main__":
    _demo()  # float64 throughout: the problems are built in it
