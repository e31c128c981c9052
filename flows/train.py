"""The ``paft-train`` flow: one training job of the ``paft`` flow as a flow run of its own.

With ``orchestration.mode: deployments`` the ``paft`` flow starts SFT, alignment (and the sequential baseline and
REC) as runs of this flow's deployment (``paft-train/gpu`` in prefect.yaml) on a GPU work pool, so the jobs of the
fan-out land on separate workers; it waits for them and reads the result each leaves in the run folder.
"""

from __future__ import annotations

from prefect import flow

from paft.config import Params
from paft.io import write_json
from tasks import stages


@flow(name="paft-train", flow_run_name="{stage}", log_prints=True)
def paft_train(stage: str, params: dict, root: str, inputs: dict) -> dict:
    """``stage``: a training job of the fan-out (sft, align, a variant of train.variants), sequential or rec;
    ``params``: the parent's validated params (``root``: the folder
    their relative paths resolve against); ``inputs``: the stage task's other arguments."""
    p = Params.model_validate({**params, "root": root})
    result = stages.run_training(p, stage, inputs)
    write_json(stages.result_file(inputs["run_dir"], stage), result)
    return result
