"""Patch encoders: image patches ``uint8[n, P, P, 3]`` to features ``float32[n, D]``.

One registry, :data:`ENCODERS`, used by ``pathfed prepare``, ``simulate`` on image
folders and ``pathfed models``: each entry is an :class:`EncoderSpec` that declares what
the encoder needs (a weights file: none, optional or required), its feature size, the
patch size it expects and how it normalises pixels. :func:`build_encoder` returns an
:class:`Encoder` with a ``name``, a feature size ``dim`` and a ``weights_hash`` (sha256 of
the weights file, or ``"none"``) that feature files record, so features from different
weights are never mixed; the built encoder must match its declaration.

- ``color-texture``: fixed, data-independent hand-crafted statistics (colour, stain,
  texture); it needs no weights, so the project runs where nothing can be downloaded.
- ``resnet-tiny``: a small plain-torch ResNet (GroupNorm, 256-d), random-initialised with a
  fixed seed or loaded from a local weights file (``torch.load(weights_only=True)``).
- ``timm:ARCH``: any timm architecture, when timm is installed (it needs torchvision).
- Models of :mod:`common.models` with an embedding method join with
  :func:`register_model_encoder`.

Encoders never normalise with statistics of the data (only fixed constants: ImageNet's, or
those a foundation encoder was published with): that would be an unaccounted use of
private data outside DP-SGD.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from common.errors import ConfigError, DataError, UnknownModelError
from common.models.foundation import (
    FOUNDATION,
    IMAGENET,
    FoundationArch,
    Normalisation,
    Resize,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, residual) in OD space.
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32
)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True))

def color_texture(patches: np.ndarray) -> np.ndarray:
    """21 colour, stain and texture statistics per patch."""
    x = patches.astype(np.float32) / 255.0
    n = x.shape[0]
    flat = x.reshape(n, -1, 3)
    od = -np.log(np.clip(flat, 1.0 / 255.0, 1.0))
    hed = od @ _HED_FROM_RGB
    h, e = hed[..., 0], hed[..., 1]
    gray = x.mean(axis=-1)
    gy, gx = np.gradient(gray, axis=(1, 2))
    grad = np.sqrt(gx**2 + gy**2).reshape(n, -1)
    feats = [
        flat.mean(1), flat.std(1),                       # 6: colour
        od.mean(1), od.std(1),                           # 6: optical density
        h.mean(1, keepdims=True), h.std(1, keepdims=True),
        np.percentile(h, 90, axis=1)[:, None],           # 3: haematoxylin (nuclei)
        e.mean(1, keepdims=True), e.std(1, keepdims=True),  # 2: eosin (stroma)
        grad.mean(1, keepdims=True) * 10, grad.std(1, keepdims=True) * 10,  # 2: texture
        (h > 0.5).mean(1, keepdims=True),                # 1: dense-nuclei fraction
        (gray.reshape(n, -1) < 0.5).mean(1, keepdims=True),             # 1: dark fraction
    ]
    return np.concatenate(feats, axis=1).astype(np.float32)


@runtime_checkable
class Encoder(Protocol):
    """Patches ``uint8[n, P, P, 3]`` to features ``float32[n, dim]``."""

    name: str
    dim: int
    weights_hash: str
    input_size: int | None
    """The patch side in pixels it takes; None for any size."""
    normalisation: Normalisation | None
    """Fixed per-channel (mean, std) on [0, 1] pixels; None for raw ``uint8`` input."""

    def __call__(self, patches: np.ndarray) -> np.ndarray: ...


class FunctionEncoder:
    """A fixed numpy function as an :class:`Encoder` (no weights)."""

    def __init__(self, name: str, fn: Callable[[np.ndarray], np.ndarray], dim: int) -> None:
        self.name, self.fn, self.dim, self.weights_hash = name, fn, dim, "none"
        self.input_size: int | None = None
        self.normalisation: Normalisation | None = None

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        if len(patches) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.fn(patches)

    def __repr__(self) -> str:
        return f"FunctionEncoder({self.name!r}, dim={self.dim})"


IMAGENET_MEAN, IMAGENET_STD = IMAGENET


class TorchEncoder:
    """A torch module as an :class:`Encoder`: ``embed(x[B, 3, P, P]) -> [B, D]`` in batches.

    Patches are scaled to [0, 1] and standardised with fixed constants (ImageNet's by
    default), never with statistics of the data.
    """

    def __init__(
        self, module: nn.Module, name: str, weights_hash: str = "none", *,
        embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
        normalisation: Normalisation = IMAGENET, input_size: int | None = None,
        resize: Resize | None = None, batch_size: int = 64, device: str = "cpu",
        bf16: bool = False,
    ) -> None:
        import torch

        self.module = module.eval()
        self.name, self.weights_hash, self.batch_size = name, weights_hash, batch_size
        self.input_size = input_size
        self.resize = resize
        """Patches of any size are resized (and cropped) to the network's input first."""
        self.normalisation: Normalisation | None = normalisation
        self.bf16 = bf16
        """Whether the forward pass runs in bfloat16 autocast on CUDA (the published
        foundation encoders, trained in mixed precision); feature files record it."""
        self._embed = embed or self.module
        self._mean = torch.tensor(normalisation[0]).view(1, 3, 1, 1)
        self._std = torch.tensor(normalisation[1]).view(1, 3, 1, 1)
        self.to(device)
        side = input_size or (resize.input if resize else 64)
        self.dim = int(self._forward(np.zeros((1, side, side, 3), dtype=np.uint8)).shape[1])

    def to(self, device: str) -> TorchEncoder:
        """Run the encoder on ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``).

        On CUDA, encoders built with ``bf16`` run in bfloat16 autocast (features are
        returned as float32), convolutional encoders in channels-last memory, and a batch
        that does not fit in memory is halved until it does (:meth:`__call__`).
        """
        import torch

        self.device = torch.device(device)
        self.module.to(self.device)
        self._channels_last = self.device.type == "cuda" and any(
            isinstance(m, torch.nn.Conv2d) and m.kernel_size != m.stride
            for m in self.module.modules())
        if self._channels_last:
            self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._mean, self._std = self._mean.to(self.device), self._std.to(self.device)
        return self

    @property
    def autocast(self) -> bool:
        """Whether the forward pass runs in bfloat16 (``bf16`` encoders on CUDA)."""
        return self.bf16 and self.device.type == "cuda"

    @property
    def precision(self) -> str:
        """What the features are computed in (recorded in feature files)."""
        return "bfloat16" if self.autocast else "float32"

    def _forward(self, patches: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16,
                                                     enabled=self.autocast):
            x = torch.from_numpy(np.ascontiguousarray(patches)).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if self.resize is not None:
                x = self.resize(x)
            x = (x - self._mean) / self._std
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self._embed(x)
            return out.reshape(out.shape[0], -1).float().cpu().numpy()

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        if patches.ndim != 4 or patches.shape[-1] != 3:
            raise ValueError(f"expected patches uint8[n, P, P, 3], got {list(patches.shape)}")
        if self.input_size and patches.shape[1:3] != (self.input_size, self.input_size):
            raise ConfigError(f"encoder {self.name!r} takes {self.input_size}-px patches, got "
                              f"{patches.shape[2]}x{patches.shape[1]} px; use --patch-size "
                              f"{self.input_size} (or weights trained at this size)")
        if len(patches) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts, i = [], 0
        while i < len(patches):
            try:
                parts.append(self._forward(patches[i:i + self.batch_size]))
                i += self.batch_size
                continue
            except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
                if "out of memory" not in str(err).lower() or self.batch_size == 1:
                    raise
            import torch  # outside the except: the failed batch's tensors are freed now

            torch.cuda.empty_cache()
            self.batch_size //= 2
            log.warning("encoder %s: out of device memory; batch size now %d", self.name,
                        self.batch_size)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"TorchEncoder({self.name!r}, dim={self.dim}, weights={self.weights_hash[:12]})"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (:func:`common.runs.sha256_file`)."""
    from common.runs import sha256_file

    return sha256_file(path)


def load_weights(module: nn.Module, path: str | Path, encoder: str) -> str:
    """Load a local weights file into ``module`` (strictly); return the file's sha256.

    Raises :class:`DataError` naming the file: missing, not a PyTorch state dict, or
    parameters that do not fit the architecture (listing the first differences).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (struct.error, EOFError, ...)
        raise DataError(f"{path}: not a PyTorch state-dict file that torch.load(weights_only=True) "
                        f"can read ({type(err).__name__}); give the file written by "
                        "torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: expected a state dict of tensors "
                        f"(torch.save(model.state_dict(), file)) for encoder {encoder!r}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("shape mismatch", shapes)) if items]
        raise DataError(f"{path}: weights do not fit encoder {encoder!r} ({'; '.join(parts)}); "
                        f"give a file saved from the {encoder!r} architecture")
    module.load_state_dict(state, strict=True)
    return file_sha256(path)


def _resnet_tiny(weights: str | Path | None) -> Encoder:
    """A small GroupNorm ResNet (fixed random init, or local --weights)."""
    import torch

    from common.models.encoders import ResNetTiny

    with torch.random.fork_rng():
        torch.manual_seed(0)  # random-init features are reproducible across runs
        module = ResNetTiny()
    digest = load_weights(module, weights, "resnet-tiny") if weights else "none"
    return TorchEncoder(module, "resnet-tiny", digest)


def _color_texture(weights: str | Path | None) -> Encoder:
    """21 hand-made colour, stain (HED) and texture statistics per patch; no weights."""
    return FunctionEncoder("color-texture", color_texture, dim=21)


def _timm(arch: str, weights: str | Path | None) -> Encoder:
    try:
        import timm
    except ImportError as err:
        raise ConfigError(f"encoder 'timm:{arch}' needs the timm package, which cannot be "
                          f"imported here ({err}); install timm and torchvision, or use "
                          f"one of: {', '.join(sorted(ENCODERS))}") from None
    try:
        module = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as err:  # timm's "Unknown model"
        raise UnknownModelError(f"unknown timm architecture {arch!r} ({err})") from None
    digest = load_weights(module, weights, f"timm:{arch}") if weights else "none"
    if not weights:
        log.warning("encoder timm:%s has random weights (no --weights file given)", arch)
    return TorchEncoder(module, f"timm:{arch}", digest)


EncoderBuilder = Callable[[str | Path | None], Encoder]
"""Builds an encoder from an optional local weights file."""

Weights = Literal["none", "optional", "required"]


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry: how an encoder is built and what it declares.

    The built encoder must agree with the declaration (:func:`build_encoder` checks), so
    ``pathfed models`` and the feature files say what really ran.
    """

    builder: EncoderBuilder
    summary: str
    weights: Weights = "optional"
    """Whether a local weights file is taken: never, optionally (else a fixed random
    initialisation) or always."""
    dim: int | None = None
    """Feature size; None when the weights or the architecture decide it."""
    input_size: int | Literal["any", "weights"] = "any"
    """Patch side in pixels, ``"any"`` (global pooling), or ``"weights"``: the size the
    weights were trained at (a fixed default without weights)."""
    normalisation: Normalisation | None = IMAGENET
    """Fixed (mean, std) per channel on [0, 1] pixels; None for raw ``uint8`` patches."""
    resize: Resize | None = None
    """Patches of any size are resized (and cropped) to the network's input first."""
    details: dict[str, Any] | None = None
    """More about a published encoder (its timm call, weights file, sources)."""

    def describe(self) -> dict[str, Any]:
        """The declaration as plain values (``pathfed models --json``)."""
        norm = self.normalisation
        return {"summary": self.summary, "weights": self.weights, "dim": self.dim,
                "input_size": self.input_size,
                "normalisation": None if norm is None else {"mean": list(norm[0]),
                                                            "std": list(norm[1])},
                **({"preprocess": self.resize.describe()} if self.resize else {}),
                **(self.details or {})}


ENCODERS: dict[str, EncoderSpec] = {
    "color-texture": EncoderSpec(_color_texture, "21 colour, stain (HED) and texture "
                                 "statistics per patch; no weights", weights="none", dim=21,
                                 normalisation=None),
    "resnet-tiny": EncoderSpec(_resnet_tiny, "a small GroupNorm ResNet (1.2 M parameters), "
                               "fixed random init or local weights", dim=256),
}
TIMM = EncoderSpec(lambda weights: _timm("ARCH", weights), "any timm architecture "
                   "(timm:ARCH; needs timm and torchvision), local weights")
"""The declaration shared by every ``timm:ARCH`` encoder."""


def register_encoder(name: str, builder: EncoderBuilder | EncoderSpec,
                     summary: str = "", **declared: Any) -> None:
    """Add an encoder to the registry under ``name`` (a spec, or a builder plus the
    :class:`EncoderSpec` fields it declares)."""
    if name in ENCODERS:
        raise ValueError(f"encoder {name!r} is already registered")
    spec = builder if isinstance(builder, EncoderSpec) else EncoderSpec(
        builder, summary or ((builder.__doc__ or "").strip().splitlines() or [name])[0],
        **declared)
    ENCODERS[name] = spec


def register_model_encoder(name: str, model: str, method: str = "embed",
                           **model_kwargs: Any) -> None:
    """Register a :mod:`common.models` model as an encoder through its ``method``.

    E.g. ``register_model_encoder("patch-cnn", "patch-cnn", method="features")`` makes
    ``build_encoder("patch-cnn", weights=FILE)`` embed patches with the trained model.
    """

    def builder(weights: str | Path | None) -> Encoder:
        from common.models import build_model

        module = build_model(model, **model_kwargs)
        digest = load_weights(module, weights, name) if weights else "none"
        embed = getattr(module, method, None)
        if not callable(embed):
            raise ConfigError(f"model {model!r} has no {method!r} method to embed patches with")
        return TorchEncoder(module, name, digest, embed=embed)

    register_encoder(name, builder, f"model {model!r} through its {method!r} method")


def build_encoder(name: str, weights: str | Path | None = None) -> Encoder:
    """The registered encoder ``name``, with weights from a local file if given.

    Raises:
        UnknownModelError: unknown name (the message lists the known ones).
        DataError: weights file missing, unreadable or not fitting the architecture.
        ConfigError: weights given to an encoder that takes none.
    """
    if name.startswith("timm:"):
        spec, encoder = TIMM, _timm(name.removeprefix("timm:"), weights)
    else:
        spec = encoder_spec(name)
        if spec.weights == "none" and weights:
            raise ConfigError(f"encoder {name!r} takes no weights file; drop --weights or "
                              "choose a learned encoder such as 'resnet-tiny'")
        if spec.weights == "required" and not weights:
            raise ConfigError(f"encoder {name!r} needs a local weights file: `pathfed prepare "
                              f"SLIDES --out FEATURES --encoder {name} --weights FILE`, then "
                              "train on FEATURES (image folders encode on the fly only with "
                              "encoders that need no file); nothing is downloaded")
        encoder = spec.builder(weights)
    _check_declared(name, spec, encoder)
    return encoder


def encoder_spec(name: str) -> EncoderSpec:
    """The declaration of ``name``; :class:`UnknownModelError` lists the known ones."""
    if name.startswith("timm:"):
        return TIMM
    try:
        return ENCODERS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}, "
            "or timm:ARCH"
        ) from None


