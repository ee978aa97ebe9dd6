"""Stage 1: run a causal LM over text and cache one site's activations in a zarr store.

`harvest.store.ActivationStore` is how every later stage reads what this stage wrote.
"""

import runtime  # noqa: F401  (reproducibility settings before torch loads)
