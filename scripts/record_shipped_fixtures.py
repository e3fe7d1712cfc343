"""Record the shipped model's answers on a fixed handful of real CIFAR-10 test images, as test fixtures.

    .venv/bin/python scripts/record_shipped_fixtures.py [--data var/data] [--n 40]

Writes tests/fixtures/cifar10-test/<index>-<class>.png (the first n test images, PNG) and expected.json (the
shipped model's probabilities for each, through the service's own decode path). tests/service/
test_shipped_real.py checks that the committed model still gives these answers. Rerun after shipping a new model.
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
from models.shipped import SHIPPED_DIR, SHIPPED_ID  # noqa: E402
from service.images import ImageLimits, prepare  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "cifar10-test"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "var" / "data"))
    ap.add_argument("--n", type=int, default=40)
    a = ap.parse_args()
    test = load_cifar(a.data, "cifar10", train=False)
    model, meta = load_checkpoint(SHIPPED_DIR / SHIPPED_ID)
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.png"):
        old.unlink()
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
    doc = {"model": SHIPPED_ID, "sha256": meta["sha256"], "images": records}
    (OUT / "expected.json").write_text(json.dumps(doc, indent=1))
    right = sum(r["label"] == r["predicted"] for r in records)
    print(f"wrote {len(records)} fixtures to {OUT} ({right}/{len(records)} correct)")


if __name__ == "__main__":
    main()
