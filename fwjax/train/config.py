"""Typed configuration of a training run (frozen dataclasses + enums, validated on creation).

A run's config is one :class:`TrainConfig`, built from a TOML file by
:func:`fwjax.train.config_io.structure`. Sections (TOML tables): ``[retrieval]`` or ``[lm]``
(the task and its model), ``[optimizer]``, ``[mesh]``, ``[checkpoint]``, ``[distributed]``.
"""

from __future__ import annotations

import dataclasses
import enum

from fwjax.data.recall import MQARTask, MultiHopTask, ZoologyMQARTask
from fwjax.data.retrieval import RetrievalSetting, RetrievalTask
from fwjax.data.state_tracking import ModularSumTask
from fwjax.data.text import LMDataset, Sampling
from fwjax.data.tokenizers import TokenizerKind
from fwjax.nn.config import (
    _DEFAULT_FAST_WEIGHT,
    AttentionKind,
    FastWeightConfig,
    ModelConfig,
    Positional,
)
from fwjax.nn.retrieval import RetrievalConfig
from fwjax.validation import check_ints
from fwjax.validation import check_positive_ints as _check_positive


class OptimizerKind(enum.Enum):
    ADAM = "adam"
    ADAMW = "adamw"


class ScheduleKind(enum.Enum):
    """Learning-rate schedule after the linear warmup."""

    CONSTANT = "constant"
    COSINE = "cosine"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adam/AdamW with linear warmup, then constant or cosine decay, and global-norm clipping.

    The paper's LM recipe: Adam, ``learning_rate=2.5e-4``, ``warmup_steps=2000``, cosine,
    ``clip_norm=0.25``.

    Attributes:
      kind: ADAM or ADAMW (decoupled weight decay).
      learning_rate: peak learning rate, reached after ``warmup_steps``.
      warmup_steps: linear warmup from 0.
      schedule: after warmup, CONSTANT or COSINE decay to ``final_lr_fraction · learning_rate``
        at the last training step.
      b1, b2, eps: Adam's moment decay rates and epsilon.
      weight_decay: AdamW's decoupled weight decay.
      decay_matrices_only: apply ``weight_decay`` to parameters with two or more axes only
        (weight matrices and embedding tables), not to biases, gains or gates (GPT-2, nanoGPT).
      clip_norm: global gradient-norm clipping threshold; None disables clipping.
    """

    kind: OptimizerKind = OptimizerKind.ADAM
    learning_rate: float = 2.5e-4
    warmup_steps: int = 0
    schedule: ScheduleKind = ScheduleKind.COSINE
    final_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_matrices_only: bool = True
    clip_norm: float | None = 0.25

    def __post_init__(self):
        object.__setattr__(self, "kind", OptimizerKind(self.kind))
        object.__setattr__(self, "schedule", ScheduleKind(self.schedule))
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        check_ints(minimum=0, warmup_steps=self.warmup_steps)
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"final_lr_fraction={self.final_lr_fraction} must be in [0, 1]")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.weight_decay and self.kind is OptimizerKind.ADAM:
            raise ValueError(f"weight_decay={self.weight_decay} needs kind='adamw'")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm={self.clip_norm} must be > 0 or None")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh: ``data`` (batch) × ``model`` (heads / feed-forward width) axes.

    ``data=-1`` uses all devices not taken by ``model``. ``fsdp``: also split parameters and
    optimizer state over ``data`` along the model width (``embed``; ZeRO-3 / fully sharded data
    parallelism): each device holds ``1/data`` of them, gathered when a layer needs them.
    """

    data: int = -1
    model: int = 1
    fsdp: bool = False

    def __post_init__(self):
        _check_positive(model=self.model)
        if self.data != -1:
            _check_positive(data=self.data)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing: every ``every_steps`` (and at the end), keeping the latest ``keep``."""

    every_steps: int = 1000
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        _check_positive(every_steps=self.every_steps, keep=self.keep)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host setup for ``jax.distributed.initialize``.

    ``coordinator_address=None`` runs single-process (or relies on the cluster's auto-detection
    when ``auto=True``, e.g. on Cloud TPU or SLURM).
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    def __post_init__(self):
        given = [self.num_processes is not None, self.process_id is not None]
        if self.coordinator_address is not None and not all(given):
            raise ValueError(
                f"{self.coordinator_address=} needs num_processes and process_id; got "
                f"{self.num_processes=}, {self.process_id=}"
            )
        if self.num_processes is not None:
            _check_positive(num_processes=self.num_processes)
        if self.process_id is not None:
            check_ints(minimum=0, process_id=self.process_id)
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise ValueError(f"{self.process_id=} must be < {self.num_processes=}")


class WandbMode(enum.Enum):
    """Weights & Biases' ``mode`` (``wandb.init(mode=...)``).

    Attributes:
      ONLINE: sync to the W&B server while training.
      OFFLINE: write the run under its ``wandb/`` directory only (``wandb sync`` uploads it).
      DISABLED: no W&B files or calls.
    """

    ONLINE = "online"
    OFFLINE = "offline"
    DISABLED = "disabled"


class NonFinitePolicy(enum.Enum):
    """What a non-finite loss or gradient does.

    Attributes:
      STOP: the update is not applied, and the run stops with an error naming the step; the
        last good checkpoint is kept (no checkpoint is written after it).
      SKIP: the update is skipped and training goes on; the run stops after
        ``max_consecutive_nonfinite`` skipped steps in a row.
    """

    STOP = "stop"
    SKIP = "skip"


class Init(enum.Enum):
    """Parameter initialisation of the retrieval model.

    Attributes:
      MODEL: ``RetrievalModel``'s own (Flax) initialisers.
      OFFICIAL: the distributions of the official synthetic code
        (:func:`fwjax.train.retrieval.official_init`).
    """

    MODEL = "model"
    OFFICIAL = "official"


class Readout(enum.Enum):
    """How a :class:`~fwjax.nn.RetrievalModel`'s predictions are computed (same values,
    different cost).

    Attributes:
      GENERIC: ``RetrievalModel.__call__``: writes the whole ``[K, V]`` memory with the
        configured op (``FastWeightConfig.impl``), then reads it.
      DIRECT: :func:`fwjax.train.retrieval.direct_predictions`: the closed form at the queries
        (:func:`fwjax.ops.retrieval_readout`, no ``[K, V]`` matrix).
    """

    GENERIC = "generic"
    DIRECT = "direct"


class EvalSet(enum.Enum):
    """Which sequences each evaluation uses.

    Attributes:
      FIXED: the same sequences at every evaluation (index 0 of the task's evaluation stream):
        a stopping rule then compares like with like.
      FRESH: new sequences at every evaluation (index = evaluation number), as in the official
        synthetic code.
    """

    FIXED = "fixed"
    FRESH = "fresh"


@dataclasses.dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stops training on an evaluation metric (lower is better); off unless a field is set.

    Attributes:
      metric: the evaluation metric (a key of the task's eval metrics, e.g. ``loss``).
      target: stop once the metric is ``<=`` this (the synthetic protocol: loss 0.001).
      patience: stop after this many evaluations in a row without a new best (10).
    """

    metric: str = "loss"
    target: float | None = None
    patience: int | None = None

    def __post_init__(self):
        if not self.metric:
            raise ValueError(f"metric={self.metric!r} must name an evaluation metric")
        if self.target is not None and not self.target >= 0:
            raise ValueError(f"target={self.target} must be >= 0 or None")
        if self.patience is not None:
            _check_positive(patience=self.patience)

    @property
    def enabled(self) -> bool:
        return self.target is not None or self.patience is not None


@dataclasses.dataclass(frozen=True)
class RetrievalTaskConfig:
    """The synthetic associative retrieval task (:mod:`fwjax.data.retrieval`) and its model.

    Attributes:
      setting: 1 (capacity) or 2 (update).
      num_keys: N keys and N values.
      train_queries, eval_max_queries, sequence_length: the
        :class:`~fwjax.data.retrieval.RetrievalTask`'s.
      d_key, d_embed, use_bias, tie_queries, embed_factor, attention, fast_weight: the
        :class:`~fwjax.nn.RetrievalConfig` of the model (``d_embed`` None: ``d_key``;
        ``fast_weight.favor_redraw`` PER_STEP: FAVOR+'s projection is drawn afresh at every
        step and every evaluation).
      eval_sequences: sequences per evaluation (20 in the paper), queried at every key.
      init: :class:`Init`; ``embed_std``: the OFFICIAL init's key embedding standard deviation.
      readout: :class:`Readout`, for training and evaluation.
      eval_set: :class:`EvalSet`.
    """

    setting: RetrievalSetting = RetrievalSetting.UPDATE
    num_keys: int = 20
    train_queries: int = 1
    eval_max_queries: int = 200
    sequence_length: int | None = None
    d_key: int = 64
    d_embed: int | None = None
    use_bias: bool = False
    tie_queries: bool = True
    embed_factor: int | None = None
    attention: AttentionKind = AttentionKind.FAST_WEIGHT
    fast_weight: FastWeightConfig = _DEFAULT_FAST_WEIGHT
    eval_sequences: int = 20
    init: Init = Init.MODEL
    embed_std: float = 1.0
    readout: Readout = Readout.GENERIC
    eval_set: EvalSet = EvalSet.FIXED

    def __post_init__(self):
        kinds = dict(
            setting=RetrievalSetting, attention=AttentionKind, init=Init, readout=Readout,
            eval_set=EvalSet,
        )  # fmt: skip
        for name, kind in kinds.items():
            object.__setattr__(self, name, kind(getattr(self, name)))
        _check_positive(
            num_keys=self.num_keys, d_key=self.d_key, eval_sequences=self.eval_sequences
        )
        if self.d_embed is None:
            object.__setattr__(self, "d_embed", self.d_key)
        if not self.embed_std > 0:
            raise ValueError(f"embed_std={self.embed_std} must be > 0")
        if self.embed_std != 1.0 and self.init is not Init.OFFICIAL:
            raise ValueError(f"embed_std={self.embed_std} needs init='official'")
        self.data(), self.model_config()  # validated by the task and the model

    def data(self) -> RetrievalTask:
        """The :class:`~fwjax.data.retrieval.RetrievalTask`."""
        return RetrievalTask(
            self.setting,
            self.num_keys,
            train_queries=self.train_queries,
            eval_max_queries=self.eval_max_queries,
            sequence_length=self.sequence_length,
        )

    def model_config(self) -> RetrievalConfig:
        """The :class:`~fwjax.nn.RetrievalConfig` (``num_values = num_keys``)."""
        names = ("d_key", "d_embed", "use_bias", "tie_queries", "embed_factor", "attention")
        fields = {name: getattr(self, name) for name in names}
        return RetrievalConfig(self.num_keys, self.num_keys, fast_weight=self.fast_weight, **fields)


class LMEvalMode(enum.Enum):
    """How a language model is evaluated over a whole split (``fwjax eval --mode``).

    Attributes:
      SEGMENTS: independent segments of ``segment_len`` tokens, each from empty memory.
      SLIDING: windows of ``segment_len`` tokens every ``stride`` tokens, each recomputed from
        empty memory (no KV cache or carried state); a window scores only its last ``stride``
        tokens (the first window scores all), so every token but the first few sees
        ``segment_len − stride`` tokens or more of context.
      CARRIED: the split as ``streams`` contiguous streams (1: the whole text in order), the fast
        weights carried across all segments (unbounded context; for models trained with
        carried state and no positional encoding).
    """

    SEGMENTS = "segments"
    SLIDING = "sliding"
    CARRIED = "carried"


@dataclasses.dataclass(frozen=True)
class LMTaskConfig:
    """Language modelling on a text corpus.

    Attributes:
      model: the :class:`~fwjax.nn.ModelConfig`. With ``tokenizer="byte"`` its ``vocab_size``
        must be ≥ 256; with ``char`` / ``word`` the vocabulary size comes from the training
        split and replaces ``model.vocab_size`` when the task is built.
      dataset: :class:`~fwjax.data.text.LMDataset`: ``text_file`` (in memory, no extras),
        ``local_text`` (TFDS builder over ``text_path``) or ``wikitext103`` (TFDS).
      tokenizer: :class:`~fwjax.data.tokenizers.TokenizerKind`: ``byte``, ``char`` or ``word``.
      text_path: the UTF-8 text file of ``text_file`` / ``local_text``; None with ``text_file``
        uses generated text (no download, for tests/demos).
      validation_fraction: the last fraction of the text is the validation split.
      data_dir: the TFDS data directory (None: ``~/tensorflow_datasets``).
      manual_dir: ``wikitext103``: a folder holding ``wiki.*.tokens`` or the official zip.
      eval_split: ``validation`` or (``wikitext103``) ``test``.
      segment_len: T tokens per training segment.
      sampling: :class:`~fwjax.data.text.Sampling` of training batches: ``streams``
        (contiguous streams, Transformer-XL) or ``random_windows`` (nanoGPT). Evaluation always
        reads the split in order.
      carry_state: carry the fast weights from one segment of a stream to the next, in training
        and evaluation (needs ``sampling="streams"`` and positions that do not run out:
        ``positional`` NONE, SINUSOIDAL or ROTARY).
      eval_stride: the default stride of SLIDING evaluation (≤ ``segment_len``; None:
        ``segment_len // 2``).
      document_separator: pack documents: the token (as text: ``"<eos>"`` for word tokens, a
        one-byte / one-character string such as ``"\n"`` for byte / char tokens) that ends a
        document. Each window then carries ``segment_ids``: every layer keeps its documents
        apart (the memory restarts at each document start, softmax attention is masked,
        positions restart), in training and in every evaluation mode; a carried memory is
        emptied where a window begins a document. None: windows run across documents.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    dataset: LMDataset = LMDataset.TEXT_FILE
    tokenizer: TokenizerKind = TokenizerKind.BYTE
    text_path: str | None = None
    validation_fraction: float = 0.1
    data_dir: str | None = None
    manual_dir: str | None = None
    eval_split: str = "validation"
    segment_len: int = 128
    sampling: Sampling = Sampling.STREAMS
    carry_state: bool = False
    eval_stride: int | None = None
    document_separator: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dataset", LMDataset(self.dataset))
        object.__setattr__(self, "sampling", Sampling(self.sampling))
        if self.carry_state and self.sampling is not Sampling.STREAMS:
            raise ValueError(
                f"carry_state=True needs sampling='streams'; got {self.sampling.value!r}"
            )
        if self.carry_state and self.model.positional is Positional.LEARNED:
            raise ValueError(
                "carry_state=True with positional='learned': carried positions grow past the "
                f"table of {self.model.max_len=}; use positional='none' (the paper's protocol)"
            )
        if self.model.positional is Positional.LEARNED and self.segment_len > self.model.max_len:
            raise ValueError(
                f"{self.segment_len=} exceeds the learned position table ({self.model.max_len=})"
            )
        object.__setattr__(self, "tokenizer", TokenizerKind(self.tokenizer))
        _check_positive(segment_len=self.segment_len)
        if self.eval_stride is not None:
            _check_positive(eval_stride=self.eval_stride)
        if self.eval_stride is not None and self.eval_stride > self.segment_len:
            raise ValueError(f"eval_stride={self.eval_stride} must be <= {self.segment_len=}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction} must be in (0, 1)")
        if self.tokenizer is TokenizerKind.BYTE and self.model.vocab_size < 256:
            raise ValueError(f"byte-level data needs {self.model.vocab_size=} >= 256")
        if self.eval_split not in ("validation", "test"):
            raise ValueError(f"eval_split={self.eval_split!r} must be 'validation' or 'test'")
        if self.eval_split == "test" and self.dataset is not LMDataset.WIKITEXT103:
            raise ValueError(f"eval_split='test' needs dataset='wikitext103'; got {self.dataset}")
        if self.dataset is LMDataset.LOCAL_TEXT and self.text_path is None:
            raise ValueError("dataset='local_text' needs text_path")
        if self.document_separator is not None and not self.document_separator:
            raise ValueError("document_separator must be a token's text or None; got ''")


@dataclasses.dataclass(frozen=True)
class RecallTaskConfig:
    """A recall task of :mod:`fwjax.data.recall` (MQAR or multi-hop) or a state-tracking task of
    :mod:`fwjax.data.state_tracking` for a causal LM, scored at the answer positions only.

    Attributes:
      model: the :class:`~fwjax.nn.ModelConfig`; ``vocab_size`` must cover the task's.
      mqar, multihop, zoology_mqar, modular_sum: the task (at most one; none:
        ``MQARTask(num_pairs=16)``).
      eval_sequences: the fixed evaluation set (``eval=True`` stream of the run's seed), in
        batches of ``eval_batch_size``.
      embedding_std: if set, the input embedding is initialised with this standard deviation
        instead of the model's ``embed_init_std`` (with N(0, 1) the token embedding drowns the
        sinusoidal positions, which softmax attention needs here).
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mqar: MQARTask | None = None
    multihop: MultiHopTask | None = None
    modular_sum: ModularSumTask | None = None
    zoology_mqar: ZoologyMQARTask | None = None
    eval_sequences: int = 256
    eval_batch_size: int = 64
    embedding_std: float | None = None

    def __post_init__(self):
        tasks = (self.mqar, self.multihop, self.modular_sum, self.zoology_mqar)
        given = [x is not None for x in tasks]
        if sum(given) > 1:
            raise ValueError(
                "give one of [recall.mqar], [recall.multihop], [recall.modular_sum] and "
                "[recall.zoology_mqar]"
            )
        if not any(given):
            object.__setattr__(self, "mqar", MQARTask(num_pairs=16))
        _check_positive(eval_sequences=self.eval_sequences, eval_batch_size=self.eval_batch_size)
        if self.eval_sequences % self.eval_batch_size:
            raise ValueError(
                f"{self.eval_batch_size=} must divide {self.eval_sequences=} (whole batches)"
            )
        if self.embedding_std is not None and not self.embedding_std > 0:
            raise ValueError(f"{self.embedding_std=} must be > 0 or None")
        if self.model.vocab_size < self.data().vocab_size:
            raise ValueError(f"{self.model.vocab_size=} must be >= {self.data().vocab_size=}")

    def data(self) -> MQARTask | MultiHopTask | ModularSumTask | ZoologyMQARTask:
        """The task's batches."""
        for task in (self.mqar, self.multihop, self.modular_sum, self.zoology_mqar):
            if task is not None:
                return task
        raise AssertionError("unreachable: __post_init__ sets mqar")


class TaskKind(enum.Enum):
    RETRIEVAL = "retrieval"
    LM = "lm"
    RECALL = "recall"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run.

    Attributes:
      task: which task; its section (``retrieval``, ``lm`` or ``recall``) configures it.
      steps: optimizer steps in the run.
      batch_size: the global batch (sequences per step, over all devices and processes); must
        be divisible by the mesh's data-parallel size.
      seed: seeds initialisation, data order and dropout (the data position is the step).
      eval_every: evaluate every this many steps (and at the end); ``eval_batches`` batches.
      log_every: host-side metrics (JSONL, progress bar, TensorBoard) every this many steps.
      nonfinite: :class:`NonFinitePolicy`; ``max_consecutive_nonfinite`` bounds SKIP.
      steps_per_call: training steps per jitted call (a ``lax.scan`` over that many batches;
        a call never crosses a log, evaluation or checkpoint step).
      early_stopping: :class:`EarlyStoppingConfig`: stop on an evaluation metric (the summary
        then names the ``stop_reason``).
      progress_bar: a tqdm bar on process 0 when stderr is a terminal (otherwise, or when False,
        a one-line log at most every 30 s). ``tensorboard``: also write tensorboardX events.
      wandb: also log metrics (and this config) to Weights & Biases (the ``wandb`` extra), in
        project ``wandb_project`` as run ``wandb_name`` (None: the workdir's name), in
        :class:`WandbMode` ``wandb_mode`` (None: W&B's default or ``WANDB_MODE``). Files go to
        ``workdir/wandb`` (or ``WANDB_DIR``); a resumed run continues the same W&B run.
    """

    task: TaskKind = TaskKind.RETRIEVAL
    retrieval: RetrievalTaskConfig | None = None
    lm: LMTaskConfig | None = None
    recall: RecallTaskConfig | None = None
    steps: int = 1000
    batch_size: int = 32
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 1
    log_every: int = 10
    nonfinite: NonFinitePolicy = NonFinitePolicy.STOP
    max_consecutive_nonfinite: int = 10
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "fwjax"
    wandb_name: str | None = None
    wandb_mode: WandbMode | None = None
    steps_per_call: int = 1
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        object.__setattr__(self, "task", TaskKind(self.task))
        object.__setattr__(self, "nonfinite", NonFinitePolicy(self.nonfinite))
        if self.wandb_mode is not None:
            object.__setattr__(self, "wandb_mode", WandbMode(self.wandb_mode))
        if not self.wandb_project:
            raise ValueError(f"wandb_project={self.wandb_project!r} must be a non-empty name")
        _check_positive(
            steps=self.steps,
            batch_size=self.batch_size,
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
            log_every=self.log_every,
            max_consecutive_nonfinite=self.max_consecutive_nonfinite,
            steps_per_call=self.steps_per_call,
        )
        check_ints(minimum=0, seed=self.seed)
        sections = dict(retrieval=RetrievalTaskConfig, lm=LMTaskConfig, recall=RecallTaskConfig)
        for name, section in sections.items():
            if name == self.task.value and getattr(self, name) is None:
                object.__setattr__(self, name, section())
            elif name != self.task.value and getattr(self, name) is not None:
                raise ValueError(f"task={self.task.value!r} but a [{name}] section was given")
