"""`millis.json`, typed: one versioned, frozen dataclass per format, read and written only through them.

    ArtifactMeta  an artifact written by `millis optimize`          format "millis-artifact"
    TrainMeta     a model dir written by `millis train` / distill / prune   format "millis-train"
    ModelMeta     what every opened model has (ArtifactMeta's core; all a source opened as the fp32 reference has)

The JSON keys are the field names (a nested dataclass is a nested object), so version 1 files read unchanged. A file
of another format or a newer version, or with a field missing or of the wrong type, fails with a MillisError naming
the file and the field. `to_dict()` gives the JSON; `Cls.from_dict(data, where)` reads it back (`where`: the file).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from millis.common import hardware
from millis.common.config import optional, to_dict
from millis.common.errors import MillisError
from millis.common.files import hash_files
from millis.common.schema import from_dict
from millis.encoder.source import OUTPUT_NAME, ModelSource, Pooling

META = "millis.json"
FORMAT = "millis-artifact"
FORMAT_VERSION = 1        # bump when a reader of the previous version would misread the new one
TRAIN_FORMAT = "millis-train"
TRAIN_FORMAT_VERSION = 1


class Versioned:
    """A whole millis.json: `format` says what it is, `version` which layout of it."""

    FORMAT: ClassVar[str]
    VERSION: ClassVar[int]
    WHAT: ClassVar[str]  # for messages: "millis artifact"

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str):
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise MillisError(f"{where} is not a {cls.WHAT} description")
        v = data.get("version")
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= cls.VERSION:
            raise MillisError(f"{where} has {cls.WHAT} format version {v!r}; this millis reads 1 to {cls.VERSION} "
                              f"(upgrade millis or rebuild it)")
        return from_dict(cls, data, where)


# --- shared parts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    """The machine and library versions a measurement or training ran on."""

    cpu: str
    cores: int
    isa: tuple[str, ...]          # the ISA extensions that matter (avx512_vnni, amx_int8...)
    machine: str
    python: str
    versions: dict[str, str]      # library -> version (torch, onnxruntime, openvino...)
    gpu: str = optional("")       # the CUDA GPU's name, when torch saw one (GPU artifacts and figures)
    cpu_id: str = optional("")    # "family 25 model 17": a VM's "AMD EPYC" is Zen 3 or Zen 4 by it

    @classmethod
    def this_machine(cls) -> "Hardware":  # strict: a field describe() gains and this class lacks fails here
        return from_dict(cls, hardware.describe(), "this machine's description", strict=True)


# --- artifacts ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceMeta:
    """The model an artifact was built from."""

    spec: str                     # what the user typed: a directory, builtin:minilm, tiny:bert
    path: str                     # the resolved local directory (the fp32 reference `millis eval` compares with)
    sha256: str                   # config + weights
    model_type: str
    layers: int
    hidden: int
    heads: int
    pooling: Pooling              # how token states become one sentence vector (embed)
    problem_type: str = optional("")  # how a classifier's logits become scores (millis.common.numeric.label_scores)
    segments: bool | None = optional()  # a pair's second text is token type 1 (None, older: by model_type)

    @classmethod
    def of(cls, src: ModelSource) -> "SourceMeta":
        return cls(src.spec, str(src.path), src.sha256, src.model_type, src.num_layers, src.hidden_size,
                   src.num_heads, src.pooling, src.problem_type, src.segments)


@dataclass(frozen=True)
class CompressedStudent:
    """The distilled / pruned student a compressed variant was built from (`optimize --compress`)."""

    recipe: dict[str, Any]        # its CompressRecipe (millis.optimize.compress) as to_dict wrote it
    model: str                    # the student's directory (under the millis cache)
    sha256: str
    layers: int
    heads: int
    intermediate: int
    val_score: float | None = None  # its validation accuracy (classify) or cosine to the teacher (embed)
    train_s: float | None = None
    data: str = optional("")        # the file it trained on (--compress-data, or the teacher's training file)
    data_sha256: str = optional("")  # that file's bytes' sha256: `millis eval` on it is no test score

    @property
    def name(self) -> str:
        return str(self.recipe.get("name", ""))


@dataclass(frozen=True)
class VariantRecipe:
    """How the shipped variant was built and how to open it (millis.optimize.build.variants)."""

    name: str
    runtime: str                  # torch | onnxruntime | openvino | cuda
    precision: str                # fp32 | bf16 | int8 | fp16 | fp8
    passes: tuple[str, ...]       # build passes in order (export, fuse, int8-...)
    options: dict[str, Any]       # runtime options (graph level, precision...)
    keep_fp32: tuple[str, ...] = optional(())         # graph nodes left in fp32 (sensitivity recovery)
    compressed: CompressedStudent | None = optional()  # built from a student, not the source


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    n: int                        # timed calls
    rows_per_s: float
    round_p50_ms: tuple[float, ...] = optional(())  # each interleaved round's own p50
    spread: float | None = optional()               # slowest round's p50 over the fastest's, minus 1
    cdf_ms: tuple[float, ...] = optional(())        # the latency at 0%, 5%, ..., 100% of calls (21 values)


@dataclass(frozen=True)
class MeasureLoad:
    """What else ran while millis measured (millis.common.machine_load)."""

    other_share: float            # share of the CPUs other processes used
    steal_share: float            # share of CPU time the hypervisor stole
    max_spread: float             # the widest round spread of any timed cell
    warnings: tuple[str, ...] = optional(())


@dataclass(frozen=True)
class ColdStart:
    load_s: float
    first_call_s: float
    total_s: float


@dataclass(frozen=True)
class Accuracy:
    accuracy: float
    macro_f1: float
    n: int                        # rows scored
    drop_pts: float               # accuracy points below the fp32 reference on the same rows


@dataclass(frozen=True)
class Stall:
    shape: str
    cold_ms: float
    warm_ms: float


@dataclass(frozen=True)
class ServeMix:
    """Shapes a server forms that the variant had not run, each called cold then warm."""

    shapes: tuple[str, ...]
    calls: int
    rows_per_s: float
    worst_ms: float
    worst_shape: str
    worst_warm_ms: float
    stalls: tuple[Stall, ...]


@dataclass(frozen=True)
class Measured:
    """The shipped variant's figures, measured on this machine."""

    target: str                                # the shape selection optimised for, e.g. b1xs128
    latency: dict[str, LatencyStats]           # shape name -> stats
    fidelity: dict[str, float]                 # against torch fp32 (classify: max_logit_diff, top1_agreement...;
    cold_start: ColdStart                      #   embed: cos_min, cos_mean, nn_agreement...)
    accuracy: Accuracy | None = optional()     # on the labelled selection rows, when there were any
    reference_accuracy: float | None = None    # torch fp32 on the same rows
    serve_mix: ServeMix | None = optional()
    fidelity_texts: str = optional("")         # which texts fidelity was measured on
    selection_data: str = optional("")         # which labelled rows selection judged accuracy on
    load: MeasureLoad | None = optional()      # the machine while measuring (warnings when it was busy)
    # sha256 of the bytes of each file whose rows chose or fitted this artifact: the selection data, the fidelity
    # texts' and calibration texts' files, and a trained source's validation rows (its best epoch was chosen on
    # them); `millis eval` warns when given one of them
    selection_sha256: tuple[str, ...] = optional(())


