"""Benchmarks (no test asserts a time): `python -m study.bench [--quick] [--out DIR] [--device auto|cpu|cuda]`.

Measures, in one run, on this machine:
  hvp_over_grad      time of one Hessian-vector product (double backward) of the real inner problem g_d
                     (Eq. 5) over one gradient of it, theta = the policy's head (the default);
  hvp_over_grad_fwd  the same for forward-over-reverse (torch.func.jvp of grad);
  *_all              the same with theta = all of the policy's parameters;
  adaptation_step    seconds of one RLOO step of (3) (16 prompts x 4 samples), split into sampling (which
                     collects the features), log-probabilities with backward, and reward-model scoring;
  hypergrad          (method, iterations, HVPs, seconds, relative error) for CG, Neumann and unrolled on
                     the real bilevel problem, against a reference checked by finite differences;
  phases             seconds per phase of `python train.py --quick` (its timings.json);
and the same HVP ratios on cuda when a GPU is visible. Prints a table, writes DIR/bench.json.
"""

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import bilevel
import data
import metarm
import policy
from study import cli, hypergradient_checks
from study.cli import option
from study.measure import MAX_NEW


@dataclass
class Config:
    quick: bool = option(False, "a shorter SFT and fewer rows (about a minute)")
    out: str = option("runs/bench", "bench.json goes here")
    device: str = option("auto", "auto | cpu | cuda: HVP ratios also on cuda if visible")
    repeats: int = option(0, "timing repeats (median); 0: 10 with --quick, 30 otherwise")


def median_seconds(fn, repeats: int, device: str) -> float:
    """Median wall time of fn() after one warm-up call (synchronising the GPU around each call)."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hvp_ratios(model, world, device: str, repeats: int) -> dict:
    """HVP / gradient time of the inner problem (5) on one domain's 28 prompts x K = 4 candidates."""
    model = model.to(device)
    gen = torch.Generator(device).manual_seed(0)
    prompts = torch.tensor(world.prompts["restaurant"], device=device)
    cand = policy.sample(model, {}, prompts.repeat_interleave(4, 0), MAX_NEW, gen)
    r = torch.randn(len(prompts), 4, generator=gen, device=device)
    out = {}
    for which in ("head", "all"):
        theta = {n: p.detach() for n, p in policy.adapted_params(model, which).items()}

        def g(th):
            return metarm.inner_loss(model, th, r, cand, 4, 0.5, 1.0, theta)

        v = {n: torch.randn(p.shape, generator=gen, device=device) for n, p in theta.items()}
        t_grad = median_seconds(
            lambda: torch.autograd.grad(g(th := policy.copy_params(theta)), list(th.values())), repeats, device
        )
        t_rev = median_seconds(lambda: bilevel.hvp(g, theta, v, "rev"), repeats, device)
        t_fwd = median_seconds(lambda: bilevel.hvp(g, theta, v, "fwd"), repeats, device)
        suffix = "" if which == "head" else "_all"
        out.update(
            {
                f"grad_seconds{suffix}": t_grad,
                f"hvp_over_grad{suffix}": t_rev / t_grad,
                f"hvp_over_grad_fwd{suffix}": t_fwd / t_grad,
            }
        )
    model.to("cpu")
    return out


def adaptation_step(model, world, repeats: int) -> dict:
    """Seconds of the parts of one RLOO step of (3) on the CPU, 16 prompts x 4 samples."""
    gen = torch.Generator().manual_seed(0)
    rm, phi = policy.make_reward_model(model, gen)
    theta = policy.adapted_params(model)
    x = torch.tensor(world.prompts["bakery"][:16]).repeat_interleave(4, 0)
    batch = policy.sample(model, theta, x, MAX_NEW, gen)

    def logprob_backward():
        th = policy.copy_params(theta)
        policy.logprob(model, th, batch).sum().backward()

    with torch.no_grad():

        def score():
            return policy.reward(rm, phi, batch)

        parts = {
            "sampling": median_seconds(lambda: policy.sample(model, theta, x, MAX_NEW, gen), repeats, "cpu"),
            "reward_model": median_seconds(score, repeats, "cpu"),
        }
    parts["logprob_backward"] = median_seconds(logprob_backward, repeats, "cpu")
    return parts


