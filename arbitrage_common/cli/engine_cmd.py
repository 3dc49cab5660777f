"""`arbitrage router ...` and `arbitrage bench` (in-process engine)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..synthetic.problems import MIXES
from .argtypes import mix_list, non_negative_int, positive_float, positive_int
from .output import emit_json


def add_router_parser(sub) -> None:
    router = sub.add_parser("router", help="the Arbitrage router pipeline").add_subparsers(dest="router_cmd", required=True)
    data = router.add_parser("data", help="oracle-labelled steps: both models write, the PRM scores both")
    data.add_argument("--out", required=True, help="JSONL dataset to write")
    data.add_argument("--n", type=positive_int, default=3000, help="training problems")
    data.add_argument("--seed", type=non_negative_int, default=0)
    data.add_argument("--models-dir", help="bundled checkpoints (default: $ARBITRAGE_HOME/models, else the installed bundle)")
    data.add_argument("--label-margin", type=float, default=0.0,
                      help="class 1 when PRM(t) - PRM(d) > this (0: the paper's label; `router train` can relabel)")
    data.add_argument("--mix", type=mix_list, default=("math",),
                      help="problem mix: math, olympiad, or a comma list (problems alternate)")
    data.add_argument("--prm", type=existing_path, help="PRM checkpoint that labels the steps (default: <models-dir>/prm)")
    data.add_argument("--endpoint", help="HOST:PORT of a running service (e.g. a GPU preset): collect over gRPC "
                                         "with policy oracle at threshold 0 instead of the bundled models in-process "
                                         "(API key from $ARBITRAGE_API_KEY)")
    data.add_argument("--app", help="with --endpoint: Serve application name (gRPC metadata)")
    data.add_argument("--dataset", type=dataset_name, help="with --endpoint: problems of this benchmark's file "
                                                           "(a training split: never the one you bench on)")
    data.add_argument("--data-file", type=existing_path, help="with --dataset: local JSONL file or folder")
    data.add_argument("--limit", type=positive_int, help="with --dataset: the first N problems")
    data.add_argument("--max-steps", type=positive_int, default=64, help="with --endpoint: step cap per problem")
    data.set_defaults(func=_router_data)

    train = router.add_parser("train", help="train the router (classifier: resumable; verifier-head: minutes)")
    train.add_argument("--kind", choices=["classifier", "verifier-head"], default="classifier",
                       help="classifier: a one-logit sequence classifier fine-tuned from --init; verifier-head: "
                            "--init is an LM-verifier PRM, kept frozen, plus a logistic head fitted to the labels")
    train.add_argument("--data", required=True)
    train.add_argument("--init", help="start from these weights (PRM) or an LM (default: the bundled prm)")
    train.add_argument("--out", required=True, help="checkpoint directory (classifier: resumes from <out>/ckpt "
                                                    "only with the same arguments and rows)")
    # Flags of one kind only default to None, so a flag given to the other kind is refused
    # (`_kind_flags`), never silently ignored.
    train.add_argument("--steps", type=positive_int, help="classifier: training steps (default: 400)")
    train.add_argument("--seed", type=non_negative_int, default=0)
    train.add_argument("--lr", type=positive_float, help="classifier: peak learning rate (default: 0.0003)")
    train.add_argument("--threads", type=positive_int, default=1)
    train.add_argument("--annotate", action=argparse.BooleanOptionalAction,
                       help="classifier: 'Model 0:'/'Model 1:' history annotations (default: on; a verifier head "
                            "reads history unannotated)")
    train.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                       help="downsample the majority class")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"],
                       help="classifier: where to train (default: auto, the GPU when one is visible; a verifier "
                            "head fits on the CPU)")
    train.add_argument("--label-margin", type=float, default=0.0,
                       help="relabel: class 1 when PRM(t) - PRM(d) > this (0: the paper's 1[advantage > 0])")
    train.add_argument("--l2", type=positive_float, help="verifier-head: L2 penalty of the head (default: 0.001)")
    train.add_argument("--ablation-steps", type=non_negative_int,
                       help="classifier: also train the 4 ablation variants for this many steps (in <out>/ckpt/ablation) "
                            "and record the table (default: 0, none)")
    train.set_defaults(func=_router_train)

    ev = router.add_parser("eval", help="Spearman of a router vs the oracle advantage on held-out steps")
    ev.add_argument("--data", required=True)
    ev.add_argument("--router", help="router checkpoint (default: the bundled router)")
    ev.add_argument("--json", action="store_true", help="accepted for compatibility; JSON is the only output")
    ev.set_defaults(func=_router_eval)


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="sweep policies and compare Arbitrage with RSD at matched accuracy")
    bench.add_argument("--n", type=positive_int, default=200, help="held-out problems")
    bench.add_argument("--seed", type=non_negative_int, default=2000)
    bench.add_argument("--out", default="runs/bench", help="directory for points.csv, PNG plots, bench.json")
    bench.add_argument("--models-dir", help="bundled checkpoints (default: $ARBITRAGE_HOME/models, else the installed bundle)")
    bench.add_argument("--mix", choices=sorted(MIXES), default="math",
                       help="synthetic problem mix: math (a hard final step in ~20%% of problems) or olympiad "
                            "(every problem has one)")
    bench.add_argument("--prm", type=existing_path, help="PRM checkpoint (default: <models-dir>/prm)")
    bench.add_argument("--router", type=existing_path, help="router checkpoint (default: <models-dir>/router)")
    bench.add_argument("--confirm-n", type=positive_int, default=None, help="problems in the wall-clock confirmation")
    bench.add_argument("--json", action="store_true", help="accepted for compatibility; JSON is the only output")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("--endpoint", help="HOST:PORT of a running service: sweep over gRPC instead of in-process "
                                          "(API key from $ARBITRAGE_API_KEY)")
    bench.add_argument("--app", help="Serve application name (gRPC metadata) when several apps run")
    bench.add_argument("--dataset", type=dataset_name,
                       help="sweep real math problems instead of the synthetic task: math500, olympiadbench, gsm8k "
                            "(graded with math-verify; --n and --seed then do not apply)")
    bench.add_argument("--data-file", type=existing_path,
                       help="with --dataset: a local JSONL file (or a folder holding <dataset>.jsonl); default: "
                            "$ARBITRAGE_DATA_DIR/<dataset>.jsonl, else the hub through `datasets`")
    bench.add_argument("--limit", type=positive_int, help="with --dataset: the first N problems")
    bench.set_defaults(func=_bench)


def dataset_name(text: str) -> str:
    """argparse type: a known benchmark (case, '-' and '_' ignored: MATH-500 is math500)."""
    from ..datasets import DATASETS

    key = text.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise argparse.ArgumentTypeError(f"unknown dataset {text!r} (choose from {', '.join(sorted(DATASETS))})")
    return key


def existing_path(text: str) -> str:
    """argparse type: a file or folder that exists (a typo fails before any model loads)."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


