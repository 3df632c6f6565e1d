"""``vilscale convert``: an official ViL checkpoint -> vilscale weights in safetensors."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="official .pth (e.g. model_best.pth from microsoft/vision-longformer)")
    parser.add_argument("output", help="where to write the vilscale weights (.safetensors)")
    parser.add_argument("--model", required=True, help="vilscale variant, e.g. vil_small (see list_models())")
    parser.add_argument("--pos-embed", choices=("ape", "rpe"), default="ape",
                        help="ape for the absolute-position releases, rpe for the relative-position ones")
    parser.add_argument("--window-mode", choices=("chunk", "exact"), default="chunk")
    parser.add_argument("--window", type=int, nargs="+", default=None,
                        help="ViL window, one value or one per stage (default: the variant's)")
    parser.add_argument("--img-size", type=int, default=None, help="target resolution (tables are interpolated)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the new head (0: no head)")
    parser.add_argument("--class-map", default=None,
                        help="JSON file with a list: for each new class, the row of the checkpoint's head to take")
    parser.add_argument("--backbone", action="store_true", help="ViL attention in every stage, no norm/head")


def run(args) -> int:
    from safetensors.torch import save_file

    from vilscale.model.official import load_official

    create_kwargs = dict(pos_embed=args.pos_embed, window_mode=args.window_mode, num_classes=args.num_classes,
                         backbone=args.backbone)
    if args.window is not None:
        create_kwargs["window"] = args.window[0] if len(args.window) == 1 else tuple(args.window)
    if args.img_size is not None:
        create_kwargs["img_size"] = args.img_size
    class_map = None
    if args.class_map:
        with open(args.class_map) as handle:
            class_map = json.load(handle)
    try:
        model = load_official(args.checkpoint, args.model, class_map=class_map, **create_kwargs)
    except (ValueError, FileNotFoundError) as error:
        print(f"vilscale convert: {error}", file=sys.stderr)
        return 2
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    metadata = {"model": args.model, "create_kwargs": json.dumps(create_kwargs)}
    save_file(state, args.output, metadata=metadata)
    params = sum(value.numel() for value in state.values())
    print(f"wrote {args.output}: {args.model}, {params / 1e6:.2f} M parameters, {len(state)} tensors, "
          f"create_model kwargs {create_kwargs}")
    return 0
