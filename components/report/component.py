"""report: one HTML + Markdown report over the run and every evaluated checkpoint (CPU image); runs last."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report(run: Input[Model], evaluations: Input[list[Dataset]], html: Output[HTML], markdown: Output[Markdown]):
    """Builds the report from the training run and the collected per-checkpoint evaluations."""
    from rewardtune.report import build_report

    build_report([run.path], [e.path for e in evaluations], html.path, markdown.path)
