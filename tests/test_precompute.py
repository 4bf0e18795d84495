"""`promptcast encode` as a training run uses it: a dataset's captions exported as one safetensors file per caption
plus `index.jsonl`, loaded by a plain training loop; bad lines and a refused prompt fail alone; a second run is
answered from the server's cache; a server that stops answering stops the run with one message."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same, free_port, run_cli
from denoiser_client import RemoteTextEncoder, errors
from denoiser_client.precompute import Job, export
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from encoder_server.service import Limits


@pytest.fixture(scope="module")
def flux2_server(tiny_models, tmp_path_factory):
    config = ServerConfig([ModelSpec(str(tiny_models["flux2"]), name="tiny-flux2")], port=0,
                          cache_dir=str(tmp_path_factory.mktemp("cache")), limits=Limits(max_prompt_chars=100))
    with BackgroundServer(config) as server:
        yield server


class CaptionEmbeddings(torch.utils.data.Dataset):
    """The README's training-loop recipe: an exported folder as a dataset of (image file, prompt_embeds)."""

    def __init__(self, folder):
        self.folder = folder
        self.rows = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return row["file_name"], load_file(self.folder / row["file"])["prompt_embeds"][0]


def test_dataset_captions_export_for_a_training_loop_and_a_second_run_hits_the_cache(flux2_server, tmp_path):
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_bytes(b"\n".join([
        json.dumps({"file_name": "0001.png", "text": "a photo of sks dog"}).encode(),
        json.dumps({"file_name": "0002.png", "text": "a photo of sks dog on a beach"}).encode(),
        b'{"file_name": "0003.png", "text": "caf\xe9 latin-1"}',  # not UTF-8
        json.dumps({"file_name": "0004.png", "text": "a very long caption " * 8}).encode(),  # over the limit
        json.dumps({"file_name": "0005.png", "caption": "a sks dog in a bucket"}).encode(),
    ]) + b"\n")
    args = ("encode", metadata, "--encoder", flux2_server.address, "--out", tmp_path / "embeds")
    first = run_cli(*args)
    assert first.returncode == 1, first.stderr
    assert "line 3: not UTF-8 (byte 0xe9 at column 39)" in first.stderr
    assert "line 4: not exported:" in first.stderr and "160 characters, over 100" in first.stderr
    rows = [json.loads(line) for line in (tmp_path / "embeds" / "index.jsonl").read_text().splitlines()]
    assert [(r["line"], r["file_name"], r["cache_status"]) for r in rows] == [
        (1, "0001.png", "miss"), (2, "0002.png", "miss"), (5, "0005.png", "miss")]  # refused with line 4, then alone

    loader = torch.utils.data.DataLoader(CaptionEmbeddings(tmp_path / "embeds"), batch_size=2)
    batches = list(loader)
    with RemoteTextEncoder(flux2_server.address, timeout=60) as enc:
        expected = enc.encode([r["prompt"] for r in rows])["prompt_embeds"]
    assert [list(names) for names, _ in batches] == [["0001.png", "0002.png"], ["0005.png"]]
    assert_same({"prompt_embeds": torch.cat([embeds for _, embeds in batches])}, {"prompt_embeds": expected})

    second = run_cli(*args)  # another run, the same captions: no encode at all
    assert second.returncode == 1 and "3 prompts exported" in second.stdout and "cache memory 3" in second.stdout
    rows = [json.loads(line) for line in (tmp_path / "embeds" / "index.jsonl").read_text().splitlines()]
    assert [r["cache_status"] for r in rows] == ["memory"] * 3


class StopsAnswering:
    """A real client whose server goes away after its first call."""

    def __init__(self, client):
        self.client, self.calls = client, 0

    def model_info(self, model=None):
        return self.client.model_info(model)

    def encode(self, *args, **kwargs):
        self.calls += 1
        if self.calls > 1:
            raise errors.ServerUnavailable("no encoder server answered at 127.0.0.1:1 after 4 rounds of retries")
        return self.client.encode(*args, **kwargs)


def test_a_server_that_stops_answering_stops_the_run_and_what_was_encoded_is_written(flux2_server, tmp_path):
    jobs = [Job(n, f"caption number {n}") for n in (1, 2, 3)]
    with RemoteTextEncoder(flux2_server.address, timeout=60) as enc:
        client = StopsAnswering(enc)
        rows, problems = export(client, jobs, tmp_path, batch_size=1, echo=lambda line: None)
    assert client.calls == 2  # stopped: the third caption was never sent
    assert [r["line"] for r in rows] == [1] and (tmp_path / rows[0]["file"]).is_file()
    assert problems[0].startswith("stopped after 1 of 3 prompts: no encoder server answered")
    assert problems[1:] == [f"line {n}: not exported: the server stopped answering before it was sent" for n in (2, 3)]


def test_encode_against_no_server_is_one_error_line(tmp_path):
    result = run_cli("encode", "--prompt", "x", "--encoder", f"127.0.0.1:{free_port()}", "--out", tmp_path,
                     "--timeout", "2")
    assert result.returncode == 1 and result.stderr.startswith("error: no encoder server answered")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_max_sequence_length_no_prompt_can_have_is_one_error_before_any_encode(flux2_server, tmp_path):
    result = run_cli("encode", "--prompt", "x", "--prompt", "y", "--encoder", flux2_server.address, "--out", tmp_path,
                     "--max-sequence-length", "4096")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "--max-sequence-length 4096 is outside 1-512, the range of model 'tiny-flux2'" in result.stderr
