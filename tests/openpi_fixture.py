"""Write a pi-behavior checkpoint in the published 1st-place/openpi layout at tiny sizes, without JAX.

The parameter tree is written out here independently of models/pi_behavior/openpi_import.py, from the public code
(docs/published_checkpoints.md lists the revisions): openpi models/siglip.py (big_vision ViT, scan=True) and
models/gemma.py (two-config Gemma with adaRMS on the expert, `_1` suffixes), the 1st-place models/pi_behavior.py
(KVCacheTransform, task/stage embeddings and gates, stage_pred_from_vlm, FAST head, pi0.5 projections), saved by
its training/checkpoints.py as the orbax item `params` = {"params": nnx.State} (every leaf path ends in "value").

On disk this is what orbax-checkpoint's PyTreeCheckpointHandler writes with OCDBT: each array a zarr v2 array
(zstd) in the per-process store `params/ocdbt.process_0/`, merged into the root store `params/manifest.ocdbt` by
copying its b-tree (orbax ocdbt_utils.merge_ocdbt_per_process_files), plus `_METADATA` (tree metadata JSON),
`_CHECKPOINT_METADATA` and `_sharding`. Assets: `assets/<asset_id>/norm_stats.json` in b1k/shared/normalize.py's
JSON and `fast_tokenizer/` as the FAST processor's save_pretrained() (processor_config.json + a byte-level BPE
tokenizer.json).
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

ASSET_ID = "IliaLarchenko/behavior_224_rgb"


def published_tree(cfg) -> dict[str, tuple[int, ...]]:
    """'/'-joined path below {"params": ...} -> shape, for an architecture config (ours, for the dimensions)."""
    v, d, x = cfg.vision, cfg.vlm, cfg.expert
    t: dict[str, tuple[int, ...]] = {}
    img = "PaliGemma/img"
    t[f"{img}/embedding/kernel"] = (v.patch_size, v.patch_size, 3, v.width)
    t[f"{img}/embedding/bias"] = (v.width,)
    t[f"{img}/pos_embedding"] = (1, (v.image_size // v.patch_size) ** 2, v.width)
    enc, n = f"{img}/Transformer/encoderblock", v.depth
    for ln in ("LayerNorm_0", "LayerNorm_1"):
        t[f"{enc}/{ln}/scale"] = t[f"{enc}/{ln}/bias"] = (n, v.width)
    t[f"{enc}/MlpBlock_0/Dense_0/kernel"], t[f"{enc}/MlpBlock_0/Dense_0/bias"] = (n, v.width, v.mlp_dim), (n, v.mlp_dim)
    t[f"{enc}/MlpBlock_0/Dense_1/kernel"], t[f"{enc}/MlpBlock_0/Dense_1/bias"] = (n, v.mlp_dim, v.width), (n, v.width)
    head_dim = v.width // v.num_heads
    for part in ("query", "key", "value"):
        t[f"{enc}/MultiHeadDotProductAttention_0/{part}/kernel"] = (n, v.width, v.num_heads, head_dim)
        t[f"{enc}/MultiHeadDotProductAttention_0/{part}/bias"] = (n, v.num_heads, head_dim)
    t[f"{enc}/MultiHeadDotProductAttention_0/out/kernel"] = (n, v.num_heads, head_dim, v.width)
    t[f"{enc}/MultiHeadDotProductAttention_0/out/bias"] = (n, v.width)
    t[f"{img}/Transformer/encoder_norm/scale"] = t[f"{img}/Transformer/encoder_norm/bias"] = (v.width,)
    t[f"{img}/head/kernel"], t[f"{img}/head/bias"] = (v.width, d.width), (d.width,)
    llm = "PaliGemma/llm"
    t[f"{llm}/embedder/input_embedding"] = (d.vocab_size, d.width)
    for sfx, g in (("", d), ("_1", x)):
        L = g.depth
        t[f"{llm}/layers/attn/q_einsum{sfx}/w"] = (L, g.num_heads, g.width, g.head_dim)
        t[f"{llm}/layers/attn/kv_einsum{sfx}/w"] = (L, 2, g.num_kv_heads, g.width, g.head_dim)
        t[f"{llm}/layers/attn/attn_vec_einsum{sfx}/w"] = (L, g.num_heads, g.head_dim, g.width)
        t[f"{llm}/layers/mlp{sfx}/gating_einsum"] = (L, 2, g.width, g.mlp_dim)
        t[f"{llm}/layers/mlp{sfx}/linear"] = (L, g.mlp_dim, g.width)
        for norm in ("pre_attention_norm", "pre_ffw_norm"):
            if sfx:
                t[f"{llm}/layers/{norm}{sfx}/Dense_0/kernel"] = (L, x.width, 3 * g.width)
                t[f"{llm}/layers/{norm}{sfx}/Dense_0/bias"] = (L, 3 * g.width)
            else:
                t[f"{llm}/layers/{norm}/scale"] = (L, g.width)
    t[f"{llm}/final_norm/scale"] = (d.width,)
    t[f"{llm}/final_norm_1/Dense_0/kernel"] = (x.width, 3 * x.width)
    t[f"{llm}/final_norm_1/Dense_0/bias"] = (3 * x.width,)
    for kv in ("k", "v"):
        t[f"kv_transform/{kv}_coeffs"] = (d.depth, d.depth)
        t[f"kv_transform/{kv}_bias"] = (d.depth, d.num_kv_heads, d.head_dim)
    task_dim, sub = d.width, d.width // 2  # task_embedding_dim, subtask_encoding_dim
    fusion_in = task_dim + 2 * sub
    t["task_embeddings/embedding"] = (cfg.num_tasks, task_dim)
    t["task_stage_embeddings/embedding"] = (sum(cfg.task_num_stages), sub)

    def linear(name: str, din: int, dout: int) -> None:
        t[f"{name}/kernel"], t[f"{name}/bias"] = (din, dout), (dout,)

    linear("stage_pred_from_vlm", d.width, 15)
    linear("gate_sincos", fusion_in, sub)
    linear("gate_task_stage", fusion_in, sub)
    linear("gate_task", fusion_in, task_dim)
    linear("fusion_layer1", fusion_in, 2 * task_dim)
    linear("fusion_layer2", 2 * task_dim, task_dim)
    linear("stage_projection", 2 * sub, task_dim)
    linear("action_in_proj", 32, x.width)
    linear("time_mlp_in", x.width, x.width)
    linear("time_mlp_out", x.width, x.width)
    linear("action_out_proj", x.width, 32)
    t["fast_token_embedding/embedding"] = (1024, d.width)
    linear("fast_token_proj", d.width, 1024)
    return t


def random_params(tree: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """bf16 arrays; norms/gates near their trained scale so the forward pass stays finite."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in tree.items():
        scale = 0.05 if len(shape) > 1 else 0.1
        a = rng.standard_normal(shape) * scale
        if key.endswith("_coeffs"):
            a = np.broadcast_to(np.eye(shape[0]), shape) + a * 0.1
        out[key] = a.astype(ml_dtypes.bfloat16)
    return out


