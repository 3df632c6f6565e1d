"""Entry point of one rank: ``python -m vilscale.orchestration.launch.rank SPEC.yaml``.

The local launcher (torchrun's elastic agent) starts it once per rank with the torch variables set.
It turns how the rank ended into an exit code (`exit_codes`): one line for the errors it knows, a
traceback only for the unexpected.
"""

from __future__ import annotations

import os
import sys

from vilscale.orchestration.launch.exit_codes import EXIT_OK, classify


def main(argv: list[str]) -> int:
    from vilscale.orchestration.config import load_spec
    from vilscale.orchestration.training.loop import run_worker

    rank = os.environ.get("RANK", "?")
    try:
        run_worker(load_spec(argv[0]))
    except Exception as error:  # noqa: BLE001 - every rank ends with a classified exit code
        code, line = classify(error)
        if not line:
            raise  # unexpected: the traceback is the useful message
        print(f"vilscale: rank {rank}: {line}", file=sys.stderr, flush=True)
        return code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
