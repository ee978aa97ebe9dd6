"""`python -m eval run=<run dir or folder of runs> [overrides]`: stage 3 (see conf/eval/eval.yaml).

An unknown key or a bad value is refused in one line before Hydra starts (runtime/cli.py)."""

import hydra
from omegaconf import DictConfig

from eval.run import EvalConfig
from runtime.cli import launch
from runtime.errors import one_line_errors


@hydra.main(config_path="../conf/eval", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from eval.run import evaluate, table

    with one_line_errors("eval"):
        results = evaluate(EvalConfig.from_omegaconf(cfg))
    if results:
        print(table(results))
        print("written: " + ", ".join(f"{r['run']}/eval.json" for r in results))


if __name__ == "__main__":
    launch("eval", main, EvalConfig.from_omegaconf)
