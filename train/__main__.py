"""`python -m train [overrides]`: the Hydra entry point of stage 2 (see conf/train/train.yaml).

Before Hydra creates the run folder, `check` refuses in one line (runtime/cli.py) everything the
run would refuse before its first step: an unknown key or model, any bad value, an unavailable
device, a tracker whose package is missing (`logger=wandb` without wandb), a store that cannot
be trained on (missing, incomplete, too small to hold chunks out, too small for the budget), and with
data.source=stream, a text or model that data.stream cannot harvest."""

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runtime.cli import launch
from runtime.errors import one_line_errors
from train.config import TrainConfig, TrainError


@hydra.main(config_path="../conf/train", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from train.loop import train

    hydra = HydraConfig.get()
    sweep = hydra.sweep.dir if hydra.mode == RunMode.MULTIRUN else None  # a sweep's runs share a tracker group
    with one_line_errors("train"):
        sae_dir = train(TrainConfig.from_omegaconf(cfg), Path(hydra.runtime.output_dir), group=sweep)
    print(f"sae: {sae_dir}")


def check(cfg: DictConfig) -> None:
    """The typed config, then the inputs it names: train.loop's own checks of the device and the
    store, which read but never write (the store is opened read-only, the SAE is not built)."""
    import torch

    from runtime.device import pick_device
    from train.dist import Dist
    from train.loop import check_stream, open_store, run_length, split_chunks

    typed = TrainConfig.from_omegaconf(cfg)
    pick_device(typed.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's number of ranks
    if typed.batch_size % world:
        raise TrainError(f"batch_size {typed.batch_size} is not divisible by the number of ranks {world}")
    if typed.data.streamed:
        d = check_stream(typed)
    else:
        store = open_store(typed)
        split_chunks(typed, store, Dist(0, world, 0, torch.device("cpu")))
        d = store.d_in
    run_length(typed, typed.flops_per_token(d))


if __name__ == "__main__":
    launch("train", main, check)
