"""`personalize train`: flags -> TrainConfig (through personalize.config.build) -> the recipe.

Every flag is a config key; defaults live in TrainConfig and the presets, so a flag that is not
given never overrides a preset or a --config file (all flags default to None here).
"""

from __future__ import annotations

import argparse
from typing import Any

# flag dest -> config key (dotted for nested keys); dests not listed map to themselves
FLAG_KEYS = {
    "images": "data.images",
    "token": "data.token",
    "class_word": "data.class_word",
    "instance_prompt": "data.instance_prompt",
    "resolution": "data.resolution",
    "class_images": "data.num_class_images",
    "class_dir": "data.class_dir",
    "validation_prompt": "validation_prompts",
    "conditioning": "conditioning.folder",
    "annotator": "conditioning.annotator",
    "reference": "conditioning.reference",
    "image_encoder": "conditioning.image_encoder",
    "control": "edit.sources",
    "captions": "edit.instructions",
}
NOT_CONFIG = {"command", "run", "preset", "config", "set", "task", "val_split"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="personalize a diffusion model on a folder of images (DreamBooth, LoRA, LyCORIS, KronA), "
        "or instruction-tune an LLM/VLM on a JSONL file (--data)",
        description="Train an adapter (or the whole UNet) on a few photos of a subject. Flags override the "
        "--preset and --config file; --set key=value overrides any config key (see configs/).",
    )
    add = parser.add_argument
    add("--images", metavar="DIR", help="folder of training images (or a dataset .yaml)")
    add("--model", help="base model: hub id, diffusers folder, .safetensors file, or tiny-sd15 (offline)")
    add("--token", help="trigger token (default: from the folder name, else 'sks')")
    add("--class-word", help="what the subject is, e.g. cat (default: the folder name)")
    add(
        "--instance-prompt",
        metavar="P",
        help="the training prompt, e.g. 'a sks toy' (default: 'a photo of <token> <class>'; captions win)",
    )
    add(
        "--method",
        help="lora, locon, dora, loha, lokr, krona, ia3, oft, boft, vera, difffit, bitfit, norm, full, "
        "textual-inversion, pivotal, ed-lora, controlnet, controlnext, t2i-adapter or ip-adapter",
    )
    add(
        "--conditioning",
        metavar="DIR",
        help="controlnet/controlnext/t2i-adapter: conditioning images named like the images",
    )
    add("--annotator", help="controlnet/controlnext/t2i-adapter without --conditioning: canny (default) or tile")
    add("--reference", metavar="DIR", help="ip-adapter: reference images named like the images (default: themselves)")
    add("--image-encoder", help="ip-adapter: CLIPVisionModelWithProjection hub id or folder")
    add("--targets", help="layers to adapt: attention, attention+ff, conv, all, or a regex")
    add("--rank", type=int, help="adapter rank (default: the method's)")
    add("--alpha", type=float, help="adapter alpha (default: the rank)")
    add("--prior-preservation", action="store_const", const=True, help="train on class images too (DreamBooth)")
    add("--class-images", type=int, metavar="N", help="how many class images (generated when missing)")
    add("--class-dir", metavar="DIR", help="folder of class images (default: OUTPUT/class_images)")
    add("--train-text-encoder", action="store_const", const=True, help="also adapt the text encoder(s)")
    add("--steps", type=int, help="optimizer steps (default: the method's)")
    add("--lr", type=float, help="learning rate (default: the method's)")
    add("--batch-size", type=int)
    add("--grad-accum", type=int, help="micro-batches per optimizer step")
    add("--resolution", type=int, metavar="PX", help="training resolution (default 512)")
    add("--mixed-precision", help="no, fp16 or bf16")
    add("--gradient-checkpointing", action="store_const", const=True, help="less memory, slower steps")
    add("--optimizer", help="adamw, adamw8bit (bitsandbytes) or prodigy (prodigyopt)")
    add("--quantize", help="nf4, fp4 or int8: train on a quantized frozen UNet (QLoRA)")
    add("--snr-gamma", type=float, help="Min-SNR weighting gamma (e.g. 5)")
    add("--noise-offset", type=float, help="offset noise strength (e.g. 0.05)")
    add("--ema", action="store_const", const=True, help="save an EMA of the trained weights")
    add("--validation-prompt", action="append", metavar="P", help="sample this prompt (repeatable)")
    add("--validate-every", type=int, metavar="N", help="sample every N steps (default: only at the end)")
    add(
        "--eval",
        nargs="?",
        const="dreambench",
        metavar="PROMPTS",
        help="after training, score the run (personalize eval): dreambench (default) or a prompt file",
    )
    add("--report-to", help="log the run to tensorboard or wandb (default none); every run writes loss.png")
    add("--checkpoint-every", type=int, metavar="N", help="checkpoint every N steps (default 250)")
    add("--resume", action="store_const", const=True, help="continue from the newest checkpoint in --output")
    add("--overwrite", action="store_const", const=True, help="replace a finished or interrupted run in --output")
    add("--attention", help="sdpa (default) or xformers")
    # flow-matching models (SD3, Flux: trainers/diffusion/flow_matching.py)
    add("--weighting-scheme", help="SD3/Flux: logit_normal, mode, cosmap, sigma_sqrt or none (default: the family's)")
    add("--guidance-scale", type=float, help="Flux.1-dev: the distilled guidance input while training (default 3.5)")
    add("--vram", metavar="SIZE", help="SD3/Flux: fit this GPU memory, e.g. 16GB (see `personalize plan`)")
    add("--seed", type=int)
    add("--output", metavar="DIR", help="output folder (default: ./personalize-out/<images folder name>)")
    # language models (routed to trainers/llm/sft.py when --data is a JSONL file or the model is an LLM/VLM)
    add("--data", metavar="FILE", help="LLM/VLM: JSONL conversations (messages, or prompt + completion)")
    add("--max-length", type=int, metavar="N", help="LLM/VLM: tokens per conversation (default 1024)")
    add("--packing", action="store_const", const=True, help="LLM: pack conversations into max-length rows")
    add("--num-virtual-tokens", type=int, metavar="N", help="prompt-tuning / prefix-tuning: virtual tokens")
    add("--train-projector", action="store_const", const=True, help="VLM: also adapt the projector")
    add("--train-vision-tower", action="store_const", const=True, help="VLM: also adapt the vision tower")
    add("--init-word", help="textual-inversion/pivotal: the word the new token starts from (e.g. cat)")
    add("--vectors", type=int, metavar="N", help="textual-inversion/pivotal: vectors of the new token (default 1)")
    add("--embedding-lr", type=float, help="pivotal: learning rate of the token (default 5e-4)")
    add("--stop-embedding-after", type=float, metavar="F", help="freeze the token after this fraction of the steps")
    add("--learnable-property", help="textual-inversion: object (default) or style prompt templates")
    add("--pivotal-method", help="pivotal: the adapter trained with the token (default lora)")
    # few-shot image classification (routed to trainers/vision/classify.py)
    add(
        "--task",
        help="classify: few-shot image classification on CLIP/ViT (--images holds one folder per class); "
        "edit: train an edit model (Flux Kontext, ...) on --images targets and --control sources",
    )
    add("--control", metavar="DIR", help="--task edit: source images, each named like its target in --images")
    add("--captions", metavar="FILE", help="--task edit: 'name: instruction' lines (default: the targets' captions)")
    add("--val-split", type=float, metavar="F", help="classify: share of each class held out for the accuracy")
    add("--preset", help="a YAML preset from configs/ (e.g. sd15-lora, tiny)")
    add("--config", metavar="FILE", help="a YAML config file (e.g. a previous run's config.yaml)")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    parser.set_defaults(run=run)