def _router_data(args) -> int:
    from tqdm import tqdm

    if args.endpoint:
        return _router_data_remote(args)
    for flag, value in (("--dataset", args.dataset), ("--data-file", args.data_file), ("--limit", args.limit),
                        ("--app", args.app)):
        if value is not None:
            raise ValueError(f"{flag}: only with --endpoint (the in-process collector runs the synthetic task)")

    from ..backends.hf_generator import HFStepGenerator
    from ..backends.scorers import load_step_scorer
    from ..training.router_data import collect_router_rows

    root = _models_dir(args)
    prm_dir = args.prm or f"{root}/prm"
    draft, target = HFStepGenerator(f"{root}/draft"), HFStepGenerator(f"{root}/target")
    prm = load_step_scorer(prm_dir)
    with tqdm(desc="router data", unit="row") as bar:
        rows = collect_router_rows(draft, target, prm, args.n, args.seed, label_margin=args.label_margin,
                                   progress=lambda total: bar.update(total - bar.n), mixes=args.mix)
    made = {"n": args.n, "seed": args.seed, "mix": list(args.mix), "label_margin": args.label_margin,
            "labelling_prm": prm_dir, "draft": f"{root}/draft", "target": f"{root}/target"}
    return _write_rows(rows, args.out, made, _data_command(args), mix=",".join(args.mix), prm=prm_dir)


