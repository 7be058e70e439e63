"""X-VLA data side: enriched instructions, skill class weights from the stats, the sample transform, and the
X-VLA recipes and config checks."""

from __future__ import annotations

import numpy as np
import pytest

from data_loaders.instructions import clean_object_name, enriched_instruction, skill_phrase, task_sentence
from tests.unit.test_norm_stats import _random_stats


@pytest.mark.parametrize("raw, clean", [("coffee_table_koagbh_0", "coffee table"), ("radio_89", "radio"),
                                        ("wine_bottle_212_1", "wine bottle"), ("water_bottle_xyzabc_3", "water bottle"),
                                        ("agent.n.01_1", "agent"), ("bottle_4", "bottle")])
def test_clean_object_name(raw, clean):
    assert clean_object_name(raw) == clean


def test_enriched_instruction_matches_the_cards_example():
    text = enriched_instruction(0, 2, ["radio_89", "coffee_table_koagbh_0"], {0: "turn on the radio"})
    assert text == "Turn on the radio. Current: pick up radio from coffee table."
    assert enriched_instruction(0, -1, [], {0: "turn on the radio"}) == "Turn on the radio."  # no skill known
    assert task_sentence(40) == "Make microwave popcorn."  # no manifest sentence: the task name
    assert skill_phrase(2, ["radio_89"]) == "pick up radio"  # fewer objects: no dangling "from"
    assert skill_phrase(34, ["knife_1", "carrot_2"]) == "chop carrot with knife"
    assert skill_phrase(999, ["x_1"]) == ""


def test_skill_class_weights_are_inverse_sqrt_frequency_with_mean_one():
    import dataclasses

    stats = dataclasses.replace(_random_stats(), skill_counts=np.array([100, 25, 0, 4] + [0] * 27))
    w = stats.skill_class_weights(34)
    present = np.array([100, 25, 4]) ** -0.5
    np.testing.assert_allclose(w[[0, 1, 3]], present / present.mean())
    assert w[2] == 1.0 and w[33] == 1.0 and w.shape == (34,)
    assert w[0] < w[1] < w[3]  # the rare skill weighs most
    with pytest.raises(ValueError, match="no skill counts"):
        _random_stats().skill_class_weights(34)


def test_xvla_transform_fields_and_deterministic_instruction_choice():
    from data_loaders.xvla_transform import XVLASampleTransform
    from models.xvla.tokenizer import byte_level_tokenizer

    rng = np.random.default_rng(0)
    sample = {"images": [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)],
              "state": rng.normal(size=23).astype(np.float32), "actions": rng.normal(size=(30, 23)).astype(np.float32),
              "action_mask": np.ones(30, bool),
              "meta": {"task": 0, "stage": 1, "skill_id": 2, "skill_valid": True, "skill_objects": ["radio_89"],
                       "episode": 5, "frame": 7, "timestamp": 0.2}}
    tr = XVLASampleTransform(tokenizer=byte_level_tokenizer(), max_text_len=48, instructions={0: "turn on the radio"},
                             enriched_fraction=1.0)
    out = tr(sample, np.random.default_rng(1))
    assert out["input_ids"].shape == (48,) and out["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(out["proprio"], sample["state"])  # raw state, absolute actions: auto mode
    np.testing.assert_array_equal(out["actions"], sample["actions"])
    assert out["images"].shape == (3, 224, 224, 3) and int(out["skill"]) == 1  # raw skill id 2 -> class 1
    task_only = XVLASampleTransform(tokenizer=tr.tokenizer, max_text_len=48, instructions={0: "turn on the radio"},
                                    enriched_fraction=0.0)
    assert not np.array_equal(task_only(sample, np.random.default_rng(1))["input_ids"], out["input_ids"])
    half = XVLASampleTransform(tokenizer=tr.tokenizer, max_text_len=48, instructions={}, enriched_fraction=0.5)
    texts = [half.text(sample, np.random.default_rng(s)) for s in range(40)]
    assert texts == [half.text(sample, np.random.default_rng(s)) for s in range(40)]
    assert 5 < sum("Current:" in t for t in texts) < 35


def test_xvla_recipes_and_config_checks():
    from trainer.overrides import apply_overrides
    from trainer.recipes import get_recipe, recipe_names

    names = [n for n in recipe_names() if n.startswith("xvla_")]
    assert {"xvla_b1k_lr2e4", "xvla_b1k_lr2e5", "xvla_b1k_lr1e4", "xvla_debug"} <= set(names)
    cfg = get_recipe("xvla_b1k_lr2e4")
    assert (cfg.family, cfg.model, cfg.optim.peak_lr, cfg.optim.warmup_steps, cfg.optim.freeze_steps) == (
        "xvla", "full", 2e-4, 2000, 1000)
    assert cfg.optim.betas == (0.9, 0.95) and dict(cfg.optim.lr_multipliers)["vlm"] == 0.1
    assert cfg.micro_batch_size == 16 and get_recipe("xvla_single_task_1").data.tasks == (1,)
    with pytest.raises(ValueError, match="must start with one of"):
        apply_overrides(cfg, ["init_from=pi05:/x"])
    with pytest.raises(ValueError, match="family"):
        apply_overrides(cfg, ["family=openvla"])


def _instruction_tokenizer():
    """X-VLA's BART tokenizer when a directory with it is given (B1K_XVLA_TOKENIZER, e.g. X-VLA-Pt), else the
    byte-level one of the tiny models; with the model size whose limit applies."""
    import os

    from models.xvla.config import full, tiny
    from models.xvla.tokenizer import byte_level_tokenizer, load_tokenizer

    path = os.environ.get("B1K_XVLA_TOKENIZER")
    if path:
        return load_tokenizer(path), full().max_text_len, True
    return byte_level_tokenizer(), tiny().max_text_len, False


def test_every_enriched_instruction_keeps_its_skill_phrase():
    """All 50 task sentences x all 34 skills (with long object names): the skill phrase survives tokenization.
    With BART's tokenizer nothing is shortened at the full model's limit; with the byte-level one (up to ~500
    bytes per sentence) the task sentence is shortened and the phrase kept."""
    from data_loaders.behavior_facts import TASK_INSTRUCTIONS
    from data_loaders.instructions import XVLA_SKILLS, instruction_ids, required_text_len, skill_phrase

    tok, limit, real = _instruction_tokenizer()
    objects = ["wine_bottle_212_1", "kitchen_cabinet_xyzabc_0", "coffee_table_koagbh_0"]
    phrases = [skill_phrase(sid, objects) for sid, _ in XVLA_SKILLS]
    assert all(phrases) and len(phrases) == 34
    sentences = [task_sentence(t, dict(enumerate(TASK_INSTRUCTIONS))) for t in range(50)]
    shortened = 0
    for sentence in sentences:
        for phrase in phrases:
            ids = instruction_ids(tok, sentence, phrase, limit)
            assert len(ids) == limit
            text = tok.decode(ids, skip_special_tokens=True)
            assert text.endswith(f" Current: {phrase}."), (sentence[:40], phrase, text[-80:])
            shortened += text != f"{sentence} Current: {phrase}."
    if real:  # the limit follows from the longest instruction: nothing is cut
        assert shortened == 0 and required_text_len(tok, sentences, phrases) <= limit
    else:
        assert shortened > 0
    # The task-only instruction (what the server sends) is plain truncation, like X-VLA's processor.
    assert len(instruction_ids(tok, sentences[49], "", limit)) == limit
