"""Benchmarks (no test asserts a time): `python bench.py [--quick] [--out DIR] [--device auto|cpu|cuda]`.

Measures, in one run, on this machine:
  hvp_over_grad      time of one Hessian-vector product (double backward) of the real lower level
                     g_d (Eq. 5) over one gradient of it, theta = the policy's head (the default);
  hvp_over_grad_fwd  the same for forward-over-reverse (torch.func.jvp of grad; see README on LayerNorm);
  *_all              the same with theta = all of the policy's parameters;
  hypergrad          (method, iterations, HVPs, seconds, relative error) for CG, Neumann and unrolled
                     on the real bilevel problem, against a reference checked by finite differences;
  phases             seconds per phase of `train.py --quick` (read from its timings.json);
and the same HVP ratios on cuda when a GPU is visible. Prints a table, writes DIR/bench.json.
"""
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import bilevel
import data
import metarm
import policy as P
import train


@dataclass
class Config:
    quick: bool = False        # a smaller model budget and fewer hypergradient rows (about a minute)
    out: str = "runs/bench"    # bench.json goes here
    device: str = "auto"       # auto | cpu | cuda: the HVP ratios are also measured on cuda if visible
    repeats: int = 0           # timing repeats (median); 0: 10 with --quick, 30 otherwise


def median_seconds(fn, repeats: int, device: str) -> float:
    """Median wall time of fn() after one warm-up call (synchronising the GPU around each call)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hvp_ratios(policy, world, device: str, repeats: int) -> dict:
    """HVP / gradient time of the lower level (5) on 20 prompts x K = 4 candidates of one domain."""
    policy = policy.to(device)
    gen = torch.Generator(device).manual_seed(0)
    prompts = torch.tensor(world.prompts["restaurant"], device=device).repeat_interleave(4, 0)
    idx, mask = P.sample(policy, {}, prompts, train.MAX_NEW, gen)
    r = torch.randn(len(world.prompts["restaurant"]), 4, generator=gen, device=device)
    out = {}
    for which in ("head", "all"):
        theta = {n: p.detach() for n, p in P.adapted_params(policy, which).items()}
        cand = metarm.prepare(policy, idx, mask, theta)
        g = lambda th: metarm.inner_loss(policy, th, r, cand, 4, 0.5, 1.0, theta)
        v = {n: torch.randn(p.shape, generator=gen, device=device) for n, p in theta.items()}
        t_grad = median_seconds(lambda: torch.autograd.grad(g(th := P.copy_params(theta)), list(th.values())),
                                repeats, device)
        t_rev = median_seconds(lambda: bilevel.hvp(g, theta, v, "rev"), repeats, device)
        t_fwd = median_seconds(lambda: bilevel.hvp(g, theta, v, "fwd"), repeats, device)
        suffix = "" if which == "head" else "_all"
        out.update({f"grad_seconds{suffix}": t_grad, f"hvp_over_grad{suffix}": t_rev / t_grad,
                    f"hvp_over_grad_fwd{suffix}": t_fwd / t_grad})
    policy.to("cpu")
    return out


def hypergrad_rows(policy, world, quick: bool) -> list:
    """The real bilevel problem of one training domain with a briefly trained RM (float64 copies)."""
    gen = torch.Generator().manual_seed(0)
    rm = P.make_reward_model(policy, gen)
    phi = P.adapted_params(rm, "all")
    metarm.train_reward_model(rm, phi, world.pooled_pairs(data.TRAIN_DOMAINS), metarm.RMConfig(steps=50), gen)
    theta_ref = {n: p.detach() for n, p in P.adapted_params(policy, "head").items()}
    cfg = train.Config()
    problems = {d: p for d, p in train.bilevel_problems(world, policy, theta_ref, cfg, gen, "cpu").items()
                if d == "restaurant"}
    bcfg = train.bilevel_config(cfg)
    train.calibrate(policy, rm, phi, problems, bcfg, theta_ref)
    keep = {"rm": rm, "phi_bilevel": phi, "theta_ref": theta_ref, "problems": problems, "bcfg": bcfg}
    res = train.hypergradient_error(policy, keep, world, ns=(1, 4, 8) if quick else (1, 2, 4, 8, 16, 32),
                                    timed=True)
    return [{"method": m, **row} for m, rows in res["curves"].items() for row in rows] + \
        [{"method": f"training_setting (T={res['training_setting']['T']}, then cg)",
          **{k: res["training_setting"][k] for k in ("hvps", "error")}, "iters": res["training_setting"]["cg_iters"]},
         {"method": "reference_vs_fd", "error": res["fd_check_rel_error"]}]


class QuickRunFailed(Exception):
    """train.py --quick stopped (it has said why); its exit code is passed on."""


def measure(cfg: Config) -> dict:
    """Every measurement of the module docstring, as the dict written to bench.json."""
    world = data.World()
    torch.manual_seed(0)
    policy = P.GPT(P.GPTConfig(vocab_size=len(world.vocab)), len(world.vocab))
    P.sft(policy, world.sft[1000:], 50 if cfg.quick else 1000, 64, 1.5e-3, torch.Generator().manual_seed(0))
    policy.requires_grad_(False)
    result = {"config": asdict(cfg), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": hvp_ratios(policy, world, "cpu", cfg.repeats)}
    if cfg.device != "cpu" and torch.cuda.is_available():
        result["cuda"] = hvp_ratios(policy, world, "cuda", cfg.repeats)
        result["gpu"] = torch.cuda.get_device_name()
    result["hypergrad"] = hypergrad_rows(policy, world, cfg.quick)
    with tempfile.TemporaryDirectory() as tmp:
        rc = train.main(["--quick", "--out", str(Path(tmp) / "q"), "--device", cfg.device])
        if rc != 0:
            raise QuickRunFailed(rc)
        result["phases"] = json.loads((Path(tmp) / "q" / "timings.json").read_text())
    return result


def main(argv=None) -> int:
    try:
        cfg = Config(**train.cli(Config, argv, __doc__.splitlines()[0]))
        if cfg.device not in ("auto", "cpu", "cuda") or cfg.repeats < 0:
            raise train.BadInput("--device must be auto, cpu or cuda and --repeats an integer >= 0")
        cfg.repeats = cfg.repeats or (10 if cfg.quick else 30)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise train.BadInput("--device cuda asked for, but no GPU is visible")
        out = Path(cfg.out).resolve()
        tmp = train.prepare_out(out, marker="bench.json")
    except train.BadInput as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    try:
        result = measure(cfg)
        (tmp / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
        train.publish(tmp, out)
    except QuickRunFailed as e:
        return e.args[0]
    except KeyboardInterrupt:
        print(f"bench.py: error: interrupted; the previous results in {out} are untouched", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)               # (after publish, tmp no longer exists)
    for dev in ("cpu", "cuda"):
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
