"""Enriched language instructions for the X-VLA BEHAVIOR variant (xvla.md §3.4), shared by training and serving.

    "<task sentence>. Current: <skill phrase>."   e.g. "Turn on the radio. Current: pick up radio from coffee table."

The skill phrase renders the annotated skill with its objects through a per-skill template ("pick up {0} from
{1}"), object ids cleaned to words: the trailing instance index (`_0`, `_212_1`) and the 6-letter model hash
(`_koagbh`) are dropped, underscores become spaces (`coffee_table_koagbh_0` -> "coffee table"). Without a known
skill the instruction is the task sentence alone (what the server sends before the classifier has spoken).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from data_loaders.behavior_facts import SKILL_INDEX, SKILLS, TASK_NAMES

# --- The X-VLA skill table -------------------------------------------------------------------------------------
# 34 rows, as the seed's checkpoints have (skill_prompt_hub [34, ...], a 34-way classifier): the skill registry of
# xvla.md §3.3, row = rank of the raw BEHAVIOR skill id. The 2025 data annotates the 31 skills of
# behavior_facts.SKILLS, whose dense index SKILL_INDEX is the same ranking, so those are rows 0..30 and data
# labels need no remapping; rows 31..33 (raw 100-102) never occur in it. Rows a dataset never uses are reported by
# `b1k-train data stats` and masked out of the classifier's loss and argmax (XVLA.set_skill_rows_used).
XVLA_SKILLS: tuple[tuple[int, str], ...] = (
    *((sid, phrase) for sid, phrase, _ in SKILLS),
    (100, "push tray"), (101, "pull tray"), (102, "sweep off"),
)
NUM_XVLA_SKILLS = len(XVLA_SKILLS)
XVLA_SKILL_ROW: dict[int, int] = {sid: row for row, (sid, _) in enumerate(XVLA_SKILLS)}  # raw id -> row
_PHRASES: dict[int, str] = dict(XVLA_SKILLS)
if NUM_XVLA_SKILLS != 34 or any(XVLA_SKILL_ROW[sid] != row for sid, row in SKILL_INDEX.items()) \
        or [sid for sid, _ in XVLA_SKILLS] != sorted(XVLA_SKILL_ROW):
    raise AssertionError("XVLA_SKILLS must be the 34 raw ids in ascending order, extending SKILL_INDEX")

# {i} = the i-th object of the annotation; a template needing more objects than given drops the missing ones.
SKILL_TEMPLATES: dict[str, str] = {
    "move to": "move to {0}", "pick up from": "pick up {0} from {1}", "place on": "place {0} on {1}",
    "place in": "place {0} in {1}", "hand over": "hand over {0}", "insert": "insert {0} into {1}",
    "release": "release {0}", "open drawer": "open drawer of {0}", "open door": "open door of {0}",
    "close drawer": "close drawer of {0}", "close door": "close door of {0}", "open lid": "open lid of {0}",
    "close lid": "close lid of {0}", "attach": "attach {0} to {1}", "pour": "pour {0} into {1}",
    "chop": "chop {1} with {0}", "wipe hard": "wipe {1} with {0}", "sweep surface": "sweep {1} with {0}",
    "hang": "hang {0} on {1}", "press": "press {0}", "turn on switch": "turn on {0}",
    "turn off switch": "turn off {0}", "ignite": "ignite {0}", "push to": "push {0} to {1}",
    "place on next to": "place {0} on {1} next to {2}", "place in next to": "place {0} in {1} next to {2}",
    "turn to": "turn {0}", "hold": "hold {0}", "spray": "spray {1} with {0}", "place under": "place {0} under {1}",
    "tip over": "tip over {0}", "push tray": "push tray {0}", "pull tray": "pull tray {0}",
    "sweep off": "sweep {1} off {2} with {0}",
}
# 6 lowercase letters that are real words, not model hashes, in BEHAVIOR object ids.
_WORDS = frozenset({"bottle", "basket", "camera", "tripod", "carton", "bucket", "button", "candle", "cookie",
                    "drawer", "faucet", "fridge", "hammer", "kettle", "ladder", "lemons", "napkin", "pillow",
                    "pepper", "potato", "radish", "salmon", "saucer", "shovel", "sponge", "teapot", "tomato",
                    "towels", "toybox", "walnut", "washer", "wicker", "window", "wreath", "burner", "stools",
                    "mixing", "baking", "gloves", "boxing", "shorts", "jersey", "blinds", "crates", "apples",
                    "onions", "grapes", "lights", "papers", "trophy", "garden", "hedges", "sprays", "frying"})
_PREPOSITIONS = frozenset({"from", "on", "in", "into", "to", "with", "of", "under", "next", "off"})
_INDEX = re.compile(r"(_\d+)+$")


def clean_object_name(object_id: str) -> str:
    """`coffee_table_koagbh_0` -> "coffee table"; `radio_89` -> "radio"; `agent.n.01_1` -> "agent"."""
    name = _INDEX.sub("", object_id.split(".", 1)[0] if "." in object_id else object_id)
    parts = name.split("_")
    if len(parts) > 1 and re.fullmatch(r"[a-z]{6}", parts[-1]) and parts[-1] not in _WORDS:
        parts = parts[:-1]
    return " ".join(p for p in parts if p)


def task_sentence(task: int, instructions: dict[int, str] | None = None) -> str:
    """The dataset's instruction for the task (manifest "tasks"), else its name as words; ends with a period."""
    text = (instructions or {}).get(task) or TASK_NAMES[task].replace("_", " ")
    text = text.strip()
    text = text[0].upper() + text[1:] if text else text
    return text if text.endswith(".") else text + "."


