"""Hugging Face Hub references to nofree artefacts: ``hf-hub:ORG/NAME[@REVISION]`` → a local folder.

Wherever nofree takes the folder of an anchor set or a trained adapter it also takes
``hf-hub:ORG/NAME`` (the repository's default branch) or ``hf-hub:ORG/NAME@REVISION`` (a branch,
tag or commit hash) of a *model* repository, as ``nofree push`` uploads them. :func:`resolve_dir`
is the one place that turns such a reference into a folder: ``huggingface_hub.snapshot_download``
fetches the repository into the Hugging Face cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``, laid out ``models--ORG--NAME/{refs,snapshots,blobs}``) and the
snapshot folder is read like any local folder. Already cached and unchanged, nothing is
downloaded again; with ``HF_HUB_OFFLINE=1`` (read when the reference is resolved, so setting it
after ``import nofree`` counts too) only the cache is looked at. Private repositories use the
token of ``hf auth login`` or ``HF_TOKEN``. Every failure (offline and not cached, no such
repository or revision, the hub unreachable) is one :class:`~nofree.core.DataError` line saying
how to fix it.

Anything else (a path, a ``Path``) comes back as a ``Path`` unchanged, so library functions call
:func:`resolve_dir` on whatever they were given.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from nofree.core import DataError, SpecError

HUB_PREFIX = "hf-hub:"
#: ``ORG/NAME`` (or a bare ``NAME``, as the hub's oldest models are named), then ``@REVISION``
_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[^\s@]+))?$")
_FORM = "hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION (a branch, tag or commit)"
#: (repo_id, revision, cache dir, offline) -> snapshot folder: each reference is looked up once
#: per process (online, each lookup asks the hub which commit the revision names)
_resolved: dict[tuple[str, str | None, str | None, bool], Path] = {}


def is_hub_ref(value: Any) -> bool:
    """Whether ``value`` (a string or path) is an ``hf-hub:`` reference."""
    return isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith(HUB_PREFIX)


def parse_hub_ref(value: str | os.PathLike) -> tuple[str, str | None]:
    """``(repo_id, revision or None)`` of ``hf-hub:ORG/NAME[@REVISION]``; a malformed one is a
    :class:`SpecError` naming the accepted form."""
    text = os.fspath(value)
    match = _REF.match(text[len(HUB_PREFIX):]) if text.startswith(HUB_PREFIX) else None
    if match is None or match["repo"].endswith((".", "-")) or ".." in match["repo"]:
        raise SpecError(f"{text!r} is not a hub reference: give {_FORM}, e.g. hf-hub:my-org/coco-anchors")
    return match["repo"], match["revision"]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> str | None:
    """The hub cache folder the environment names now (``HF_HUB_CACHE``, else ``HF_HOME/hub``), or
    ``None`` for huggingface_hub's own default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def hub_offline() -> bool:
    """Whether hub look-ups are switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")) \
        or bool(constants.HF_HUB_OFFLINE)


def resolve_dir(value: str | os.PathLike, *, what: str = "folder") -> Path:
    """The local folder of ``value``: an ``hf-hub:`` reference downloaded (or found in the cache)
    with ``snapshot_download``; anything else as a ``Path``. ``what`` ("anchor set", "adapter")
    words the errors."""
    if not is_hub_ref(value):
        return Path(value)
    repo_id, revision = parse_hub_ref(value)
    cache_dir, offline = hub_cache_dir(), hub_offline()
    key = (repo_id, revision, cache_dir, offline)
    if key in _resolved and _resolved[key].is_dir():
        return _resolved[key]
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    ref = os.fspath(value)
    where = cache_dir or "the Hugging Face cache (~/.cache/huggingface/hub; HF_HUB_CACHE moves it)"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, repo_type="model", cache_dir=cache_dir,
                                        local_files_only=offline))
    except HFValidationError as err:
        raise SpecError(f"{ref}: {err}; give {_FORM}") from None
    except LocalEntryNotFoundError as err:
        if offline:
            raise DataError(f"{ref}: the {what} is not in {where} and HF_HUB_OFFLINE=1 forbids downloading "
                            f"it; run once with network access and HF_HUB_OFFLINE unset to cache it, or "
                            f"pass a local folder") from err
        raise DataError(f"{ref}: the hub cannot be reached and the {what} is not in {where}; check the "
                        f"network (or proxy) and run again, or pass a local folder") from err
    except GatedRepoError as err:
        raise DataError(f"{ref}: the repository is gated; accept its terms on huggingface.co and log in "
                        "(`hf auth login` or HF_TOKEN)") from err
    except RepositoryNotFoundError as err:
        raise DataError(f"{ref}: no model repository {repo_id} on the hub (or it is private: log in with "
                        "`hf auth login` or set HF_TOKEN)") from err
    except RevisionNotFoundError as err:
        raise DataError(f"{ref}: {repo_id} has no revision {revision!r}; give a branch, tag or commit "
                        "it has") from err
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise DataError(f"{ref}: the hub answered with an error ({status or err.__class__.__name__}); "
                        "try again later, or pass a local folder") from err
    _resolved[key] = folder
    return folder
