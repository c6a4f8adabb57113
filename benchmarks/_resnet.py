"""ResNet-18, CIFAR variant, in Equinox: the model of `image_throughput.py`.

He et al., "Deep Residual Learning for Image Recognition" (2016), as it is usually adapted to
32x32 images: a 3x3 stem convolution with 64 channels and stride 1, no max-pool, four stages
of two `BasicBlock`s with 64, 128, 256 and 512 channels (strides 1, 2, 2, 2), BatchNorm after
every convolution, global average pooling and a linear head (11.2M parameters).

The model maps *one* `(channels, height, width)` image and the BatchNorm state to
`(logits, state)`; vmap it with `axis_name="batch"` (as `ClassificationExperiment` does with a
`state`). Convolutions run in `dtype` (`bfloat16` for mixed precision), BatchNorm, the
residual sums and the head in float32; parameters are always float32.
"""

import itertools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

BATCH_AXIS = "batch"


def batch_norm(channels: int) -> eqx.nn.BatchNorm:
    """BatchNorm over the vmapped `"batch"` axis, PyTorch's defaults (momentum 0.1)."""
    return eqx.nn.BatchNorm(channels, BATCH_AXIS, momentum=0.9, mode="batch")


class Conv(eqx.Module):
    """A bias-free square convolution of one image, padded to keep `size / stride` pixels,
    computed in a given dtype. Its weight starts at zero: see `kaiming_normal`."""

    weight: Float[Array, "out in k k"]
    stride: int = eqx.field(static=True)

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        self.weight = jnp.zeros((out_channels, in_channels, kernel, kernel))
        self.stride = stride

    def __call__(self, x: Float[Array, "c h w"], dtype) -> Array:
        pad = self.weight.shape[-1] // 2
        y = jax.lax.conv_general_dilated(
            x[None].astype(dtype),
            self.weight.astype(dtype),
            window_strides=(self.stride, self.stride),
            padding=[(pad, pad), (pad, pad)],
        )
        return y[0]


def kaiming_normal(tree: Any, key: PRNGKeyArray) -> Any:
    """Every `Conv` weight in `tree` drawn from He et al.'s normal (fan-out, ReLU gain), all
    from one draw cut into pieces: under `jit`, one draw compiles far faster than one per
    layer (seconds on a CPU)."""

    def is_conv(x):
        return isinstance(x, Conv)

    convs = [x for x in jax.tree.leaves(tree, is_leaf=is_conv) if is_conv(x)]
    shapes = [conv.weight.shape for conv in convs]
    sizes = [math.prod(shape) for shape in shapes]
    flat = jr.normal(key, (sum(sizes),))
    pieces = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
    weights = [
        math.sqrt(2.0 / (shape[0] * shape[2] * shape[3])) * piece.reshape(shape)
        for piece, shape in zip(pieces, shapes)
    ]
    return eqx.tree_at(
        lambda t: [x.weight for x in jax.tree.leaves(t, is_leaf=is_conv) if is_conv(x)],
        tree,
        weights,
    )


class BasicBlock(eqx.Module):
    """`relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))`; the shortcut is a strided
    1x1 convolution with BatchNorm when the shape changes, else the identity."""

    conv1: Conv
    bn1: eqx.nn.BatchNorm
    conv2: Conv
    bn2: eqx.nn.BatchNorm
    shortcut: tuple[Conv, eqx.nn.BatchNorm] | None

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        self.conv1 = Conv(in_channels, out_channels, 3, stride)
        self.bn1 = batch_norm(out_channels)
        self.conv2 = Conv(out_channels, out_channels, 3, 1)
        self.bn2 = batch_norm(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = (Conv(in_channels, out_channels, 1, stride), batch_norm(out_channels))
        else:
            self.shortcut = None

    def __call__(self, x: Array, state: eqx.nn.State, dtype) -> tuple[Array, eqx.nn.State]:
        y, state = self.bn1(self.conv1(x, dtype).astype(jnp.float32), state)
        y, state = self.bn2(self.conv2(jax.nn.relu(y), dtype).astype(jnp.float32), state)
        if self.shortcut is None:
            skip = x
        else:
            conv, bn = self.shortcut
            skip, state = bn(conv(x, dtype).astype(jnp.float32), state)
        return jax.nn.relu(y + skip), state


class ResNet(eqx.Module):
    """ResNet with `BasicBlock`s for 32x32 images (ResNet-18: `blocks=(2, 2, 2, 2)`,
    `widths=(64, 128, 256, 512)`).

    **Arguments:**

    - `num_classes`: the number of logits.
    - `blocks`, `widths`: blocks and channels of each stage; every stage after the first
      halves the resolution.
    - `dtype`: the dtype the convolutions compute in (`"float32"` or `"bfloat16"`).
    - `in_channels`: input channels.
    - `key`: PRNG key for the initial parameters.

    Build it with `eqx.nn.make_with_state(ResNet)(...)`, which also returns the BatchNorm state.
    """

    stem: Conv
    stem_bn: eqx.nn.BatchNorm
    stages: tuple[tuple[BasicBlock, ...], ...]
    head: eqx.nn.Linear
    dtype: str = eqx.field(static=True)

    def __init__(
        self,
        num_classes: int = 10,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        *,
        dtype: str = "float32",
        in_channels: int = 3,
        key: PRNGKeyArray,
    ):
        conv_key, head_key = jr.split(key)
        stem = Conv(in_channels, widths[0], 3, 1)
        self.stem_bn = batch_norm(widths[0])
        stages, channels = [], widths[0]
        for i, (depth, width) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(tuple(stage))
        self.stem, self.stages = kaiming_normal((stem, tuple(stages)), conv_key)
        self.head = eqx.nn.Linear(widths[-1], num_classes, key=head_key)
        self.dtype = str(jnp.dtype(dtype))

    def __call__(
        self, x: Float[Array, "c h w"], state: eqx.nn.State, *, key: PRNGKeyArray | None = None
    ) -> tuple[Float[Array, " classes"], eqx.nn.State]:
        dtype = jnp.dtype(self.dtype)
        x, state = self.stem_bn(self.stem(x, dtype).astype(jnp.float32), state)
        x = jax.nn.relu(x)
        for stage in self.stages:
            for block in stage:
                x, state = block(x, state, dtype)
        return self.head(jnp.mean(x, axis=(1, 2))), state
