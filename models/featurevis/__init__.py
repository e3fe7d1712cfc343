"""Feature visualization: the image that drives a channel hardest, in the manner of Lucid/Lucent (Olah et al. 2017).

The image is parameterized in Fourier space: a spectrum per image and colour, scaled by 1/f (a natural image's
falloff, so Adam's equal steps per coefficient do not favour high frequencies), inverted with an orthonormal
irfft2 and divided by 4 (Lucid's constant). Its three colour planes are decorrelated: they are mixed by a square
root of the DATASET's own pixel colour covariance (`color_covariance`, recorded for CIFAR-10 in
CIFAR10_COLOR_COV), normalised so its largest column has unit norm, then a sigmoid maps them to [0, 1].

Each step the image sees transformation robustness (`Robustness`): it is padded with 0.5-grey, jittered, scaled
and rotated by one random affine per image (bilinear), and cropped back to its own size (Lucid's pad, jitter,
scale, rotate, jitter, with the crop added: a map position then means the same place of the optimized and the
returned image, which the neuron objective needs, and the mean over the map is taken over the image, not over a
grey frame). Then it passes through the model's own input transform (normalise with the checkpoint's mean/std,
bilinear upsampling to its input_size, as the service's eval transform does), so the image that is returned,
sent back to /featuremaps or /predict, is exactly what was optimized. Adam (lr 0.05) maximizes the objective.

Objectives on channel c of a named layer: `channel` (the mean of its map), `neuron` (its centre position),
`negative` (minus the mean: the image that drives it lowest), and diversity=k (k images per channel with Lucid's
penalty: the cosine similarity of the k images' Gram matrices of the layer's output, summed over pairs).

The zero-gradient trap: a named layer's output is post-ReLU, so a channel that starts at exactly zero (most do,
on a grey image) gives no gradient and the image stays grey. Here every objective reads the PRE-ReLU value of
the layer's last ReLU (the stem's bn1 output for conv1, `bn2(conv2(.)) + shortcut` of a stage's last block),
computed by `layer_pre_relu` without hooks (so a served model may run it from any thread). The reported
`activation` is the post-ReLU value, as /featuremaps shows it; the diversity Grams use the post-ReLU output too.

Batched: all images of a request optimize together in chunks (each image's loss on its own channel; the loss is
a sum, so no image's gradient depends on another's, and Adam is elementwise). Every image draws its initial
spectrum and its per-step transforms from its own generator seeded by (seed, channel, copy), so a result does
not depend on the batch or chunk it ran in, up to floating-point rounding in batched kernels (which the
optimization, like any, may amplify a little: compare results by quality, not bit for bit).

The steps run on a private copy of the network with every eval BN folded into its conv, in bf16 (weights cast
once, channels_last) where models.device.use_bf16 allows it (CUDA; a CPU with bf16 instructions), else in
float32. The returned values, and the last point of the history, are measured on the model itself in float32.

Modules: `image` (colour, Fourier parameterization, transforms, input transform), `network` (pre-ReLU value,
objectives, the folded copy), `optimize` (the batched optimization, `visualize`).
"""

from models.featurevis.image import (
    CIFAR10_COLOR_COV,
    FourierImage,
    Robustness,
    color_covariance,
    color_sqrt,
    model_input,
    robust_transform,
)
from models.featurevis.network import (
    OBJECTIVES,
    Objective,
    diversity_penalty,
    layer_pre_relu,
    layer_width,
    optimization_copy,
)
from models.featurevis.optimize import (
    DEFAULT_STEPS,
    DIVERSITY_WEIGHT,
    HISTORY_EVERY,
    LEARNING_RATE,
    MAX_DIVERSITY,
    FeatureVis,
    auto_chunk,
    visualize,
)

__all__ = [
    "CIFAR10_COLOR_COV",
    "DEFAULT_STEPS",
    "DIVERSITY_WEIGHT",
    "HISTORY_EVERY",
    "LEARNING_RATE",
    "MAX_DIVERSITY",
    "OBJECTIVES",
    "FeatureVis",
    "FourierImage",
    "Objective",
    "Robustness",
    "auto_chunk",
    "color_covariance",
    "color_sqrt",
    "diversity_penalty",
    "layer_pre_relu",
    "layer_width",
    "model_input",
    "optimization_copy",
    "robust_transform",
    "visualize",
]
