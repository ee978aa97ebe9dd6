"""`python -m harvest [overrides]`: the Hydra entry point of stage 1 (see conf/harvest.yaml).

`torchrun --standalone --nproc_per_node=R -m harvest [overrides]` runs it on R processes (harvest/run.py);
a refusal is printed by every rank that raises it, everything else by rank 0 only. An unknown key or a
bad value is refused in one line before Hydra starts (runtime/cli.py); the checks that need the
dataset and the model's config follow in harvest.run.preflight, before any store is created."""

import hydra
from omegaconf import DictConfig

from harvest.config import HarvestConfig
from runtime.cli import launch
from runtime.errors import one_line_errors


@hydra.main(config_path="../conf/harvest", config_name="harvest", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from harvest.run import harvest

    with one_line_errors("harvest"):
        result = harvest(HarvestConfig.from_omegaconf(cfg))
    if result.rank:
        return  # under torchrun, rank 0 reports for all
    if result.rows:
        each = " into each store" if len(result.stores) > 1 else ""
        print(f"wrote {result.rows:,} tokens{each} in {result.seconds:.1f} s ({result.rows / result.seconds:,.0f} tok/s)")
    for path in result.stores:
        print(f"store: {path}")


if __name__ == "__main__":
    launch("harvest", main, HarvestConfig.from_omegaconf)