def flags_to_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user gave, as a nested config mapping."""
    flags: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest in NOT_CONFIG or value is None:
            continue
        target = flags
        *parents, leaf = FLAG_KEYS.get(dest, dest).split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return flags


def run(args: argparse.Namespace) -> int:
    from personalize.config import build
    from personalize.errors import UserError
    from personalize.trainers.llm.cli import is_language_run, run_language

    if args.task == "edit" and not args.control:
        raise UserError("--task edit needs --control DIR: the source images, each named like its target image")
    if (args.control or args.captions) and args.task != "edit":
        raise UserError("--control and --captions are for --task edit (source images and edit instructions)")
    if args.task not in (None, "edit"):
        if args.task != "classify":
            raise UserError(
                f"--task must be 'classify' or 'edit' (got '{args.task}'); leave it out to personalize a model"
            )
        from personalize.trainers.vision.cli import run_classify

        return run_classify(args)
    if args.val_split is not None:
        raise UserError("--val-split is for --task classify")
    if is_language_run(args):
        return run_language(args, flags_to_config(args))
    from personalize.models.training_defaults import under_model_defaults
    from personalize.trainers import train
    from personalize.trainers.diffusion.config import DEFAULT_MODEL, TrainConfig

    flags = flags_to_config(args)
    config = build(
        TrainConfig,
        preset=args.preset,
        file=args.config,
        flags=flags,
        overrides=args.set,
        base=lambda layers: under_model_defaults(layers, DEFAULT_MODEL),  # a base folder's training_defaults.json
    )
    train(config)
    return 0
