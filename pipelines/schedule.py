"""Upload a pipeline version and create a recurring run of the alignment DAG on a KFP cluster.

    python pipelines/schedule.py --host http://localhost:8080 --cron "0 0 3 * * *" \\
        --param config=s3://bucket/configs/sd15-aesthetic.yaml --param gpu_count=8
    python pipelines/schedule.py --cron "0 0 3 * * *" --dry-run   # print the requests, contact nothing

KFP cron has SIX fields with seconds first ("0 0 3 * * *" = daily at 03:00:00). A five-field crontab line
would be read with its minute as seconds, so it is rejected here instead of silently running at the wrong time.
Only one run at a time (max_concurrency=1) and no catch-up after downtime: training runs are long and share GPUs.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PACKAGE = REPO / "pipelines" / "alignment.yaml"
PIPELINE_NAME = "rewardtune-alignment"


class ScheduleError(ValueError):
    """A user error in the schedule request: printed as one line."""


def validate_cron(expr: str) -> str:
    """KFP (robfig/cron with seconds) needs 6 fields; explain the fix for a 5-field crontab line."""
    fields = expr.split()
    if len(fields) == 5:
        raise ScheduleError(
            f"cron '{expr}' has 5 fields, but KFP cron has 6 with seconds first; "
            f"for the crontab meaning use '0 {expr}' (a leading 0 seconds field)"
        )
    if len(fields) != 6:
        raise ScheduleError(
            f"cron '{expr}' has {len(fields)} fields; KFP needs 6: second minute hour day-of-month month day-of-week"
        )
    return " ".join(fields)


def parse_params(items: list[str], package_path: Path = DEFAULT_PACKAGE) -> dict[str, Any]:
    """`name=value` pipeline parameters; values are YAML scalars (numbers, bools, {...} dicts), names checked."""
    package = next(yaml.safe_load_all(package_path.read_text()))
    allowed = set(package["root"]["inputDefinitions"]["parameters"])
    params: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ScheduleError(f"--param '{item}' must look like name=value")
        if name not in allowed:
            raise ScheduleError(f"--param {name}: not a pipeline parameter; allowed: {', '.join(sorted(allowed))}")
        params[name] = yaml.safe_load(raw) if name != "config" else raw
    if "config" not in params:
        raise ScheduleError("--param config=... is required (YAML text, a path inside the image, or an s3:// URI)")
    return params


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "host": args.host, "namespace": args.namespace, "package": str(args.package),
        "pipeline_name": args.pipeline_name, "version_name": args.version, "experiment": args.experiment,
        "recurring_run": {
            "job_name": args.job_name, "cron_expression": validate_cron(args.cron), "max_concurrency": 1,
            "no_catchup": True, "enabled": True, "params": parse_params(args.param, args.package),
            "service_account": args.service_account,
        },
    }


def schedule(request: dict[str, Any]) -> dict[str, str]:
    """Upload (pipeline if new, then a version), ensure the experiment, create the recurring run; returns the ids."""
    import kfp

    client = kfp.Client(host=request["host"], namespace=request["namespace"])
    pipeline_id = client.get_pipeline_id(request["pipeline_name"])
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(request["package"], pipeline_name=request["pipeline_name"]).pipeline_id
    version = client.upload_pipeline_version(
        request["package"], pipeline_version_name=request["version_name"], pipeline_id=pipeline_id
    )
    experiment = client.create_experiment(request["experiment"], namespace=request["namespace"])
    rr = request["recurring_run"]
    run = client.create_recurring_run(
        experiment_id=experiment.experiment_id, job_name=rr["job_name"], cron_expression=rr["cron_expression"],
        max_concurrency=rr["max_concurrency"], no_catchup=rr["no_catchup"], enabled=rr["enabled"],
        pipeline_id=pipeline_id, version_id=version.pipeline_version_id, params=rr["params"],
        service_account=rr["service_account"],
    )
    return {"pipeline_id": pipeline_id, "version_id": version.pipeline_version_id,
            "experiment_id": experiment.experiment_id, "recurring_run_id": run.recurring_run_id}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None, help="KFP API endpoint (default: in-cluster / kube config)")
    parser.add_argument("--namespace", default=None, help="KFP profile namespace (multi-user installs)")
    parser.add_argument("--cron", required=True, help='6-field KFP cron, seconds first, e.g. "0 0 3 * * *"')
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter")
    parser.add_argument("--package", type=Path, default=DEFAULT_PACKAGE, help="compiled pipeline YAML")
    parser.add_argument("--pipeline-name", default=PIPELINE_NAME)
    parser.add_argument("--version", required=False, default=None, help="pipeline version name (default: images tag)")
    parser.add_argument("--experiment", default="rewardtune")
    parser.add_argument("--job-name", default="rewardtune-nightly")
    parser.add_argument("--service-account", default="rewardtune-pipeline")
    parser.add_argument("--dry-run", action="store_true", help="print the request as JSON and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version is None:
        args.version = f"{PIPELINE_NAME}-{yaml.safe_load((REPO / 'images' / 'images.yaml').read_text())['tag']}"
    try:
        request = build_request(args)
    except ScheduleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(request, indent=2))
        return 0
    with contextlib.redirect_stdout(sys.stderr):  # kfp.Client prints HTML links; keep stdout machine-readable
        ids = schedule(request)
    print(json.dumps(ids, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
