"""torchrun entry point of the training job.

    torchrun --standalone --nproc-per-node 4 scripts/train.py --dp 2 --domain 2 --steps 100 \\
        --checkpoint-dir ckpt --checkpoint-every 10 --resume

Same flags as ``credit-dtensor train`` (see ``--help`` and docs/train_at_scale.md).
"""

from __future__ import annotations

import sys

from credit_dtensor.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
