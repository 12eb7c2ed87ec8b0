"""Pathology foundation encoders (UNI, Virchow2, H-optimus-0, ...) from local weights.

Each :class:`FoundationArch` records one published encoder: the timm call its authors
publish (``timm_arch`` and ``timm_kwargs``, the source of truth), the numbers derived from it
that build the network, how patches are prepared (resize, crop, mean and std), which token(s)
make the embedding, the weights file its authors distribute, and where each number was
checked (``source``).

**One build path.** Every encoder is built with ``transformers`` (the ``[encoders]`` extra):
``ViTModel`` without layer scale, ``Dinov2Model`` with it, ``Dinov2WithRegistersModel`` with
register tokens. timm is not used at run time: it imports torchvision unconditionally, and
PyPI's torchvision does not import beside the CPU torch wheel this project pins. Weight files
in timm's format (six of the seven) are converted key by key (:func:`timm_to_hf`);
transformers-format files (Phikon) load through ``from_pretrained``. ``tests/test_foundation.py``
checks the conversion against features and state dicts that real timm produced
(``tests/data/make_timm_fixtures.py``).

Weights are only ever read from a local file (``--weights FILE``), strictly: a missing key, an
unexpected key or a wrong shape is one line naming the encoder, the expected file and the
first differences, in the file's own key names.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from common.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]
IMAGENET: Normalisation = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Resize:
    """Patch preparation before the network: resize to ``size`` x ``size`` (``mode``
    interpolation, antialiased), then centre-crop to ``crop`` when given."""

    size: int
    crop: int | None = None
    mode: Literal["bicubic", "bilinear"] = "bicubic"

    @property
    def input(self) -> int:
        """The side of the network's input in pixels."""
        return self.crop or self.size

    def describe(self) -> str:
        crop = f", centre crop {self.crop}" if self.crop else ""
        return f"resize {self.size} ({self.mode}){crop}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x[B, 3, H, W]`` (float) resized and cropped."""
        import torch.nn.functional as F

        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode,
                              align_corners=False, antialias=True)
        if self.crop and self.crop != self.size:
            top = (self.size - self.crop) // 2
            x = x[..., top:top + self.crop, top:top + self.crop]
        return x


Pool = Literal["cls", "cls+mean"]


@dataclass(frozen=True)
class FoundationArch:
    """One published encoder, as built here (see the module docstring)."""

    name: str
    summary: str
    timm_arch: str
    """The timm architecture the authors publish (``timm.create_model`` name)."""
    timm_kwargs: dict[str, Any]
    """The keyword arguments of the authors' ``timm.create_model`` call (layer classes by
    name); for transformers-native weights, the ``config.json`` values."""
    width: int
    depth: int
    heads: int
    patch: int
    mlp_ratio: float
    """timm's ``mlp_ratio``: the MLP's hidden width over ``width`` (for SwiGLU: of both
    halves together, as timm's ``SwiGLUPacked``)."""
    dim: int
    """The embedding size (``width``, or twice it for ``cls+mean``)."""
    weights_file: str
    source: str
    """Where the numbers were checked."""
    params: int
    """The parameter count of the published architecture (without a head)."""
    swiglu: bool = False
    layer_scale: float | None = None
    registers: int = 0
    no_embed_class: bool = False
    """timm's ``no_embed_class``: the position table covers the patches only."""
    img_size: int = 224
    """The patch grid the position table was trained on, in pixels."""
    pool: Pool = "cls"
    resize: Resize = field(default_factory=lambda: Resize(224))
    normalisation: Normalisation = IMAGENET
    weights_format: Literal["timm", "transformers"] = "timm"
    layer_norm_eps: float = 1e-6

    @property
    def mlp_hidden(self) -> int:
        """The hidden width of the MLP (of each half for SwiGLU), as timm computes it."""
        hidden = int(self.width * self.mlp_ratio)
        return hidden // 2 if self.swiglu else hidden

    @property
    def grid(self) -> int:
        """Patches per side of the position table."""
        return self.img_size // self.patch

    @property
    def family(self) -> Literal["vit", "dinov2", "dinov2-registers"]:
        """The transformers model that builds it."""
        if self.registers:
            return "dinov2-registers"
        return "dinov2" if self.layer_scale is not None or self.swiglu else "vit"

    def scaled(self, width: int = 24, depth: int = 2, heads: int = 2,
               grid: int = 2) -> FoundationArch:
        """The same architecture, small (for tests): every structural choice kept."""
        img = grid * self.patch
        return replace(self, width=width, depth=depth, heads=heads, img_size=img,
                       dim=width * (2 if self.pool == "cls+mean" else 1),
                       resize=Resize(img, None, self.resize.mode), params=0,
                       timm_kwargs={**self.timm_kwargs, "embed_dim": width, "depth": depth,
                                    "num_heads": heads, "img_size": img})

    def describe(self) -> dict[str, Any]:
        """What ``pathfed models`` prints about it."""
        return {"timm": self.timm_arch, "timm_kwargs": self.timm_kwargs,
                "weights_file": self.weights_file, "preprocess": self.resize.describe(),
                "pool": self.pool, "params": self.params, "source": self.source}


