"""`arbitrage models ...` and `arbitrage train ...`."""
from __future__ import annotations

from ..synthetic.problems import MIXES
from .argtypes import mix_list, non_negative_int, positive_float, positive_int
from .output import emit_json


def add_models_parser(sub) -> None:
    models = sub.add_parser("models", help="bundled model checks").add_subparsers(dest="models_cmd", required=True)
    ev = models.add_parser("eval", help="quality and cost of the bundled draft, target and PRM")
    ev.add_argument("--n", type=positive_int, default=200, help="problems to evaluate")
    ev.add_argument("--seed", type=non_negative_int, default=1000, help="eval problem seed (training streams are keyed by strings, yet a small problem can "
                         "recur in them: docs/TASK.md)")
    ev.add_argument("--mix", choices=sorted(MIXES), default="math", help="synthetic problem mix")
    ev.add_argument("--prm", help="PRM checkpoint (default: <models-dir>/prm)")
    ev.add_argument("--models-dir", help="bundled checkpoints (default: $ARBITRAGE_HOME/models, else the installed bundle)")
    ev.add_argument("--no-prm", action="store_true", help="skip the PRM AUROC")
    ev.add_argument("--json", action="store_true", help="accepted for compatibility; JSON is the only output")
    ev.add_argument("--out", help="also write the JSON here (only when the run succeeds)")
    ev.set_defaults(func=_models_eval)


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train bundled checkpoints").add_subparsers(dest="train_cmd", required=True)
    lm = train.add_parser("lm", help="train the draft, target or PRM-body LM (resumable)")
    lm.add_argument("--role", choices=["draft", "target", "prm"], required=True,
                    help="shape preset (prm: the independent PRM's body, before `train prm`)")
    lm.add_argument("--out", required=True, help="checkpoint directory; resumes from <out>/ckpt only with the same "
                                                 "--role, --seed, --lr, --steps and --batch-size")
    lm.add_argument("--steps", type=positive_int, required=True)
    lm.add_argument("--seed", type=non_negative_int, default=0)
    lm.add_argument("--lr", type=positive_float, default=2e-3)
    lm.add_argument("--batch-size", type=positive_int, default=32)
    lm.add_argument("--threads", type=positive_int, default=1)
    lm.add_argument("--stop-after", type=positive_int, help="stop at this step of the --steps schedule")
    lm.add_argument("--export-every", type=positive_int, help="write HF snapshots every N steps (for choosing --stop-after)")
    lm.set_defaults(func=_train_lm)
    prm = train.add_parser("prm", help="train the PRM on checker labels of draft and target steps (resumable)")
    prm.add_argument("--out", required=True, help="checkpoint directory; resumes from <out>/ckpt (its labeled steps "
                                                  "too) only with the same arguments")
    prm.add_argument("--init", required=True, help="LM checkpoint to start from")
    prm.add_argument("--draft", required=True, help="draft LM that writes training steps")
    prm.add_argument("--target", required=True, help="target LM that writes training steps")
    prm.add_argument("--problems", type=positive_int, default=3000)
    prm.add_argument("--steps", type=positive_int, required=True)
    prm.add_argument("--seed", type=non_negative_int, default=0)
    prm.add_argument("--lr", type=positive_float, default=5e-4)
    prm.add_argument("--threads", type=positive_int, default=1)
    prm.add_argument("--mix", type=mix_list, default=("math",),
                     help="problem mix of the labeled steps: math, olympiad, or a comma list (problems alternate)")
    prm.set_defaults(func=_train_prm)
    ver = train.add_parser("verifier", help="make the LM-verifier PRM: a causal LM plus a logistic calibration of "
                                            "its min token log-prob on checker labels (the bundled PRM)")
    ver.add_argument("--out", required=True, help="checkpoint directory; reuses the labeled steps in <out>/ckpt "
                                                  "only for the same --draft, --target, --problems and --seed")
    ver.add_argument("--lm", required=True, help="causal LM checkpoint that verifies (copied into --out)")
    ver.add_argument("--draft", required=True, help="draft LM that writes labeled steps")
    ver.add_argument("--target", required=True, help="target LM that writes labeled steps")
    ver.add_argument("--problems", type=positive_int, default=3000)
    ver.add_argument("--seed", type=non_negative_int, default=0)
    ver.add_argument("--fit-rows", type=positive_int, default=8000, help="labeled rows the calibration is fitted on")
    ver.add_argument("--eval-rows", type=positive_int, default=3000, help="held-out rows for the AUROC in the card")
    ver.add_argument("--threads", type=positive_int, default=1)
    ver.set_defaults(func=_train_verifier)


def _models_eval(args) -> int:
    from ..evaluation.models_eval import evaluate_models
    from ..paths import models_dir

    root = args.models_dir or str(models_dir())  # wherever the command runs from ($ARBITRAGE_HOME first)
    emit_json(evaluate_models(args.n, args.seed, root, with_prm=not args.no_prm, mix=args.mix, prm=args.prm), args.out)
    return 0


def _train_lm(args) -> int:
    from ..training.lm import train_lm

    out = train_lm(args.role, args.out, steps=args.steps, seed=args.seed, lr=args.lr,
                   batch_size=args.batch_size, threads=args.threads, stop_after=args.stop_after,
                   export_every=args.export_every)
    print(f"saved {out}")
    return 0


def _train_prm(args) -> int:
    from ..training.prm import train_prm

    out = train_prm(args.out, init=args.init, draft=args.draft, target=args.target, n_problems=args.problems,
                    steps=args.steps, seed=args.seed, lr=args.lr, threads=args.threads, mixes=args.mix)
    print(f"saved {out}")
    return 0


def _train_verifier(args) -> int:
    from ..training.verifier import make_verifier

    out = make_verifier(args.out, lm=args.lm, draft=args.draft, target=args.target, n_problems=args.problems,
                        seed=args.seed, fit_rows=args.fit_rows, eval_rows=args.eval_rows, threads=args.threads)
    print(f"saved {out}")
    return 0
