"""``pathfed synthesize``: image patches drawn from a released DP GAN (``model = dp-gan``).

The generator only ever learnt through the discriminator, which trained with DP-SGD
(:mod:`common.models.dp_gan`), so what it draws is post-processing: writing any number of
patches costs no further privacy. The output folder is a labelled image folder
(``labels.csv``: ``image,label``), so it can be looked at, or trained on beside real data.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LABELS = {"benign": 0, "malignant": 1}


def synthesize(model_path: str | Path, n: int, out: str | Path, label: str | None = None,
               seed: int = 0, key: bytes | None = None) -> list[Path]:
    """Write ``n`` generated patches of a released GAN to ``out`` (PNG files and
    ``labels.csv``); half of each class, or all of ``label``. Returns the files written."""
    import torch
    from PIL import Image

    from common.models import build_model, model_spec, parse_model_options
    from common.release import load_model
    from common.training import set_weights

    if n < 1:
        raise ConfigError(f"--n: {n} patches; give 1 or more")
    if label is not None and label not in LABELS:
        raise ConfigError(f"--label: {label!r} is not one of {', '.join(LABELS)}")
    arrays, card, path = load_model(model_path, key)
    if card is None:
        raise DataError(f"{path}: a round checkpoint without a model card; give the run "
                        "folder or its model.npz")
    if model_spec(card.model).trains != "adversarial":
        raise DataError(f"{path}: model {card.model!r} is a classifier, not a generator; "
                        "`pathfed synthesize` draws from a run trained with --set "
                        "model=dp-gan")
    patch_size = int(card.setting("patch") or 32)
    model = build_model(card.model, patch_size=patch_size,
                        **parse_model_options(card.model, card.model_options))
    try:
        set_weights(model, list(arrays.values()))
    except (ValueError, RuntimeError) as err:
        raise DataError(f"{path}: the weights do not fit {card.model!r} ({err})") from None
    classes = (np.full(n, LABELS[label]) if label is not None
               else np.arange(n) % 2)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    names = {v: k for k, v in LABELS.items()}
    written: list[Path] = []
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    generator: Any = model.generator
    with torch.no_grad():
        for start in range(0, n, 256):
            y = torch.from_numpy(classes[start:start + 256])
            z = torch.randn(len(y), generator.latent, generator=gen)
            pixels = generator.pixels(z, y).permute(0, 2, 3, 1).numpy()
            for i, (image, c) in enumerate(zip(pixels, y.tolist()), start=start):
                target = folder / f"synthetic-{names[c]}-{i:05d}.png"
                Image.fromarray((image * 255).round().astype(np.uint8)).save(target)
                written.append(target)
    with (folder / "labels.csv").open("w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["image", "label"])
        for target in written:
            rows.writerow([target.name, int("malignant" in target.name)])
    log.info("%d patches of %s (round %d of run %r) written to %s", len(written), card.model,
             card.round, card.run_id, folder)
    return written


__all__ = ["LABELS", "synthesize"]
