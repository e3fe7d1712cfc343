"""Request and response bodies of the predict, models and health endpoints, with examples for /docs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class ClassScore(BaseModel):
    """One class and its probability."""

    name: str = Field(description="class name from the checkpoint", examples=["cat"])
    index: int = Field(description="class index (the model's output unit)", examples=[3])
    probability: float = Field(ge=0, le=1, description="softmax probability", examples=[0.87])


class ImagePrediction(BaseModel):
    """The top-k classes of one image."""

    image: int = Field(description="the image's position in the request, from 0", examples=[0])
    filename: str | None = Field(None, description="the uploaded file's name (multipart only)", examples=["cat.png"])
    top_k: list[ClassScore] = Field(description="the k most probable classes, most probable first")


class PredictResponse(BaseModel):
    """Predictions for every image of a request, in request order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "seed-reproduction",
                    "predictions": [
                        {
                            "image": 0,
                            "filename": "cat.png",
                            "top_k": [
                                {"name": "cat", "index": 3, "probability": 0.87},
                                {"name": "dog", "index": 5, "probability": 0.09},
                            ],
                        }
                    ],
                }
            ]
        }
    )

    model: str = Field(description="id of the model that answered", examples=["seed-reproduction"])
    predictions: list[ImagePrediction]


class PredictJSON(BaseModel):
    """The JSON form of POST /predict: images as base64 strings (data: URLs accepted)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": ["iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2j..."]}]},
    )

    images: list[Annotated[str, Field(min_length=1, json_schema_extra={"format": "base64-image"})]] = Field(
        min_length=1, description="base64-encoded image files (PNG, JPEG, ...)"
    )


class ModelSummary(BaseModel):
    """A checkpoint that can serve."""

    id: str = Field(examples=["seed-reproduction"])
    arch: str = Field(examples=["resnet18"])
    dataset: str | None = Field(None, examples=["cifar10"])
    num_classes: int = Field(examples=[10])
    accuracy: float | None = Field(None, description="test accuracy, else validation accuracy", examples=[0.851])
    epoch: int | None = Field(None, description="the training epoch the checkpoint is from", examples=[18])
    created: datetime = Field(description="when the checkpoint was written (UTC)")
    source: str = Field(description="run (a training run's best), registry (registry.json) or shipped")
    default: bool = Field(description="whether requests without `model=` use it")
    loaded: bool = Field(description="whether it is in memory now")


class ModelDetail(ModelSummary):
    """Everything a client needs to feed and read a model."""

    classes: list[str] = Field(examples=[["airplane", "automobile", "bird", "cat"]])
    input_size: int = Field(description="side of the square input the network sees", examples=[32])
    cam_layer: str = Field(
        description="the default layer of Grad-CAM, occlusion and the page: the deepest named layer whose map is "
        "at least 4x4 at input_size",
        examples=["layer4"],
    )
    mean: list[float] = Field(description="per-channel normalisation mean")
    std: list[float] = Field(description="per-channel normalisation std")
    metrics: dict[str, Any] = Field(default_factory=dict, description="the checkpoint's recorded metrics")
    config: dict[str, Any] = Field(default_factory=dict, description="the training config that made it")
    sha256: str | None = Field(None, description="sha256 of the weights file")
    card: dict[str, Any] | None = Field(
        None,
        description="model card (shipped models): data, recipe, wall time, hardware, test accuracy with and "
        "without flip TTA, per-class accuracy, known limits",
    )
    confusion: list[list[int]] | None = Field(None, description="test confusion matrix (rows: true class)")


class ModelList(BaseModel):
    """Every model that can serve, newest first, and which one is the default."""

    default: str | None = Field(description="the default model's id, or null when none exists yet")
    models: list[ModelSummary]


class Health(BaseModel):
    """Liveness: the process answers."""

    status: str = Field(examples=["ok"])


class Ready(BaseModel):
    """Readiness: each dependency and its state."""

    status: str = Field(examples=["ready"])
    checks: dict[str, str] = Field(examples=[{"model": "seed-reproduction loaded", "broker": "redis reachable"}])
