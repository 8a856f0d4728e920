"""Plan a config on a cluster: parameters, FLOPs, memory per GPU, all-to-all traffic, time and cost.

    python launch/plan.py +conf=671b cluster.gpus=2048
    python launch/plan.py +conf=671b parallel.pp=8 cluster.gpus=1024 --json
    python launch/plan.py +conf=small cluster.gpus=1 cluster.gpu_memory_gb=24 plan.json=runs/plan.json

The config takes the overrides of launch/pretrain.py (``+conf=NAME``, ``section.field=value``); the
machines are described by ``cluster.KEY=VALUE`` (keys below, defaults: the report's H800 cluster;
``cluster.gpus`` defaults to parallel.pp x parallel.ep). ``--json`` prints the plan as JSON instead
of the table; ``plan.json=PATH`` also writes it there. The model of each number: docs/planner.md.

Exit status: 0 the plan fits; 2 it does not (the last line names the term that overflows and the
nearest layout that fits); 1 bad input (one line ``error: ...`` on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python launch/plan.py` from anywhere
    sys.path.insert(0, str(REPO))

from train.config import Config, ConfigError, check_preset_args  # noqa: E402
from train.errors import UserError  # noqa: E402
from train.plan import Cluster, Plan, fewest_gpus, format_plan, plan, suggest_layout  # noqa: E402
from train.plan_report import no_fit_line  # noqa: E402
from train.plan_suggest import least_memory  # noqa: E402

CLUSTER_KEYS = {f.name: f.type for f in dataclasses.fields(Cluster)}


def parse_args(argv: list[str]) -> tuple[dict[str, object], list[str], bool, str]:
    """(cluster keys given, config overrides, --json, plan.json path); UserError on a bad argument."""
    cluster: dict[str, object] = {}
    overrides: list[str] = []
    as_json, json_path = False, ""
    for arg in argv:
        if arg == "--json":
            as_json = True
        elif arg.startswith("plan.json="):
            json_path = arg.split("=", 1)[1]
            if not json_path:
                raise UserError("plan.json= needs a path: plan.json=PATH")
        elif arg.startswith("cluster."):
            key, sep, value = arg[len("cluster."):].partition("=")
            if key not in CLUSTER_KEYS:
                raise UserError(f"unknown key cluster.{key}; valid keys: "
                                f"{', '.join('cluster.' + k for k in CLUSTER_KEYS)}")
            if not sep or not value:
                raise UserError(f"cluster.{key} needs a value: cluster.{key}=VALUE")
            kind = CLUSTER_KEYS[key]
            convert = {"int": int, "float": float}.get(kind if isinstance(kind, str) else kind.__name__)
            try:
                cluster[key] = convert(value) if convert else value
            except ValueError:
                what = "an integer" if convert is int else "a number"
                raise UserError(f"cluster.{key}={value!r} is not {what}") from None
        elif arg.startswith("-"):
            raise UserError(f"unknown option {arg}; options: --json (and plan.json=PATH, cluster.KEY=VALUE, overrides)")
        else:
            overrides.append(arg)
    return cluster, overrides, as_json, json_path


def compose(overrides: list[str]):
    """The composed (unvalidated) Hydra config, as train.config.load_config composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.config import REPO_ROOT, SCHEMA_NAME, register_schema

    register_schema()
    try:
        with initialize_config_dir(config_dir=str(REPO_ROOT), version_base=None):
            return hydra_compose(config_name=SCHEMA_NAME, overrides=list(overrides))
    except Exception as err:  # Hydra / OmegaConf errors: one line with the cause
        if not type(err).__module__.startswith(("hydra", "omegaconf")):
            raise
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        cause = err.__cause__
        if cause is not None and str(cause):
            text += f": {str(cause).splitlines()[0]}"
        raise UserError(text) from None


