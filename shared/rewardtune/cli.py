"""`rewardtune` command line: every stage is a subcommand; user errors are one line, no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from rewardtune.errors import RewardtuneError, Terminated, describe_os_error, one_line


def _cmd_init_tiny(args: argparse.Namespace) -> None:
    from rewardtune.tiny import init_tiny

    if args.rewards_out:
        _init_tiny_rewards(args.rewards_out, args.seed)
    if not args.out:
        return
    out = Path(args.out)
    if out.exists() and args.exist_ok:
        print(f"tiny model already at {out}")
        return
    if out.exists():
        raise RewardtuneError(f"--out {out} already exists; remove it, choose another path, or pass --exist-ok")
    if args.family != "sd":
        from rewardtune.tiny_flow import init_tiny_flow

        if args.preset != "tiny":
            raise RewardtuneError(f"--preset {args.preset} exists only for --family sd; drop it for --family {args.family}")
        init_tiny_flow(out, args.family, seed=args.seed)
        print(f"wrote tiny {args.family} pipeline to {out}")
        return
    init_tiny(out, preset=args.preset, seed=args.seed)
    print(f"wrote {args.preset} pipeline to {out}")


def _init_tiny_rewards(directory: str, seed: int) -> None:
    from rewardtune.rewards.tiny import init_tiny_rewards

    for name, path in init_tiny_rewards(directory, seed=seed).items():
        print(f"tiny reward {name}: source {path}")


def _cmd_cache_models(args: argparse.Namespace) -> None:
    from rewardtune.cache import cache_models
    from rewardtune.config import load_config
    from rewardtune.model_refs import config_model_refs

    refs = config_model_refs(load_config(args.config, args.set))
    if args.dry_run:
        for ref in refs:
            print(f"{ref.source}@{ref.revision or 'main'} files={list(ref.files) if ref.files else 'all'}")
        return
    for result in cache_models(refs, args.cache, force=args.force):
        print(f"{result.status:8s} {result.source} -> {result.uri} ({result.uploaded} uploaded, {result.reused} reused)")


def _cmd_validate(args: argparse.Namespace) -> None:
    from rewardtune.config import load_config

    cfg = load_config(args.config, args.set)
    print(cfg.to_yaml() if args.print else f"{args.config}: ok ({cfg.algorithm.name}, reward {cfg.reward.name})")


def _cmd_train(args: argparse.Namespace) -> None:
    from rewardtune.config import load_config
    from rewardtune.trainer import Trainer

    cfg = load_config(args.config, args.set)
    if args.resume and not Path(args.out).exists():
        from rewardtune.resume_policy import missing_out_warning

        logging.getLogger("rewardtune.train").warning(missing_out_warning(Path(args.out)))
    out = Trainer(cfg, args.out).run(resume=args.resume)
    print(f"metrics: {out / 'metrics.jsonl'}")
    print(f"checkpoints: {out / 'checkpoints'}")


def _cmd_prepare_prompts(args: argparse.Namespace) -> None:
    from rewardtune.config import load_config
    from rewardtune.stages import HELDOUT_FILE, TRAIN_FILE, prepare_prompts_from_config

    summary = prepare_prompts_from_config(load_config(args.config, args.set), Path(args.out))
    print(f"train prompts: {Path(args.out) / TRAIN_FILE} ({summary['num_train']})")
    print(f"held-out prompts: {Path(args.out) / HELDOUT_FILE} ({summary['num_heldout']})")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from rewardtune.config import load_config
    from rewardtune.evaluate import evaluate_run

    cfg = load_config(args.config, args.set)
    prompts = Path(args.prompts) if args.prompts else None
    paths = evaluate_run(cfg, Path(args.run), prompts, Path(args.out), checkpoint=args.checkpoint)
    print(f"evaluated {len(paths)} checkpoint(s) into {args.out}")


def _cmd_report(args: argparse.Namespace) -> None:
    import json

    from rewardtune.checkpoint import write_json_atomic
    from rewardtune.report import build_report

    if len(args.run) != len(args.eval):
        raise RewardtuneError(f"give one --eval per --run (got {len(args.run)} --run, {len(args.eval)} --eval)")
    if args.label and len(args.label) != len(args.run):
        raise RewardtuneError(f"give one --label per --run (got {len(args.label)} labels for {len(args.run)} runs)")
    for directory in [*args.run, *args.eval]:
        if not Path(directory).is_dir():
            raise RewardtuneError(f"{directory} is not a directory")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        headline = build_report([Path(r) for r in args.run], [Path(e) for e in args.eval], out / "report.html",
                                out / "report.md", args.label or None)
    except ValueError as err:
        raise RewardtuneError(str(err)) from None
    write_json_atomic(out / "headline.json", headline)
    print(f"report: {out / 'report.html'}")
    print(json.dumps(headline, indent=1, sort_keys=True))


def _cmd_export(args: argparse.Namespace) -> None:
    import json

    from rewardtune.export import export_model

    summary = export_model(Path(args.run), Path(args.eval) if args.eval else None, args.select, Path(args.out),
                           merge=args.merge, push_to_hub=args.push_to_hub, private=not args.public)
    print(f"exported {summary['checkpoint']} to {args.out} ({summary['reason']})")
    print(json.dumps(summary, indent=1, sort_keys=True))


def _cmd_testbed_pretrain(args: argparse.Namespace) -> None:
    import json
    import shutil

    from rewardtune.testbed.build import build_testbed

    out = Path(args.out)
    if out.exists() and not args.force:
        raise RewardtuneError(f"--out {out} already exists; pass --force to rebuild it")
    if out.exists():
        shutil.rmtree(out)
    import torch

    torch.set_num_threads(args.threads)  # the result depends on the thread count; 1 reproduces the committed one
    summary = build_testbed(out, seed=args.seed, quick=args.quick)
    print(json.dumps(summary, indent=1))
    print(f"testbed model: {out / 'model'}\ntestbed proxy: {out / 'proxy'}")


def _cmd_testbed_compare(args: argparse.Namespace) -> None:
    from rewardtune.testbed.compare import compare

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    compare(args.out, algorithms, args.seeds, args.config, args.set, fidelity_margin=args.fidelity_margin,
            checkpoint_every=args.checkpoint_every)
    print(Path(args.out, "comparison.md").read_text())
    print(f"report: {Path(args.out) / 'comparison.html'}")


def _cmd_testbed_benchmark(args: argparse.Namespace) -> None:
    from rewardtune.testbed.benchmark import benchmark

    if args.jobs < 1:
        raise RewardtuneError(f"--jobs {args.jobs}: give at least 1 parallel run")
    if args.threads is not None and args.threads < 1:
        raise RewardtuneError(f"--threads {args.threads}: give at least 1 torch thread per run")
    benchmark(args.protocol, args.out, jobs=args.jobs, use_smoke=args.smoke, threads=args.threads)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's contract: a bad argument is one `error:` line (naming it and `--help`), exit 2,
    not the usage block followed by `prog: error: ...` (subcommands inherit this class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {one_line(message)}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rewardtune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser(
        "init-tiny",
        help="build a tiny SD/SD3/FLUX-shaped pipeline (--out, --family) and/or tiny reward models (--rewards-out) offline",
        description="Tiny stand-ins of the real architecture classes, saved in the layouts the real loaders read. "
        "--rewards-out DIR writes DIR/<reward> for aesthetic, pickscore, clipscore, hpsv2 and imagereward; "
        "use each as that reward's `source`.",
    )
    tiny.add_argument("--out", help="directory for the tiny SD pipeline")
    tiny.add_argument("--rewards-out", help="directory for tiny reward models (one subdirectory per reward)")
    tiny.add_argument("--preset", default="tiny", choices=["tiny", "sd15"])
    tiny.add_argument(
        "--family", default="sd", choices=["sd", "sd3", "flux"],
        help="sd: SD 1.x-shaped (UNet, DDIM); sd3: SD3/SD3.5-shaped; flux: FLUX.1-shaped (flow transformers)",
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--exist-ok", action="store_true", help="do nothing if --out already exists")
    tiny.set_defaults(func=_cmd_init_tiny)

    cache = sub.add_parser(
        "cache-models",
        help="fetch every model a config names into a model cache (directory or s3://bucket/prefix)",
        description="Fetches model.source, every reward's sources (reward, eval_rewards, constraints) and the critic's "
        "image tower from the hub / http(s) / local paths into the cache, one entry per model with a sha256 manifest "
        "written last. Idempotent and resumable. S3 endpoint: RT_S3_ENDPOINT_URL or AWS_ENDPOINT_URL; credentials: "
        "the standard AWS variables. At load time, set RT_MODEL_CACHE to the same URI.",
    )
    cache.add_argument("--config", required=True)
    cache.add_argument("--cache", required=True, help="a directory (PVC mount) or s3://bucket/prefix")
    cache.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cache.add_argument("--force", action="store_true", help="re-fetch models even if their manifest matches")
    cache.add_argument("--dry-run", action="store_true", help="list the models the config names and exit")
    cache.set_defaults(func=_cmd_cache_models)

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

    train = sub.add_parser("train", help="run reward fine-tuning (DDPO / GRPO / TDPO / TDPO-R / CDPO)")
    train.add_argument("--config", required=True)
    train.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints/")
    train.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.epochs=3")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="score base + kept checkpoints on held-out prompts and unseen rewards")
    evaluate.add_argument("--config", required=True)
    evaluate.add_argument("--run", required=True, help="run directory of `rewardtune train` (holds checkpoints/)")
    evaluate.add_argument("--out", required=True, help="evaluation directory; checkpoints already there are skipped")
    evaluate.add_argument("--prompts", help="directory with heldout.txt (and train.txt) from prepare-prompts")
    evaluate.add_argument("--checkpoint", help="evaluate only base and this checkpoint (e.g. epoch-000004)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. evaluation.seed=1")
    evaluate.set_defaults(func=_cmd_evaluate)

    report = sub.add_parser("report", help="self-contained HTML report + Markdown summary (several runs: overlaid)")
    report.add_argument("--run", action="append", required=True, help="run directory (repeat to compare runs)")
    report.add_argument("--eval", action="append", required=True, help="its evaluation directory (same order)")
    report.add_argument("--label", action="append", default=[], help="one label per run (default: run dir names)")
    report.add_argument("--out", required=True, help="writes report.html, report.md and headline.json here")
    report.set_defaults(func=_cmd_report)

    export = sub.add_parser("export", help="a diffusers pipeline + model card of the chosen checkpoint (optionally pushed)",
                            description="Selection: last (newest), best-proxy (highest held-out training reward), "
                            "best-heldout (highest training reward among checkpoints whose unseen rewards stay within "
                            "the base model's 95% CI; rewardtune.indicators.best_heldout_index).")
    export.add_argument("--run", required=True, help="run directory of `rewardtune train`")
    export.add_argument("--eval", help="its evaluation directory (needed by best-proxy and best-heldout)")
    export.add_argument("--select", default="best-heldout", choices=["last", "best-proxy", "best-heldout"])
    export.add_argument("--out", required=True, help="the pipeline directory to write (must not exist)")
    export.add_argument("--merge", action="store_true", help="fuse the LoRA into the UNet (else base UNet + lora/)")
    export.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub model repo (token: HF_TOKEN)")
    export.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")
    export.set_defaults(func=_cmd_export)

    testbed = sub.add_parser("testbed", help="the overoptimization testbed: pretrain its world model, compare methods")
    tb = testbed.add_subparsers(dest="testbed_command", required=True)
    pre = tb.add_parser("pretrain", help="train the tiny world model and its proxy reward (CPU, ~5 min)",
                        description="Writes OUT/model (a diffusers pipeline) and OUT/proxy (the proxy reward). "
                        "The committed copy lives in shared/rewardtune/data/testbed (model.source: testbed).")
    pre.add_argument("--out", required=True)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--force", action="store_true", help="replace --out if it exists")
    pre.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as for the committed model)")
    pre.add_argument("--quick", action="store_true", help="a few steps only (tests; the model follows no prompt)")
    pre.set_defaults(func=_cmd_testbed_pretrain)
    cmp = tb.add_parser("compare", help="train each algorithm on the proxy over seeds; gold/fidelity comparison report")
    cmp.add_argument("--algorithms", default="ddpo,tdpo,tdpo_r,cdpo")
    cmp.add_argument("--seeds", type=int, default=3)
    cmp.add_argument("--out", required=True, help="runs/, evals/, prompts/, comparison.{md,html,json}")
    cmp.add_argument("--config", help="base config (default: configs/testbed.yaml)")
    cmp.add_argument("--fidelity-margin", type=float, default=0.05,
                     help="CDPO: fidelity must stay above the base model's epoch-0 mean minus this")
    cmp.add_argument("--checkpoint-every", type=int, default=2, help="epochs between evaluated checkpoints")
    cmp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.epochs=4")
    cmp.set_defaults(func=_cmd_testbed_compare)
    bench = tb.add_parser("benchmark", help="the pre-registered overoptimization benchmark (resumable)",
                          description="Runs every arm x seed and the validity-gate controls of --protocol, continues "
                          "a killed benchmark in the same --out, and writes results.{json,md,html}.")
    bench.add_argument("--protocol", default="benchmarks/overopt/protocol.yaml")
    bench.add_argument("--out", required=True, help="runs/, evals/, gates/, results.{json,md,html}")
    bench.add_argument("--jobs", type=int, default=1, help="runs trained in parallel (CPU threads are split between them)")
    bench.add_argument("--smoke", action="store_true", help="2 seeds, 4 epochs, a few prompts: a machinery check, no verdict")
    bench.add_argument("--threads", type=int, help="torch threads per run (default: CPU count / jobs; fixed for an --out)")
    bench.set_defaults(func=_cmd_testbed_benchmark)
    return parser


def _quiet_libraries(progress_bars: bool) -> None:
    """Keep stderr readable: a failing command must end in one error line, not under progress bars.

    Model-loading progress bars go when stderr is not a terminal (pod logs, captured output); library
    warnings stay (a reward model loaded with missing weights must be heard). Environment variables cover
    libraries imported later; the calls cover those already imported.
    """
    if progress_bars:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
    # diffusers reads no environment variable for its bars; models.load_pipeline follows the hub's setting


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "botocore", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:
        _quiet_libraries(progress_bars=sys.stderr.isatty())
    try:
        args.func(args)
    except Terminated as err:
        print(f"terminated: {err}", file=sys.stderr)
        return err.exit_code
    except RewardtuneError as err:
        if args.verbose:
            raise
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment (permissions, read-only or full disk), not a bug: one line too
        if args.verbose:
            raise
        print(f"error: {one_line(describe_os_error(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
