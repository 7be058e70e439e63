"""Typed training configuration (frozen dataclasses validated at construction).

A run is fully described by a TrainConfig: a named recipe from trainer/recipes.py plus `--set key=value`
overrides (trainer/overrides.py). The config is stored as config.json in every checkpoint and as MLflow params.
"""

from __future__ import annotations

import dataclasses

from trainer.faults import FaultConfig
from trainer.optim import OptimConfig

STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
FAMILIES = ("pi_behavior", "xvla")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    shards: str = ""  # manifest URL (local, file:// or s3://); "" = synthesize a small dataset into the run dir
    norm_stats: str = ""  # default: <shards>/norm_stats.json (computed when missing)
    fast_tokenizer: str = ""  # default: <shards>/fast_tokenizer (fitted when missing)
    num_workers: int = 2  # DataLoader worker processes per training worker
    shards_per_group: int = 4  # loader shuffle window, in shards
    augment: bool = True  # train-time image augmentation
    audit: bool = False  # record the (epoch, sample) ids of every step under <run>/audit/ (tests, debugging)
    tasks: tuple[int, ...] = ()  # train only on these task ids (a manifest view of the shards); () = all
    # Used only when shards == "": the synthetic BEHAVIOR-format dataset written for the run.
    synth_tasks: tuple[int, ...] = (0, 1, 40)
    synth_episodes_per_task: int = 2
    synth_frames: int = 90
    synth_samples_per_shard: int = 16

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.shards_per_group < 1:
            raise ValueError("data.num_workers must be >= 0 and data.shards_per_group >= 1")
        if self.synth_tasks and self.synth_frames < 31:
            raise ValueError("data.synth_frames must be >= 31 (one full 30-step action chunk)")

    def check_source(self) -> None:
        """Raise unless the run has data: real shards, or a synthetic dataset to generate."""
        if not self.shards and not self.synth_tasks:
            raise ValueError("no training data: set --set data.shards=s3://bucket/b1k/shards (a `b1k-train data "
                             "shard` output), or data.synth_tasks for a synthetic dataset")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResilienceConfig:
    """What a run survives, and when it gives up (README "Failure semantics")."""

    max_failures: int = 20  # restarts over the whole run (-1 = unlimited)...
    max_failures_in_window: int = 4  # ...and the circuit breaker: more failures than this within...
    failure_window_s: float = 3600.0  # ...this many seconds stop the run, naming the last errors
    collective_timeout_s: float = 600.0  # process-group timeout: a rank blocked this long in a collective fails
    watchdog_s: float = 1800.0  # a rank with no step finished for this long dumps its stacks and exits (0 = off)
    nan_max_consecutive: int = 3  # non-finite steps in a row before rolling back to the last checkpoint
    upload_retries: int = 5  # attempts per checkpoint upload (exponential backoff between them)
    upload_backoff_s: float = 1.0
    async_checkpoint: bool = True  # training blocks only while a checkpoint is staged; the upload runs behind
    elastic_resize_interval_s: float = 60.0  # with --workers MIN:MAX: how often Ray looks for room to grow

    def __post_init__(self) -> None:
        if self.max_failures < -1 or self.max_failures_in_window < 0:
            raise ValueError("resilience.max_failures must be >= -1 and max_failures_in_window >= 0")
        for name in ("failure_window_s", "collective_timeout_s", "upload_backoff_s", "elastic_resize_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"resilience.{name} must be > 0, got {getattr(self, name)}")
        if self.watchdog_s < 0:
            raise ValueError(f"resilience.watchdog_s must be >= 0 (0 = off), got {self.watchdog_s}")
        if self.nan_max_consecutive < 1 or self.upload_retries < 1:
            raise ValueError("resilience.nan_max_consecutive and resilience.upload_retries must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    recipe: str  # registry name this config came from
    family: str = "pi_behavior"  # model family: "pi_behavior" | "xvla"
    model: str = "full"  # architecture config of the family: "tiny" | "full"
    # "" (random) | "export:<artifact url>" (a b1k-train export of the same family) | pi-behavior:
    # "paligemma:<dir>", "pi05:<model.safetensors>", "openpi:<dir>" (a 1st-place/openpi checkpoint, imported into
    # the model cache on first use) | X-VLA: "xvla:<dir>" (X-VLA-Pt or an X-VLA checkpoint dir)
    init_from: str = ""
    # X-VLA init_from: prompt/classifier modules that may start fresh when the checkpoint lacks them or their shape
    # differs (e.g. "skill_classifier,skill_prompt_hub"; "*" = any); without it such a checkpoint fails to load.
    allow_reinit: tuple[str, ...] = ()
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    strategy: str = "fsdp"  # ddp | fsdp | zero1 | zero2 | zero3
    precision: str = "auto"  # auto = bf16 on GPUs that support it, fp32 on CPU
    activation_checkpointing: bool = False
    cpu_threads: int = 0  # torch intra-op threads per worker on CPU; 0 = its core share minus loader workers
    global_batch_size: int = 2048  # samples per optimizer step, fixed whatever the worker count
    micro_batch_size: int = 32  # samples per worker per forward/backward; accumulation fills the rest
    num_steps: int = 200_000
    seed: int = 0
    log_every: int = 25
    save_every: int = 500
    keep_last: int = 2  # committed checkpoints kept besides the keep_period ones
    keep_period: int = 4000  # checkpoints at multiples of this step are kept forever (0 = none)
    peak_tflops_per_worker: float = 989.0  # for MFU: H100 SXM dense bf16; set to your accelerator's
    track_export: bool = True  # also upload the final export (weights included) to the MLflow run's artifacts
    resilience: ResilienceConfig = dataclasses.field(default_factory=ResilienceConfig)
    fault: FaultConfig = dataclasses.field(default_factory=FaultConfig)  # injection for tests/benchmarks; off

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {STRATEGIES}; e.g. --set strategy=fsdp")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {FAMILIES}")
        if self.model not in ("tiny", "full"):
            raise ValueError(f"model {self.model!r} is not a {self.family} config; use tiny or full")
        family_prefixes = ("paligemma:", "pi05:", "openpi:") if self.family == "pi_behavior" else ("xvla:",)
        prefixes = ("export:",) + family_prefixes
        if self.init_from and not self.init_from.startswith(prefixes):
            raise ValueError(f"init_from {self.init_from!r} for family {self.family} must start with one of "
                             f"{prefixes}")
        for name in ("global_batch_size", "micro_batch_size", "num_steps", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} must be a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0 (0 = automatic), got {self.cpu_threads}")
        if self.keep_last < 1 or self.keep_period < 0:
            raise ValueError("keep_last must be >= 1 and keep_period >= 0")

    def grad_accum_steps(self, num_workers: int) -> int:
        """Micro-batches per optimizer step on each worker so that the global batch stays fixed."""
        per_step = self.micro_batch_size * num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x {num_workers} workers; choose a worker count that divides "
                f"{self.global_batch_size // self.micro_batch_size} or change --set micro_batch_size=...")
        return self.global_batch_size // per_step
