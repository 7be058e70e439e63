"""Interop with the webdataset library, both ways (issue 23 point 1).

- `webdataset.WebDataset` over our shard URLs (a local dir and the moto S3 server) yields every sample, every
  field decoded by webdataset's own standard decoders, equal to what our loader yields.
- Shards written by webdataset's own ShardWriter/encoders with our fields are indexed (manifest.index_shards)
  and then read by our loader, the norm-stats pass and the split views.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from data_loaders import manifest as mf
from data_loaders import storage
from data_loaders.behavior_facts import ACTION_HORIZON, CAMERAS, TASK_NUM_STAGES, stage_label
from data_loaders.sample_format import encode_sample, sample_key
from data_loaders.stream import StreamConfig, StreamLoader
from tests.shard_factory import build_shards, make_episode

LENGTHS = [11, 7, 9]
WDS_LENGTHS = [33, 7, 9]  # the stats pass needs one episode with a full 30-step action chunk


def loader_samples(url: str) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Every sample our loader yields (one pass, no augmentation), keyed by (episode, frame)."""
    cfg = StreamConfig(batch_size=5, num_workers=0, shards_per_group=1, num_epochs=1, train=False)
    out = {}
    for b in StreamLoader(url, cfg):
        for i in range(b["task"].shape[0]):
            out[(int(b["episode"][i]), int(b["frame"][i]))] = {k: v[i].numpy() for k, v in b.items()}
    return out


def episode_samples(rng: np.random.Generator, ep_index: int, length: int, task: int, size: int = 16):
    """(key, fields) of one episode as python objects: images as uint8 arrays, arrays, meta as a dict."""
    ep = make_episode(rng, length)
    for f in range(length):
        idx = np.minimum(np.arange(f, f + ACTION_HORIZON), length - 1)
        meta = {"episode": ep_index, "frame": f, "timestamp": f / 30.0, "episode_length": length, "task": task,
                "stage": stage_label(f, length, task), "num_stages": TASK_NUM_STAGES[task], "skill_id": -1,
                "skill_index": -1, "skill_valid": False, "skill_description": "", "skill_objects": []}
        yield sample_key(ep_index, f), {
            "images": {c: rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for c in CAMERAS},
            "state": ep["state"][f], "actions": ep["actions"][idx],
            "action_mask": np.arange(f, f + ACTION_HORIZON) < length, "meta": meta}


def write_our_webp_shards(url: str) -> None:
    """Shards in the sharder's own encoding (sample_format.encode_sample, manifest.write_tar), WebP images."""
    rng = np.random.default_rng(5)
    fs, root = storage.resolve(url)
    for e, length in enumerate(LENGTHS):
        samples = [(k, encode_sample(images=s["images"], state=s["state"], actions=s["actions"],
                                     action_mask=s["action_mask"], meta=s["meta"], image_format="webp", quality=90))
                   for k, s in episode_samples(rng, 100 + e, length, task=e)]
        for part, start in enumerate(range(0, length, 4)):
            storage.write_bytes_atomic(fs, storage.join(root, f"shard-{100 + e:08d}-{part:04d}.tar"),
                                       mf.write_tar(samples[start:start + 4]))
    mf.index_shards(url, quality=90)


@pytest.mark.parametrize("where", ["file", "s3"])
def test_webdataset_reads_our_shards_with_its_standard_decoders(where, tmp_path, request):
    if where == "file":
        url = str(tmp_path / "shards")
        build_shards(url, lengths=LENGTHS, samples_per_shard=4, seed=2)  # JPEG, the sharder's byte layout
        ext = "jpg"
    else:
        url = f"{request.getfixturevalue('s3_bucket')}/shards"
        write_our_webp_shards(url)
        mf.register_webdataset_s3()
        ext = "webp"
    urls = mf.webdataset_urls(url)
    assert all(u.startswith("file://" if where == "file" else "s3://") for u in urls)
    # rgb8: webdataset's PIL decoder to uint8 HWC; .npy, .json by its basic handlers. No handler of ours.
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=True).decode("rgb8")
    ours = loader_samples(url)
    seen = set()
    for sample in ds:
        meta = sample["meta.json"]
        assert isinstance(meta, dict)
        key = (meta["episode"], meta["frame"])
        assert sample["__key__"] == sample_key(*key)
        assert {k for k in sample if not k.startswith("__")} == {f"{c}.{ext}" for c in CAMERAS} | {
            "state.npy", "actions.npy", "action_mask.npy", "meta.json"}
        mine = ours[key]
        for i, cam in enumerate(CAMERAS):
            img = sample[f"{cam}.{ext}"]
            assert img.dtype == np.uint8 and img.shape == (16, 16, 3)
            np.testing.assert_array_equal(img, mine["images"][i])
        for field in ("state", "actions", "action_mask"):
            np.testing.assert_array_equal(sample[f"{field}.npy"], mine[field])
        assert sample["action_mask.npy"].dtype == np.bool_
        assert (meta["task"], meta["stage"]) == (int(mine["task"]), int(mine["stage"]))
        seen.add(key)
    assert len(seen) == sum(LENGTHS) == len(ours)