def _mlp_ratio_for_transformers(arch: FoundationArch) -> int:
    """transformers' (integer) ``mlp_ratio`` that yields timm's hidden width.

    transformers' Dinov2 MLP keeps ``width * r`` hidden units, its SwiGLU
    ``(int(width * r * 2 / 3) + 7) // 8 * 8`` per half; timm's ``SwiGLUPacked`` keeps
    ``int(width * mlp_ratio) // 2``.
    """
    target = arch.mlp_hidden
    for r in range(1, 17):
        hidden = arch.width * r
        if (((int(hidden * 2 / 3) + 7) // 8 * 8) if arch.swiglu else hidden) == target:
            return r
    raise ConfigError(f"encoder {arch.name!r}: an MLP of {target} hidden units at width "
                      f"{arch.width} is not one transformers' Dinov2 can build")


def build_module(arch: FoundationArch) -> nn.Module:
    """The transformers network of ``arch`` with random weights (on the current default
    device: ``with torch.device("meta")`` builds it without memory)."""
    try:
        import transformers
    except ImportError as err:
        raise ConfigError(f"encoder {arch.name!r} needs the [encoders] extra (pip install -e "
                          f"'.[encoders]'), which cannot be imported here ({err})") from None
    common: dict[str, Any] = dict(hidden_size=arch.width, num_hidden_layers=arch.depth,
                  num_attention_heads=arch.heads, patch_size=arch.patch,
                  image_size=arch.img_size, layer_norm_eps=arch.layer_norm_eps,
                  qkv_bias=True, hidden_act="gelu")
    module: nn.Module
    if arch.family == "vit":
        module = transformers.ViTModel(
            transformers.ViTConfig(intermediate_size=arch.mlp_hidden, **common),
            add_pooling_layer=False)
    else:
        dino: dict[str, Any] = dict(mlp_ratio=_mlp_ratio_for_transformers(arch),
                                    use_swiglu_ffn=arch.swiglu,
                                    layerscale_value=arch.layer_scale or 1.0, **common)
        if arch.family == "dinov2-registers":
            module = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
                num_register_tokens=arch.registers, **dino))
        else:
            module = transformers.Dinov2Model(transformers.Dinov2Config(**dino))
    module.train(False)
    return module


def embed_fn(arch: FoundationArch, module: nn.Module) -> Any:
    """``x[B, 3, S, S]`` (resized, normalised) to the published embedding ``[B, dim]``."""
    prefix = 1 + arch.registers

    def embed(x: torch.Tensor) -> torch.Tensor:
        import torch

        tokens = module(pixel_values=x).last_hidden_state
        if arch.pool == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=1)

    return embed


# --- timm <-> transformers state dicts -------------------------------------------------------

def _hf_block(arch: FoundationArch, i: int) -> str:
    return f"layers.{i}." if arch.family == "vit" else f"encoder.layer.{i}."


def _block_names(arch: FoundationArch) -> dict[str, str | tuple[str, ...]]:
    """timm block parameter -> transformers parameter(s) (a tuple: split along dim 0)."""
    vit = arch.family == "vit"
    names: dict[str, str | tuple[str, ...]] = {
        "norm1": "layernorm_before" if vit else "norm1",
        "norm2": "layernorm_after" if vit else "norm2",
        "attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        "attn.proj": "attention.o_proj",
        "mlp.fc1": ("mlp.gate_proj", "mlp.up_proj") if arch.swiglu else "mlp.fc1",
        "mlp.fc2": "mlp.down_proj" if arch.swiglu else "mlp.fc2",
    }
    if arch.layer_scale is not None:
        names.update({"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"})
    return names


