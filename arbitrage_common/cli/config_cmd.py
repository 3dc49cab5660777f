"""`arbitrage config check` and `arbitrage config list`: validate AppConfig files (presets,
configs/*.yaml, rendered Serve YAMLs) without loading any weights. `arbitrage config schema`
and `arbitrage config reference`: the file's JSON Schema and docs/CONFIG.md (``config_reference``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def add_config_parser(sub) -> None:
    config = sub.add_parser("config", help="check and list AppConfig files (presets, configs/*.yaml); their "
                                           "schema and field reference (docs/CONFIG.md)")
    config_sub = config.add_subparsers(dest="config_cmd", required=True)
    check = config_sub.add_parser("check", help="validate configs without loading weights: fields, the Serve "
                                                "rendering, Ray Serve's deployment options, GPU settings")
    check.add_argument("files", nargs="*", help="AppConfig or Serve YAML files (default: every preset and "
                                                "configs/*.yaml)")
    check.add_argument("--paths", action="store_true", help="also check every model path is a local checkpoint "
                                                            "of the right kind (run it where the models are)")
    check.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    check.set_defaults(func=_check)
    lst = config_sub.add_parser("list", help="the shipped presets: models and GPUs per replica")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)
    schema = config_sub.add_parser("schema", help="print the JSON Schema of an AppConfig file (for an editor's YAML "
                                                  "language server: docs/CONFIG.md)")
    schema.set_defaults(func=_schema)
    ref = config_sub.add_parser("reference", help="write docs/CONFIG.md, every config field with its type, default, "
                                                  "bounds and description, from the pydantic models")
    ref.add_argument("--out", help="the file to write ('-': stdout; default: the project's docs/CONFIG.md)")
    ref.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file differs from the "
                                                          "models' reference")
    ref.set_defaults(func=_reference)


def default_files() -> list[Path]:
    from ..presets import PRESETS_DIR, REPO_ROOT, list_presets

    return list_presets(PRESETS_DIR) + sorted((REPO_ROOT / "configs").glob("*.yaml"))


def _validation_problems(exc, prefix: str = "") -> list:
    """Every error of a ValidationError as a Finding (``config.validation_problems``: the same
    lines ``load_config``'s ConfigError carries)."""
    from ..config import validation_problems
    from ..presets import Finding

    return [Finding(field, message) for field, message in validation_problems(exc, prefix)]


def _serve_option_problems(cfg) -> tuple[list, list]:
    """Ray Serve validates deployment options when a deployment is declared: no cluster needed."""
    from ..presets import Finding

    try:
        from ray import serve
    except ImportError:
        return [], [Finding("(ray)", "not installed: Ray Serve's validation of deployment options skipped")]

    class _Probe:  # stands in for the pool/coordinator classes: only the options are judged
        pass

    deployments = [(f"pools.{role}", cfg.pool_options(role)) for role, _ in cfg.pools.configured()]
    deployments.append(("coordinator", cfg.coordinator.deployment_options("coordinator")))
    errors = []
    for where, options in deployments:
        try:
            serve.deployment(_Probe, **options)
        except Exception as exc:  # noqa: BLE001 (Ray raises ValueError, TypeError, RayServeException...)
            # one line: Ray's messages (pydantic's among them) can span several
            errors.append(Finding(where, f"Ray Serve refuses the deployment options: {' '.join(str(exc).split())}"))
    return errors, []


def _app_configs(data: dict) -> list[tuple[str, Any, dict | None]]:
    """(field prefix, AppConfig dict, Serve application or None) triples: the file itself, or
    each application (a mapping) of a Serve YAML whose ``applications`` is a list
    (``_shape_problems`` reports the rest), with its deployments' live knobs put back into its
    args; where those cannot be (``merge_scaling``), the AppConfig dict is the ValueError."""
    from ..config import application_args

    if "applications" not in data:
        return [("", data, None)]
    apps = data["applications"]
    out = []
    for i, app in enumerate(apps if isinstance(apps, list) else ()):
        if isinstance(app, dict):
            try:
                out.append((f"applications[{i}].args.", application_args(app), app))
            except ValueError as exc:
                out.append((f"applications[{i}].args.", exc, app))
    return out


def _deployment_drift(app: dict, cfg: Any) -> list:
    """A Serve YAML edited by hand: deployments whose replica options (what Serve runs) differ
    from the coordinator's ``user_config`` scaling (what it sizes its lanes by), or that are
    missing. One rendered before the scaling moved out of the args gets one warning instead."""
    from ..config import COORDINATOR, COORDINATOR_SCALING_KEY, LIVE_SCALING_IN_ARGS, serve_application
    from ..presets import Finding

    given = {d.get("name"): d for d in app.get("deployments") or () if isinstance(d, dict)}
    if COORDINATOR_SCALING_KEY not in ((given.get(COORDINATOR) or {}).get("user_config") or {}):
        return [Finding("deployments", "no coordinator user_config.scaling: an older rendering, whose replica "
                                       "counts in args restart every replica when changed; render again")]
    out = []
    for rendered in serve_application(cfg)["deployments"]:
        name = rendered["name"]
        ours = {k: rendered.get(k) for k in LIVE_SCALING_IN_ARGS}
        theirs = {k: given.get(name, {}).get(k) for k in LIVE_SCALING_IN_ARGS}
        if ours != theirs:
            out.append(Finding(f"deployments[{name}]", "num_replicas / autoscaling_config differ from the "
                                                       "coordinator's user_config.scaling (it sizes its merge "
                                                       "lanes by that); render again from the AppConfig"))
    return out


def _shape_problems(data: Any) -> list:
    """What keeps a file from holding an AppConfig at all: not a mapping (an empty file is
    None), or a Serve YAML whose ``applications`` is not a list of mappings."""
    from ..config import APP_IMPORT_PATH
    from ..presets import Finding

    if data is None:
        return [Finding("(top level)", "expected a mapping (an AppConfig or a Serve YAML); the file is empty")]
    if not isinstance(data, dict):
        return [Finding("(top level)", "expected a mapping")]
    if "applications" not in data:
        return []
    apps = data["applications"]
    if not isinstance(apps, list):
        got = "nothing" if apps is None else type(apps).__name__
        return [Finding("applications", f"expected a list of applications (mappings), got {got}")]
    if not apps:
        return [Finding("applications", "expected a list of applications (mappings), got an empty list")]
    out = []
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            out.append(Finding(f"applications[{i}]", f"expected a mapping, got {type(app).__name__}"))
        elif app.get("import_path") != APP_IMPORT_PATH:
            out.append(Finding(f"applications[{i}].import_path",
                               f"{app.get('import_path')!r} is not {APP_IMPORT_PATH!r}"))
    return out


def check_file(file: str | Path, paths: bool = False, cluster: bool | None = None) -> dict:
    """Every problem of one config file: {"file", "ok", "errors", "warnings", "pools"}.
    ``cluster``: also what `arbitrage k8s render` refuses (``kuberay.render.cluster_problems``:
    Pod fit, label selectors); None: when an AppConfig file has a ``cluster:`` section (a Serve
    YAML's args always carry one, and `serve deploy` never renders them)."""
    import yaml
    from pydantic import ValidationError

    from ..config import AppConfig, application_config, render_serve_config, render_serve_yaml, yaml_error
    from ..kuberay.render import cluster_problems
    from ..kuberay.security import volume_profile_problems
    from ..presets import Finding, model_path_problems, resource_problems

    path = Path(file)
    errors: list[Finding] = []
    warnings: list[Finding] = []
    pools: dict[str, dict] = {}
    readable = False
    try:
        data = yaml.safe_load(path.read_text())
        readable = True
    except OSError as exc:
        errors.append(Finding("(file)", f"cannot read ({exc.strerror or exc})"))
        data = None
    except yaml.YAMLError as exc:
        errors.append(Finding("(file)", f"not YAML: {yaml_error(exc)}"))
        data = None
    if readable:
        errors += _shape_problems(data)
    if isinstance(data, dict):
        for prefix, raw, app in _app_configs(data):
            if isinstance(raw, ValueError):  # "<field>: <message>" (merge_scaling)
                field, _, message = str(raw).partition(": ")
                errors.append(Finding(prefix.removesuffix("args.") + field, message))
                continue
            try:
                cfg = AppConfig.model_validate(raw)
            except ValidationError as exc:
                errors += _validation_problems(exc, prefix)
                continue
            rendered = yaml.safe_load(render_serve_yaml(cfg))
            if application_config(rendered["applications"][0]) != cfg:
                errors.append(Finding(prefix + "(rendering)", "the Serve YAML's args do not round-trip"))
            if prefix and {k: v for k, v in data.items() if k != "applications"} != \
                    {k: v for k, v in render_serve_config(cfg).items() if k != "applications"}:
                warnings.append(Finding("(serve options)", "http/grpc options differ from the rendering of the "
                                                           "args (regenerate: arbitrage serve --config ... --render)"))
            if app is not None:
                warnings += [Finding(prefix.removesuffix("args.") + p.field, p.message)
                             for p in _deployment_drift(app, cfg)]
            serve_errors, serve_warnings = _serve_option_problems(cfg)
            res_errors, res_warnings = resource_problems(cfg)
            errors += [Finding(prefix + p.field, p.message) for p in serve_errors + res_errors]
            warnings += [Finding(prefix + p.field, p.message) for p in serve_warnings + res_warnings]
            if cluster or (cluster is None and not prefix and "cluster" in raw):
                errors += [Finding(prefix + field, message) for field, message in cluster_problems(cfg)]
                warnings += [Finding(prefix + field, message)
                             for field, message in volume_profile_problems(cfg.cluster)]
            if paths:
                errors += [Finding(prefix + p.field, p.message) for p in model_path_problems(cfg)]
            pools.update(_pool_summary(cfg))
    return {"file": str(path), "ok": not errors, "errors": [str(p) for p in errors],
            "warnings": [str(p) for p in warnings], "pools": pools}


def config_check_errors(files) -> list[str]:
    """``<file>: <field>: <message>`` for every error ``arbitrage config check`` finds in ``files``
    (no path checks), with the cluster checks whether or not a file has a ``cluster:`` section:
    what `arbitrage k8s render` refuses to render."""
    return [f"{r['file']}: {e}" for r in (check_file(f, cluster=True) for f in files) for e in r["errors"]]


def _pool_summary(cfg) -> dict[str, dict]:
    from ..kuberay.sizing import gpus_per_replica

    out = {}
    for role, spec in cfg.pools.configured():
        engine = spec.model.engine
        out[role] = {"path": spec.model.path, "backend": spec.model.backend, "gpus_per_replica": gpus_per_replica(spec),
                     "tensor_parallel_size": engine.tensor_parallel_size if engine else 1}
    return out


def _check(args) -> int:
    files = [Path(f) for f in args.files] or default_files()
    if not files:
        raise ValueError("config check: no config files found; name them (FILES)")
    results = [check_file(f, paths=args.paths) for f in files]
    failed = [r for r in results if not r["ok"]]
    if args.json:
        print(json.dumps({"ok": not failed, "files": results}, indent=2))
    else:
        for r in results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'}  {r['file']}")
            for w in r["warnings"]:
                print(f"      warning: {w}")
        for r in failed:  # each on its own line, file first: easy to grep in CI logs
            for e in r["errors"]:
                print(f"{r['file']}: {e}", file=sys.stderr)
    if failed:
        print(f"arbitrage config check: {len(failed)} of {len(results)} file(s) failed", file=sys.stderr)
        return 1
    return 0


def _list(args) -> int:
    from ..config import load_config
    from ..presets import list_presets

    rows = []
    for path in list_presets():
        cfg = load_config(path)
        pools = _pool_summary(cfg)
        rows.append({"preset": path.stem, "file": str(path), "name": cfg.name, "base_dir": cfg.base_dir,
                     "pools": pools, "gpus_one_replica_each": sum(p["gpus_per_replica"] for p in pools.values())})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        p = row["pools"]
        print(f"{row['preset']:<20} {p['draft']['path']} -> {p['target']['path']}  "
              f"({row['gpus_one_replica_each']:g} GPUs for one replica of each pool)  {row['file']}")
    return 0


def _schema(args) -> int:
    from .config_reference import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def _reference(args) -> int:
    from ..paths import project_home
    from .config_reference import COMMAND, render_reference

    text = render_reference()
    if args.out == "-":
        if args.check:
            raise ValueError("config reference: --check compares a file; name it with --out FILE")
        sys.stdout.write(text)
        return 0
    out = Path(args.out) if args.out else project_home() / "docs" / "CONFIG.md"
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"config reference --check: {out} differs from the models' reference; run `{COMMAND}` and "
                  f"commit the result", file=sys.stderr)
            return 1
        print(f"config reference --check: {out} matches the models")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(out)
    return 0
