"""The whole DAG under kfp.local (SubprocessRunner, use_venv=False) on the testbed: arms side by side, report included."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytest.importorskip("kfp")
SCRIPT = REPO / "pipelines" / "run_local.py"
PROTOCOL = REPO / "benchmarks" / "overopt" / "protocol.yaml"


def _run_local(tmp_path, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(tmp_path / "kfp"), *extra],
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path)


def _lines(stdout: str, prefix: str) -> list[Path]:
    return [Path(line.split(": ", 1)[1].split(" (")[0]) for line in map(str.strip, stdout.splitlines())
            if line.startswith(prefix)]


def _demo_args() -> list[str]:
    """`make demo`'s run_local.py arguments, read from the Makefile (one place), without --root; repository paths
    made absolute (the test runs elsewhere)."""
    line = next(line for line in (REPO / "Makefile").read_text().splitlines() if "pipelines/run_local.py" in line)
    args = shlex.split(line.split("pipelines/run_local.py", 1)[1])
    i = args.index("--root")
    return [str(REPO / a) if "/" in a and (REPO / a).exists() else a for a in args[:i] + args[i + 2:]]


def _check(proc, epochs, arms, tmp_path, reward: str = "testbed_proxy") -> dict[str, dict]:
    """Each arm trained `epochs` with its own config; one report overlays them all. Returns arm -> used config."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prompts = next((tmp_path / "kfp").rglob("prepare-prompts/prompts"))
    used = {}
    for run_dir in _lines(proc.stdout, "run: "):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == epochs
        assert (run_dir / "checkpoints" / f"epoch-{epochs:06d}" / "manifest.json").is_file()
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["prompts"] == {**config["prompts"], "source": str(prompts / "train.txt"), "template": "{}"}
        used[config["algorithm"]["name"]] = config
    assert sorted(used) == sorted(arms)
    [report] = _lines(proc.stdout, "report: ")
    html = report.read_text()
    assert "Overoptimization indicators" in html and "http://" not in html and "https://" not in html
    assert "rewardtune report: " + " vs ".join(f"{a} on {reward}" for a in arms) in html  # one page, every arm
    # every arm's Collected evaluations: the base model and its final checkpoint were both scored
    assert html.count(f"<th>epoch-{epochs:06d}</th>") == len(arms) and "base" in html
    summary = next((tmp_path / "kfp").rglob("markdown")).read_text()
    rows = [line for line in summary.splitlines() if f"| {reward} |" in line]
    assert [row.split("|")[1].strip() for row in rows] == [f"{a} on {reward}" for a in arms]
    return used


def _protocol_lr(algorithm: str) -> float:
    arm = next(a for a in yaml.safe_load(PROTOCOL.read_text())["arms"] if a["algorithm"] == algorithm)
    return float(next(o for o in arm["overrides"] if o.startswith("training.learning_rate=")).split("=")[1])


def test_local_dag_two_arms_one_epoch(tmp_path):
    """Fast path: DDPO and TDPO-R side by side (`algorithms`, ParallelFor), one epoch each at the protocol's calibrated
    learning rates, a 2-prompt held-out evaluation; an export per arm; a typo in `--algorithms` fails in one line."""
    bad = _run_local(tmp_path, "--algorithms", "ddpo,tdpo-r")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: algorithms: unknown algorithm 'tdpo-r'")
    proc = _run_local(tmp_path, "--epochs", "1", "--algorithms", "ddpo,tdpo_r", "--arms-from", str(PROTOCOL),
                      "--set", "evaluation.num_heldout_prompts=2")
    used = _check(proc, 1, ["ddpo", "tdpo_r"], tmp_path)
    # each arm trained in ROOT/checkpoints/<run id>-<algorithm> (the DAG's checkpoint_dir), not in this machine's /mnt
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "kfp" / "checkpoints").iterdir()) == ["ddpo", "tdpo_r"]
    assert {a: c["training"]["learning_rate"] for a, c in used.items()} == {a: _protocol_lr(a) for a in used}
    assert all(c["evaluation"]["num_heldout_prompts"] == 2 for c in used.values())
    exported = [p.parent for p in (tmp_path / "kfp").rglob("rewardtune_export.json")]  # the export steps' Models
    assert len(exported) == 2
    for model in exported:
        assert (model / "model_index.json").is_file() and (model / "README.md").is_file()


def test_local_dag_flow_family_grpo_and_cdpo(tmp_path):
    """The same DAG on a flow model (tiny SD3): GRPO and CDPO side by side, each with its own settings (`--arm-set`,
    the DAG's arm_overrides); evaluation samples the LoRA checkpoints with the ODE, export merges them into an
    SD3 pipeline."""
    from rewardtune.rewards.tiny import init_tiny_rewards
    from rewardtune.tiny_flow import init_tiny_flow

    config = {
        "model": {"source": str(init_tiny_flow(tmp_path / "sd3", "sd3")), "family": "sd3", "finetune": "lora"},
        "prompts": {"source": "simple_animals"},
        "sampling": {"num_steps": 4, "guidance_scale": 3.0, "batch_size": 2, "batches_per_epoch": 1, "resolution": 32},
        "reward": {"name": "aesthetic", "source": init_tiny_rewards(tmp_path / "rewards", names=["aesthetic"])["aesthetic"]},
        "training": {"batch_size": 2, "gradient_accumulation_steps": 1, "stat_tracking": {"enabled": False}},
        "checkpointing": {"every_epochs": 1, "keep_last": 2},
        "device": "cpu",
    }
    (tmp_path / "sd3.yaml").write_text(yaml.safe_dump(config))
    proc = _run_local(tmp_path, "--config", str(tmp_path / "sd3.yaml"), "--epochs", "1", "--algorithms", "grpo,cdpo",
                      "--set", "evaluation.num_heldout_prompts=2", "--arm-set", "grpo:algorithm.group.group_size=2",
                      "--arm-set", "cdpo:algorithm.constraints=[{reward: {name: jpeg_compressibility}, relative_margin: 0.0}]")
    used = _check(proc, 1, ["grpo", "cdpo"], tmp_path, reward="aesthetic")
    assert used["grpo"]["algorithm"]["group"]["group_size"] == 2 and not used["cdpo"]["algorithm"].get("group")
    assert [c["reward"]["name"] for c in used["cdpo"]["algorithm"]["constraints"]] == ["jpeg_compressibility"]
    assert all(c["model"]["family"] == "sd3" for c in used.values())
    exported = [p.parent for p in (tmp_path / "kfp").rglob("rewardtune_export.json")]
    assert len(exported) == 2
    for model in exported:
        assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    bad = _run_local(tmp_path, "--config", str(tmp_path / "sd3.yaml"), "--algorithms", "grpo", "--arm-set", "cdpo:training.epochs=2")
    assert bad.returncode == 2 and "'cdpo' is not one of --algorithms ['grpo']" in bad.stderr


@pytest.mark.slow
def test_local_dag_embedded_default(tmp_path):
    """`make demo`, with its own arguments: DDPO and TDPO-R side by side; the proxy rises on held-out prompts."""
    args = _demo_args()
    arms = args[args.index("--algorithms") + 1].split(",")
    epochs = int(args[args.index("--epochs") + 1])
    _check(_run_local(tmp_path, *args), epochs, arms, tmp_path)
    summary = next((tmp_path / "kfp").rglob("markdown")).read_text()
    for row in (line.split("|") for line in summary.splitlines() if "| testbed_proxy |" in line):
        assert float(row[5]) > 0, summary  # each arm's training-reward gain on held-out prompts