_EMBED = {"cls_token": "embeddings.cls_token", "reg_token": "embeddings.register_tokens",
          "pos_embed": "embeddings.position_embeddings",
          "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
"""timm names outside the blocks -> transformers names (whole keys or module prefixes)."""


def _renamed(key: str, table: dict[str, str]) -> str:
    """``key`` through ``table`` (a whole key, or its module prefix); else unchanged."""
    stem, _, leaf = key.rpartition(".")
    if key in table:
        return table[key]
    return f"{table[stem]}.{leaf}" if stem in table else key
_IGNORED_TIMM = ("head.", "fc_norm.", "mask_token")
"""Keys of published timm files that the embedding never uses (a classification head; timm
drops them too when built with ``num_classes=0``)."""


def timm_to_hf(state: dict[str, torch.Tensor], arch: FoundationArch) -> dict[str, torch.Tensor]:
    """A timm-format state dict of ``arch`` in the names of its transformers network.

    Position tables: with ``no_embed_class`` timm's table has no class row (a zero row is
    added); where register tokens have their own rows (Virchow2), those rows are folded into
    the register tokens, which is exact because positions are added before the blocks.
    Keys it does not know pass through unchanged, so a strict load names them.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    blocks = _block_names(arch)
    for key, value in state.items():
        if key.startswith(_IGNORED_TIMM):
            continue
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            stem_rest = rest.rpartition(".")[0] if rest.endswith(("weight", "bias")) else rest
            leaf = rest[len(stem_rest) + 1:] if stem_rest != rest else ""
            target = blocks.get(stem_rest)
            if target is None:
                out[key] = value
                continue
            prefix = _hf_block(arch, int(i))
            suffix = f".{leaf}" if leaf else ""
            if isinstance(target, tuple):
                for name, part in zip(target, value.chunk(len(target), dim=0), strict=True):
                    out[prefix + name + suffix] = part
            else:
                out[prefix + target + suffix] = value
        else:
            out[_renamed(key, _EMBED)] = value
    pos = out.get("embeddings.position_embeddings")
    if pos is not None and pos.ndim == 3:
        grid = arch.grid ** 2
        if arch.no_embed_class and pos.shape[1] == grid:
            out["embeddings.position_embeddings"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]),
                                                               pos], dim=1)
        elif arch.registers and pos.shape[1] == 1 + arch.registers + grid:
            reg = out.get("embeddings.register_tokens")
            if reg is not None and reg.shape == pos[:, 1:1 + arch.registers].shape:
                out["embeddings.register_tokens"] = reg + pos[:, 1:1 + arch.registers]
            out["embeddings.position_embeddings"] = torch.cat([pos[:, :1],
                                                               pos[:, 1 + arch.registers:]], dim=1)
    return out


def hf_to_timm(state: dict[str, torch.Tensor], arch: FoundationArch) -> dict[str, torch.Tensor]:
    """The inverse of :func:`timm_to_hf`: the state of the transformers network in timm's
    names and shapes (the class position folded into the class token where timm has none).
    Works on meta tensors (the expected timm keys and shapes of a published encoder)."""
    import torch

    inverse_embed = {v: k for k, v in _EMBED.items()}
    out: dict[str, torch.Tensor] = {}
    blocks = _block_names(arch)
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in state.items():
        if key == "embeddings.mask_token":
            continue
        if key.startswith(("layers.", "encoder.layer.")):
            head = "layers." if key.startswith("layers.") else "encoder.layer."
            i, rest = key[len(head):].split(".", 1)
            for timm_name, target in blocks.items():
                targets = target if isinstance(target, tuple) else (target,)
                name, _, leaf = rest.rpartition(".") if rest not in targets else (rest, "", "")
                if name in targets:
                    tkey = f"blocks.{i}.{timm_name}" + (f".{leaf}" if leaf else "")
                    if len(targets) == 1:
                        out[tkey] = value
                    else:
                        parts.setdefault(tkey, []).append((targets.index(name), value))
                    break
            else:
                out[key] = value
        else:
            out[_renamed(key, inverse_embed)] = value
    for tkey, chunks in parts.items():
        out[tkey] = torch.cat([v for _, v in sorted(chunks, key=lambda c: c[0])], dim=0)
    pos = out["pos_embed"]
    if arch.no_embed_class:
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    elif arch.registers:
        out["pos_embed"] = torch.cat([pos[:, :1], pos.new_zeros(1, arch.registers, pos.shape[2]),
                                      pos[:, 1:]], dim=1)
    return out


# --- loading ---------------------------------------------------------------------------------

def read_state(path: Path, encoder: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only``)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load and safetensors raise many types
        raise DataError(f"{path}: not a weights file that safetensors or torch.load("
                        f"weights_only=True) can read ({type(err).__name__}); encoder "
                        f"{encoder!r} expects a state dict of tensors") from None
    for key in ("state_dict", "model", "module", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: expected a state dict of tensors for encoder {encoder!r}")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def _listed(missing: list[str], unexpected: list[str], shapes: list[str]) -> list[str]:
    """The first few of each kind of difference, for a one-line error."""
    return [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected),
                                 ("wrong shape", shapes)) if items]


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    shapes = [f"{k} {list(found[k].shape)} (expected {list(expected[k].shape)})"
              for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    return _listed([k for k in expected if k not in found],
                   [k for k in found if k not in expected], shapes)


def load_module(arch: FoundationArch, path: str | Path) -> nn.Module:
    """The network of ``arch`` with the weights of a local file, loaded strictly.

    Raises :class:`DataError` (one line: the encoder, the file it expects, the first
    differences in the file's own key names).
    """
    path = weights_path(arch, path)
    if arch.weights_format == "transformers":
        return _load_transformers(arch, path)
    import torch

    state = read_state(path, arch.name)
    with torch.device("meta"):  # shapes only: nothing is initialised that the file replaces
        module = build_module(arch)
    own = module.state_dict()
    hf_style = any(k.startswith(("embeddings.", "encoder.", "layers.")) for k in state)
    if hf_style:  # a file of this very transformers network (e.g. written by a test or a user)
        found = {k: v for k, v in state.items() if k != "embeddings.mask_token"}
        expected = {k: v for k, v in own.items() if k != "embeddings.mask_token"}
    else:
        found = {k: v for k, v in state.items() if not k.startswith(_IGNORED_TIMM)}
        expected = hf_to_timm(own, arch)
    wrong = _differences(found, expected)
    if wrong:
        raise DataError(f"{path}: weights do not fit encoder {arch.name!r} ({'; '.join(wrong)}); "
                        f"it expects {arch.weights_file}")
    converted = dict(found) if hf_style else timm_to_hf(state, arch)
    if "embeddings.mask_token" in own:  # used only for masked pre-training
        converted.setdefault("embeddings.mask_token",
                             torch.zeros(own["embeddings.mask_token"].shape))
    converted = {k: v.float().contiguous() for k, v in converted.items()}
    module.load_state_dict(converted, strict=True, assign=True)
    return module.eval()


def weights_path(arch: FoundationArch, path: str | Path) -> Path:
    """The weights file: ``path``, or the checkpoint inside a downloaded model folder."""
    path = Path(path)
    if path.is_dir():
        names = ("model.safetensors", "pytorch_model.bin")
        found = next((path / n for n in names if (path / n).is_file()), None)
        if found is None:
            raise DataError(f"{path}: no {' or '.join(names)} in this folder (encoder "
                            f"{arch.name!r} expects {arch.weights_file})")
        return found
    if not path.is_file():
        raise DataError(f"{path}: weights file not found (encoder {arch.name!r} expects "
                        f"{arch.weights_file})")
    return path


def _load_transformers(arch: FoundationArch, path: Path) -> nn.Module:
    """A transformers-format checkpoint (a file, or a folder holding one) through
    ``from_pretrained``, which knows every key naming transformers has used; the
    architecture is ours (the published numbers), never the folder's ``config.json``."""
    import torch

    file = weights_path(arch, path)
    with torch.device("meta"):
        template = build_module(arch)
    with tempfile.TemporaryDirectory(prefix="pathfed-encoder-") as tmp:
        folder = Path(tmp)
        template.config.save_pretrained(folder)  # type: ignore[union-attr, operator]
        (folder / ("model.safetensors" if file.suffix == ".safetensors"
                   else "pytorch_model.bin")).symlink_to(file.resolve())
        kwargs = {"add_pooling_layer": False} if arch.family == "vit" else {}
        try:
            module, info = type(template).from_pretrained(  # type: ignore[attr-defined]
                folder, local_files_only=True, output_loading_info=True,
                dtype=torch.float32, **kwargs)  # fp16 files run in float32, as timm's
        except Exception as err:  # shape mismatches raise inside from_pretrained
            raise DataError(f"{file}: weights do not fit encoder {arch.name!r} "
                            f"({str(err).splitlines()[0][:300]}); it expects "
                            f"{arch.weights_file}") from None
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith("pooler.")]
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("mask_token")]
    shapes = [str(m[0]) if isinstance(m, tuple) else str(m)
              for m in info.get("mismatched_keys", [])]
    wrong = _listed(missing, unexpected, shapes)
    if wrong:
        raise DataError(f"{file}: weights do not fit encoder {arch.name!r} ({'; '.join(wrong)}); "
                        f"it expects {arch.weights_file}")
    module.train(False)
    return module


