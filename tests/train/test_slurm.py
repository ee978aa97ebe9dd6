"""conf/train/hydra/launcher/slurm.yaml: stage-2 sweeps on a SLURM cluster (hydra-submitit-launcher).

No cluster is needed: the config tests compose the launcher the way `python -m train -m` does, and the
end-to-end test runs a real two-run sweep through the real SlurmLauncher and submitit against stand-in
`sbatch` / `srun` / `sacct` scripts that execute the generated sbatch script on this machine.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from tests.conftest import CONF, ROOT

LAUNCHER_YAML = CONF / "train" / "hydra" / "launcher" / "slurm.yaml"
SLURM_TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def multirun_config(*overrides: str) -> DictConfig:
    """The config `python -m train -m <overrides>` composes (RunMode.MULTIRUN, hydra node included)."""
    with initialize_config_dir(config_dir=str(CONF / "train"), version_base="1.3"):
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None
        return hydra.compose_config("train", list(overrides), run_mode=RunMode.MULTIRUN, from_shell=False,
                                    with_log_configuration=False)


def test_the_plugin_is_importable() -> None:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher, SlurmLauncher

    assert issubclass(SlurmLauncher, BaseSubmititLauncher) and SlurmLauncher._EXECUTOR == "slurm"
    assert ".".join([SlurmLauncher.__module__, SlurmLauncher.__name__]) == SLURM_TARGET


def test_slurm_launcher_composes_with_the_documented_values() -> None:
    cfg = multirun_config("hydra/launcher=slurm", "model=topk,switch", "model.k=16,32")
    launcher = cfg.hydra.launcher
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    assert launcher._target_ == SLURM_TARGET
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 1)
    assert launcher.timeout_min == 480 and launcher.cpus_per_task == 8 and launcher.mem_gb == 16
    assert launcher.partition is None and launcher.account is None
    assert launcher.max_num_timeout == 3 and launcher.signal_delay_s == 120 and launcher.array_parallelism == 64
    assert launcher.name == "switch-sae" and launcher.setup == []
    sweep_dir = cfg.hydra.sweep.dir
    assert launcher.submitit_folder == f"{sweep_dir}/.submitit/%j" and sweep_dir.startswith("multirun/")


def test_slurm_launcher_composes_with_a_paper_grid_and_command_line_keys() -> None:
    cfg = multirun_config("hydra/launcher=slurm", "+experiment=fig3_switch_width", "hydra.launcher.partition=gpu",
                          "hydra.launcher.account=proj42", "+hydra.launcher.additional_parameters.mail_type=END")
    assert cfg.hydra.sweeper.params == {"model.k": "8,16,32,64,128"}  # the grid is untouched
    assert cfg.model.arch == "switch" and cfg.model.n_experts == 16 and cfg.budget == "steps:100_000"
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.account == "proj42"
    assert cfg.hydra.launcher.additional_parameters == {"mail_type": "END"}
    # the node Hydra instantiates: the plugin's launcher, with every interpolation resolved
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["submitit_folder"] == "multirun/reproduce/.submitit/%j"
    assert launcher.params["gpus_per_node"] == 1 and launcher.params["timeout_min"] == 480


def test_the_yaml_validates_against_the_plugins_schema() -> None:
    """Every key of slurm.yaml exists in SlurmQueueConf with a value of its type; a typo would fail."""
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    body = yaml.safe_load(LAUNCHER_YAML.read_text())
    assert body.pop("defaults") == ["submitit_slurm", "_self_"]
    schema = OmegaConf.structured(SlurmQueueConf)
    merged = OmegaConf.merge(schema, body)
    assert OmegaConf.get_type(merged) is SlurmQueueConf and merged.gpus_per_node == 1
    assert set(body) <= set(schema)
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(schema, {**body, "gpus_per_nodes": 1})
    with pytest.raises(ValidationError):
        OmegaConf.merge(schema, {**body, "timeout_min": "8 hours"})


def test_every_key_of_the_yaml_is_commented() -> None:
    lines = [line for line in LAUNCHER_YAML.read_text().splitlines() if line and not line.startswith((" ", "#"))]
    keys = [line for line in lines if ":" in line and line.split(":")[0] != "defaults"]
    assert keys and all("#" in line for line in keys), [line for line in keys if "#" not in line]


# --- a real sweep through the SlurmLauncher, against stand-in SLURM commands -----------------------

SBATCH = r"""#!/bin/bash
# sbatch SCRIPT: print a job id and run SCRIPT in the background (every array task, side by side) with the
# environment SLURM gives a task; task states go to $FAKE_SLURM/state_* for sacct.
set -u
script=$1
id=$(( $(cat "$FAKE_SLURM/next_id" 2>/dev/null || echo 100) ))
echo $(( id + 10 )) > "$FAKE_SLURM/next_id"
cp "$script" "$FAKE_SLURM/sbatch_$id.sh"
last=$(sed -n 's/^#SBATCH --array=0-\([0-9]*\)%.*/\1/p' "$script")
export SLURM_NTASKS=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_JOB_NUM_NODES=1 SLURM_JOB_NODELIST=localhost
run() {  # run JOB_ID: the script as one SLURM job, its state kept for sacct
  echo "$1|RUNNING|localhost" > "$FAKE_SLURM/state_$1"
  bash "$script" && state=COMPLETED || state=FAILED
  echo "$1|$state|localhost" > "$FAKE_SLURM/state_$1"
}
(
  if [[ -z $last ]]; then SLURM_JOB_ID=$id run "$id"; fi
  for task in $(seq 0 "${last:--1}"); do
    SLURM_JOB_ID=$(( id + 1 + task )) SLURM_ARRAY_JOB_ID=$id SLURM_ARRAY_TASK_ID=$task run "${id}_${task}" &
  done
  wait
) </dev/null >"$FAKE_SLURM/sbatch_$id.log" 2>&1 &
echo "Submitted batch job $id"
"""

SRUN = r"""#!/bin/bash
# srun [--output F] [--error F] [flags] CMD...: run CMD with SLURM's %A %a %j %t filled in the log names.
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in --output) out=$2; shift 2 ;; --error) err=$2; shift 2 ;; *) shift ;; esac
done
fill() { local p=$1; p=${p//%A/$SLURM_ARRAY_JOB_ID}; p=${p//%a/$SLURM_ARRAY_TASK_ID}; p=${p//%j/$SLURM_JOB_ID}; echo "${p//%t/0}"; }
out=$(fill "$out"); err=$(fill "${err:-$out}")
mkdir -p "$(dirname "$out")" "$(dirname "$err")"
exec "$@" >>"$out" 2>>"$err"
"""

SACCT = r"""#!/bin/bash
echo "JobID|State|NodeList"
cat "$FAKE_SLURM"/state_* 2>/dev/null
"""


def fake_slurm(folder: Path) -> Path:
    """A bin folder with the stand-in sbatch, srun and sacct."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in {"sbatch": SBATCH, "srun": SRUN, "sacct": SACCT}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IXUSR)
    return bin_dir


def random_store(path: Path, n_chunks: int = 8, d: int = 16) -> Path:
    """A small complete activation store of random rows (enough to run a few steps)."""
    from harvest.store import Layout, StoreWriter

    rng = np.random.default_rng(0)
    layout = Layout(d_model=d, context_size=17, first_pos=1, chunk_seqs=8, n_chunks=n_chunks, acts_dtype="float16")
    writer = StoreWriter.create(path, layout, [], {"model": "synthetic", "layer": 0, "site": "none", "config": {}})
    for i in range(n_chunks):
        rows = rng.normal(size=(layout.chunk_rows, d)).astype(np.float16)
        writer.write_chunk(i, rows, np.zeros((8, 17), dtype=np.int64), {})
    return path


def sweep(cmd: list[str], env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    """Run the sweep in its own process group, so a hang also ends the background array tasks."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the sweep hung\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_a_sweep_runs_through_the_slurm_launcher(tmp_path: Path) -> None:
    """Two runs as a SLURM job array: the real SlurmLauncher pickles the task, submitit writes the sbatch
    script, the stand-in sbatch executes it. (Relaunching a sweep skips finished runs: the run folders
    depend on the overrides only, and test_loop.py tests the skip with Hydra's basic launcher.)"""
    store, bin_dir = random_store(tmp_path / "store"), fake_slurm(tmp_path / "slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "FAKE_SLURM": str(tmp_path / "slurm")}
    cmd = [sys.executable, "-m", "train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
           "model=topk,switch", "model.width=32", "model.k=4", f"data.store={store}", "data.eval_frac=0.25",
           "budget=steps:10", "batch_size=64", "log_every=5", "progress=false", "device=cpu", f"hydra.sweep.dir={tmp_path}/sweep_${{now:%H-%M-%S}}"]

    first = sweep(cmd, env)
    assert first.returncode == 0, first.stdout + first.stderr
    # ${now:} is resolved once, at submission: the tasks, started seconds later, write into the same folder
    (sweep_dir,) = tmp_path.glob("sweep_*")
    runs = sorted(p.name for p in sweep_dir.iterdir() if (p / "done.json").exists())
    assert len(runs) == 2 and "model=switch" in runs[0] and "model=topk" in runs[1]

    # the sbatch script submitit wrote from slurm.yaml: a 2-task array, one GPU and 8 h per task
    script = (tmp_path / "slurm" / "sbatch_100.sh").read_text()
    for flag in ["--array=0-1%2", "--gpus-per-node=1", "--ntasks-per-node=1", "--nodes=1", "--cpus-per-task=8",
                 "--mem=16GB", "--time=480", "--partition=debug", "--job-name=switch-sae", "--signal=USR2@120"]:
        assert f"#SBATCH {flag}\n" in script, flag
    assert f"--output={sweep_dir}/.submitit/%A_%a/%A_%a_0_log.out" in script

    # each task's stdout lands under the sweep's .submitit folder, one folder per array task
    logs = [sweep_dir / ".submitit" / f"100_{t}" / f"100_{t}_0_log.out" for t in (0, 1)]
    assert all("sae: " in log.read_text() for log in logs)

