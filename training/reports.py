"""What a run writes: JSON reports, atomically, and the summary of a dataset they carry."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medmpc.imaging.dataset import ImageSet


def write_json(obj: Any, path: Path) -> None:
    """Atomic JSON write: readers never see a half-written report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def dataset_summary(data: ImageSet) -> dict[str, Any]:
    return {
        "source": data.source,
        "synthetic": data.is_synthetic,
        "image_size": data.image_size,
        "n_images": len(data),
        "class_counts": data.class_counts(),
        "skipped_files": [str(p) for p in data.skipped],
    }
