"""The image side of feature visualization: the dataset's colour decorrelation, the 1/f Fourier parameterization,
the random transforms of each step and the model's own input transform."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.data import ArrayDataset, normalize
from models.errors import InvalidArgument

# RGB pixel covariance (values in [0, 1]) of CIFAR-10's training split (the first 45,000 training images, the
# project's default val_size=5000 held out), as color_covariance computes it.
CIFAR10_COLOR_COV = (
    (0.06108418, 0.05489455, 0.05076458),
    (0.05489455, 0.05937772, 0.05787856),
    (0.05076458, 0.05787856, 0.06850497),
)


@dataclass(frozen=True)
class Robustness:
    """The random transforms of each step: jitter in native pixels (each way), scale (+-) and rotation (+-).

    The grey padding is implied: whatever the transforms bring into the frame from outside the image is 0.5.
    """

    jitter: float = 2.0
    scale: float = 0.1
    degrees: float = 10.0


def color_covariance(ds: ArrayDataset, batch: int = 5000) -> torch.Tensor:
    """The (3, 3) float64 covariance of RGB pixel values in [0, 1] over every pixel of a uint8 dataset split."""
    if ds.images.dtype != torch.uint8 or ds.images.dim() != 4 or ds.images.shape[1] != 3 or len(ds) == 0:
        raise InvalidArgument(f"expected uint8 RGB images (N, 3, H, W); got {ds.images.dtype} {tuple(ds.images.shape)}")
    total = torch.zeros(3, dtype=torch.float64)
    outer = torch.zeros(3, 3, dtype=torch.float64)
    count = 0
    for start in range(0, len(ds), batch):
        x = ds.images[start : start + batch].permute(1, 0, 2, 3).reshape(3, -1).double().div_(255.0)
        total += x.sum(1)
        outer += x @ x.T
        count += x.shape[1]
    mean = total / count
    return (outer - count * torch.outer(mean, mean)) / (count - 1)


def color_sqrt(cov: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    """Lucid's decorrelation matrix: U sqrt(S) of the covariance, divided by its largest column norm (float32)."""
    c = torch.as_tensor(cov, dtype=torch.float64)
    if c.shape != (3, 3) or not torch.allclose(c, c.T):
        raise InvalidArgument(f"a colour covariance is a symmetric 3x3 matrix; got shape {tuple(c.shape)}")
    eigvals, eigvecs = torch.linalg.eigh(c)
    root = eigvecs * eigvals.clamp_min(0).sqrt()
    return (root / root.norm(dim=0).max()).float()


def rfft2d_freqs(h: int, w: int) -> torch.Tensor:
    """The spatial frequency magnitude of each rfft2 coefficient of an h x w image: (h, w // 2 + 1)."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


class FourierImage(torch.nn.Module):
    """N images as 1/f-scaled spectra in a decorrelated colour space; calling it gives RGB (N, 3, h, w) in [0, 1]."""

    def __init__(self, spectrum: torch.Tensor, size: tuple[int, int], color: torch.Tensor, decay: float = 1.0) -> None:
        super().__init__()
        h, w = size
        freqs = rfft2d_freqs(h, w)
        scale = 1.0 / freqs.clamp_min(1.0 / max(h, w)) ** decay
        self.size = size
        self.spectrum = torch.nn.Parameter(spectrum)  # (N, 3, h, w // 2 + 1, 2): real and imaginary parts
        self.scale: torch.Tensor
        self.color: torch.Tensor
        self.register_buffer("scale", scale[None, None, :, :, None].to(spectrum))
        self.register_buffer("color", color.to(spectrum))

    def forward(self) -> torch.Tensor:
        spec = torch.view_as_complex((self.spectrum * self.scale).contiguous())
        planes = torch.fft.irfft2(spec, s=self.size, norm="ortho") / 4.0
        return torch.sigmoid(torch.einsum("ij,njhw->nihw", self.color, planes))


def model_input(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], image_size: int, input_size: int
) -> torch.Tensor:
    """[0, 1] images at (a multiple of) the native size -> the network input: normalise, upsample bilinearly."""
    x = normalize(images, tuple(mean), tuple(std))
    if input_size != image_size:
        size = round(images.shape[-1] * input_size / image_size)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def robust_transform(images: torch.Tensor, params: torch.Tensor, rob: Robustness) -> torch.Tensor:
    """One random affine per image on a grey ground, same size out; params (N, 4) in [-1, 1]: scale, angle, dx, dy."""
    n, _, h, w = images.shape
    s = 1.0 + rob.scale * params[:, 0]
    a = params[:, 1] * math.radians(rob.degrees)
    cos, sin = torch.cos(a) * s, torch.sin(a) * s
    # Output pixel u samples input point A u + t, both in pixels from the centre (rescaled to normalised units).
    theta = torch.stack(
        [
            torch.stack([cos, -sin * h / w, 2 * rob.jitter * params[:, 2] / w], 1),
            torch.stack([sin * w / h, cos, 2 * rob.jitter * params[:, 3] / h], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    # Zeros outside around a 0.5 offset: whatever the affine brings in from outside the image is mid-grey.
    return F.grid_sample(images - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5