def hypergrad_rows(model, world, quick: bool) -> list:
    """The real bilevel problem of one training domain at a fresh reward model (float64 copies)."""
    gen = torch.Generator().manual_seed(0)
    rm, phi = policy.make_reward_model(model, gen)
    theta_ref = {n: p.detach() for n, p in policy.adapted_params(model).items()}
    bcfg = metarm.BilevelConfig()
    pairs = policy.encode_pairs(model, world.pairs["restaurant"])
    prompts = torch.tensor(world.prompts["restaurant"])
    probe = {"restaurant": metarm.draw_problem(model, prompts, pairs, bcfg, gen)}
    curv = metarm.calibrate(model, rm, phi, probe, bcfg, theta_ref)
    ns = (1, 4, 8) if quick else (1, 2, 4, 8, 16, 32)
    res = hypergradient_checks.hypergradient_error(model, rm, theta_ref, world, phi, bcfg, curv, ns=ns, timed=True)
    training = res["training_setting"]
    return [{"method": m, **row} for m, rows in res["curves"].items() for row in rows] + [
        {
            "method": f"training_setting (T={training['T']}, then cg)",
            "iters": training["cg_iters"],
            "hvps": training["hvps"],
            "error": training["error"],
        },
        {"method": "reference_vs_fd", "error": res["fd_check_rel_error"]},
    ]


class QuickRunFailed(Exception):
    """train.py --quick stopped (it has said why); its exit code is passed on."""


def benchmarks(cfg: Config) -> dict:
    """Every measurement of the module docstring, as the dict written to bench.json."""
    world = data.World()
    model, _ = policy.train_pi_ref(world, 100 if cfg.quick else 1500)
    result = {
        "config": asdict(cfg),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": hvp_ratios(model, world, "cpu", cfg.repeats),
        "adaptation_step": adaptation_step(model, world, cfg.repeats),
    }
    if cfg.device != "cpu" and torch.cuda.is_available():
        result["cuda"] = hvp_ratios(model, world, "cuda", cfg.repeats)
        result["gpu"] = torch.cuda.get_device_name()
    result["hypergrad"] = hypergrad_rows(model, world, cfg.quick)
    with tempfile.TemporaryDirectory() as tmp:
        rc = subprocess.run(
            [sys.executable, "train.py", "--quick", "--out", str(Path(tmp) / "q"), "--device", cfg.device],
            cwd=Path(__file__).parent.parent,  # the repository root, where train.py is
        ).returncode
        if rc != 0:
            raise QuickRunFailed(rc)
        result["phases"] = json.loads((Path(tmp) / "q" / "timings.json").read_text())
    return result


def main(argv=None) -> int:
    try:
        cfg = Config(**cli.parse(Config, argv, __doc__.splitlines()[0]))
        if cfg.device not in ("auto", "cpu", "cuda"):
            raise cli.BadInput("--device must be auto, cpu or cuda")
        cfg.repeats = cfg.repeats or (10 if cfg.quick else 30)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise cli.BadInput("--device cuda asked for, but no GPU is visible")
        out = Path(cfg.out).resolve()
        tmp = cli.prepare_out(out, marker="bench.json")
    except cli.BadInput as e:
        print(f"study.bench: error: {e}", file=sys.stderr)
        return 2
    try:
        result = benchmarks(cfg)
        cli.write_json(tmp / "bench.json", result)
        cli.publish(tmp, out)
    except QuickRunFailed as e:
        return e.args[0]
    except KeyboardInterrupt:
        print(f"study.bench: error: interrupted; the previous results in {out} are untouched", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (after publish, tmp no longer exists)
    for dev in ("cpu", "cuda", "adaptation_step"):
        if dev in result:
            print(f"{dev}: " + ", ".join(f"{k} {v:.3g}" for k, v in result[dev].items()))
    print("| method | iterations | HVPs | seconds | relative error |\n|---|---|---|---|---|")
    for row in result["hypergrad"]:
        seconds = f"{row['seconds']:.3f}" if "seconds" in row else ""
        print(f"| {row['method']} | {row.get('iters', '')} | {row.get('hvps', '')} | {seconds} | {row['error']:.2e} |")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["phases"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
