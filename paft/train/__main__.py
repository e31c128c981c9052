"""Entry point of one training subprocess: ``python -m paft.train JOB.json``.

Runs the job, writes the output folder whole (adapter or model + ``summary.json``) and exits
non-zero with one line on stderr when it fails. Each job is its own process so that its memory
(GPU memory included) is freed when it ends, and it can get its own devices and threads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def run(job_path: str) -> int:
    from paft.errors import PaftError
    from paft.io import atomic_dir, write_json
    from paft.train.common import Job, finish, tracked

    job = Job.load(job_path)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    from paft.train.align import train_align
    from paft.train.sft import train_sft

    fn = {"sft": train_sft, "rec": train_sft, "align": train_align}[job.kind]
    if int(os.environ.get("RANK", "0")) != 0:  # another process of `accelerate launch`: trains, rank 0 writes
        fn(job, Path(job.out))
        return 0
    try:
        with tracked(job), atomic_dir(job.out) as tmp:  # rank 0 alone logs to MLflow (the callback checks it too)
            summary = fn(job, tmp)
            if job.kind == "rec" and job.cfg["finetune"] == "lora":  # REC is served as a whole model: fold the adapter in
                from paft.train.export import merge_adapter

                merge_adapter(job.base, tmp, job.dtype, job.trust_remote_code)
            write_json(tmp / "summary.json", {"kind": job.kind, "pid": os.getpid(), **summary})
        finish(job)
    except PaftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        print("usage: python -m paft.train JOB.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(sys.argv[1]))
