"""Record the shipped model's answers on a fixed handful of real CIFAR-10 test images, as test fixtures.

    .venv/bin/python scripts/record_shipped_fixtures.py [--data var/data] [--n 40] [--model ID]

Writes tests/fixtures/cifar10-test/<index>-<class>.png (the first n test images, PNG) and expected.json
(expected-<ID>.json for a shipped model other than the default): the model's probabilities for each, through the
service's own decode path. tests/service/test_shipped_real.py checks that each committed model still gives these
answers. Rerun after shipping a new model.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoints import load_checkpoint  # noqa: E402
from models.data import load_cifar  # noqa: E402
from models.shipped import SHIPPED_DIR, SHIPPED_ID, SHIPPED_IDS  # noqa: E402
from service.images import ImageLimits, prepare  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "cifar10-test"


def expected_name(model_id: str) -> str:
    """The fixture file of a shipped model's answers (the default model's keeps its first name)."""
    return "expected.json" if model_id == SHIPPED_ID else f"expected-{model_id}.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "var" / "data"))
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--model", default=SHIPPED_ID, choices=SHIPPED_IDS)
    a = ap.parse_args()
    test = load_cifar(a.data, "cifar10", train=False)
    model, meta = load_checkpoint(SHIPPED_DIR / a.model)
    OUT.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(a.n):
        label = int(test.labels[i])
        name = f"{i:04d}-{test.classes[label]}.png"
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(test.images[i].permute(1, 2, 0).numpy())).save(buf, "PNG", optimize=True)
        (OUT / name).write_bytes(buf.getvalue())
        with torch.inference_mode():
            probs = torch.softmax(model(prepare(buf.getvalue(), meta, ImageLimits())), 1)[0]
        records.append(
            {"file": name, "label": label, "predicted": int(probs.argmax()), "probabilities": probs.tolist()}
        )
    doc = {"model": a.model, "sha256": meta["sha256"], "images": records}
    (OUT / expected_name(a.model)).write_text(json.dumps(doc, indent=1))
    right = sum(r["label"] == r["predicted"] for r in records)
    print(f"wrote {len(records)} fixtures to {OUT} ({right}/{len(records)} correct)")


if __name__ == "__main__":
    main()
