"""Check that a running service scores a bank's test images as the bank's report does.

Sends the image files behind ``report/test_scores_sample.json`` (the offline scores of the
first test images of an image-folder bank) to ``POST /v1/classify``, one raw image body
each, and compares the served prediction, trust and reject decision with the report's.
Exit status 0 when they agree, 1 when they do not, 2 on bad input.

    python scripts/check_served.py --bank banks/example --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

import numpy as np

from conceptguard.scoring import GRAPH_TOLERANCE

# the service scores in its float32 fused graph, the report in float64 numpy from the same
# served outputs: the agreement every bank's graph is checked to when it is written/loaded
TRUST_TOLERANCE = GRAPH_TOLERANCE


def sample_files(bank: Path) -> tuple[list[Path], dict]:
    """The test files of the bank's score sample, and the sample."""
    from conceptguard.data.image_folder import split_files

    manifest = json.loads((bank / "manifest.json").read_text())
    spec = manifest["data"]["spec"]
    if spec["source"] != "image_folder":
        raise ValueError(f"{bank} was built from {spec['source']!r}, not an image folder")
    sample = json.loads((bank / "report" / "test_scores_sample.json").read_text())
    _, files = split_files(Path(spec["root"]), spec["holdout_seed"], spec["holdout_fraction"])
    test_files = files["test"][0]
    return [test_files[i] for i in sample["test_indices"]], sample


def classify(url: str, path: Path) -> dict:
    suffix = path.suffix.lower().lstrip(".").replace("jpg", "jpeg")
    req = urllib.request.Request(f"{url}/v1/classify", data=path.read_bytes(), method="POST",
                                 headers={"Content-Type": f"image/{suffix}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bank", type=Path, required=True)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    args = p.parse_args(argv)
    try:
        files, sample = sample_files(args.bank)
    except (OSError, KeyError, ValueError) as exc:
        print(f"check_served: {exc}", file=sys.stderr)
        return 2
    served = [classify(args.url.rstrip("/"), f) for f in files]
    trust = np.array([r["trust"] for r in served])
    diff = float(np.abs(trust - np.array(sample["trust"])).max())
    same_class = [r["class_index"] for r in served] == sample["predictions"]
    same_reject = [r["reject"] for r in served] == sample["reject"]
    ok = same_class and same_reject and diff <= TRUST_TOLERANCE
    print(f"{len(files)} test images: predictions {'agree' if same_class else 'DIFFER'}, "
          f"reject decisions {'agree' if same_reject else 'DIFFER'}, largest trust difference "
          f"{diff:.2g} (tolerance {TRUST_TOLERANCE:.2g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
