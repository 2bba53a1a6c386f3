"""The Hugging Face Hub: ``hf-hub:org/repo[@revision]`` ids, downloads and uploads.

A trex_hub model on the Hub is a folder of three files: ``model.safetensors`` (tensors only),
``config.json`` (what rebuilds the architecture: arch, projector, classifier, preprocessing) and
``README.md`` (the model card with Hugging Face metadata; written by :mod:`trex_hub.publish`).
Downloads go through the real ``huggingface_hub`` client, so its cache, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` and tokens apply as usual. This module knows files and repositories, not
torch modules.

``huggingface_hub`` is imported inside the functions: ``import trex_hub`` does not need it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..fileio import CONFIG_NAME, WEIGHTS_NAME, PathLike
from ..version import __version__
from .cache import OfflineError, is_offline, way_online
from .http import DownloadError, NotFoundError

HF_PREFIX = "hf-hub:"
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME)


def is_hf_id(value: object) -> bool:
    """Whether ``value`` is an ``"hf-hub:..."`` id (rather than a name or a path)."""
    return isinstance(value, str) and value.strip().startswith(HF_PREFIX)


# what the Hub accepts as a repository id (huggingface_hub's validate_repo_id): one optional
# namespace, word characters, '-' and '.', no '--' or '..', at most 96 characters
_REPO_PART = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$")
# a revision is a commit or a git ref name (git check-ref-format): branches may hold '/'
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|//|@\{")


def _check_repo_id(repo_id: str, spec: str) -> None:
    if not _REPO_PART.match(repo_id) or "--" in repo_id or ".." in repo_id \
            or repo_id.endswith(".git") or len(repo_id) > 96:
        raise ValueError(f"'{spec}' is not a Hub model id: use 'hf-hub:org/repo' or "
                         "'hf-hub:org/repo@revision' (letters, digits, '-', '_', '.'; no '..' "
                         "or '--')")


def check_revision(rev: str, spec: str = "") -> str:
    """``rev`` when it is a valid Hub revision (a commit, or a branch/tag name by git's ref
    rules: '/' between non-empty parts, no '..', no part starting with '.', no control
    characters or ``~^:?*[\\``); else ``ValueError``. Nothing is read or written before this
    check: the Hub client writes ``refs/<revision>`` inside its cache."""
    parts = rev.split("/")
    bad = (not rev or len(rev) > 255 or _REF_FORBIDDEN.search(rev) is not None
           or rev.startswith("/") or rev.endswith(("/", ".", ".lock")) or rev == "@"
           or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts))
    if bad:
        where = f" in '{spec}'" if spec else ""
        raise ValueError(f"revision {rev!r}{where} is not a valid Hub revision: use a branch, "
                         "tag or commit (no '..', no part starting with '.', no spaces or "
                         "~^:?*[\\)")
    return rev


def parse_hf_id(spec: str, revision: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``"hf-hub:org/repo@rev"`` (prefix optional) -> ``("org/repo", "rev")``; ``revision=``
    must agree when both are given. The one parser of Hub ids in trex_hub: the repository id
    and the revision are validated here, before any network or disk access."""
    spec = spec.strip()
    if spec.startswith(HF_PREFIX):
        spec = spec[len(HF_PREFIX):]
    repo_id, _, rev = spec.partition("@")
    _check_repo_id(repo_id, spec)
    if rev and revision and rev != revision:
        raise ValueError(f"'{spec}' names revision '{rev}' but revision='{revision}' was also "
                         "given; use one")
    rev = rev or revision or None
    if rev is not None:
        check_revision(rev, spec)
    return repo_id, rev


def _check_cache_paths(cache: Path, repo_id: str, rev: Optional[str]) -> None:
    """The Hub client's files for ``repo_id`` at ``rev`` stay inside ``cache`` (a second guard
    behind :func:`check_revision`)."""
    root = cache.resolve()
    storage = (cache / ("models--" + repo_id.replace("/", "--"))).resolve()
    targets = [storage] + ([(storage / "refs" / rev).resolve(),
                            (storage / "snapshots" / rev).resolve()] if rev else [])
    for t in targets:
        if root != t and root not in t.parents:
            raise ValueError(f"{HF_PREFIX}{repo_id}@{rev}: its cache files would be written "
                             f"outside {cache}; use a plain branch, tag or commit")


def _endpoint(endpoint: Optional[str] = None) -> Optional[str]:
    # read at call time: huggingface_hub reads HF_ENDPOINT once, when it is first imported
    value = endpoint or os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def hf_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """The Hugging Face cache used: ``cache_dir``, else ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, or the
    huggingface_hub default (``~/.cache/huggingface/hub``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@contextlib.contextmanager
def _client_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's own offline switch, on while ``offline``: ``local_files_only`` alone
    still lets the client fetch ``/api/agent-harnesses`` for its request headers (2.x), once per
    process, so an offline load touched the network. The switch is read at call time; restored
    after."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _download_files(repo_id: str, rev: Optional[str], names: Sequence[str], *,
                    cache_dir: Optional[PathLike], token: Union[str, bool, None],
                    force_download: bool, offline: Optional[bool], endpoint: Optional[str],
                    progress: bool) -> List[Path]:
    """``names`` of one Hub repo, all from the same commit, with trex_hub's error messages."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, \
        enable_progress_bars

    offline = is_offline() if offline is None else offline
    cache = hf_cache_dir(cache_dir)
    _check_cache_paths(cache, repo_id, rev)
    ep = _endpoint(endpoint)
    where = f"{HF_PREFIX}{repo_id}" + (f"@{rev}" if rev else "")
    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        paths: List[Path] = []
        pinned = rev
        with _client_offline(offline):
            for name in names:
                local = hf_hub_download(repo_id, name, revision=pinned, cache_dir=str(cache),
                                        token=token, endpoint=ep, local_files_only=offline,
                                        force_download=force_download, library_name="trex_hub",
                                        library_version=__version__)
                paths.append(Path(local))
                pinned = Path(local).parent.name if not offline else pinned  # one commit
    except hf_errors.LocalEntryNotFoundError:
        if offline:
            raise OfflineError(
                f"offline mode is on and {where} is not in the Hugging Face cache ({cache}). On "
                f"a connected machine run `trex-download {where} --cache-dir {cache}` and copy "
                f"that folder here, or {way_online()}.") from None
        raise DownloadError(
            f"{where}: the Hub at {ep or 'https://huggingface.co'} could not be reached and the "
            f"files are not cached in {cache}; check the network or HF_ENDPOINT.") from None
    except hf_errors.RepositoryNotFoundError:
        raise NotFoundError(
            f"{where}: repository not found at {ep or 'https://huggingface.co'} (private or "
            "gated? pass token= or run `hf auth login`; check the id and HF_ENDPOINT).") from None
    except hf_errors.RevisionNotFoundError:
        raise NotFoundError(f"{where}: revision '{rev}' does not exist; use a branch, tag or "
                            "commit of the repository.") from None
    except hf_errors.EntryNotFoundError:
        raise NotFoundError(
            f"{where}: the repository has no {' + '.join(names)}, so it is not a trex_hub "
            "model; publish one with trex_hub.push_to_hub(model, repo_id).") from None
    except hf_errors.HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DownloadError(f"{where}: {first}; check the network, token and "
                            "HF_ENDPOINT.") from None
    finally:
        if silence:
            enable_progress_bars()
    if any(p.parent != paths[0].parent for p in paths):  # pragma: no cover - pinned above
        raise DownloadError(f"{where}: {' and '.join(names)} come from different commits; retry")
    return paths


def download_model(repo_spec: str, cache_dir: Optional[PathLike] = None,
                   revision: Optional[str] = None, token: Union[str, bool, None] = None, *,
                   force_download: bool = False, offline: Optional[bool] = None,
                   endpoint: Optional[str] = None, progress: bool = True) -> Path:
    """Fetch ``config.json`` + ``model.safetensors`` of a Hub repo; returns their (snapshot) folder.

    ``repo_spec`` is ``"org/repo"`` or ``"org/repo@revision"`` (branch, tag or commit). Offline mode
    (``TREX_HUB_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``offline=True``) only looks in the cache.
    Both files come from the same commit.
    """
    repo_id, rev = parse_hf_id(repo_spec, revision)
    paths = _download_files(repo_id, rev, MODEL_FILES, cache_dir=cache_dir, token=token,
                            force_download=force_download, offline=offline, endpoint=endpoint,
                            progress=progress)
    return paths[0].parent


def download_config(repo_spec: str, cache_dir: Optional[PathLike] = None,
                    revision: Optional[str] = None, token: Union[str, bool, None] = None, *,
                    force_download: bool = False, offline: Optional[bool] = None,
                    endpoint: Optional[str] = None, progress: bool = True) -> Path:
    """Only ``config.json`` of a Hub repo (what ``load(..., pretrained=False)`` needs)."""
    repo_id, rev = parse_hf_id(repo_spec, revision)
    return _download_files(repo_id, rev, (CONFIG_NAME,), cache_dir=cache_dir, token=token,
                           force_download=force_download, offline=offline, endpoint=endpoint,
                           progress=progress)[0]


def _content_names(path: Path) -> Tuple[str, str]:
    """``(sha256, git blob sha1)`` of a file: the two names the Hub client gives a blob."""
    sha256, git = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha256.update(chunk)
            git.update(chunk)
    return sha256.hexdigest(), git.hexdigest()


def verify_snapshot(repo_spec: str, cache_dir: Optional[PathLike] = None,
                    revision: Optional[str] = None) -> List[Dict[str, Any]]:
    """Re-hash the cached model files of a Hub repo, without the network: huggingface_hub names
    each blob by the SHA-256 of an LFS file or the git SHA-1 of any other, so a blob whose bytes
    no longer match its name is corrupt. A corrupt blob is deleted with its link (the next
    download fetches it again). One row per file: ``file``, ``ok`` (``None``: not a link into
    the blob store, so nothing to compare), ``sha256``, ``size``, ``problem``. Raises
    :class:`OfflineError` when the repo is not cached."""
    folder = download_model(repo_spec, cache_dir=cache_dir, revision=revision, offline=True,
                            progress=False)
    rows = []
    for name in MODEL_FILES:
        link = folder / name
        blob = Path(os.path.realpath(link))
        size = blob.stat().st_size
        sha256, git = _content_names(blob)
        ok: Optional[bool] = None
        problem = None
        if re.fullmatch(r"[0-9a-f]{64}", blob.name):
            ok = sha256 == blob.name
        elif re.fullmatch(r"[0-9a-f]{40}", blob.name):
            ok = git == blob.name
        else:
            problem = "not a link into the Hub client's blob store: not verifiable"
        if ok is False:
            problem = f"its bytes do not match the blob's name {blob.name}"
            blob.unlink()
            link.unlink()
        rows.append({"file": str(link), "ok": ok, "sha256": sha256, "size": size,
                     "problem": problem})
    return rows


class UploadError(DownloadError):
    """An upload to the Hub failed; the message names the repository and the fix."""


_TRANSPORTS = {"httpx", "httpx2", "httpcore", "requests", "urllib3", "h11", "ssl", "socket"}


def _is_transport_error(exc: BaseException) -> bool:
    """A network failure, whichever HTTP library the Hub client uses."""
    return isinstance(exc, (OSError, ConnectionError)) or any(
        t.__module__.split(".")[0] in _TRANSPORTS for t in type(exc).__mro__)


def _upload_error(exc: BaseException, repo_id: str, ep: Optional[str]) -> UploadError:
    """One line for a failed upload (raw Hub-client exceptions carry URLs, bodies, hints)."""
    from huggingface_hub import errors as hf_errors

    where, host = f"{HF_PREFIX}{repo_id}", ep or "https://huggingface.co"
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return UploadError(f"{where}: the repository does not exist at {host} or this token "
                           "cannot write it; pass token= (or run `hf auth login`), or "
                           "create_repo=True")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return UploadError(f"{where}: HTTP {status}: the token cannot write this "
                               "repository; pass a write token with token= or run "
                               "`hf auth login`")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return UploadError(f"{where}: the upload to {host} failed ({first}); check the "
                           "repository id, token and HF_ENDPOINT")
    return UploadError(f"{where}: could not reach the Hub at {host} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}); check the network "
                       "or HF_ENDPOINT")


def upload_folder(folder: PathLike, repo_id: str, *, token: Union[str, bool, None] = None,
                  private: Optional[bool] = None, revision: Optional[str] = None,
                  commit_message: str = "Upload t-ReX model (trex_hub)",
                  create_repo: bool = True, endpoint: Optional[str] = None) -> str:
    """Upload the files of ``folder`` to the model repository ``repo_id``; returns the commit
    URL. ``"org/repo@branch"`` or ``revision="branch"`` commits to that branch, created from the
    default branch when missing (``refs/pr/N`` commits to that pull request); a commit id is
    refused. Failures are an :class:`UploadError` with one line naming the repository and the
    fix."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf_errors

    if is_offline():  # the switch promises no network at all, uploads included
        raise OfflineError(f"offline mode is on (TREX_HUB_OFFLINE / HF_HUB_OFFLINE): uploading to "
                           f"'{repo_id}' needs the network; unset it to upload")
    repo_id, revision = parse_hf_id(repo_id, revision)
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        raise ValueError(f"{HF_PREFIX}{repo_id}@{revision}: an upload is a new commit on a "
                         "branch, not onto a commit id; name a branch (org/repo@branch)")
    ep = _endpoint(endpoint)
    api = HfApi(endpoint=ep, token=token, library_name="trex_hub",
                library_version=__version__)
    try:
        if create_repo:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main") and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message=commit_message, repo_type="model")
    except Exception as exc:  # noqa: BLE001 - sorted into one line below, others re-raised
        if isinstance(exc, hf_errors.HfHubHTTPError) or _is_transport_error(exc):
            raise _upload_error(exc, repo_id, ep) from None
        raise
    return str(info)
