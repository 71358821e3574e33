"""record-status: the exit handler; logs how the run ended (and why it failed) where operators look first."""

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def record_status(status: dsl.PipelineTaskFinalStatus) -> str:
    """Runs after the DAG whatever happened; returns the one-line status that `record_run_status` printed."""
    from rewardtune.stages import record_run_status

    return record_run_status(status.state, status.pipeline_job_resource_name, status.error_message)
