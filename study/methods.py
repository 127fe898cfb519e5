"""The methods and controls of the experiment (METHOD.md §5), as data: one row each, nothing computed here.

study/measure.py reads what each method's meta-test adaptation (3) maximises; train.py which methods have a reward
model and which runs are reused; study/summary.py which are ceilings; study/plots.py the labels and colours; the
tests that each control is a registered comparison.
Adding a method: a row here, its call in train.py, and a test.

Columns:
    label        how a table or a figure names it
    color        its colour in every figure
    role         baseline | method (a paper's) | control (a method without its ingredient) | ceiling | diagnostic
                 (a measurement of METHOD.md §5.4 on the own-data run, not in the default run: DEFAULT_METHODS)
    adapts_with  what adaptation (3) maximises on an evaluation domain: "rm" (its reward model), "gold" (r*_d),
                 "agnostic gold" (r* without the domain's words), "rounds" (MetaRM's rounds of §3, which adapt
                 with the reward model as it is updated); None: not adapted, its own policy is evaluated as it is
                 (pi_ref for sft, the DPO policy for dpo)
    has_rm       it has a reward model, whose accuracy on the evaluation pairs is measured
    control      its matched control: the run that differs from it only in the method's ingredient
    reuses       the method whose reward model, and so whose adapted policy, it is by construction (computed once)
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    label: str
    color: str
    role: str
    adapts_with: str | None
    has_rm: bool
    control: str | None = None
    reuses: str | None = None


METHODS = {
    "sft": Method("SFT policy π_ref", "tab:gray", "baseline", None, False),
    "dpo": Method("DPO (2)", "tab:purple", "baseline", None, False, control="sft"),
    "vanilla_rm": Method("vanilla RM (1)", "tab:blue", "baseline", "rm", True),
    "vanilla_rm_long": Method("vanilla RM, more steps", "lightsteelblue", "control", "rm", True, control="vanilla_rm"),
    "bilevel": Method("bilevel RM (Jia)", "tab:green", "method", "rm", True, control="bilevel_bt_only"),
    "bilevel_bt_only": Method("bilevel, λ·L_BT only", "yellowgreen", "control", "rm", True),
    "metarm": Method("MetaRM (Dou et al.)", "tab:orange", "method", "rounds", True, control="metarm_eta0"),
    "metarm_eta0": Method("MetaRM, η = 0", "navajowhite", "control", "rounds", True, reuses="vanilla_rm_long"),
    "oracle": Method("gold oracle", "black", "ceiling", "gold", False),
    "in_domain_rm": Method("in-domain RM", "tab:red", "ceiling", "rm", True),
    "agnostic_oracle": Method("domain-agnostic oracle", "tab:brown", "ceiling", "agnostic gold", False),
    "bilevel_swapped": Method("bilevel, DPO labels swapped", "darkseagreen", "diagnostic", "rm", True),
    "bilevel_gold": Method("bilevel, gold outer objective", "darkgreen", "diagnostic", "rm", True),
}
DEFAULT_METHODS = [m for m, row in METHODS.items() if row.role != "diagnostic"]  # train.py's --methods default
