"""What every stage needs at run time, owned by no stage: errors and the command line (`errors`),
device and precision (`device`), the cores a process may use (`cpu`), the processes of a job (`ranks`), files written whole or not at
all (`files`).

Importing this package first (each stage's package does) fixes the settings below before torch
loads: MKL may otherwise pick another code path (data alignment) or thread count (on a busy machine)
per call, which moves float32 results by one ulp, and a resumed harvest would not write the rows an
uninterrupted one writes. Tokenizers' own thread pool is switched off: the stages batch themselves.
OpenMP threads sleep when idle instead of spinning: the loader's and the harvest writer's worker
threads call torch beside the trainer or the LM, each with a team of its own, and on a machine with
few cores spinning teams starve the others (the compressed loader ran at half speed on 2 cores;
a training step's time did not change, measured with `make bench` both ways). Freed batches and
chunks stay in the process's heap for the next ones (`cpu.keep_freed_memory`).
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from runtime.cpu import keep_freed_memory  # noqa: E402  (after the settings above, before torch loads)

keep_freed_memory()
