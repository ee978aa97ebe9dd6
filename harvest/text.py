"""Text sources -> a deterministic stream of fixed-length token sequences.

Documents come from a hub dataset (streamed), local files (.txt/.jsonl/.json/.parquet, read by
`datasets`) or the embedded offline corpus (a local .jsonl). They are tokenized, each preceded by
one separator token, concatenated, and cut into sequences of exactly `context_size` tokens:
no padding exists anywhere (see `Packer` for the two ways of cutting). The `Packer` state (documents consumed + leftover tokens) is small and
exact, so a resumed harvest continues the stream at the very token where it stopped.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harvest.config import PACKINGS, DatasetConfig, HarvestError
from harvest.hub import MISSING_PATH_HINT, OFFLINE_HINT, hub_reachable, looks_like_path

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def local_files(name: str) -> list[str] | None:
    """The data files named by a local path, folder or glob; None if `name` is not local."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if Path(f).suffix in _BUILDERS)
        if not files:
            raise HarvestError(f"dataset folder {name!r} holds no {'/'.join(_BUILDERS)} files")
    elif os.path.isfile(path):
        files = [path]
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise HarvestError(f"dataset glob {name!r} matches no file")
    else:
        return None
    kinds = {Path(f).suffix for f in files}
    if not kinds <= set(_BUILDERS):
        raise HarvestError(f"unsupported dataset file type(s) {sorted(kinds - set(_BUILDERS))}; use {', '.join(_BUILDERS)}")
    if len({_BUILDERS[k] for k in kinds}) > 1:
        raise HarvestError(f"dataset {name!r} mixes file types {sorted(kinds)}; use one type")
    return files


def check_dataset(ds: DatasetConfig) -> None:
    """Fail now, in one line, if the dataset cannot be opened or its records have no `text_field`
    (runs in preflight, before any model is loaded or any store is created). A local dataset's first
    record is read; a hub dataset's fields are those its builder declares, when it declares them."""
    files = local_files(ds.name)
    if files is not None:
        first = next(iter(_stream(ds, files)), None)
        if first is None:
            raise HarvestError(f"dataset {ds.name!r} holds no records")
        _check_field(ds, list(first))
        return
    if looks_like_path(ds.name) or Path(ds.name).suffix in _BUILDERS:
        raise HarvestError(f"dataset file {ds.name!r} does not exist ({MISSING_PATH_HINT})")
    if not hub_reachable():
        raise HarvestError(f"dataset {ds.name!r} is not a local file and the Hugging Face Hub is unreachable; {OFFLINE_HINT}")
    import datasets

    try:
        builder = datasets.load_dataset_builder(ds.name, ds.config)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HarvestError(f"unknown dataset {ds.name!r}: {first_line}") from None
    if builder.info.features is not None:
        _check_field(ds, list(builder.info.features))


def _check_field(ds: DatasetConfig, fields: list[str]) -> None:
    """dataset.text_field must be one of the records' fields."""
    if ds.text_field not in fields:
        raise HarvestError(f"dataset.text_field {ds.text_field!r} is not a field of the records of {ds.name}; "
                           f"their fields: {', '.join(sorted(fields))}")


def _stream(ds: DatasetConfig, files: list[str] | None) -> Iterable[dict]:
    """The dataset's records in their stored order, streamed: local `files` if given, else the hub's."""
    import datasets

    if files is not None:
        builder = _BUILDERS[Path(files[0]).suffix]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    return datasets.load_dataset(ds.name, ds.config, split=ds.split, streaming=True)


def iter_documents(ds: DatasetConfig, seed: int) -> Iterator[str]:
    """Document texts, in an order fixed by the dataset and `seed`. Opens the stream now."""
    stream = _stream(ds, local_files(ds.name))
    if ds.shuffle_buffer > 0:
        stream = stream.shuffle(seed=seed, buffer_size=ds.shuffle_buffer)
    return _texts(stream, ds.text_field)


