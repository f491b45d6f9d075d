"""`python -m moco_hf.pretraining ...` and `accelerate launch -m moco_hf.pretraining ...`: the pretraining command."""

import sys

from .command import main

sys.exit(main())
