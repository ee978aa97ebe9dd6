"""The whole pipeline in one command: harvest -> train -> eval -> report (`python -m pipeline.demo`).

It sits above the three stages and only calls them; no stage imports it.
"""

import runtime  # noqa: F401  (reproducibility settings before torch loads)
