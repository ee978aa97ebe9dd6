"""Stage 2: train Switch, TopK, ReLU and Gated SAEs on a harvest store.

`python -m train` is the Hydra entry; `train.saes.load(folder)` loads a trained SAE in one call;
`train.run_dir.RunDir` owns the folder a run writes.
"""

import runtime  # noqa: F401  (reproducibility settings before torch loads)
