"""`python -m pipeline.s3_demo [overrides]` (= `make s3-demo`): the demo pipeline on object storage.

Starts a loopback S3 server (runtime/loopback_s3.py: moto's, with credentials of its own in this
process's environment), creates a bucket, and runs conf/demo/s3.yaml through pipeline/demo.py with the
harvest's store at `s3://switch-sae-demo/<the preset's store name>`: the harvest writes there (commit
protocol, lease lock), training reads it through the local chunk cache, eval reads its held-out
chunks from it. The server lives in memory: the bucket is gone when the command ends; the runs, the
report and the cache stay under `out`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from harvest.config import HarvestConfig
from pipeline.demo import run_demo
from runtime.loopback_s3 import LoopbackS3
from runtime.config import compose_app
from runtime.errors import one_line_errors
from runtime.location import Location

BUCKET = "switch-sae-demo"


def run_s3_demo(cfg: DictConfig) -> Path:
    """The demo config `cfg` with its store moved into a bucket of a fresh loopback S3 server; the
    report's path."""
    local = HarvestConfig.from_omegaconf(compose_app("harvest", cfg.harvest)).store
    with LoopbackS3() as s3:
        url = f"{s3.bucket(BUCKET)}/{Location.of(local).name}"
        print(f"[s3-demo] a loopback S3 server at {s3.endpoint}; the store: {url}")
        cfg.harvest = [*cfg.harvest, f"store={url}"]
        return run_demo(cfg)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    with one_line_errors("s3-demo"):
        run_s3_demo(compose_app("demo", args, "s3"))


if __name__ == "__main__":
    main()
