"""Where and how the GPU benchmarks write their results: results/<name>-<device>-<date>.md beside a .json."""
from __future__ import annotations

import datetime
import json
import os


def write_results(out_dir: str, name: str, device: str, lines: list[str], data) -> str:
    """Write the report lines as <name>-<device>-<date>.md and data as the .json beside it; returns the .md path."""
    tag = device.replace("NVIDIA ", "").replace(" ", "-").lower()
    path = os.path.join(out_dir, f"{name}-{tag}-{datetime.date.today().isoformat()}.md")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(path[:-3] + ".json", "w") as f:
        json.dump(data, f, indent=1)
    return path
