"""``pathfed checkpoint decrypt|export``: a released global model, out of its sealed file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cli._shared import check_out
from common.errors import DataError


def add_parser(sub: Any) -> None:
    """Register ``checkpoint``."""
    ckpt = sub.add_parser("checkpoint", help="decrypt a released global model")
    ksub = ckpt.add_subparsers(dest="action", required=True, metavar="ACTION")
    dec = ksub.add_parser("decrypt", help="decrypt an encrypted checkpoint to .npz")
    dec.add_argument("file", metavar="FILE")
    dec.add_argument("--key-file", required=True, metavar="KEY")
    dec.add_argument("--out", required=True, metavar="OUT.npz")
    dec.set_defaults(func=_cmd_decrypt)
    exp = ksub.add_parser("export", help="a checkpoint as a PyTorch state dict (.pt), e.g. "
                          "a federated patch CNN for `pathfed prepare --encoder patch-cnn`")
    exp.add_argument("file", metavar="FILE")
    exp.add_argument("--key-file", metavar="KEY", help="for encrypted checkpoints")
    exp.add_argument("--out", required=True, metavar="OUT.pt")
    exp.set_defaults(func=_cmd_export)


def _cmd_decrypt(args: argparse.Namespace) -> int:
    import numpy as np

    from common.crypto.sealed import MAGIC, SUFFIX, load_key, sealed_run
    from common.runs import load_checkpoint

    path = Path(args.file)
    key = load_key(args.key_file)
    try:
        head = path.read_bytes()[: len(MAGIC) + 260]
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; give a checkpoint file") from None
    if not path.name.endswith(SUFFIX) or not head.startswith(MAGIC):
        raise DataError(f"{path}: not an encrypted checkpoint (nothing to decrypt); "
                        "load it as it is, without --key-file")
    arrays = load_checkpoint(path, key)
    check_out(args.out)
    np.savez(args.out, **arrays)
    print(f"decrypted {len(arrays)} arrays of run {sealed_run(head, str(path))!r} to {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from common.crypto.sealed import load_key
    from common.runs import load_checkpoint

    arrays = load_checkpoint(args.file, load_key(args.key_file) if args.key_file else None)
    check_out(args.out)
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, args.out)
    print(f"wrote {len(arrays)} tensors to {args.out}")
    return 0
