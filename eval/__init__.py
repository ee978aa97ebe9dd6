"""Stage 3: evaluation of trained SAEs.

- `python -m eval run=<run>`: reconstruction metrics (train/metrics.py), CE loss recovered (eval/ce.py)
  and FLOP / parameter counts (train/saes/flops.py) on the store's held-out chunks -> `<run>/eval.json`.
- `python -m eval.report sweep=<dir>`: Pareto and scaling plots + report.md over many runs.
- `python -m eval.geometry run=<run>`: nearest-neighbour cosines, expert similarity, t-SNE (section 4.3).
- `python -m eval.dashboard run=<run>`: static HTML feature dashboards.
- `python -m eval.autointerp run=<run> explainer.model=<name>`: detection scoring (section 4.4).
The dashboard and autointerp find feature firings through eval/firings.py.
"""

import runtime  # noqa: F401  (reproducibility settings before torch loads)