def _texts(stream: Iterable[dict], field: str) -> Iterator[str]:
    for row in stream:
        if field not in row:
            raise HarvestError(f"dataset rows have no {field!r} column (columns: {sorted(row)}); set dataset.text_field")
        yield row[field]


@dataclass
class PackState:
    """Where the token stream stands: documents taken so far and tokens not yet in a sequence."""

    docs_consumed: int = 0
    carry: list[int] = field(default_factory=list)


class Packer:
    """Cuts a stream of documents into sequences of `context_size` token ids.

    packing="document": every sequence is [separator] + the next context_size - 1 tokens of ONE
      document; a document's tail shorter than that is dropped. The separator (an attention sink
      with a huge-norm activation, like any first token) is then always at position 0, which the
      harvest excludes.
    packing="concat": documents are concatenated, each as [separator] + its tokens, and cut
      every context_size tokens; nothing is dropped, but separators land mid-sequence.

    Documents are tokenized in batches for speed; only documents wholly moved into the buffer
    count as consumed, so (docs_consumed, carry) is an exact resume point.
    """

    def __init__(
        self,
        documents: Iterable[str],
        tokenizer,
        context_size: int,
        separator_id: int,
        state: PackState | None = None,
        tokenize_batch: int = 64,
        packing: str = "concat",
    ):
        assert packing in PACKINGS, packing
        self._packing = packing
        self.state = PackState(state.docs_consumed, list(state.carry)) if state else PackState()
        self._docs = itertools.islice(iter(documents), self.state.docs_consumed, None)
        self._tokenizer = tokenizer
        self._ctx = context_size
        self._sep = separator_id
        self._batch = tokenize_batch
        self._pending: list[list[int]] = []
        self._buf = np.asarray(self.state.carry, dtype=np.int64)

    def _next_document(self) -> list[int] | None:
        if not self._pending:
            texts = list(itertools.islice(self._docs, self._batch))
            if not texts:
                return None
            ids = self._tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            self._pending = list(reversed(ids))
        return self._pending.pop()

    def take(self, n: int) -> np.ndarray:
        """Up to n sequences [n', context_size] int64 (n' < n only when the text runs out)."""
        return self._take_document(n) if self._packing == "document" else self._take_concat(n)

    def _take_concat(self, n: int) -> np.ndarray:
        need = n * self._ctx
        parts = [self._buf]
        have = len(self._buf)
        while have < need:
            ids = self._next_document()
            if ids is None:
                break
            parts.append(np.asarray([self._sep, *ids], dtype=np.int64))
            have += len(ids) + 1
            self.state.docs_consumed += 1
        buf = np.concatenate(parts)
        n_out = min(n, len(buf) // self._ctx)
        out = buf[: n_out * self._ctx].reshape(n_out, self._ctx)
        self._buf = buf[n_out * self._ctx :]
        self.state.carry = self._buf.tolist()
        return out

    def _take_document(self, n: int) -> np.ndarray:
        body = self._ctx - 1
        out = np.empty((n, self._ctx), dtype=np.int64)
        out[:, 0] = self._sep
        got = 0
        while got < n:
            if len(self._buf) < body:  # this document's tail is too short: next document
                ids = self._next_document()
                if ids is None:
                    break
                self._buf = np.asarray(ids, dtype=np.int64)
                self.state.docs_consumed += 1
                continue
            out[got, 1:] = self._buf[:body]
            self._buf = self._buf[body:]
            got += 1
        self.state.carry = self._buf.tolist()
        return out[:got]


def separator_id(tokenizer, separator: str | None) -> int:
    """Token id placed before each document: `separator` (a token string) or the eos token."""
    token = separator if separator is not None else tokenizer.eos_token
    if token is None:
        raise HarvestError("the tokenizer has no eos token; set dataset.separator to a token string")
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise HarvestError(f"dataset.separator {token!r} is not a single token of this tokenizer")
    return int(tid)
