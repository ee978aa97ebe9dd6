"""runtime.cli: what every CLI checks before handing over to its Hydra main, and what it leaves to Hydra."""

import pytest
from hydra.core.global_hydra import GlobalHydra

from runtime.cli import precheck
from tests.conftest import CONF

# the `model=` options the train CLI lists, one per conf/train/model/*.yaml
MODELS = ", ".join(sorted(p.stem for p in (CONF / "train" / "model").glob("*.yaml")))


def run(argv, capsys):
    """(config the check saw or None, exit code or None, stderr) of precheck on conf/train."""
    seen = []
    try:
        precheck("train", seen.append, argv)
        code = None
    except SystemExit as e:
        code = e.code
    assert not GlobalHydra.instance().is_initialized()
    return (seen[0] if seen else None), code, capsys.readouterr().err


def test_the_check_gets_the_config_hydra_would_compose(capsys):
    cfg, code, err = run(["model=switch", "model.k=3", "hydra.run.dir=/nowhere"], capsys)
    assert code is None and err == "" and cfg.model.arch == "switch" and cfg.model.k == 3


@pytest.mark.parametrize(("argv", "line"), [
    (["model.widht=3"], "train: error: unknown key 'model.widht'; did you mean 'model.width'?"),
    (["model=switch", "model.n_expert=3"], "train: error: unknown key 'model.n_expert'; did you mean 'model.n_experts'?"),
    (["model=moe"], f"train: error: unknown model 'moe'; choose one of {MODELS}"),
    (["+experiment=fig9"], "train: error: unknown experiment 'fig9'; choose one of fig1_switch, fig1_topk, fig3_gated, "
                           "fig3_relu, fig3_switch_flops, fig3_switch_width, fig3_topk, paper"),
    (["lr=[1"], "train: error: cannot read the override 'lr=[1': no viable alternative at input '[1'"),
    (["-m", "model=topk,moe"], f"train: error: unknown model 'moe'; choose one of {MODELS}"),
])
def test_composition_errors_are_one_line(argv, line, capsys):
    cfg, code, err = run(argv, capsys)
    assert cfg is None and code == 2 and err == line + "\n"


@pytest.mark.parametrize("argv", [["--cfg", "job", "foo=1"], ["--help"], ["-m", "model.k=1,2", "foo=1"]])
def test_hydra_flags_and_multiruns_are_left_to_hydra_and_each_job(argv, capsys):
    cfg, code, err = run(argv, capsys)
    assert cfg is None and code is None and err == ""
