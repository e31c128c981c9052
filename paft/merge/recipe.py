"""Merge recipes: mergekit's YAML (the subset the engine implements), the CLI's flags and the flow, one path.

A recipe file is a mergekit 0.1.5 ``MergeConfiguration`` with ``models`` (no ``slices``/``modules``)::

    merge_method: ties                  # linear | task_arithmetic | ties | dare_linear | dare_ties | magnitude_prune
    base_model: path/to/base            # required (every method here merges deltas from the base)
    models:
      - model: path/to/sft_adapter      # a LoRA adapter folder or a full fine-tuned model folder
        parameters: {weight: 1.0, density: 0.2}
      - path/to/dpo                     # a bare path: the global defaults below
    parameters:                         # global; weight / density here are defaults for every model
      {normalize: true, lambda: 1.0, rescale: false, consensus_method: sum, weight: 1.0, density: 0.5}
    dtype: bfloat16                     # mergekit's compute dtype = the dtype deltas of full models are formed in
    # paft extensions (mergekit ignores unknown top-level keys):
    random_seed: 0                      # DARE's masks (mergekit: the --random-seed option)
    tie_break: index                    # index (default, fast) | sort (mergekit's exact top-k choice)
    rescale_norm: l1                    # l1 (mergekit) | density (DARE paper / peft: 1 / density)
    adapter_rank: 16                    # also write a merged LoRA adapter (truncated SVD)
    allow_vocab_mismatch: false
    ignore_adapter_base: false
    threads: null

Semantics, where mergekit leaves a choice or we differ:

- paths are used as given: relative ones resolve against the current directory (as mergekit does), not the
  recipe file's folder; hub ids are not downloaded (the engine needs local folders);
- ``weight`` defaults to 1 and ``density`` to 1 when neither the model nor the global parameters give them;
  per-tensor gradients (lists) and filters are not supported (one number each);
- the sign election: ``majority_sign_method`` (peft: ``total``/``frequency``) or ``consensus_method``
  (mergekit: ``sum``/``count``); mergekit 0.1.5 has a fixed ``sum`` per method and ignores this key;
- ``int8_mask`` is accepted and has no effect (mergekit's memory saving for the sign mask; same result);
- ``dtype`` absent: deltas of full models formed in the tensors' own dtype (mergekit's default); the merge
  arithmetic is float32 and the output keeps the base's dtype, so ``out_dtype`` is refused;
- the merged folder gets the base's tokenizer: ``tokenizer_source`` other than ``base``, ``tokenizer`` and
  ``chat_template`` are refused, as are ``slices`` and ``modules`` (layer slicing);
- a model entry equal to ``base_model`` is dropped (mergekit: the base is no input of task-vector methods),
  except for ``linear``, which averages it in as mergekit does (a zero delta with its weight);
- ``base+adapter`` (mergekit's LoRA syntax) is the adapter, when ``base`` is the base model; a LoRA on
  another model is refused. A path that exists as written is taken as a path even if it contains ``+``.

Errors are :class:`~paft.errors.ConfigError` with one line ``<file>:<line>: <dotted.key>: <reason>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from paft.config import Fraction, PosInt
from paft.errors import ConfigError, PaftError
from paft.merge.deltas import DELTA_DTYPES
from paft.merge.io import MergeInput
from paft.merge.methods import METHODS, RESCALE_NORMS, SIGN_METHODS, SIGN_NAMES, TIE_BREAKS

Finite = Annotated[float, Field(allow_inf_nan=False)]
SignName = Literal["total", "frequency"]
# engine options that are off unless set: merge_kwargs and the YAML carry them only when set
EXTENSIONS = ("adapter_rank", "allow_vocab_mismatch", "ignore_adapter_base", "threads")
UNSUPPORTED = {
    "slices": "layer slicing is not supported: list whole models under models",
    "modules": "per-module merges are not supported: list whole models under models",
    "tokenizer": "not supported: the merged model gets the base model's tokenizer",
    "chat_template": "not supported: the merged model gets the base model's tokenizer and chat template",
    "out_dtype": "not supported: the merged model is written in the base model's dtype",
}
HEADER = "# paft merge recipe (mergekit YAML); run it with: paft merge --recipe FILE --out DIR\n"


def _known(name: str, value: str, known) -> str:
    if value not in known:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(sorted(known))}")
    return value


def _as_str(v):
    return os.fspath(v) if isinstance(v, os.PathLike) else v


def _sign(v):
    """peft's majority sign names, from either naming."""
    return SIGN_NAMES[SIGN_METHODS[v]] if isinstance(v, str) and v in SIGN_METHODS else v


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ----------------------------------------------------------------------------- the recipe
class RecipeInput(_Frozen):
    """One model to merge (the engine's :class:`~paft.merge.io.MergeInput`, validated)."""

    path: str
    weight: Finite = 1.0
    density: Fraction = 1.0

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, v):
        return _as_str(v)

    def merge_input(self) -> MergeInput:
        return MergeInput(self.path, weight=self.weight, density=self.density)


