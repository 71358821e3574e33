"""`rewardtune` command line: every stage is a subcommand; user errors are one line, no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rewardtune.errors import RewardtuneError


def _cmd_init_tiny(args: argparse.Namespace) -> None:
    from rewardtune.tiny import init_tiny

    out = Path(args.out)
    if out.exists() and args.exist_ok:
        print(f"tiny model already at {out}")
        return
    if out.exists():
        raise RewardtuneError(f"--out {out} already exists; remove it, choose another path, or pass --exist-ok")
    init_tiny(out, preset=args.preset, seed=args.seed)
    print(f"wrote {args.preset} pipeline to {out}")


def _cmd_validate(args: argparse.Namespace) -> None:
    from rewardtune.config import load_config

    cfg = load_config(args.config, args.set)
    print(cfg.to_yaml() if args.print else f"{args.config}: ok ({cfg.algorithm.name}, reward {cfg.reward.name})")


def _cmd_train(args: argparse.Namespace) -> None:
    from rewardtune.config import load_config
    from rewardtune.trainer import Trainer

    cfg = load_config(args.config, args.set)
    out = Trainer(cfg, args.out).run(resume=args.resume)
    print(f"metrics: {out / 'metrics.jsonl'}")
    print(f"checkpoints: {out / 'checkpoints'}")


def _cmd_prepare_prompts(args: argparse.Namespace) -> None:
    from rewardtune.config import load_config
    from rewardtune.stages import HELDOUT_FILE, TRAIN_FILE, prepare_prompts_from_config

    summary = prepare_prompts_from_config(load_config(args.config, args.set), Path(args.out))
    print(f"train prompts: {Path(args.out) / TRAIN_FILE} ({summary['num_train']})")
    print(f"held-out prompts: {Path(args.out) / HELDOUT_FILE} ({summary['num_heldout']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewardtune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("init-tiny", help="build a tiny SD-shaped pipeline offline")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--exist-ok", action="store_true", help="do nothing if --out already exists")
    tiny.set_defaults(func=_cmd_init_tiny)

    validate = sub.add_parser("validate-config", help="check a run config and exit")
    validate.add_argument("--config", required=True)
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.add_argument("--print", action="store_true", help="print the config with all defaults filled in")
    validate.set_defaults(func=_cmd_validate)

    prep = sub.add_parser("prepare-prompts", help="write a seeded, disjoint train/held-out prompt split")
    prep.add_argument("--config", required=True)
    prep.add_argument("--out", required=True, help="directory for train.txt, heldout.txt, prompts.json")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. prompts.source=FILE")
    prep.set_defaults(func=_cmd_prepare_prompts)

    train = sub.add_parser("train", help="run reward fine-tuning (DDPO / TDPO / TDPO-R / CDPO)")
    train.add_argument("--config", required=True)
    train.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/")
    train.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.epochs=3")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "botocore", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except RewardtuneError as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
