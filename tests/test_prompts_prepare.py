"""prepare-prompts: built-in sets, seeded disjoint split, token-length check, one-line errors; the CLI on the tiny default."""

import json
import subprocess
import sys

import pytest
import yaml

from rewardtune.errors import RewardtuneError
from rewardtune.prompts import builtin_prompts, load_prompts, split_prompts
from rewardtune.stages import prepare_prompts
from tests.conftest import tiny_config_dict


def test_builtin_sets_follow_ddpo():
    assert len(builtin_prompts("simple_animals")) == 45
    assert len(builtin_prompts("imagenet_animals")) == 398 and builtin_prompts("imagenet_animals")[0] == "tench"
    dogs = builtin_prompts("imagenet_dogs")
    assert len(dogs) == 118 and dogs[0] == "Chihuahua"
    assert len(builtin_prompts("imagenet_all")) == 1000


@pytest.mark.parametrize("source", ["simple_animals", "imagenet_animals", "imagenet_dogs"])
def test_split_is_disjoint_deduplicated_and_seeded(tmp_path, source):
    a = prepare_prompts(source, tmp_path / "a", heldout_fraction=0.2, seed=1, template="a photo of a {}")
    train = (tmp_path / "a" / "train.txt").read_text().splitlines()
    heldout = (tmp_path / "a" / "heldout.txt").read_text().splitlines()
    assert not set(train) & set(heldout)
    assert len(set(train)) == len(train) and sorted(train + heldout) == sorted(load_prompts(source, "a photo of a {}"))
    assert a["num_heldout"] == round(a["num_prompts"] * 0.2) and all(p.startswith("a photo of a ") for p in train)
    prepare_prompts(source, tmp_path / "b", heldout_fraction=0.2, seed=1, template="a photo of a {}")
    assert (tmp_path / "b" / "heldout.txt").read_text() == (tmp_path / "a" / "heldout.txt").read_text()
    prepare_prompts(source, tmp_path / "c", heldout_fraction=0.2, seed=2, template="a photo of a {}")
    assert (tmp_path / "c" / "heldout.txt").read_text() != (tmp_path / "a" / "heldout.txt").read_text()


def test_user_files_and_dedup(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog"}\n{"prompt": "a cat"}\n')
    (tmp_path / "p.csv").write_text("id,prompt\n1,a cat\n2,a dog\n3, a fox \n")
    assert prepare_prompts(str(tmp_path / "p.jsonl"), tmp_path / "j", heldout_fraction=0.5, seed=0)["num_prompts"] == 2
    summary = prepare_prompts(str(tmp_path / "p.csv"), tmp_path / "c", heldout_fraction=0.0, seed=0)
    assert summary["num_heldout"] == 0 and (tmp_path / "c" / "train.txt").read_text() == "a cat\na dog\na fox\n"
    assert split_prompts(["x", "y"], 0.9, 0)[0]  # training always keeps at least one prompt


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"\n  \n", "holds no prompts"),
        ("bin.txt", b"\x89PNG\x00\x00", "looks binary"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
        ("bad.jsonl", b'{"prompt": "ok"}\nnot json\n', "line 2: expected a JSON object"),
        ("num.jsonl", b'{"prompt": 3}\n', '"prompt" must be a string'),
        ("nocol.csv", b"text\nhello\n", "needs a 'prompt' column"),
        ("one.txt", b"only\n", "at least 2 distinct prompts"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(RewardtuneError, match=message) as err:
        prepare_prompts(str(tmp_path / name), tmp_path / "out", heldout_fraction=0.2, seed=0)
    assert "\n" not in str(err.value)


def test_unknown_source_and_too_long_prompt(tmp_path, tiny_model_dir):
    with pytest.raises(RewardtuneError, match="neither a built-in set"):
        prepare_prompts("simple_animal", tmp_path / "o", heldout_fraction=0.2, seed=0)
    (tmp_path / "long.txt").write_text("short\n" + "word " * 100 + "\n")
    with pytest.raises(RewardtuneError, match="exceed the tokenizer's 77 tokens"):
        prepare_prompts(str(tmp_path / "long.txt"), tmp_path / "o", heldout_fraction=0.2, seed=0,
                        tokenizer_dir=str(tiny_model_dir))


def test_cli_on_the_tiny_default(tmp_path, tiny_model_dir):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_model_dir)))
    out = tmp_path / "prompts"
    proc = subprocess.run([sys.executable, "-m", "rewardtune.cli", "prepare-prompts", "--config", str(config), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "prompts.json").read_text())
    assert (summary["num_train"], summary["num_heldout"]) == (36, 9) and summary["max_tokens"] <= 77
    assert f"train prompts: {out / 'train.txt'} (36)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "rewardtune.cli", "prepare-prompts", "--config", str(config), "--out", str(out),
                           "--set", "prompts.heldout_fraction=1.5"], capture_output=True, text=True)
    assert proc.returncode == 2 and "prompts.heldout_fraction" in proc.stderr and "Traceback" not in proc.stderr
