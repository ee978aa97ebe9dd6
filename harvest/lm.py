"""Load a causal LM and read one site of one block without running anything above it.

Works with any transformers causal LM whose blocks sit in a ModuleList (GPT-2, GPT-NeoX, Llama,
Mistral, Qwen, OPT, ...). Eval (CE loss recovered) uses the same site lookup to patch activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from harvest.config import HarvestError
from harvest.hub import MISSING_PATH_HINT, OFFLINE_HINT, hub_reachable, is_local, looks_like_path
from runtime.device import autocast

# Where the list of blocks lives, by model family; other layouts are found by search.
_BLOCK_PATHS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks")
# Sub-module names of a block's attention and MLP, by model family.
_SUBMODULES = {
    "attn_out": ("attn", "self_attn", "attention", "self_attention"),
    "mlp_out": ("mlp", "feed_forward", "ffn"),
}
# Sites read at the INPUT of another site's module: mlp_in is what the MLP reads (the residual stream
# after the block's second norm), mlp_out what it writes; a transcoder maps the one to the other.
_INPUT_OF = {"mlp_in": "mlp_out"}


def reads_input(site: str) -> bool:
    """Whether the site's activation is its module's input (else its output)."""
    return site in _INPUT_OF


def load_config(name: str) -> PretrainedConfig:
    """The model's config, or one clear HarvestError (unknown model, hub unreachable)."""
    if not is_local(name) and looks_like_path(name):
        raise HarvestError(f"model folder {name!r} does not exist ({MISSING_PATH_HINT})")
    if not is_local(name) and not hub_reachable():
        try:
            return AutoConfig.from_pretrained(name, local_files_only=True)
        except Exception:
            raise HarvestError(
                f"model {name!r} is neither a local folder nor cached, and the Hugging Face Hub is unreachable; {OFFLINE_HINT}"
            ) from None
    try:
        return AutoConfig.from_pretrained(name)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HarvestError(f"unknown model {name!r}: {first}") from None


def load_tokenizer(name: str) -> object:
    """The tokenizer of a model (hub id or local folder), or one clear HarvestError."""
    load_config(name)  # one line for a missing model or an unreachable hub
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001  (whatever the loader raises is one line)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HarvestError(f"cannot load the tokenizer of {name!r}: {first}") from None


def n_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def load_lm(name: str, device: torch.device, keep_layers: int | None = None) -> tuple[nn.Module, object]:
    """Model (eval mode, float32, on `device`) and tokenizer.

    keep_layers: drop every block from this index on, freeing their memory (harvest needs none).
    """
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    if keep_layers is not None:
        parent, attr, blocks = _find_blocks(model)
        setattr(parent, attr, nn.ModuleList(list(blocks)[:keep_layers]))
    return model.to(device).eval(), tokenizer


def _find_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, the ModuleList of transformer blocks)."""
    for path in _BLOCK_PATHS:
        *parents, attr = path.split(".")
        parent = model
        for p in parents:
            parent = getattr(parent, p, None)
            if parent is None:
                break
        blocks = getattr(parent, attr, None) if parent is not None else None
        if isinstance(blocks, nn.ModuleList):
            return parent, attr, blocks
    want = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == want:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise HarvestError(f"cannot find the transformer blocks of {type(model).__name__}")


def blocks(model: nn.Module) -> nn.ModuleList:
    return _find_blocks(model)[2]


def site_module(model: nn.Module, layer: int, site: str) -> nn.Module:
    """The module whose output (or, for a site that `reads_input`, whose input) is the activation at
    (layer, site)."""
    block = blocks(model)[layer]
    if site == "resid_post":
        return block
    names = _SUBMODULES[_INPUT_OF.get(site, site)]
    for name in names:
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name)
    raise HarvestError(f"{type(block).__name__} has no sub-module for site {site!r} (looked for {names})")


def _first(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Stop(Exception):
    """Raised inside the hook to end the forward pass once the site has been read."""


class SitesReader:
    """Calls the model up to the last of several (layer, site) pairs and returns each activation,
    [batch, seq, d] float32, in the order the sites were given.

    The forward pass is cut short as soon as every hooked module has run: no block above the deepest
    site, no final norm and no unembedding is ever computed.
    """

    def __init__(self, model: nn.Module, sites: list[tuple[int, str]], dtype: torch.dtype = torch.float32):
        self.model, self.sites, self.dtype = model, list(sites), dtype
        self._modules = [site_module(model, layer, site) for layer, site in self.sites]
        self._inputs = [reads_input(site) for _, site in self.sites]
        self._out: list[torch.Tensor | None] = [None] * len(self.sites)

    def _hook(self, k: int) -> Callable:
        def keep(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            self._out[k] = args[0] if self._inputs[k] else _first(output)
            if all(out is not None for out in self._out):
                raise _Stop

        return keep

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """input_ids [batch, seq] (on the model's device) -> [activations [batch, seq, d] float32] per site."""
        handles = [m.register_forward_hook(self._hook(k)) for k, m in enumerate(self._modules)]
        try:
            with autocast(input_ids.device, self.dtype):
                self.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if any(out is None for out in self._out):
            missing = [self.sites[k] for k, out in enumerate(self._out) if out is None]
            raise RuntimeError(f"the hooked module(s) of {missing} did not run")
        out, self._out = self._out, [None] * len(self.sites)
        return [o.float() for o in out]


class SiteReader(SitesReader):
    """`SitesReader` of one (layer, site): returns its activation [batch, seq, d] float32."""

    def __init__(self, model: nn.Module, layer: int, site: str, dtype: torch.dtype = torch.float32):
        super().__init__(model, [(layer, site)], dtype)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().__call__(input_ids)[0]


def iter_batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]
