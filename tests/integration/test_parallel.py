"""trainer/parallel.py with real 2-process gloo groups on the tiny pi-behavior config, for every strategy.

Three rounds of fresh processes share the work (DeepSpeed's first use JIT-builds a C++ op, so each round
initializes DeepSpeed once for all ZeRO stages):
1. world size 2: 4 steps of 2 micro-batches per strategy on a repeated batch, saving at step 2; the full weights
   after every step and the EMA at the end are written for the tests.
2. world size 2, fresh processes: load each step-2 checkpoint and run steps 3-4.
3. world size 1: load the world-size-2 checkpoints of fsdp (DCP resharding) and zero2/zero3 (universal format).
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
import torch
import torch.distributed as dist

from checkpoints import integrity
from models.pi_behavior.config import tiny
from models.pi_behavior.model import PiBehavior
from tests.hostile_files import plant_pickle
from trainer import parallel

pytestmark = [pytest.mark.slow, pytest.mark.integration]

B = 2  # per rank and micro-batch
MICRO = 2
STEPS = 4
SAVE_AT = 2
EMA_DECAY = 0.9
STRATEGIES = parallel.STRATEGIES
CHECKPOINTED = ("fsdp", "zero3")  # activation checkpointing where it interacts with sharded weights
UNIVERSAL = ("zero2", "zero3")


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, 32, dtype=torch.bool)
    mask[1, 20:] = False
    return {
        "images": torch.randint(0, 256, (B, 3, 224, 224, 3), dtype=torch.uint8, generator=g),
        "state": torch.randn(B, 32, generator=g) * 0.7,
        "actions": torch.randn(B, 30, 32, generator=g),
        "task": torch.tensor([0, 40]),
        "stage": torch.tensor([4, 0]),
        "fast_tokens": torch.randint(0, 1024, (B, 32), generator=g),
        "fast_mask": mask,
    }


def reference_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return PiBehavior(tiny()).state_dict()


def param_groups(model):
    """Shaped like trainer/optim.py's groups; the engine passes the extra keys through to the optimizer."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    vision = [p for n, p in named if n.startswith("vision_tower.")]
    groups = [{"params": vision, "name": "vision", "lr_multiplier": 0.5, "freeze": False}] if vision else []
    rest = [p for n, p in named if not n.startswith("vision_tower.")]
    return groups + [{"params": rest, "name": "rest", "lr_multiplier": 1.0, "freeze": False}]


def frozen_vision_groups(model):
    """Freezing for good: requires_grad=False on the (meta) model, and no group for those parameters."""
    model.vision_tower.requires_grad_(False)
    return param_groups(model)


def build(strategy: str, weights: dict[str, torch.Tensor], *, precision: str = "auto",
          groups_fn=param_groups) -> parallel.Engine:
    def init_fn(model):
        model.to_empty(device="cpu")
        model.init_weights()
        parallel.load_full_state_dict(model, weights)  # every strategy starts from the same weights

    return parallel.build_engine(
        strategy, lambda: PiBehavior(tiny()), init_fn=init_fn, param_groups_fn=groups_fn,
        optimizer_fn=lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01),
        device=torch.device("cpu"), precision=precision, grad_accum_steps=MICRO, grad_clip_norm=1.0,
        activation_checkpointing=strategy in CHECKPOINTED, ema_decay=EMA_DECAY, micro_batch_size=B)


def train_step(engine: parallel.Engine, rank: int, lrs: tuple[float, ...] = (5e-4, 1e-3)) -> tuple[float, float]:
    """One optimizer step on this rank's fixed micro-batches (a repeated batch, so the loss must go down)."""
    metrics = []
    for micro in range(MICRO):
        gen = torch.Generator().manual_seed(1000 + 10 * rank + micro)
        metrics.append(engine.forward_backward(make_batch(100 * rank + micro), generator=gen,
                                               is_last_micro=micro == MICRO - 1))
    engine.set_lrs(lrs)
    norm = engine.step()
    return engine.reduce_metrics(metrics)["loss"], norm


