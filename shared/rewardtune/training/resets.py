"""Between epochs: neuron scoring and resets (TDPO-R's dormant neurons, critic or policy LoRA) and CDPO's
dual ascent on the Lagrange multipliers.
"""

from __future__ import annotations

import os

import torch

from rewardtune import digests
from rewardtune.errors import CheckpointError, RewardtuneError
from rewardtune.faults import fault_point
from rewardtune.lagrangian import dual_scale
from rewardtune.neuron_reset import (
    dormant_mask,
    dormant_overlap,
    lora_pairs,
    neuron_scores,
    record_activations,
    reset_linear_neurons,
    reset_lora_neurons,
    select_neurons,
)
from rewardtune.training.optimize import is_row_field
from rewardtune.training.rollout import EpochSamples
from rewardtune.training.setup import epoch_seed


class ResetsAndDuals:
    """`measure_and_reset` (every inner epoch's probe) and `update_multipliers` (once per epoch)."""

    @property
    def measures_neurons(self) -> bool:
        """TDPO's critic neurons are measured (and logged) even without resets, as in the official code."""
        return self.cfg.algorithm.uses_critic

    def reset_due(self, epoch: int) -> bool:
        algo = self.cfg.algorithm
        return algo.uses_reset and (epoch + 1) % algo.reset.every == 0

    def _reset_layers(self) -> list[tuple[str, torch.nn.Linear, torch.nn.Linear, bool]]:
        """(name, layer, next layer, is_lora) for every layer whose neurons are scored (and can be reset)."""
        if self.cfg.algorithm.uses_reset and self.cfg.algorithm.reset.target == "policy_lora":
            if self.cfg.model.finetune != "lora":
                raise RewardtuneError("algorithm.reset.target: policy_lora needs model.finetune: lora")
            return [(name, down, up, True) for name, down, up in lora_pairs(self.policy)]
        critics = self.accelerator.unwrap_model(self.critics)
        layers = []
        for head_name, head in zip(critics.names, critics.heads, strict=True):
            linears = head.linears()
            layers += [(f"{head_name}.{i}", linears[i], linears[i + 1], False) for i in range(len(linears) - 1)]
        return layers

    def _global_scores(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        """Neuron scores over every process's probe, identical on every rank.

        The activations are all-gathered (as the official recycler does), scored, and rank 0's scores are
        broadcast, so the masks, the statistics and the reset agree bit for bit on every replica.
        """
        if self.accelerator.num_processes == 1:
            return [neuron_scores(a).cpu() for a in activations]
        from accelerate.utils import broadcast

        scores = [neuron_scores(self.accelerator.gather(a.contiguous())) for a in activations]
        return [s.cpu() for s in broadcast(scores, from_process=0)]

    @torch.no_grad()
    def measure_and_reset(self, epoch: int, reset: bool, inner: int = 0) -> dict[str, float]:
        """Score neurons on the inner epoch's probe; reset the selected ones if `reset`."""
        rules = self.cfg.algorithm.reset
        layers = self._reset_layers()
        modules = [down for _, down, _, _ in layers]
        probe = self.probe
        if layers and layers[0][3]:
            batch = {k: v if is_row_field(k) else v.unsqueeze(1) for k, v in probe.items() if k != "critic_inputs"}
            batch["next_latents"] = batch["latents"]
            acts = record_activations(modules, lambda: self.policy_log_prob(batch, slice(None), 0, self.policy))
        else:
            critics = self.accelerator.unwrap_model(self.critics).eval()
            acts = record_activations(modules, lambda: critics(probe["critic_inputs"]))
            critics.train()
        generator = torch.Generator().manual_seed(epoch_seed(self.cfg.training.seed, epoch, 0) + 2 + inner)
        total = dormant = resets = 0
        overlaps = []
        for (name, down, up, is_lora), scores in zip(layers, self._global_scores(acts), strict=True):
            dormant_now = dormant_mask(scores, rules.tau)
            overlaps.append(dormant_overlap(self.previous_dormant.get(name), dormant_now))
            self.previous_dormant[name] = dormant_now
            total += scores.numel()
            dormant += int(dormant_now.sum())
            if reset:
                mask = select_neurons(scores, rules.rule, rules.tau, rules.tau_high, rules.fraction)
                resets += int(mask.sum())
                if is_lora:
                    reset_lora_neurons(down, up, mask, self.optimizer.optimizer, generator)
                else:  # the critic's own init std 1/(d+1), d its input size, for every layer
                    std = self.accelerator.unwrap_model(self.critics).init_std
                    reset_linear_neurons(down, up, mask, self.optimizer.optimizer, generator, std)
                fault_point("reset")
        if reset:
            self._record_digests("reset", epoch)
        finite = [o for o in overlaps if o == o]
        return {"neurons_total": total, "neurons_dormant": dormant, "neurons_active": total - dormant,
                "dormant_fraction": dormant / max(total, 1), "dormant_overlap": sum(finite) / len(finite) if finite else None,
                "reset": reset, "neurons_reset": resets}

    def _record_digests(self, phase: str, epoch: int) -> None:
        """This replica's policy, critic and optimizer digests (only with RT_DIGEST_DIR: a test hook)."""
        if not os.environ.get(digests.DIGEST_ENV):
            return
        parts = {"policy": [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad],
                 "optimizer": digests.optimizer_tensors(self.optimizer.optimizer)}
        if self.critics is not None:
            parts["critic"] = list(self.accelerator.unwrap_model(self.critics).state_dict().items())
        digests.record(phase, epoch, self.accelerator.process_index, parts)

    # ------------------------------------------------------------------ constraints (CDPO)
    def update_multipliers(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        """Projected dual ascent on c_k - Ĵ_k once per epoch; relative thresholds come from epoch 0's base policy."""
        gathered = self.accelerator.gather(samples.extras["all_rewards"])
        means = gathered.mean(dim=0).tolist()[1:]
        for k, spec in enumerate(self.constraints):
            if self.thresholds[k] is None:
                if epoch != 0:
                    raise CheckpointError("relative CDPO thresholds are set at epoch 0; resume from a checkpoint that has them")
                self.thresholds[k] = means[k] - spec.relative_margin
        lagrange = self.cfg.algorithm.lagrange
        if lagrange.normalize == "base_std" and not self.dual.scales:
            if epoch != 0:
                raise CheckpointError("scale-free CDPO scales are set at epoch 0; resume from a checkpoint that has them")
            stds = gathered.std(dim=0).tolist()[1:] if gathered.shape[0] > 1 else [0.0] * len(self.constraints)
            self.dual.scales = [dual_scale(s, lagrange.scale_floor) for s in stds]
        self.dual.update(self.thresholds, means, lagrange.learning_rate, lagrange.pid_kp, lagrange.pid_kd)
        record = {}
        for k, spec in enumerate(self.constraints):
            name = spec.reward.name
            record |= {f"lambda_{name}": self.dual.multipliers[k], f"constraint_{name}": means[k],
                       f"threshold_{name}": self.thresholds[k]}
        return record

