"""SAEs on the Hugging Face Hub: `hf://OWNER/REPO[@REVISION][/PATH]` to a local path.

The files are fetched into (or found in) the Hugging Face cache with huggingface_hub, which
honours HF_HOME, HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE as usual."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SAEFormatError

HUB_PREFIX = "hf://"
_SOURCE = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.*))?"
)


@dataclass(frozen=True)
class HubSource:
    """Where an SAE lives on the Hub: a model repo, a revision (None: main), a path in it."""

    repo_id: str
    revision: str | None
    path_in_repo: str

    @property
    def allow_patterns(self) -> list[str] | None:
        """What to fetch: the file or folder at path_in_repo (None: the whole repo)."""
        if not self.path_in_repo:
            return None
        return [self.path_in_repo, f"{self.path_in_repo}/*"]


def is_hub_path(path: str) -> bool:
    return path.startswith(HUB_PREFIX)


def parse_hub_path(path: str) -> HubSource:
    """The HubSource an `hf://` path names; raises SAEFormatError when it names none."""
    match = _SOURCE.fullmatch(path.removeprefix(HUB_PREFIX))
    if not is_hub_path(path) or match is None:
        raise SAEFormatError(
            f"{path}: expected hf://OWNER/REPO[@REVISION][/PATH] "
            "(e.g. hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82)"
        )
    path_in_repo = (match["path"] or "").strip("/")
    if path_in_repo and any(part in ("", ".", "..") for part in path_in_repo.split("/")):
        raise SAEFormatError(f"{path}: the path inside the repo must not contain '.', '..' or '//'")
    return HubSource(match["repo"], match["revision"], path_in_repo)


def fetch_hub_sae(path: str) -> str:
    """The local path of the SAE an `hf://` path names, fetching only its files into the
    Hugging Face cache when they are not there yet."""
    source = parse_hub_path(path)
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(
            source.repo_id, revision=source.revision, allow_patterns=source.allow_patterns
        )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SAEFormatError(f"{path}: cannot fetch from the Hugging Face Hub ({reason})") from None
    local = Path(snapshot) / source.path_in_repo
    if not local.exists():
        raise SAEFormatError(
            f"{path}: {source.repo_id} has no file or folder {source.path_in_repo!r}"
        )
    return str(local)


def local_sae_path(path: str) -> str:
    """path itself, or the local path of an `hf://` SAE (fetched when needed)."""
    return fetch_hub_sae(path) if is_hub_path(path) else path
