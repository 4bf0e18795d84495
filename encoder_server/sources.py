"""Where a model comes from: a local diffusers folder or a Hugging Face hub repo id."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from encoder_server.errors import SourceError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FINGERPRINT_MEMO = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "promptcast" / "file-hashes.json"


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model` source: `pretrained` is what `from_pretrained` takes."""

    source: str
    pretrained: str
    local_dir: Path | None = None
    revision: str | None = None

    def read_json(self, relpath: str, missing_ok: bool = False) -> dict | None:
        """Read a small JSON file (model_index.json, a config) without touching any weights."""
        if self.local_dir is not None:
            path = self.local_dir / relpath
            if not path.is_file():
                if missing_ok:
                    return None
                raise SourceError(f"{path} is missing: is {self.source!r} a diffusers model folder?")
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path = Path(hf_hub_download(self.pretrained, relpath, revision=self.revision))
            except EntryNotFoundError:
                if missing_ok:
                    return None
                raise SourceError(f"hub repo {self.pretrained!r} has no {relpath}") from None
        return json.loads(path.read_text(encoding="utf-8"))

    def fingerprint(self, subfolders: list[str]) -> str:
        """Content hash of the given subfolders (local) or the snapshot's commit hash (hub)."""
        if self.local_dir is None:
            from huggingface_hub import hf_hub_download

            # Hub files live under snapshots/<commit>/: the commit pins every file's content.
            commit = Path(hf_hub_download(self.pretrained, "model_index.json", revision=self.revision)).parent.name
            return f"hub:{self.pretrained}@{commit}"
        digest = hashlib.sha256()
        for sub in subfolders:
            folder = self.local_dir / sub
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                digest.update(str(path.relative_to(self.local_dir)).encode())
                digest.update(_file_sha256(path).encode())
        return f"sha256:{digest.hexdigest()}"


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised by (path, size, mtime) so restarts do not re-read gigabytes."""
    stat = path.stat()
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        memo = json.loads(_FINGERPRINT_MEMO.read_text())
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
        _FINGERPRINT_MEMO.parent.mkdir(parents=True, exist_ok=True)
        tmp = _FINGERPRINT_MEMO.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, _FINGERPRINT_MEMO)
    except OSError:
        pass  # the memo only saves time
    return memo[memo_key]


def resolve_source(source: str) -> ModelSource:
    """Resolve a local folder or `org/name[@revision]` hub id; raise `SourceError` saying which it is not."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise SourceError(f"{source!r} has no model_index.json: pass a diffusers model folder or a hub repo id")
        return ModelSource(source=source, pretrained=str(path.resolve()), local_dir=path.resolve())
    repo, _, revision = source.partition("@")
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(repo):
        raise SourceError(f"model folder {source!r} does not exist (and it is not a hub repo id like 'org/name')")
    return ModelSource(source=source, pretrained=repo, revision=revision or None)
