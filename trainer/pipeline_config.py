"""Typed configuration of `b1k-train pipeline`: pretrain on all tasks, fine-tune per task subset, evaluate,
register. Frozen dataclasses validated at construction; `--set` reaches every field (`train.num_steps=...`,
`finetune.peak_lr=...`, `subsets=ckpt1:0,1;ckpt2:40`, `eval.holdout_fraction=...`)."""

from __future__ import annotations

import dataclasses
import re

from trainer.config import TrainConfig

POLICIES = ("mean_mse", "per_task")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SubsetSpec:
    """A fine-tune: a name (used in run, model and mapping names) and the task ids it owns."""

    name: str
    tasks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"subset name {self.name!r} must be lowercase letters, digits, '-' or '_' (<= 41 chars)")
        object.__setattr__(self, "tasks", tuple(sorted(int(t) for t in self.tasks)))
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"subset {self.name!r} needs distinct task ids, got {self.tasks}")

    @classmethod
    def from_text(cls, text: str) -> "SubsetSpec":
        """`name:1,2,3` (what `--set subsets=a:0,1;b:40` holds per subset)."""
        name, sep, ids = text.partition(":")
        if not sep:
            raise ValueError(f"subset {text!r} must look like name:0,1,2")
        try:
            return cls(name=name.strip(), tasks=tuple(int(t) for t in ids.split(",") if t.strip()))
        except ValueError as e:
            raise ValueError(f"subset {text!r}: {e}") from e


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """What changes from the pretrain config for the per-subset fine-tunes (everything else is inherited)."""

    num_steps: int = 30_000
    peak_lr: float = 2.5e-5
    warmup_steps: int = 500
    decay_steps: int = 30_000
    final_lr: float = 2.5e-6
    save_every: int = 500
    workers: str = ""  # Ray Train workers per fine-tune ("" = the pipeline's --workers)
    max_concurrent: int = 0  # fine-tunes running at once; 0 = as many as the cluster has room for

    def __post_init__(self) -> None:
        for name in ("num_steps", "save_every", "decay_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"finetune.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrent < 0:
            raise ValueError(f"finetune.max_concurrent must be >= 0 (0 = as many as fit), got {self.max_concurrent}")
        if self.peak_lr <= 0 or self.final_lr < 0 or self.warmup_steps < 0:
            raise ValueError("finetune.peak_lr must be > 0, final_lr >= 0 and warmup_steps >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Offline evaluation on held-out episodes (never trained on, by any stage)."""

    holdout_fraction: float = 0.05  # of each task's episodes (at least one, at most all but one)
    max_samples_per_task: int = 1024  # timesteps evaluated per task, spread over its held-out episodes
    batch_size: int = 32
    sampler: str = "sample"  # "sample": the policy's own flow sampler; "expected": the one-step conditional mean
    num_inference_steps: int = 0  # 0 = the model's configured number of sampler steps
    include_pretrain: bool = True  # also evaluate (and register) the pretrain model on every task
    num_gpus: float = -1  # per evaluation task; -1 = one if the cluster has GPUs, else CPU
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"eval.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.max_samples_per_task < 1 or self.batch_size < 1 or self.num_inference_steps < 0:
            raise ValueError("eval.max_samples_per_task and eval.batch_size must be >= 1, num_inference_steps >= 0")
        if self.sampler not in ("sample", "expected"):
            raise ValueError(f"eval.sampler must be 'sample' or 'expected', got {self.sampler!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromotionConfig:
    """When `b1k-train promote` moves @champion to the challenger (both judged on the challenger's tasks)."""

    policy: str = "mean_mse"  # mean_mse | per_task
    min_improvement: float = 0.0  # mean action MSE must drop by more than this fraction of the champion's
    max_task_regression: float = 0.05  # per_task: no task's MSE may rise by more than this fraction

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"promotion policy {self.policy!r} is not one of {POLICIES}")
        if not 0.0 <= self.min_improvement < 1.0 or self.max_task_regression < 0:
            raise ValueError("promotion.min_improvement must be in [0, 1) and max_task_regression >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    recipe: str  # pipeline registry name
    train: TrainConfig  # the pretrain run on all tasks; fine-tunes start from it
    subsets: tuple[SubsetSpec, ...]
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    promotion: PromotionConfig = dataclasses.field(default_factory=PromotionConfig)
    model_prefix: str = "pi-behavior"  # registered models are <prefix>-<subset> and <prefix>-pretrain
    experiment: str = "b1k-train"  # MLflow experiment of the training runs and the pipeline run

    def __post_init__(self) -> None:
        object.__setattr__(self, "subsets", tuple(
            SubsetSpec.from_text(s) if isinstance(s, str) else s for s in self.subsets))
        if not self.subsets:
            raise ValueError("a pipeline needs at least one fine-tune subset; e.g. --set subsets=all:0,1,40")
        names = [s.name for s in self.subsets]
        if len(set(names)) != len(names) or "pretrain" in names:
            raise ValueError(f"subset names must be distinct and not 'pretrain', got {names}")
        seen: dict[int, str] = {}
        for s in self.subsets:
            for t in s.tasks:
                if t in seen:
                    raise ValueError(f"task {t} is in subsets {seen[t]!r} and {s.name!r}; each task belongs to one")
                seen[t] = s.name
        if not _NAME.match(self.model_prefix):
            raise ValueError(f"model_prefix {self.model_prefix!r}: lowercase letters, digits, '-' or '_'")

    @property
    def tasks(self) -> tuple[int, ...]:
        return tuple(sorted(t for s in self.subsets for t in s.tasks))

    def check_tasks(self, data_tasks: set[int]) -> None:
        """Every task of the data belongs to exactly one subset, and no subset names a task without data."""
        missing, extra = sorted(data_tasks - set(self.tasks)), sorted(set(self.tasks) - data_tasks)
        if missing or extra:
            raise ValueError(
                "the subsets must cover the data's tasks exactly once: "
                + (f"tasks {missing} are in the data but in no subset; " if missing else "")
                + (f"tasks {extra} are in a subset but have no data; " if extra else "")
                + "fix them with --set subsets=name:ids;name:ids")

    def model_name(self, stage: str) -> str:
        return f"{self.model_prefix}-{stage}"
