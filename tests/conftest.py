"""Session fixtures shared by the test files.

`hf_fixtures` is imported first on purpose: it makes torchvision importable (when a CPU-compatible copy is
available) before transformers is imported anywhere, because transformers checks for torchvision only once.
Tests marked `needs_torchvision` skip when it is missing, except under `CI=true`, where they fail.

Fixtures (all session-scoped, each directory built once per test session):
  tiny_hf_dir_factory(variant="a", layout="v5", enable_audio_output=True) -> str: a tiny random HF checkpoint
      directory (see hf_fixtures.build_tiny_hf_dir); variants "a" (omni_jax.config.tiny), "b" (other shapes) and
      "c" ("a" with the talker reading the thinker's last layer).
  tiny_hf_dir: variant "a", v5 layout, with audio output.
  tiny_hf_dir_b: variant "b", v5 layout, with audio output.
  tiny_hf_dir_legacy: variant "a", legacy processor layout (preprocessor_config.json + chat_template.json).
  tiny_tokenizer_dir_factory(layout="v5") -> str: only the tiny tokenizer + processor settings (no weights; fast).
"""


import os

# libtpu is installed (the tpu extra) for compiling to TPU topologies; nothing here has a TPU, so JAX must not try
# to open one (each process, subprocesses included, would otherwise probe for it and contend for its lock file).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import hf_fixtures  # noqa: E402, F401  (must precede any transformers import)
import pytest  # noqa: E402


def pytest_runtest_setup(item):
    """`@needs_torchvision` tests: skipped without torchvision locally, failed under CI=true (CI installs it)."""
    if item.get_closest_marker("needs_torchvision") and not hf_fixtures.TORCHVISION_AVAILABLE:
        if hf_fixtures.IN_CI:
            pytest.fail(f"{hf_fixtures.TORCHVISION_MISSING} (CI=true: a missing torchvision fails)", pytrace=False)
        pytest.skip(hf_fixtures.TORCHVISION_MISSING)


@pytest.fixture(scope="session")
def tiny_hf_dir_factory(tmp_path_factory):
    cache: dict[tuple, str] = {}

    def get(variant: str = "a", layout: str = "v5", enable_audio_output: bool = True) -> str:
        key = (variant, layout, bool(enable_audio_output))
        if key not in cache:
            name = f"tiny_hf_{variant}_{layout}_{'speech' if enable_audio_output else 'text'}"
            out = str(tmp_path_factory.mktemp(name))
            twin = next((d for (v, lay, a), d in cache.items() if (v, a) == key[::2] and lay != layout), None)
            if twin is not None:  # same weights, other processor layout: copy instead of rebuilding
                hf_fixtures.relayout(twin, out, layout)
                hf_fixtures.verify_hf_dir(out)
            else:
                hf_fixtures.build_tiny_hf_dir(out, variant=variant, layout=layout,
                                              enable_audio_output=enable_audio_output)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_hf_dir_factory):
    return tiny_hf_dir_factory("a", "v5", True)


@pytest.fixture(scope="session")
def tiny_hf_dir_b(tiny_hf_dir_factory):
    return tiny_hf_dir_factory("b", "v5", True)


@pytest.fixture(scope="session")
def tiny_hf_dir_legacy(tiny_hf_dir_factory):
    return tiny_hf_dir_factory("a", "legacy", True)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir_factory(tmp_path_factory):
    from omni_jax.processing.tiny_tokenizer import write_processor_config, write_tiny_tokenizer

    cache: dict[str, str] = {}

    def get(layout: str = "v5") -> str:
        if layout not in cache:
            out = str(tmp_path_factory.mktemp(f"tiny_tokenizer_{layout}"))
            write_tiny_tokenizer(out)
            write_processor_config(out, layout)
            cache[layout] = out
        return cache[layout]

    return get
