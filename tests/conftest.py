"""Shared fixtures: tiny randomly initialised GPT-2 and Llama models, a tokenizer, small corpora.

Everything here is built offline in seconds; only tests marked `slow` touch the real SmolLM2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import runtime  # noqa: F401  (reproducibility settings before anything loads torch)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"  # one folder per Hydra app: conf/harvest, conf/train
OFFLINE_MODEL = ROOT / "data" / "models" / "smollm2-135m"

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never talk to a hub
os.environ["HF_DATASETS_OFFLINE"] = "1"


def documents(n: int = 400) -> list[str]:
    """Real English prose (Python's pydoc topics), cut into n short documents."""
    from pydoc_data.topics import topics

    paras = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40]
    return paras[:n]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer (vocab 512) trained on the documents."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


def _tiny_model(kind: str, tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=4, n_head=2,
                            eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer_dir, tmp_path_factory) -> Path:
    return _tiny_model("gpt2", tokenizer_dir, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama(tokenizer_dir, tmp_path_factory) -> Path:
    return _tiny_model("llama", tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(documents())))
    return path


def harvest_overrides(model: Path, corpus: Path, store: Path, /, **extra) -> list[str]:
    """Hydra overrides for a quick harvest on a tiny model (chunks of 2 sequences x 15 rows)."""
    base = {"model": model, "layer": 2, "dataset.name": corpus, "store": store, "context_size": 16,
            "chunk_seqs": 2, "tokens": 300, "batch_size": 4, "progress": "false", "device": "cpu"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def compose(overrides: list[str]):
    """The harvest config exactly as `python -m harvest <overrides>` would see it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from harvest.config import HarvestConfig

    with initialize_config_dir(config_dir=str(CONF / "harvest"), version_base="1.3"):
        return HarvestConfig.from_omegaconf(hydra_compose("harvest", overrides=overrides))


def eval_config(run: Path | str, **values):
    """The eval config exactly as `python -m eval run=<run> key=value ...` would see it (every other key
    at its conf/eval/eval.yaml default), on the CPU without progress bars unless `values` say otherwise."""
    from eval.run import EvalConfig
    from runtime.config import compose_app

    def hydra_value(v) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    values = {"device": "cpu", "progress": False, **values}
    overrides = [f"run={run}", *(f"{k}={hydra_value(v)}" for k, v in values.items())]
    return EvalConfig.from_omegaconf(compose_app("eval", overrides))


def run_cli(args: list[str], env: dict | None = None, **kwargs):
    """`python -m harvest args...` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "harvest", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on a free loopback port for the session, its AWS_* variables set in
    this process (runtime/loopback_s3.py); stopped at the end."""
    from runtime.loopback_s3 import LoopbackS3

    with LoopbackS3() as s3:
        yield s3


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh bucket on the loopback S3 server: its URL (`s3://test-<random>`)."""
    import uuid

    return s3_server.bucket(f"test-{uuid.uuid4().hex[:12]}")
