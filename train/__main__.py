"""`python -m train [overrides]`: the Hydra entry point of stage 2 (see conf/train/train.yaml)."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from runtime.errors import fail, one_line_errors
from train.config import TrainConfig

MODELS = Path(__file__).resolve().parents[1] / "conf" / "train" / "model"


def check_model_arg(argv: list[str]) -> None:
    """`model=<name>` (or a multirun list) must name conf/train/model/<name>.yaml: say so in one line
    instead of Hydra's multi-line composition error."""
    known = sorted(p.stem for p in MODELS.glob("*.yaml"))
    for arg in argv:
        if arg.startswith("model="):
            for name in arg.split("=", 1)[1].split(","):
                if name not in known:
                    fail("train", f"unknown model {name!r}; choose one of {', '.join(known)}")


@hydra.main(config_path="../conf/train", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from train.loop import train

    with one_line_errors("train"):
        sae_dir = train(TrainConfig.from_omegaconf(cfg), Path(HydraConfig.get().runtime.output_dir))
    print(f"sae: {sae_dir}")


if __name__ == "__main__":
    check_model_arg(sys.argv[1:])
    main()
