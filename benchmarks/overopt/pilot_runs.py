"""Calibration pilots of the overoptimization benchmark: single runs (pilot seeds only, never confirmatory
seeds) through the benchmark's own `execute`, so they train, evaluate and measure path KL exactly as a
confirmatory run does. CALIBRATION.md, "Session 6", quotes them.

    PYTHONPATH=shared python benchmarks/overopt/pilot_runs.py PROTOCOL OUT SET [--jobs 2]

SET names a list of runs below. Resumable like the benchmark: a run with a result.json is not rerun.
Print the tables with benchmarks/overopt/pilot_table.py OUT/runs/*/.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from rewardtune.testbed.benchmark import RunSpec, execute
from rewardtune.testbed.compare import write_prompts
from rewardtune.testbed.protocol import load_protocol

DDPO_V4 = ["training.learning_rate=5.0e-3", "training.batch_size=2"]
DDPO_7E3 = ["training.learning_rate=7.0e-3", "training.lr_warmup_steps=8", "training.batch_size=2"]
TDPO_4E3 = ["training.learning_rate=4.0e-3", "training.lr_warmup_steps=20", "training.stat_tracking.enabled=false",
            "algorithm.critic.learning_rate=1.0e-2"]
DDPO_32W = ["training.learning_rate=5.0e-3", "training.lr_warmup_steps=8", "training.batch_size=4",
            "sampling.batches_per_epoch=4", "training.fused_steps=10"]  # 32 images/epoch, still 8 steps
PROXY, SHUFFLED = "testbed_proxy", "testbed_proxy_shuffled"
GOLD = "testbed_gold"
TDPO_FULL = ["model.finetune=full", "training.learning_rate=1.0e-4", "training.lr_warmup_steps=20",
             "training.stat_tracking.enabled=false", "algorithm.critic.learning_rate=1.0e-3"]
# Session 8 (issue 31): regimes where DDPO might overoptimize, DDPO on 16 images/epoch (the TDPO family's
# sample count, so budgets match), 8 optimizer steps per epoch; each on the proxy and on gold (the oracle)
REGIMES_V7 = {
    "full3e-4": ["model.finetune=full", "training.learning_rate=3.0e-4", "training.lr_warmup_steps=8", "training.batch_size=2"],
    "full1e-4": ["model.finetune=full", "training.learning_rate=1.0e-4", "training.lr_warmup_steps=8", "training.batch_size=2"],
    "lora16": ["model.lora_rank=16", "training.learning_rate=2.0e-2", "training.lr_warmup_steps=8", "training.batch_size=2"],
}

SETS: dict[str, list[RunSpec]] = {
    "shuffled": [
        RunSpec("shuf_ddpo5e-3const", "ddpo", 100, SHUFFLED, DDPO_V4, True),
        RunSpec("shuf_tdpo4e-3", "tdpo", 100, SHUFFLED, TDPO_4E3, True),
        RunSpec("shuf_ddpo7e-3_clip0.1", "ddpo", 100, SHUFFLED, [*DDPO_7E3, "training.clip_range=0.1"], True),
        RunSpec("shuf_ddpo7e-3", "ddpo", 101, SHUFFLED, DDPO_7E3, True),
    ],
    "family": [  # the protocol must set cdpo_fidelity_threshold for CDPO's absolute constraint
        RunSpec("cdpo", "cdpo", 100, PROXY, TDPO_4E3), RunSpec("tdpo_r", "tdpo_r", 100, PROXY, TDPO_4E3),
        RunSpec("cdpo", "cdpo", 101, PROXY, TDPO_4E3), RunSpec("tdpo_r", "tdpo_r", 101, PROXY, TDPO_4E3),
        RunSpec("shuf_tdpo4e-3", "tdpo", 101, SHUFFLED, TDPO_4E3, True),
    ],
    "v6": [  # Session 7: DDPO with twice the images per optimizer step at v5's rate, warmed up over epoch 0
        *[RunSpec("ddpo32w", "ddpo", seed, PROXY, DDPO_32W) for seed in (100, 101)],
        RunSpec("shuf_ddpo32w", "ddpo", 100, SHUFFLED, DDPO_32W, True),
        *[RunSpec("ddpo32w", "ddpo", seed, PROXY, DDPO_32W) for seed in (102, 103)],
        RunSpec("shuf_ddpo32w", "ddpo", 101, SHUFFLED, DDPO_32W, True),
    ],
    "v7b": [RunSpec(f"crit{name}_tdpo", "tdpo", 100, PROXY, [*TDPO_4E3, *extra])  # the critic question (G2, G3)
            for name, extra in (("fp0", []), ("fp8", ["algorithm.critic.fit_passes=8"]),
                                ("fp32", ["algorithm.critic.fit_passes=32"]),
                                ("fp32clr1e-3", ["algorithm.critic.fit_passes=32", "algorithm.critic.learning_rate=1.0e-3"]))],
    # the regime between v7a's two full fine-tunes, and the TDPO family in a full fine-tune (20 time-major steps
    # per epoch at a third of DDPO's 3e-4, about the same rate x steps), with and without critic fit passes
    "v7c": [RunSpec(f"full2e-4_{arm}", "ddpo", 100, reward, [*REGIMES_V7["full3e-4"][:1], "training.learning_rate=2.0e-4",
                                                            *REGIMES_V7["full3e-4"][2:]], arm != "ddpo")
            for arm, reward in (("ddpo", PROXY), ("gold", GOLD))]
           + [RunSpec(f"fulltd{fp}_{arm.replace('_', '')}", arm, 100, PROXY, [*TDPO_FULL, f"algorithm.critic.fit_passes={fp}"])
              for fp, arm in ((0, "tdpo"), (16, "tdpo"), (16, "tdpo_r"), (16, "cdpo"))]
           + [RunSpec("full3e-4_shuf", "ddpo", 100, SHUFFLED, REGIMES_V7["full3e-4"], True)],
    # lora16's seed 101 was dropped before it ran: on seed 100 both of its arms collapsed (gold 0.33 -> 0.09)
    # a LoRA regime that could overoptimize without collapsing (rank 16 at a quarter of v7a's rate): the TPAMI
    # reading of CDPO resets the policy's LoRA neurons, which a full fine-tune does not have
    "v7d": [RunSpec(f"lora16r5e-3_{arm}", "ddpo", 100, reward, ["model.lora_rank=16", "training.learning_rate=5.0e-3",
                                                              "training.lr_warmup_steps=8", "training.batch_size=2"], arm != "ddpo")
            for arm, reward in (("ddpo", PROXY), ("gold", GOLD))],
    "v7a": [RunSpec(f"{regime}_{arm}", "ddpo", seed, reward, overrides, arm != "ddpo")
            for seed in (100, 101) for regime, overrides in REGIMES_V7.items() if (regime, seed) != ("lora16", 101)
            for arm, reward in (("ddpo", PROXY), ("gold", GOLD))],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol")
    parser.add_argument("out")
    parser.add_argument("set", choices=sorted(SETS))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    protocol, out = load_protocol(args.protocol), Path(args.out)
    if any(spec.seed < 100 for spec in SETS[args.set]):
        print("error: pilot runs use pilot seeds (>= 100) only", file=sys.stderr)
        return 2
    write_prompts(out / "prompts")
    todo = [s for s in SETS[args.set] if not (out / "runs" / s.name / "result.json").is_file()]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(execute, protocol.model_dump_json(), json.dumps(asdict(s)), str(out), 1) for s in todo]
        for spec, future in zip(todo, futures, strict=True):
            future.result()
            print(f"done: {spec.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
