"""``pathfed finetune``: a released model adapted to one hospital under its own DP budget."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``finetune``."""
    p = sub.add_parser(
        "finetune", help="adapt a released model to a new hospital's data (with DP)",
        description="Fine-tune the model a run released (RUN_DIR or its model.npz) on one "
        "hospital's data, with DP-SGD at the hospital's own budget (--epsilon), and report "
        "its AUC on the hospital's held-out split before and after. The features must be "
        "made as the model's were. Writes a run folder (ledger, checkpoints, model.npz) that "
        "`pathfed predict` applies and `pathfed audit` verifies. A sealed model takes its "
        "key from PATHFED_CHECKPOINT_KEY_FILE.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="the hospital's prepared features or labelled images")
    p.add_argument("--out", required=True, metavar="RUN")
    p.add_argument("--epsilon", type=float, help="the hospital's DP budget (default 8)")
    p.add_argument("--rounds", type=int, help="local rounds (default 5)")
    p.add_argument("--freeze", metavar="PREFIX[,PREFIX]",
                   help="parameters kept fixed, by name prefix (e.g. embed,attention_v: "
                   "only the remaining layers adapt); an unknown prefix lists the model's "
                   "parameter groups")
    p.add_argument("--no-dp", action="store_true", help="train without DP (not for release)")
    p.add_argument("--config", metavar="FILE", help="training settings (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting, e.g. lr=0.01 (repeatable)")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from cli._shared import settings

    cfg = settings(args.config, args.set, {
        "data": args.data, "epsilon": args.epsilon, "rounds": args.rounds or 5,
        "dp": False if args.no_dp else None, "freeze": args.freeze})
    from common.finetune import finetune

    result = finetune(args.model, cfg, args.out)
    b, a = result.before, result.after
    dp = f"epsilon {result.epsilon:.3f} of {cfg.epsilon:g}" if cfg.dp else "no DP"
    print(f"held-out AUC {b['auc']:.3f} -> {a['auc']:.3f}, balanced accuracy "
          f"{b['balanced_accuracy']:.3f} -> {a['balanced_accuracy']:.3f} ({dp}); "
          f"run {result.run} (model.npz)")
    return 0