def _setup(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # two ranks on two cores: more threads only oversubscribe them


def _train_worker(rank: int, world_size: int, port: int, root: str) -> None:
    _setup(rank, world_size, port)
    weights = reference_weights()
    out: dict[str, dict] = {}
    for strategy in STRATEGIES:
        t0 = time.perf_counter()
        engine = build(strategy, weights)
        build_s = time.perf_counter() - t0
        history = [engine.full_model_state_dict()]
        losses, norms = [], []
        for step in range(1, STEPS + 1):
            loss, norm = train_step(engine, rank)
            losses.append(loss)
            norms.append(norm)
            history.append(engine.full_model_state_dict())
            if step == SAVE_AT:
                engine.save(os.path.join(root, f"ckpt_{strategy}"))
                ema_at_save = engine.full_model_state_dict(ema=True)
        ema = engine.full_model_state_dict(ema=True)
        out[strategy] = {"losses": losses, "norms": norms, "history": history, "ema": ema,
                         "ema_at_save": ema_at_save, "build_s": build_s,
                         "total_s": time.perf_counter() - t0, "group_names": engine.group_names}
    if rank == 0:
        torch.save(out, os.path.join(root, "train.pt"))
    dist.destroy_process_group()


def _resume_worker(rank: int, world_size: int, port: int, root: str) -> None:
    _setup(rank, world_size, port)
    weights = reference_weights()
    out = {}
    for strategy in STRATEGIES:
        t0 = time.perf_counter()
        engine = build(strategy, weights)
        engine.load(os.path.join(root, f"ckpt_{strategy}"))
        for _ in range(SAVE_AT + 1, STEPS + 1):
            train_step(engine, rank)
        out[strategy] = {"params": engine.full_model_state_dict(), "ema": engine.full_model_state_dict(ema=True)}
        engine.eval()  # evaluation calls go through engine.model, on every rank
        with torch.no_grad():
            actions, _ = engine.model.sample_actions(make_batch(7), num_steps=3,
                                                     generator=torch.Generator().manual_seed(7))
            expected = engine.model.expected_actions(make_batch(7), generator=torch.Generator().manual_seed(7))
        engine.train()
        out[strategy].update(actions=actions, expected=expected)
        # bf16 (on CPU) with a frozen vision tower: one step.
        engine = build(strategy, weights, precision="bf16", groups_fn=frozen_vision_groups)
        loss, norm = train_step(engine, rank, lrs=(1e-3,))
        out[strategy]["bf16_frozen"] = {"loss": loss, "norm": norm, "params": engine.full_model_state_dict(),
                                        "group_names": engine.group_names}
        out[strategy]["total_s"] = time.perf_counter() - t0
    if rank == 0:
        torch.save(out, os.path.join(root, "resume.pt"))
    dist.destroy_process_group()


def _reshard_worker(rank: int, world_size: int, port: int, root: str) -> None:
    _setup(rank, world_size, port)
    weights = reference_weights()
    out = {}
    for strategy in ("fsdp", *UNIVERSAL):
        engine = build(strategy, weights)
        engine.load(os.path.join(root, f"ckpt_{strategy}"))
        params, ema = engine.full_model_state_dict(), engine.full_model_state_dict(ema=True)
        loss, norm = train_step(engine, rank)
        out[strategy] = {"params": params, "ema": ema, "loss": loss, "norm": norm}
    # DeepSpeed's own loader (through the universal conversion) meets a planted pickle: it must refuse it.
    hostile = os.path.join(root, "hostile_zero2")
    shutil.copytree(os.path.join(root, "ckpt_zero2"), hostile)
    shutil.rmtree(os.path.join(hostile, "zero_universal"), ignore_errors=True)  # convert again, from the planted file
    plant_pickle(os.path.join(hostile, "zero", "mp_rank_00_model_states.pt"), os.path.join(root, "MARKER"))
    try:
        build("zero2", weights).load(hostile)
        out["hostile_zero2"] = "loaded"
    except Exception as e:  # noqa: BLE001 - the test inspects whatever was raised
        out["hostile_zero2"] = f"{type(e).__name__}: {e}"
    torch.save(out, os.path.join(root, "reshard.pt"))
    dist.destroy_process_group()


def _spawn(worker, world_size: int, root: str) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    torch.multiprocessing.spawn(worker, args=(world_size, port, root), nprocs=world_size, join=True)
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = str(tmp_path_factory.mktemp("parallel"))
    timings = {name: _spawn(worker, ws, root) for name, worker, ws in
               (("train", _train_worker, 2), ("resume", _resume_worker, 2), ("reshard", _reshard_worker, 1))}
    print("round timings (s):", {k: round(v, 1) for k, v in timings.items()})
    results = {name: torch.load(os.path.join(root, f"{name}.pt"), weights_only=False)
               for name in ("train", "resume", "reshard")}
    results["root"] = root
    for strategy, r in results["train"].items():
        print(f"{strategy}: build {r['build_s']:.1f}s, train {r['total_s']:.1f}s, "
              f"resume+bf16 {results['resume'][strategy]['total_s']:.1f}s, losses {r['losses']}")
    return results


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert diff == [], f"{what}: {len(diff)} tensors differ, e.g. {diff[:3]}"


def test_losses_are_finite_equal_across_strategies_and_decrease(runs):
    train = runs["train"]
    first = {s: train[s]["losses"][0] for s in STRATEGIES}
    for s in STRATEGIES:
        losses, norms = train[s]["losses"], train[s]["norms"]
        assert all(torch.isfinite(torch.tensor(losses + norms))), (s, losses, norms)
        assert losses[-1] < losses[0] and all(b < a for a, b in zip(losses, losses[1:])), (s, losses)
        assert first[s] == pytest.approx(first["ddp"], rel=1e-5), first
        assert norms[0] == pytest.approx(train["ddp"]["norms"][0], rel=1e-4), s
        # Different reduction orders, same math: the trajectories stay close.
        assert losses == pytest.approx(train["ddp"]["losses"], rel=1e-4), s
        assert train[s]["group_names"] == ["vision", "rest"]


def test_full_state_dict_has_the_plain_models_keys(runs):
    torch.manual_seed(0)
    plain = PiBehavior(tiny()).state_dict()
    for s in STRATEGIES:
        for sd in (runs["train"][s]["history"][-1], runs["train"][s]["ema"]):
            assert list(sd) == list(plain), s
            assert all(sd[k].shape == plain[k].shape and sd[k].dtype == torch.float32 for k in plain), s
    # The weights the engine started from are exactly the loaded ones, for every strategy.
    for s in STRATEGIES:
        assert_same(runs["train"][s]["history"][0], plain, f"{s} initial weights")


def test_resume_at_step_2_is_bitwise_identical_to_the_uninterrupted_run(runs):
    for s in STRATEGIES:
        assert_same(runs["resume"][s]["params"], runs["train"][s]["history"][-1], f"{s} params")
        assert_same(runs["resume"][s]["ema"], runs["train"][s]["ema"], f"{s} EMA")


def test_ema_follows_the_parameters_each_rank_owns(runs):
    for s in STRATEGIES:
        history = runs["train"][s]["history"]
        expected = {k: v.clone() for k, v in history[0].items()}
        for params in history[1:]:
            for k in expected:
                expected[k].lerp_(params[k], 1.0 - EMA_DECAY)
        ema = runs["train"][s]["ema"]
        assert_same(ema, expected, f"{s} EMA vs the EMA of the exported weights")  # same fp32 lerps, same bits
        moved = [k for k in expected if not torch.equal(history[-1][k], history[0][k])]
        assert moved and any(not torch.equal(ema[k], history[-1][k]) for k in moved), s


def test_checkpoints_load_at_world_size_1(runs):
    """fsdp via DCP resharding, zero2/zero3 via DeepSpeed's universal checkpoint (+ EMA files resharded)."""
    for s in ("fsdp", *UNIVERSAL):
        r = runs["reshard"][s]
        assert_same(r["params"], runs["train"][s]["history"][SAVE_AT], f"{s} ws=1 params")
        assert_same(r["ema"], runs["train"][s]["ema_at_save"], f"{s} ws=1 EMA")
        assert torch.isfinite(torch.tensor([r["loss"], r["norm"]])).all(), s


def test_bf16_with_a_frozen_group(runs):
    """bf16 on CPU (DDP autocast, FSDP MixedPrecisionPolicy, DeepSpeed's torch autocast) with the vision tower
    frozen."""
    plain = runs["train"]["ddp"]["history"][0]
    for s in STRATEGIES:
        r = runs["resume"][s]["bf16_frozen"]
        assert r["group_names"] == ["rest"], s
        assert torch.isfinite(torch.tensor([r["loss"], r["norm"]])).all(), s
        assert r["loss"] == pytest.approx(runs["train"][s]["losses"][0], rel=2e-2), s
        params = r["params"]
        assert all(v.dtype == torch.float32 for v in params.values()), s
        vision = [k for k in plain if k.startswith("vision_tower.")]
        # Parameters stay fp32 in every strategy (ZeRO too: autocast, not DeepSpeed's bf16 mode, which rounded
        # frozen weights to bf16): the frozen tower is bit-identical.
        assert_same({k: params[k] for k in vision}, {k: plain[k] for k in vision}, f"{s} frozen vision tower")
        trained = [k for k in plain if not k.startswith("vision_tower.") and not torch.equal(params[k], plain[k])]
        assert len(trained) > len(plain) // 4, s


def test_engine_model_serves_evaluation_calls(runs):
    ref = runs["resume"]["ddp"]["actions"]
    assert ref.shape == (B, 30, 32) and torch.isfinite(ref).all()
    for s in STRATEGIES:
        for key in ("actions", "expected"):
            torch.testing.assert_close(runs["resume"][s][key], runs["resume"]["ddp"][key], rtol=1e-3, atol=1e-4,
                                       msg=f"{s} {key}")


def test_a_pickle_planted_in_any_checkpoint_file_never_runs(runs, tmp_path):
    """Every kind of file of every strategy's checkpoint in turn holds a pickle that would create a marker file.
    With the integrity record as written, verification names the file; with the record rewritten to match (an
    attacker who can write the storage), the pickle-free readers still refuse every file anything reads.

    One copy per strategy, each file planted and restored in place and checked on its own (check_files over
    that file's record), plus one whole-checkpoint verify() per strategy: checking every file with a full
    verify of a fresh copy was quadratic in the checkpoint (>600 s in CI with DeepSpeed's universal dirs).
    Files of one kind (same name, read by the same parser: zero_universal/<param>/fp32.pt, ...) are
    represented by the first one."""
    marker = tmp_path / "MARKER"
    # DeepSpeed's tag files (we pass the tag) and its helper scripts.
    never_read = {"latest", "latest_universal", "zero_to_fp32.py", "zero_to_torch.py"}
    refused = ("refusing to unpickle", "does not parse", "not a readable")
    for s in STRATEGIES:
        ckpt = str(tmp_path / s)
        shutil.copytree(os.path.join(runs["root"], f"ckpt_{s}"), ckpt)
        record = integrity.write_record(ckpt, 0)
        kinds: dict[tuple[str, bool], str] = {}
        for rel in record:
            in_zero = any(part.startswith("zero") for part in rel.split("/")[:-1])
            kinds.setdefault((os.path.basename(rel), in_zero), rel)
        assert kinds, s
        for rel in kinds.values():
            path = os.path.join(ckpt, rel)
            with open(path, "rb") as f:
                original = f.read()
            plant_pickle(path, str(marker))
            problem = integrity.check_files(ckpt, {rel: record[rel]}, rank=0, world_size=1)
            assert problem and problem.startswith(rel + ":") and ("checksum" in problem or "bytes" in problem), \
                (s, rel, problem)
            rewritten = {rel: {"size": os.path.getsize(path), "sha256": integrity.sha256_of(path)}}
            problem = integrity.check_files(ckpt, rewritten, rank=0, world_size=1)  # the attacker's record
            if os.path.basename(rel) in never_read:
                assert problem is None, (s, rel, problem)
            else:
                assert problem and problem.startswith(rel + ":"), (s, rel, problem)
                assert any(r in problem for r in refused), (s, rel, problem)
            assert not marker.exists(), (s, rel)
            with open(path, "wb") as f:
                f.write(original)
        # The whole-checkpoint path a restore takes: intact, then the first data file planted + record rewritten.
        assert integrity.verify(ckpt, 1) is None, s
        target = next(rel for (name, _), rel in kinds.items() if name not in never_read and not name.endswith(".json"))
        plant_pickle(os.path.join(ckpt, target), str(marker))
        integrity.write_record(ckpt, 0)
        problem = integrity.verify(ckpt, 1)
        assert problem and problem.startswith(target + ":") and any(r in problem for r in refused), (s, problem)
        assert not marker.exists(), s
        shutil.rmtree(ckpt)
    # The DCP format holds no pickle at all; DeepSpeed's loader itself refuses one (reshard round).
    assert not [f for s in ("ddp", "fsdp") for f in os.listdir(os.path.join(runs["root"], f"ckpt_{s}"))
                if f.endswith((".distcp", ".metadata", ".pt"))]
    assert "refusing to unpickle" in runs["reshard"]["hostile_zero2"], runs["reshard"]["hostile_zero2"]
    assert not os.path.exists(os.path.join(runs["root"], "MARKER"))
