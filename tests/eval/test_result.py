"""eval/result.py: eval.json written and read back through one typed record."""

import json

import pytest

from eval.result import EvalResult, EvalResultError
from train.run_dir import RunDir

GOOD = {"arch": "switch", "n_latents": 64, "l0": 3.5, "mse": 0.25, "n_experts": 4, "k": 4, "match": "width",
        "expert_load": [0.25, 0.25, 0.5, 0.0], "sae": {"d": 16}, "notes": ["held out"], "loss_recovered": None}


def test_eval_json_round_trips_through_the_run_folder(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    EvalResult(**GOOD).write(run)
    back = EvalResult.read(run)
    assert back == EvalResult(**GOOD) and back["mse"] == back.get("mse") == 0.25
    assert json.loads(run.file(RunDir.EVAL).read_text())["expert_load"] == [0.25, 0.25, 0.5, 0.0]
    assert EvalResult.read(RunDir(tmp_path / "empty")) is None
    with pytest.raises(KeyError, match="no field 'mes'"):  # a typo in a table column fails, not a blank cell
        back.get("mes")


@pytest.mark.parametrize(("change", "message"), [
    ({"mse": "low"}, "mse must be a number, got 'low'"),
    ({"fve": "high"}, "fve must be a number or null, got 'high'"),
    ({"n_latents": 64.5}, "n_latents must be an integer, got 64.5"),
    ({"l0": True}, "l0 must be a number, got True"),
    ({"arch": "moe"}, "arch must be one of topk, switch"),
    ({"n_experts": None}, "a switch run needs n_experts"),
    ({"match": "params"}, "match must be width, flops or null"),
    ({"expert_load": [0.5, "x"]}, "expert_load must be a list of numbers or null"),
    ({"notes": "one"}, "notes must be a list of strings"),
    ({"mse": None}, "missing mse"),
])
def test_a_malformed_eval_json_is_one_line_naming_the_file(change, message, tmp_path):
    with pytest.raises(EvalResultError) as e:
        EvalResult.from_json({**GOOD, **change}, tmp_path / "eval.json")
    assert str(e.value).startswith(f"{tmp_path / 'eval.json'}: ") and message in str(e.value), str(e.value)


def test_keys_of_a_newer_version_are_ignored():
    assert EvalResult.from_json({**GOOD, "brand_new_metric": 1.0}, "eval.json") == EvalResult(**GOOD)
