"""Model registry: every model PathFed trains is built here by name.

Every registered builder returns a module that passes Opacus' strict validator
(``ModuleValidator.validate(model, strict=True)``): GroupNorm, never BatchNorm.
The registry names ``module:function`` builders, so knowing the names (to validate a
config, or in a site's SecAgg+ key exchange) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from common.errors import UnknownModelError

if TYPE_CHECKING:
    from torch import nn

    from common.models.mil import AttentionMIL, MILOutput

MODELS: dict[str, str] = {
    "gated-attention-mil": "common.models.mil:gated_attention_mil",
    "attention-mil": "common.models.mil:attention_mil",
    "residual-patch-cnn": "common.models.patch_cnn:residual_patch_cnn",
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` (e.g. ``in_dim``)."""
    try:
        target = MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)(**kwargs)  # type: ignore[no-any-return]


def __getattr__(name: str) -> Any:
    if name in ("AttentionMIL", "MILOutput"):
        from common.models import mil

        return getattr(mil, name)
    raise AttributeError(name)


__all__ = ["MODELS", "AttentionMIL", "MILOutput", "build_model"]
