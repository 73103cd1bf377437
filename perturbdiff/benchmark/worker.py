"""Worker process of the runner: reads a JSON list of case specs on stdin, measures them in order
and prints the list of results as the last line of stdout."""

import json
import sys

from .runner import measure_case


def main() -> int:
    specs = json.loads(sys.stdin.read())
    print(json.dumps([measure_case(spec) for spec in specs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
