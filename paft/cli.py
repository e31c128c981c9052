"""``paft`` command line. Each subcommand maps to one library function; errors print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from paft.errors import PaftError
from paft.rec.schema import DIMENSIONS as DIMENSION_CHOICES


def _params(args):
    from paft.config import load_params

    return load_params(args.params, args.overrides)


def cmd_run(args) -> int:
    from paft.tracking import check_reachable

    params = _params(args)  # validate before Prefect starts: a bad value costs nothing
    check_reachable(params.tracking_uri)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    from flows.paft import paft

    hf_logging.disable_progress_bar()  # Prefect's task-state lines are the progress report

    out = paft(params_path=args.params, overrides=args.overrides)
    print(f"\nMLflow parent run: {out['parent_run_id']}   data version: {out['data_version']}")
    print(f"Outputs: {out['run_dir']}\n")
    print(out["table"])
    if out["search"]:
        s = out["search"]
        print(f"\nMerge search: {len(s['points'])} merges tried, best {s['best']} (candidate paft_search; {s['objective']})")
    print(f"\nDelta sparsity:\n{out['sparsity_table']}")
    if out["verdict"]:
        print(f"\n{out['verdict']}")
    print(f"\nReport: {out['report']}   (again from MLflow: paft report {out['parent_run_id']})")
    for kind, reg in out["registered"].items():
        print(f"registered {reg['name']} v{reg['version']} (alias {reg['alias']})")
    print(f"\nOpen the MLflow UI on these runs:\n  {out['mlflow_ui']}")
    return 0


def cmd_report(args) -> int:
    out = args.out or f"report-{args.run_id}"
    if args.no_artifact:  # no Prefect: the library alone
        from paft.evaluate.experiment import write_experiment_report
        from paft.tracking import Tracker

        rep = write_experiment_report(Tracker.from_params(_params(args)), args.run_id, out, log=not args.no_log)
    else:
        _params(args)  # a bad params file stops here, before Prefect starts
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from flows.report import paft_report

        rep = paft_report(args.run_id, out, args.params, args.overrides, log=not args.no_log)
    if rep["verdict"]:
        print(rep["verdict"])
    print(f"Report: {rep['html']}\n        {rep['markdown']}")
    return 0


def cmd_prepare(args) -> int:
    from paft.data.prepare import prepare

    result = prepare(_params(args), args.out)
    print(json.dumps({"path": result["path"], "data_version": result["data_version"], "counts": result["counts"]}))
    return 0


MERGE_FLAGS = ("method", "weights", "density", "lambda_", "seed", "sign", "normalize", "rescale", "rescale_norm",
               "tie_break", "delta_dtype", "adapter_rank", "allow_vocab_mismatch", "ignore_adapter_base", "threads")


def cmd_merge(args) -> int:
    from paft.merge.recipe import Recipe, load_recipe, run_recipe

    if args.recipe:
        given = [k for k in MERGE_FLAGS if getattr(args, k) is not None]
        if args.base or args.inputs or given:
            what = "BASE INPUT..." if args.base or args.inputs else "--" + given[0].rstrip("_").replace("_", "-")
            raise PaftError(f"--recipe: give the merge either as a recipe or as BASE INPUT... and flags, not both ({what})")
        recipe = load_recipe(args.recipe)
    else:
        if not args.base or not args.inputs:
            raise PaftError("paft merge: give BASE INPUT... (and flags), or --recipe FILE")
        recipe = Recipe.from_flags(args.base, args.inputs, **{k: getattr(args, k) for k in MERGE_FLAGS})
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    if not args.out:
        raise PaftError("paft merge: --out DIR is required (or --print-recipe)")
    summary = run_recipe(recipe, args.out)
    print(json.dumps(summary, default=str))
    return 0


def cmd_sparsity(args) -> int:
    from pathlib import Path

    from paft.train.sparsity import format_table, sparsity_report

    names = args.names or [Path(d).resolve().name for d in args.deltas]
    if len(names) != len(args.deltas):
        raise PaftError(f"--names gives {len(names)} names for {len(args.deltas)} delta folders")
    if len(set(names)) != len(names):
        raise PaftError(f"input names must be unique, got {names} (pass --names)")
    report = sparsity_report(args.base, dict(zip(names, args.deltas)), args.out,
                             eps_abs=args.eps_abs, eps_rel=args.eps_rel, skip_unchanged=args.skip_unchanged)
    print(format_table(report))
    print(f"\nOutputs: {report['out_dir']}")
    return 0


def _judge(args):
    from paft.rec.judge import Judge, JudgeOptions

    params = _params(args)
    opts = {k: v for k, v in {"constrained": args.constrained, "pair_format": args.pair_format,
                              "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}.items() if v is not None}
    return Judge.from_pretrained(args.model, params.model.dtype, trust_remote_code=params.model.trust_remote_code,
                                 options=JudgeOptions.from_params(params, **opts))


def cmd_rec_judge(args) -> int:
    from paft.rec.batch import judge_file, read_items

    rows = read_items(args.input, args.task, args.dimension or [])  # every line checked before the model loads
    summary = judge_file(_judge(args), rows, args.out, args.task, args.dimension or [], args.citations)
    print(json.dumps(summary))
    return 0


def cmd_rec_eval(args) -> int:
    from pathlib import Path

    from paft.io import atomic_dir, read_jsonl, write_json, write_jsonl
    from paft.rec.batch import metrics_table
    from paft.rec.data import load

    from paft.rec.evaluate import evaluate_judge, limit_per_task

    sets: dict[str, list[dict]] = {}
    for spec in args.examples or []:
        sets[Path(spec).stem] = limit_per_task(read_jsonl(spec), args.limit)
    for spec in args.source or []:
        builder, _, path = spec.partition("=")
        name = builder if builder not in sets else Path(path).stem  # e.g. two QAGS files: qags, qags_xsum
        sets[name] = load(builder, path or None, limit=args.limit)
    if not sets:
        raise PaftError("give --examples FILE.jsonl or --source BUILDER=PATH (at least one)")

    judge = _judge(args)
    metrics, results = {}, {}
    for name, examples in sets.items():
        metrics[name], results[name] = evaluate_judge(judge, examples, args.citations, progress=True)
    with atomic_dir(args.out) as tmp:
        write_json(tmp / "metrics.json", metrics)
        for name, res in results.items():
            write_jsonl(tmp / f"results_{name}.jsonl", res)
        (tmp / "metrics.md").write_text(metrics_table(metrics) + "\n")
    print(metrics_table(metrics))
    print(f"\nOutputs: {args.out}")
    return 0


def cmd_rec_train(args) -> int:
    from pathlib import Path

    from paft.models import ensure_base
    from paft.train.launch import launch, training_job

    params = _params(args)
    data_dir = params.path(params.paths.data_dir)
    data = Path(args.data) if args.data else data_dir / "rec.jsonl"
    base = args.base or ensure_base(params, data_dir)["path"]
    res = params.resources
    summary = launch(training_job("rec", params, base, data, Path(args.out)), res.python, gpus=res.gpus_per_job,
                     accelerate_config=str(params.path(res.accelerate_config)) if res.accelerate_config else None)
    summary.pop("log_history", None)
    print(json.dumps(summary, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paft", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_params(sp):
        sp.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.sft.max_steps=50")
        return sp

    with_params(sub.add_parser("run", help="run the whole flow in-process")).set_defaults(fn=cmd_run)
    sp = sub.add_parser("report", help="the experiment report of a flow run, from MLflow",
                        description="Markdown and a standalone HTML page with charts (metrics per candidate, delta "
                                    "sparsity histograms, loss curves, merge search) of the flow run whose MLflow "
                                    "parent run is RUN_ID (tracking.uri of --params); logged to that run under report/ "
                                    "and published as the Prefect artifact paft-results.")
    sp.add_argument("run_id", metavar="RUN_ID", help="MLflow parent run id (printed by paft run)")
    with_params(sp)
    sp.add_argument("--out", default=None, help="output folder (default: ./report-RUN_ID)")
    sp.add_argument("--no-log", action="store_true", help="do not log the report to the MLflow run")
    sp.add_argument("--no-artifact", action="store_true", help="do not publish the Prefect artifact")
    sp.set_defaults(fn=cmd_report)
    sp = with_params(sub.add_parser("prepare", help="the data stage (what `dvc repro prepare` runs)"))
    sp.add_argument("--out", default=None, help="output folder (default: paths.data_dir)")
    sp.set_defaults(fn=cmd_prepare)
    sp = sub.add_parser("merge", help="merge LoRA adapters / fine-tuned models onto a base",
                        description="Merge from flags (BASE INPUT... --method ...) or from a mergekit-style YAML recipe "
                                    "(--recipe FILE; see paft/merge/recipe.py); --print-recipe prints the flags as one.")
    sp.add_argument("base", nargs="?", help="base model folder")
    sp.add_argument("inputs", nargs="*", metavar="INPUT", help="LoRA adapter or fine-tuned model folders")
    sp.add_argument("--recipe", help="mergekit-style YAML recipe (instead of BASE INPUT... and the flags below)")
    sp.add_argument("--out", help="output folder")
    sp.add_argument("--print-recipe", action="store_true", help="print the merge as a YAML recipe and exit")
    sp.add_argument("--method", help="merge method (default: ties)")
    sp.add_argument("--weights", type=float, nargs="+", help="one weight per INPUT (default: 1 each)")
    sp.add_argument("--density", type=float, help="share of each delta kept, in (0, 1] (default: 1)")
    sp.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=float, help="scale of the merged delta (default: 1)")
    sp.add_argument("--seed", type=int, help="seed of DARE's random masks (default: 0)")
    sp.add_argument("--sign", choices=["total", "frequency", "sum", "count"],
                    help="majority sign of ties / dare_ties: total (= sum, default) | frequency (= count)")
    sp.add_argument("--normalize", action=argparse.BooleanOptionalAction, help="default: the method's")
    sp.add_argument("--rescale", action=argparse.BooleanOptionalAction, help="default: the method's (dare_*: on)")
    sp.add_argument("--rescale-norm", choices=["l1", "density"],
                    help="rescale kept entries by the L1 norm ratio (mergekit, default) | by 1 / density (DARE paper)")
    sp.add_argument("--tie-break", choices=["index", "sort"],
                    help="entries tied at the top-k threshold: index (lowest first, fast; default) | sort (mergekit's choice)")
    sp.add_argument("--delta-dtype", choices=["input", "float32", "float64", "bfloat16", "float16"],
                    help="dtype full models' deltas are formed in: input (their own, mergekit's default) | float32 ...")
    sp.add_argument("--adapter-rank", type=int, help="also write the merge as a LoRA adapter of this rank (OUT/adapter)")
    sp.add_argument("--allow-vocab-mismatch", action="store_true", default=None,
                    help="merge inputs with another vocabulary size on the rows they share with the base")
    sp.add_argument("--ignore-adapter-base", action="store_true", default=None,
                    help="merge LoRA adapters whose recorded base is not BASE (shapes are still checked)")
    sp.add_argument("--threads", type=int, help="worker threads (default: the CPUs this process may use)")
    sp.set_defaults(fn=cmd_merge)
    sp = sub.add_parser("sparsity", help="sparsity of fine-tuning deltas (adapters / fine-tuned models) vs a base")
    sp.add_argument("base")
    sp.add_argument("deltas", nargs="+", metavar="DELTA")
    sp.add_argument("--names", nargs="+", help="one name per DELTA (default: each folder's name)")
    sp.add_argument("--out", default="sparsity", help="output folder (default: ./sparsity)")
    sp.add_argument("--eps-abs", type=float, default=1e-5, help="absolute threshold on |delta| (default: 1e-5)")
    sp.add_argument("--eps-rel", type=float, default=1e-3,
                    help="relative threshold: |delta| <= eps_rel * mean|base tensor| (default: 1e-3)")
    sp.add_argument("--skip-unchanged", action="store_true",
                    help="leave out tensors whose delta is zero everywhere (a merged model: measure what the merge changed)")
    sp.set_defaults(fn=cmd_sparsity)

    rec = sub.add_parser("rec", help="REC, the evaluator: judge, train, evaluate").add_subparsers(dest="rec_command", required=True)

    def judge_options(sp):
        from paft.rec.schema import CITATION_MODES, PAIR_FORMATS

        sp.add_argument("--model", required=True, help="REC model folder (or LoRA adapter folder)")
        sp.add_argument("--citations", choices=CITATION_MODES, default="span")
        sp.add_argument("--pair-format", choices=PAIR_FORMATS, default=None)
        sp.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=None,
                        help="schema-constrained decoding (default: rec.constrained)")
        sp.add_argument("--batch-size", type=int, default=None)
        sp.add_argument("--max-new-tokens", type=int, default=None)
        return with_params(sp)

    sp = judge_options(rec.add_parser("judge", help="judge a JSONL file: pointwise ratings, pairs or RAG citations"))
    sp.add_argument("--input", required=True, help="JSONL: instruction, response, context (pointwise); "
                                                   "response_a, response_b (pairwise); passages (rag)")
    sp.add_argument("--task", choices=("pointwise", "pairwise", "rag"), default="pointwise")
    sp.add_argument("--dimension", action="append", choices=DIMENSION_CHOICES,
                    help="pointwise dimension (repeatable; default: each row's own `dimension`)")
    sp.add_argument("--out", required=True, help="JSONL results (appended; a rerun resumes)")
    sp.set_defaults(fn=cmd_rec_judge)
    sp = judge_options(rec.add_parser("eval", help="REC metrics on labelled examples"))
    sp.add_argument("--examples", action="append", help="REC examples JSONL (e.g. data/processed/eval_rec.jsonl)")
    sp.add_argument("--source", action="append", metavar="BUILDER=PATH",
                    help="a real data set through a builder of paft.rec.data, e.g. wice=../shared/data/citations/wice_claim_dev.jsonl")
    sp.add_argument("--limit", type=int, default=None, help="first N examples of each set (of each task in --examples)")
    sp.add_argument("--out", default="rec_eval", help="output folder (metrics.json, metrics.md, results_*.jsonl)")
    sp.set_defaults(fn=cmd_rec_eval)
    sp = with_params(rec.add_parser("train", help="train a REC model (SFT, completion-only loss, LoRA by default)"))
    sp.add_argument("--data", default=None, help="REC examples JSONL (default: <paths.data_dir>/rec.jsonl)")
    sp.add_argument("--base", default=None, help="model to start from (default: model.base)")
    sp.add_argument("--out", required=True)
    sp.set_defaults(fn=cmd_rec_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PaftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
