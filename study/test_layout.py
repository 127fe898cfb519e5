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
    """study/stats.py (and the summaries and the methods' table built on it) are pure Python: no torch loaded."""
    loaded = loaded_after("import study.stats, study.summary, study.methods")
    assert "study.stats" in loaded and "study.summary" in loaded
    assert "torch" not in loaded and "numpy" not in loaded


def test_every_module_function_the_documents_name_resolves():
    """Every `module.name` in backticks in README.md, METHOD.md and the report (a reference module, train, study.*,
    conftest)
    is a module, function, class or attribute that exists; the extra's (hf.*) are checked by test_hf.py."""
    names = [n for n in documented_names() if not n.startswith("hf.")]
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
