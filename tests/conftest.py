import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# The tests run many tiny models: one intra-op thread avoids thread hand-off costs
# that dominate at this size on a 2-core machine.
torch.set_num_threads(1)
