"""Build the testbed's unseen rewards (rewardtune.testbed.proxy.UNSEEN_PROXIES) into the committed assets.

    PYTHONPATH=shared python benchmarks/overopt/build_unseen_proxies.py [--force]

Each is fitted to its own labels (seed, noise, image pool, width) exactly as the training proxy was, and
its Spearman correlation with exact gold on fresh base-model samples is written to its JSON; the script
also prints the rank correlation between every pair of proxies on one shared set of base-model samples.
"""

from __future__ import annotations

import argparse
import shutil
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from rewardtune.testbed.assets import ASSETS, model_dir, proxy_dir
    from rewardtune.testbed.proxy import (
        UNSEEN_PROXIES,
        build_proxy,
        gold_scores,
        label_images,
        load_proxy,
        spearman,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild proxies that exist")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir(), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for name, spec in UNSEEN_PROXIES.items():
        out = ASSETS / spec["dir"]
        if out.exists() and not args.force:
            print(f"{name}: {out} exists (--force rebuilds)")
            continue
        shutil.rmtree(out, ignore_errors=True)
        summary = build_proxy(pipe, out, seed=spec["seed"], num_samples=spec["num_samples"],
                              num_renders=spec["num_renders"], label_noise=spec["label_noise"], width=spec["width"])
        print(f"{name}: Spearman vs gold on fresh base samples {summary['spearman_heldout_base_samples']:.3f}")
    shared = label_images(pipe, 128, 0, 999, 10, 4.0)
    scores = {"gold": gold_scores(shared)}
    with torch.no_grad():
        for name, directory in [("testbed_proxy", proxy_dir()), *((n, ASSETS / s["dir"]) for n, s in UNSEEN_PROXIES.items())]:
            scores[name] = load_proxy(str(directory))(shared).numpy()
    names = list(scores)
    print("Spearman on 128 shared base-model samples (seed 999):")
    for i, a in enumerate(names):
        print("  " + a.ljust(16) + " ".join(f"{spearman(scores[a], scores[b]):.3f}" for b in names[: i + 1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
