"""`python -m eval run=<run dir or folder of runs> [overrides]`: stage 3 (see conf/eval/eval.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

import harvest  # noqa: F401  (reproducible MKL settings before torch loads)
from eval.run import EvalConfig, EvalError


@hydra.main(config_path="../conf/eval", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from eval.run import evaluate, table

    try:
        results = evaluate(EvalConfig.from_omegaconf(cfg))
    except EvalError as e:
        print(f"eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    if results:
        print(table(results))
        print("written: " + ", ".join(f"{r['run']}/eval.json" for r in results))


if __name__ == "__main__":
    main()
