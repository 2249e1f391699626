"""yaml2json: YAML in, JSON out, like a native command-line tool.

Reads YAML from the files named on the command line, or from stdin, and prints each
document as indented JSON (or one line per document with --compact). --keys lists the
top-level keys of each mapping instead. Dates and other values JSON has no type for are
printed as strings. Exit status: 0 on success, 1 on a YAML or I/O error, 2 on bad usage.
"""

import argparse
import json
import sys

import yaml

# The C parser from libyaml when present (Debian's python3-yaml has it): several times faster.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def documents(stream, name):
    try:
        yield from yaml.load_all(stream, Loader=Loader)
    except yaml.YAMLError as e:
        raise SystemExit(f"yaml2json: {name}: {e}".replace("\n", " ")) from None


def make_parser():
    parser = argparse.ArgumentParser(
        prog="yaml2json", description="Convert YAML documents to JSON."
    )
    parser.add_argument("files", nargs="*", metavar="FILE", help="YAML files (default: stdin)")
    parser.add_argument("-c", "--compact", action="store_true", help="one line per document")
    parser.add_argument("-k", "--keys", action="store_true", help="list top-level keys only")
    parser.add_argument("-s", "--sort-keys", action="store_true", help="sort mapping keys")
    return parser


def main(argv=None, parser=None):
    args = (parser or make_parser()).parse_args(argv)

    indent = None if args.compact else 2
    separators = (",", ":") if args.compact else None
    sources = args.files or ["-"]
    for name in sources:
        try:
            stream = sys.stdin if name == "-" else open(name, encoding="utf-8")
        except OSError as e:
            raise SystemExit(f"yaml2json: {name}: {e.strerror}") from None
        with stream:
            for doc in documents(stream, "<stdin>" if name == "-" else name):
                if args.keys:
                    if isinstance(doc, dict):
                        for key in doc:
                            print(key)
                    continue
                json.dump(
                    doc,
                    sys.stdout,
                    indent=indent,
                    separators=separators,
                    sort_keys=args.sort_keys,
                    ensure_ascii=False,
                    default=str,
                )
                sys.stdout.write("\n")


def cli(parser=None):
    try:
        main(parser=parser)
    except BrokenPipeError:
        # `yaml2json big.yaml | head` is not an error.
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    # Warm start (Smolfile `warm = "invoke"`, docs/WARM.md): the machine was snapshotted
    # here, with the interpreter, json, argparse and PyYAML already imported; each run of
    # ./yaml2json resumes at this call with its own arguments, stdin, stdout and stderr,
    # and ends as soon as its status is known, without waiting for the interpreter to be
    # torn down. Started any other way, wait() returns at once and run() is sys.exit.
    try:
        import smolvm_invoke
    except ImportError:
        sys.exit(cli())
    # Start-up work belongs before the wait: making the parser loads gettext's locale
    # module, which a run would otherwise read from the disk.
    parser = make_parser()
    smolvm_invoke.wait()
    smolvm_invoke.run(cli, parser)
