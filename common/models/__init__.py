"""Model registry: every model PathFed trains is built here by name.

Every registered builder returns a module that passes Opacus' strict validator
(``ModuleValidator.validate(model, strict=True)``): GroupNorm, never BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from common.errors import UnknownModelError
from common.models.mil import AttentionMIL, MILOutput

ModelBuilder = Callable[..., nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "gated-attention-mil": lambda in_dim, **kw: AttentionMIL(in_dim, gated=True, **kw),
    "attention-mil": lambda in_dim, **kw: AttentionMIL(in_dim, gated=False, **kw),
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` (e.g. ``in_dim``)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    return builder(**kwargs)


__all__ = ["MODELS", "AttentionMIL", "MILOutput", "build_model"]