def n_params(module: nn.Module) -> int:
    """Parameters of the network that the embedding uses (not the mask token)."""
    return sum(p.numel() for n, p in module.named_parameters() if not n.endswith("mask_token"))


# --- the published encoders --------------------------------------------------------------------

LUNIT_NORM: Normalisation = ((0.70322989, 0.53606487, 0.66096631),
                             (0.21716536, 0.26081574, 0.20723464))
H_OPTIMUS_NORM: Normalisation = ((0.707223, 0.578729, 0.703617),
                                 (0.211883, 0.230117, 0.177517))

FOUNDATION: dict[str, FoundationArch] = {a.name: a for a in (
    FoundationArch(
        "uni", "UNI (Mahmood lab, ViT-L/16, DINOv2 on 100k slides)",
        "vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                                  "num_classes": 0, "dynamic_img_size": True},
        width=1024, depth=24, heads=16, patch=16, mlp_ratio=4.0, dim=1024, layer_scale=1e-5,
        weights_file="pytorch_model.bin of MahmoodLab/UNI (timm keys)",
        resize=Resize(224, mode="bilinear"),
        source="mahmoodlab/UNI uni/get_encoder/get_encoder.py (timm call; Resize 224, "
               "bilinear); TRIDENT trident/patch_encoder_models/load.py", params=303_350_784),
    FoundationArch(
        "uni2-h", "UNI2-h (Mahmood lab, ViT-H/14 with 8 registers, SwiGLU)",
        "vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "depth": 24,
                                  "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
                                  "mlp_ratio": 2.66667 * 2, "num_classes": 0,
                                  "no_embed_class": True, "mlp_layer": "SwiGLUPacked",
                                  "act_layer": "SiLU", "reg_tokens": 8,
                                  "dynamic_img_size": True},
        width=1536, depth=24, heads=24, patch=14, mlp_ratio=2.66667 * 2, dim=1536,
        swiglu=True, layer_scale=1e-5, registers=8, no_embed_class=True,
        resize=Resize(224, mode="bilinear"),
        weights_file="pytorch_model.bin of MahmoodLab/UNI2-h (timm keys)",
        source="mahmoodlab/UNI README.md and get_encoder.py (UNI2-h timm call); TRIDENT "
               "load.py; slideflow-noncommercial extractors/uni2.py",
        params=681_394_176),
    FoundationArch(
        "virchow2", "Virchow2 (Paige, ViT-H/14 with 4 registers, SwiGLU; class + mean token)",
        "vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                                 "mlp_ratio": 5.3375, "global_pool": "", "reg_tokens": 4,
                                 "dynamic_img_size": True, "mlp_layer": "SwiGLUPacked",
                                 "act_layer": "SiLU"},
        width=1280, depth=32, heads=16, patch=14, mlp_ratio=5.3375, dim=2560, swiglu=True,
        layer_scale=1e-5, registers=4, pool="cls+mean",
        weights_file="pytorch_model.bin of paige-ai/Virchow2 (timm keys)",
        source="TRIDENT load.py (Virchow2: timm call, bicubic 224, class + mean of patch "
               "tokens 5:); slideflow-noncommercial extractors/virchow2.py; 632 M parameters "
               "(arXiv 2408.00738)", params=631_239_424),
    FoundationArch(
        "h-optimus-0", "H-optimus-0 (Bioptimus, ViT-g/14 with 4 registers)",
        "vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5,
                                          "num_classes": 0, "dynamic_img_size": False},
        width=1536, depth=40, heads=24, patch=14, mlp_ratio=2.66667 * 2, dim=1536,
        swiglu=True, layer_scale=1e-5, registers=4, no_embed_class=True,
        normalisation=H_OPTIMUS_NORM, resize=Resize(224, mode="bilinear"),
        weights_file="pytorch_model.bin of bioptimus/H-optimus-0 (timm keys)",
        source="bioptimus/H-optimus-0 model card (init_values 1e-5, mean/std, 224 input) "
               "and config.json (vit_giant_patch14_reg4_dinov2, token pooling, 1536); TRIDENT "
               "load.py", params=1_134_774_272),
    FoundationArch(
        "prov-gigapath", "Prov-GigaPath tile encoder (Microsoft/Providence, ViT-g/16)",
        "vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16,
                                     "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                     "init_values": 1e-5, "mlp_ratio": 5.33334,
                                     "num_classes": 0},
        width=1536, depth=40, heads=24, patch=16, mlp_ratio=5.33334, dim=1536, swiglu=True,
        layer_scale=1e-5, resize=Resize(256, 224),
        weights_file="pytorch_model.bin of prov-gigapath/prov-gigapath (timm keys)",
        source="prov-gigapath README (Resize 256 bicubic, CenterCrop 224, ImageNet); "
               "TRIDENT load.py (timm kwargs); the hub config.json's init_values 1e-5",
        params=1_134_953_984),
    FoundationArch(
        "phikon-v2", "Phikon-v2 (Owkin, ViT-L/16, DINOv2; transformers weights)",
        "Dinov2Model", {"hidden_size": 1024, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "mlp_ratio": 4, "patch_size": 16,
                        "image_size": 224, "layerscale_value": 1e-5,
                        "use_swiglu_ffn": False, "layer_norm_eps": 1e-6},
        width=1024, depth=24, heads=16, patch=16, mlp_ratio=4.0, dim=1024, layer_scale=1e-5,
        weights_format="transformers", resize=Resize(224, mode="bilinear"),
        weights_file="model.safetensors of owkin/phikon-v2 (transformers keys), or its folder",
        source="owkin/phikon-v2 model card (Dinov2 ViT-L/16, 1024-d class token); TRIDENT "
               "load.py (PhikonV2InferenceEncoder: resize 224, ImageNet); its config.json was "
               "not readable here: the strict load checks every shape against these numbers",
        params=303_350_784),
    FoundationArch(
        "phikon", "Phikon (Owkin, ViT-B/16, iBOT; transformers weights)",
        "ViTModel", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "intermediate_size": 3072, "patch_size": 16, "image_size": 224,
                     "layer_norm_eps": 1e-6, "qkv_bias": True},
        width=768, depth=12, heads=12, patch=16, mlp_ratio=4.0, dim=768,
        weights_format="transformers", resize=Resize(224, mode="bilinear"),
        weights_file="model.safetensors of owkin/phikon (transformers keys), or its folder",
        source="owkin/phikon config.json (layer_norm_eps 1e-6 since its PR #1, following "
               "iBOT) and preprocessor_config.json; TRIDENT load.py (PhikonInferenceEncoder)",
        params=85_798_656),
    FoundationArch(
        "lunit-dino", "Lunit DINO ViT-S/8 (Kang et al. 2023)",
        "vit_small_patch8_224", {"num_classes": 0},
        width=384, depth=12, heads=6, patch=8, mlp_ratio=4.0, dim=384,
        normalisation=LUNIT_NORM,
        weights_file="the timm state dict of 1aurent/vit_small_patch8_224.lunit_dino "
                     "(model.safetensors or pytorch_model.bin, timm keys)",
        source="Lunit benchmark-ssl-pathology (its own mean/std, also kaiko-ai/eva "
               "lunit.py); timm vit_small_patch8_224 (patch 8, 384, depth 12, 6 heads); "
               "TRIDENT load.py (LunitS8InferenceEncoder)", params=21_670_272),
)}
"""The published encoders by name. ``params`` is the count of the network as published
(checked against timm in ``tests/test_foundation.py``)."""

