"""Neuron scoring and resets (TDPO-R's dormant neurons, of the critic or the policy's LoRA) on each inner
epoch's probe, and the replica digests that prove every process reset the same neurons.
"""

from __future__ import annotations

import os

import torch

from rewardtune import digests
from rewardtune.errors import RewardtuneError
from rewardtune.faults import fault_point
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
from rewardtune.training.logprob import PolicyDensity, is_row_field
from rewardtune.training.setup import Run, epoch_seed


def record_digests(run: Run, phase: str, epoch: int) -> None:
    """This replica's policy, critic and optimizer digests (only with RT_DIGEST_DIR: a test hook)."""
    if not os.environ.get(digests.DIGEST_ENV):
        return
    parts = {"policy": [(n, p) for n, p in run.policy.named_parameters() if p.requires_grad],
             "optimizer": digests.optimizer_tensors(run.optimizer.optimizer)}
    if run.critics is not None:
        parts["critic"] = list(run.accelerator.unwrap_model(run.critics).state_dict().items())
    digests.record(phase, epoch, run.accelerator.process_index, parts)


class NeuronResets:
    """`measure_and_reset` on an inner epoch's probe; keeps the previous dormant masks (for their overlap)."""

    def __init__(self, run: Run, density: PolicyDensity) -> None:
        self.run = run
        self.density = density
        self.previous_dormant: dict[str, torch.Tensor] = {}

    def dormant_state(self) -> dict[str, list[bool]]:
        return {k: v.tolist() for k, v in self.previous_dormant.items()}

    def load_dormant_state(self, state: dict[str, list[bool]]) -> None:
        self.previous_dormant = {k: torch.tensor(v, dtype=torch.bool) for k, v in state.items()}

    @property
    def measures_neurons(self) -> bool:
        """TDPO's critic neurons are measured (and logged) even without resets, as in the official code."""
        return self.run.cfg.algorithm.uses_critic

    def reset_due(self, epoch: int) -> bool:
        algo = self.run.cfg.algorithm
        return algo.uses_reset and (epoch + 1) % algo.reset.every == 0

    def _reset_layers(self) -> list[tuple[str, torch.nn.Linear, torch.nn.Linear, bool]]:
        """(name, layer, next layer, is_lora) for every layer whose neurons are scored (and can be reset)."""
        if self.run.cfg.algorithm.uses_reset and self.run.cfg.algorithm.reset.target == "policy_lora":
            if self.run.cfg.model.finetune != "lora":
                raise RewardtuneError("algorithm.reset.target: policy_lora needs model.finetune: lora")
            return [(name, down, up, True) for name, down, up in lora_pairs(self.run.policy)]
        critics = self.run.accelerator.unwrap_model(self.run.critics)
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
        if self.run.accelerator.num_processes == 1:
            return [neuron_scores(a).cpu() for a in activations]
        from accelerate.utils import broadcast

        scores = [neuron_scores(self.run.accelerator.gather(a.contiguous())) for a in activations]
        return [s.cpu() for s in broadcast(scores, from_process=0)]

    @torch.no_grad()
    def measure_and_reset(self, epoch: int, reset: bool, inner: int, probe: dict[str, torch.Tensor]) -> dict[str, float]:
        """Score neurons on the inner epoch's `probe`; reset the selected ones if `reset`."""
        rules = self.run.cfg.algorithm.reset
        layers = self._reset_layers()
        modules = [down for _, down, _, _ in layers]
        if layers and layers[0][3]:
            batch = {k: v if is_row_field(k) else v.unsqueeze(1) for k, v in probe.items() if k != "critic_inputs"}
            batch["next_latents"] = batch["latents"]
            acts = record_activations(modules, lambda: self.density.policy_log_prob(batch, slice(None), 0, self.run.policy))
        else:
            critics = self.run.accelerator.unwrap_model(self.run.critics).eval()
            acts = record_activations(modules, lambda: critics(probe["critic_inputs"]))
            critics.train()
        generator = torch.Generator().manual_seed(epoch_seed(self.run.cfg.training.seed, epoch, 0) + 2 + inner)
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
                    reset_lora_neurons(down, up, mask, self.run.optimizer.optimizer, generator)
                else:  # the critic's own init std 1/(d+1), d its input size, for every layer
                    std = self.run.accelerator.unwrap_model(self.run.critics).init_std
                    reset_linear_neurons(down, up, mask, self.run.optimizer.optimizer, generator, std)
                fault_point("reset")
        if reset:
            record_digests(self.run, "reset", epoch)
        finite = [o for o in overlaps if o == o]
        return {"neurons_total": total, "neurons_dormant": dormant, "neurons_active": total - dormant,
                "dormant_fraction": dormant / max(total, 1), "dormant_overlap": sum(finite) / len(finite) if finite else None,
                "reset": reset, "neurons_reset": resets}

