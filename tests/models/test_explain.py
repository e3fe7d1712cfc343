"""Each explanation method against its definition on a trained model (float64), batching, hooks and bounds."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.checkpoints import load_checkpoint
from models.data import load_cifar, normalize
from models.errors import InvalidArgument, UnknownLayer
from models.explain import METHODS, Explanation, explain
from models.explain.gradients import gaussian_blur
from models.explain_render import figure_png, heatmap_png, overlay_png
from models.hooks import count_hooks
from models.resnet import ResNet18, layer_module
from models.reverse import project_classes

FAST = {  # small settings so every method runs in well under a second on a shared CPU
    "smoothgrad": {"samples": 4},
    "integrated_gradients": {"steps": 8},
    "occlusion": {"patch": 8, "stride": 8},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(trained_home: Path, synthetic_data: Path) -> tuple[ResNet18, torch.Tensor, dict[str, Any]]:
    """The 1-epoch synthetic-task model in float64, and 3 of its test images, normalised."""
    model, meta = load_checkpoint(trained_home / "runs" / "tiny" / "checkpoints" / "best")
    raw = load_cifar(synthetic_data, "cifar10", train=False).images[:3]
    return model.double(), normalize(raw, meta["mean"], meta["std"]).double(), meta


def score_grad(model: ResNet18, x: torch.Tensor, targets: torch.Tensor, wrt_layer: str | None = None) -> Any:
    """Plain hooks + autograd: (activation, d score/d activation) at a layer, or d score/d input."""
    x = x.clone().requires_grad_(True)
    store: dict[str, torch.Tensor] = {}
    handle = layer_module(model, wrt_layer or "layer4").register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    score = logits[torch.arange(len(targets)), targets].sum()
    if wrt_layer is None:
        return torch.autograd.grad(score, x)[0]
    return store["a"].detach(), torch.autograd.grad(score, store["a"])[0]


def predicted(model: ResNet18, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.mark.parametrize("layer", ["conv1", "layer3", "conv5_x"])
def test_gradcam_and_gradcampp_equal_the_formulas(trained: Any, layer: str) -> None:
    model, x, _ = trained
    targets = predicted(model, x)  # the predicted class: its layer4 CAM is not all zero, so the check bites
    out = explain(model, x, ["gradcam", "gradcam++"], target=targets.tolist(), layer=layer)
    a, g = score_grad(model, x, targets, layer)
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    expected = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out["gradcam"].heatmap, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["gradcam"].extras["cam"], cam, rtol=1e-10, atol=1e-12)
    # Grad-CAM++ as pytorch-grad-cam writes it (their eps aside).
    aij = g**2 / (2 * g**2 + a.sum((2, 3), keepdim=True) * g**3)
    aij = torch.where(g != 0, aij, 0)
    cam_pp = F.relu(((F.relu(g) * aij).sum((2, 3), keepdim=True) * a).sum(1))
    torch.testing.assert_close(out["gradcampp"].extras["cam"], cam_pp, rtol=1e-10, atol=1e-12)
    assert out["gradcam"].layer == ("layer4" if layer == "conv5_x" else layer)
    assert out["gradcam"].heatmap.shape == (3, 32, 32) and float(cam.max()) > 0


def test_every_result_carries_the_shared_forward_probabilities(trained: Any) -> None:
    model, x, _ = trained
    found = explain(model, x, ["gradcam", "saliency"], target=2)
    with torch.no_grad():
        want = torch.softmax(model(x), 1)
    for e in found.values():
        assert e.probabilities is not None and e.probabilities.shape == (3, 10)
        torch.testing.assert_close(e.probabilities, want, rtol=1e-12, atol=1e-15)  # float64 model: the same pass


def test_saliency_equals_autograd_and_target_defaults_to_prediction(trained: Any) -> None:
    model, x, _ = trained
    out = explain(model, x, ["saliency"])["saliency"]
    pred = predicted(model, x)
    assert out.targets == pred.tolist()
    grad = score_grad(model, x, pred)
    assert out.attribution is not None
    torch.testing.assert_close(out.attribution, grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out.heatmap, grad.abs().amax(1))
    assert explain(model, x, ["saliency"], target=2)["saliency"].targets == [2, 2, 2]


def test_smoothgrad_is_the_mean_gradient_over_noisy_copies(trained: Any) -> None:
    model, x, _ = trained
    prm = {"samples": 3, "sigma": 0.2, "seed": 7, "chunk": 4}
    out = explain(model, x, ["smoothgrad", "saliency"], params={"smoothgrad": prm})
    noise = torch.randn((3, 3, 32, 32), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    targets = predicted(model, x)
    for i in range(3):
        std = 0.2 * float(x[i].max() - x[i].min())
        noisy = x[i : i + 1] + std * noise
        expected = score_grad(model, noisy, targets[i].repeat(3)).mean(0)
        torch.testing.assert_close(out["smoothgrad"].attribution[i], expected, rtol=1e-10, atol=1e-14)  # type: ignore[index]
    zero = explain(model, x, ["smoothgrad"], params={"smoothgrad": {"sigma": 0.0, "samples": 2}})["smoothgrad"]
    torch.testing.assert_close(zero.attribution, out["saliency"].attribution)


def test_integrated_gradients_definition_baselines_and_completeness(trained: Any) -> None:
    model, x, meta = trained
    targets = predicted(model, x)
    mean, std = meta["mean"], meta["std"]
    one = explain(model, x, ["ig"], params={"ig": {"steps": 1}}, mean=mean, std=std)["integrated_gradients"]
    black = -torch.tensor(mean, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)  # 0-pixel image
    x0 = black.view(1, 3, 1, 1).expand_as(x)
    torch.testing.assert_close(one.extras["baseline"], x0, rtol=1e-15, atol=0)
    expected = (x - x0) * score_grad(model, (x + x0) / 2, targets)  # one midpoint step
    torch.testing.assert_close(one.attribution, expected, rtol=1e-10, atol=1e-14)
    errors = {}
    for steps in (8, 64):
        ig = explain(model, x, ["ig"], params={"ig": {"steps": steps}}, mean=mean, std=std)["integrated_gradients"]
        with torch.no_grad():
            diff = model(x)[range(3), targets] - model(x0)[range(3), targets]
        total = ig.attribution.sum((1, 2, 3))  # type: ignore[union-attr]
        torch.testing.assert_close(ig.extras["completeness_error"], (total - diff).abs())
        errors[steps] = float(ig.extras["relative_error"].mean())
    assert errors[64] < errors[8] / 2, errors
    blur = explain(model, x, ["ig"], params={"ig": {"baseline": "blur", "steps": 2}})["integrated_gradients"]
    torch.testing.assert_close(blur.extras["baseline"], gaussian_blur(x, 4.0))
    grey = explain(model, x, ["ig"], params={"ig": {"baseline": "mean", "steps": 1}})["integrated_gradients"]
    assert not grey.extras["baseline"].any()  # the dataset mean is 0 after normalisation
    flat = torch.full((1, 3, 8, 8), 0.3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(flat, 16.0), flat)  # a blur keeps a constant image (radius > size)


def occlusion_reference(model: ResNet18, x: torch.Tensor, target: int, patch: int, stride: int, layer: str) -> Any:
    """One occluded image per forward, with a plain hook: (probabilities, max activity, top labels) per position."""
    store: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        handle = layer_module(model, layer).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        try:
            model(x[None])
            channel = int(store["a"][0].flatten(1).amax(1).argmax())
            rows = []
            for top in range(0, x.shape[1] - patch + 1, stride):
                for left in range(0, x.shape[2] - patch + 1, stride):
                    occluded = x.clone()
                    occluded[:, top : top + patch, left : left + patch] = 0
                    logits = model(occluded[None])[0]
                    rows.append(
                        (float(logits.softmax(0)[target]), float(store["a"][0, channel].max()), int(logits.argmax()))
                    )
        finally:
            handle.remove()
    probs, acts, tops = zip(*rows, strict=True)
    return torch.tensor(probs, dtype=torch.float64), torch.tensor(acts, dtype=torch.float64), torch.tensor(tops)


def test_occlusion_equals_one_patch_per_forward(trained: Any) -> None:
    model, x, _ = trained
    out = explain(model, x[:1], ["occlusion"], layer="layer3", params={"occlusion": {"patch": 10, "stride": 7}})
    e = out["occlusion"]
    prob, act, top = occlusion_reference(model, x[0], e.targets[0], 10, 7, "layer3")
    assert e.extras["probability"].shape == (1, 4, 4)
    torch.testing.assert_close(e.extras["probability"].flatten(), prob, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(e.extras["activity"].flatten(), act, rtol=1e-9, atol=1e-12)
    assert e.extras["top_label"].flatten().tolist() == top.tolist()


def test_occluding_what_is_already_grey_changes_nothing(trained: Any) -> None:
    model, x, _ = trained
    img = x[:1].clone()
    img[:, :, :8, :8] = 0  # the patch position (0, 0) now covers pixels that already equal the grey
    e = explain(model, img, ["occlusion"], params={"occlusion": {"patch": 8, "stride": 8}})["occlusion"]
    torch.testing.assert_close(e.extras["probability"][0, 0, 0], e.extras["base_probability"][0], rtol=1e-12, atol=0)
    assert float(e.heatmap[0, :8, :8].abs().max()) < 1e-12  # only that patch covers those pixels
    drops = e.extras["base_probability"][0] - e.extras["probability"][0]
    # Non-overlapping patches: each pixel's heatmap is its own patch's drop.
    expected = drops.repeat_interleave(8, 0).repeat_interleave(8, 1)
    torch.testing.assert_close(e.heatmap[0], expected)


def test_deconvnet_and_guided_backprop_equal_project_classes(trained: Any) -> None:
    model, x, _ = trained
    out = explain(model, x, ["deconvnet", "guided_backprop", "guided_gradcam", "gradcam"], target=[0, 5, 9])
    for method, rule in (("deconvnet", "deconvnet"), ("guided_backprop", "guided")):
        for i, t in enumerate([0, 5, 9]):
            ref = project_classes(model, x[i], [t], rule=rule).projections[0]  # type: ignore[arg-type]
            torch.testing.assert_close(out[method].attribution[i], ref, rtol=1e-10, atol=1e-14)  # type: ignore[index]
    guided = out["guided_backprop"].attribution
    assert guided is not None
    torch.testing.assert_close(out["guided_gradcam"].attribution, guided * out["gradcam"].heatmap[:, None])


def _same(a: Explanation, b: list[Explanation]) -> None:
    """A batched explanation equals the per-image ones stacked, field by field."""
    torch.testing.assert_close(a.heatmap, torch.cat([e.heatmap for e in b]), rtol=1e-9, atol=1e-12)
    assert a.targets == [t for e in b for t in e.targets]
    if a.attribution is not None:
        torch.testing.assert_close(a.attribution, torch.cat([e.attribution for e in b]), rtol=1e-9, atol=1e-12)  # type: ignore[misc]
    for k, v in a.extras.items():
        torch.testing.assert_close(v, torch.cat([e.extras[k] for e in b]), rtol=1e-9, atol=1e-12, msg=k)


def test_batched_equals_per_image_for_every_method(trained: Any) -> None:
    model, x, _ = trained
    batched = explain(model, x, list(METHODS), layer="layer3", params=FAST)
    singles = [explain(model, x[i : i + 1], list(METHODS), layer="layer3", params=FAST) for i in range(3)]
    assert list(batched) == list(METHODS)
    for m in METHODS:
        _same(batched[m], [s[m] for s in singles])
        assert batched[m].heatmap.shape == (3, 32, 32)


def test_hooks_released_and_model_state_restored(trained: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, _ = trained
    before = count_hooks(model)
    model.train()
    model.layer4.requires_grad_(False)  # a mixed state, to see it restored exactly
    try:
        eval_out = explain(model, x, ["gradcam", "occlusion", "saliency"], params={"occlusion": FAST["occlusion"]})
        assert count_hooks(model) == before
        assert model.training and model.bn1.training
        assert model.conv1.weight.requires_grad and not model.layer4[0].conv1.weight.requires_grad
        assert model.conv1.weight.grad is None  # no weight gradients computed or accumulated
        fc_forward = model.fc.forward

        def failing_fc(t: torch.Tensor, at_rows: int) -> torch.Tensor:
            if t.shape[0] == at_rows:
                raise RuntimeError("boom")
            return fc_forward(t)

        # Fail in the shared pass (3 rows), then inside occlusion's own recorder (3 images x 16 patches).
        for rows in (3, 48):
            with pytest.raises(RuntimeError, match="boom"), monkeypatch.context() as mp:
                mp.setattr(model.fc, "forward", lambda t, rows=rows: failing_fc(t, rows))
                explain(model, x, ["gradcam", "occlusion"], params={"occlusion": FAST["occlusion"]})
            assert count_hooks(model) == before and model.training
            assert not model.layer4[0].conv1.weight.requires_grad and model.conv1.weight.requires_grad
    finally:
        model.eval().requires_grad_(True)
    again = explain(model, x, ["gradcam"])["gradcam"]
    torch.testing.assert_close(again.heatmap, eval_out["gradcam"].heatmap)  # train mode did not leak into results


def test_works_for_a_caller_in_inference_mode_and_float32(trained: Any) -> None:
    model, x, _ = trained
    single = copy.deepcopy(model).float()
    with torch.inference_mode():
        xi = x.float().clone()
        out = explain(single, xi, ["saliency", "ig"], params={"ig": {"steps": 4}})
    reference = explain(model, x, ["saliency"])["saliency"].heatmap
    torch.testing.assert_close(out["saliency"].heatmap, reference.float(), rtol=1e-4, atol=1e-6)
    assert out["saliency"].heatmap.dtype == torch.float32 and torch.isfinite(out["saliency"].heatmap).all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"methods": ["ig"], "params": {"ig": {"steps": 0}}}, "integrated_gradients.steps"),
        ({"methods": ["ig"], "params": {"ig": {"steps": 513}}}, "integrated_gradients.steps"),
        ({"methods": ["ig"], "params": {"ig": {"baseline": "white"}}}, "integrated_gradients.baseline"),
        ({"methods": ["smoothgrad"], "params": {"smoothgrad": {"samples": 257}}}, "smoothgrad.samples"),
        ({"methods": ["smoothgrad"], "params": {"smoothgrad": {"samples": True}}}, "smoothgrad.samples"),
        ({"methods": ["smoothgrad"], "params": {"smoothgrad": {"sigma": 1.5}}}, "smoothgrad.sigma"),
        ({"methods": ["smoothgrad"], "params": {"smoothgrad": {"sigma": float("nan")}}}, "smoothgrad.sigma"),
        ({"methods": ["occlusion"], "params": {"occlusion": {"patch": 33}}}, "occlusion.patch"),
        ({"methods": ["occlusion"], "params": {"occlusion": {"stride": 0}}}, "occlusion.stride"),
        ({"methods": ["occlusion"], "params": {"occlusion": {"size": 4}}}, "occlusion.size"),
        ({"methods": ["gradcam"], "params": {"occlusion": {"patch": 4}}}, "occlusion"),
        ({"methods": ["gradcam"], "target": 10}, "target"),
        ({"methods": ["gradcam"], "target": -1}, "target"),
        ({"methods": ["gradcam"], "target": [1, 2]}, "target"),
        ({"methods": ["gradcam"], "target": True}, "target"),
        ({"methods": ["lime"]}, "lime"),
        ({"methods": []}, "methods"),
    ],
)
def test_invalid_arguments_name_the_field(trained: Any, kwargs: dict[str, Any], field: str) -> None:
    model, x, _ = trained
    before = count_hooks(model)
    with pytest.raises(InvalidArgument, match=field):
        explain(model, x, **kwargs)
    assert count_hooks(model) == before


def test_bad_layer_and_images(trained: Any) -> None:
    model, x, _ = trained
    with pytest.raises(UnknownLayer):
        explain(model, x, ["gradcam"], layer="layer9")
    with pytest.raises(InvalidArgument, match="images"):
        explain(model, x[0], ["gradcam"])
    with pytest.raises(InvalidArgument, match="images"):
        explain(model, (x * 10).to(torch.uint8), ["gradcam"])


def test_rendering(trained: Any) -> None:
    model, x, meta = trained
    out = explain(model, x[:1], ["gradcam", "occlusion"], params={"occlusion": FAST["occlusion"]})
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert Image.open(io.BytesIO(overlay_png(image, out["gradcam"].heatmap[0], "inferno"))).size == (128, 128)
    assert Image.open(io.BytesIO(heatmap_png(out["occlusion"].heatmap[0], size=64))).size == (64, 64)
    fig = Image.open(io.BytesIO(figure_png(image, out, 0, meta["classes"])))
    assert fig.size == (3 * (128 + 4) + 4, 26 + 4 + 2 * (128 + 4))
    with pytest.raises(InvalidArgument, match="colormap"):
        overlay_png(image, out["gradcam"].heatmap[0], "rainbow-unicorn")
