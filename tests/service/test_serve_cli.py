"""``cpoc serve`` options: --help documents every option, bad options are one line + exit 2, and without the
'serve' extra the command names the extra to install (one line, exit 2). Needs no FastAPI."""
import argparse

import pytest

from cpoc_kernels.integrations.hf import serve


def serve_parser():
    parser = argparse.ArgumentParser(prog="cpoc")
    sub = parser.add_subparsers(dest="command")
    serve.register(sub)
    return sub.choices["serve"]


def test_help_documents_every_option(cli):
    code, _, _ = cli(["serve", "--help"])
    assert code == 0
    text = serve_parser().format_help()
    for action in serve_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.strip(), action.option_strings
            assert any(opt in text for opt in action.option_strings)
    for opt in ("--model", "--host", "--port", "--dtype", "--served-model-name", "--governor"):
        assert opt in text


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "0"], "port must be in 1..65535"),
    (["serve", "--port", "http"], "invalid port"),
    (["serve", "--dtype", "float16"], "invalid choice"),
    (["serve", "--governor", "max"], "invalid choice"),
    (["serve", "--max-batch-tokens", "0"], "must be positive"),
    (["serve", "--slo-overhead", "x"], "invalid float"),
    (["serve", "--no-such-option"], "unrecognized arguments"),
])
def test_bad_options_one_line_exit_2(cli, argv, message):
    code, out, err = cli(argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("cpoc: error: ") and message in err


def test_unknown_model_one_line_exit_2(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "missing_serve_deps", lambda: [])
    code, _, err = cli(["serve", "--model", str(tmp_path / "nowhere")])
    assert code == 2 and err.count("\n") == 1 and "neither a built-in model" in err


def test_without_the_extra_names_it(cli, monkeypatch):
    monkeypatch.setattr(serve, "missing_serve_deps", lambda: ["fastapi", "uvicorn"])
    code, out, err = cli(["serve"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "'serve' extra" in err and "fastapi, uvicorn" in err


def test_missing_deps_are_detected(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert serve.missing_serve_deps() == ["uvicorn"]


def test_local_hf_folder_loads_as_saved(tmp_path):
    pytest.importorskip("transformers")
    import torch

    model, names = serve.load_model("cpoc-tiny", "float32")
    assert names == ["cpoc-tiny"]
    folder = tmp_path / "my-model"
    model.save_pretrained(folder)
    loaded, names = serve.load_model(str(folder), "bfloat16")
    assert names == [str(folder), str(folder.resolve()), "my-model"]
    assert next(loaded.parameters()).dtype == torch.bfloat16
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(torch.equal(want[k], v) for k, v in loaded.state_dict().items())
