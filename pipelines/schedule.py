"""Upload a pipeline version and create a recurring run of the alignment DAG on a KFP cluster.

    python pipelines/schedule.py --host http://localhost:8080 --namespace rewardtune --cron "0 0 3 * * *" \\
        --param config=s3://bucket/configs/sd15-aesthetic.yaml --param gpus_per_node=8
    python pipelines/schedule.py --cron "0 0 3 * * *" --param config=c.yaml --dry-run   # print, contact nothing

KFP cron has SIX fields with seconds first ("0 0 3 * * *" = daily at 03:00:00). A five-field crontab line
would be read with its minute as seconds, so it is rejected here instead of silently running at the wrong time;
every field is range-checked (croniter). Parameters are checked against the compiled pipeline's types.
Only one run at a time (max_concurrency=1) and no catch-up after downtime: training runs are long and share GPUs.

Idempotent per images tag: the pipeline version is named after it (reused when it exists), and a recurring run
of the same --job-name on that version is reported, not created twice. The server must be KFP backend
>= 2.16 (read from its healthz tag_name): older backends silently drop the platform spec's securityContext.
A multi-user (profiles) server needs --namespace: the profile namespace where manifests/ was applied.
"""

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PACKAGE = REPO / "pipelines" / "alignment.yaml"
PIPELINE_NAME = "rewardtune-alignment"
MIN_BACKEND = (2, 16, 0)  # KFP backend release that applies kubernetes securityContext from the platform spec
MIN_VALUES = {"num_nodes": 1, "gpus_per_node": 1, "epochs": 0}
IMAGE_REF = re.compile(r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?$")


class ScheduleError(ValueError):
    """A user error in the schedule request: printed as one line."""


def validate_cron(expr: str) -> str:
    """KFP (robfig/cron with seconds) needs 6 fields, seconds first; every field is range-checked by croniter,
    which puts seconds last, so the fields are rotated for the check only."""
    from croniter import croniter

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
    if not croniter.is_valid(" ".join([*fields[1:], fields[0]])):
        raise ScheduleError(
            f"cron '{expr}': a field is out of range (second 0-59, minute 0-59, hour 0-23, day-of-month 1-31, "
            "month 1-12, day-of-week 0-6)"
        )
    return " ".join(fields)


_TYPES = {  # KFP parameterType -> (check, what to tell the user)
    "STRING": (lambda v: True, "a string"),
    "NUMBER_INTEGER": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "NUMBER_DOUBLE": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "BOOLEAN": (lambda v: isinstance(v, bool), "true or false"),
    "STRUCT": (lambda v: isinstance(v, dict), 'a mapping such as {"key": "value"}'),
    "LIST": (lambda v: isinstance(v, list), "a list such as [1, 2]"),
}


def parse_params(items: list[str], package_path: Path = DEFAULT_PACKAGE) -> dict[str, Any]:
    """`name=value` pipeline parameters, checked against the compiled pipeline's parameter types; a string
    parameter keeps the text as written, the others are read as YAML (numbers, booleans, {...}, [...])."""
    package = next(yaml.safe_load_all(package_path.read_text()))
    types = {name: spec["parameterType"] for name, spec in package["root"]["inputDefinitions"]["parameters"].items()}
    params: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ScheduleError(f"--param '{item}' must look like name=value")
        if name not in types:
            raise ScheduleError(f"--param {name}: not a pipeline parameter; allowed: {', '.join(sorted(types))}")
        if types[name] == "STRING":
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except (yaml.YAMLError, ValueError, KeyError, AttributeError, TypeError, OverflowError):
                value = raw  # e.g. `!!timestamp a`: PyYAML raises plain errors for tags it cannot build
        check, expected = _TYPES[types[name]]
        if not check(value):
            raise ScheduleError(f"--param {name}={raw}: must be {expected} ({types[name]} in the pipeline)")
        if name in MIN_VALUES and value < MIN_VALUES[name]:
            raise ScheduleError(f"--param {name}={raw}: must be >= {MIN_VALUES[name]}")
        if name.endswith("_image") and not IMAGE_REF.match(value):
            raise ScheduleError(f"--param {name}={raw}: must be a whole image reference, registry/name:tag")
        if name == "algorithms":  # the DAG's plan-arms step checks it too, but only once the run has started
            from rewardtune.arms import ALGORITHMS

            unknown = [a for a in value if a not in ALGORITHMS]
            if unknown:
                raise ScheduleError(f"--param algorithms={raw}: unknown {unknown}; choose from {', '.join(ALGORITHMS)}")
        params[name] = value
    if "config" not in params:
        raise ScheduleError("--param config=... is required (YAML text, a path inside the image, or an s3:// URI)")
    return params


def parse_version(tag: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a KFP release tag such as '2.16.0' or 'v2.17.0-rc.1'; None when not a release."""
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", tag or "")
    return (int(match[1]), int(match[2]), int(match[3] or 0)) if match else None


def check_backend(healthz: dict[str, Any], namespace: str | None, skip_version_check: bool = False) -> None:
    """Refuse a backend older than MIN_BACKEND, and a multi-user server without a namespace, before any upload."""
    tag = str(healthz.get("tag_name") or "unknown")
    version = parse_version(tag)
    minimum = ".".join(map(str, MIN_BACKEND))
    if not skip_version_check and version is None:
        raise ScheduleError(f"KFP backend reports version '{tag}', not a release; rewardtune needs >= {minimum} "
                            "(pass --skip-version-check for a development build you know is recent)")
    if not skip_version_check and version < MIN_BACKEND:
        raise ScheduleError(f"KFP backend {tag} is older than {minimum}, which rewardtune needs (older backends drop "
                            "the securityContext of the platform spec, so runAsNonRoot would be lost); upgrade KFP")
    if healthz.get("multi_user") and not namespace:
        raise ScheduleError("this KFP server is multi-user: pass --namespace <profile namespace> (where "
                            "manifests/overlays/multi-user was applied)")


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "host": args.host, "namespace": args.namespace, "package": str(args.package),
        "pipeline_name": args.pipeline_name, "version_name": args.version, "experiment": args.experiment,
        "recurring_run": {
            "job_name": args.job_name, "cron_expression": validate_cron(args.cron), "max_concurrency": 1,
            "no_catchup": True, "enabled": True, "params": parse_params(args.param, args.package),
            "service_account": args.service_account,
        },
        "skip_version_check": args.skip_version_check,
    }


def _equals(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": 1, "key": key, "stringValue": value}]})  # 1: EQUALS


def _healthz(client: Any) -> dict[str, Any]:
    """The raw healthz JSON: the generated client model drops `tag_name`, the server's release version."""
    response = client._healthz_api.healthz_service_get_healthz(_preload_content=False)
    return json.loads(response.data or b"{}")


def schedule(request: dict[str, Any]) -> dict[str, Any]:
    """Check the server, upload (pipeline if new, version if new), ensure the experiment and the recurring run;
    returns the ids and whether the recurring run was created now."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="kfp")  # its version notice: checked below
    import kfp

    client = kfp.Client(host=request["host"], namespace=request["namespace"])
    namespace = request["namespace"] or client.get_user_namespace() or None
    healthz = _healthz(client)
    check_backend(healthz, namespace, request["skip_version_check"])
    if not healthz.get("multi_user"):
        namespace = None  # a standalone server runs everything in its own namespace
    pipeline_id = client.get_pipeline_id(request["pipeline_name"])
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(request["package"], pipeline_name=request["pipeline_name"]).pipeline_id
    versions = client.list_pipeline_versions(pipeline_id, filter=_equals("display_name", request["version_name"]))
    version_id = next((v.pipeline_version_id for v in versions.pipeline_versions or []), None)
    if version_id is None:
        version_id = client.upload_pipeline_version(
            request["package"], pipeline_version_name=request["version_name"], pipeline_id=pipeline_id
        ).pipeline_version_id
    experiment = client.create_experiment(request["experiment"], namespace=namespace)
    rr = request["recurring_run"]
    ids = {"pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": experiment.experiment_id}
    existing = client.list_recurring_runs(experiment_id=experiment.experiment_id, namespace=namespace,
                                          filter=_equals("display_name", rr["job_name"])).recurring_runs or []
    for run in existing:
        reference = run.pipeline_version_reference
        if reference is not None and reference.pipeline_version_id == version_id:
            return {**ids, "recurring_run_id": run.recurring_run_id, "created": False}
        raise ScheduleError(f"recurring run '{rr['job_name']}' ({run.recurring_run_id}) already exists for another "
                            "pipeline version; disable or delete it in the KFP UI, or pass another --job-name")
    run = client.create_recurring_run(
        experiment_id=experiment.experiment_id, job_name=rr["job_name"], cron_expression=rr["cron_expression"],
        max_concurrency=rr["max_concurrency"], no_catchup=rr["no_catchup"], enabled=rr["enabled"],
        pipeline_id=pipeline_id, version_id=version_id, params=rr["params"], service_account=rr["service_account"],
    )
    return {**ids, "recurring_run_id": run.recurring_run_id, "created": True}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None, help="KFP API endpoint (default: in-cluster / kube config)")
    parser.add_argument("--namespace", default=None,
                        help="KFP profile namespace (multi-user installs; required there, ignored by a standalone KFP)")
    parser.add_argument("--cron", required=True, help='6-field KFP cron, seconds first, e.g. "0 0 3 * * *"')
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter")
    parser.add_argument("--package", type=Path, default=DEFAULT_PACKAGE, help="compiled pipeline YAML")
    parser.add_argument("--pipeline-name", default=PIPELINE_NAME)
    parser.add_argument("--version", required=False, default=None, help="pipeline version name (default: images tag)")
    parser.add_argument("--experiment", default="rewardtune")
    parser.add_argument("--job-name", default="rewardtune-nightly")
    parser.add_argument("--service-account", default="rewardtune-pipeline")
    parser.add_argument("--skip-version-check", action="store_true",
                        help=f"accept a backend that does not report a release >= {'.'.join(map(str, MIN_BACKEND))}")
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
    try:
        with contextlib.redirect_stdout(sys.stderr):  # kfp.Client prints HTML links; keep stdout machine-readable
            ids = schedule(request)
    except ScheduleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(ids, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
