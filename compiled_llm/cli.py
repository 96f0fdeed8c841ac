"""`compiled-llm` command line: one entry point with subcommands.

    compiled-llm build MODEL_DIR [--max-batch-size 8 ...]   compile a local HF model, print the report

Every `CompileConfig` field is a flag (`--max-seq-len 2048`, `--passes graph_cleanup,insert_paged_attention`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from compiled_llm.config import CompileConfig


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compile config (CompileConfig fields)")
    for name, field in CompileConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = f"{(field.description or '').split('.')[0]} (default: {default})"
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=help_text)


def _config_from_args(args: argparse.Namespace) -> CompileConfig:
    fields = {name: getattr(args, name) for name in CompileConfig.model_fields if getattr(args, name) is not None}
    if "passes" in fields:
        fields["passes"] = tuple(p.strip() for p in fields["passes"].split(",") if p.strip())
    return CompileConfig(**fields)


def _load_model(model: str):
    path = Path(model)
    if not (path.is_dir() and (path / "config.json").exists()):
        raise ValueError(f"MODEL must be a local Hugging Face model directory with a config.json, got {model!r}")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def build(args: argparse.Namespace) -> int:
    from compiled_llm.compiled_model import compile_model

    config = _config_from_args(args)
    cm = compile_model(_load_model(args.model), config)
    print(cm.report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compiled-llm", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="compile a model and print the compile report")
    build_parser.add_argument("model", help="local Hugging Face model directory")
    _add_config_flags(build_parser)
    build_parser.set_defaults(run=build)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ValueError as error:  # bad input: one clear line, no traceback
        print(f"compiled-llm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
