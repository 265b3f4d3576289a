"""torchrun entry point of the training job.

    torchrun --standalone --nproc-per-node 4 scripts/train.py --dp 2 --domain 2 --steps 100 \\
        --checkpoint-dir ckpt --checkpoint-every 10 --resume

Same flags as ``credit-dtensor train`` (see ``--help``, docs/usage.md and docs/train_at_scale.md).
"""

from __future__ import annotations

import sys

from credit_dtensor.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """``credit-dtensor train`` with ``argv`` (default: this script's arguments)."""
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
