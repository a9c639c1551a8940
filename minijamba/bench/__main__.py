"""python -m minijamba.bench {scan,decode} [options]: run one benchmark, print its table, write its figure."""

import argparse

from . import decode, scan


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minijamba.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    scan.add_arguments(commands.add_parser("scan", help="selective-scan implementations: time and memory vs L"))
    decode.add_arguments(commands.add_parser("decode", help="per-token decode latency and cache bytes vs context"))
    args = parser.parse_args(argv)
    {"scan": scan.run, "decode": decode.run}[args.command](args)


if __name__ == "__main__":
    main()
