import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA's LLVM back end at -O0 compiles the tests' tiny programs in about half the time, and
# compiling is most of the slowest tests' time. Results differ from -O2 by float rounding only
# (logits by < 1e-6 on the test models; counts were the same).
XLA_O0 = "--xla_backend_optimization_level=0"
# Flags every child process with simulated devices starts from: on 2 busy cores, 8 device
# threads can take longer than XLA's default 40 s to meet at a collective (it then aborts).
os.environ.setdefault("SPARCOM_TEST_XLA_FLAGS", f"--xla_cpu_collective_call_terminate_timeout_seconds=600 {XLA_O0}")
# This process and the subprocesses that inherit its environment (read when jax starts a backend).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_O0}".strip()
# Compiled programs of the test models go to a cache of the checkout's own (shared by the
# workers and kept between runs), not into the user's ~/.cache.
os.environ.setdefault("SPARCOM_JAX_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
# Likewise the digests of the test checkpoints' weights files.
os.environ.setdefault("SPARCOM_JAX_DIGEST_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "digests"))

from hf_fixtures import write_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _free_compiled_programs_near_the_map_cap():
    """A worker runs hundreds of tests' programs, and XLA keeps each compiled program's machine
    code in memory mappings of its own while jitted functions cache it: at Linux's cap
    (vm.max_map_count, 65530) the worker died with a segmentation fault inside XLA (seen in
    tests/test_precision.py after five other files). Past a third of the cap the cached programs
    are freed (they load again from the compilation cache)."""
    yield
    if "jax" in sys.modules:
        from sparcom_jax import runtime

        maps = runtime.memory_maps()
        if maps is not None and maps[0] > maps[1] / 3:
            runtime.release_compiled_programs()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: hf_checkpoint(variant, fused=False) -> directory, cached for the session."""
    cache = {}

    def get(name: str, fused: bool = False):
        key = (name, fused)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"hf_{name}{'_fused' if fused else ''}")
            cache[key] = write_checkpoint(name, d, fused=fused)
        return cache[key]

    return get
