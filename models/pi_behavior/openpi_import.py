"""Import a 1st-place / openpi pi-behavior checkpoint into a b1k-train export (no JAX; docs/published_checkpoints.md).

Input, the layout `serve_b1k.py --policy.dir` reads (IliaLarchenko/behavior-1k-solution `training/checkpoints.py`):

    <ckpt>/params/                          orbax PyTree {"params": EMA parameters}, bf16 in the published files
    <ckpt>/assets/<asset_id>/norm_stats.json   {"norm_stats": {"state": ..., "actions": ...}} (shared/normalize.py)
    <ckpt>/assets/<asset_id>/fast_tokenizer/   the FAST processor's save_pretrained() files
    <ckpt>/train_state/                     optimizer state: never read

Output: a normal export (checkpoints/export.py) plus `openpi/` holding the source's norm_stats.json and FAST files
byte for byte and `openpi/import_report.json` (every source array -> our parameter, dtype and shape).

Parameters are mapped strictly: every array of the checkpoint must map to a parameter of the chosen architecture
and every parameter must be filled, with the shapes of the openpi tree (models/{gemma,siglip}.py of openpi and
models/pi_behavior.py of the 1st-place solution); otherwise one OpenpiImportError lists each problem by name.
Values are read (bf16 or fp32) and converted to float32 exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import torch

from data_loaders import storage
from data_loaders.behavior_facts import ACTION_DIM, ACTION_HORIZON, MAX_NUM_STAGES, MODEL_DIM, NUM_TASKS, STATE_DIM
from models.pi_behavior.config import PiBehaviorConfig
from models.pi_behavior.orbax_read import METADATA_FILE, OrbaxFormatError, OrbaxParams

log = logging.getLogger(__name__)

ASSET_ID = "IliaLarchenko/behavior_224_rgb"  # the asset id of the published checkpoints (training/config.py)
PARAMS_DIR, ASSETS_DIR = "params", "assets"
OPENPI_DIR = "openpi"  # in the export: the source's assets, verbatim, and the import report
REPORT_FILE = "import_report.json"
# FAST processor files carried over (data only; the processor's Python file is never copied nor run).
_FAST_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "preprocessor_config.json")
IGNORED = {"action_correlation_cholesky": "nnx.Intermediate; the correlation is read from norm_stats.json"}


class OpenpiImportError(ValueError):
    """The checkpoint does not fit: the message names every missing, unexpected or wrongly shaped array."""


# --- the parameter map ---------------------------------------------------------------------------------------

Fn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class Source:
    key: str  # path below the params root, '/'-joined (openpi's converter naming, e.g. PaliGemma/llm/...)
    shape: tuple[int, ...]
    targets: list[tuple[str, Fn]]  # (our state_dict name, source array -> our tensor's array)


def _t(a: np.ndarray) -> np.ndarray:
    return a.T


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _layers(n: int, name: Callable[[int], str], fn: Callable[[np.ndarray, int], np.ndarray]):
    return [(name(i), (lambda a, i=i: fn(a, i))) for i in range(n)]


def parameter_map(cfg: PiBehaviorConfig) -> list[Source]:
    """Every array of the published parameter tree for `cfg`, with its shape and the parameters it fills."""
    v, d, x = cfg.vision, cfg.vlm, cfg.expert
    src: list[Source] = []

    def add(key: str, shape: tuple[int, ...], targets: list[tuple[str, Fn]]) -> None:
        src.append(Source(key, tuple(shape), targets))

    # SigLIP So400m/14 (big_vision, scan=True: blocks stacked on axis 0), openpi models/siglip.py
    img, w, nv, hd = "PaliGemma/img", v.width, v.depth, v.width // v.num_heads
    p = v.patch_size
    add(f"{img}/embedding/kernel", (p, p, 3, w),
        [("vision_tower.embeddings.patch_embedding.weight", lambda a: a.transpose(3, 2, 0, 1))])
    add(f"{img}/embedding/bias", (w,), [("vision_tower.embeddings.patch_embedding.bias", _same)])
    add(f"{img}/pos_embedding", (1, v.num_patches, w),
        [("vision_tower.embeddings.position_embedding.weight", lambda a: a.reshape(v.num_patches, w))])
    blk = f"{img}/Transformer/encoderblock"
    lay = "vision_tower.layers"
    for ln, ours in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        for part, our_part in (("scale", "weight"), ("bias", "bias")):
            add(f"{blk}/{ln}/{part}", (nv, w), _layers(nv, lambda i, o=ours, q=our_part: f"{lay}.{i}.{o}.{q}",
                                                        lambda a, i: a[i]))
    for dense, ours, shape in (("Dense_0", "fc1", (w, v.mlp_dim)), ("Dense_1", "fc2", (v.mlp_dim, w))):
        add(f"{blk}/MlpBlock_0/{dense}/kernel", (nv, *shape),
            _layers(nv, lambda i, o=ours: f"{lay}.{i}.mlp.{o}.weight", lambda a, i: a[i].T))
        add(f"{blk}/MlpBlock_0/{dense}/bias", (nv, shape[1]),
            _layers(nv, lambda i, o=ours: f"{lay}.{i}.mlp.{o}.bias", lambda a, i: a[i]))
    mha = f"{blk}/MultiHeadDotProductAttention_0"
    for part, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        add(f"{mha}/{part}/kernel", (nv, w, v.num_heads, hd),
            _layers(nv, lambda i, o=ours: f"{lay}.{i}.self_attn.{o}.weight", lambda a, i: a[i].reshape(w, w).T))
        add(f"{mha}/{part}/bias", (nv, v.num_heads, hd),
            _layers(nv, lambda i, o=ours: f"{lay}.{i}.self_attn.{o}.bias", lambda a, i: a[i].reshape(-1)))
    add(f"{mha}/out/kernel", (nv, v.num_heads, hd, w),
        _layers(nv, lambda i: f"{lay}.{i}.self_attn.out_proj.weight", lambda a, i: a[i].reshape(w, w).T))
    add(f"{mha}/out/bias", (nv, w), _layers(nv, lambda i: f"{lay}.{i}.self_attn.out_proj.bias", lambda a, i: a[i]))
    add(f"{img}/Transformer/encoder_norm/scale", (w,), [("vision_tower.post_layernorm.weight", _same)])
    add(f"{img}/Transformer/encoder_norm/bias", (w,), [("vision_tower.post_layernorm.bias", _same)])
    add(f"{img}/head/kernel", (w, d.width), [("multi_modal_projector.weight", _t)])
    add(f"{img}/head/bias", (d.width,), [("multi_modal_projector.bias", _same)])

    # Gemma-2B + Gemma-300M expert in one scanned module, openpi models/gemma.py (expert names carry "_1")
    llm = "PaliGemma/llm"
    add(f"{llm}/embedder/input_embedding", (d.vocab_size, d.width), [("embed_tokens.weight", _same)])
    for suffix, g, ours in (("", d, "vlm_layers"), ("_1", x, "expert_layers")):
        n, k, e, wd, f = g.num_heads, g.num_kv_heads, g.head_dim, g.width, g.mlp_dim
        at = f"{llm}/layers/attn"
        add(f"{at}/q_einsum{suffix}/w", (g.depth, n, wd, e), _layers(
            g.depth, lambda i, o=ours: f"{o}.{i}.self_attn.q_proj.weight",
            lambda a, i, n=n, e=e, wd=wd: a[i].transpose(0, 2, 1).reshape(n * e, wd)))
        add(f"{at}/kv_einsum{suffix}/w", (g.depth, 2, k, wd, e), _layers(
            g.depth, lambda i, o=ours: f"{o}.{i}.self_attn.k_proj.weight",
            lambda a, i, k=k, e=e, wd=wd: a[i, 0].transpose(0, 2, 1).reshape(k * e, wd)) + _layers(
            g.depth, lambda i, o=ours: f"{o}.{i}.self_attn.v_proj.weight",
            lambda a, i, k=k, e=e, wd=wd: a[i, 1].transpose(0, 2, 1).reshape(k * e, wd)))
        add(f"{at}/attn_vec_einsum{suffix}/w", (g.depth, n, e, wd), _layers(
            g.depth, lambda i, o=ours: f"{o}.{i}.self_attn.o_proj.weight",
            lambda a, i, n=n, e=e, wd=wd: a[i].reshape(n * e, wd).T))
        add(f"{llm}/layers/mlp{suffix}/gating_einsum", (g.depth, 2, wd, f), _layers(
            g.depth, lambda i, o=ours: f"{o}.{i}.mlp.gate_proj.weight", lambda a, i: a[i, 0].T) + _layers(
            g.depth, lambda i, o=ours: f"{o}.{i}.mlp.up_proj.weight", lambda a, i: a[i, 1].T))
        add(f"{llm}/layers/mlp{suffix}/linear", (g.depth, f, wd), _layers(
            g.depth, lambda i, o=ours: f"{o}.{i}.mlp.down_proj.weight", lambda a, i: a[i].T))
        for norm, our_norm in (("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm")):
            if suffix == "":  # plain RMSNorm x * (1 + scale)
                add(f"{llm}/layers/{norm}/scale", (g.depth, wd), _layers(
                    g.depth, lambda i, o=ours, q=our_norm: f"{o}.{i}.{q}.weight", lambda a, i: a[i]))
            else:  # adaRMS: Dense(cond -> 3 * width) giving scale, shift, gate
                add(f"{llm}/layers/{norm}{suffix}/Dense_0/kernel", (g.depth, x.width, 3 * wd), _layers(
                    g.depth, lambda i, o=ours, q=our_norm: f"{o}.{i}.{q}.dense.weight", lambda a, i: a[i].T))
                add(f"{llm}/layers/{norm}{suffix}/Dense_0/bias", (g.depth, 3 * wd), _layers(
                    g.depth, lambda i, o=ours, q=our_norm: f"{o}.{i}.{q}.dense.bias", lambda a, i: a[i]))
    add(f"{llm}/final_norm/scale", (d.width,), [("vlm_norm.weight", _same)])
    add(f"{llm}/final_norm_1/Dense_0/kernel", (x.width, 3 * x.width), [("expert_norm.dense.weight", _t)])
    add(f"{llm}/final_norm_1/Dense_0/bias", (3 * x.width,), [("expert_norm.dense.bias", _same)])

    # pi-behavior's own modules (nnx.Linear kernel (in, out) -> weight (out, in); nnx.Embed "embedding")
    def linear(name: str, ours: str, din: int, dout: int) -> None:
        add(f"{name}/kernel", (din, dout), [(f"{ours}.weight", _t)])
        add(f"{name}/bias", (dout,), [(f"{ours}.bias", _same)])

    L, K, E = d.depth, d.num_kv_heads, d.head_dim
    for part in ("k", "v"):
        add(f"kv_transform/{part}_coeffs", (L, L), [(f"kv_transform.{part}_coeffs", _same)])
        add(f"kv_transform/{part}_bias", (L, K, E), [(f"kv_transform.{part}_bias", _same)])
    cat = d.width + 2 * cfg.stage_dim
    add("task_embeddings/embedding", (cfg.num_tasks, d.width), [("task_stage.task_embeddings.weight", _same)])
    add("task_stage_embeddings/embedding", (sum(cfg.task_num_stages), cfg.stage_dim),
        [("task_stage.task_stage_embeddings.weight", _same)])
    linear("gate_sincos", "task_stage.gate_sincos", cat, cfg.stage_dim)
    linear("gate_task_stage", "task_stage.gate_learned", cat, cfg.stage_dim)
    linear("gate_task", "task_stage.gate_task", cat, d.width)
    linear("fusion_layer1", "task_stage.fusion_layer1", cat, 2 * d.width)
    linear("fusion_layer2", "task_stage.fusion_layer2", 2 * d.width, d.width)
    linear("stage_projection", "task_stage.stage_projection", 2 * cfg.stage_dim, d.width)
    linear("stage_pred_from_vlm", "stage_head", d.width, cfg.max_num_stages)
    if cfg.use_fast_auxiliary:
        add("fast_token_embedding/embedding", (cfg.fast_vocab_size, d.width), [("fast_token_embedding.weight", _same)])
        linear("fast_token_proj", "fast_token_proj", d.width, cfg.fast_vocab_size)
    linear("action_in_proj", "action_in_proj", cfg.action_dim, x.width)
    linear("action_out_proj", "action_out_proj", x.width, cfg.action_dim)
    linear("time_mlp_in", "time_embedding.time_mlp_in", x.width, x.width)
    linear("time_mlp_out", "time_embedding.time_mlp_out", x.width, x.width)
    return src


# --- reading the checkpoint ----------------------------------------------------------------------------------

def _source_keys(params: OrbaxParams, where: str) -> dict[str, tuple[str, ...]]:
    """{converter-style key: orbax path}: the top "params" item key and nnx.State's trailing "value" dropped."""
    paths = params.paths
    if not all(p[0] == "params" for p in paths):
        raise OpenpiImportError(f"{where}: the tree's top key is not 'params' (openpi saves {{'params': ...}}); "
                                f"first array: {'.'.join(paths[0])}")
    strip_value = all(p[-1] == "value" for p in paths)
    out = {}
    for p in paths:
        core = p[1:-1] if strip_value else p[1:]
        out["/".join(core)] = p
    return out


