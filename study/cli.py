"""Command line and output folders, shared by train.py, study/bench.py and hf.py (no math here).

A script's flags come from the fields of its Config dataclass (help text and default from the field);
a bad value is one line on stderr and exit code 2. Outputs are written into `<out>.partial` and swapped
in only when complete, so a crash or Ctrl-C never leaves a half-written run nor destroys the last one.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import field, fields
from pathlib import Path

import torch
from tqdm import tqdm

INT_LIMIT = 10**6  # an integer flag above this is refused (not a useful run)


def option(default, help: str):
    """A field of a script's Config: its default and the one-line help of its --flag."""
    return field(default=default, metadata={"help": help})


class BadInput(Exception):
    """A command-line value that is not allowed."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        raise BadInput(message)


def as_bool(s: str) -> bool:
    table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if s.lower() not in table:
        raise ValueError(s)
    return table[s.lower()]


def parse(config_cls, argv, description: str) -> dict:
    """The values given on the command line, one --flag per field of the dataclass config_cls, with its
    help text and default (a bool flag alone means true). Raises BadInput on an unknown flag, a value of
    the wrong type, or an integer outside 0 .. INT_LIMIT."""
    parser = Parser(description=description)
    for f in fields(config_cls):
        kind = as_bool if f.type is bool else f.type
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=None,
            nargs="?" if f.type is bool else None,
            const=True if f.type is bool else None,
            metavar="BOOL" if f.type is bool else None,
            help=f"{f.metadata.get('help', '')} (default: {f.default})",
        )
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    for name, value in given.items():
        if type(value) is int and not 0 <= value <= INT_LIMIT:
            raise BadInput(f"--{name.replace('_', '-')} must be an integer in 0 .. {INT_LIMIT}")
    return given


def check_out(out: Path, marker: str):
    """--out must be new, empty, or an earlier run (holding marker), else BadInput: see prepare_out."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise BadInput(
            f"--out {out} exists and is not an earlier run (no {marker} in it); give a new folder or an earlier run's"
        )


def prepare_out(out: Path, marker: str) -> Path:
    """The folder a run writes into (<out>.partial), created now so that an --out that cannot be
    written fails before any work starts. out must be absolute (resolved). An existing out is replaced
    at the end, so it must be empty or an earlier run (holding marker): `--out .` or `--out ~` is
    refused rather than swapped away."""
    check_out(out, marker)
    tmp = out.with_name(out.name + ".partial")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / ".write_test").write_text("")
    except OSError as e:
        raise BadInput(f"--out {out} cannot be written ({e.strerror or e}); give a writable folder")
    return tmp


def publish(tmp: Path, out: Path):
    """Swap the complete run in: the earlier run stays whole until the new one is in place."""
    (tmp / ".write_test").unlink(missing_ok=True)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def bar(phase: str, total: int, show: bool):
    """A phase's progress bar: gone when the phase ends, refreshed at most twice a second, silent unless show; the
    loop it is given to puts its numbers in the postfix (policy.show). It draws no random number."""
    return tqdm(total=total, desc=phase, leave=False, mininterval=0.5, disable=not show)


@contextmanager
def clock(timings: dict, key: str):
    """Add the block's wall time to timings[key] (seconds, summed over calls)."""
    t = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0) + time.perf_counter() - t


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=1) + "\n")


def git(*args) -> str | None:
    """A git command's output in the repository holding this file, None where there is no git or no repository."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(command: str, started: str, seconds: float, device: str) -> dict:
    """What a run was computed with, for provenance.json beside its results.json (never inside it, so that
    results.json stays byte-identical between runs of one command): the command, the commit and whether tracked
    files differed from it, the versions, the thread count, the CPU, the device, the start (UTC) and the wall time."""
    changed = git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": command,
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": None if changed is None else bool(changed),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": sys.platform,
        "device": device,
        "started_utc": started,
        "seconds": round(seconds, 1),
    }
