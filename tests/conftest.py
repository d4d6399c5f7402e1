import pytest


def pytest_collection_modifyitems(config, items):
    """GPU tests need CUDA; everything else runs on the CPU."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fig10_small(tmp_path_factory):
    """``autotune figure fig10`` at a small size (LLMStation and chunked, 4
    trials of 15 prompts each, in this process): the folder it wrote. Read
    it, or copy it before adding to it."""
    from tests.test_cli import invoke, ok

    out = tmp_path_factory.mktemp("fig10")
    result = ok(invoke("figure", "fig10", "--systems", "llmstation,chunked", "--trials", 4, "--num-prompts", 15,
                       "--out", out, "--workers", 1))
    return out, result.stdout
