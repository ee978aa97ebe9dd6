"""`python -m train [overrides]`: the Hydra entry point of stage 2 (see conf/train/train.yaml)."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import harvest  # noqa: F401  (reproducible MKL settings before torch loads)
from train.config import TrainConfig, TrainError


@hydra.main(config_path="../conf/train", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from train.loop import train

    try:
        sae_dir = train(TrainConfig.from_omegaconf(cfg), Path(HydraConfig.get().runtime.output_dir))
    except TrainError as e:
        print(f"train: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"sae: {sae_dir}")


if __name__ == "__main__":
    main()
