"""``vilscale convert``: an official ViL checkpoint -> vilscale weights in safetensors."""

from __future__ import annotations

import argparse
import json
import pickle
import sys

from vilscale.model.adapt import HEAD_POLICIES


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
    parser.add_argument("--head", choices=HEAD_POLICIES, default="replace",
                        help="a checkpoint head of another class count than --num-classes: replace it by a fresh "
                             "one (default, as model.init_weights does) or truncate it to its first rows")
    parser.add_argument("--backbone", action="store_true", help="ViL attention in every stage, no norm/head")


def run(args) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from vilscale.errors import EXIT_SPEC_ERROR
    from vilscale.model import adapt_state_dict, create_model, read_official
    from vilscale.model.official import translate_official

    create_kwargs = dict(pos_embed=args.pos_embed, window_mode=args.window_mode, num_classes=args.num_classes,
                         backbone=args.backbone)
    if args.window is not None:
        create_kwargs["window"] = args.window[0] if len(args.window) == 1 else tuple(args.window)
    if args.img_size is not None:
        create_kwargs["img_size"] = args.img_size
    try:
        class_map = None
        if args.class_map:
            with open(args.class_map) as handle:
                class_map = json.load(handle)
        model = create_model(args.model, **create_kwargs)
        try:
            official = read_official(args.checkpoint)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:  # what torch.load says of other files
            raise ValueError(f"{args.checkpoint} is not a PyTorch checkpoint ({str(error).splitlines()[0][:200]})") \
                from None
        # the steps of `load_official`, so that what happened to the head can be said
        translated = translate_official(official, num_stages=len(model.config.stages))
        state, report = adapt_state_dict(translated, model, head=args.head, class_map=class_map)
        model.load_state_dict(state)
        state = {key: value.contiguous() for key, value in model.state_dict().items()}
        save_file(state, args.output, metadata={"model": args.model, "create_kwargs": json.dumps(create_kwargs)})
    except (ValueError, OSError, SafetensorError) as error:  # json's and the model's ValueErrors included
        print(f"vilscale convert: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    params = sum(value.numel() for value in state.values())
    print(f"wrote {args.output}: {args.model}, {params / 1e6:.2f} M parameters, {len(state)} tensors, "
          f"create_model kwargs {create_kwargs}")
    print(_head_line(report.head, translated.get("head.weight")))
    return 0


def _head_line(head: str, checkpoint_head) -> str:
    """What happened to the checkpoint's classifier (``head``: the adapter's words), and how to get the others."""
    if not head.startswith(("replaced", "truncated")):
        return f"head: {head}"
    others = [f"--num-classes {checkpoint_head.shape[0]} keeps the checkpoint's head",
              "--class-map FILE picks its rows for your classes"]
    if head.startswith("replaced"):
        others.append("--head truncate keeps its first rows")
    return f"head: {head}; {', '.join(others)}"
