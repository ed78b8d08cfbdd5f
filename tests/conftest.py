"""Shared fixtures: a tiny random Kontext model directory, built once per test session."""

from __future__ import annotations

import pytest

from incontext.testing import tiny_model_dir


def pytest_collection_modifyitems(items):
    # Compiling the tiny model ahead of time is the suite's slowest step. The compile test runs
    # first and builds into the shared `tiny_compile_dir`, which the speed bench's and warmup's
    # tests then load; in any other order each of them still builds what it needs.
    items.sort(key=lambda item: "engine/test_compiled.py" not in item.nodeid)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture()
def registry(tiny_model):
    """A registry whose default model is the tiny one."""
    from incontext.models.registry import Registry, preset_for_directory

    reg = Registry(default_id="tiny")
    reg.add(preset_for_directory(tiny_model, id="tiny"))
    return reg


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model gains nothing from threads; beside other work their spin-waiting costs seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_compile_dir(tmp_path_factory):
    """Where the tiny model's compiled transformer is kept, shared by the tests that need one."""
    return tmp_path_factory.mktemp("compiled")
