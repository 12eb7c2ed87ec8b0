"""DP-SGD overhead: one DP step against one plain step, same model and batch.

    python -m benchmarks dp [--repeats 5] [--bags 8 --instances 2000 --features 1024]
    python -m benchmarks dp --models all     # every registered model: DP path vs plain

For attention-MIL on feature bags and for the seed's patch CNN (slides of k patches), each
per-sample-gradient path Opacus offers (``hooks``, ``functorch``, ``ew``, ghost clipping)
and PathFed's ``torch.func`` path (``vmap``, one sample = one slide) is timed against a
plain optimizer step in one process, their steps interleaved (a noisy machine slows them
alike), best of ``--repeats``. Peak memory is each configuration's resident set size,
measured in a fresh process (CPU: no allocator stats);
with ``--device cuda`` it is the peak of CUDA memory allocated instead (``benchmarks/gpu.sh``).
A path Opacus rejects for a model is reported as such. For the patch CNN, the layer-hook
paths (hooks, functorch, ew, ghost) see one sample per *patch*, not per slide, so they
are timed for comparison only: PathFed trains it with ``vmap`` (one sample = one slide).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from typing import Any

from rich.console import Console
from rich.table import Table

MODES = ("plain", "hooks", "functorch", "ew", "ghost", "vmap", "slide-ew")
"""``vmap``: torch.func over slides; ``slide-ew``: the model's own per-slide gradients
(expanded weights, the patch CNN's path in training; other models have none)."""


def _batch(model_name: str, args: argparse.Namespace) -> tuple[Any, list[Any]]:
    import torch

    from common.models import build_model, model_spec

    torch.manual_seed(0)
    name = {"mil": "gated-attention-mil", "cnn": "residual-patch-cnn",
            "cnn-mixpatch": "residual-patch-cnn"}.get(model_name, model_name)
    kind = model_spec(name).kind
    if kind == "bags":
        model = build_model(name, in_dim=args.features)
        x = torch.randn(args.bags, args.instances, args.features)
        mask = torch.ones(args.bags, args.instances, dtype=torch.bool)
        return model, [x, mask, torch.randint(0, 2, (args.bags,)).float()]
    if kind == "multiscale":  # the same patches, 16 to a low-power region (0.5 -> 2 um/px)
        from common.data.multiscale import Layout

        layout = Layout(args.features, 16)
        model = build_model(name, in_dim=layout.dim, children=layout.children)
        regions = max(1, args.instances // layout.children)
        x = torch.randn(args.bags, regions, layout.width)
        x[..., -layout.children:] = 1.0  # every child present
        mask = torch.ones(args.bags, regions, dtype=torch.bool)
        return model, [x, mask, torch.randint(0, 2, (args.bags,)).float()]
    x = torch.randn(args.slides, args.patches, 3, args.patch_size, args.patch_size)
    if model_spec(name).trains == "adversarial":  # the DP step is the discriminator's
        gan: Any = build_model(name, patch_size=args.patch_size)
        return gan.discriminator, [x, torch.randn_like(x),
                                   torch.randint(0, 2, (args.slides,)).float()]
    if model_spec(name).trains == "segmenter":  # targets: each patch's annotation mask
        masks = torch.rand(args.slides, args.patches, args.patch_size, args.patch_size) > 0.8
        return build_model(name, patch_size=args.patch_size), [x, masks.float()]
    model = build_model(name, patch_size=args.patch_size, dropout=0.0)
    if model_name == "cnn-mixpatch":  # a mixing group's patches with their soft labels
        return model, [x, torch.randint(0, 5, (args.slides, args.patches)).float() / 4]
    return model, [x, torch.randint(0, 2, (args.slides,)).float()]


def _stepper(model_name: str, mode: str, args: argparse.Namespace) -> Any:
    """One training step of ``mode`` on its own copy of the model and batch (a callable),
    or the error Opacus gave for this mode and model (a string)."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from common.training import _mean_loss, _vmap_grad_samples

    device = torch.device(args.device)
    model, batch = _batch(model_name, args)
    model, batch = model.to(device), [t.to(device) for t in batch]
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step_model, criterion = model, None
    if mode != "plain":
        loader = DataLoader(TensorDataset(*batch), batch_size=len(batch[-1]))
        engine = PrivacyEngine(accountant="rdp")
        kwargs: dict[str, Any] = {}
        if mode == "ghost":
            kwargs = {"grad_sample_mode": "ghost", "criterion": torch.nn.BCEWithLogitsLoss()}
        elif mode in ("vmap", "slide-ew"):
            if mode == "slide-ew" and not hasattr(model, "slide_gradients"):
                return "the model has no slide_gradients (it trains with vmap)"
            kwargs = {"grad_sample_mode": "no_op"}
        else:
            kwargs = {"grad_sample_mode": mode}
        try:
            out = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                      noise_multiplier=1.0, max_grad_norm=1.0,
                                      poisson_sampling=False, **kwargs)
        except Exception as err:  # Opacus refuses some mode/model pairs
            return f"{type(err).__name__}: {str(err)[:60]}"
        step_model, opt = out[0], out[1]
        if mode == "ghost":
            criterion = out[2]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if mode in ("vmap", "slide-ew"):
            _vmap_grad_samples(model, batch, model_gradients=mode == "slide-ew")
        elif mode == "ghost":
            *inputs, y = batch
            out = step_model(*inputs)
            logits = out.logits if hasattr(out, "logits") else out.mean(1)[:, 1]
            criterion(logits, y).backward()  # type: ignore[misc]
        else:  # Opacus' hooks sit on the model's own layers
            _mean_loss(model, batch).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        step()  # warm-up
    except Exception as err:
        return f"{type(err).__name__}: {str(err)[:60]}"
    return step


def _times(model_name: str, modes: tuple[str, ...], args: argparse.Namespace
           ) -> dict[str, dict[str, Any]]:
    """Best step time of each mode, the modes' steps interleaved in this one process (a
    noisy machine slows them alike), best of ``args.repeats`` rounds."""
    import torch

    torch.set_num_threads(args.threads)
    steps = {mode: _stepper(model_name, mode, args) for mode in modes}
    best = {mode: float("inf") for mode in modes}
    errors = {mode: s for mode, s in steps.items() if isinstance(s, str)}
    for _ in range(args.repeats):
        for mode, step in steps.items():
            if mode in errors:
                continue
            start = time.perf_counter()
            try:
                step()
            except Exception as err:
                errors[mode] = f"{type(err).__name__}: {str(err)[:60]}"
                continue
            best[mode] = min(best[mode], time.perf_counter() - start)
    return {mode: {"error": errors[mode]} if mode in errors else {"time": best[mode]}
            for mode in modes}


def _memory(model_name: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one mode's steps, in this (fresh) process."""
    import torch

    torch.set_num_threads(args.threads)
    step = _stepper(model_name, mode, args)
    if isinstance(step, str):
        return {"error": step}
    step()
    if args.device.startswith("cuda"):
        return {"rss_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _measure(model_name: str, modes: tuple[str, ...], args: argparse.Namespace
             ) -> dict[str, dict[str, Any]]:
    """Times interleaved in one process; each mode's peak memory in a fresh process."""
    times = _run(_times, model_name, modes, args)
    for mode in modes:
        if "error" not in times[mode]:
            memory = _run(_memory, model_name, mode, args)
            times[mode].update(memory if "error" not in memory else {"rss_mb": float("nan")})
    return times


def _worker(queue: Any, fn: Any, *args: Any) -> None:
    queue.put(fn(*args))


def _run(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a fresh (spawned) process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(queue, fn, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks dp")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bags", type=int, default=8, help="MIL batch (bags)")
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--slides", type=int, default=8, help="patch-CNN batch (slides)")
    parser.add_argument("--patches", type=int, default=8, help="patches per slide")
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=["mil", "cnn"],
                        help="mil, cnn, cnn-mixpatch (MixPatch's soft labels), a registered "
                        "model's name, or all")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    args = parser.parse_args(argv)
    console = Console()
    if args.models == ["all"]:
        return _every_model(args, console)
    for model_name in args.models:
        results = _measure(model_name, MODES, args)
        base = results["plain"]
        table = Table(title=f"DP-SGD step vs plain step: {model_name} on {args.device} "
                            f"(best of {args.repeats})")
        memory = "peak CUDA MB" if args.device.startswith("cuda") else "peak RSS MB"
        for col in ("mode", "s/step", "time / plain", memory, "memory / plain"):
            table.add_column(col, justify="right")
        for mode, r in results.items():
            if "error" in r:
                table.add_row(mode, "-", r["error"], "-", "-")
                continue
            table.add_row(mode, f"{r['time']:.4f}", f"{r['time'] / base['time']:.2f}x",
                          f"{r['rss_mb']:.0f}", f"{r['rss_mb'] / base['rss_mb']:.2f}x")
        console.print(table)
    return 0


TARGET = 1.3
"""A DP step of a MIL model may cost at most this many plain steps (issue #14)."""


def _every_model(args: argparse.Namespace, console: Console) -> int:
    """Every registered model: PathFed's DP path (``vmap``, one sample = one slide)
    against a plain step, timed interleaved in one process; peak memory each in a fresh
    process."""
    from common.models import MODELS

    table = Table(title=f"DP-SGD step (PathFed's per-slide gradients: torch.func, or the "
                        f"patch CNN's expanded weights; clipping, noise) vs "
                        f"plain step, every model on {args.device} (best of {args.repeats}; "
                        f"bags {args.bags} x {args.instances} x {args.features}, patch "
                        f"slides {args.slides} x {args.patches} x {args.patch_size} px)")
    for col in ("model", "kind", "plain s/step", "DP s/step", "DP / plain", "plain MB",
                "DP MB", "memory DP / plain", f"within {TARGET}x"):
        table.add_column(col, justify="right", no_wrap=col == "model")
    for name, spec in sorted(MODELS.items()):
        path = "slide-ew" if hasattr(_batch(name, args)[0], "slide_gradients") else "vmap"
        both = _measure(name, ("plain", path), args)
        plain, dp = both["plain"], both[path]
        if "error" in plain or "error" in dp:
            table.add_row(name, spec.kind, "-", "-", plain.get("error") or dp.get("error"),
                          "-", "-", "-", "-")
            continue
        ratio = dp["time"] / plain["time"]
        table.add_row(name, spec.kind, f"{plain['time']:.4f}", f"{dp['time']:.4f}",
                      f"{ratio:.2f}x", f"{plain['rss_mb']:.0f}", f"{dp['rss_mb']:.0f}",
                      f"{dp['rss_mb'] / plain['rss_mb']:.2f}x",
                      "yes" if ratio <= TARGET else "no")
    console.print(table)
    return 0

