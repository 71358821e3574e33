"""The optimization stage: PPO's clipped objective over shuffled (sample, step) pairs, the critic's
clipped value loss alongside (TDPO), gradient accumulation and clipping.
"""

from __future__ import annotations

import torch

from rewardtune.diffusion import (
    ddim_step_with_logprob,
    guided_noise_pred,
)
from rewardtune.families.base import Step
from rewardtune.faults import fault_point
from rewardtune.losses import ppo_clipped_loss, ppo_diagnostics
from rewardtune.temporal import (
    clipped_value_loss,
)
from rewardtune.training.rollout import EpochSamples
from rewardtune.training.setup import epoch_seed


def is_row_field(name: str) -> bool:
    """Fields indexed by sample only (text conditioning); all others are [sample, step, ...]."""
    return name in ("prompt_embeds", "negative_embeds") or name.startswith("cond.")


def row_fields(samples: EpochSamples) -> dict[str, torch.Tensor]:
    """The per-sample conditioning of an epoch: sd's two embeddings, or a flow family's dict as `cond.<key>`."""
    if samples.prompt_embeds is not None:
        return {"prompt_embeds": samples.prompt_embeds, "negative_embeds": samples.negative_embeds}
    return {f"cond.{key}": value for key, value in samples.conditioning.items()}


