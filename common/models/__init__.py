"""Model registry: every model PathFed trains is declared and built here by name.

Each entry is a :class:`~common.models.base.ModelSpec`: its builder (``module:function``,
so knowing the names, e.g. to validate a config, does not import torch), its *kind*
(``bags`` or ``patches``: the data path a site builds), a summary and its options. Every
builder returns a module that honours :class:`~common.models.base.TrainableModel` and
passes Opacus' strict validator (GroupNorm, never BatchNorm). A new model is one module
plus one line here; the tests pick it up by kind.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from common.errors import UnknownModelError
from common.models.base import Kind, ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from common.models.mil import AttentionMIL, MILOutput

_MIL_OPTIONS = {"hidden_dim": 32, "attention_dim": 16, "dropout": 0.0}

MODELS: dict[str, ModelSpec] = {
    "gated-attention-mil": ModelSpec("common.models.mil:gated_attention_mil", "bags",
                                     "gated attention-MIL (Ilse et al. 2018)", _MIL_OPTIONS),
    "attention-mil": ModelSpec("common.models.mil:attention_mil", "bags",
                               "attention-MIL (Ilse et al. 2018)", _MIL_OPTIONS),
    "residual-patch-cnn": ModelSpec("common.models.patch_cnn:residual_patch_cnn", "patches",
                                    "the seed's residual patch CNN (GroupNorm)", {}),
}


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; :class:`UnknownModelError` lists the known ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None


def models_of_kind(kind: Kind) -> list[str]:
    """Names of the registered models of ``kind``, sorted."""
    return sorted(name for name, spec in MODELS.items() if spec.kind == kind)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` (e.g. ``in_dim``)."""
    module, _, function = model_spec(name).builder.partition(":")
    return getattr(importlib.import_module(module), function)(**kwargs)


def __getattr__(name: str) -> Any:
    if name in ("AttentionMIL", "MILOutput"):
        from common.models import mil

        return getattr(mil, name)
    raise AttributeError(name)


__all__ = ["MODELS", "AttentionMIL", "MILOutput", "ModelSpec", "build_model", "model_spec",
           "models_of_kind"]
