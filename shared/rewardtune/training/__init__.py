"""The stages of `rewardtune.trainer.Trainer`, one job per module, each a class given only what it needs:
`setup` (`build_run` → the shared `Run`), `logprob` (the policy's log-probs), `rollout` (sample and score),
`estimators` (advantages), `optimize` (the PPO loop), `resets` (neuron resets), `duals` (CDPO's dual ascent),
`checkpoints` (save, load, resume) and `lifecycle` (SIGTERM, lock). `trainer.py` composes them and holds the loop."""
