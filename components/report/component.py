"""report: one HTML + Markdown report over the run and every evaluated checkpoint (CPU image); runs last."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report(
    run: Input[Model], evaluations: Input[list[Dataset]], html: Output[HTML], markdown: Output[Markdown], metrics: Output[Metrics]
):
    """Builds the report from the training run and the collected per-checkpoint evaluations; headline numbers
    go to KFP Metrics so the UI shows them."""
    import tempfile

    from rewardtune.report import build_report
    from rewardtune.stages import merge_evaluations, run_label

    with tempfile.TemporaryDirectory() as merged:
        merge_evaluations([e.path for e in evaluations], merged)
        headline = build_report([run.path], [merged], html.path, markdown.path, labels=[run_label(run.path)])
    for name, value in headline.items():
        metrics.log_metric(name, value)
