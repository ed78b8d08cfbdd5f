"""Shared fixtures: a tiny random Kontext model directory, built once per test session."""

from __future__ import annotations

import pytest

from incontext.testing import tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))
