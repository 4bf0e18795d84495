"""Every bad argument of every command: one `error:` line naming the argument, the value and the fix, a non-zero
exit, before any model loads or any server is asked. Swept per option, through the real `promptcast` entry point
(in-process for speed; the last tests run real subprocesses)."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import free_port, run_cli
from promptcast.cli import main

DEAD = f"127.0.0.1:{free_port()}"  # nothing listens: a check that waited for the server would fail on its message


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    return exit_.value.code, err


def assert_one_error_line(code: int, err: str, *expected: str) -> None:
    assert code not in (0, None), err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], (text, lines[0])


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_flux1):
    """Model folders whose model_index.json is a JSON list, truncated, or not UTF-8."""
    root = tmp_path_factory.mktemp("broken")
    good = (tiny_flux1 / "model_index.json").read_bytes()
    folders = {}
    for name, data in (("list", b'["FluxPipeline"]'), ("truncated", good[: len(good) // 2]),
                       ("latin1", b'{"_class_name": "Flux\xe9Pipeline"}')):
        folder = root / name
        folder.mkdir()
        (folder / "model_index.json").write_bytes(data)
        folders[name] = folder
    return folders


GENERATE_CASES = [
    (["--steps", "0"], "--steps 0"), (["--steps", "-3"], "--steps -3"), (["--steps", "5000"], "from 1 to 1000"),
    (["--width", "0"], "--width 0"), (["--width", "-16"], "--width -16"), (["--width", "30"], "multiple of 16"),
    (["--width", "8192"], "over 4096"), (["--height", "-32"], "--height -32"),
    (["--seed", "-1"], "--seed -1"), (["--seed", str(2**64)], "--seed 18446744073709551616"),
    (["--seed", "abc"], "--seed"), (["--guidance", "-1"], "--guidance -1"),
    (["--true-cfg-scale", "-2"], "--true-cfg-scale"), (["--max-sequence-length", "0"], "--max-sequence-length 0"),
    (["--out", "{tmp}/x.txt"], "'.txt' is not an image format"), (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/file.png/x.png"], "is a file, not a folder"),
    (["--device", "cuda"], "--device cuda"), (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--dtype", "fp64"], "--dtype 'fp64'"), (["--vram", "huge"], "--vram 'huge' is not a memory plan"),
    (["--vram-budget", "0"], "--vram-budget 0"), (["--vram-budget", "8"], "--vram-budget plans GPU memory"), (["--quantize", "fp4"], "--quantize 'fp4'"),
    (["--offload", "disk"], "--offload 'disk'"), (["--quantize", "nf4"], "needs a CUDA device"),
    (["--offload", "group"], "--offload group moves weights"),
    (["--lora", "{tmp}/missing.safetensors"], "--lora"), (["--lora", "{tmp}/file.png:0.5"], ".safetensors"),
    (["--image", "{tmp}/missing.png"], "--image"), (["--timeout", "0"], "--timeout 0"),
    (["--tls-cert", "{tmp}/file.png"], "--tls-cert and --tls-key go together"),
    (["--tls-ca", "{tmp}/missing.pem"], "--tls-ca"), (["--unknown-option"], "No such option"),
    (["--model", "{tmp}/no-such-model"], "does not exist"), (["--model", "{broken}/list"], "holds a JSON list"),
    (["--model", "{broken}/truncated"], "not valid JSON"), (["--model", "{broken}/latin1"], "not UTF-8"),
]


@pytest.mark.parametrize("args, expected", GENERATE_CASES, ids=[" ".join(a) for a, _ in GENERATE_CASES])
def test_generate_bad_values(capsys, tmp_path, tiny_flux1, broken_models, args, expected):
    (tmp_path / "file.png").write_bytes(b"not a folder")
    base = {"--encoder": DEAD, "--model": str(tiny_flux1), "--prompt": "x", "--out": str(tmp_path / "x.png"),
            "--device": "cpu"}
    args = [a.format(tmp=tmp_path, broken=broken_models["list"].parent) for a in args]
    for flag in [a for a in args if a in base]:
        base.pop(flag)
    code, err = cli(capsys, "generate", *[x for kv in base.items() for x in kv], *args)
    assert_one_error_line(code, err, expected)
    assert not (tmp_path / "x.png").exists()


BATCH_CASES = [
    (["{tmp}/missing.jsonl"], "job file"), (["{tmp}"], "is a folder"),
    (["--out-dir", "{tmp}/file.png"], "--out-dir"), (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "33"], "--batch-size 33"), (["--shard", "3/2"], "--shard '3/2'"),
    (["--width", "30"], "--width 30"), (["--steps", "0"], "--steps 0"), (["--seed", "-5"], "--seed -5"),
    (["--device", "cuda:7"], "--device cuda:7"), (["--vram", "tiny"], "--vram 'tiny'"),
    (["--lora", "{tmp}/missing.safetensors"], "--lora"), (["--model", "{broken}/truncated"], "not valid JSON"),
]


@pytest.mark.parametrize("args, expected", BATCH_CASES, ids=[" ".join(a) for a, _ in BATCH_CASES])
def test_batch_bad_values(capsys, tmp_path, tiny_flux1, broken_models, args, expected):
    (tmp_path / "file.png").write_bytes(b"a file")
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "x"}) + "\n")
    args = [a.format(tmp=tmp_path, broken=broken_models["list"].parent) for a in args]
    positional = [a for a in args[:1] if not a.startswith("-")]
    options = args[1:] if positional else args
    base = {"--encoder": DEAD, "--model": str(tiny_flux1), "--out-dir": str(tmp_path / "out"), "--device": "cpu"}
    for flag in [a for a in options if a in base]:
        base.pop(flag)
    code, err = cli(capsys, "batch", *(positional or [job]), *[x for kv in base.items() for x in kv], *options)
    assert_one_error_line(code, err, expected)
    assert not (tmp_path / "out").exists()


SERVE_CASES = [
    (["--port", "70000"], "--port 70000 is not a port"), (["--port", "-1"], "--port -1"),
    (["--metrics-port", "65536"], "--metrics-port 65536"), (["--health-port", "99999"], "--health-port 99999"),
    (["--device", "cuda"], "--device cuda"), (["--dtype", "int4"], "--dtype 'int4'"),
    (["--family", "sdxl"], "--family 'sdxl'"), (["--cache-mem", "lots"], "--cache-mem"),
    (["--cache-disk-max", "-1GB"], "--cache-disk-max"), (["--cache-redis", "localhost:6379"], "--cache-redis"),
    (["--max-batch-size", "0"], "--max-batch-size 0"), (["--grace", "-1"], "--grace -1"),
    (["--tls-cert", "{tmp}/cert.pem"], "--tls-cert and --tls-key go together"),
    (["--model", "{tmp}/no-such-model"], "does not exist"), (["--model", "{broken}/list"], "holds a JSON list"),
    (["--model", "{broken}/latin1"], "not UTF-8"), (["--model", "name="], "give a source"),
    (["--worker", "fiber"], "--worker 'fiber': use thread or process"),
]


@pytest.fixture
def no_serving(monkeypatch):
    """A serve whose checks all pass would start a server: make that fail the test at once instead."""
    from encoder_server import server

    async def refuse(self):
        raise AssertionError("the bad argument was not caught: the server would start")

    monkeypatch.setattr(server.EncoderServer, "run_until_signal", refuse)


@pytest.mark.parametrize("args, expected", SERVE_CASES, ids=[" ".join(a) for a, _ in SERVE_CASES])
def test_serve_bad_values(capsys, tmp_path, tiny_flux1, broken_models, no_serving, args, expected):
    args = [a.format(tmp=tmp_path, broken=broken_models["list"].parent) for a in args]
    base = {"--model": str(tiny_flux1), "--port": "0", "--host": "127.0.0.1", "--device": "cpu"}
    for flag in [a for a in args if a in base]:
        base.pop(flag)
    code, err = cli(capsys, "serve", *[x for kv in base.items() for x in kv], *args)
    assert_one_error_line(code, err, expected)


def test_serve_on_a_port_in_use_is_refused_before_loading(capsys, tiny_flux1, no_serving):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = cli(capsys, "serve", "--model", tiny_flux1, "--host", "127.0.0.1", "--port", port,
                        "--device", "cpu")
    assert_one_error_line(code, err, f"--port {port}", "already in use")


@pytest.mark.parametrize("args, expected", [
    (["demo", "--family", "sdxl"], "--family 'sdxl'"), (["demo", "--out", "demo.gif"], "'.gif'"),
    (["make-tiny-model", "{tmp}/m", "--family", "sdxl"], "--family 'sdxl'"),
    (["encode", "--encoder", DEAD, "--out", "{tmp}/o"], "give a job file"),
    (["models", "--encoder", DEAD, "--timeout", "-1"], "--timeout -1"),
])
def test_other_commands_bad_values(capsys, tmp_path, args, expected):
    code, err = cli(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert_one_error_line(code, err, expected)


def test_a_real_subprocess_prints_one_line_for_bad_values(tiny_flux1, tmp_path):
    for args, expected in ((["generate", "--steps", "0"], "--steps 0"), (["generate", "--out", tmp_path / "x.txt"],
                                                                          "not an image format")):
        base = ["--encoder", DEAD, "--model", tiny_flux1, "--prompt", "x", "--device", "cpu"]
        if "--out" not in args:
            base += ["--out", tmp_path / "x.png"]
        result = run_cli(*args, *base, timeout=120)
        assert_one_error_line(result.returncode, result.stderr, expected)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--model", tiny_flux1, "--host", "127.0.0.1", "--port", port, "--device", "cpu",
                         timeout=120)
    assert_one_error_line(result.returncode, result.stderr, "already in use")
