"""Script form of ``python -m dist_sparse_attn.train`` for launchers that take a file
(``deepspeed launch/train.py ...``, ``torchrun ... launch/train.py``, ``mpirun ... python
launch/train.py``). All options: ``python launch/train.py --help``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_sparse_attn.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
