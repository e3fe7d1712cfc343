"""Method names, their parameters with bounds and defaults, and the checks that name the bad field."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.errors import InvalidArgument
from models.reverse import SHORTCUTS

METHODS = (
    "gradcam",
    "gradcampp",
    "guided_gradcam",
    "saliency",
    "smoothgrad",
    "integrated_gradients",
    "occlusion",
    "deconvnet",
    "guided_backprop",
)
# Other spellings people use; "gradcam++" needs %2B in a query string, hence the plain canonical name.
ALIASES = {"gradcam++": "gradcampp", "ig": "integrated_gradients", "guided": "guided_backprop"}
# Methods whose result depends on `layer` (the others ignore it).
LAYER_METHODS = ("gradcam", "gradcampp", "guided_gradcam", "occlusion")
BASELINES = ("black", "blur", "mean")
ACTIVITIES = ("max", "sum")


@dataclass(frozen=True)
class Param:
    """One method parameter: its default, and an inclusive numeric range or a set of choices."""

    default: int | float | str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, name: str, value: Any) -> int | float | str:
        """The value if valid for this parameter, else InvalidArgument naming `name`."""
        if isinstance(self.default, str):
            if value not in self.choices:
                raise InvalidArgument(f"{name} must be one of: {', '.join(self.choices)}; got {value!r}")
            return str(value)
        kind = "an integer" if isinstance(self.default, int) else "a number"
        ok_type = isinstance(value, int) if isinstance(self.default, int) else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            raise InvalidArgument(f"{name} must be {kind} in {self.lo}..{self.hi}; got {value!r}")
        assert self.lo is not None and self.hi is not None
        if not self.lo <= value <= self.hi:
            raise InvalidArgument(f"{name} must be in {self.lo}..{self.hi}; got {value!r}")
        return value if isinstance(self.default, int) else float(value)


CHUNK = Param(128, 1, 4096)  # inputs per forward pass: bounds memory, large enough to batch well on a CPU
SHORTCUT = Param("sum", choices=SHORTCUTS)
PARAMS: dict[str, dict[str, Param]] = {
    "gradcam": {},
    "gradcampp": {},
    "guided_gradcam": {"shortcut": SHORTCUT},
    "saliency": {},
    # sigma: the noise's standard deviation as a fraction of each image's value range (Smilkov et al.: 10-20%).
    "smoothgrad": {"samples": Param(25, 1, 256), "sigma": Param(0.15, 0.0, 1.0), "seed": Param(0, 0, 2**31 - 1)}
    | {"chunk": CHUNK},
    # blur_sigma: in input pixels.
    "integrated_gradients": {
        "steps": Param(32, 1, 512),
        "baseline": Param("black", choices=BASELINES),
        "blur_sigma": Param(4.0, 0.5, 16.0),
        "chunk": CHUNK,
    },
    "occlusion": {
        "patch": Param(8, 1, 32),
        "stride": Param(2, 1, 32),
        "activity": Param("max", choices=ACTIVITIES),
        "chunk": CHUNK,
    },
    "deconvnet": {"shortcut": SHORTCUT},
    "guided_backprop": {"shortcut": SHORTCUT},
}


def resolve_methods(methods: Sequence[str]) -> list[str]:
    """Canonical method names, aliases resolved and duplicates dropped, in the order given."""
    if isinstance(methods, str) or not methods:
        raise InvalidArgument(f"methods must be a non-empty list of: {', '.join(METHODS)}")
    names = [ALIASES.get(m, m) for m in methods]
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise InvalidArgument(f"unknown method {bad[0]!r}; choose from: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def resolve_params(method: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A method's parameters with defaults filled in, each checked; errors name `method.field`."""
    specs = PARAMS[ALIASES.get(method, method)]
    given = dict(given or {})
    unknown = sorted(set(given) - set(specs))
    if unknown:
        valid = ", ".join(specs) or "none"
        raise InvalidArgument(f"unknown parameter {method}.{unknown[0]}; valid parameters: {valid}")
    return {k: spec.check(f"{method}.{k}", given.get(k, spec.default)) for k, spec in specs.items()}


def check_target(target: int | Sequence[int] | None, n: int, num_classes: int) -> list[int] | None:
    """Validate `target` (None, one class for every image, or one per image) -> one index per image, or None."""
    if target is None:
        return None
    if isinstance(target, torch.Tensor):
        target = target.tolist()
    values: list[Any] = [target] * n if isinstance(target, numbers.Integral) else list(target)  # type: ignore[arg-type]
    if len(values) != n:
        raise InvalidArgument(f"target: need one class per image ({n}); got {len(values)}")
    # numbers.Integral: numpy integers count as indices too; bool does not, though Python says it is an int.
    bad = [t for t in values if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
    bad += [t for t in values if not bad and not 0 <= int(t) < num_classes]
    if bad:
        raise InvalidArgument(f"target must be a class index in 0..{num_classes - 1}; got {bad[0]!r}")
    return [int(t) for t in values]
