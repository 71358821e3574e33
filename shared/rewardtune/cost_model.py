"""FLOPs and bytes of one RL epoch, per phase, from the model configs alone.

Why: a measured time only means something next to what the hardware could do. These pure functions
walk the same structure as diffusers' UNet2DConditionModel / AutoencoderKL decoder and transformers'
CLIP towers and count what `torch.utils.flop_counter.FlopCounterMode` counts: 2 FLOPs per
multiply-add of every convolution, linear layer and attention matmul (norms, activations and the
DDIM arithmetic are not counted; they are memory-bound and small). Backward passes count the
input gradients only where the input carries a gradient and the weight gradients only for trained
weights, as autograd computes them. Bytes are a lower bound of memory traffic: every weight read
once per call, every counted op's input and output touched once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Op:
    """One counted op: forward FLOPs, elements touched, weights, and which gradients autograd computes."""

    flops: float
    activations: float  # input + output elements
    weights: float = 0.0  # weight elements read
    input_grad: bool = False  # grad w.r.t. its (activation) inputs is computed
    weight_grad: bool = False  # grad w.r.t. its weights is computed
    backward_flops: float | None = None  # overrides the rule above (attention matmuls, LoRA)

    def backward(self) -> float:
        if self.backward_flops is not None:
            return self.backward_flops
        return self.flops * (int(self.input_grad) + int(self.weight_grad))


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes * k)


def forward_cost(ops: Iterable[Op], bytes_per_element: int) -> Cost:
    ops = list(ops)
    return Cost(sum(o.flops for o in ops), bytes_per_element * sum(o.activations + o.weights for o in ops))


def train_cost(ops: Iterable[Op], bytes_per_element: int) -> Cost:
    """Forward plus backward; backward touches each op's activations and weights about twice."""
    ops = list(ops)
    flops = sum(o.flops + o.backward() for o in ops)
    touched = sum((o.activations + o.weights) * (1 + 2 * (o.backward() > 0)) for o in ops)
    return Cost(flops, bytes_per_element * touched)


