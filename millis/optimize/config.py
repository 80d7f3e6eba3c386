"""The configuration of `millis optimize`: what to build, how to measure, what fidelity to keep."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from millis.common.config import Shape, check_at_least, flag
from millis.common.errors import MillisError
from millis.common.schema import from_dict
from millis.encoder.source import POOLING_CHOICES, check_pooling_mode

TASKS = ("classify", "embed", "rerank")


DEFAULT_SHAPES = (Shape(1, 16), Shape(1, 128), Shape(8, 128))


@dataclass(frozen=True)
class MeasureConfig:
    """How latency is measured. Variants are interleaved round by round so drift hits all alike."""

    shapes: tuple[Shape, ...] = flag(DEFAULT_SHAPES, "shapes to measure, e.g. b1xs16,b1xs128,b8xs128 "
                                                     "(default: the preset's)")
    warmup: int = 10          # untimed calls per variant and shape before timing
    iters: int = flag(200, "timed calls per variant and shape, split across rounds (default: the preset's)")
    rounds: int = 5           # interleaving rounds
    threads: int = flag(0, "intra-op threads (0 = all cores)")
    footprint: bool = flag(True, "measure each variant's resident memory (RSS MB) in a fresh process: about 2 s a "
                                 "variant")
    max_seconds_per_cell: float = 30.0  # cap for very slow variants (eager at large shapes)
    # The serve mix: shapes like those `millis serve` forms (B rows x a 16-token bucket), new to every
    # variant, each run cold then warm. A variant that stalls on a new shape, or whose rows/s over the
    # mix is far below the best, is not selectable (millis.optimize.select.serve_gate).
    serve_mix: int = 10              # distinct (B, T) shapes in the mix; 0 = no serve mix
    serve_max_batch: int = 32        # largest B in the mix (`millis serve --max-batch`)
    serve_max_tokens: int = 512      # largest B x T in the mix (the server allows 4096; this keeps it to seconds)
    serve_floor: float = 0.5         # reject below this share of the best variant's serve-mix rows/s
    stall_ratio: float = 2.0         # a first call over this many times the next call at its shape...
    stall_s: float = 0.25            # ...and this many seconds slower stalls (a compile, not noise)
    stall_share: float = 0.5         # a variant stalling on at least this share of the mix's shapes stalls

    def __post_init__(self) -> None:
        if not self.shapes:
            raise MillisError("measure: give at least one shape")
        check_at_least(self, 1, "iters", "rounds")
        check_at_least(self, 0, "warmup", "threads")
        if self.iters < self.rounds:  # each round times at least one call: fewer timed more calls than asked
            raise MillisError(f"--iters {self.iters} is fewer than the {self.rounds} rounds the calls are split over")


@dataclass(frozen=True)
class Budget:
    """Fidelity a variant must keep against the fp32 reference to be selectable."""

    min_cosine: float = flag(0.99, "embed: min cosine vs fp32 over the sample texts")
    max_logit_diff: float = flag(0.5, "classify: max |delta logit| vs fp32 over the sample texts")
    min_top1_agreement: float = 1.0 # classify: share of texts whose argmax label is unchanged
    min_order_agreement: float = flag(0.95, "rerank: share of each query's document pairs (apart by more than 0.005 "
                                            "in fp32's score) a variant must keep in order")
    max_drop: float = flag(0.5, "classify, selecting on labelled rows (the kept validation split or --data): "
                                 "accuracy points a variant may lose against fp32")

    def __post_init__(self) -> None:
        check_at_least(self, -1, "min_cosine")  # above 1: only the fp32 reference qualifies
        # max_drop < 0: a variant must gain
        check_at_least(self, 0, "max_logit_diff", "min_top1_agreement", "min_order_agreement")


# Named measurement presets (`--preset`): the full one for real measurements, a quick one for tests and
# smoke runs. Flags given (--shapes, --iters, --threads) override the preset's values.
PRESETS: dict[str, MeasureConfig] = {
    "cpu": MeasureConfig(),
    "quick": MeasureConfig(shapes=(Shape(1, 16), Shape(2, 32)), warmup=2, iters=10, rounds=2, serve_mix=6),
}


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything `millis optimize` needs: the source, the task and how to choose."""

    source: str = flag(help="local Hugging Face model dir (BERT, DistilBERT, RoBERTa, XLM-R, MPNet, ELECTRA, "
                            "DeBERTa-v2/v3, ModernBERT; Llama, Mistral, Qwen2, Qwen3 decoder embedders), "
                            "builtin:minilm, or tiny:<family> (random, for tests)")
    task: str = flag("embed", "what the model is for: classify, embed, or rerank (a cross-encoder: built as classify, "
                              "judged on (query, document) pairs, served with /v1/rerank)", choices=TASKS)
    out: str = flag("artifacts/model", "artifact directory to write (an empty one or one millis wrote is replaced; "
                                       "never the source model)", scoped=True)
    pooling: str = flag("", "how an embedder pools its token states where its folder declares nothing (no "
                            "sentence-transformers modules.json, which is otherwise read as mean): mean, cls, max, "
                            "last-token (a decoder embedder's), or splade (a masked LM's SPLADE vector); TEI's --pooling",
                        choices=("",) + POOLING_CHOICES)
    variants: tuple[str, ...] = flag((), "comma-separated variant names (default: the preset's)")
    target: Shape = flag(Shape(1, 128), "shape the selection optimises for")
    max_length: int = flag(0, "truncate texts to this many tokens (0 = the model's own limit)")
    budget: Budget = field(default_factory=Budget)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    sample_texts: str = flag("", "texts for fidelity checks (.txt lines or CSV 'text' column; default: the "
                                 "selection rows' texts when selecting on accuracy, else the shipped samples)")
    calibration_texts: str = flag("", "texts for static int8 calibration and the sensitivity ranking (default: "
                                      "rows selection never judges: the training rows `millis train` recorded, "
                                      "less its validation rows, else the shipped samples)")
    device: str = flag("cpu", "cpu, or cuda: judge and measure the GPU variants (millis's compact encoder in fp16 / "
                              "bf16 through CUDA graphs) against the fp32 reference, and write a GPU artifact "
                              "(serve it with --device cuda)", choices=("cpu", "cuda"))
    preset: str = flag("cpu", "measurement preset: cpu (full) or quick (2 small shapes, 10 timed calls); "
                              "--shapes / --iters override it", choices=tuple(PRESETS), scoped=True)
    data: str = flag("", "labelled CSV/TSV/JSONL to select on by accuracy (--max-drop); default: the validation "
                          "split `millis train` kept with the model, never the file you report on", scoped=True)
    text_col: str = flag("text", "text column of --data / text files")
    label_col: str = flag("", "label column of --data (default: the column `millis train` used)")
    recover: bool = flag(True, "when plain int8 misses the budget, try recovery recipes")
    compress: str = flag("", "also distil / prune smaller students and add them as candidates; a preset of "
                             "students (millis.optimize.compress): default (bare --compress) or quick", const="default")
    compress_data: str = flag("", "what the students train on (default: the teacher's `millis train` file)")

    def __post_init__(self) -> None:
        check_at_least(self, 0, "max_length")
        if self.task not in TASKS:
            raise MillisError(f"unknown task {self.task!r}; supported tasks: {', '.join(TASKS)}")
        check_pooling_mode(self.pooling)
        if self.pooling and self.task != "embed":
            raise MillisError(f"--pooling is an embedder's (--task embed); a {self.task} model's head reads its "
                              f"own tokens")
        if self.device not in ("cpu", "cuda"):
            raise MillisError(f"device must be cpu or cuda, got {self.device!r}")

    @property
    def model_task(self) -> str:
        """What is built, judged and shipped: a reranker is a sequence classifier over (query, document)
        pairs (its fidelity is judged on pairs: `cfg.task` stays rerank for that)."""
        return "classify" if self.task == "rerank" else self.task


