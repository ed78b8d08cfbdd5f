"""Shared fixtures: a tiny random Kontext model directory, built once per test session."""

from __future__ import annotations

import pytest

from incontext.testing import tiny_model_dir


def pytest_collection_modifyitems(items):
    # Compiling the tiny model ahead of time is the suite's slowest step, and mostly one busy
    # core: it starts with the first test and builds while the others run (tests/engine/
    # test_compiled.py's `background_build`). The checks of the finished build come after them,
    # then the tests that load the package from the shared `tiny_compile_dir` (the speed
    # bench's, warmup's); in any other order each of them still builds what it needs.
    def rank(item) -> int:
        if "engine/test_compiled.py::test_the_engine_serves_eagerly_while_it_builds" in item.nodeid:
            return 0
        if "engine/test_compiled.py::test_the_finished_build" in item.nodeid:
            return 2
        return 3 if "tiny_compile_dir" in item.fixturenames else 1

    items.sort(key=rank)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


def _tiny_registry(tiny_model):
    from incontext.models.registry import Registry, preset_for_directory

    reg = Registry(default_id="tiny")
    reg.add(preset_for_directory(tiny_model, id="tiny"))
    return reg


@pytest.fixture()
def registry(tiny_model):
    """A registry whose default model is the tiny one."""
    return _tiny_registry(tiny_model)


@pytest.fixture(scope="session")
def session_registry(tiny_model):
    """The same, for session-scoped fixtures (an engine kept across tests)."""
    return _tiny_registry(tiny_model)


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
