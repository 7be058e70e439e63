"""Issue 20: 1st-place/openpi pi-behavior checkpoints in the published layout (tests/openpi_fixture.py) are
imported strictly, converted without loss, served and fine-tuned from directly."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from models.pi_behavior.config import tiny
from tests.openpi_fixture import ASSET_ID, openpi_norm_stats, published_tree, write_checkpoint


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(checkpoint dir, its bf16 arrays by '/'-path, our export of it written by `b1k-train import`)."""
    from trainer.cli import main

    root = tmp_path_factory.mktemp("openpi")
    ckpt = str(root / "checkpoint_1" / "30000")
    arrays = write_checkpoint(ckpt, tiny())
    out = str(root / "export")
    assert main(["import", ckpt, "--out", out]) == 0
    return ckpt, arrays, out


def _load_export(out):
    from checkpoints.export_reader import load_pi_behavior

    return load_pi_behavior(out)


def test_import_consumes_every_array_bit_exactly(published):
    ckpt, arrays, out = published
    report = json.load(open(os.path.join(out, "openpi", "import_report.json")))
    assert report["source_dtypes"] == ["bfloat16"] and report["model_config"] == "tiny"
    sources = {r["source"] for r in report["arrays"]}
    # every array of the published tree, by orbax name ("params." + path + ".value"), was consumed
    assert sources == {"params." + k.replace("/", ".") + ".value" for k in published_tree(tiny())}
    model, _, _, config = _load_export(out)
    assert config["global_step"] == 30000
    sd = model.state_dict()
    f32 = {k: a.astype(np.float32) for k, a in arrays.items()}
    # a few mappings, each a value equality with the bf16 source (bf16 -> fp32 is exact)
    assert torch.equal(sd["embed_tokens.weight"], torch.from_numpy(f32["PaliGemma/llm/embedder/input_embedding"]))
    assert torch.equal(sd["task_stage.gate_learned.weight"], torch.from_numpy(f32["gate_task_stage/kernel"].T))
    assert torch.equal(sd["stage_head.bias"], torch.from_numpy(f32["stage_pred_from_vlm/bias"]))
    assert torch.equal(sd["expert_layers.1.post_attention_layernorm.dense.weight"],
                       torch.from_numpy(f32["PaliGemma/llm/layers/pre_ffw_norm_1/Dense_0/kernel"][1].T))
    assert torch.equal(sd["kv_transform.v_bias"], torch.from_numpy(f32["kv_transform/v_bias"]))
    assert torch.equal(sd["vision_tower.embeddings.patch_embedding.weight"],
                       torch.from_numpy(f32["PaliGemma/img/embedding/kernel"].transpose(3, 2, 0, 1)))


def test_one_layer_by_hand(published):
    """openpi's own einsums on the raw arrays (gemma.py Attention/FeedForward, siglip MHA) = our modules."""
    _, arrays, out = published
    model, _, _, _ = _load_export(out)
    a = {k: v.astype(np.float64) for k, v in arrays.items()}
    rng = np.random.default_rng(1)
    x = rng.standard_normal(64)
    layer = model.vlm_layers[1]
    xt = torch.tensor(x, dtype=torch.float32)[None]
    q_ref = np.einsum("d,nde->ne", x, a["PaliGemma/llm/layers/attn/q_einsum/w"][1])  # "BTD,NDH->BTNH"
    k_ref, v_ref = np.einsum("d,cnde->cne", x, a["PaliGemma/llm/layers/attn/kv_einsum/w"][1])  # "BSD,CKDH->CBSKH"
    with torch.no_grad():
        q = layer.self_attn.q_proj(xt).view(2, 16).double().numpy()
        k = layer.self_attn.k_proj(xt).view(1, 16).double().numpy()
        v = layer.self_attn.v_proj(xt).view(1, 16).double().numpy()
    np.testing.assert_allclose(q, q_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k, k_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-6)
    heads = rng.standard_normal((2, 16))
    o_ref = np.einsum("ne,ned->d", heads, a["PaliGemma/llm/layers/attn/attn_vec_einsum/w"][1])  # "BTNH,NHD->BTD"
    with torch.no_grad():
        o = layer.self_attn.o_proj(torch.tensor(heads.reshape(1, 32), dtype=torch.float32)).double().numpy()[0]
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-6)
    gate, up = a["PaliGemma/llm/layers/mlp/gating_einsum"][1]
    with torch.no_grad():
        g = layer.mlp.gate_proj(xt).double().numpy()[0]
    np.testing.assert_allclose(g, x @ gate, rtol=1e-5, atol=1e-6)
    # one SigLIP attention projection (flax DenseGeneral kernel (width, heads, head_dim)) and its bias
    vis = model.vision_tower.layers[0].self_attn
    xv = rng.standard_normal(32)
    kq = a["PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"][0]
    bq = a["PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/bias"][0]
    with torch.no_grad():
        qv = vis.q_proj(torch.tensor(xv, dtype=torch.float32)[None]).double().numpy()[0]
    np.testing.assert_allclose(qv, (np.einsum("c,che->he", xv, kq) + bq).reshape(-1), rtol=1e-5, atol=1e-6)


