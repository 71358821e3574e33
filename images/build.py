"""Build (and optionally push) the project images named in images/images.yaml, the same names the components use.

    python images/build.py            # build every image
    python images/build.py trainer --push
    python images/build.py --dry-run  # print the docker commands only
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES_FILE = REPO / "images" / "images.yaml"


def load_images(path: Path = IMAGES_FILE) -> dict:
    return yaml.safe_load(path.read_text())


def image_ref(key: str, tag: str | None = None, spec: dict | None = None) -> str:
    """`registry/name:tag` for one image key (trainer, cpu)."""
    spec = spec or load_images()
    return f"{spec['registry']}/{spec['images'][key]['name']}:{tag or spec['tag']}"


def build_commands(keys: list[str], tag: str | None, push: bool) -> list[list[str]]:
    spec = load_images()
    commands = []
    for key in keys or list(spec["images"]):
        if key not in spec["images"]:
            raise SystemExit(f"unknown image '{key}'; images.yaml defines {', '.join(spec['images'])}")
        ref = image_ref(key, tag, spec)
        commands.append(["docker", "build", "-f", spec["images"][key]["dockerfile"], "--build-arg",
                         f"VERSION={tag or spec['tag']}", "-t", ref, "."])
        if push:
            commands.append(["docker", "push", ref])
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", help="image keys from images.yaml (default: all)")
    parser.add_argument("--tag", help="override the tag from images.yaml")
    parser.add_argument("--push", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    for cmd in build_commands(args.images, args.tag, args.push):
        print(shlex.join(cmd))
        if not args.dry_run:
            subprocess.run(cmd, cwd=REPO, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
