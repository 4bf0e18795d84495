"""The console's styles file, `--lora-dir`, and `promptcast ui`'s argument checks: everything refused with one
`error:` line naming the file, the entry and the fix, before any model loads (no browser, no Gradio needed)."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import free_port, run_cli
from denoiser_client.lora import LoraRef
from denoiser_client.ui.styles import BASE, Style, StylesError, load_styles
from promptcast.cli import main

DEAD = f"127.0.0.1:{free_port()}"  # nothing listens: a check that reached the server would fail on its message


@pytest.fixture
def lora_folder(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("ink", "film"):
        (folder / f"{name}.safetensors").write_bytes(b"checked against the transformer only once it loads")
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


def write_styles(folder, styles) -> str:
    path = folder / "styles.json"
    path.write_text(json.dumps({"styles": styles}))
    return str(path)


def test_styles_file_and_lora_dir_give_base_first_then_file_then_folder(lora_folder):
    styles_file = write_styles(lora_folder, [
        {"name": "ink", "loras": [{"path": "ink.safetensors", "weight": 0.8}], "prompt": "{prompt}, ink wash",
         "negative_prompt": "blurry"},
        {"name": "mix", "loras": [{"path": "ink.safetensors", "weight": 0.5}, {"path": "film.safetensors"}]},
        {"name": "poster", "prompt": "a poster of {prompt}"},
    ])
    styles = load_styles(styles_file, lora_folder)
    assert [s.name for s in styles] == [BASE, "ink", "mix", "poster", "film"]  # the file's "ink" wins
    ink, mix = styles[1], styles[2]
    assert ink.loras == (LoraRef(str(lora_folder / "ink.safetensors"), 0.8),)  # relative to the styles file
    assert mix.loras[1] == LoraRef(str(lora_folder / "film.safetensors"), 1.0)  # weight defaults to 1.0
    assert styles[4].loras == (LoraRef(str(lora_folder / "film.safetensors"), 1.0),)
    assert styles[0] == Style(BASE) and load_styles() == [Style(BASE)]
    assert ink.prompt_for("a {curly} fox") == "a {curly} fox, ink wash"  # braces in the prompt stay
    assert ink.negative_for("text") == "text, blurry" and ink.negative_for(None) == "blurry"
    assert Style(BASE).prompt_for("a fox") == "a fox" and Style(BASE).negative_for("") is None


@pytest.mark.parametrize("styles, expected", [
    ([{"loras": []}], '"name" must be a non-empty string'),
    ([{"name": "base"}], "'base' is always the model without LoRAs"),
    ([{"name": "a"}, {"name": "a"}], "'a' is used twice"),
    ([{"name": "a", "colour": "red"}], "unknown field 'colour'"),
    ([{"name": "a", "loras": [{"path": "missing.safetensors"}]}], "'missing.safetensors' does not exist"),
    ([{"name": "a", "loras": [{"path": "notes.txt"}]}], "is not a .safetensors file"),
    ([{"name": "a", "loras": [{"path": "ink.safetensors", "weight": "strong"}]}], '"weight" \'strong\' must be'),
    ([{"name": "a", "loras": [{"path": "ink.safetensors"}, {"path": "./ink.safetensors"}]}], "listed twice"),
    ([{"name": "a", "loras": "ink.safetensors"}], '"loras" must be a list'),
    ([{"name": "a", "prompt": "ink wash"}], '"prompt" must be a template holding {prompt}'),
    (["ink"], "styles[0] must be an object"),
])
def test_a_bad_style_names_the_entry_and_the_fix(lora_folder, styles, expected):
    with pytest.raises(StylesError, match="styles.json") as error:
        load_styles(write_styles(lora_folder, styles))
    assert expected in str(error.value)


@pytest.mark.parametrize("text, expected", [
    ("{not json", "is not valid JSON"),
    ('["ink"]', 'must hold a JSON object {"styles": [...]}'),
    ('{"style": []}', 'must hold a JSON object {"styles": [...]}'),
])
def test_a_bad_styles_file_says_what_it_must_hold(tmp_path, text, expected):
    path = tmp_path / "styles.json"
    path.write_text(text)
    with pytest.raises(StylesError) as error:
        load_styles(path)
    assert expected in str(error.value)


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    return exit_.value.code, capsys.readouterr().err


def assert_one_error_line(code, err, *expected):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], (text, lines[0])


def test_ui_refuses_bad_arguments_before_loading(capsys, tmp_path, tiny_flux1, lora_folder):
    base = ["ui", "--encoder", DEAD, "--model", tiny_flux1, "--device", "cpu"]
    bad_styles = write_styles(lora_folder, [{"name": "ink", "loras": [{"path": "gone.safetensors"}]}])
    for args, expected in [
        (["--styles", bad_styles], ("styles[0] ('ink'): loras[0]: path 'gone.safetensors' does not exist",)),
        (["--styles", tmp_path / "none.json"], ("--styles", "does not exist")),
        (["--lora-dir", lora_folder / "ink.safetensors"], ("--lora-dir", "is not a folder")),
        (["--port", "70000"], ("--port 70000 must be from 0 to 65535",)),
        (["--host", "no-such-host.invalid"], ("--host 'no-such-host.invalid'",)),
        (["--out-dir", lora_folder / "notes.txt"], ("--out-dir", "is a file")),
        (["--vram", "huge"], ("--vram 'huge' is not a memory plan",)),
        (["--timeout", "0"], ("--timeout 0",)),
    ]:
        assert_one_error_line(*cli(capsys, *base, *args), *expected)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_error_line(*cli(capsys, *base, "--port", port), f"--port {port} cannot be used on 127.0.0.1")


def test_ui_without_gradio_says_how_to_install_it(capsys, monkeypatch, tiny_flux1):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert_one_error_line(*cli(capsys, "ui", "--encoder", DEAD, "--model", tiny_flux1),
                          "promptcast ui needs Gradio", "pip install 'promptcast[ui]'")


def test_ui_bad_styles_in_a_real_subprocess_is_one_line(tmp_path, tiny_flux1):
    (tmp_path / "styles.json").write_text('{"styles": [{"name": "ink", "prompt": "no slot"}]}')
    done = run_cli("ui", "--encoder", DEAD, "--model", tiny_flux1, "--styles", tmp_path / "styles.json", timeout=60)
    assert done.returncode == 2 and done.stderr.count("error: ") == 1 and "Traceback" not in done.stderr
    assert "must be a template holding {prompt}" in done.stderr and done.stdout == ""