def test_norm_stats_converted_without_loss_and_gripper_tables(published):
    from models.pi_behavior.openpi_import import closure_allowed

    ckpt, _, out = published
    _, norm, _, _ = _load_export(out)
    src = openpi_norm_stats(0)["norm_stats"]
    s, a = src["state"], src["actions"]
    assert np.array_equal(norm.state_mean, s["mean"]) and np.array_equal(norm.state_std, s["std"])
    assert np.array_equal(norm.state_min, s["q01"]) and np.array_equal(norm.state_max, s["q99"])
    for ours, key in (("action_mean", "mean"), ("action_std", "std"), ("action_q01", "q01"), ("action_q99", "q99")):
        assert np.array_equal(getattr(norm, ours), a[key])
    assert np.array_equal(norm.per_timestep_mean, a["per_timestamp_mean"])
    assert np.array_equal(norm.per_timestep_std, a["per_timestamp_std"])
    assert np.array_equal(norm.action_correlation_cholesky, a["action_correlation_cholesky"])
    # the source file travels byte for byte; the FAST processor's data files too, never its Python file
    with open(os.path.join(ckpt, "assets", ASSET_ID, "norm_stats.json"), "rb") as f:
        assert open(os.path.join(out, "openpi", "norm_stats.json"), "rb").read() == f.read()
    assert sorted(os.listdir(os.path.join(out, "openpi", "fast_tokenizer"))) == ["processor_config.json",
                                                                                 "tokenizer.json"]
    # the reference's hand tables: task 40 right gripper from stage 4, spray tasks always, task 0 left from 2
    g = norm.gripper_closure
    assert not g.closing_expected(40, 3, 1, min_fraction=0.05) and g.closing_expected(40, 4, 1, min_fraction=0.05)
    assert g.closing_expected(38, 0, 1, min_fraction=0.05) and not g.closing_expected(38, 0, 0, min_fraction=0.05)
    assert not g.closing_expected(0, 1, 0, min_fraction=0.05) and g.closing_expected(0, 2, 0, min_fraction=0.05)
    assert closure_allowed(41, 14, "left") and not closure_allowed(41, 13, "right")


def test_fast_ids_keep_their_meaning(published):
    """Every id of the published FAST vocabulary stands for the same coefficients in our converted tokenizer."""
    from tokenizers import Tokenizer

    ckpt, _, out = published
    _, _, fast, _ = _load_export(out)
    theirs = Tokenizer.from_file(os.path.join(ckpt, "assets", ASSET_ID, "fast_tokenizer", "tokenizer.json"))
    rng = np.random.default_rng(3)
    for _ in range(20):
        coef = rng.integers(-3, 4, 660) * (rng.random(660) < 0.3)
        ids = theirs.encode("".join(chr(int(c) + 55) for c in coef)).ids  # their symbol = coefficient - min_token
        assert np.array_equal(np.concatenate([fast._pieces[i] for i in ids]), coef)
        mine = fast._bpe.encode("".join(chr(int(c) + fast.config.max_token) for c in coef)).ids
        assert np.array_equal(np.concatenate([fast._pieces[i] for i in mine]), coef)


