"""tests/service: helpers (loopback servers, fake DAPI, fake engine) live in service_support.py beside this file;
modules that need the 'serve' extra skip themselves without it (test_serve_cli.py runs without it)."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
