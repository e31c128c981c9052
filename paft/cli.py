"""``paft`` command line. Each subcommand maps to one library function; errors print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


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
    print(f"\nDelta sparsity:\n{out['sparsity_table']}")
    for kind, reg in out["registered"].items():
        print(f"registered {reg['name']} v{reg['version']} (alias {reg['alias']})")
    print(f"\nOpen the MLflow UI on these runs:\n  {out['mlflow_ui']}")
    return 0


def cmd_prepare(args) -> int:
    from paft.data.prepare import prepare

    result = prepare(_params(args), args.out)
    print(json.dumps({"path": result["path"], "data_version": result["data_version"], "counts": result["counts"]}))
    return 0


def cmd_merge(args) -> int:
    from paft.merge import MergeInput, merge_models

    inputs = [MergeInput(p, weight=w, density=args.density) for p, w in zip(args.inputs, args.weights or [1.0] * len(args.inputs))]
    summary = merge_models(args.base, inputs, args.method, args.out, lambda_=args.lambda_, seed=args.seed)
    print(json.dumps(summary, default=str))
    return 0


def cmd_sparsity(args) -> int:
    from pathlib import Path

    from paft.errors import PaftError
    from paft.train.sparsity import format_table, sparsity_report

    names = args.names or [Path(d).resolve().name for d in args.deltas]
    if len(names) != len(args.deltas):
        raise PaftError(f"--names gives {len(names)} names for {len(args.deltas)} delta folders")
    if len(set(names)) != len(names):
        raise PaftError(f"input names must be unique, got {names} (pass --names)")
    report = sparsity_report(args.base, dict(zip(names, args.deltas)), args.out,
                             eps_abs=args.eps_abs, eps_rel=args.eps_rel)
    print(format_table(report))
    print(f"\nOutputs: {report['out_dir']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paft", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_params(sp):
        sp.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.sft.max_steps=50")
        return sp

    with_params(sub.add_parser("run", help="run the whole flow in-process")).set_defaults(fn=cmd_run)
    sp = with_params(sub.add_parser("prepare", help="the data stage (what `dvc repro prepare` runs)"))
    sp.add_argument("--out", default=None, help="output folder (default: paths.data_dir)")
    sp.set_defaults(fn=cmd_prepare)
    sp = sub.add_parser("merge", help="merge LoRA adapters / fine-tuned models onto a base")
    sp.add_argument("base")
    sp.add_argument("inputs", nargs="+")
    sp.add_argument("--method", default="ties")
    sp.add_argument("--out", required=True)
    sp.add_argument("--weights", type=float, nargs="+")
    sp.add_argument("--density", type=float, default=1.0)
    sp.add_argument("--lambda", dest="lambda_", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_merge)
    sp = sub.add_parser("sparsity", help="sparsity of fine-tuning deltas (adapters / fine-tuned models) vs a base")
    sp.add_argument("base")
    sp.add_argument("deltas", nargs="+", metavar="DELTA")
    sp.add_argument("--names", nargs="+", help="one name per DELTA (default: each folder's name)")
    sp.add_argument("--out", default="sparsity", help="output folder (default: ./sparsity)")
    sp.add_argument("--eps-abs", type=float, default=1e-5, help="absolute threshold on |delta| (default: 1e-5)")
    sp.add_argument("--eps-rel", type=float, default=1e-3,
                    help="relative threshold: |delta| <= eps_rel * mean|base tensor| (default: 1e-3)")
    sp.set_defaults(fn=cmd_sparsity)
    return p


def main(argv: list[str] | None = None) -> int:
    from paft.errors import PaftError

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