def test_strict_unexpected_and_missing_arrays_are_named(published, tmp_path):
    from models.pi_behavior.model import PiBehavior
    from models.pi_behavior.openpi_import import OpenpiImportError, read_weights

    ckpt, _, _ = published
    params = str(tmp_path / "params")
    shutil.copytree(os.path.join(ckpt, "params"), params)
    meta_path = os.path.join(params, "_METADATA")
    meta = json.load(open(meta_path))
    tree = meta["tree_metadata"]
    drop = str(("params", "fusion_layer2", "bias", "value"))
    del tree[drop]
    extra = ("params", "lora_a", "kernel", "value")
    tree[str(extra)] = {"key_metadata": [{"key": k, "key_type": 2} for k in extra],
                        "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False}}
    json.dump(meta, open(meta_path, "w"))
    model = PiBehavior(tiny())
    with pytest.raises(OpenpiImportError) as e:
        read_weights(params, tiny(), model.state_dict())
    assert "1 missing, 1 unexpected" in str(e.value)
    assert "fusion_layer2/bias (64,)" in str(e.value) and "lora_a/kernel" in str(e.value)


def test_served_equals_direct_and_mapping_uses_the_cache(published, tmp_path, monkeypatch):
    """serve --model <openpi dir> and the seed's task_checkpoint_mapping.json ("~/..." paths) import once into the
    model cache; the served model computes what the same weights loaded directly compute."""
    from models.pi_behavior.model import PiBehavior
    from models.pi_behavior.openpi_import import read_weights
    from serving.router import ModelRouter

    ckpt, _, _ = published
    monkeypatch.setenv("B1K_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    os.makedirs(tmp_path / "home" / "models")
    os.symlink(os.path.dirname(ckpt), tmp_path / "home" / "models" / "checkpoint_1")
    mapping = tmp_path / "task_checkpoint_mapping.json"
    mapping.write_text(json.dumps({"checkpoints": {
        "checkpoint_1": {"path": "~/models/checkpoint_1/30000", "tasks": [2, 3, 5]},
        "checkpoint_4": {"path": ckpt, "tasks": [40]}}}))
    router = ModelRouter(str(mapping))
    router.validate()
    served = router.get(40).model
    assert router.get(2).model is not None and len(os.listdir(tmp_path / "cache" / "openpi")) == 1  # one import
    direct = PiBehavior(tiny())
    direct.load_state_dict(read_weights(os.path.join(ckpt, "params"), tiny(), direct.state_dict()).state_dict)
    chol = openpi_norm_stats(0)["norm_stats"]["actions"]["action_correlation_cholesky"]
    direct.set_action_correlation(torch.tensor(np.asarray(chol)))
    direct.eval()
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randint(0, 255, (2, 3, 224, 224, 3), dtype=torch.uint8, generator=g),
             "task": torch.tensor([40, 2]), "stage": torch.tensor([3, 1]),
             "state": torch.randn(2, 32, generator=g) * 0.5}
    noise = torch.randn(2, 30, 32, generator=g)
    a1, l1 = served.sample_actions(batch, noise=noise, num_steps=3)
    a2, l2 = direct.sample_actions(batch, noise=noise, num_steps=3)
    assert torch.equal(a1, a2) and torch.equal(l1, l2)
    assert torch.equal(served.noise.chol_reg, direct.noise.chol_reg)


def test_init_from_openpi_loads_the_weights(published, tmp_path, monkeypatch):
    from data_loaders.norm_stats import NormStats
    from models.pi_behavior.model import PiBehavior
    from trainer.config import TrainConfig
    from trainer.loop import make_init_fn

    ckpt, arrays, out = published
    monkeypatch.setenv("B1K_MODEL_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(recipe="t", model="tiny", init_from=f"openpi:{ckpt}", global_batch_size=2, micro_batch_size=2)
    norm = NormStats.load(os.path.join(out, "norm_stats.json"))
    model = PiBehavior(tiny())
    make_init_fn(cfg, norm, torch.device("cpu"))(model)
    want = arrays["PaliGemma/llm/layers/mlp_1/linear"][0].astype(np.float32).T
    assert torch.equal(model.expert_layers[0].mlp.down_proj.weight, torch.from_numpy(want))