@dataclasses.dataclass
class ImportedWeights:
    state_dict: dict[str, torch.Tensor]
    report: list[dict[str, Any]]  # one row per source array
    source_dtypes: list[str]


def read_weights(params_dir: str, cfg: PiBehaviorConfig, expected: dict[str, torch.Tensor]) -> ImportedWeights:
    """Map every array of `params_dir` onto `expected` (our state_dict), strictly, float32."""
    where = params_dir
    try:
        params = OrbaxParams(params_dir)
    except OrbaxFormatError as e:
        raise OpenpiImportError(str(e)) from e
    keys = _source_keys(params, where)
    plan = {s.key: s for s in parameter_map(cfg)}
    missing = sorted(f"{k} {plan[k].shape}" for k in plan if k not in keys)
    unexpected, wrong, ignored = [], [], []
    for key, path in sorted(keys.items()):
        if key in IGNORED:
            ignored.append(key)
        elif key not in plan:
            try:
                unexpected.append(f"{key} {params.shape(path)}")
            except OrbaxFormatError:  # listed in _METADATA, absent from the store: still named
                unexpected.append(f"{key} (listed in {METADATA_FILE}, no data)")
        elif params.shape(path) != plan[key].shape:
            wrong.append(f"{key}: checkpoint {params.shape(path)}, {cfg_name(cfg)} needs {plan[key].shape}")
    filled = {name for s in plan.values() for name, _ in s.targets}
    not_covered = sorted(set(expected) - filled)
    if not_covered:  # a gap in parameter_map itself; never silently left at init
        raise OpenpiImportError(f"{where}: no source array for our parameters {not_covered[:8]}")
    if missing or unexpected or wrong:
        lines = [f"cannot import {where}: {len(missing)} missing, {len(unexpected)} unexpected, "
                 f"{len(wrong)} wrongly shaped array(s) for the {cfg_name(cfg)} architecture"]
        for title, items in (("missing (the architecture needs them, the checkpoint lacks them)", missing),
                             ("unexpected (in the checkpoint, mapped to nothing)", unexpected),
                             ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title}:")
                lines += [f"    {item}" for item in items]
        raise OpenpiImportError("\n".join(lines))
    state: dict[str, torch.Tensor] = {}
    report, dtypes = [], set()
    for key, source in plan.items():
        path = keys[key]
        raw = params.read(path)
        dtypes.add(str(raw.dtype))
        if raw.dtype.kind not in "fV" and str(raw.dtype) != "bfloat16":
            raise OpenpiImportError(f"{where}: {key} has dtype {raw.dtype}, expected a float array")
        arr = raw.astype(np.float32)  # bf16 -> fp32 is exact
        for name, fn in source.targets:
            want = tuple(expected[name].shape)
            out = np.ascontiguousarray(fn(arr))
            if out.shape != want:  # the map's own consistency (shapes checked above)
                raise OpenpiImportError(f"{where}: {key} maps to {name} with shape {out.shape}, need {want}")
            state[name] = torch.from_numpy(out.copy())
        report.append({"source": ".".join(path), "dtype": str(raw.dtype), "shape": list(raw.shape),
                       "targets": [n for n, _ in source.targets]})
    for key in ignored:
        report.append({"source": ".".join(keys[key]), "ignored": IGNORED[key]})
    return ImportedWeights(state, report, sorted(dtypes))


