"""Stage 1: run a causal LM over text and cache one site's activations in a zarr store.

`harvest.store.ActivationStore` is how every later stage reads what this stage wrote.
"""

import os

# MKL may pick a different code path (data alignment) or number of threads (when the machine is
# busy) per call, which can move a float32 result by one ulp; measured here as a few differing
# float16 values in a resumed harvest. Fixing both makes a resumed harvest write bit-identical rows
# on the same CPU. Must be set before torch loads MKL.
os.environ.setdefault("MKL_CBWR", "AUTO")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