# ---------------------------------------------------------------------------------- building blocks
def conv(n: int, c_in: int, c_out: int, k: int, h_in: int, w_in: int, stride: int = 1, grad: bool = False,
         train: bool = False) -> tuple[Op, int, int]:
    """A k x k convolution with 'same' padding; returns the op and the output size."""
    h, w = -(-h_in // stride), -(-w_in // stride)
    op = Op(2.0 * n * c_in * c_out * k * k * h * w, n * (c_in * h_in * w_in + c_out * h * w), c_in * c_out * k * k,
            input_grad=grad, weight_grad=train)
    return op, h, w


def linear(m: int, k: int, n: int, grad: bool = False, train: bool = False) -> Op:
    """x[m, k] @ W[k, n]."""
    return Op(2.0 * m * k * n, m * (k + n), k * n, input_grad=grad, weight_grad=train)


def matmul(batch: int, m: int, k: int, n: int, grads: int) -> Op:
    """An activation-by-activation matmul (attention); `grads` of its two operands need gradients."""
    flops = 2.0 * batch * m * k * n
    return Op(flops, batch * (m * k + k * n + m * n), backward_flops=flops * grads)


def lora_pair(m: int, k: int, n: int, rank: int, x_grad: bool) -> Op:
    """The LoRA branch (x A) B of an adapted linear: dB, d(xA) and dA always; dx only if x carries a gradient."""
    down, up = 2.0 * m * k * rank, 2.0 * m * rank * n
    return Op(down + up, m * (k + 2 * rank + n), rank * (k + n), backward_flops=2 * up + down + (down if x_grad else 0.0))


@dataclass
class _Walk:
    """State of a walk through a network: which activations carry gradients, and the ops so far."""

    n: int
    train: str | None = None  # None (inference), "lora" or "full"
    rank: int = 4
    targets: tuple[str, ...] = LORA_TARGETS
    grad: bool = False  # the current hidden state carries a gradient
    ops: list[Op] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return self.train == "full"

    def conv(self, c_in: int, c_out: int, k: int, h: int, w: int, stride: int = 1) -> tuple[int, int]:
        op, h, w = conv(self.n, c_in, c_out, k, h, w, stride, grad=self.grad, train=self.full)
        self.ops.append(op)
        self.grad = self.grad or self.full
        return h, w

    def linear(self, m: int, k: int, n: int, name: str = "", x_grad: bool | None = None) -> bool:
        """A linear layer (LoRA-adapted if `name` is a target); returns whether its output carries a gradient."""
        x_grad = self.grad if x_grad is None else x_grad
        self.ops.append(linear(m, k, n, grad=x_grad, train=self.full))
        if self.train == "lora" and name in self.targets:
            self.ops.append(lora_pair(m, k, n, self.rank, x_grad))
            return True
        return x_grad or self.full

    def attention(self, tokens: int, context: int, dim: int, context_dim: int) -> None:
        """q from the hidden state, k/v from the context (the hidden state itself if context_dim is 0),
        the two attention matmuls (summed over heads they are head-count free), the output projection, the residual."""
        m = self.n * tokens
        self_attention = context_dim == 0
        ctx_rows, ctx_dim = (m, dim) if self_attention else (self.n * context, context_dim)
        ctx_grad = self.grad if self_attention else False  # the text context never carries a gradient
        q = self.linear(m, dim, dim, "to_q")
        k = self.linear(ctx_rows, ctx_dim, dim, "to_k", x_grad=ctx_grad)
        v = self.linear(ctx_rows, ctx_dim, dim, "to_v", x_grad=ctx_grad)
        keys = tokens if self_attention else context
        self.ops.append(matmul(self.n, tokens, dim, keys, int(q) + int(k)))
        self.ops.append(matmul(self.n, tokens, keys, dim, int(q or k) + int(v)))
        residual = self.grad
        self.grad = q or k or v
        self.grad = self.linear(m, dim, dim, "to_out.0") or residual


def _resnet(walk: _Walk, c_in: int, c_out: int, h: int, w: int, temb: int | None) -> None:
    """conv1, + time-embedding projection, conv2, + shortcut (a 1x1 conv when the channels change)."""
    grad_in = walk.grad
    walk.conv(c_in, c_out, 3, h, w)
    if temb:
        walk.ops.append(linear(walk.n, temb, c_out, grad=walk.full, train=walk.full))
    walk.conv(c_out, c_out, 3, h, w)
    after = walk.grad
    if c_in != c_out:
        walk.grad = grad_in
        walk.conv(c_in, c_out, 1, h, w)
    walk.grad = after or grad_in


def _transformer(walk: _Walk, c: int, h: int, w: int, context: int, context_dim: int, layers: int) -> None:
    """proj_in, (self-attention, cross-attention, GEGLU feed-forward) x layers, proj_out, + residual."""
    tokens = h * w
    grad_in = walk.grad
    walk.conv(c, c, 1, h, w)  # proj_in: a 1x1 conv or a linear, the same count
    for _ in range(layers):
        walk.attention(tokens, tokens, c, 0)
        walk.attention(tokens, context, c, context_dim)
        before = walk.grad
        walk.linear(walk.n * tokens, c, 8 * c, "ff.net.0.proj")  # GEGLU: two 4c halves
        walk.linear(walk.n * tokens, 4 * c, c, "ff.net.2")
        walk.grad = walk.grad or before
    walk.conv(c, c, 1, h, w)
    walk.grad = walk.grad or grad_in


def _per_block(value, count: int) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [value] * count


def unet_ops(config: Mapping, batch: int, height: int, width: int, context: int, train: str | None = None,
             rank: int = 4, targets: Iterable[str] = LORA_TARGETS) -> list[Op]:
    """Every counted op of one UNet2DConditionModel forward on latents [batch, C, height, width]."""
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type"):
        if config.get(key):
            raise ValueError(f"cost model: UNet config {key}={config[key]!r} is not modelled (SD 1.x/2.x UNets only)")
    channels = list(config["block_out_channels"])
    levels = len(channels)
    layers = _per_block(config.get("layers_per_block", 2), levels)
    depth = _per_block(config.get("transformer_layers_per_block", 1), levels)
    ctx_dim = config["cross_attention_dim"]
    temb = 4 * channels[0]
    walk = _Walk(batch, train, rank, tuple(targets))
    walk.ops.append(linear(batch, channels[0], temb, train=walk.full))
    walk.ops.append(linear(batch, temb, temb, grad=walk.full, train=walk.full))
    h, w = walk.conv(config["in_channels"], channels[0], 3, height, width)
    skips = [(channels[0], h, w, walk.grad)]
    for i, kind in enumerate(config["down_block_types"]):
        c_in = channels[max(i - 1, 0)]
        for j in range(layers[i]):
            _resnet(walk, c_in if j == 0 else channels[i], channels[i], h, w, temb)
            if kind.startswith("CrossAttn"):
                _transformer(walk, channels[i], h, w, context, ctx_dim, depth[i])
            skips.append((channels[i], h, w, walk.grad))
        if i < levels - 1:
            h, w = walk.conv(channels[i], channels[i], 3, h, w, stride=2)
            skips.append((channels[i], h, w, walk.grad))
    mid = channels[-1]
    _resnet(walk, mid, mid, h, w, temb)
    _transformer(walk, mid, h, w, context, ctx_dim, depth[-1])
    _resnet(walk, mid, mid, h, w, temb)
    reversed_channels = channels[::-1]
    up_layers = layers[::-1]
    up_depth = depth[::-1]
    for i, kind in enumerate(config["up_block_types"]):
        prev, out = reversed_channels[max(i - 1, 0)], reversed_channels[i]
        for j in range(up_layers[i] + 1):
            skip_c, _, _, skip_grad = skips.pop()
            walk.grad = walk.grad or skip_grad
            _resnet(walk, (prev if j == 0 else out) + skip_c, out, h, w, temb)
            if kind.startswith("CrossAttn"):
                _transformer(walk, out, h, w, context, ctx_dim, up_depth[i])
        if i < levels - 1:
            h, w = walk.conv(out, out, 3, 2 * h, 2 * w)
    walk.conv(channels[0], config["out_channels"], 3, h, w)
    return walk.ops


def vae_decoder_ops(config: Mapping, batch: int, latent_h: int, latent_w: int) -> list[Op]:
    """AutoencoderKL.decode: post_quant_conv, decoder (mid block with one single-head attention), conv_out."""
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    latent = config["latent_channels"]
    walk = _Walk(batch)
    h, w = walk.conv(latent, latent, 1, latent_h, latent_w)
    h, w = walk.conv(latent, channels[-1], 3, h, w)
    c = channels[-1]
    _resnet(walk, c, c, h, w, None)
    walk.attention(h * w, h * w, c, 0)
    _resnet(walk, c, c, h, w, None)
    reversed_channels = channels[::-1]
    for i in range(len(channels)):
        prev, out = reversed_channels[max(i - 1, 0)], reversed_channels[i]
        for j in range(layers + 1):
            _resnet(walk, prev if j == 0 else out, out, h, w, None)
        if i < len(channels) - 1:
            h, w = walk.conv(out, out, 3, 2 * h, 2 * w)
    walk.conv(channels[0], config["out_channels"], 3, h, w)
    return walk.ops


def clip_tower_ops(config: Mapping, batch: int, tokens: int | None = None, projection_dim: int | None = None) -> list[Op]:
    """A CLIP vision (patch embedding + class token) or text transformer, with its projection if given."""
    d, inner, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    walk = _Walk(batch)
    if tokens is None:  # vision: patches + the class token
        patch, size = config["patch_size"], config["image_size"]
        grid = size // patch
        op, _, _ = conv(batch, config.get("num_channels", 3), d, patch, size, size, stride=patch)
        walk.ops.append(Op(op.flops, op.activations, op.weights))
        tokens = grid * grid + 1
    m = batch * tokens
    for _ in range(n_layers):
        for _qkv in range(3):
            walk.ops.append(linear(m, d, d))
        walk.ops.append(matmul(batch, tokens, d, tokens, 0))
        walk.ops.append(matmul(batch, tokens, tokens, d, 0))
        walk.ops += [linear(m, d, d), linear(m, d, inner), linear(m, inner, d)]
    if projection_dim:
        walk.ops.append(linear(batch, d, projection_dim))
    return walk.ops


# ---------------------------------------------------------------------------------- the epoch
@dataclass(frozen=True)
class EpochShape:
    """What one RL epoch does, in counts."""

    images: int  # trajectories per epoch (per device)
    sample_batch: int
    steps: int  # denoising steps
    trained_steps: int  # timesteps trained per trajectory
    guidance: bool  # classifier-free guidance doubles every UNet batch
    latent_size: int
    context: int = 77  # text tokens
    inner_epochs: int = 1
    train_batch: int = 4
    fused_steps: int = 1
    finetune: str = "lora"
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = LORA_TARGETS
    critic_steps: int = 0  # denoising steps whose x_t is decoded and embedded for the critic (0: no critic)
    reward_tower: bool = False  # the reward embeds each image with the CLIP vision tower
    unique_prompts: int | None = None  # prompts text-encoded per epoch (default: one per image)


def epoch_cost(shape: EpochShape, unet: Mapping, vae: Mapping, text: Mapping | None = None,
               vision: Mapping | None = None, bytes_per_element: int = 2) -> dict[str, Cost]:
    """FLOPs and bytes of each phase of one epoch (per device)."""
    cfg = 2 if shape.guidance else 1
    lat = shape.latent_size
    b = bytes_per_element
    phases: dict[str, Cost] = {}
    if text is not None:
        prompts = shape.unique_prompts if shape.unique_prompts is not None else shape.images
        phases["text_encode"] = forward_cost(clip_tower_ops(text, 1, tokens=shape.context), b) * prompts
    per_call = forward_cost(unet_ops(unet, cfg * shape.sample_batch, lat, lat, shape.context), b)
    phases["sampling_unet"] = per_call * (shape.steps * shape.images / shape.sample_batch)
    decode = forward_cost(vae_decoder_ops(vae, 1, lat, lat), b)
    phases["vae_decode"] = decode * shape.images
    embed = forward_cost(clip_tower_ops(vision, 1), b) if vision is not None else Cost(0.0, 0.0)
    phases["reward"] = embed * shape.images if shape.reward_tower else Cost(0.0, 0.0)
    phases["critic_decode_embed"] = (decode + embed) * (shape.critic_steps * shape.images)
    rows = shape.train_batch * shape.fused_steps
    per_chunk = train_cost(unet_ops(unet, cfg * rows, lat, lat, shape.context, train=shape.finetune,
                                    rank=shape.lora_rank, targets=shape.lora_targets), b)
    pairs = shape.images * shape.trained_steps * shape.inner_epochs
    phases["training"] = per_chunk * (pairs / rows)
    return phases


def roofline_seconds(cost: Cost, peak_flops: float, peak_bytes_per_s: float) -> float:
    """The least time a phase can take on a device: bound by arithmetic or by memory, whichever is slower."""
    return max(cost.flops / peak_flops, cost.bytes / peak_bytes_per_s)
