"""Stage 2: train Switch, TopK, ReLU and Gated SAEs on a harvest store (issue [2 of 6], not built yet)."""
