"""All-or-nothing output: results are printed or written only once complete."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def emit_json(result: dict, out: str | None = None) -> None:
    text = json.dumps(result, indent=2, sort_keys=False)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)  # a failed run never leaves a partial file behind
    sys.stdout.write(text + "\n")
