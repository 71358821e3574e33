"""The bad-input matrix: every way a user can hand in something broken, through the real CLI.

Each case must end with exit code 2, exactly one line on stderr that names the problem (the offending
key, value, file, prompt or checkpoint) and what to do, and no traceback. Cases run as separate
processes (forked from a preloaded server, see tests/cli_runner.py).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_runner import run_cli
from tests.conftest import merge_sections, one_epoch_lora_dict
from tests.damage import rehash_checkpoint


@dataclass
class Ctx:
    root: Path
    config: Path  # a valid tiny DDPO/LoRA config, 1 epoch
    data: dict
    run: Path  # a finished 1-epoch run of `config` (for --resume cases)
    model_no_vae: Path
    model_copy: Path  # the same pipeline at another path: "a different model" to its checkpoints
    nan_reward: Path
    inf_reward: Path

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def config_with(self, name: str, **sections: object) -> Path:
        data = merge_sections(yaml.safe_load(yaml.safe_dump(self.data)), sections)
        return self.write(f"{name}.yaml", yaml.safe_dump(data))

    def train(self, *overrides: str, config: Path | None = None, out: Path | None = None) -> list[str]:
        sets = [arg for item in overrides for arg in ("--set", item)]
        return ["train", "--config", str(config or self.config), "--out", str(out or self.root / "out"), *sets]

    def resume(self, name: str, *overrides: str) -> list[str]:
        run = self.root / name
        shutil.copytree(self.run, run)
        return [*self.train(*overrides, out=run), "--resume"]


def _broken_reward(source: Path, dest: Path, value: float) -> Path:
    """The tiny aesthetic reward with its output layer poisoned: a real model file that scores NaN or inf."""
    shutil.copytree(source, dest)
    head = next(dest.glob("*.pth"))
    state = torch.load(head, weights_only=True)
    last = sorted(k for k in state if k.endswith(".bias"))[-1]
    state[last] = torch.full_like(state[last], value)
    torch.save(state, head)
    return dest


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_model_dir) -> Ctx:
    from rewardtune.rewards.tiny import init_tiny_rewards

    root = tmp_path_factory.mktemp("bad")
    data = one_epoch_lora_dict(tiny_model_dir)
    config = root / "base.yaml"
    config.write_text(yaml.safe_dump(data))
    run = root / "run"
    finished = run_cli(["train", "--config", str(config), "--out", str(run)])
    assert finished.returncode == 0, finished.stderr
    no_vae = root / "no-vae"
    shutil.copytree(tiny_model_dir, no_vae, ignore=lambda d, names: ["vae"] if Path(d) == tiny_model_dir else [])
    aesthetic = Path(init_tiny_rewards(root / "rewards", names=["aesthetic"])["aesthetic"])
    return Ctx(root, config, data, run, no_vae, Path(shutil.copytree(tiny_model_dir, root / "other-model")),
               _broken_reward(aesthetic, root / "nan-reward", float("nan")),
               _broken_reward(aesthetic, root / "inf-reward", float("inf")))


def _constraint(**fields: object) -> dict:
    return {"name": "cdpo", "constraints": [{"reward": {"name": "jpeg_compressibility"}, **fields}]}


def _model_without_tokenizer_config(c: Ctx) -> list[str]:
    """Without tokenizer_config.json, transformers gives the tokenizer model_max_length 1e30 (padding overflows)."""
    model = Path(shutil.copytree(c.model_copy, c.root / "no-tokenizer-config"))
    (model / "tokenizer" / "tokenizer_config.json").unlink()
    return c.train(f"model.source={model}")


def _evaluate_damaged_trainer_state(c: Ctx) -> list[str]:
    """trainer_state.json emptied and the manifest re-hashed to match: the checkpoint verifies, its state is junk."""
    run = Path(shutil.copytree(c.run, c.root / "junk-state"))
    checkpoint = run / "checkpoints" / "epoch-000001"
    (checkpoint / "trainer_state.json").write_text("")
    rehash_checkpoint(checkpoint)
    return ["evaluate", "--config", str(c.config), "--run", str(run), "--out", str(run / "eval"), "--checkpoint", checkpoint.name]


def _reward_with_renamed_pad_token(c: Ctx) -> list[str]:
    """A one-byte change in the tiny CLIPScore model's tokenizer_config.json (as the fuzz found): the renamed
    pad token is added as a new token, one id past the text encoder's embedding."""
    from rewardtune.rewards.tiny import init_tiny_rewards

    reward = Path(init_tiny_rewards(c.root / "renamed-pad", names=["clipscore"])["clipscore"])
    config = reward / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["pad_token"] = "<|endoGtext|>"
    config.write_text(json.dumps(data))
    return c.train("reward.name=clipscore", f"reward.source={reward}")


