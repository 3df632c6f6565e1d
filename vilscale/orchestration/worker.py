"""Entry point of one rank started by `vilscale train --nproc N` (env vars describe the group)."""

from __future__ import annotations

import os
import sys

from vilscale.data.manifest import DataError
from vilscale.orchestration.checkpoint import CheckpointError
from vilscale.orchestration.cli_train import EXIT_DATA_ERROR, EXIT_NONFINITE, EXIT_SPEC_ERROR
from vilscale.orchestration.spec import SpecError, load_spec
from vilscale.orchestration.trainer import NonFiniteLossError, run_worker

# What gloo/nccl collectives raise on the survivors when a peer process dies.
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
                      "Broken pipe")


def main(argv: list[str]) -> int:
    spec = load_spec(argv[0])
    try:
        run_worker(spec)
    except SpecError as error:
        print(f"vilscale: invalid job spec: {error}", file=sys.stderr)
        return EXIT_SPEC_ERROR
    except DataError as error:
        print(f"vilscale: data error: {error}", file=sys.stderr, flush=True)
        return EXIT_DATA_ERROR
    except CheckpointError as error:
        print(f"vilscale: rank failed: {error}", file=sys.stderr, flush=True)
        return 1
    except NonFiniteLossError as error:
        print(f"vilscale: {error}", file=sys.stderr)
        return EXIT_NONFINITE
    except RuntimeError as error:
        if not any(sign in str(error) for sign in PEER_FAILURE_SIGNS):
            raise
        # Another rank died (its own message says why); a traceback per survivor would only bury it.
        print(f"vilscale: rank {os.environ.get('RANK', '?')} stopped because another rank failed "
              f"({str(error).splitlines()[0][:160]})", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
