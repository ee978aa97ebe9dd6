"""conf/train/experiment: every run of every paper grid (`make reproduce`) composes into a valid config."""

import itertools

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONF
from train.budget import Budget
from train.config import TrainConfig

EXPERIMENTS = sorted(p.stem for p in (CONF / "train" / "experiment").glob("*.yaml") if p.stem != "paper")


def grid(name: str) -> list[list[str]]:
    """The override lists of the grid's runs, as Hydra's basic sweeper expands hydra.sweeper.params."""
    with initialize_config_dir(config_dir=str(CONF / "train"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    axes = [[f"{k}={v}" for v in str(values).split(",")] for k, values in params.items()]
    return [list(combo) for combo in itertools.product(*axes)]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_run_of_the_grid_is_valid(name):
    runs = grid(name)
    assert len(runs) >= 5
    for overrides in runs:
        with initialize_config_dir(config_dir=str(CONF / "train"), version_base="1.3"):
            cfg = TrainConfig.from_omegaconf(compose("train", overrides=[f"+experiment={name}", *overrides]))
        kwargs = cfg.sae_kwargs(768)  # raises for k > expert width, width % N, ...
        assert cfg.run_budget == Budget("steps", 100_000) and cfg.batch_size == 8192 and cfg.data.store.endswith("gpt2_resid_post8")
        assert cfg.model["arch"] == name.split("_")[1]
        if name == "fig3_switch_flops":
            assert kwargs["expert_width"] == 24576 and kwargs["n_experts"] == 8


def test_the_grids_cover_the_papers_figures():
    assert set(EXPERIMENTS) == {"fig1_topk", "fig1_switch", "fig3_topk", "fig3_switch_width", "fig3_switch_flops",
                                "fig3_relu", "fig3_gated"}
    assert len(grid("fig1_switch")) == 16 and all(len(g) == 2 for g in grid("fig1_switch"))
