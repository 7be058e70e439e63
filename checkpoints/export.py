"""Serving artifacts: a self-contained directory a policy server (or `load_exported`) needs nothing else for.

    model.safetensors      EMA weights, unsharded, fp32
    config.json            {"model_type": "pi_behavior", "model_config": name, "model": architecture fields,
                            "train": the flattened training config}
    norm_stats.json        the normalisation statistics the model was trained with
    fast_tokenizer/        FAST tokenizer files (tokenizer.json, fast_config.json)
    serving.json           the policy server's inference-time control settings (serving/config.py)
    state.json             {"global_step": n, "mlflow_run_id": id of the training run (when tracked)}

Files are written to a local staging directory and uploaded, each atomically, with state.json last: a reader
that finds state.json finds a complete artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import shutil
import tempfile
import time
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from data_loaders import storage
from serving.config import SERVING_FILE, ServingConfig

MODEL_FILE, CONFIG_FILE, STATE_FILE, NORM_FILE, FAST_DIR = (
    "model.safetensors", "config.json", "state.json", "norm_stats.json", "fast_tokenizer")


def _copy_url(src: str, dst_local: str) -> None:
    fs, path = storage.resolve(src)
    if fs.isdir(path):
        fs.get(path, dst_local, recursive=True)
    else:
        fs.get(path, dst_local)


def export_artifact(out_url: str, *, state_dict: dict[str, torch.Tensor], model_config_name: str,
                    model_config: Any, train_config: dict[str, Any], norm_stats_url: str,
                    fast_tokenizer_url: str, step: int, keep_copy_in: str | None = None,
                    extra_state: dict[str, Any] | None = None,
                    serving_config: ServingConfig | None = None,
                    extra_files: dict[str, bytes] | None = None) -> str:
    """Write a serving artifact for `state_dict` to `out_url` (local or s3://); returns out_url.

    `extra_files` ({relative path: bytes}) are added to the artifact as they are (e.g. an imported checkpoint's
    original assets under openpi/); they may not replace one of the artifact's own files.

    With `keep_copy_in` (an empty local directory) the same files, state.json included, also stay there, e.g.
    for uploading to MLflow without reading the artifact back from object storage.
    """
    staging = keep_copy_in or tempfile.mkdtemp(prefix="b1k-export-")
    try:
        with _staging_errors(staging):
            _stage(staging, state_dict=state_dict, model_config_name=model_config_name, model_config=model_config,
                   train_config=train_config, norm_stats_url=norm_stats_url, fast_tokenizer_url=fast_tokenizer_url,
                   serving_config=serving_config)
            for rel, data in (extra_files or {}).items():
                dst = os.path.normpath(os.path.join(staging, rel))
                if not dst.startswith(os.path.join(staging, "")) or os.path.exists(dst):
                    raise ValueError(f"extra export file {rel!r} is outside the export or replaces one of its files")
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(dst, "wb") as f:
                    f.write(data)
        publish_staged(staging, out_url, step=step, extra_state=extra_state, keep_state_copy=bool(keep_copy_in))
    finally:
        if not keep_copy_in:
            shutil.rmtree(staging, ignore_errors=True)
    return out_url


def _stage(staging: str, *, state_dict: dict[str, torch.Tensor], model_config_name: str, model_config: Any,
           train_config: dict[str, Any], norm_stats_url: str, fast_tokenizer_url: str,
           serving_config: ServingConfig | None) -> None:
    save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state_dict.items()},
              os.path.join(staging, MODEL_FILE))
    config = {"model_type": "pi_behavior", "model_config": model_config_name,
              "model": dataclasses.asdict(model_config), "train": train_config}
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True, default=list)
    with open(os.path.join(staging, SERVING_FILE), "w") as f:
        f.write((serving_config or ServingConfig()).to_json())
    _copy_url(norm_stats_url, os.path.join(staging, NORM_FILE))
    _copy_url(fast_tokenizer_url, os.path.join(staging, FAST_DIR))


@contextlib.contextmanager
def _staging_errors(staging: str) -> Iterator[None]:
    """A full or read-only local scratch (where the files are staged) is one StorageWriteError line too.
    safetensors reports I/O failures as its own exception type, hence Exception and not only OSError."""
    try:
        yield
    except Exception as e:
        message = storage.storage_write_error(e, staging, what="the export's local staging copy")
        if message is None:
            raise
        raise storage.StorageWriteError(message) from e


def publish_staged(staging: str, out_url: str, *, step: int, extra_state: dict[str, Any] | None = None,
                   keep_state_copy: bool = False) -> None:
    """Upload every file of the local `staging` directory to `out_url`, then state.json ({**extra_state,
    "global_step": step}) atomically and last, so a reader that finds state.json finds a complete artifact.
    With `keep_state_copy` state.json is also written into `staging`.

    Full, read-only or forbidden storage raises storage.StorageWriteError naming the file; no temp file or
    partial file stays behind, and temp files of an earlier export killed mid-write are swept first."""
    started_at = time.time()
    fs, path = storage.resolve(out_url)
    files = sorted(os.path.relpath(os.path.join(d, n), staging) for d, _, names in os.walk(staging) for n in names)
    files = [f for f in files if f != STATE_FILE]
    for d in sorted({posixpath.dirname(f) for f in files}):  # temp files of an export killed mid-write
        storage.sweep_stale_temp_files(fs, storage.join(path, d) if d else path, started_at=started_at)
    state_path = storage.join(path, STATE_FILE)
    # Re-exporting over a complete export: withdraw its state.json first, or a reader would take the mix of old
    # and new files for a complete artifact while they are replaced.
    with storage.write_errors(fs, state_path):
        if fs.exists(state_path):
            fs.rm_file(state_path)
    for rel in files:  # each file appears complete or not at all (a full disk leaves no partial file)
        storage.put_file_atomic(fs, os.path.join(staging, rel), storage.join(path, rel))
    state = json.dumps({**(extra_state or {}), "global_step": int(step)}).encode()
    storage.write_bytes_atomic(fs, state_path, state)
    if keep_state_copy:
        with open(os.path.join(staging, STATE_FILE), "wb") as f:
            f.write(state)


def read_export_state(url: str) -> dict[str, Any]:
    """state.json of a complete export, type-checked (checkpoints/export_reader.py)."""
    from checkpoints.export_reader import read_state

    return read_state(url)


def load_exported(url: str, *, device: str = "cpu"):
    """(PiBehavior with the exported weights and noise correlation, NormStats, FastTokenizer, config dict).

    `url`: a directory, s3:// prefix or registry URI (models:/NAME@alias). The config dict also carries the
    export's "global_step". Every file is checked as untrusted input first (checkpoints/export_reader.py).
    """
    from checkpoints.export_reader import load_pi_behavior

    return load_pi_behavior(url, device=device)
