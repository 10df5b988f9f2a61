"""Run one of the repository's scripts with HMR2.0's ViT at the toy width of the test checkpoints
(test_real_model.TOY_VIT instead of posevit.VIT_H), as `python tests/toy_width.py SCRIPT ARGS...` or
under torchrun; everything else is the script's own code path. Not a test itself
(test_rehearsal.py runs train_sft.py --preset llava-1.5-7b through it)."""
import os
import runpy
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]

import posevit  # noqa: E402
from test_real_model import TOY_VIT  # noqa: E402

posevit.VIT_H = TOY_VIT
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
