"""Downloads of registry GGUFs from the Hugging Face Hub (or whatever `HF_ENDPOINT` names).

huggingface_hub does the transfer: it writes to an `.incomplete` file beside the target, resumes
it with a Range request after an interruption, checks the size, and renames it into place only
when complete, so a failed download never leaves a file that looks complete. On top of that the
file's SHA-256 is checked against the hub's LFS etag when the hub gives one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub as hf
from tqdm.auto import tqdm

from server.errors import ModelLoadFailed

log = logging.getLogger("server.hub")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
Progress = Callable[[int, int | None], None]  # (bytes so far, total bytes if known)


def download(repo: str, file: str, target: Path, progress: Progress | None = None,
             show_bar: bool = False, endpoint: str | None = None) -> Path:
    """Fetch `repo`/`file` to `target` (resuming a partial download); verify; return `target`.

    `endpoint` defaults to huggingface_hub's (HF_ENDPOINT, else huggingface.co).
    """
    bar_class = _reporting_bar(progress, show_bar)
    try:
        meta = hf.get_hf_file_metadata(hf.hf_hub_url(repo, file, endpoint=endpoint))
        got = Path(hf.hf_hub_download(repo, file, local_dir=target.parent, endpoint=endpoint,
                                      tqdm_class=bar_class))
    except hf.errors.EntryNotFoundError:
        raise ModelLoadFailed(f"{repo} has no file {file}: check 'repo' and 'file' (or the "
                              "quant) in models.yaml") from None
    except hf.errors.RepositoryNotFoundError:
        raise ModelLoadFailed(f"the Hub has no repository {repo} (or it is private: set "
                              "HF_TOKEN)") from None
    except Exception as exc:  # network, disk, consistency: the partial file stays to resume
        raise ModelLoadFailed(f"downloading {repo}/{file} failed: {exc}; retry to resume it"
                              ) from None
    if got.resolve() != target.resolve():  # a file in a subfolder of the repo
        got.replace(target)
    etag = (meta.etag or "").strip('"')
    if _SHA256.match(etag) and _sha256(target) != etag:
        target.unlink()
        raise ModelLoadFailed(f"{repo}/{file} failed its SHA-256 check (the hub says {etag}); "
                              "the file was removed, retry to download it again")
    log.info("downloaded %s/%s to %s", repo, file, target)
    return target


def remote_size(repo: str, file: str, endpoint: str | None = None,
                timeout: float = 5.0) -> int | None:
    """The size in bytes of `repo`/`file` on the hub, or None when the hub cannot say."""
    try:
        meta = hf.get_hf_file_metadata(hf.hf_hub_url(repo, file, endpoint=endpoint),
                                       timeout=timeout)
    except Exception as exc:  # offline, unknown file, private repo: the size stays unknown
        log.debug("no size for %s/%s: %s", repo, file, exc)
        return None
    return meta.size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _reporting_bar(progress: Progress | None, show_bar: bool) -> type[tqdm]:
    """A tqdm class that reports each update to `progress` (and draws only for the CLI)."""

    class ReportingBar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = not show_bar
            super().__init__(*args, **kwargs)
            self.done = int(kwargs.get("initial") or 0)
            self.size = kwargs.get("total")
            if progress is not None:
                progress(self.done, self.size)

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            if progress is not None:
                progress(self.done, self.size)
            return super().update(n)  # type: ignore[no-any-return]

    return ReportingBar