def _cuda(c: Ctx) -> list[str]:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return c.train("device=cuda")


def _reward_returning_text(c: Ctx) -> list[str]:
    """A user's callable reward that returns labels instead of scores (torch alone says "too many dimensions 'str'")."""
    code = c.root / "text-reward"
    code.mkdir(exist_ok=True)
    (code / "text_reward.py").write_text("def labels(images, prompts):\n    return ['good' for _ in prompts]\n")
    return c.train("reward.name=python", f"reward.options={{callable: 'text_reward:labels', path: '{code}'}}")


def _evaluate_empty_run(c: Ctx) -> list[str]:
    (c.root / "empty-run").mkdir(exist_ok=True)
    return ["evaluate", "--config", str(c.config), "--run", str(c.root / "empty-run"), "--out", str(c.root / "ev")]


BLANK = "  \n\n"
DUPLICATE_JSONL = '{"prompt": "a cat", "prompt": "a dog"}\n'
NAN_JSONL = '{"prompt": "a cat", "w": NaN}\n'
FORM_FEED_TXT = "a cat\x0ca dog\n"
LONG = "a cat " * 100 + "\n"

# id -> (argv builder, regex the one stderr line must match)
CASES: dict[str, tuple[Callable[[Ctx], list[str]], str]] = {
    # config keys
    "misspelled-key": (lambda c: c.train("training.learnig_rate=1e-4"),
                       r"training\.learnig_rate: unknown key \(did you mean 'learning_rate'\?\)"),
    "unknown-section": (lambda c: c.train("optimizer.lr=1"), r"config error at optimizer: unknown key; allowed keys"),
    "misspelled-nested-key": (lambda c: c.train("algorithm.reset.evry=3"), r"algorithm\.reset\.evry: unknown key \(did you mean 'every'"),
    "missing-model-section": (lambda c: ["validate-config", "--config", str(c.write("nomodel.yaml", "reward: {name: brightness}\n"))],
                              r"config error at model: Field required"),
    # types
    "epochs-not-int": (lambda c: c.train("training.epochs=ten"), r"training\.epochs: .*integer.*'ten'"),
    "batch-size-list": (lambda c: c.train("sampling.batch_size=[1,2]"), r"sampling\.batch_size: .*integer"),
    "bool-not-bool": (lambda c: c.train("training.stat_tracking.enabled=maybe"), r"stat_tracking\.enabled: .*boolean"),
    "reward-not-mapping": (lambda c: c.train(config=c.config_with("rewardstr", reward="aesthetic")), r"config error at reward: "),
    "dtype-unknown": (lambda c: c.train("model.dtype=float8"), r"model\.dtype: .*'float32'.*'float8'"),
    # ranges
    "negative-lr": (lambda c: c.train("training.learning_rate=-1e-4"), r"training\.learning_rate: .*greater than 0 \(got '-1e-4'\)"),
    "eta-zero": (lambda c: c.train("sampling.eta=0"), r"sampling\.eta: .*greater than 0"),
    "eta-negative": (lambda c: c.train("sampling.eta=-0.5"), r"sampling\.eta: .*greater than 0 \(got -0\.5\)"),
    "timestep-fraction-zero": (lambda c: c.train("training.timestep_fraction=0"), r"training\.timestep_fraction: .*greater than 0"),
    "timestep-fraction-above-one": (lambda c: c.train("training.timestep_fraction=1.5"), r"timestep_fraction: .*less than or equal to 1"),
    "clip-range-zero": (lambda c: c.train("training.clip_range=0"), r"training\.clip_range: .*greater than 0"),
    "clip-range-negative": (lambda c: c.train("training.clip_range=-0.1"), r"training\.clip_range: .*greater than 0"),
    "reset-fraction-above-one": (lambda c: c.train("algorithm.reset.fraction=1.5"), r"algorithm\.reset\.fraction: .*less than or equal to 1"),
    "reset-fraction-negative": (lambda c: c.train("algorithm.reset.fraction=-0.2"), r"algorithm\.reset\.fraction: .*greater than or equal to 0"),
    "resolution-not-vae-multiple": (lambda c: c.train("sampling.resolution=33"),
                                    r"sampling\.resolution=33 must be a multiple of the VAE's downsampling factor 2; use e\.g\. 32"),
    "lora-rank-zero": (lambda c: c.train("model.lora_rank=0"), r"model\.lora_rank: .*greater than or equal to 1"),
    "indivisible-batch": (lambda c: c.train("training.batch_size=3"), r"training\.batch_size=3 must divide the 2 trajectories"),
    "template-without-slot": (lambda c: c.train("prompts.template='a photo'"), r"prompts\.template: template must contain '\{\}'"),
    # algorithms and rewards
    "unknown-algorithm": (lambda c: c.train("algorithm.name=ppo"), r"algorithm\.name: .*'ddpo'.*\(got 'ppo'\)"),
    "unknown-reward": (lambda c: c.train("reward.name=aesthetics"), r"unknown reward 'aesthetics' \(did you mean 'aesthetic'\?\)"),
    "unknown-reward-option": (lambda c: c.train("reward.options={gamma: 1}"), r"reward 'brightness' has no option 'gamma'"),
    "cdpo-without-constraints": (lambda c: c.train("algorithm.name=cdpo"), r"cdpo needs at least one entry in algorithm\.constraints"),
    "constraint-without-threshold": (lambda c: c.train(config=c.config_with("nothreshold", algorithm=_constraint())),
                                     r"constraint on 'jpeg_compressibility' needs exactly one of threshold"),
    "constraint-with-both-thresholds": (lambda c: c.train(config=c.config_with("both", algorithm=_constraint(threshold=1.0, relative_margin=0.1))),
                                        r"needs exactly one of threshold \(absolute\) or relative_margin"),
    "constraints-without-cdpo": (lambda c: c.train(config=c.config_with("ddpoc", algorithm={**_constraint(threshold=1.0), "name": "ddpo"})),
                                 r"constraints are only used by cdpo, not ddpo"),
    # config files and overrides
    "config-missing": (lambda c: ["train", "--config", str(c.root / "nope.yaml"), "--out", str(c.root / "x")],
                       r"config file .*nope\.yaml does not exist; pass --config"),
    "config-not-yaml": (lambda c: ["validate-config", "--config", str(c.write("broken.yaml", "model: [unclosed\n"))],
                        r"broken\.yaml is not valid YAML at line"),
    "config-not-mapping": (lambda c: ["validate-config", "--config", str(c.write("list.yaml", "- a\n- b\n"))],
                           r"config must be a YAML mapping"),
    # PyYAML raises AttributeError (not YAMLError) for a `!!timestamp` it cannot build: still one line, exit 2
    "override-tagged-unbuildable": (lambda c: c.train("training.epochs=!!timestamp a"),
                                    r"override 'training\.epochs=!!timestamp a': the value is not valid YAML .*quote it"),
    "config-tagged-unbuildable": (lambda c: ["validate-config", "--config", str(c.write("tagged.yaml", "training: {epochs: !!int x}\n"))],
                                  r"tagged\.yaml is not valid YAML \(a tagged value PyYAML cannot build: ValueError"),
    # strict where PyYAML and json are lax: a key given twice, NaN, a line break other than \n
    "config-duplicate-key": (lambda c: ["validate-config", "--config", str(c.write("dup.yaml", yaml.safe_dump(c.data) + "training: {seed: 2}\n"))],
                             r"dup\.yaml is not valid YAML at line \d+ \(duplicate key 'training' \(first at line \d+\); keep one\)"),
    "jsonl-duplicate-key": (lambda c: c.train(f"prompts.source={c.write('dup.jsonl', DUPLICATE_JSONL)}"),
                            r"dup\.jsonl line 1: the key 'prompt' appears twice; JSON Lines must be strict JSON"),
    "jsonl-nan": (lambda c: c.train(f"prompts.source={c.write('nan.jsonl', NAN_JSONL)}"), r"nan\.jsonl line 1: NaN is not JSON"),
    "txt-form-feed": (lambda c: c.train(f"prompts.source={c.write('ff.txt', FORM_FEED_TXT)}"),
                      r"ff\.txt line 1: the prompt 'a cat\\x0ca dog' contains a line break"),
    "override-without-value": (lambda c: c.train("training.epochs"), r"override 'training\.epochs' must look like section\.key=value"),
    # prompt files
    "empty-prompt-file": (lambda c: c.train(f"prompts.source={c.write('empty.txt', '')}"), r"empty\.txt holds no prompts; put one prompt per line"),
    "blank-prompt-file": (lambda c: c.train(f"prompts.source={c.write('blank.txt', BLANK)}"), r"blank\.txt holds no prompts"),
    "binary-prompt-file": (lambda c: c.train(f"prompts.source={c.write('binary.txt', bytes(range(256)))}"),
                           r"binary\.txt looks binary .*give a UTF-8 text file"),
    "prompt-set-unknown": (lambda c: c.train("prompts.source=animalz"), r"prompts\.source 'animalz' is neither a built-in set"),
    "prompt-too-long": (lambda c: c.train(f"prompts.source={c.write('long.txt', LONG)}"),
                        r"1 prompt\(s\) exceed the tokenizer's 77 tokens \(first: 'a cat a cat.*shorten them"),
    # models and checkpoints
    "model-dir-missing": (lambda c: c.train(f"model.source={c.root / 'no-such-model'}"), r"no-such-model does not exist; build one"),
    "model-tokenizer-config-missing": (_model_without_tokenizer_config,
                                       r"tokenizer's model_max_length \(1e\+30\) does not fit the text encoder's \d+ "
                                       r"positions .*re-save the pipeline"),
    "evaluate-checkpoint-junk-state": (_evaluate_damaged_trainer_state,
                                       r"epoch-000001: trainer_state\.json is not a JSON object \(damaged\); evaluate another"),
    "model-missing-component": (lambda c: c.train(f"model.source={c.model_no_vae}"),
                                r"model directory .*no-vae is missing the 'vae' component; re-save"),
    "checkpoint-other-lora-rank": (lambda c: c.resume("rank8", "model.lora_rank=8", "training.epochs=2"),
                                   r"trained with lora_rank=4, this config has 8; resume with the original config"),
    "checkpoint-other-model": (lambda c: c.resume("othermodel", f"model.source={c.model_copy}", "training.epochs=2"),
                               r"trained with model_source=.*this config has .*other-model.*use a new --out"),
    # rewards and devices
    "reward-tokenizer-past-embedding": (_reward_with_renamed_pad_token,
                                        r"reward 'clipscore' could not be loaded from .*renamed-pad.*the tokenizer has "
                                        r"\d+ tokens, more than the text encoder's \d+ embeddings"),
    "reward-nan": (lambda c: c.train("reward.name=aesthetic", f"reward.source={c.nan_reward}"),
                   r"reward 'aesthetic' returned 2 non-finite value\(s\) for prompts \['.+'\].*the step was refused"),
    "reward-inf": (lambda c: c.train("reward.name=aesthetic", f"reward.source={c.inf_reward}"),
                   r"reward 'aesthetic' returned 2 non-finite value\(s\) for prompts \['.+'\]"),
    # secrets: refused without being echoed back
    "credentials-in-model-url": (lambda c: c.train("model.source=https://user:p4ssw0rd@models.example.com/sd"),
                                 r"^(?!.*p4ssw0rd).*model\.source: https://\.\.\.@models\.example\.com: credentials do not "
                                 r"belong in a config .*pass them as environment variables"),
    "credentials-in-reward-option": (lambda c: c.train("reward.name=aesthetic", "reward.options={clip_source: 's3://AKIA:s3cr3t@b/clip'}"),
                                     r"^(?!.*s3cr3t).*reward\.options: s3://\.\.\.@b: credentials do not belong"),
    "reward-returns-text": (_reward_returning_text,
                            r"reward 'python:text_reward:labels' returned text \('good'\) where a score belongs; return one "
                            r"number per image"),
    # output directories and runs
    "train-out-is-a-file": (lambda c: c.train(out=c.write("a-file.txt", "x")),
                            r"--out .*a-file\.txt is a file, not a directory; give the path of a run directory"),
    "evaluate-run-without-a-run": (_evaluate_empty_run, r"--run .*empty-run holds no run \(no config\.yaml, no checkpoints/\)"),
    "cuda-without-cuda": (_cuda, r"device: cuda was requested but no CUDA GPU is visible; set device: cpu or auto"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_with_the_fix(ctx: Ctx, case: str) -> None:
    build, pattern = CASES[case]
    argv = build(ctx)
    result = run_cli(argv, timeout=120)
    lines = result.stderr_lines()
    assert result.returncode == 2, f"rc {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert not (ctx.root / "out" / "checkpoints").exists(), "a refused run must not write checkpoints"


def test_matrix_is_large_enough() -> None:
    assert len(CASES) >= 30
