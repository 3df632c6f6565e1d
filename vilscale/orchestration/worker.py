"""Entry point of one rank started by `vilscale train --nproc N` (env vars describe the group)."""

from __future__ import annotations

import sys

from vilscale.orchestration.checkpoint import CheckpointError
from vilscale.orchestration.spec import SpecError, load_spec
from vilscale.orchestration.trainer import NonFiniteLossError, run_worker

EXIT_SPEC_ERROR = 2
EXIT_NONFINITE = 3


def main(argv: list[str]) -> int:
    spec = load_spec(argv[0])
    try:
        run_worker(spec)
    except SpecError as error:
        print(f"vilscale: invalid job spec: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    except CheckpointError as error:
        print(f"vilscale: rank failed: {error}", file=sys.stderr, flush=True)
        return 1
    except NonFiniteLossError as error:
        print(f"vilscale: {error}", file=sys.stderr)
        return EXIT_NONFINITE
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
