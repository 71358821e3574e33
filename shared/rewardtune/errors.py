"""User-facing errors: one line that names the problem and the fix, shown without a traceback."""


class RewardtuneError(Exception):
    """An error caused by the user's input or environment, not by a bug in rewardtune."""


class ConfigError(RewardtuneError):
    """A config value is missing, unknown or out of range."""


class CheckpointError(RewardtuneError):
    """A checkpoint is missing, corrupt, or belongs to a different run."""


class RewardError(RewardtuneError):
    """A reward function returned unusable values (NaN/inf) or could not be built."""


class Terminated(RewardtuneError):
    """The run stopped on SIGTERM (pod eviction, preemption); `--resume` continues it bit-identically."""

    exit_code = 143  # 128 + SIGTERM, what a shell and Kubernetes report for a terminated process
