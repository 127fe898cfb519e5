"""Tests of the layout (README, "Files"): the reference imports nothing of the study or the extra, the statistics
load no torch, and every `module.function` that README.md and METHOD.md name exists.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DOCUMENTS, ROOT, documented_names, resolve

REFERENCE = ("data", "policy", "bilevel", "metarm")


def loaded_after(statement: str) -> list:
    """The modules a fresh interpreter holds after `statement`, run in the repository's root."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module", REFERENCE)
def test_a_reference_module_loads_nothing_of_the_study_or_the_extra(module):
    """Each of data.py, policy.py, bilevel.py and metarm.py, imported alone, loads only reference modules: no study/,
    no train.py, no hf.py (nor transformers, TRL, peft or accelerate)."""
    project = {p.stem for p in ROOT.glob("*.py")} | {"study"}
    loaded = loaded_after(f"import {module}")
    assert module in loaded
    ours = {name.split(".")[0] for name in loaded} & project
    assert ours <= set(REFERENCE), ours - set(REFERENCE)
    assert not {"transformers", "trl", "peft", "accelerate"} & set(loaded)


def test_the_statistics_load_no_torch():
    """study/stats.py (and the summaries, the methods' table, the analyses of the committed runs and their tables,
    built on it) are pure Python: no torch loaded."""
    loaded = loaded_after("import study.stats, study.summary, study.methods, study.analysis, study.tables")
    assert {"study.stats", "study.summary", "study.analysis", "study.tables"} <= set(loaded)
    assert "torch" not in loaded and "numpy" not in loaded


def test_every_module_function_the_documents_name_resolves():
    """Every `module.name` in backticks in README.md, METHOD.md and the report (a reference module, train, study.*,
    conftest) is a module, function, class or attribute that exists; the extra's (hf.*, hf_bilevel.*) are checked by
    test_hf.py."""
    names = [n for n in documented_names() if n.split(".")[0] not in ("hf", "hf_bilevel")]
    assert len(names) > 50  # the documents do name the code
    missing = [n for n in names if not resolve(n)]
    assert not missing, missing


def test_every_test_the_documents_name_exists():
    """Every `test_...` in backticks in README.md, METHOD.md and the report is a test function of the project."""
    defined = set()
    for path in [*ROOT.glob("test_*.py"), *(ROOT / "study").glob("test_*.py")]:
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    named = set()
    for doc in DOCUMENTS:
        named |= set(re.findall(r"`(test_\w+)`", (ROOT / doc).read_text()))
    assert len(named) > 30
    assert not named - defined, sorted(named - defined)


def test_a_renamed_function_is_caught():
    """resolve (the check above) tells a name that exists from one that does not."""
    assert resolve("metarm.train_bilevel") and resolve("study.stats.decide") and resolve("study.plots")
    assert not resolve("metarm.no_such_function") and not resolve("evaluation.decide")
    assert not resolve("study.no_such_module") and not resolve("train.Config.no_such_field")
    assert Path(ROOT / "study" / "preregistration.json").is_file()


# ==== The committed runs behind the tables (results/, METHOD.md §5.3) ===============================================
RESULTS = ROOT / "results"
RUNS = json.loads((RESULTS / "runs.json").read_text())["runs"]


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_committed_run_says_how_it_was_made_and_descends_from_its_registration(run):
    """Each run in results/runs.json: its results.json, and a provenance.json naming the command (train.py's, with no
    flag that changes a number beyond the design's), the commit, torch, the threads and the CPU; that commit
    descends from the pre-registration that governs the run (git merge-base --is-ancestor)."""
    folder = RESULTS / run
    results = json.loads((folder / "results.json").read_text())
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["command"].startswith("python train.py")
    assert {"commit", "torch", "threads", "cpu", "seconds", "started_utc"} <= set(provenance)
    assert provenance["uncommitted_changes"] is False
    assert "out" not in results["config"]
    threads = provenance["command"].split()
    assert results["config"]["threads"] == int(threads[threads.index("--threads") + 1]) == provenance["threads"]
    if git("rev-parse", "HEAD").returncode:
        pytest.skip("not a git checkout: the commits cannot be compared")
    registration = RUNS[run]["registration"]
    assert git("merge-base", "--is-ancestor", registration, provenance["commit"]).returncode == 0, (registration, run)


def test_the_confirmatory_run_is_the_registered_command_on_fresh_seeds():
    """results/confirmatory: the registered command (preregistration.json -> confirmatory) plus only --threads (the
    rounding, which provenance.json records), --progress and --out (no number: tested); seeds 10-19, the figures'
    too."""
    prereg = json.loads((ROOT / "study" / "preregistration.json").read_text())["confirmatory"]
    provenance = json.loads((RESULTS / "confirmatory" / "provenance.json").read_text())
    given, registered = provenance["command"].split(), prereg["command"].split()
    extra = [token for token in given if token not in registered]
    assert all(token in given for token in registered)
    assert {token for token in extra if token.startswith("--")} <= {"--threads", "--progress", "--out"}
    results = json.loads((RESULTS / "confirmatory" / "results.json").read_text())
    assert results["config"]["first_seed"] == 10 and results["config"]["seeds"] == 10
    assert results["figures"]["frontier"]["seeds"] == list(range(10, 20))


def test_the_documents_tables_are_generated_from_the_committed_runs():
    """The README's claims table and every generated table of the report are study.tables' of results/ (every number
    from a committed run), and results/analysis.json is what study.analysis computes from the committed runs now."""
    from study import analysis, summary, tables

    computed = analysis.analyse(RESULTS, summary.read_preregistration())
    assert json.loads((RESULTS / "analysis.json").read_text()) == json.loads(json.dumps(computed))
    generated = {"claims": tables.claims_table(RESULTS, computed), **tables.report_tables(RESULTS, computed)}
    for document in ("README.md", tables.REPORT):
        text = (ROOT / document).read_text()
        assert tables.fill(text, generated) == text, f"{document}: run python -m study.analysis results --docs"
    shown = (ROOT / tables.REPORT).read_text()
    for name, table in tables.report_tables(RESULTS, computed).items():  # each block there, holding its table
        assert f"<!-- table: {name} -->\n{table}<!-- /table -->" in shown, name
    assert f"<!-- table: claims -->\n{generated['claims']}<!-- /table -->" in (ROOT / "README.md").read_text()
