"""Write the timm reference data that ``tests/test_foundation.py`` checks PathFed's encoders
against (run where timm imports; the files are committed, so the tests need no timm).

    python tests/data/make_timm_fixtures.py

- ``timm_architectures.json.gz``: for every timm-format encoder of
  :data:`common.models.foundation.FOUNDATION`, the state-dict keys and shapes of the published
  architecture as timm builds it (on the meta device) and its parameter count.
- ``timm_tiny.pt``: for each of them, a small variant (:meth:`FoundationArch.scaled`: every
  structural choice kept) with random weights, two input patches and the embedding timm
  computes for them, pooled as the encoder's authors do.

On the development machine timm was imported beside a stand-in for torchvision, which does not
import beside the CPU torch wheel; timm's ViT uses nothing of torchvision.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import timm
import torch

from common.models.foundation import FOUNDATION, FoundationArch

HERE = Path(__file__).parent


def timm_kwargs(arch: FoundationArch) -> dict:
    kwargs = dict(arch.timm_kwargs)
    if kwargs.get("mlp_layer") == "SwiGLUPacked":
        kwargs["mlp_layer"] = timm.layers.SwiGLUPacked
    if kwargs.get("act_layer") == "SiLU":
        kwargs["act_layer"] = torch.nn.SiLU
    return kwargs


def embed(arch: FoundationArch, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The embedding as the encoder's authors compute it from timm's model."""
    if arch.pool == "cls":
        return model(x)  # num_classes=0, global_pool="token": the normalised class token
    tokens = model(x)  # global_pool="": all tokens, normalised
    return torch.cat([tokens[:, 0], tokens[:, 1 + arch.registers:].mean(1)], dim=1)


def main() -> None:
    archs = [a for a in FOUNDATION.values() if a.weights_format == "timm"]
    manifest = {}
    for arch in archs:
        with torch.device("meta"):
            model = timm.create_model(arch.timm_arch, pretrained=False, **timm_kwargs(arch))
        state = model.state_dict()
        manifest[arch.name] = {"params": sum(p.numel() for p in model.parameters()),
                               "state": [[k, list(v.shape)] for k, v in state.items()]}
        print(f"{arch.name}: {manifest[arch.name]['params']:,} parameters, {len(state)} tensors")
    with gzip.open(HERE / "timm_architectures.json.gz", "wt") as f:
        json.dump(manifest, f)

    tiny = {}
    rng = np.random.default_rng(0)
    for arch in archs:
        small = arch.scaled()
        torch.manual_seed(0)
        model = timm.create_model(small.timm_arch, pretrained=False, **timm_kwargs(small)).eval()
        with torch.no_grad():  # random values everywhere, so every parameter matters
            for name, p in model.named_parameters():
                scale = 0.3 if p.ndim > 1 or "token" in name or "pos" in name else 0.1
                p.copy_((torch.randn_like(p) * scale + (1.0 if name.endswith(
                    ("norm1.weight", "norm2.weight", "norm.weight")) else 0.0)
                ).half().float())
        side = small.img_size
        patches = rng.integers(0, 256, size=(2, side, side, 3), dtype=np.uint8)
        mean = torch.tensor(small.normalisation[0]).view(1, 3, 1, 1)
        std = torch.tensor(small.normalisation[1]).view(1, 3, 1, 1)
        x = (torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        with torch.no_grad():
            out = embed(small, model, x)
        tiny[arch.name] = {"state": {k: v.half() for k, v in model.state_dict().items()},
                           "patches": torch.from_numpy(patches), "embedding": out}
        print(f"tiny {arch.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"embedding {list(out.shape)}")
    torch.save(tiny, HERE / "timm_tiny.pt")


if __name__ == "__main__":
    main()
