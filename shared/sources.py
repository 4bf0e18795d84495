"""Where a model comes from: a local diffusers folder or a Hugging Face hub repo id (`org/name[@revision]`).

The one resolver both sides use: the server to load text encoders, the node to read `model_index.json` before it
loads a transformer. Every failure is a `ModelSourceError` naming the source, the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from shared.config import cache_home

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(ValueError):
    """A `--model` source that cannot be read: missing folder, broken `model_index.json`, hub unreachable."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model` source: `pretrained` is what `from_pretrained` takes."""

    source: str
    pretrained: str
    local_dir: Path | None = None
    revision: str | None = None

    def read_json(self, relpath: str, missing_ok: bool = False) -> dict | None:
        """Read a small JSON object (model_index.json, a config) without touching any weights."""
        if self.local_dir is not None:
            path = self.local_dir / relpath
            if not path.is_file():
                if missing_ok:
                    return None
                raise ModelSourceError(f"{path} is missing: is {self.source!r} a diffusers model folder?")
        else:
            path = self._hub_file(relpath, missing_ok)
            if path is None:
                return None
        try:
            document = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ModelSourceError(f"{path} is not UTF-8 text (byte {e.start}): is it a JSON file?") from None
        except json.JSONDecodeError as e:
            raise ModelSourceError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                   "it may be truncated: restore it from the model's repo") from None
        if not isinstance(document, dict):
            raise ModelSourceError(f"{path} holds a JSON {type(document).__name__}, not an object: is {self.source!r} "
                                   "a diffusers model folder?")
        return document

    def _hub_file(self, relpath: str, missing_ok: bool) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hub

        repo = self.pretrained + (f"@{self.revision}" if self.revision else "")
        try:
            return Path(hf_hub_download(self.pretrained, relpath, revision=self.revision))
        except hub.LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
            raise ModelSourceError(f"could not reach the Hugging Face hub for {repo!r}, and {relpath} is not in the "
                                   "local hub cache (offline, or HF_HUB_OFFLINE=1): connect to the hub once, or "
                                   "pass a local diffusers folder") from None
        except hub.GatedRepoError:
            raise ModelSourceError(f"hub repo {repo!r} is gated: accept its license on huggingface.co and log in "
                                   "(huggingface-cli login, or HF_TOKEN)") from None
        except hub.RepositoryNotFoundError:
            raise ModelSourceError(f"hub repo {repo!r} does not exist, or is private (log in with huggingface-cli "
                                   "login, or set HF_TOKEN)") from None
        except hub.RevisionNotFoundError:
            raise ModelSourceError(f"hub repo {self.pretrained!r} has no revision {self.revision!r}") from None
        except hub.EntryNotFoundError:
            if missing_ok:
                return None
            raise ModelSourceError(f"hub repo {repo!r} has no {relpath}: is it a diffusers model?") from None
        except (OSError, hub.HfHubHTTPError) as e:
            raise ModelSourceError(f"could not read {relpath} of hub repo {repo!r}: {e}") from None

    def fingerprint(self, subfolders: list[str]) -> str:
        """Content hash of the given subfolders (local) or the snapshot's commit hash (hub)."""
        if self.local_dir is None:
            # Hub files live under snapshots/<commit>/: the commit pins every file's content.
            commit = self._hub_file("model_index.json", missing_ok=False).parent.name
            return f"hub:{self.pretrained}@{commit}"
        digest = hashlib.sha256()
        for sub in subfolders:
            folder = self.local_dir / sub
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                digest.update(str(path.relative_to(self.local_dir)).encode())
                digest.update(_file_sha256(path).encode())
        return f"sha256:{digest.hexdigest()}"


def _fingerprint_memo() -> Path:
    return cache_home() / "file-hashes.json"


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised by (path, size, mtime) so restarts do not re-read gigabytes."""
    stat = path.stat()
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_file = _fingerprint_memo()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    memo[memo_key] = digest.hexdigest()
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass  # the memo only saves time
    return memo[memo_key]


def resolve_source(source: str) -> ModelSource:
    """Resolve a local folder or `org/name[@revision]` hub id; raise `ModelSourceError` saying which it is not."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"{source!r} is a file: pass a diffusers model folder (holding model_index.json) "
                                   "or a hub repo id")
        if not (path / "model_index.json").is_file():
            raise ModelSourceError(f"{source!r} has no model_index.json: pass a diffusers model folder or a hub repo "
                                   "id")
        return ModelSource(source=source, pretrained=str(path.resolve()), local_dir=path.resolve())
    repo, _, revision = source.partition("@")
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(repo):
        raise ModelSourceError(f"model folder {source!r} does not exist (and it is not a hub repo id like 'org/name')")
    return ModelSource(source=source, pretrained=repo, revision=revision or None)
