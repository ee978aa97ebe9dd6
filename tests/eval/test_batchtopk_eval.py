"""A BatchTopK run through eval, geometry and the dashboards' encoding pass: every downstream tool opens
the SAE in eval mode, so it reads the inference rule (one threshold theta), not the batch rule."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from eval.firings import scan
from eval.geometry import GeometryConfig, geometry
from eval.run import evaluate
from tests.conftest import CONF
from tests.eval.test_run import config
from tests.train.test_loop import make_cfg, synthetic_store
from train.loop import train
from train.metrics import reconstruction_metrics
from train.run_dir import RunDir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny batchtopk run (20 steps) on the synthetic sparse-dictionary store; held-out chunk 9."""
    root = tmp_path_factory.mktemp("btk")
    store = synthetic_store(root / "store", n_chunks=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(make_cfg(store, "model=batchtopk", "model.width=64", "model.k=4", "budget=steps:20"), root / "run")
    finally:
        torch.set_num_threads(threads)
    return root / "run"


def test_eval_reads_the_inference_rule(run):
    result, = evaluate(config(run, ce=False, batch_size=32))
    assert result["arch"] == "batchtopk" and result["k"] == 4 and result["eval_tokens"] == 128
    opened = RunDir(run).open(torch.device("cpu"))
    assert not opened.sae.training and opened.sae.theta > 0 and opened.sae.theta_steps == 20

    def metrics(training: bool) -> dict:
        opened.sae.train(training)
        return reconstruction_metrics(opened.sae, opened.held.rows(10_000), batch_size=32, dead_window=None,
                                      dtype=torch.float32)

    threshold, batch = metrics(False), metrics(True)
    assert batch["l0"] == 4  # the batch rule: k per token on average in every batch
    assert result["l0"] == threshold["l0"] != 4 and result["mse"] == threshold["mse"] != batch["mse"]
    assert opened.sae.theta_steps == 20  # evaluating estimated nothing


def test_dashboard_encoding_and_geometry_run(run):
    opened = RunDir(run).open(torch.device("cpu"))
    firings = scan(opened, torch.device("cpu"), max_tokens=10_000, batch_size=32, whole_chunks=False)
    x = torch.cat(list(opened.held.rows(10_000)))
    with torch.no_grad():
        _, j, _ = opened.sae.encode(x).nonzero()  # eval mode: each token alone, so one batch or many agree
    assert len(firings.rows) == len(j) and firings.counts.tolist() == torch.bincount(j, minlength=64).tolist()
    with initialize_config_dir(config_dir=str(CONF / "eval"), version_base="1.3"):
        cfg = GeometryConfig.from_omegaconf(compose("geometry", overrides=[f"run={run}", "tsne=false", "device=cpu"]))
    (result,), _ = geometry(cfg)
    assert result["arch"] == "batchtopk" and result["n_latents"] == 64 and 0 <= result["dup_frac"] <= 1
