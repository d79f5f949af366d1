"""``python -m scheduling plan --jobs jobs.yaml -o schedule.json``."""

import sys

from .cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "plan":
        print("usage: python -m scheduling plan --jobs JOBS [-o SCHEDULE.json] [options]", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(args[1:]))
