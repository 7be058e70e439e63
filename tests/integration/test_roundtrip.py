"""End to end: synthetic BEHAVIOR dataset -> shards on the S3 server -> streaming loader == source values.

Also runs the `b1k-train` CLI for the three data commands, as a user would.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from data_loaders.behavior_facts import CAMERAS, stage_label
from data_loaders.lerobot_source import LeRobotSource
from data_loaders.norm_stats import NormStats
from data_loaders.stream import StreamConfig, StreamLoader


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, s3_endpoint):
    import s3fs

    root = tmp_path_factory.mktemp("roundtrip")
    dataset = str(root / "dataset")
    bucket = "roundtrip-bucket"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    shards = f"s3://{bucket}/shards"
    cli = [sys.executable, "-m", "trainer"]
    subprocess.run(cli + ["data", "synth", dataset, "--tasks", "0,40", "--episodes-per-task", "1",
                          "--frames", "90", "--seed", "7"], check=True)
    subprocess.run(cli + ["data", "shard", dataset, shards, "--workers", "2", "--samples-per-shard", "16"],
                   check=True)
    subprocess.run(cli + ["data", "stats", shards], check=True)
    subprocess.run(cli + ["data", "fast", shards], check=True)
    return dataset, shards


def test_loader_samples_equal_source_episodes(pipeline):
    dataset, shards = pipeline
    source = LeRobotSource(dataset)
    episodes = {ref.episode_index: source.read_episode(ref.episode_index) for ref in source.episodes()}
    frames = {ep: list(source.iter_rgb_frames(ep, size=224)) for ep in episodes}
    loader = StreamLoader(shards, StreamConfig(batch_size=10, num_workers=2, num_epochs=1, train=False))
    seen = 0
    for batch in loader:
        for i in range(batch["episode"].shape[0]):
            ep, f = int(batch["episode"][i]), int(batch["frame"][i])
            e = episodes[ep]
            idx = np.minimum(np.arange(f, f + 30), e.length - 1)
            np.testing.assert_array_equal(batch["state"][i].numpy(), e.state[f])
            np.testing.assert_array_equal(batch["actions"][i].numpy(), e.actions[idx])
            np.testing.assert_array_equal(batch["action_mask"][i].numpy(), np.arange(f, f + 30) < e.length)
            assert int(batch["task"][i]) == e.task_index
            assert int(batch["stage"][i]) == stage_label(f, e.length, e.task_index)
            assert float(batch["timestamp"][i]) == pytest.approx(e.timestamps[f])
            seg = e.skill_at(f)
            assert bool(batch["skill_valid"][i]) == (seg is not None)
            for c, cam in enumerate(CAMERAS):
                src = frames[ep][f][cam].astype(np.float64)
                got = batch["images"][i, c].numpy().astype(np.float64)
                assert np.abs(got - src).mean() < 3.0  # JPEG q90 on top of the same decoded frame
            seen += 1
    assert seen == sum(e.length for e in episodes.values())


def test_fast_tokenizer_fitted_by_the_cli_round_trips(pipeline):
    from data_loaders.transforms import to_delta
    from models.pi_behavior.fast import FastTokenizer

    _, shards = pipeline
    tok = FastTokenizer.load(f"{shards}/fast_tokenizer")
    batch = next(iter(StreamLoader(shards, StreamConfig(batch_size=8, num_workers=0, num_epochs=1, train=False))))
    full = batch["action_mask"].all(dim=1)
    chunks = to_delta(batch["actions"][full].numpy(), batch["state"][full].numpy())
    back = np.stack([tok.decode(tok.encode(c)) for c in chunks])
    assert back.shape == chunks.shape and np.isfinite(back).all()
    q01, q99 = np.asarray(tok.config.q01), np.asarray(tok.config.q99)
    keep = [d for d in range(23) if d != 6]
    # Error in the tokenizer's normalized units ([q01, q99] -> [-1, 1]); quantization alone bounds it by 0.05.
    err = (back - np.clip(chunks, q01, q99))[..., keep] / np.maximum(q99 - q01, 1e-6)[keep] * 2
    assert np.sqrt(np.mean(err**2)) < 0.05
    # The loader attaches the same tokens as model targets when given the tokenizer.
    with_fast = next(iter(StreamLoader(shards, StreamConfig(batch_size=8, num_workers=1, num_epochs=1, train=False),
                                       fast_tokenizer=tok, max_fast_tokens=200)))
    assert with_fast["fast_tokens"].shape == (8, 200) and with_fast["fast_tokens"].dtype == torch.int64
    for i in range(8):
        ids = tok.encode(to_delta(with_fast["actions"][i].numpy(), with_fast["state"][i].numpy()))
        n = min(len(ids), 200)
        assert with_fast["fast_tokens"][i, :n].tolist() == ids[:n]
        assert int(with_fast["fast_mask"][i].sum()) == n


def test_training_batches_use_the_stats(pipeline):
    _, shards = pipeline
    stats = NormStats.load(f"{shards}/norm_stats.json")
    batch = next(iter(StreamLoader(shards, StreamConfig(batch_size=32, num_workers=1, train=True),
                                   norm_stats=stats)))
    assert batch["state"].shape == (32, 32) and batch["actions"].shape == (32, 30, 32)
    assert batch["images"].shape == (32, 3, 224, 224, 3)
    # Normalized with its own stats, the data is roughly standardized.
    assert abs(float(batch["state"][:, :23].mean())) < 1.0
    assert 0.2 < float(batch["actions"][:, :, :23].std()) < 3.0
