"""Bad input gets a clear, named error before any GPU work; no data path unpickles or evals."""

import re
import subprocess
from pathlib import Path

import pytest

from conftest import free_port, run_cli
from denoiser_client import errors
from denoiser_client.pipeline import handshake, load_denoiser
from denoiser_client.remote import ModelInfo, OutputInfo

ROOT = Path(__file__).resolve().parent.parent


def test_unknown_model_names_the_hosted_ones(client):
    with pytest.raises(errors.ModelNotFound, match="'nope' is not hosted here; hosted: tiny-flux1") as e:
        client.encode("a cat", model="nope")
    assert e.value.code.name == "NOT_FOUND"


def test_empty_prompt_list(client):
    with pytest.raises(errors.InvalidArgument, match="prompts is empty") as e:
        client.encode([])
    assert e.value.code.name == "INVALID_ARGUMENT"


def test_max_sequence_length_over_the_limit_names_it(client):
    with pytest.raises(errors.InvalidArgument, match=r"max_sequence_length=600 is over 512, the limit of model "
                                                     r"'tiny-flux1'"):
        client.encode("a cat", max_sequence_length=600)


def test_too_many_prompts_in_one_call(client):
    with pytest.raises(errors.InvalidArgument, match=r"65 prompts in one call is over 64"):
        client.encode(["x"] * 65)


def test_prompt_2_count_mismatch(client):
    with pytest.raises(errors.InvalidArgument, match="prompt_2 has 1 entries but prompt has 2"):
        client.encode(["a", "b"], prompt_2=["c"])


def test_mismatched_transformer_is_refused_at_the_handshake(tiny_flux1, client):
    pipe, family = load_denoiser(str(tiny_flux1))
    real = client.model_info("tiny-flux1")
    wider = ModelInfo(**{**real.__dict__, "outputs": (OutputInfo("prompt_embeds", real.outputs[0].dtype, (512, 4096),
                                                                 True), real.outputs[1])})
    with pytest.raises(errors.IncompatibleModel, match=r"width 4096.*joint_attention_dim is 48"):
        handshake(pipe, family, wider)
    handshake(pipe, family, real)  # the real one fits


def test_generate_against_an_unreachable_server_prints_one_line(tiny_flux1, tmp_path):
    result = run_cli("generate", "--encoder", f"127.0.0.1:{free_port()}", "--model", tiny_flux1, "--prompt", "x",
                     "--out", tmp_path / "x.png", "--timeout", "2")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: no encoder server answered" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_serve_with_a_missing_model_folder_exits_clearly(tmp_path):
    result = run_cli("serve", "--model", tmp_path / "no-such-model", "--port", "0")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert re.search(r"error: model folder '.*no-such-model' does not exist", result.stderr), result.stderr


def test_serve_with_a_folder_that_is_not_a_model_exits_clearly(tmp_path):
    result = run_cli("serve", "--model", tmp_path, "--port", "0")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "has no model_index.json" in result.stderr


def test_no_pickle_torch_load_or_eval_on_data_paths():
    """Nothing that reads network or cache bytes may unpickle or eval."""
    pattern = re.compile(r"import pickle|pickle\.|torch\.load\(|(^|[^.a-z_])eval\(|cloudpickle|marshal\.loads")
    hits = []
    for package in ("encoder_server", "denoiser_client", "shared"):
        for path in (ROOT / package).rglob("*.py"):
            if "_pb2" in path.name:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert hits == []
    found = subprocess.run(["grep", "-rn", "weights_only=False", *map(str, (ROOT / "encoder_server", ROOT /
                                                                            "denoiser_client", ROOT / "shared"))],
                           capture_output=True, text=True)
    assert found.stdout == ""
