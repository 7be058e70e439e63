"""Pipeline pieces that need no cluster: config, scheduling, mapping, evaluation math, unit conversion."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer.eval_report import ACCURACY_COLUMNS, format_table, heatmap_figure, task_rows
from trainer.evaluate import GROUPS, evaluate_model, keyed_noise, unit_conversion
from trainer.overrides import apply_overrides
from trainer.pipeline import concurrent_slots
from trainer.pipeline_config import PipelineConfig, SubsetSpec
from trainer.pipeline_report import build_mapping
from trainer.recipes import PIPELINES, SEED_SUBSETS, get_pipeline, pi_behavior_debug


def test_default_pipeline_uses_the_seeds_four_groups_covering_50_tasks_once():
    cfg = get_pipeline("pi_behavior_b1k_2stage")
    assert [len(s.tasks) for s in cfg.subsets] == [20, 16, 13, 1]
    assert cfg.subsets == SEED_SUBSETS and cfg.tasks == tuple(range(50))
    assert dict((s.name, s.tasks) for s in cfg.subsets)["ckpt4"] == (40,)
    cfg.check_tasks(set(range(50)))
    for name in PIPELINES:
        assert get_pipeline(name).recipe == name


def test_subset_overrides_and_validation():
    cfg = apply_overrides(get_pipeline("pi_behavior_debug_2stage"),
                          ["subsets=a:40,0;b:1", "finetune.num_steps=3", "train.num_steps=4",
                           "eval.max_samples_per_task=9"])
    assert cfg.subsets == (SubsetSpec(name="a", tasks=(0, 40)), SubsetSpec(name="b", tasks=(1,)))
    assert (cfg.finetune.num_steps, cfg.train.num_steps, cfg.eval.max_samples_per_task) == (3, 4, 9)
    with pytest.raises(ValueError, match="task 1 is in subsets 'a' and 'b'"):
        PipelineConfig(recipe="x", train=pi_behavior_debug(), subsets=("a:0,1", "b:1"))
    with pytest.raises(ValueError, match="must look like name:0,1,2"):
        apply_overrides(get_pipeline("pi_behavior_debug_2stage"), ["subsets=0,1,40"])
    with pytest.raises(ValueError, match="not 'pretrain'"):
        PipelineConfig(recipe="x", train=pi_behavior_debug(), subsets=("pretrain:0",))
    with pytest.raises(ValueError, match=r"tasks \[2\] are in the data but in no subset.*tasks \[40\] are in a subset"):
        cfg.check_tasks({0, 1, 2})
    with pytest.raises(ValueError, match="unknown pipeline recipe 'pi_behavior_debug_2stag'; did you mean"):
        get_pipeline("pi_behavior_debug_2stag")


def test_concurrent_slots_packs_fine_tunes_by_gpus_else_cpus():
    assert concurrent_slots({"CPU": 2.0}, workers_per_job=1, jobs=2) == 2
    assert concurrent_slots({"CPU": 2.0}, workers_per_job=2, jobs=4) == 1
    assert concurrent_slots({"CPU": 1.0}, workers_per_job=2, jobs=4) == 1  # never 0: run in sequence
    assert concurrent_slots({"CPU": 96.0, "GPU": 16.0}, workers_per_job=8, jobs=4) == 2
    assert concurrent_slots({"CPU": 96.0, "GPU": 32.0}, workers_per_job=8, jobs=4) == 4
    assert concurrent_slots({"CPU": 8.0}, workers_per_job=1, jobs=3) == 3


def test_mapping_is_the_seed_format_with_every_task_once():
    versions = {"a": {"model": "m-a", "version": "2", "export": "s3://b/a/export"},
                "b": {"model": "m-b", "version": "1", "export": "s3://b/b/export"}}
    subsets = (SubsetSpec(name="a", tasks=(0, 1)), SubsetSpec(name="b", tasks=(40,)))
    mapping = build_mapping(subsets, versions)
    assert mapping == {"checkpoints": {
        "a": {"path": "s3://b/a/export", "tasks": [0, 1], "model_uri": "models:/m-a/2"},
        "b": {"path": "s3://b/b/export", "tasks": [40], "model_uri": "models:/m-b/1"}}}
    with pytest.raises(ValueError, match="task 1 maps to both a and b"):
        build_mapping((subsets[0], SubsetSpec(name="b", tasks=(1,))), versions)


class _OffsetPolicy:
    """A stand-in policy with known errors: predicts the target plus 0.5 on the base dims, and the right stage for
    even samples only."""

    cfg = SimpleNamespace(action_horizon=30)
    noise = SimpleNamespace(chol_reg=torch.zeros(1), sample=lambda shape, generator: torch.randn(
        (*shape, 30, 32), generator=generator))

    def eval(self):
        return self

    def sample_actions(self, batch, num_steps=None, noise=None):
        pred = batch["actions"].clone()
        pred[..., GROUPS["base"]] += 0.5
        logits = torch.zeros(len(batch["stage"]), 4)
        wrong = (batch["stage"] + 1) % 4
        chosen = torch.where(torch.arange(len(wrong)) % 2 == 0, batch["stage"], wrong)
        logits[torch.arange(len(chosen)), chosen] = 1.0
        return pred, logits


def test_evaluation_numbers_per_task_step_group_and_baseline():
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(3):
        actions = torch.randn(4, 30, 32, generator=g)
        mask = torch.ones(4, 30, dtype=torch.bool)
        mask[:, 20:] = False  # padded tail of an episode: never counted
        batches.append({"task": torch.tensor([0, 0, 40, 40]), "stage": torch.tensor([0, 1, 2 if i == 0 else 1, 1]),
                        "actions": actions, "action_mask": mask, "episode": torch.tensor([0, 0, 1, 1]),
                        "frame": torch.tensor([2 * i, 2 * i + 1, 2 * i, 2 * i + 1])})
    out = evaluate_model(_OffsetPolicy(), batches, tasks={0, 40})
    for task in ("0", "40"):
        r = out["tasks"][task]
        assert r["num_samples"] == 6
        assert r["action_mse_per_group"]["base"] == pytest.approx(0.25)
        assert r["action_mse_per_group"]["arms"] == 0.0 and r["action_mse_per_group"]["grippers"] == 0.0
        assert r["action_mse"] == pytest.approx(0.25 * 3 / 23)
        assert r["action_mse_per_step"][:20] == pytest.approx([0.25 * 3 / 23] * 20)
        assert r["action_mse_per_step"][20:] == [0.0] * 10
        assert r["stage_acc"] == pytest.approx(0.5)
        rows = [b["task"] == int(task) for b in batches]
        target = torch.cat([b["actions"][m][:, :20, :23] for b, m in zip(batches, rows)])
        assert r["baseline"]["action_mse"] == pytest.approx(float((target**2).mean()), rel=1e-5)
    assert out["tasks"]["40"]["baseline"]["stage_acc"] == pytest.approx(5 / 6)  # label 1 in 5 of 6 samples
    assert out["tasks"]["0"]["baseline"]["stage_acc"] == pytest.approx(1 / 2)
    assert out["overall"]["action_mse"] == pytest.approx(0.25 * 3 / 23)
    only = evaluate_model(_OffsetPolicy(), batches, tasks={40})
    assert list(only["tasks"]) == ["40"]
    with pytest.raises(ValueError, match="no samples of tasks \\[7\\]"):
        evaluate_model(_OffsetPolicy(), batches, tasks={7})


def _eval_samples(n: int) -> dict[str, torch.Tensor]:
    """n held-out-like samples of tasks 0 and 40 (two episodes each), as the eval StreamLoader yields them."""
    g = torch.Generator().manual_seed(1)
    return {"images": torch.randint(0, 256, (n, 3, 224, 224, 3), dtype=torch.uint8, generator=g),
            "state": torch.randn(n, 32, generator=g), "actions": torch.randn(n, 30, 32, generator=g),
            "action_mask": torch.ones(n, 30, dtype=torch.bool), "task": torch.tensor([0, 40] * (n // 2)),
            "stage": torch.randint(0, 5, (n,), generator=g), "episode": torch.arange(n) % 4,
            "frame": torch.arange(n) // 4}


def test_evaluation_does_not_depend_on_the_batch_size_or_order():
    """A tiny pi-behavior on 16 samples in batches of 1, 8 (in reverse order) and 32 (all at once): every number
    agrees to 1e-6, because each sample's noise is keyed by (seed, task, episode, frame), not by batch or position."""
    from models.pi_behavior.config import tiny
    from models.pi_behavior.model import PiBehavior

    torch.manual_seed(0)
    model = PiBehavior(tiny()).eval()
    data = _eval_samples(16)

    def batches(size: int, order: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [{k: v[order[i:i + size]] for k, v in data.items()} for i in range(0, len(order), size)]

    def flat(result) -> list[float]:
        rows = [result["overall"], *result["tasks"].values()]
        return [v for r in rows for v in (r["action_mse"], r["stage_acc"], *r["action_mse_per_step"],
                                          *r["action_mse_per_group"].values())]

    ordered, reverse = torch.arange(16), torch.arange(15, -1, -1)
    runs = {size: flat(evaluate_model(model, batches(size, order), num_inference_steps=2))
            for size, order in ((1, ordered), (8, reverse), (32, ordered))}
    for size in (1, 8):
        assert runs[size] == pytest.approx(runs[32], rel=1e-6, abs=1e-9), size
    # The noise itself: a sample's row is the same alone as inside a batch, and the seed reaches it.
    draw = model.noise.sample
    full = keyed_noise(lambda g: draw((1,), generator=g), data, seed=0)
    alone = keyed_noise(lambda g: draw((1,), generator=g), {k: v[5:6] for k, v in data.items()}, seed=0)
    assert torch.equal(full[5:6], alone)
    assert not torch.equal(keyed_noise(lambda g: draw((1,), generator=g), data, seed=1), full)


def test_unit_conversion_is_exact_between_two_normalisations():
    rng = np.random.default_rng(0)

    def stats():
        return SimpleNamespace(state_mean=rng.normal(size=23), state_std=rng.uniform(0.5, 2, size=23),
                               per_timestep_mean=rng.normal(size=(30, 32)),
                               per_timestep_std=rng.uniform(0.1, 3, size=(30, 32)))

    a, b = stats(), stats()
    raw = rng.normal(size=(5, 30, 23))
    xa = (raw - a.per_timestep_mean[:, :23]) / (a.per_timestep_std[:, :23] + 1e-6)
    xb = (raw - b.per_timestep_mean[:, :23]) / (b.per_timestep_std[:, :23] + 1e-6)
    scale, shift = unit_conversion(a, b)
    np.testing.assert_allclose(xa * scale + shift, xb, rtol=1e-4, atol=1e-4)


def _task_result(mse: float, acc: float) -> dict:
    return {"num_samples": 24, "action_mse": mse, "stage_acc": acc, "baseline": {"action_mse": 1.0, "stage_acc": 0.4},
            "action_mse_per_group": {"base": 1.3 * mse, "torso": 0.8 * mse, "arms": mse, "grippers": 0.05 * mse}}


def test_heatmap_has_colour_bars_one_direction_and_unambiguous_columns():
    import matplotlib.pyplot as plt

    results = {"ckpt1": {"tasks": {"0": _task_result(3.0, 0.3)}}, "ckpt4": {"tasks": {"40": _task_result(0.5, 0.9)}},
               "pretrain": {"tasks": {"0": _task_result(3.5, 0.2), "40": _task_result(1.5, 0.3)}}}
    rows = task_rows(results, {0: "ckpt1", 40: "ckpt4"}, reference="pretrain")
    expected = ["mse", "mean_action_mse", "mse_ratio", "robot_base", "torso", "arms", "grippers", "stage_acc",
                "majority_acc", "pretrain_mse"]
    assert format_table(rows).split("\n")[0].split() == ["task", "model", *expected]
    assert rows[0]["robot_base"] == pytest.approx(3.9) and rows[0]["mean_action_mse"] == 1.0
    fig = heatmap_figure(rows, title="t")
    try:
        ax, *bars = fig.axes
        assert [t.get_text() for t in ax.get_xticklabels()] == expected
        labels = [b.get_ylabel() for b in bars]
        assert len(bars) == 2 and "lower = darker = better" in labels[1] and "higher = darker" in labels[0]
        images = {im.get_cmap().name: im for im in ax.get_images()}
        mse_img, acc_img = images["viridis"], images["viridis_r"]

        def luminance(img, value: float) -> float:
            r, g, b, _ = img.to_rgba(value)
            return 0.2126 * r + 0.7152 * g + 0.0722 * b

        # Darker = better in both scales: a lower MSE and a higher accuracy are darker.
        assert luminance(mse_img, 0.5) < luminance(mse_img, 3.0)
        assert luminance(acc_img, 0.9) < luminance(acc_img, 0.3)
        # Each image colours only its own columns (the rest are masked).
        j_acc = [expected.index(c) for c in ACCURACY_COLUMNS]
        assert not mse_img.get_array().mask[:, [0, 1, 3, 9]].any() and mse_img.get_array().mask[:, j_acc].all()
        assert mse_img.get_array().mask[:, 2].all() and acc_img.get_array().mask[:, 2].all()  # mse_ratio
    finally:
        plt.close(fig)
