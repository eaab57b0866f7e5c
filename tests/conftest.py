import os
import zlib

# Two modes, chosen before triton is imported:
# * the default: the Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1),
#   on CPU tensors; what CI runs.
# * DUALLORA_TEST_DEVICE=cuda: the kernel tests (KERNEL_TEST_FILES) run the kernels compiled, on
#   CUDA tensors (TRITON_INTERPRET unset or 0); every other test is skipped. bench/run_gpu_tests.sh
#   runs it. The kernel tests build their inputs on helpers.TEST_DEVICE.
TEST_DEVICE_ENV = "DUALLORA_TEST_DEVICE"
_MODE = os.environ.get(TEST_DEVICE_ENV) or "cpu"
if _MODE not in ("cpu", "cuda"):
    raise RuntimeError(f"{TEST_DEVICE_ENV}={_MODE!r}: use cpu (the default, the Triton interpreter) or cuda (compiled)")
if _MODE == "cuda":
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        raise RuntimeError(
            f"{TEST_DEVICE_ENV}=cuda runs the Triton kernels compiled: unset TRITON_INTERPRET or set it to 0 "
            f"(it is {os.environ['TRITON_INTERPRET']!r})"
        )
    os.environ["TRITON_INTERPRET"] = "0"
else:
    # The Triton kernels run on the CPU through the interpreter; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        raise RuntimeError(
            "tests run the Triton kernels on the CPU: set TRITON_INTERPRET=1 (or leave it unset), "
            f"or {TEST_DEVICE_ENV}=cuda to run the kernel tests compiled on a GPU"
        )

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import TEST_DEVICE  # noqa: E402

if _MODE == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{TEST_DEVICE_ENV}=cuda needs a CUDA device, and torch.cuda.is_available() is False here; "
            f"unset {TEST_DEVICE_ENV} to run the kernels in Triton's CPU interpreter"
        )
    # The float32 bounds of the kernel tests (1e-5) hold for IEEE tl.dot, which the kernels use
    # only while torch's float32 matmuls are "highest" (_kernel_utils.dot_mode); TF32 would
    # need about 5e-4. Pinned, so that nothing in the environment loosens it unnoticed.
    torch.set_float32_matmul_precision("highest")

# OMP_NUM_THREADS, when set, wins: two test runs sharing 2 cores at 2 threads each make torch's
# OpenMP threads wait on each other (~20x slower); at 1 thread each they do not.
_threads = os.environ.get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(_threads) if _threads.isdigit() and int(_threads) > 0 else max(1, min(2, os.cpu_count() or 1)))

#: What DUALLORA_TEST_DEVICE=cuda runs; the other files test torch code, data, the CLI, etc.
KERNEL_TEST_FILES = ("test_fused_linear.py", "test_gram.py", "test_task_scores.py", "test_stability.py",
                     "test_gpu_dropin.py")

# Fresh random inputs every run; the seed is printed in the header so a failure can be replayed
# with DUALLORA_TEST_SEED=<seed>.
BASE_SEED = int(os.environ.get("DUALLORA_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    if _MODE == "cuda":
        from duallora_kernels.ops import _kernel_utils

        autotune = "on" if _kernel_utils.autotuning() else f"off ({_kernel_utils.AUTOTUNE_ENV}=0: one fixed config)"
        mode = (f"duallora test device: {TEST_DEVICE} ({torch.cuda.get_device_name()}), Triton kernels compiled "
                f"(TRITON_INTERPRET=0), autotuning {autotune}, float32 matmul precision "
                f"{torch.get_float32_matmul_precision()}; only {', '.join(KERNEL_TEST_FILES)} run")
    else:
        mode = "duallora test device: cpu, Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)"
    return [f"duallora test seed: DUALLORA_TEST_SEED={BASE_SEED}", mode]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # -q (the README's command) hides the header: a failing run still names the seed that replays it
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"replay with DUALLORA_TEST_SEED={BASE_SEED}")


def pytest_collection_modifyitems(config, items):
    if _MODE != "cuda":
        return
    skip = pytest.mark.skip(reason=f"{TEST_DEVICE_ENV}=cuda runs only the kernel test files {KERNEL_TEST_FILES}")
    for item in items:
        if item.path.name not in KERNEL_TEST_FILES:
            item.add_marker(skip)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the run's seed and the test's id."""
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**63)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
