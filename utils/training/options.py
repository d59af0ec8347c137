"""train.py's model options, made from the registry (model/registry.py): ``--model``, each
architecture argument once as ``--<name>``, the checkpoint's record of the chosen ones, and the
checks that the chosen model takes them."""
from __future__ import annotations

import argparse

import config
from model.registry import ARCHITECTURES, Argument, architecture
from utils.errors import UserError


class TrainingError(UserError):
    """The run cannot start as configured; the message says what to change."""


def flag(argument: Argument) -> str:
    return "--" + argument.name.replace("_", "-")


def offered_arguments() -> dict[str, tuple[Argument, list[str]]]:
    """Every architecture argument by name, with the models that take it.  Models share an
    argument by listing the same one: a name means one thing for every model."""
    offered: dict[str, tuple[Argument, list[str]]] = {}
    for arch, entry in ARCHITECTURES.items():
        for argument in entry.arguments:
            known, models = offered.setdefault(argument.name, (argument, []))
            if known != argument:
                raise TypeError(f"two registry arguments are named {argument.name!r}: {known} and {argument}")
            models.append(arch)
    return offered


def encoder_models() -> list[str]:
    """The models whose encoder pretrained weights fill."""
    return [arch for arch, entry in ARCHITECTURES.items() if entry.pretrained_encoder]


def option_default(argument: Argument):
    """The registry's default, unless the environment's SEG_<NAME> overrides it (config.py)."""
    return config.from_env(argument.name, argument.default)


def add_architecture_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default=config.get("model"), metavar="MODEL",
                        help=f"{', '.join(ARCHITECTURES)} (default: {config.get('model')}; env SEG_MODEL)")
    group = parser.add_argument_group("model options", "each is taken by the models named in its help")
    for argument, models in offered_arguments().values():
        default = option_default(argument)
        shown_default = "" if default is None or isinstance(default, bool) else f"; default: {default}"
        help_text = f"{argument.help} ({', '.join(models)}{shown_default})"
        if isinstance(default, bool):
            group.add_argument(flag(argument), action="store_true", help=help_text)
            continue
        group.add_argument(flag(argument), type=str if default is None else type(default), default=default,
                           choices=argument.choices, metavar=argument.metavar, help=help_text)


def arch_args(args: argparse.Namespace, num_classes: int) -> dict:
    """The constructor arguments of ``args.model`` (what the checkpoint records to rebuild it)."""
    arguments = {"num_classes": num_classes}
    for argument in architecture(args.model).arguments:
        arguments.update(argument.constructor_arguments(getattr(args, argument.name)))
    return arguments


def check_architecture_options(args: argparse.Namespace) -> None:
    """Refuse what the chosen model cannot do, and any option of another model: set but ignored,
    it would leave the user believing it had been used."""
    try:
        entry = architecture(args.model)
    except ValueError as error:
        raise TrainingError(str(error)) from error
    if entry.batchnorm_after_pooling and args.batch_size < 2:
        raise TrainingError(f"{args.model} has BatchNorm after global pooling, which cannot train on "
                            "one image per batch: use --batch-size 2 or more")
    if (args.encoder_weights or args.freeze_encoder_epochs) and not entry.pretrained_encoder:
        raise TrainingError(f"--encoder-weights and --freeze-encoder-epochs need an encoder model "
                            f"(--model {', '.join(encoder_models())})")
    for argument, models in offered_arguments().values():
        if args.model not in models and getattr(args, argument.name) != option_default(argument):
            raise TrainingError(f"{flag(argument)} is one of the options of --model {', '.join(models)} only "
                                f"(not of {args.model})")
