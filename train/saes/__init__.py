"""SAE architectures behind one interface (`base.SAE`), picked by name from a registry."""

from train.saes.base import REGISTRY, SAE, Codes, Layout, Output, build, load, nonfinite, save
# registers them, in the order every listing of architectures (error messages, reports) follows
from train.saes import topk as _topk, switch as _switch, relu as _relu, gated as _gated, jumprelu as _jumprelu, batchtopk as _batchtopk, matryoshka as _matryoshka, matryoshka_switch as _matryoshka_switch  # noqa: F401, E402, I001

__all__ = ["REGISTRY", "SAE", "Codes", "Layout", "Output", "build", "load", "nonfinite", "save"]