@dataclass(frozen=True)
class ModelMeta:
    """What any opened model is: an artifact's core, or a source model's when run as the fp32 reference."""

    task: str                     # classify | embed
    output: str                   # the runtime output read: logits | embedding
    input_names: tuple[str, ...]
    max_length: int               # tokens; longer texts are truncated
    id2label: dict[int, str]      # classify: class index -> label ({} for embed)
    source: SourceMeta
    variant: VariantRecipe

    def __post_init__(self) -> None:
        """The values the types allow but no model has (an edited millis.json ran the wrong path, or failed deep in a
        runtime with a traceback). Types are the writer's check (to_dict): a value of another type is left to it."""
        if not (isinstance(self.task, str) and isinstance(self.max_length, int)):
            return
        if self.task not in OUTPUT_NAME:
            raise MillisError(f"task {self.task!r}: expected one of {', '.join(OUTPUT_NAME)}")
        if self.output != OUTPUT_NAME[self.task]:
            raise MillisError(f"output {self.output!r}: the {self.task} task's output is {OUTPUT_NAME[self.task]!r}")
        if self.max_length < 1:
            raise MillisError(f"max_length {self.max_length}: expected a positive number of tokens")
        if not self.input_names:
            raise MillisError("input_names is empty")


@dataclass(frozen=True)
class ArtifactMeta(ModelMeta, Versioned):
    """The millis.json of an artifact written by `millis optimize`."""

    FORMAT: ClassVar[str] = FORMAT
    VERSION: ClassVar[int] = FORMAT_VERSION
    WHAT: ClassVar[str] = "millis artifact"

    millis_version: str
    created: str                  # %Y-%m-%dT%H:%M:%S%z
    measured: Measured
    hardware: Hardware
    config: dict[str, Any]        # the OptimizeConfig that built it, as to_dict wrote it; its type lives in
                                  # millis.optimize.config (a later stage), `optimize_config_from_dict` reads it
    compressed: CompressedStudent | None = optional()  # = variant.compressed, at the top for readers
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 (store.write fills it)
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @property
    def label_col(self) -> str:
        """The label column optimize was told to read ("" = it used the one `millis train` recorded)."""
        return str(self.config.get("label_col") or "")


# --- trained model directories --------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSource:
    spec: str
    sha256: str
    model_type: str