def write_orbax_params(params_dir: str, arrays: dict[str, np.ndarray], *, value_suffix: bool = True) -> None:
    """Write {"params": arrays} as orbax's OCDBT PyTree layout (zarr v2, zstd, one process)."""
    import tensorstore as ts

    os.makedirs(params_dir)
    ctx = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 10_000_000}})
    config = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100000000, "manifest_kind": "single"}

    def kv(sub: str | None) -> dict:
        base = os.path.join(params_dir, sub) if sub else params_dir
        return {"driver": "ocdbt", "base": {"driver": "file", "path": base}, "config": config,
                "cache_pool": "cache_pool#ocdbt"}

    tree = {}
    for key, a in arrays.items():
        path = ["params", *key.split("/")] + (["value"] if value_suffix else [])
        name = ".".join(path)
        spec = {"driver": "zarr", "kvstore": {**kv("ocdbt.process_0"), "path": name + "/"},
                "metadata": {"shape": list(a.shape), "chunks": list(a.shape) or [], "compressor": {"id": "zstd"},
                             "dtype": "bfloat16" if a.dtype == ml_dtypes.bfloat16 else a.dtype.str}}
        store = ts.open(spec, create=True, context=ctx).result()
        store.write(a).result()
        tree[str(tuple(path))] = {"key_metadata": [{"key": k, "key_type": 2} for k in path],
                                  "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False}}
    child = ts.KvStore.open(kv("ocdbt.process_0"), context=ctx).result()
    parent = ts.KvStore.open({**kv(None), "assume_config": True}, context=ctx).result()
    txn = ts.Transaction(atomic=True)
    child.experimental_copy_range_to(parent.with_transaction(txn)).result()
    txn.commit_async().result()
    with open(os.path.join(params_dir, "_METADATA"), "w") as f:
        json.dump({"tree_metadata": tree, "use_zarr3": False, "store_array_data_equal_to_fill_value": True,
                   "custom_metadata": None}, f)
    with open(os.path.join(params_dir, "_CHECKPOINT_METADATA"), "w") as f:
        json.dump({"item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler."
                   "PyTreeCheckpointHandler", "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": 0,
                   "commit_timestamp_nsecs": 0, "custom_metadata": {}}, f)
    with open(os.path.join(params_dir, "_sharding"), "w") as f:
        json.dump({}, f)


def openpi_norm_stats(seed: int = 0) -> dict:
    """norm_stats.json as b1k/shared/normalize.py writes it (state/actions NormStats, per-timestamp, Cholesky)."""
    rng = np.random.default_rng(seed)
    flat = 30 * 32
    m = rng.standard_normal((flat, flat)) * 0.01
    chol = np.linalg.cholesky(np.eye(flat) + m @ m.T)

    def stats(n: int) -> dict:
        mean = rng.standard_normal(n)
        return {"mean": mean.tolist(), "std": (rng.random(n) + 0.5).tolist(), "q01": (mean - 2).tolist(),
                "q99": (mean + 2).tolist()}

    actions = stats(23)
    actions.update(per_timestamp_mean=rng.standard_normal((30, 32)).tolist(),
                   per_timestamp_std=(rng.random((30, 32)) + 0.5).tolist(),
                   per_timestamp_q01=None, per_timestamp_q99=None,
                   action_correlation_cholesky=chol.tolist(),
                   action_correlation_spatial=np.eye(32).tolist(), action_correlation_temporal=np.eye(30).tolist())
    return {"norm_stats": {"state": stats(23), "actions": actions}}


def write_fast_processor(out_dir: str, *, min_token: int = -55, seed: int = 0) -> None:
    """The FAST processor's saved form: processor_config.json + a byte-level BPE tokenizer.json trained like
    UniversalActionProcessor.fit (ByteLevelBPETokenizer over chr(coefficient - min_token) strings)."""
    from tokenizers import ByteLevelBPETokenizer

    rng = np.random.default_rng(seed)
    texts = ["".join(chr(int(c) - min_token) for c in np.clip(rng.integers(-3, 4, 660) * (rng.random(660) < 0.3),
                                                              min_token, -min_token)) for _ in range(64)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2, show_progress=False, special_tokens=[])
    os.makedirs(out_dir, exist_ok=True)
    bpe._tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump({"action_dim": 22, "min_token": min_token, "processor_class": "UniversalActionProcessor",
                   "scale": 10, "time_horizon": 30, "vocab_size": 1024}, f)
    with open(os.path.join(out_dir, "processing_action_tokenizer.py"), "w") as f:
        f.write("raise SystemExit('never executed by the importer')\n")


def write_checkpoint(ckpt: str, cfg, *, seed: int = 0, value_suffix: bool = True) -> dict[str, np.ndarray]:
    """The whole published layout at `ckpt`; returns the parameter arrays (bf16) by '/'-path."""
    arrays = random_params(published_tree(cfg), seed)
    write_orbax_params(os.path.join(ckpt, "params"), arrays, value_suffix=value_suffix)
    asset = os.path.join(ckpt, "assets", ASSET_ID)
    os.makedirs(asset)
    with open(os.path.join(asset, "norm_stats.json"), "w") as f:
        json.dump(openpi_norm_stats(seed), f, indent=2)
    write_fast_processor(os.path.join(asset, "fast_tokenizer"))
    os.makedirs(os.path.join(ckpt, "train_state"))  # never read
    return arrays
