"""The optimization stage: PPO's clipped objective over shuffled (sample, step) pairs, the critic's
clipped value loss alongside (TDPO), gradient accumulation and clipping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rewardtune.faults import fault_point
from rewardtune.kl import gaussian_kl_same_std
from rewardtune.losses import ppo_clipped_loss, ppo_diagnostics
from rewardtune.lr_schedule import warmup_factor
from rewardtune.numerics import StepHealth
from rewardtune.temporal import clipped_value_loss
from rewardtune.training.logprob import PolicyDensity, flat_view, is_row_field, reference_policy
from rewardtune.training.rollout import EpochSamples
from rewardtune.training.setup import Progress, Run, epoch_seed


def row_fields(samples: EpochSamples) -> dict[str, torch.Tensor]:
    """The per-sample conditioning of an epoch: sd's two embeddings, or a flow family's dict as `cond.<key>`."""
    if samples.prompt_embeds is not None:
        return {"prompt_embeds": samples.prompt_embeds, "negative_embeds": samples.negative_embeds}
    return {f"cond.{key}": value for key, value in samples.conditioning.items()}


class PPOUpdate:
    """`train_epoch`: the inner epochs of PPO updates on one epoch's samples.

    Between inner epochs it calls `measure(epoch, inner, probe)` (TDPO's neuron scoring and resets, None
    without a critic) and after each optimizer step `safe_point(epoch)` (SIGTERM); `progress.global_step`
    counts the optimizer steps.
    """

    def __init__(self, run: Run, density: PolicyDensity, progress: Progress, safe_point: Callable[[int], None],
                 measure: Callable[[int, int, dict[str, torch.Tensor]], object] | None) -> None:
        self.run = run
        self.density = density
        self.progress = progress
        self.safe_point = safe_point
        self.measure = measure
        self.step_health = StepHealth(run.cfg.training.mixed_precision)
        self.probe: dict[str, torch.Tensor] = {}  # the last inner epoch's neuron-score probe

    def shuffled(self, samples: EpochSamples, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Shuffle samples, then the trainable steps of each sample independently (as DDPO and TDPO do).

        Only the trainable (stochastic) steps are permuted and kept: column j of the result is a trainable step.
        sd trains every step (the permutation is `randperm(K)` itself); flow models skip their ODE steps.
        """
        n, k = samples.timesteps.shape
        order = torch.randperm(n, generator=generator)
        steps = torch.as_tensor(self.run.trainable_steps)
        time_perm = torch.stack([steps[torch.randperm(len(steps), generator=generator)] for _ in range(n)])
        fields = {
            "latents": samples.latents,
            "next_latents": samples.next_latents,
            "timesteps": samples.timesteps,
            "log_probs": samples.log_probs,
            "advantages": samples.advantages,
            **({"sigmas": samples.sigmas, "sigmas_next": samples.sigmas_next} if samples.sigmas is not None else {}),
            **{name: value for name, value in samples.extras.items() if value.ndim >= 2 and value.shape[1] == k},
        }
        out: dict[str, torch.Tensor] = {}
        rows = torch.arange(n)[:, None]
        for name, value in fields.items():
            value = value[order.to(value.device)]
            out[name] = value[rows.to(value.device), time_perm.to(value.device)]
        for name, value in row_fields(samples).items():
            out[name] = value[order.to(value.device)]
        return out

    def _micro_steps(self, n: int) -> list[list[tuple[slice, int]]]:
        """(sample slice, time column) pairs in the loop order of the algorithm, `fused_steps` per UNet call.

        Fusing consecutive micro-steps of one optimizer step changes only the batch shape: every pair
        still weighs the same in the step's mean loss.
        """
        bs = self.run.cfg.training.batch_size
        batches = [slice(i, i + bs) for i in range(0, n, bs)]
        steps = range(self.run.num_train_steps)
        if self.run.time_major:
            pairs = [(b, j) for j in steps for b in batches]
        else:
            pairs = [(b, j) for b in batches for j in steps]
        fused = self.run.cfg.training.fused_steps
        return [pairs[i : i + fused] for i in range(0, len(pairs), fused)]

    def train_epoch(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        run = self.run
        cfg = run.cfg.training
        generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, run.accelerator.process_index) + 1)
        run.unet.train()
        models = [run.unet] if run.critics is None else [run.unet, run.critics.train()]
        critic_cfg = run.cfg.algorithm.critic
        stats: dict[str, list[torch.Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": []}
        if run.critics is not None:
            stats["critic_loss"] = []
        beta = run.cfg.algorithm.loss_kl_coef
        if beta > 0:
            stats["kl_to_reference"] = []
        from tqdm.auto import tqdm

        for inner in range(cfg.inner_epochs):
            if inner and self.measure is not None:  # official: measure (and reset) after every inner epoch; the last is the loop's
                self.measure(epoch, inner - 1, self.probe)
            batch = self.shuffled(samples, generator)
            for chunk in tqdm(self._micro_steps(len(samples)), desc="training", leave=False, disable=not run.progress_bars()):
                view = flat_view(batch, chunk)
                with run.accelerator.accumulate(*models):
                    log_prob, mean, std = self.density.posterior_of(view)
                    old = view["log_probs"]
                    loss = ppo_clipped_loss(log_prob, old, view["advantages"], cfg.clip_range)
                    total = loss
                    if beta > 0:  # GRPO's KL to the base policy, in the loss (Flow-GRPO's train.beta)
                        with torch.no_grad(), reference_policy(run) as reference:
                            ref_mean = self.density.posterior_of(view, reference)[1]
                        kl = gaussian_kl_same_std(mean, ref_mean, std).mean()
                        total = total + beta * kl
                        stats["kl_to_reference"].append(kl.detach())
                    if run.critics is not None:
                        values = run.critics(view["critic_inputs"])
                        value_loss = clipped_value_loss(values, view["old_values"], view["returns"], critic_cfg.value_clip)
                        total = total + critic_cfg.coef * value_loss  # keeps a loss KL term (GRPO-style) too
                        stats["critic_loss"].append(value_loss.detach())
                    run.accelerator.backward(total)
                    synced = run.accelerator.sync_gradients
                    if synced:
                        self.clip_gradients()
                        self.progress.global_step += 1
                        self.set_policy_learning_rate()
                        if run.critics is not None:
                            fault_point("critic_update")
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
                if synced:
                    fault_point("optimizer_step")
                    self.safe_point(epoch)
                stats["loss"].append(loss.detach())
                for name, value in ppo_diagnostics(log_prob.detach(), old, cfg.clip_range).items():
                    stats[name].append(value)
            self.probe = self._probe(batch)
        if run.critics is not None and critic_cfg.fit_passes > 0:
            stats["critic_fit_loss"] = [self.fit_critic(samples, generator)]
        means = torch.stack([torch.stack(values).mean() for values in stats.values()])
        means = run.accelerator.reduce(means, reduction="mean")  # every rank has as many micro-steps: the global mean
        return dict(zip(stats, means.tolist(), strict=True))

    def fit_critic(self, samples: EpochSamples, generator: torch.Generator) -> torch.Tensor:
        """`critic.fit_passes` critic-only passes over the epoch's (critic input, return) pairs, shuffled, on
        ½(V - R)²: the critic's inputs are cached, so it can see its data many times for the price of an MLP,
        where the PPO steps give it one look per pair. Returns the last pass's mean loss."""
        run, cfg = self.run, self.run.cfg.algorithm.critic
        steps = torch.as_tensor(run.trainable_steps)  # the steps the PPO value loss can train on (not flow's ODE steps)
        inputs = samples.extras["critic_inputs"][:, steps].flatten(0, 1)
        returns = samples.extras["returns"][:, steps].flatten(0, 1)
        undo = run.accelerator.gradient_accumulation_steps  # accelerator.backward divides by it; these steps do not accumulate
        losses: list[torch.Tensor] = []
        for _ in range(cfg.fit_passes):
            losses = []
            order = torch.randperm(len(inputs), generator=generator)
            for i in range(0, len(order), cfg.fit_batch_size):
                rows = order[i : i + cfg.fit_batch_size].to(inputs.device)
                loss = 0.5 * ((run.critics(inputs[rows]) - returns[rows]) ** 2).mean()
                run.accelerator.backward(loss * undo)
                run.accelerator.unscale_gradients()
                torch.nn.utils.clip_grad_norm_(run.critics.parameters(), run.cfg.training.max_grad_norm)
                run.optimizer.step()  # policy grads are None (zero_grad(set_to_none)): AdamW leaves the policy alone
                run.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
        return torch.stack(losses).mean()

    def _probe(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The neuron-score probe of the official code: the first `sampling.batch_size` samples of this inner
        epoch's shuffled buffer at the last trained time column (all processes' probes are gathered later)."""
        run = self.run
        rows = slice(0, run.cfg.sampling.batch_size)
        per_step = ["latents", "timesteps", *(["sigmas", "sigmas_next"] if run.is_flow else []),
                    *(["critic_inputs"] if run.critics is not None else [])]
        probe = {name: batch[name][rows, run.num_train_steps - 1] for name in per_step}
        probe |= {name: value[rows] for name, value in batch.items() if is_row_field(name)}
        return probe

    def set_policy_learning_rate(self) -> None:
        """The warm-up's rate for this optimizer step (`progress.global_step`, already counted); the critic's
        group keeps its constant rate."""
        t = self.run.cfg.training
        rate = t.learning_rate * warmup_factor(self.progress.global_step, t.lr_warmup_steps)
        for group in self.run.optimizer.param_groups:
            if group.get("name") != "critic":
                group["lr"] = rate

    def clip_gradients(self) -> None:
        """Unscale once (one optimizer, however many networks), then clip each network's norm separately.

        The official TDPO code unscales the critic twice under fp16; this does not.
        """
        run = self.run
        run.accelerator.unscale_gradients()
        norms = [torch.nn.utils.clip_grad_norm_(run.trainable, run.cfg.training.max_grad_norm)]
        if run.critics is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(run.critics.parameters(), run.cfg.training.max_grad_norm))
        self.step_health.record(norms)
