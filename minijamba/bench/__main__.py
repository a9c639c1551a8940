"""python -m minijamba.bench {scan,decode,step,sass,accuracy} [options]: run one benchmark, print its table (scan and
decode also write a figure; step times train.py's models and breaks a step down; sass counts the CUDA kernels'
instructions, no GPU needed; accuracy measures the scans' float32 error against float64)."""

import argparse

from . import accuracy, decode, sass, scan, step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minijamba.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    scan.add_arguments(commands.add_parser("scan", help="selective-scan implementations: time and memory vs L"))
    decode.add_arguments(commands.add_parser("decode", help="per-token decode latency and cache bytes vs context"))
    step.add_arguments(commands.add_parser("step", help="training steps of train.py's models: ms/step and breakdown"))
    sass.add_arguments(commands.add_parser("sass", help="SASS instructions per (step, state) of the CUDA kernels"))
    accuracy.add_arguments(commands.add_parser("accuracy", help="float32 error of every scan vs float64, vs L"))
    args = parser.parse_args(argv)
    commands = {"scan": scan.run, "decode": decode.run, "step": step.run, "sass": sass.run, "accuracy": accuracy.run}
    return commands[args.command](args)


if __name__ == "__main__":
    main()