def write_with_webdataset(out: str, *, episodes_per_shard_writer: bool = True) -> list[dict]:
    """Shards made with webdataset's ShardWriter and its default encoders (PNG, .npy, .json, .cls), one
    ShardWriter per episode; returns the source samples."""
    rng = np.random.default_rng(9)
    os.makedirs(out, exist_ok=True)
    source = []
    writer = None
    for e, length in enumerate(WDS_LENGTHS):
        if writer is None or episodes_per_shard_writer:
            if writer is not None:
                writer.close()
            writer = wds.ShardWriter(os.path.join(out, f"wds-ep{e}-%03d.tar"), maxcount=8, verbose=0)
        for key, s in episode_samples(rng, 200 + e, length, task=[0, 1, 40][e]):
            writer.write({"__key__": key, **{f"{c}.png": s["images"][c] for c in CAMERAS},
                          "state.npy": s["state"], "actions.npy": s["actions"], "action_mask.npy": s["action_mask"],
                          "meta.json": s["meta"], "task.cls": s["meta"]["task"]})
            source.append(s)
    writer.close()
    return source


def test_shards_written_by_webdataset_are_read_by_our_tools(tmp_path):
    from data_loaders.norm_stats import NormStats
    from data_loaders.splits import write_view
    from data_loaders.stats import compute_norm_stats

    out = str(tmp_path / "wds")
    source = write_with_webdataset(out)
    raw = mf.index_shards(out)
    assert raw["settings"]["image_format"] == "png" and raw["num_samples"] == sum(WDS_LENGTHS)
    assert [e["length"] for e in raw["episodes"]] == WDS_LENGTHS
    # Our loader: every sample, every field as written (PNG is lossless); the extra task.cls is ignored.
    ours = loader_samples(out)
    assert len(ours) == len(source)
    for s in source:
        mine = ours[(s["meta"]["episode"], s["meta"]["frame"])]
        np.testing.assert_array_equal(mine["images"], np.stack([s["images"][c] for c in CAMERAS]))
        np.testing.assert_array_equal(mine["state"], s["state"])
        np.testing.assert_array_equal(mine["actions"], s["actions"])
        np.testing.assert_array_equal(mine["action_mask"], s["action_mask"])
        assert int(mine["task"]) == s["meta"]["task"]
    # webdataset's int decoder on the .cls it wrote.
    assert {int(x["task.cls"]) for x in wds.WebDataset(mf.webdataset_urls(out), shardshuffle=False).decode()} \
        == {0, 1, 40}
    # The norm-stats pass and an episode view (the split tools) work on them too.
    stats = NormStats.load(compute_norm_stats(out))
    all_state = np.stack([s["state"] for s in source])
    np.testing.assert_allclose(stats.state_mean, all_state.mean(0), rtol=1e-5, atol=1e-5)
    view = write_view(mf.load_manifest(out), str(tmp_path / "view"), episodes=[201], name="one")
    got = loader_samples(str(tmp_path / "view"))
    assert sorted(got) == [(201, f) for f in range(WDS_LENGTHS[1])]
    assert torch.equal(torch.as_tensor(got[(201, 3)]["state"]), torch.as_tensor(source[WDS_LENGTHS[0] + 3]["state"]))
    assert view.num_samples == WDS_LENGTHS[1]


def test_index_refuses_shards_that_span_episodes(tmp_path):
    out = str(tmp_path / "mixed")
    write_with_webdataset(out, episodes_per_shard_writer=False)  # maxcount 8 across episode boundaries
    with pytest.raises(mf.ShardError, match="holds samples of episodes"):
        mf.index_shards(out)
    assert not os.path.exists(os.path.join(out, mf.MANIFEST_NAME))


def test_sharder_tar_bytes_are_webdatasets_tarwriter_bytes():
    """manifest.write_tar is webdataset's TarWriter, deterministic, and byte-identical to the tarfile code it
    replaced (fixed mtime, no owner, mode 0644, members sorted), so older conversions resume unchanged."""
    import io
    import tarfile

    samples = [("e00000001_f000000", {"meta.json": json.dumps({"a": 1}).encode(), "state.npy": b"x" * 700}),
               ("e00000001_f000001", {"meta.json": b"{}", "state.npy": b"z"})]
    data = mf.write_tar(samples)
    assert data == mf.write_tar(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["e00000001_f000000.meta.json", "e00000001_f000000.state.npy",
                                         "e00000001_f000001.meta.json", "e00000001_f000001.state.npy"]
    assert {(m.mtime, m.mode, m.uname, m.gname, m.uid) for m in members} == {(0, 0o644, "", "", 0)}
    assert [(k, f) for k, f in mf.iter_tar_samples(data, where="x")] == samples
