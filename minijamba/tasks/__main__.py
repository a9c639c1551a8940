"""python -m minijamba.tasks {selective-copying, induction-heads, evaluate}: the Mamba paper's Tables 1 and 2.

    python -m minijamba.tasks selective-copying [--steps N] [--seeds 0 1 2] [--rows s6-plain ...]
    python -m minijamba.tasks induction-heads [--steps N] [--models mamba ...] [--max-log2-length 16]
    python -m minijamba.tasks evaluate MODEL_DIR [--lengths 17 18]

The first two train, print the table, write the JSONL log (lessons/logs/09_<experiment>.jsonl by default) and save
every model (lessons/models/09_<experiment>/ by default); `--out DIR` puts both under DIR instead, so a trial run
leaves the committed ones alone. `evaluate` tests a saved model at other lengths: induction heads for an LM
folder (config.json of MambaLM or JambaLM), selective copying for a TaskModel folder.
"""

import argparse
import sys
from pathlib import Path

import torch

from minijamba.checkpoint import CheckpointError, load_config
from minijamba.tasks import copying, induction
from minijamba.tasks.model import TaskModel
from minijamba.tasks.runs import LOGS, MODELS, format_table, say


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _seed(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a seed >= 0, got {text}")
    return value


def _paths(args, experiment):
    out = Path(args.out) if args.out else None
    log = (out or LOGS) / f"09_{experiment}.jsonl"
    models = None if args.no_save else (out / "models" if out else MODELS) / f"09_{experiment}"
    return log, models


def _report(title, table, log, models):
    print(f"\n{title}\n{table}\nlog: {log}" + (f"\nmodels: {models}/" if models else ""))


def selective_copying(args):
    overrides = {k: v for k, v in (("steps", args.steps), ("seq_len", args.seq_len)) if v is not None}
    config = copying.CopyingConfig(**overrides)
    log, models = _paths(args, "selective_copying")
    report = None if args.quiet else say
    results = copying.copying_experiment(config, args.rows, args.seeds, log, models, report, args.workers)
    title = (
        f"Selective copying, L {config.seq_len}, {config.n_data} data tokens, vocabulary {config.vocab}, "
        f"{config.steps} steps of batch {config.batch}: answer accuracy (%), chance {100 / (config.vocab - 2):.1f}"
    )
    _report(title, copying.table(results), log, models)


def induction_heads(args):
    overrides = {"test_lengths": tuple(2**k for k in range(6, args.max_log2_length + 1))}
    if args.steps is not None:
        overrides["steps"] = args.steps
    config = induction.InductionConfig(**overrides)
    log, models = _paths(args, "induction_heads")
    report = None if args.quiet else say
    results = induction.induction_experiment(config, args.models, args.seed, log, models, report, args.workers)
    title = (
        f"Induction heads trained at L {config.seq_len} ({config.steps} steps of batch {config.batch}): answer "
        f"accuracy (%) at each test length, chance {100 / (config.vocab - 1):.1f}"
    )
    _report(title, induction.table(results, config.seq_len), log, models)


def evaluate(args):
    from minijamba.models import load_pretrained

    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"MODEL_DIR must be a saved model's folder with a config.json: {folder} has none")
    if "block" in load_config(folder):  # a TaskModel of Table 1
        config = copying.CopyingConfig()
        model = TaskModel.from_pretrained(folder, scan_impl="auto")
        accuracy = copying.held_out_accuracy(model, config)
        print(f"{folder}: selective copying at L {config.seq_len}: answer accuracy {100 * accuracy:.1f}%")
        return
    model = load_pretrained(folder, scan_impl="auto")
    config = induction.InductionConfig(vocab=model.config.vocab_size)
    lengths = [2**k for k in args.lengths]
    results = induction.accuracy_at_lengths(
        model, lengths, config.vocab, lambda n: induction.n_test_sequences(config, n)
    )
    print(format_table(("length", "accuracy (%)"), [(n, f"{100 * a:.1f}") for n, a in results.items()]))


def parser():
    p = argparse.ArgumentParser(prog="python -m minijamba.tasks", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--steps", type=_positive, help="training steps per model (default: the config's)")
    common.add_argument("--out", help="write the log and models under this folder, not lessons/")
    common.add_argument("--no-save", action="store_true", help="do not save the trained models")
    common.add_argument("--quiet", action="store_true", help="print the table only")
    common.add_argument("--workers", type=_positive, default=2, help="runs side by side, one thread each (default 2)")
    sc = sub.add_parser("selective-copying", parents=[common], help="Table 1: 4 rows x seeds")
    sc.add_argument("--seeds", type=_seed, nargs="+", default=[0, 1, 2])
    sc.add_argument("--rows", nargs="+", choices=list(copying.ROWS), default=list(copying.ROWS))
    sc.add_argument("--seq-len", type=_positive, help="sequence length (default: the config's)")
    sc.set_defaults(run=selective_copying)
    ih = sub.add_parser("induction-heads", parents=[common], help="Table 2: train at L 256, test up to 2^16")
    ih.add_argument("--seed", type=_seed, default=0)
    ih.add_argument("--models", nargs="+", choices=list(induction.MODELS), default=list(induction.MODELS))
    ih.add_argument("--max-log2-length", type=_positive, default=16, help="test lengths 2^6 .. 2^this")
    ih.set_defaults(run=induction_heads)
    ev = sub.add_parser("evaluate", help="test a saved model (induction heads at --lengths, or selective copying)")
    ev.add_argument("model", help="a saved model's folder")
    ev.add_argument("--lengths", type=_positive, nargs="+", default=list(range(6, 17)), help="log2 of test lengths")
    ev.add_argument("--threads", type=_positive, help="torch threads (default: torch's)")
    ev.set_defaults(run=evaluate)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        args.run(args)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