def _router_data_remote(args) -> int:
    from tqdm import tqdm

    from ..training.remote_router_data import collect_remote_rows
    from ..training.router_data import router_problems

    if args.dataset:
        from ..evaluation.dataset_bench import load_problems

        problems = [p.problem for p in load_problems(args.dataset, args.data_file, args.limit)]
    else:
        for flag, value in (("--data-file", args.data_file), ("--limit", args.limit)):
            if value is not None:
                raise ValueError(f"{flag}: only with --dataset")
        problems = [p.prompt for p in router_problems(args.n, args.seed, args.mix)]
    with tqdm(desc="router data", unit="row") as bar:
        rows = collect_remote_rows(args.endpoint, problems, app=args.app, max_steps=args.max_steps,
                                   label_margin=args.label_margin, progress=lambda total: bar.update(total - bar.n))
    made = {"n": len(problems), "endpoint": args.endpoint, "app": args.app, "max_steps": args.max_steps,
            "label_margin": args.label_margin, "labelling_prm": "the service's PRM (policy oracle over --endpoint)"}
    made.update({"dataset": args.dataset, "data_file": args.data_file, "limit": args.limit} if args.dataset
                else {"seed": args.seed, "mix": list(args.mix)})
    return _write_rows(rows, args.out, made, _data_command(args), problems=len(problems), endpoint=args.endpoint)


def _models_dir(args) -> str:
    """--models-dir, else the bundled models (``paths.models_dir()``: $ARBITRAGE_HOME, then the
    checkout or the install), wherever the command runs from."""
    from ..paths import models_dir

    return args.models_dir or str(models_dir())


def _data_command(args) -> str:
    """The `router data` command line that makes this dataset again (the flags given, in order)."""
    import shlex

    argv = ["arbitrage", "router", "data"]
    if not args.dataset:  # a benchmark file's problems: --n, --seed and --mix do not apply
        argv += ["--n", str(args.n), "--seed", str(args.seed), "--mix", ",".join(args.mix)]
    argv += ["--label-margin", str(args.label_margin)]
    for flag, value in (("--models-dir", args.models_dir), ("--prm", args.prm), ("--endpoint", args.endpoint),
                        ("--app", args.app), ("--dataset", args.dataset), ("--data-file", args.data_file),
                        ("--limit", args.limit)):
        if value is not None:
            argv += [flag, str(value)]
    if args.endpoint:
        argv += ["--max-steps", str(args.max_steps)]
    return shlex.join([*argv, "--out", args.out])


def _write_rows(rows: list[dict], out: str, made: dict, command: str, **extra) -> int:
    """The rows, then their sidecar (``<out minus .jsonl>.meta.json``: how they were made)."""
    from ..training.router_data import write_data_meta, write_jsonl

    write_jsonl(rows, out)
    pos = sum(r["label"] for r in rows)
    side = write_data_meta(out, {"command": command, **made, "rows": len(rows), "positive": pos})
    summary = {"rows": len(rows), "positive": pos, "negative": len(rows) - pos, **extra, "out": out,
               "meta": str(side)}
    if rows and all(r.get("prm_draft") is not None for r in rows):
        from ..evaluation.analyze import analyze

        report = analyze(rows)  # RSD waste and the oracle bound of every dataset (`arbitrage analyze` has more)
        summary["payoff"] = {"headline": report["headline"], "reading": report["reading"]}
    emit_json(summary)
    return 0


# Flags of one --kind only, and the default each takes there.
CLASSIFIER_ONLY = {"--steps": ("steps", 400), "--lr": ("lr", 3e-4), "--device": ("device", "auto"),
                   "--ablation-steps": ("ablation_steps", 0), "--annotate": ("annotate", True)}
VERIFIER_HEAD_ONLY = {"--l2": ("l2", 1e-3)}


