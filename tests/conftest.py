import pytest

from grpo.testing import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An HF folder holding the tiny random model and its character tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