class Recipe(_Frozen):
    """A whole merge: what ``paft merge`` (recipe or flags) and the flow's merge step run."""

    method: str
    base: str
    inputs: tuple[RecipeInput, ...] = Field(min_length=1)
    lambda_: Finite = 1.0
    normalize: bool | None = None  # None: the method's default
    rescale: bool | None = None  # None: the method's default (dare_*: on)
    rescale_norm: Literal[RESCALE_NORMS] = "l1"
    sign: SignName | None = None  # None: the method's (total); sum / count accepted and stored as total / frequency
    tie_break: Literal[TIE_BREAKS] = "index"
    delta_dtype: Literal[DELTA_DTYPES] = "input"
    seed: int = 0
    # engine extensions, off by default
    adapter_rank: PosInt | None = None
    allow_vocab_mismatch: bool = False
    ignore_adapter_base: bool = False
    threads: PosInt | None = None

    @field_validator("base", mode="before")
    @classmethod
    def _base(cls, v):
        return _as_str(v)

    @field_validator("sign", mode="before")
    @classmethod
    def _peft_sign(cls, v):
        return _sign(v)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _known("merge method", v, METHODS)

    @classmethod
    def from_flags(cls, base, inputs, *, method: str | None = None, weights=None, density: float | None = None,
                   **options) -> Recipe:
        """The CLI's flag form; options left None take the recipe's defaults. Errors name the flag."""
        weights = list(weights) if weights else [1.0] * len(inputs)
        if len(weights) != len(inputs):
            raise PaftError(f"--weights: {len(weights)} weights for {len(inputs)} inputs")
        density = 1.0 if density is None else density
        data = {"method": method or "ties", "base": base,
                "inputs": [{"path": p, "weight": w, "density": density} for p, w in zip(inputs, weights)],
                **{k: v for k, v in options.items() if v is not None}}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = tuple(err["loc"])
            name = loc[-1] if loc[0] == "inputs" else loc[0]
            flag = {"weight": "--weights", "lambda_": "--lambda"}.get(name, "--" + str(name).replace("_", "-"))
            raise PaftError(f"paft merge {flag}: {_message(err)}") from None

    def merge_inputs(self) -> list[MergeInput]:
        return [i.merge_input() for i in self.inputs]

    def merge_kwargs(self) -> dict:
        """Keyword arguments of :func:`~paft.merge.io.merge_models`; extensions only when set."""
        kw = {"lambda_": self.lambda_, "normalize": self.normalize, "seed": self.seed, "rescale": self.rescale,
              "rescale_norm": self.rescale_norm, "sign": self.sign, "tie_break": self.tie_break,
              "delta_dtype": self.delta_dtype}
        kw.update({k: getattr(self, k) for k in EXTENSIONS if getattr(self, k) not in (None, False)})
        return kw

    def to_yaml(self) -> str:
        """mergekit-style YAML (paths as given) that :func:`load_recipe` reads back to an equal recipe."""
        params: dict[str, Any] = {"lambda": self.lambda_}
        for key in ("normalize", "rescale"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        if self.sign is not None:
            params["consensus_method"] = SIGN_METHODS[self.sign]
        doc: dict[str, Any] = {
            "merge_method": self.method,
            "base_model": self.base,
            "models": [{"model": i.path, "parameters": {"weight": i.weight, "density": i.density}} for i in self.inputs],
            "parameters": params,
        }
        if self.delta_dtype != "input":
            doc["dtype"] = self.delta_dtype
        ext: dict[str, Any] = {"random_seed": self.seed, "tie_break": self.tie_break, "rescale_norm": self.rescale_norm}
        ext.update({k: getattr(self, k) for k in EXTENSIONS if getattr(self, k) not in (None, False)})
        return (HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, allow_unicode=True)
                + "# paft extensions (mergekit ignores these keys)\n" + yaml.safe_dump(ext, sort_keys=False))


# ----------------------------------------------------------------------------- the file (mergekit's schema)
def _one_number(v):
    if isinstance(v, (list, dict)):
        raise ValueError("per-tensor gradients and filters are not supported: give one number")
    return v


class _InputParams(_Frozen):
    weight: Finite | None = None
    density: Fraction | None = None

    @field_validator("weight", "density", mode="before")
    @classmethod
    def _numbers(cls, v):
        return _one_number(v)


class _GlobalParams(_InputParams):
    lambda_: Finite | None = Field(None, alias="lambda")
    normalize: bool | None = None
    rescale: bool | None = None
    int8_mask: bool | None = None  # accepted, no effect (mergekit: int8 sign mask, same result)
    consensus_method: Literal["sum", "count"] | None = None
    majority_sign_method: SignName | None = None

    @field_validator("lambda_", mode="before")
    @classmethod
    def _lambda(cls, v):
        return _one_number(v)


