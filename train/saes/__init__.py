"""SAE architectures behind one interface (`base.SAE`), picked by name from a registry."""

from train.saes.base import REGISTRY, SAE, Codes, Output, build, load, save
from train.saes import gated as _gated, relu as _relu, switch as _switch, topk as _topk  # noqa: F401  (registers them)

__all__ = ["REGISTRY", "SAE", "Codes", "Output", "build", "load", "save"]
