"""Stage 2: train SAEs on a harvest store: every architecture registered in `train.saes` (Switch and its
variants, TopK, BatchTopK, JumpReLU, ReLU, Gated; AuxK where codes are TopK-style).

`python -m train` is the Hydra entry; `train.saes.load(folder)` loads a trained SAE in one call;
`train.run_dir.RunDir` owns the folder a run writes.
"""

import runtime  # noqa: F401  (reproducibility settings before torch loads)