class Optimization:
    """`train_epoch` and the batching it relies on."""

    def _shuffled(self, samples: EpochSamples, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Shuffle samples, then the trainable steps of each sample independently (as DDPO and TDPO do).

        Only the trainable (stochastic) steps are permuted and kept: column j of the result is a trainable step.
        sd trains every step (the permutation is `randperm(K)` itself); flow models skip their ODE steps.
        """
        n, k = samples.timesteps.shape
        order = torch.randperm(n, generator=generator)
        steps = torch.as_tensor(self.trainable_steps)
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
        bs = self.cfg.training.batch_size
        batches = [slice(i, i + bs) for i in range(0, n, bs)]
        steps = range(self.num_train_steps)
        if self.time_major:
            pairs = [(b, j) for j in steps for b in batches]
        else:
            pairs = [(b, j) for b in batches for j in steps]
        fused = self.cfg.training.fused_steps
        return [pairs[i : i + fused] for i in range(0, len(pairs), fused)]

    @staticmethod
    def _view(batch: dict[str, torch.Tensor], chunk: list[tuple[slice, int]]) -> dict[str, torch.Tensor]:
        """The (sample, step) pairs of a chunk as one flat batch."""
        out = {}
        for name, value in batch.items():
            if is_row_field(name):
                parts = [value[rows] for rows, _ in chunk]
            else:
                parts = [value[rows, j] for rows, j in chunk]
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out

    def log_prob_of(self, view: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """log pi(x_{t-1} | x_t) of each pair in a flat batch, recomputed with gradients."""
        model = model or self.unet
        if self.is_flow:
            return self._flow_log_prob(view, model)
        latents, timesteps = view["latents"], view["timesteps"]
        model_dtype = next(model.parameters()).dtype
        with self.accelerator.autocast():
            noise_pred = guided_noise_pred(
                model,
                self.scheduler.scale_model_input(latents, timesteps).to(model_dtype),
                timesteps,
                view["prompt_embeds"],
                view["negative_embeds"],
                self.cfg.sampling.guidance_scale,
            )
        _, log_prob = ddim_step_with_logprob(
            self.scheduler, noise_pred, timesteps, latents, eta=self.cfg.sampling.eta, prev_sample=view["next_latents"],
            check_std=not self.cfg.performance.sync_free_steps,  # the sampled schedule was checked once
        )
        return log_prob

    def _flow_log_prob(self, view: dict[str, torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
        """The flow family's log-prob at the stored per-sample (timestep, sigma, sigma') of trainable steps."""
        step = Step(-1, view["timesteps"], view["sigmas"], view["sigmas_next"], stochastic=True)
        cond = {name.removeprefix("cond."): value for name, value in view.items() if name.startswith("cond.")}
        with self.accelerator.autocast():
            out = self.family.forward(view["latents"], step, cond, self.cfg.sampling.guidance_scale, model=model)
        _, log_prob = self.family.step_with_logprob(out, step, view["latents"], prev=view["next_latents"])
        return log_prob

    def policy_log_prob(self, batch: dict[str, torch.Tensor], rows: slice, j: int, model: torch.nn.Module | None = None) -> torch.Tensor:
        return self.log_prob_of(self._view(batch, [(rows, j)]), model)

    def train_epoch(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        cfg = self.cfg.training
        generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, self.accelerator.process_index) + 1)
        self.unet.train()
        models = [self.unet] if self.critics is None else [self.unet, self.critics.train()]
        critic_cfg = self.cfg.algorithm.critic
        stats: dict[str, list[torch.Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": []}
        if self.critics is not None:
            stats["critic_loss"] = []
        from tqdm.auto import tqdm

        for inner in range(cfg.inner_epochs):
            if inner and self.measures_neurons:  # official: measure (and reset) after every inner epoch; the last is _run's
                self.measure_and_reset(epoch, self.reset_due(epoch), inner - 1)
            batch = self._shuffled(samples, generator)
            for chunk in tqdm(self._micro_steps(len(samples)), desc="training", leave=False, disable=not self._progress()):
                view = self._view(batch, chunk)
                with self.accelerator.accumulate(*models):
                    log_prob = self.log_prob_of(view)
                    old = view["log_probs"]
                    loss = ppo_clipped_loss(log_prob, old, view["advantages"], cfg.clip_range)
                    total = loss
                    if self.critics is not None:
                        values = self.critics(view["critic_inputs"])
                        value_loss = clipped_value_loss(values, view["old_values"], view["returns"], critic_cfg.value_clip)
                        total = loss + critic_cfg.coef * value_loss
                        stats["critic_loss"].append(value_loss.detach())
                    self.accelerator.backward(total)
                    synced = self.accelerator.sync_gradients
                    if synced:
                        self.clip_gradients()
                        self.global_step += 1
                        if self.critics is not None:
                            fault_point("critic_update")
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if synced:
                    fault_point("optimizer_step")
                    self.safe_point(epoch)
                stats["loss"].append(loss.detach())
                for name, value in ppo_diagnostics(log_prob.detach(), old, cfg.clip_range).items():
                    stats[name].append(value)
            self.probe = self._probe(batch)
        means = torch.stack([torch.stack(values).mean() for values in stats.values()])
        means = self.accelerator.reduce(means, reduction="mean")  # every rank has as many micro-steps: the global mean
        return dict(zip(stats, means.tolist(), strict=True))

    def _probe(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The neuron-score probe of the official code: the first `sampling.batch_size` samples of this inner
        epoch's shuffled buffer at the last trained time column (all processes' probes are gathered later)."""
        rows = slice(0, self.cfg.sampling.batch_size)
        per_step = ["latents", "timesteps", *(["sigmas", "sigmas_next"] if self.is_flow else []),
                    *(["critic_inputs"] if self.critics is not None else [])]
        probe = {name: batch[name][rows, self.num_train_steps - 1] for name in per_step}
        probe |= {name: value[rows] for name, value in batch.items() if is_row_field(name)}
        return probe

    def clip_gradients(self) -> None:
        """Unscale once (one optimizer, however many networks), then clip each network's norm separately.

        The official TDPO code unscales the critic twice under fp16; this does not.
        """
        self.accelerator.unscale_gradients()
        norms = [torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.training.max_grad_norm)]
        if self.critics is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(self.critics.parameters(), self.cfg.training.max_grad_norm))
        self.step_health.record(norms)

    def trained_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of everything the optimizer updates: what must stay finite."""
        named = [(n, p) for n, p in self.accelerator.unwrap_model(self.unet).named_parameters() if p.requires_grad]
        if self.critics is not None:
            named += [(f"critic.{n}", p) for n, p in self.accelerator.unwrap_model(self.critics).named_parameters()]
        return named

