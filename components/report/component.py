"""report: one HTML + Markdown report over every arm and every evaluated checkpoint (CPU image); runs last."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report(arms: Input[list[Dataset]], html: Output[HTML], markdown: Output[Markdown], metrics: Output[Metrics]):
    """Builds the report from the collected arms (collect-arm), plots overlaid; headline numbers go to KFP Metrics
    so the UI shows them (prefixed by the arm's label when there are several)."""
    from rewardtune.arms import arms_report

    headline = arms_report([a.path for a in arms], html.path, markdown.path)
    for name, value in headline.items():
        metrics.log_metric(name, value)
