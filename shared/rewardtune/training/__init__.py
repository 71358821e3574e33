"""The parts of `rewardtune.trainer.Trainer`, one job per module: `setup` (build the run), `rollout`
(sample and score), `estimators` (advantages), `optimize` (the PPO loop), `resets` (neuron resets and
dual ascent) and `lifecycle` (checkpoints, resume, SIGTERM, lock). `trainer.py` holds the loop."""
