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
    "sa-mil": ModelSpec("common.models.sa_mil:sa_mil", "bags",
                        "self-attention (dot, RBF or Laplace kernel) then gated attention "
                        "(Rymarczyk et al. 2021)", {**_MIL_OPTIONS, "kernel": "dot"},
                        {"kernel": ("dot", "rbf", "laplace")}),
    "transmil": ModelSpec("common.models.transmil:transmil", "bags",
                          "transformer: class token, 2 self-attention layers, PPEG "
                          "(Shao et al. 2021)", {"hidden_dim": 32, "heads": 4, "dropout": 0.0}),
    "clam-sb": ModelSpec("common.models.clam:clam_sb", "bags",
                         "gated attention + instance clustering loss on top/bottom-k "
                         "patches (Lu et al. 2021)",
                         {**_MIL_OPTIONS, "k_sample": 8, "bag_weight": 0.7}),
    "dsmil": ModelSpec("common.models.dsmil:dsmil", "bags",
                       "dual stream: max-pooled instance classifier + critical-instance "
                       "attention (Li et al. 2021)", _MIL_OPTIONS),
    "sparse-mil": ModelSpec("common.models.sparse_mil:sparse_mil", "bags",
                            "sparsemax selection of key patches, classified alone (the "
                            "seed's SS-MIL)", {**_MIL_OPTIONS, "temperature": 1.0}),
    "acmil": ModelSpec("common.models.acmil:acmil", "bags",
                       "attention-challenging MIL: 5 attention branches, stochastic top-k "
                       "masking (Zhang et al. 2024)",
                       {**_MIL_OPTIONS, "branches": 5, "top_k": 10, "mask_prob": 0.6,
                        "diversity": 0.1}),
    "mean-mil": ModelSpec("common.models.mean_mil:mean_mil", "bags",
                          "mean pooling of embedded patches, linear classifier (Ilse et al. "
                          "2018's baseline; few parameters: the choice under strong DP noise)",
                          {"hidden_dim": 8, "dropout": 0.0}),
    "multiscale-mil": ModelSpec("common.models.multiscale_mil:multiscale_mil", "multiscale",
                                "cross-scale attention from low-power regions to their "
                                "high-power patches, gated attention over regions (the seed's "
                                "MC-ViT idea)", {**_MIL_OPTIONS, "scales": "both"},
                                {"scales": ("both", "high", "low")}),
    "dp-gan": ModelSpec("common.models.dp_gan:dp_gan", "patches",
                        "conditional DCGAN of patches (GroupNorm); the discriminator trains "
                        "with DP-SGD, the generator only through it (`pathfed synthesize`)",
                        {"latent": 64, "width": 32}, trains="adversarial"),
    "seg-cnn": ModelSpec("common.models.seg_cnn:seg_cnn", "patches",
                         "small U-Net (GroupNorm) segmenting tumour pixels, trained on "
                         "annotation masks; slide score = its largest patch tumour fraction",
                         {"width": 8, "dice_weight": 1.0}, trains="segmenter"),
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


def parse_model_options(name: str, text: str) -> dict[str, Any]:
    """``'hidden_dim=64,kernel=rbf'`` as constructor options of model ``name``, each of the
    type of its declared default; :class:`ValueError` naming the allowed options."""
    declared = model_spec(name).options
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = (part.strip() for part in item.partition("="))
        allowed = ", ".join(f"{k} (default {v!r})" for k, v in declared.items()) or "none"
        if not sep or key not in declared:
            raise ValueError(f"model-options: {item!r} is not an option of model {name!r}; "
                             f"its options: {allowed}")
        default = declared[key]
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false"):
                    raise ValueError(raw)
                value: Any = raw.lower() == "true"
            else:
                value = type(default)(raw)
        except ValueError:
            raise ValueError(f"model-options: {key}={raw!r} is not a {type(default).__name__} "
                             f"(default {default!r})") from None
        allowed_values = model_spec(name).choices.get(key)
        if allowed_values is not None and value not in allowed_values:
            raise ValueError(f"model-options: {key}={raw!r} is not one of "
                             f"{', '.join(map(str, allowed_values))}")
        out[key] = value
    return out


def models_of_kind(*kinds: Kind) -> list[str]:
    """Names of the registered models of any of ``kinds``, sorted."""
    return sorted(name for name, spec in MODELS.items() if spec.kind in kinds)


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
           "models_of_kind", "parse_model_options"]
