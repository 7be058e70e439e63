"""`b1k-train import` of an X-VLA BEHAVIOR checkpoint directory (Hoshipu/xvla-behavior1k-checkpoints/<run>/:
model.safetensors with vendored Florence-2 names, config.json with num_tasks/num_skills, tokenizer files,
optimizer.pt, state.json) into a b1k-train X-VLA checkpoint directory.

The weights are loaded strictly by models/xvla/checkpoint.load_checkpoint (every tensor accounted for in its load
report; the prompt tables and the skill classifier must be in the file). optimizer.pt is never read here.
"""

from __future__ import annotations

import json
import os
import shutil

from data_loaders import storage

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                    "added_tokens.json")


def is_xvla_checkpoint(url: str) -> bool:
    """A directory whose config.json says model_type/type "xvla" (and which is no openpi checkpoint)."""
    try:
        fs, path = storage.resolve(url)
        doc = json.loads(fs.cat_file(storage.join(path, "config.json")))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "xvla" in (doc.get("model_type"), doc.get("type"))


def import_xvla(src: str, out: str) -> dict:
    """Load `src` strictly and write it as our X-VLA checkpoint directory `out` (local)."""
    from models.xvla.checkpoint import load_checkpoint, localize, save_checkpoint

    model, state = load_checkpoint(src)
    save_checkpoint(model, out, global_step=int(state.get("global_step", 0)))
    local = localize(src)
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(local, name)):
            shutil.copyfile(os.path.join(local, name), os.path.join(out, name))
    report = getattr(model, "load_report", None)
    summary = {"source": src, "format": "xvla", "global_step": int(state.get("global_step", 0))}
    if report is not None:
        summary.update(kept=len(report.kept), reinitialized=len(report.reinitialized), new=len(report.new),
                       dropped=len(report.dropped))
    return summary
