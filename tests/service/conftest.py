"""tests/service: helpers (loopback servers, fake DAPI, fake engine) live in service_support.py beside this file."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

pytest.importorskip("fastapi", reason="needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="needs the 'serve' extra")
pytest.importorskip("httpx", reason="needs the 'serve' extra")
