"""Test setup shared by every test file.

- One torch thread: this project's CI machine has 2 cores, and thread contention there
  makes torch 20-100x slower.
- Every cache (the procedural body model, the benchmark, sentence-transformers) goes to a
  temporary directory, so tests never read or write a user's cache and start clean.
- The repository root is importable (`import body`, `import posebench`, ...).
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_CACHE = tempfile.mkdtemp(prefix="pose_rft_test_cache_")
os.environ["POSE_RFT_CACHE"] = _CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(_CACHE, "hf"))

import torch  # noqa: E402

torch.set_num_threads(1)
