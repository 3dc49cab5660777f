"""`arbitrage k8s render`: the KubeRay manifests (RayService, kustomize base and overlays)
from the configs; `--check` fails when the files on disk differ from the rendering.
`arbitrage k8s scale-patch`: the `kubectl patch` that carries a config's worker-group bounds to
the running RayCluster (KubeRay does not: ``kuberay.scale``)."""
from __future__ import annotations

import sys
from pathlib import Path


def add_k8s_parser(sub) -> None:
    k8s = sub.add_parser("k8s", help="KubeRay manifests rendered from the configs (docs/KUBERAY.md)")
    k8s_sub = k8s.add_subparsers(dest="k8s_cmd", required=True)
    render = k8s_sub.add_parser("render", help="write k8s/base/<name> and k8s/overlays/<name>[-ha] for cpu-demo "
                                               "and every preset (or the ones named)")
    render.add_argument("--preset", action="append", default=[], metavar="NAME",
                        help="render only this target: cpu-demo or a preset name (repeatable; default: all)")
    render.add_argument("--config", help="render this AppConfig file instead (its overlay name: --name)")
    render.add_argument("--name", help="with --config: the base/overlay directory name (default: the file's stem)")
    render.add_argument("--out", help="the k8s/ directory to write into (default: the project's k8s/)")
    render.add_argument("--check", action="store_true", help="write nothing; exit 1 when a rendered file is "
                                                             "missing or differs on disk, or a file an earlier "
                                                             "render wrote for these targets, or for a target "
                                                             "that no longer exists, is no longer rendered")
    render.set_defaults(func=_render)
    scale = k8s_sub.add_parser("scale-patch", help="print the kubectl commands that set the running RayCluster's "
                                                   "worker-group minReplicas/maxReplicas to the rendering's "
                                                   "(`kubectl apply` does not: docs/KUBERAY.md §6)")
    scale.add_argument("name", nargs="?", metavar="NAME", help="cpu-demo or a preset name")
    scale.add_argument("--config", help="this AppConfig file instead of a named target")
    scale.set_defaults(func=_scale_patch)


def _refused(problems: list[str]) -> bool:
    """Print ``<file>: <field>: <message>`` lines (those `config check` prints); True if any."""
    for line in problems:
        print(f"arbitrage: error: {line}", file=sys.stderr)
    return bool(problems)


_ORPHAN = ("was rendered for a target that is no longer one (a removed or renamed preset?); not deleted: "
           "delete it if it is not yours")


def _render(args) -> int:
    from ..config import load_config
    from ..kuberay.targets import (
        default_out,
        drift,
        orphans,
        remove_stale,
        render_targets,
        stale,
        target_names,
        target_path,
        write_files,
    )
    from .config_cmd import config_check_errors

    if args.config:
        if args.preset:
            raise ValueError("--config and --preset: name one kind of target")
        paths = {args.name or Path(args.config).stem: Path(args.config)}
        known = None  # a file of the user's: its own directories only
    else:
        if args.name is not None:
            raise ValueError("--name: only with --config (a target's directories are named after it)")
        paths = {name: target_path(name) for name in (args.preset or target_names())}
        known = target_names()  # a removed or renamed target's leftovers are named
    configs = {name: load_config(path) for name, path in paths.items()}  # ConfigError: file, field, message
    # Then everything else `arbitrage config check` refuses (Ray Serve's own option checks, the
    # GPU rules, the cluster fit): a manifest of a config that check fails would never come up.
    if _refused(config_check_errors(paths.values())):
        return 1
    # any rendering error surfaces here, before a file is written
    files = render_targets(configs, paths, user_configs=known is None)
    out = Path(args.out) if args.out else default_out()
    left_behind = orphans(out, known) if known is not None else []
    if args.check:
        differ, left_over = drift(files, out), stale(files, out, list(paths))
        for rel in differ:
            print(f"k8s render --check: {out / rel} differs from the rendering", file=sys.stderr)
        for rel in left_over:
            print(f"k8s render --check: {out / rel} is no longer rendered (stale)", file=sys.stderr)
        for rel in left_behind:
            print(f"k8s render --check: {out / rel} {_ORPHAN}", file=sys.stderr)
        if differ or left_over or left_behind:
            print("k8s render --check: run `make k8s` and commit the result", file=sys.stderr)
            return 1
        print(f"k8s render --check: {len(files)} file(s) match the configs")
        return 0
    for path in write_files(files, out):
        print(path)
    for path in remove_stale(files, out, list(paths)):
        print(f"removed {path} (no longer rendered)")
    for rel in left_behind:
        print(f"k8s render: {out / rel} {_ORPHAN}", file=sys.stderr)
    _print_sizes(configs)
    # KubeRay leaves the groups' bounds out of its RayCluster hash: applying a change of them
    # alone never reaches a running cluster.
    print("Pods min-max above: `kubectl apply` never changes them on a running RayCluster (KubeRay leaves them out "
          "of its hash); `arbitrage k8s scale-patch <name>` prints the kubectl patch that does (docs/KUBERAY.md §6).")
    return 0


def _scale_patch(args) -> int:
    from ..config import load_config
    from ..kuberay.render import autoscaling_at_max_rule
    from ..kuberay.scale import scale_patch_commands
    from ..kuberay.targets import target_path
    from .config_cmd import config_check_errors

    if (args.name is None) == (args.config is None):
        raise ValueError("k8s scale-patch: name one target (cpu-demo or a preset) or --config FILE")
    path = Path(args.config) if args.config else target_path(args.name, option="k8s scale-patch NAME")
    cfg = load_config(path)
    if _refused(config_check_errors([path])):  # no patch for a config `k8s render` would refuse
        return 1
    lines = scale_patch_commands(cfg)
    print(f"# {cfg.name}: set the active RayCluster's worker-group bounds to the rendering's")
    for line in lines:
        print(line)
    if autoscaling_at_max_rule(cfg) is not None:  # bounds written in, and not in the overlay (its CRDs)
        print(f"# then reload ArbitrageAutoscalingAtMax's bounds: kubectl apply -k k8s/overlays/"
              f"{args.name or '<name>'}/monitoring")
    return 0


def _print_sizes(configs) -> None:
    """Each target's worker groups: Pod shape and Pod counts (what a platform team budgets)."""
    from ..kuberay.sizing import group_sizes

    for name, cfg in configs.items():
        sizes = group_sizes(cfg)
        gpus = (sum(g.gpus * g.min_pods for g in sizes), sum(g.gpus * g.max_pods for g in sizes))
        print(f"{name}: GPUs {gpus[0]} at min, {gpus[1]} at max")
        for g in sizes:
            print(f"  {g.name:<12} Pods {g.min_pods}-{g.max_pods} (deploy {g.initial_pods}), each {g.cpus} CPU "
                  f"{g.gpus} GPU: {', '.join(g.deployments)}")
