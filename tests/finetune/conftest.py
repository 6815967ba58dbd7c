"""The pipeline tests' tiny model fixtures (`lm`, `lm_calib`), shared with the fine-tune tests."""
from tests.pipeline.conftest import lm, lm_calib  # noqa: F401  pylint: disable=unused-import