@dataclass(frozen=True)
class TrainData:
    """The file a model was trained on and how its validation rows were chosen."""

    path: str
    rows: int
    text_col: str
    validation: str                         # where the validation rows came from (a file, or "10% held out...")
    sha256: str = optional("")              # the training file's hash (an embedder's since 2026-12)
    label_col: str = optional("")           # classify
    validation_file: str = optional("")     # the kept validation rows, beside millis.json (millis.artifact.validation)
    validation_rows: int | None = optional()  # how many (None: trained before the split was kept)
    truncated: dict[str, int] | None = optional()  # rows cut to the recorded max_length: {"train": n, "validation": m}

    def holds(self, path: str | Path) -> bool:
        """Whether `path` is the file trained on: its bytes hashed under the recorded name (a renamed copy too)."""
        return bool(self.sha256) and Path(path).is_file() and \
            hash_files([Path(path)], [Path(self.path).name]) == self.sha256


@dataclass(frozen=True)
class Epoch:
    epoch: int
    train_loss: float
    seconds: float
    rows_per_s: float
    val_accuracy: float | None = optional()   # classify
    val_cosine: float | None = optional()     # embedder distillation: mean cosine to the teacher


@dataclass(frozen=True)
class TeacherRef:
    spec: str
    sha256: str
    layers: int


@dataclass(frozen=True)
class DistillRecord:
    """How a student was distilled (`millis distill`)."""

    task: str
    teacher: TeacherRef
    student_layers: int
    layer_map: tuple[int, ...] | None       # student layer i learns from teacher layer layer_map[i]
    student_source: str                     # "" = the teacher's own first layers
    teacher_score: float                    # the teacher's validation accuracy (embed: 1.0, itself)
    parameters: dict[str, int]              # teacher, student


@dataclass(frozen=True)
class PrunedFrom:
    spec: str
    sha256: str
    val_accuracy: float


@dataclass(frozen=True)
class PruneRecord:
    """What `millis prune` kept, and the scores it chose by."""

    layers_kept: tuple[int, ...]
    heads_kept: tuple[tuple[int, ...], ...] | None   # per kept layer; None = all
    ffn_kept: int | None                             # FFN neurons per layer; None = all
    original: PrunedFrom
    val_accuracy_before_recovery: float
    parameters: dict[str, int]                       # original, pruned
    head_importance: tuple[tuple[float, ...], ...] = ()  # (L, H), L2-normalised per layer
    layer_drops: tuple[dict[str, Any], ...] = ()         # each greedy layer drop: dropped, val_loss, tried


@dataclass(frozen=True)
class TrainMeta(Versioned):
    """The millis.json of a model directory written by `millis train`, `distill` or `prune`."""

    FORMAT: ClassVar[str] = TRAIN_FORMAT
    VERSION: ClassVar[int] = TRAIN_FORMAT_VERSION
    WHAT: ClassVar[str] = "millis trained model"

    millis_version: str
    created: str
    source: TrainSource
    data: TrainData
    best_epoch: int
    history: tuple[Epoch, ...]
    train_s: float
    hardware: Hardware
    config: dict[str, Any]                 # the TrainConfig / DistillConfig / PruneConfig, as to_dict wrote it
    labels: tuple[str, ...] = optional(())  # classify: the label of each class index
    val_accuracy: float | None = optional()
    val_cosine: float | None = optional()
    distill: DistillRecord | None = optional()
    prune: PruneRecord | None = optional()
    files: dict[str, str] = field(default_factory=dict)
    format: str = TRAIN_FORMAT
    version: int = TRAIN_FORMAT_VERSION

    @property
    def val_score(self) -> float | None:
        """The best epoch's validation score: accuracy (classify) or cosine to the teacher (embed)."""
        return self.val_accuracy if self.val_accuracy is not None else self.val_cosine

    @property
    def train_config(self) -> dict[str, Any]:
        """The TrainConfig part of `config` (distill and prune nest it under "train")."""
        return self.config.get("train", self.config)


# --- reading ---------------------------------------------------------------------------------------------

def format_of(path: str | Path) -> str | None:
    """The `format` a directory's millis.json declares (artifact, trained model...), None without one."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def is_artifact(path: str | Path) -> bool:
    """Whether a directory is, or means to be, an artifact: it has a millis.json not `millis train`'s (of another
    format, or unreadable: read_meta then says why, where it passed for a model dir and failed on no config.json)."""
    p = Path(path)
    return (p / META).is_file() and format_of(p) != TRAIN_FORMAT


def read_train_meta(model_dir: str | Path) -> TrainMeta | None:
    """The training record of a directory written by `millis train`, or None for any other model dir.
    A millis-train millis.json that is malformed or newer than this millis fails (naming the field)."""
    if format_of(model_dir) != TRAIN_FORMAT:
        return None
    f = Path(model_dir) / META
    return TrainMeta.from_dict(json.loads(f.read_text()), str(f))
