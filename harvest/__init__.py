"""Stage 1: run a causal LM over text and cache one site's activations in a zarr store.

`harvest.store.ActivationStore` is how every later stage reads what this stage wrote.
"""

import os

# MKL may pick a different code path per call (data alignment, threads in use), which can move a
# float32 result by one ulp. Conditional numerical reproducibility fixes the path, so a resumed
# harvest writes bit-identical rows on the same CPU. Must be set before torch loads MKL.
os.environ.setdefault("MKL_CBWR", "AUTO")
