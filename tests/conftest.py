import os
import zlib

# The Triton kernels run on the CPU through the interpreter; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ["TRITON_INTERPRET"] != "1":
    raise RuntimeError("tests run the Triton kernels on the CPU: set TRITON_INTERPRET=1 (or leave it unset)")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Fresh random inputs every run; the seed is printed in the header so a failure can be replayed
# with DUALLORA_TEST_SEED=<seed>.
BASE_SEED = int(os.environ.get("DUALLORA_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"duallora test seed: DUALLORA_TEST_SEED={BASE_SEED}"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the run's seed and the test's id."""
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**63)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
