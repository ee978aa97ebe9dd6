"""Stage 3: metrics, FLOP accounting, CE loss recovered and plots (issue [3 of 6], not built yet)."""
