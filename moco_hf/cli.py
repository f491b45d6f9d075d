"""`moco-hf` console command: pretrain, evaluate, export encoders and convert official MoCo checkpoints.

moco-hf train --backbone resnet18 --image_size 32 ...   # pretrain: every flag of training/pretrain.py
moco-hf evaluate knn --model_name_or_path MODEL         # weighted kNN of a frozen encoder (linear: a linear probe)
moco-hf export MODEL OUTPUT_DIR [--repo_id USER/NAME]   # query backbone (a classifier: with its head) in timm's format
moco-hf export MODEL r50.pth --format torchvision       # ... as a torchvision ResNet state dict
moco-hf export MODEL r50.pkl --format detectron2        # ... as detectron2 ResNet weights
moco-hf convert official.pth.tar OUTPUT_DIR            # facebookresearch/moco -> MocoModel (save_pretrained)
moco-hf convert MODEL out.pth.tar --to official        # MocoModel -> facebookresearch/moco layout
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .command_line import as_flags
from .errors import UsageError


def export(args: argparse.Namespace) -> None:
    from .export import export_detectron2, export_encoder, export_torchvision
    from .model_card import TrainingSummary, render_model_card
    from .model_sources import MOCO, identify_model
    from .modeling_moco import MocoForImageClassification, MocoModel

    source = identify_model(args.model, accept=(MOCO,))  # one line for a folder that is not a MocoModel
    is_classifier = MocoForImageClassification.__name__ in (source.config.get("architectures") or [])
    model = (MocoForImageClassification if is_classifier else MocoModel).from_pretrained(args.model)
    if args.format != "timm" and args.repo_id:
        raise UsageError("--repo_id pushes the timm format only (a Hub repo of the encoder with its model card).")
    writer = {"timm": export_encoder, "torchvision": export_torchvision, "detectron2": export_detectron2}[args.format]
    try:
        output = writer(model, args.output)
    except ValueError as error:  # an encoder the format cannot express (CIFAR stem, not a ResNet...)
        raise UsageError(str(error)) from error
    if args.format != "timm":
        print(f"Encoder written to {output} ({args.format} format)")
        return
    repo_id = args.repo_id or f"<your-username>/{output.resolve().name}"  # the snippets name a repo to push to
    summary = TrainingSummary.load(args.model)  # the run's data, results and settings, when the trainer saved them
    render_model_card(model.config, repo_id, kind="classifier" if is_classifier else "encoder", summary=summary,
                      labels=model.label_names if is_classifier else None).save(output / "README.md")  # fmt: skip
    if args.repo_id:
        from huggingface_hub import create_repo, upload_folder

        create_repo(args.repo_id, exist_ok=True, private=args.private, token=args.token)
        upload_folder(repo_id=args.repo_id, folder_path=output, token=args.token, commit_message="MoCo encoder")
    print(f"Encoder written to {output}" + (f" and pushed to {args.repo_id}" if args.repo_id else ""))


def convert(args: argparse.Namespace) -> None:
    from .convert import load_torch_checkpoint, moco_to_official, official_to_moco
    from .modeling_moco import MocoModel

    if args.to == "official":
        import torch

        model = MocoModel.from_pretrained(args.source)
        torch.save(moco_to_official(model), args.output)
    else:
        model = official_to_moco(load_torch_checkpoint(args.source), args.backbone, args.image_size)
        model.save_pretrained(args.output)
        print(f"{model.config.backbone}, image size {model.config.image_size} (from "
              f"{'--image_size' if args.image_size else 'the checkpoint, else the official 224'}).")  # fmt: skip
        if model.config.num_channels != 3:
            print(f"{model.config.num_channels} input bands (the checkpoint's first layer); their mean and std are "
                  "not recorded in it: set image_mean and image_std in config.json.")  # fmt: skip
    print(f"Converted {args.source} -> {args.output} ({args.to} layout)")


def evaluate(argv: list[str]) -> int:
    """`moco-hf evaluate knn|linear FLAGS`: the protocol's own parser takes the flags."""
    protocols = ("knn", "linear")
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        usage = ("usage: moco-hf evaluate {knn,linear} [--help] FLAGS\n\n"
                 "  knn     weighted kNN top-1 of a frozen encoder's features\n"
                 "  linear  a linear classifier on them (top-1, top-5)")  # fmt: skip
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in protocols:
        print(f"error: moco-hf evaluate takes knn or linear, got {argv[0]!r} (see moco-hf evaluate --help).",
              file=sys.stderr)  # fmt: skip
        return 2
    from . import register_auto_classes
    from .evaluation_command import main as evaluation_main

    register_auto_classes()
    return evaluation_main(argv[1:], argv[0], program=f"moco-hf evaluate {argv[0]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moco-hf", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    # Listed here for --help; `main` hands its arguments to the pretraining command's own parser.
    commands.add_parser("train", add_help=False, help="Pretrain a MoCo model (moco-hf train --help for the flags).")
    commands.add_parser("evaluate", add_help=False, help="Evaluate a frozen encoder: knn or linear (moco-hf "
                        "evaluate knn --help for the flags).")  # fmt: skip

    export_parser = commands.add_parser("export", help="Export the query backbone (timm, torchvision, detectron2).")
    export_parser.add_argument("model", help="A MocoModel folder or Hub repo id.")
    export_parser.add_argument("output", type=Path, help="A folder (timm format) or a file (torchvision, detectron2).")
    export_parser.add_argument("--format", choices=("timm", "torchvision", "detectron2"), default="timm",
                               help="timm: a Hub-format folder with a model card; torchvision: a ResNet state dict "
                                    "(.pth); detectron2: ResNet weights for MODEL.WEIGHTS (.pkl).")  # fmt: skip
    export_parser.add_argument("--repo_id", help="Also push the encoder to this Hub repo.")
    export_parser.add_argument("--token", help="Hub token (default: the logged-in one).")
    export_parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    export_parser.set_defaults(run=export)

    convert_parser = commands.add_parser("convert", help="Convert between official MoCo checkpoints and MocoModel.")
    convert_parser.add_argument("source", help="Official checkpoint (.pth.tar), or a MocoModel with --to official.")
    convert_parser.add_argument("output", type=Path, help="MocoModel folder, or .pth.tar with --to official.")
    convert_parser.add_argument("--to", choices=("moco_hf", "official"), default="moco_hf")
    convert_parser.add_argument("--backbone", help="timm name of the official torchvision arch (default: the "
                                "checkpoint's `arch`, else resnet50).")  # fmt: skip
    convert_parser.add_argument("--image_size", type=int, help="Input size (default: the checkpoint's, else 224).")
    convert_parser.set_defaults(run=convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .pretraining import main as pretrain

        return pretrain(argv[1:], program="moco-hf train")
    if argv[:1] == ["evaluate"]:
        return evaluate(argv[1:])
    args = build_parser().parse_args(argv)
    from . import register_auto_classes
    from .convert import CheckpointError

    register_auto_classes()
    try:
        args.run(args)
    except (CheckpointError, UsageError, OSError) as error:
        print(f"error: {as_flags(str(error), vars(args))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