def optimize_config_from_dict(d: dict[str, Any], where: str = "the optimize config") -> OptimizeConfig:
    """The `config` an artifact's millis.json records, typed; a bad field is a MillisError naming it."""
    return from_dict(OptimizeConfig, d, where)


def fit_shapes(cfg: OptimizeConfig, max_len: int, progress: Callable[[str], None]) -> OptimizeConfig:
    """cfg with its shapes within max_len (the length texts are cut to): a default one longer (the target b1xs128,
    a preset's shape) is cut to max_len, said in `progress`; one the user gave is an error naming its flag."""
    what = f"--max-length {max_len}" if cfg.max_length else f"the model's max length {max_len}"
    target = OptimizeConfig.__dataclass_fields__["target"].default
    preset_shapes = PRESETS[cfg.preset].shapes if cfg.preset in PRESETS else None

    def fit(s: Shape, default: bool, option: str) -> Shape:
        if s.seq <= max_len:
            return s
        if not default:
            raise MillisError(f"{option} {s.name} is longer than {what}: give a shape of at most {max_len} tokens")
        cut = Shape(s.batch, max_len)
        progress(f"note: the default shape {s.name} is longer than {what}: measuring {cut.name} instead")
        return cut

    defaults = cfg.measure.shapes == preset_shapes
    shapes = tuple(dict.fromkeys(fit(s, defaults, "--shapes") for s in cfg.measure.shapes))
    return replace(cfg, target=fit(cfg.target, cfg.target == target, "--target"),
                   measure=replace(cfg.measure, shapes=shapes))