def skill_phrase(skill_id: int, objects: Sequence[str]) -> str:
    """"pick up radio from coffee table" for skill 2 with its two objects; '' for an unknown skill."""
    phrase = _PHRASES.get(skill_id, "")
    if not phrase:
        return ""
    names = [clean_object_name(o) for o in objects]
    template = SKILL_TEMPLATES.get(phrase, phrase + " {0}")
    used = [int(i) for i in re.findall(r"\{(\d)\}", template)]
    if used and max(used) >= len(names):
        # Fewer objects than the template wants: keep it up to the first missing object, minus dangling
        # prepositions ("pick up radio from {1}" -> "pick up radio").
        cut = template[: template.index("{%d}" % min(i for i in used if i >= len(names)))]
        words = re.sub(r"\{(\d)\}", lambda m: names[int(m.group(1))], cut).split()
        while words and words[-1] in _PREPOSITIONS:
            words.pop()
        return " ".join(words)
    return template.format(*names)


def enriched_instruction(task: int, skill_id: int, objects: Sequence[str],
                         instructions: dict[int, str] | None = None) -> str:
    """"Turn on the radio. Current: pick up radio from coffee table." (the task sentence alone without a skill)."""
    sentence = task_sentence(task, instructions)
    phrase = skill_phrase(skill_id, objects) if skill_id >= 0 else ""
    return f"{sentence} Current: {phrase}." if phrase else sentence


def skill_rows_used(counts: Sequence[int], num_rows: int = NUM_XVLA_SKILLS) -> np.ndarray:
    """(num_rows,) bool: the skill-table rows with at least one labelled frame (`counts`: frames per row, as the
    stats step counts them; rows past its end were never seen)."""
    used = np.zeros(num_rows, bool)
    counts = np.asarray(counts)[:num_rows]
    used[: len(counts)] = counts > 0
    return used


def unused_skill_rows(counts: Sequence[int]) -> list[str]:
    """"row 31 (raw 100 push tray)" for every row of the 34 the data never labels."""
    used = skill_rows_used(counts)
    return [f"row {row} (raw {sid} {phrase})" for row, (sid, phrase) in enumerate(XVLA_SKILLS) if not used[row]]


SKILL_SEPARATOR = " Current: "


def instruction_ids(tokenizer: Any, sentence: str, phrase: str, max_len: int) -> list[int]:
    """BART ids of "<sentence> Current: <phrase>." (or the sentence alone for an empty phrase), padded to
    `max_len`. When the text is longer, the task sentence loses its last tokens and the skill phrase stays whole;
    ValueError when even "<s> Current: <phrase>. </s>" does not fit."""
    text = f"{sentence}{SKILL_SEPARATOR}{phrase}." if phrase else sentence
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) > max_len and phrase:
        head = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        tail = tokenizer(f"{SKILL_SEPARATOR}{phrase}.", add_special_tokens=False)["input_ids"]
        room = max_len - 2 - len(tail)
        if room < 0:
            raise ValueError(f"the skill phrase {phrase!r} needs {len(tail) + 2} tokens; max_text_len is {max_len}")
        ids = [tokenizer.bos_token_id, *head[:room], *tail, tokenizer.eos_token_id]
    ids = ids[:max_len]  # a task sentence alone is truncated like X-VLA's processor does
    return ids + [tokenizer.pad_token_id] * (max_len - len(ids))


def required_text_len(tokenizer: Any, sentences: Sequence[str], phrases: Sequence[str]) -> int:
    """Tokens the longest "<sentence> Current: <phrase>." needs with <s> and </s> (nothing shortened)."""
    longest_phrase = max(phrases, key=lambda p: len(tokenizer(f"{SKILL_SEPARATOR}{p}.",
                                                              add_special_tokens=False)["input_ids"]))
    return max(len(tokenizer(f"{s}{SKILL_SEPARATOR}{longest_phrase}.")["input_ids"]) for s in sentences)