def _check_declared(name: str, spec: EncoderSpec, encoder: Encoder) -> None:
    """An encoder that contradicts its registry entry is a bug in the entry: say which."""
    wrong = [f"dim {encoder.dim} (declared {spec.dim})"] if spec.dim not in (
        None, encoder.dim) else []
    size = {"any": None}.get(str(spec.input_size), spec.input_size)
    if (encoder.input_size is None) != (size is None) or (
            isinstance(size, int) and encoder.input_size != size):
        wrong.append(f"input_size {encoder.input_size} (declared {spec.input_size})")
    if getattr(encoder, "resize", None) != spec.resize:
        wrong.append(f"resize {getattr(encoder, 'resize', None)} (declared {spec.resize})")
    norm = getattr(encoder, "normalisation", None)
    if tuple(map(tuple, norm or ())) != tuple(map(tuple, spec.normalisation or ())):
        wrong.append(f"normalisation {norm} (declared {spec.normalisation})")
    if wrong:
        raise ConfigError(f"encoder {name!r} does not match its registry entry: "
                          f"{', '.join(wrong)}")


def get_encoder(name: str) -> Encoder:
    """The registered encoder ``name`` without weights (see :func:`build_encoder`)."""
    return build_encoder(name)


def _patch_cnn(weights: str | Path | None) -> Encoder:
    """The seed's residual patch CNN (``residual-patch-cnn``), e.g. trained in federation.

    Its patch size is read from the weights (the fully connected layer's size depends on
    it); without weights it is a 32-px network with a fixed random initialisation.
    """
    import math

    import torch

    from common.models import build_model

    patch_size = 32
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            fc_in = state["cnn.fc.weight"].shape[1]
            channels = state["cnn.unit2.conv2.weight"].shape[0]
            patch_size = 4 * math.isqrt(fc_in // channels)
        except Exception:  # load_weights below reports what is wrong with the file
            pass
    torch.manual_seed(0)
    module = build_model("residual-patch-cnn", patch_size=patch_size)
    digest = load_weights(module, weights, "patch-cnn") if weights else "none"
    return TorchEncoder(module, "patch-cnn", digest, embed=module.embed,  # type: ignore[arg-type]
                        input_size=patch_size)


register_encoder("patch-cnn", _patch_cnn, "the seed's residual patch CNN (e.g. trained in "
                 "federation; 32 px without weights)", dim=128, input_size="weights")


def foundation_encoder(arch: FoundationArch, weights: str | Path) -> TorchEncoder:
    """A published encoder (:mod:`common.models.foundation`) with its local weights."""
    from common.models.foundation import embed_fn, load_module, weights_path

    module = load_module(arch, weights)
    return TorchEncoder(module, arch.name, file_sha256(weights_path(arch, weights)),
                        embed=embed_fn(arch, module), normalisation=arch.normalisation,
                        resize=arch.resize, batch_size=32, bf16=True)


def _foundation(name: str) -> EncoderBuilder:
    def builder(weights: str | Path | None) -> Encoder:
        assert weights is not None  # declared "required": build_encoder refuses None
        return foundation_encoder(FOUNDATION[name], weights)

    return builder


for _name, _arch in FOUNDATION.items():
    register_encoder(_name, EncoderSpec(
        _foundation(_name), f"{_arch.summary}; needs the [encoders] extra and its local "
        f"weights file ({_arch.weights_file})", weights="required", dim=_arch.dim,
        normalisation=_arch.normalisation, resize=_arch.resize, details=_arch.describe()))