class _ModelEntry(_Frozen):
    model: str
    parameters: _InputParams | None = None



class _RecipeFile(_Frozen):
    merge_method: str
    base_model: str
    models: list[_ModelEntry] = Field(min_length=1)
    parameters: _GlobalParams | None = None
    dtype: str | None = None
    tokenizer_source: Literal["base"] | None = None  # what the engine does; anything else is refused
    random_seed: int = 0
    tie_break: Literal[TIE_BREAKS] = "index"
    rescale_norm: Literal[RESCALE_NORMS] = "l1"
    adapter_rank: PosInt | None = None
    allow_vocab_mismatch: bool = False
    ignore_adapter_base: bool = False
    threads: PosInt | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _entries(cls, v):
        return [{"model": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("merge_method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _known("merge method", v, METHODS)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        return None if v is None else _known("dtype", v.removeprefix("torch."), DELTA_DTYPES)


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        loc = tuple(err["loc"])
        if loc[0] == "models" and "parameters" in loc:
            return "unknown key (a model's parameters are weight and density; the others go in the top-level parameters)"
        return "unknown key"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing", "value_error") and not isinstance(err.get("input"), (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return msg


def _dotted(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else ("." if i else "") + str(p) for i, p in enumerate(loc))


def _line(node, loc: tuple) -> int | None:
    """1-based line of the key (or list item) at ``loc`` in the YAML tree, or of the deepest one that exists."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


class _Where:
    """Names the file, line and key of an error in a recipe file."""

    def __init__(self, path: Path, node):
        self.path, self.node = path, node

    def error(self, loc: tuple, msg: str) -> ConfigError:
        line = _line(self.node, loc)
        return ConfigError(f"{self.path}{f':{line}' if line else ''}: {_dotted(loc)}: {msg}")


def _same(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a mergekit-style recipe file. Raises ConfigError naming the file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML "
                          f"({getattr(e, 'problem', None) or e})") from None
    finally:
        loader.dispose()
    where = _Where(path, node)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (merge_method, base_model, models, ...) at the top level")
    for key, why in UNSUPPORTED.items():
        if raw.get(key) is not None:
            raise where.error((key,), why)
    if raw.get("tokenizer_source") not in (None, "base"):
        raise where.error(("tokenizer_source",), "only base is supported: the merged model gets the base model's tokenizer")
    try:
        f = _RecipeFile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise where.error(tuple(err["loc"]), _message(err) + more) from None
    return _recipe(f, where)


def _recipe(f: _RecipeFile, where: _Where) -> Recipe:
    g = f.parameters or _GlobalParams()
    sign = _sign(g.consensus_method)
    if g.majority_sign_method is not None:
        if sign is not None and sign != g.majority_sign_method:
            raise where.error(("parameters", "majority_sign_method"),
                              f"{g.majority_sign_method} conflicts with consensus_method: {g.consensus_method}")
        sign = g.majority_sign_method
    if "+" in f.base_model and not Path(f.base_model).exists():
        raise where.error(("base_model",), "a LoRA-applied base (model+lora) is not supported: give a model folder")
    inputs = []
    for i, m in enumerate(f.models):
        model = m.model
        if "+" in model and not Path(model).exists():
            on, _, lora = model.partition("+")
            if not _same(on, f.base_model) or "+" in lora:
                raise where.error(("models", i, "model"), f"{model!r}: a LoRA applied to another model than base_model "
                                  "is not supported; give the adapter folder (its delta is taken against base_model)")
            model = lora
        elif _same(model, f.base_model) and f.merge_method != "linear":
            continue  # mergekit: the base is no input of task-vector methods
        p = m.parameters or _InputParams()
        weight = p.weight if p.weight is not None else g.weight if g.weight is not None else 1.0
        density = p.density if p.density is not None else g.density if g.density is not None else 1.0
        inputs.append({"path": model, "weight": weight, "density": density})
    if not inputs:
        raise where.error(("models",), "no model to merge besides base_model")
    options = {"lambda_": g.lambda_, "normalize": g.normalize, "rescale": g.rescale, "sign": sign,
               "delta_dtype": f.dtype, "seed": f.random_seed, "tie_break": f.tie_break, "rescale_norm": f.rescale_norm,
               **{k: getattr(f, k) for k in EXTENSIONS}}
    return Recipe(method=f.merge_method, base=f.base_model, inputs=inputs,
                  **{k: v for k, v in options.items() if v is not None})


# ----------------------------------------------------------------------------- running
def run_recipe(recipe: Recipe, out_dir: str | Path) -> dict:
    """Merge as ``recipe`` says into ``out_dir``; returns the engine's summary."""
    from paft.merge import io

    return io.merge_models(recipe.base, recipe.merge_inputs(), recipe.method, out_dir, **recipe.merge_kwargs(),
                           recipe=recipe.to_yaml())


__all__ = ["Recipe", "RecipeInput", "load_recipe", "run_recipe"]
