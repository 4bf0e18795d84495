"""The CLI end to end, as a user runs it: real subprocesses, real server, real files."""

from PIL import Image

from conftest import run_cli


def test_demo_runs_offline_and_reports(tmp_path):
    out = tmp_path / "demo.png"
    result = run_cli("demo", "--out", out, env={"XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 64)
    assert str(out) in result.stdout
    for word in ("encode", "transfer", "denoise", "decode", "embedding bytes over gRPC"):
        assert word in result.stdout


def test_serve_models_generate(tiny_flux1, server_process, tmp_path):
    server = server_process("--model", f"fox={tiny_flux1}").wait_serving()
    listing = run_cli("models", "--encoder", server.address)
    assert listing.returncode == 0 and listing.stdout.startswith("fox\tflux1\t")
    out = tmp_path / "img.png"
    result = run_cli("generate", "--encoder", server.address, "--model", tiny_flux1, "--prompt", "a fox at dusk",
                     "--out", out, "--steps", "2", "--width", "32", "--height", "32", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (32, 32)
    assert "cache miss" in result.stdout
    assert server.stop() == 0


def test_make_tiny_model_cli(tmp_path):
    result = run_cli("make-tiny-model", tmp_path / "m", "--family", "flux1")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "model_index.json").is_file()
