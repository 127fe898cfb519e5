"""The study: the pre-registered experiment around the reference (METHOD.md §5).

The reference -- data.py, policy.py, bilevel.py, metarm.py at the top -- is the papers' math and imports nothing
from here. This package measures it: the table of methods and controls (methods.py), the meta-test metrics and the
papers' premises (measure.py), the study's fits beyond the reference's loops (fits.py), what the hypergradient is
worth (hypergradient_checks.py), the statistics and verdicts (stats.py, pure; summary.py), the figures' experiments
(figures.py) and drawings (plots.py), the benchmarks (bench.py), the command-line plumbing (cli.py), the
pre-registration (preregistration.json) and the study's tests. `python train.py` at the top runs it;
`python -m study.plots` and `python -m study.bench` are its other scripts.
"""