def cfg_name(cfg: PiBehaviorConfig) -> str:
    from models.pi_behavior.config import CONFIGS

    return next((n for n, f in CONFIGS.items() if f() == cfg), "custom")


# --- norm stats, gripper tables ------------------------------------------------------------------------------

def _vec(doc: dict, key: str, n: int, where: str) -> np.ndarray:
    if key not in doc:
        raise OpenpiImportError(f"{where}: field {key!r} is missing")
    try:
        a = np.asarray(doc[key], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise OpenpiImportError(f"{where}: field {key!r} is not a numeric array ({e})") from e
    if a.ndim != 1 or a.shape[0] < n:
        raise OpenpiImportError(f"{where}: field {key!r} has shape {a.shape}, expected ({n},) or padded")
    return a[:n]


def _per_t(doc: dict, key: str, fill: float, where: str) -> np.ndarray:
    if key not in doc:
        raise OpenpiImportError(f"{where}: field {key!r} is missing (per-timestamp stats of the 1st-place run)")
    a = np.asarray(doc[key], dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != ACTION_HORIZON or not ACTION_DIM <= a.shape[1] <= MODEL_DIM:
        raise OpenpiImportError(f"{where}: field {key!r} has shape {a.shape}, expected ({ACTION_HORIZON}, "
                                f"{ACTION_DIM}..{MODEL_DIM})")
    out = np.full((ACTION_HORIZON, MODEL_DIM), fill)
    out[:, : a.shape[1]] = a
    return out


def convert_norm_stats(text: bytes, *, where: str, gripper_closure=None, source_sha256: str = ""):
    """openpi/1st-place norm_stats.json -> our NormStats. Every value our layout has a field for is copied exactly
    (float64 from the same JSON numbers); the reference's state "q01/q99" are its min/max (pi_behavior §2.3) and
    fill both our min/max and q01/q99. Fields we have no place for stay in the verbatim copy (openpi/)."""
    from data_loaders.norm_stats import NormStats

    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise OpenpiImportError(f"{where}: not valid JSON ({e})") from e
    stats = doc.get("norm_stats") if isinstance(doc, dict) else None
    if not isinstance(stats, dict) or not isinstance(stats.get("state"), dict) or not isinstance(
            stats.get("actions"), dict):
        raise OpenpiImportError(f'{where}: expected {{"norm_stats": {{"state": {{...}}, "actions": {{...}}}}}}')
    s, a = stats["state"], stats["actions"]
    ws, wa = f"{where} norm_stats.state", f"{where} norm_stats.actions"
    if a.get("action_correlation_cholesky") is None:
        raise OpenpiImportError(f"{wa}: 'action_correlation_cholesky' is missing (computed with --correlation)")
    chol = np.asarray(a["action_correlation_cholesky"], dtype=np.float64)
    smin, smax = _vec(s, "q01", STATE_DIM, ws), _vec(s, "q99", STATE_DIM, ws)
    try:
        return NormStats(
            state_mean=_vec(s, "mean", STATE_DIM, ws), state_std=_vec(s, "std", STATE_DIM, ws),
            state_q01=smin, state_q99=smax, state_min=smin, state_max=smax,
            action_mean=_vec(a, "mean", ACTION_DIM, wa), action_std=_vec(a, "std", ACTION_DIM, wa),
            action_q01=_vec(a, "q01", ACTION_DIM, wa), action_q99=_vec(a, "q99", ACTION_DIM, wa),
            per_timestep_mean=_per_t(a, "per_timestamp_mean", 0.0, wa),
            per_timestep_std=_per_t(a, "per_timestamp_std", 1.0, wa),
            action_correlation_cholesky=chol, num_frames=0, num_chunks=0, num_full_chunks=0, sample_fraction=0.1,
            seed=42, manifest_sha256=f"openpi:{source_sha256}", correlation_jitter=1e-6,
            gripper_closure=gripper_closure)
    except ValueError as e:
        raise OpenpiImportError(f"{where}: {e}") from e


# The 1st-place hand tables (b1k/shared/correction_rules.py @ c4fc4c2): where closing a gripper is allowed.
ALWAYS_OPEN_LEFT = frozenset(set(range(1, 41)) | {42, 43, 44, 45, 47, 48})
ALWAYS_OPEN_RIGHT = frozenset(set(range(1, 30)) | {34, 35, 36, 37, 42, 43, 44, 47, 48, 49})
MIN_STAGE_FOR_CLOSURE = {0: {"left": 2, "right": 2}, 30: {"right": 6}, 31: {"right": 8}, 32: {"right": 5},
                         33: {"right": 11}, 40: {"right": 4}, 41: {"left": 14, "right": 14}, 45: {"right": 10},
                         46: {"left": 8, "right": 8}, 49: {"left": 14}}
RIGHT_ALWAYS_ALLOWED = frozenset({38, 39})


def closure_allowed(task: int, stage: int, side: str) -> bool:
    """The reference's general gripper rule: may `side` be closed at (task, stage)?"""
    if side == "right" and task in RIGHT_ALWAYS_ALLOWED:
        return True
    if task in (ALWAYS_OPEN_LEFT if side == "left" else ALWAYS_OPEN_RIGHT):
        return False
    min_stage = MIN_STAGE_FOR_CLOSURE.get(task, {}).get(side)
    return min_stage is None or stage >= min_stage


def reference_gripper_closure(task_num_stages: tuple[int, ...]):
    """The hand tables as our GripperClosure counts: one frame per (task, valid stage), closed iff allowed, so
    GripperClosure.closing_expected() answers exactly what the reference's rule does."""
    from data_loaders.gripper_stats import GripperClosure

    frames = np.zeros((NUM_TASKS, MAX_NUM_STAGES), np.int64)
    closed = np.zeros((NUM_TASKS, MAX_NUM_STAGES, 2), np.int64)
    for t in range(NUM_TASKS):
        for st in range(task_num_stages[t]):
            frames[t, st] = 1
            closed[t, st] = [closure_allowed(t, st, "left"), closure_allowed(t, st, "right")]
    return GripperClosure(frames, closed)


# --- FAST tokenizer ------------------------------------------------------------------------------------------

def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte <-> printable-char table (tokenizers' ByteLevel): char -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def convert_fast_tokenizer(files: dict[str, bytes], *, q01: np.ndarray, q99: np.ndarray, where: str):
    """The published FAST processor (processor_config.json + a byte-level BPE tokenizer.json) as our FastTokenizer:
    same ids for the same coefficient sequences (vocabulary and merges are mapped symbol by symbol: theirs is
    coefficient - min_token, ours coefficient + B). Differences: ours encodes a chunk as one BPE word, theirs
    lets the GPT-2 pre-tokenizer split it first, so a chunk can get a different (equally decodable) id
    sequence; docs/published_checkpoints.md."""
    from tokenizers import Tokenizer, models

    from models.pi_behavior.fast import KEPT_DIMS, FastConfig, FastTokenizer

    for name in ("processor_config.json", "tokenizer.json"):
        if name not in files:
            raise OpenpiImportError(f"{where}: {name} is missing from the FAST tokenizer")
    try:
        proc = json.loads(files["processor_config.json"])
        tok = json.loads(files["tokenizer.json"])
        scale, min_token = float(proc["scale"]), int(proc["min_token"])
        horizon, dims = int(proc.get("time_horizon") or ACTION_HORIZON), int(proc.get("action_dim") or len(KEPT_DIMS))
        model = tok["model"]
        vocab, merges = model["vocab"], model["merges"]
    except (ValueError, KeyError, TypeError) as e:
        raise OpenpiImportError(f"{where}: unreadable FAST processor ({e!r})") from e
    if horizon != ACTION_HORIZON or dims != len(KEPT_DIMS):
        raise OpenpiImportError(f"{where}: FAST processor for horizon {horizon} x {dims} dims; this model needs "
                                f"{ACTION_HORIZON} x {len(KEPT_DIMS)}")
    config = FastConfig(q01=tuple(q01), q99=tuple(q99), scale=scale, vocab_size=int(proc.get("vocab_size", 1024)),
                        horizon=horizon)
    bound = config.max_token
    byte_of = _byte_level_chars()

    def convert(piece: str) -> str | None:
        """Their token string -> ours, or None when it cannot occur in our strings (a lone byte >= 0x80, a
        symbol beyond our coefficient range [-B, B])."""
        try:
            text = bytes(byte_of[c] for c in piece).decode("utf-8", errors="strict")
        except (KeyError, UnicodeDecodeError):
            return None
        out = []
        for ch in text:
            s = ord(ch) + min_token + bound  # their symbol -> coefficient -> our symbol
            if not 0 <= s < config.num_symbols:
                return None
            out.append(chr(s))
        return "".join(out)

    try:
        new_vocab: dict[str, int] = {}
        unreachable = 0
        for piece, i in vocab.items():
            mapped = convert(piece)
            if mapped is None:  # keeps its id; a char our encoder never emits, so it is never produced
                mapped = chr(config.num_symbols + 1 + unreachable)
                unreachable += 1
            new_vocab[mapped] = int(i)
        pairs = [m.split(" ") if isinstance(m, str) else list(m) for m in merges]
        new_merges = []
        for a, b in pairs:
            ca, cb = convert(a), convert(b)
            if ca is not None and cb is not None:
                new_merges.append((ca, cb))
    except (TypeError, ValueError, AttributeError) as e:
        raise OpenpiImportError(f"{where}: the FAST vocabulary cannot be mapped onto ours ({e})") from e
    if len(new_vocab) != len(vocab) or sorted(new_vocab.values()) != list(range(len(vocab))):
        raise OpenpiImportError(f"{where}: FAST vocabulary ids are not 0..{len(vocab) - 1} or collide after mapping")
    bpe = Tokenizer(models.BPE(vocab=new_vocab, merges=new_merges))
    sha = hashlib.sha256(bpe.to_str().encode()).hexdigest()
    try:
        return FastTokenizer(bpe, dataclasses.replace(config, tokenizer_sha256=sha))
    except ValueError as e:
        raise OpenpiImportError(f"{where}: {e}") from e


# --- the whole directory -------------------------------------------------------------------------------------

def _find_asset_dir(ckpt_local: str) -> str:
    assets = os.path.join(ckpt_local, ASSETS_DIR)
    found = []
    for root, _, names in os.walk(assets):
        if "norm_stats.json" in names:
            found.append(root)
    if not found:
        raise OpenpiImportError(f"{ckpt_local}: no {ASSETS_DIR}/<asset_id>/norm_stats.json")
    if len(found) > 1:
        preferred = os.path.join(assets, ASSET_ID)
        if preferred in found:
            return preferred
        raise OpenpiImportError(f"{ckpt_local}: several norm_stats.json under {ASSETS_DIR}/: {found}")
    return found[0]


def is_openpi_checkpoint(url: str) -> bool:
    """True for a directory (local or s3://) with <url>/params/_METADATA: the openpi/orbax layout."""
    if url.startswith("models:/"):
        return False
    try:
        fs, path = storage.resolve(url)
        return fs.isfile(storage.join(path, PARAMS_DIR, METADATA_FILE))
    except (OSError, ValueError):
        return False


def localize(url: str, scratch: str) -> str:
    """A local directory with the checkpoint's params/ and assets/ (s3:// copied into `scratch`; the optimizer's
    train_state/ is never fetched)."""
    fs, path = storage.resolve(url)
    if storage.is_local(fs):
        return path
    dst = os.path.join(scratch, "ckpt")
    for part in (PARAMS_DIR, ASSETS_DIR):
        src = storage.join(path, part)
        if fs.isdir(src):
            fs.get(src.rstrip("/") + "/", os.path.join(dst, part), recursive=True)
    return dst


def _step_of(url: str) -> int:
    tail = url.rstrip("/").rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def infer_config(params_dir: str) -> str:
    """The name of our architecture config (config.CONFIGS) whose parameter tree has the checkpoint's shapes."""
    from models.pi_behavior.config import CONFIGS

    try:
        params = OrbaxParams(params_dir)
    except OrbaxFormatError as e:
        raise OpenpiImportError(str(e)) from e
    keys = _source_keys(params, params_dir)
    for name, make in CONFIGS.items():
        plan = parameter_map(make())
        if all(k in keys and params.shape(keys[k]) == s.shape for k, s in ((s.key, s) for s in plan)):
            return name
    probe = "PaliGemma/llm/embedder/input_embedding"
    got = params.shape(keys[probe]) if probe in keys else None
    raise OpenpiImportError(f"{params_dir}: no architecture config ({', '.join(CONFIGS)}) has this parameter tree "
                            f"({probe}: {got}); import with --model-config NAME to see every difference")


def import_checkpoint(src: str, out: str, *, model_config: str = "auto") -> dict[str, Any]:
    """Read the openpi/1st-place checkpoint at `src` (dir or s3:// prefix) and write our export to `out`.
    `model_config` "auto" picks the architecture whose shapes the checkpoint has (the published ones: "full").
    Returns a summary dict (also in openpi/import_report.json)."""
    from checkpoints.export import export_artifact
    from models.pi_behavior.config import get_config
    from models.pi_behavior.fast import FastTokenizer
    from models.pi_behavior.model import PiBehavior

    with tempfile.TemporaryDirectory(prefix="b1k-openpi-import-") as tmp:
        local = localize(src, tmp)
        params_dir = os.path.join(local, PARAMS_DIR)
        if model_config == "auto":
            model_config = infer_config(params_dir)
        cfg = get_config(model_config)
        model = PiBehavior(cfg)
        weights = read_weights(params_dir, cfg, model.state_dict())
        model.load_state_dict(weights.state_dict, strict=True)  # the model's own check, too
        asset_dir = _find_asset_dir(local)
        with open(os.path.join(asset_dir, "norm_stats.json"), "rb") as f:
            norm_bytes = f.read()
        norm = convert_norm_stats(norm_bytes, where=storage.join(src, posixpath.relpath(asset_dir, local)),
                                  gripper_closure=reference_gripper_closure(cfg.task_num_stages),
                                  source_sha256=hashlib.sha256(norm_bytes).hexdigest())
        extra: dict[str, bytes] = {f"{OPENPI_DIR}/norm_stats.json": norm_bytes}
        fast_dir = os.path.join(asset_dir, "fast_tokenizer")
        fast_files = {}
        if os.path.isdir(fast_dir):
            for name in _FAST_FILES:
                p = os.path.join(fast_dir, name)
                if os.path.isfile(p):
                    with open(p, "rb") as f:
                        fast_files[name] = f.read()
                    extra[f"{OPENPI_DIR}/fast_tokenizer/{name}"] = fast_files[name]
        if not fast_files:
            raise OpenpiImportError(f"{src}: no FAST tokenizer in {posixpath.relpath(asset_dir, local)}/fast_tokenizer")
        fast: FastTokenizer = convert_fast_tokenizer(fast_files, q01=norm.action_q01, q99=norm.action_q99,
                                                     where=storage.join(src, "fast_tokenizer"))
        summary = {"source": src, "format": "openpi-orbax", "model_config": model_config,
                   "source_dtypes": weights.source_dtypes, "num_arrays": len(weights.report),
                   "num_parameters": len(weights.state_dict), "asset_dir": posixpath.relpath(asset_dir, local),
                   "arrays": weights.report}
        extra[f"{OPENPI_DIR}/{REPORT_FILE}"] = (json.dumps(summary, indent=1) + "\n").encode()
        norm_path, fast_path = os.path.join(tmp, "norm_stats.json"), os.path.join(tmp, "fast_tokenizer")
        norm.save(norm_path)
        fast.save(fast_path)
        export_artifact(out, state_dict=model.state_dict(), model_config_name=model_config, model_config=cfg,
                        train_config={"imported_from": src, "format": "openpi-orbax"}, norm_stats_url=norm_path,
                        fast_tokenizer_url=fast_path, step=_step_of(src), extra_files=extra,
                        extra_state={"imported_from": src})
    log.info("imported %s (%d arrays, %s) -> %s", src, len(weights.report), ", ".join(weights.source_dtypes), out)
    return {k: v for k, v in summary.items() if k != "arrays"}


# --- cache for serve / init_from -----------------------------------------------------------------------------

def _fingerprint(url: str) -> str:
    """Identity of a checkpoint's contents for the cache: its URL plus the bytes of its tree metadata, params
    manifest and norm stats (a re-upload under the same path gets a new cache entry)."""
    fs, path = storage.resolve(url)
    h = hashlib.sha256((os.path.realpath(path) if storage.is_local(fs) else url.rstrip("/")).encode())
    for rel in (f"{PARAMS_DIR}/{METADATA_FILE}", f"{PARAMS_DIR}/manifest.ocdbt"):
        p = storage.join(path, rel)
        if fs.isfile(p):
            h.update(fs.cat_file(p))
    for p in sorted(fs.glob(storage.join(path, ASSETS_DIR, "**", "norm_stats.json"))):
        h.update(fs.cat_file(p))
    return h.hexdigest()[:24]


def cached_import(url: str, cache_root: str, *, model_config: str = "auto") -> str:
    """The local export of `url`, imported into `cache_root/openpi/<fingerprint>` on first use."""
    target = os.path.join(cache_root, "openpi", f"{_fingerprint(url)}-{model_config}")
    if os.path.exists(os.path.join(target, "state.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".import-", dir=os.path.dirname(target))
    try:
        import_checkpoint(url, staging, model_config=model_config)
        try:
            os.rename(staging, target)
        except OSError:
            if not os.path.exists(os.path.join(target, "state.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("imported %s into the cache at %s", url, target)
    return target