def _kind_flags(args) -> None:
    """Refuse a flag the chosen --kind does not use (ValueError naming it); fill in the defaults
    of those it does. --no-annotate is what a verifier head does anyway, so it passes."""
    given, other = (CLASSIFIER_ONLY, VERIFIER_HEAD_ONLY) if args.kind == "classifier" else \
        (VERIFIER_HEAD_ONLY, CLASSIFIER_ONLY)
    for flag, (name, _) in other.items():
        value = getattr(args, name)
        if value is not None and not (flag == "--annotate" and value is False):
            shown = "--no-annotate" if value is False else flag
            raise ValueError(f"{shown}: does not apply to --kind {args.kind} (only to --kind "
                             f"{'verifier-head' if args.kind == 'classifier' else 'classifier'})")
    for name, default in given.values():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _router_train(args) -> int:
    _kind_flags(args)
    init = args.init or str(_bundled("prm"))
    if args.kind == "verifier-head":
        from ..training.verifier_router import train_verifier_router

        out = train_verifier_router(args.data, init, args.out, seed=args.seed, balance=args.balance, l2=args.l2,
                                    threads=args.threads, label_margin=args.label_margin)
        emit_json({"saved": str(out)})
        return 0
    from ..training.router import run_ablation, train_router

    table = None
    if args.ablation_steps:  # under this run's ckpt/: its own resume states, removed with it
        table = run_ablation(args.data, init, str(Path(args.out) / "ckpt" / "ablation"), args.ablation_steps,
                             args.seed, args.lr, args.threads, args.device, args.label_margin)
    out = train_router(args.data, init, args.out, annotate=args.annotate, balance=args.balance, steps=args.steps,
                       seed=args.seed, lr=args.lr, threads=args.threads, ablation=table, device=args.device,
                       label_margin=args.label_margin)
    emit_json({"saved": str(out), "ablation": table})
    return 0


def _bundled(name: str) -> Path:
    from ..paths import models_dir

    return models_dir() / name


def _router_eval(args) -> int:
    from ..backends.scorers import load_step_scorer
    from ..evaluation.payoff import spearman_note
    from ..training.router import held_out_spearman, split_by_problem
    from ..training.router_data import error_structure, read_jsonl

    router = args.router or str(_bundled("router"))
    scorer = load_step_scorer(router)  # any router kind, with the annotations it was trained with
    _, held = split_by_problem(read_jsonl(args.data))
    # Ranks the router's logits, as every router card does (the probabilities tie where the sigmoid saturates).
    rho = round(held_out_spearman(scorer, held), 4)
    emit_json({"router": router, "held_out_steps": len(held), "annotate_history": scorer.annotate_history,
               **spearman_note(rho), "ranks": "router logits",
               "error_structure": error_structure(held)})
    return 0


def _bench(args) -> int:
    from ..evaluation.stack import check_out_dir

    if args.dataset:
        if args.mix != "math":
            raise ValueError("--mix: the synthetic task's mixes do not apply to --dataset")
        check_out_dir(args.out)  # before any work: a file, or a directory of the user's, is refused
        return _dataset_bench(args)
    for flag, value in (("--data-file", args.data_file), ("--limit", args.limit)):
        if value is not None:
            raise ValueError(f"{flag}: only with --dataset")
    if args.endpoint:  # the synthetic sweep over gRPC prints its result and writes no --out
        from ..evaluation.remote import run_remote_bench

        for flag, value in (("--prm", args.prm), ("--router", args.router)):
            if value is not None:
                raise ValueError(f"{flag}: not with --endpoint (the service's own PRM and router apply)")
        emit_json(run_remote_bench(args.endpoint, args.n, args.seed, app=args.app, show_progress=not args.no_progress,
                                   mix=args.mix))
        return 0
    from ..evaluation.bench import run_bench

    check_out_dir(args.out)
    emit_json(run_bench(args.n, args.seed, args.out, _models_dir(args), confirm_n=args.confirm_n,
                        show_progress=not args.no_progress, mix=args.mix, prm=args.prm, router=args.router))
    return 0


def _dataset_bench(args) -> int:
    from ..evaluation import dataset_bench as db

    problems = db.load_problems(args.dataset, args.data_file, args.limit)
    source = db.describe_source(args.dataset, args.data_file)
    if args.endpoint:
        emit_json(db.run_remote_dataset_bench(args.endpoint, problems, args.out, dataset=args.dataset, source=source,
                                              app=args.app, show_progress=not args.no_progress))
        return 0
    from ..evaluation.bench import load_backends

    backends = load_backends(_models_dir(args), prm=args.prm, router=args.router)
    emit_json(db.run_dataset_bench(problems, args.out, backends, dataset=args.dataset,
                                   source=source, confirm_n=args.confirm_n, show_progress=not args.no_progress))
    return 0