def load(overrides: list[str], cluster_keys: dict[str, object]) -> tuple[Config, Cluster, str]:
    """(config, cluster, note). Without cluster.gpus: pp x ep GPUs or, when the batch cannot be split over
    them, the layout ``batch_layout`` finds (said in the note); with it, that layout in the error line."""
    from train.config import to_config

    node = compose(overrides)
    gpus = cluster_keys.get("gpus")
    first = to_config(node, world_size=1)
    if gpus is None:  # the smallest world the configured layout allows
        gpus = first.parallel.pp * first.parallel.ep
    cluster = Cluster(**{**cluster_keys, "gpus": gpus})
    cluster.check()
    try:
        return to_config(node, world_size=cluster.gpus), cluster, ""
    except ConfigError as err:
        if first.parallel.pp * first.parallel.ep > cluster.gpus:
            raise
        found = batch_layout(node, cluster.gpus)
        if found is None:
            raise
        runs, ep = found
        fix = f"cluster.gpus={runs}" + (f" parallel.ep={ep}" if ep != first.parallel.ep else "")
        if "gpus" in cluster_keys:
            raise ConfigError(f"{err}; the batch runs on {fix}") from None
        cfg = dataclasses.replace(first, parallel=dataclasses.replace(first.parallel, ep=ep))
        from train.config import validate

        cluster = dataclasses.replace(cluster, gpus=runs)
        return validate(cfg, runs), cluster, (f"on parallel.pp x parallel.ep = {gpus:,} GPUs: {err}; planned on the "
                                              f"most GPUs that split it: {fix}")


def batch_layout(node, world: int) -> tuple[int, int] | None:
    """For a batch that ``world`` GPUs cannot split (``train.batch_size`` not a multiple of micro-batch x dp,
    or too few micro-batches for the schedule): the most GPUs below ``world`` at the same parallel.pp on
    which it validates and the schedule runs every batch of the ramp, with the largest parallel.ep up to the
    configured one: (gpus, ep); None if there are none."""
    from parallel.pipeline.parallelize import check_micro_batches
    from train.config import to_config, validate

    base = to_config(node, world_size=1)
    p = base.parallel
    for dp in range(min(world // p.pp, base.train.batch_size), 0, -1):
        ep = max(e for e in range(1, min(p.ep, dp) + 1) if dp % e == 0 and base.model.n_routed_experts % e == 0)
        cfg = dataclasses.replace(base, parallel=dataclasses.replace(p, ep=ep))
        try:
            validate(cfg, p.pp * dp)
            if p.pp > 1:
                check_micro_batches(cfg, dp)
        except ConfigError:
            continue
        return p.pp * dp, ep
    return None


def nearest(cfg: Config, cluster: Cluster) -> str:
    """Overrides of the nearest layout that fits, on these GPUs or, failing that, on the fewest."""
    fix = suggest_layout(cfg, cluster)
    if fix:
        return fix
    more = fewest_gpus(cfg, cluster)
    if more is None:
        return ""
    gpus, changes = more
    return f"cluster.gpus={gpus}" + ("" if changes == "as configured" else f" {changes}")


def plan_dict(result: Plan, overrides: list[str]) -> dict:
    out = result.as_dict()
    out["overrides"] = overrides
    return out


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        keys = ", ".join(f"cluster.{f.name} (default {'parallel.pp x parallel.ep' if f.name == 'gpus' else f.default})"
                         for f in dataclasses.fields(Cluster))
        print(f"\ncluster keys: {keys}")
        return 0
    try:
        cluster_keys, overrides, as_json, json_path = parse_args(argv)
        check_preset_args(overrides)
        cfg, cluster, note = load(overrides, cluster_keys)
        try:
            result = plan(cfg, cluster, suggest=False)
        except ConfigError as err:  # a layout these GPUs cannot hold: say what would (not for a field's own error)
            fix = "" if str(err).startswith("parallel.stage_boundaries") else nearest(cfg, cluster)
            raise UserError(f"{err}" + (f"; nearest layout that fits: {fix}" if fix else "")) from None
        if note:
            result.notes.insert(0, note)
        if not result.fits:
            result.suggestion = nearest(cfg, cluster)
            if not result.suggestion:  # say why nothing fits: the least memory any nearby layout needs
                result.no_fit = no_fit_line(cfg, cluster.gpus, least_memory(cfg, cluster))
        data = plan_dict(result, overrides)
        if json_path:
            try:
                Path(json_path).parent.mkdir(parents=True, exist_ok=True)
                Path(json_path).write_text(json.dumps(data, indent=1) + "\n")
            except OSError as e:
                raise UserError(f"plan.json={json_path}: cannot write it ({e.strerror or e})") from None
        if as_json:
            print(json.dumps(data, indent=1))
        else:
            print(format_plan(result, " ".join(overrides)))
        return 0 if result.fits else 2
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
