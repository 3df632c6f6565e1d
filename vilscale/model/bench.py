"""``vilscale bench flops``: parameters and multiply-adds of the ViL variants.

Counted on the ``meta`` device (no memory, no compute) with ``vilscale.model.count_flops``; the
reference column is what the official repository reports for the same setting (README of
microsoft/vision-longformer), where it reports one. With ``--shift-mode random`` (or ``own``) a
``train`` column counts the forward as it runs in training, where a local query sees its own chunk
and one neighbour (or its own chunk only).
"""

from __future__ import annotations

import argparse
import sys

# Official figures (microsoft/vision-longformer README): (params M, GMACs) per (variant, img_size).
OFFICIAL = {
    ("vil_tiny", 224): (6.7, 1.43), ("vil_small", 224): (24.6, 5.12), ("vil_medium_deep", 224): (39.7, 9.1),
    ("vil_medium_wide", 224): (39.8, 11.3), ("vil_medium_deep", 384): (39.7, 29.4),
    ("vil_medium_wide", 384): (39.8, 35.1), ("vil_base_deep", 384): (55.7, 45.3), ("vil_base_wide", 384): (79.0, 55.8),
}


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("flops",), help="flops: parameters and GMACs per variant")
    parser.add_argument("--model", action="append", default=None, help="variant (repeatable; default: all)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: each variant's own)")
    parser.add_argument("--window", type=int, default=None, help="ViL window (default: each variant's own)")
    parser.add_argument("--window-mode", choices=("chunk", "exact"), default="chunk")
    parser.add_argument("--shift-mode", choices=("full", "random", "own"), default="full",
                        help="ViL attention shift mode; other than full, also prints the training-time GMACs")


def run(args) -> int:
    import torch

    from vilscale.errors import EXIT_SPEC_ERROR
    from vilscale.model import count_flops, create_model, list_models

    names = args.model or list_models()
    unknown = [name for name in names if name not in list_models()]
    if unknown:
        print(f"vilscale bench: unknown model(s) {unknown}; valid: {', '.join(list_models())}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    training = args.shift_mode != "full"
    print(f"{'model':18s} {'img':>5s} {'params (M)':>11s} {'GMACs':>8s}" + (f" {'train':>8s}" if training else "")
          + "   official (M / GMACs)")
    for name in names:
        kwargs = dict(window_mode=args.window_mode, shift_mode=args.shift_mode)
        if args.img_size:
            kwargs["img_size"] = args.img_size
        if args.window:
            kwargs["window"] = args.window
        try:
            with torch.device("meta"):
                model = create_model(name, **kwargs)
        except ValueError as error:
            print(f"{name:18s} skipped: {error}")
            continue
        img = model.config.img_size[0]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gmacs = count_flops(model) / 1e9
        reference = OFFICIAL.get((name, img))
        ref_text = f"{reference[0]:.1f} / {reference[1]:.2f}" if reference else "-"
        train_text = f" {count_flops(model, training=True) / 1e9:8.3f}" if training else ""
        print(f"{name:18s} {img:5d} {params:11.2f} {gmacs:8.3f}{train_text}   {ref_text}")
    return 0
