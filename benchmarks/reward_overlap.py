"""How much of a slow reward the reward thread hides behind sampling (`sampling.reward_workers` 1 vs 0).

A slow remote reward is simulated by a Python reward that sleeps `--reward-s` seconds per batch (what a
loaded reward server costs); both settings train the same tiny run side by side, alternating, and the
medians of the timed epochs (first one is warm-up) are compared.

    python benchmarks/reward_overlap.py [--reward-s 0.5] [--epochs 4] [--batches 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SLOW_REWARD = '''
import time

DELAY_S = {delay}

def slow_brightness(images, prompts):
    time.sleep(DELAY_S)
    return images.mean(dim=(1, 2, 3))
'''


def run(workers: int, model: Path, code: Path, out: Path, args: argparse.Namespace) -> list[dict]:
    from rewardtune.config import parse_config
    from rewardtune.trainer import Trainer

    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["model"]["source"] = str(model)
    data["logging"] = {"progress_bars": False}
    data["reward"] = {"name": "python", "options": {"callable": "slow_reward:slow_brightness", "path": str(code)}}
    data["sampling"] |= {"batches_per_epoch": args.batches, "reward_workers": workers}
    data["training"] |= {"epochs": args.epochs, "gradient_accumulation_steps": 1}
    data["checkpointing"] = {"every_epochs": args.epochs, "keep_last": 1}
    Trainer(parse_config(data), out).run()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward-s", type=float, default=0.5, help="seconds the reward sleeps per batch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4, help="sampling batches per epoch")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (alternating)")
    args = parser.parse_args(argv)
    from rewardtune.tiny import init_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = init_tiny(root / "tiny-sd")
        (root / "code").mkdir()
        (root / "code" / "slow_reward.py").write_text(SLOW_REWARD.format(delay=args.reward_s))
        sys.path.insert(0, str(root / "code"))
        rows: dict[int, list[dict]] = {0: [], 1: []}
        for repeat in range(args.repeats):
            for workers in (0, 1):
                start = time.perf_counter()
                records = run(workers, model, root / "code", root / f"run-{workers}-{repeat}", args)
                rows[workers] += records[1:]
                print(f"reward_workers={workers} repeat {repeat}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    summary = {}
    for workers, records in rows.items():
        epoch_s = [args.batches * 4 / r["images_per_s"] for r in records]  # tiny.yaml: 4 images per batch
        summary[workers] = {
            "epoch_s_median": statistics.median(epoch_s),
            "sampling_s_median": statistics.median(r["time_sampling_s"] for r in records),
            "reward_s_median": statistics.median(r["time_reward_s"] for r in records),
            "reward_wait_s_median": statistics.median(r["time_reward_wait_s"] for r in records),
            "epochs_timed": len(records),
        }
    inline, threaded = summary[0], summary[1]
    # inline, all reward time is on the critical path; threaded, only the wait after the last batch is
    hidden = 1 - threaded["reward_wait_s_median"] / max(inline["reward_s_median"], 1e-9)
    summary["reward_s_per_batch"] = args.reward_s
    summary["epoch_speedup"] = inline["epoch_s_median"] / threaded["epoch_s_median"]
    summary["reward_time_hidden_fraction"] = hidden
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
