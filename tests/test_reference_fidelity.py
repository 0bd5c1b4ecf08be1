"""Fidelity against the CFCD reference code itself: its own layer definitions (pycls ResNet,
MODEL_DEPLOY) with random weights saved as an official checkpoint, its own extraction procedure
(cv2, batch 1, one forward per scale), against `cfcd.models.create` + our fast extraction path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import _reference_cfcd as R  # noqa: E402

import cfcd.models  # noqa: E402
from cfcd.data.lists import ImageList  # noqa: E402
from cfcd.extract import ExtractOptions, Extractor  # noqa: E402


def test_cfcd_r50_descriptors_equal_the_reference_code(tmp_path, real_photos):
    torch.manual_seed(0)
    reference = R.randomise_(R.ModelDeploy())
    ckpt = tmp_path / "model_s2_0050.pyth"
    torch.save({"epoch": 49, "model_state": reference.state_dict(), "cfg": "MODEL:\n  ALGO: MODEL_S2\n"}, ckpt)

    # JPEGs of real photos, landscape and portrait, odd sizes (rounding of the scaled sizes matters)
    paths, boxes = [], []
    for name, (w, h) in zip(("coffee", "astronaut", "chelsea"), ((161, 121), (97, 143), (150, 113))):
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(real_photos[name]).resize((w, h), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
        boxes.append((10.7, 8.2, w - 12.5, h - 9.9))

    model = cfcd.models.create("cfcd_r50", weights=ckpt)  # strict: every reference tensor maps
    torch.set_num_threads(2)
    ours = Extractor(model, ExtractOptions(device="cpu", precision="fp32", workers=0, progress=False))
    for queries in (False, True):
        listing = ImageList(ids=[p.stem for p in paths], paths=paths, boxes=boxes if queries else None)
        got, failures, _ = ours.extract(listing)
        assert not failures
        for i, path in enumerate(paths):
            want = R.reference_extract(reference, str(path), boxes[i] if queries else None)
            cosine = float(np.dot(got[i], want))
            # the issue asks >= 0.9999; we get 1 to float rounding, so a tighter bound catches more
            # (e.g. RGB-ordered mean/std would give 0.99994 here, the round crop rule 0.99925)
            assert cosine >= 0.99999, (path.name, queries, cosine)
