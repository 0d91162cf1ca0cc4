"""Hub I/O: adapter-only downloads of experts, clear errors naming the expert, and pushing a Glider adapter.

A LoRA expert needs a handful of files; its repository may also hold checkpoints or merged weights, so downloads
are restricted to `ADAPTER_FILES`. Hub failures are re-raised naming the expert and the cause (missing, private,
gated, bad revision), with the client's error as the cause.
"""

from __future__ import annotations

import functools
import os
import tempfile
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Optional

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .config import GliderConfig

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from peft import PeftModel

GATES_FILE = "glider_gates.safetensors"
#: What an expert's download fetches: its PEFT config, its weights (either format) and its Glider gates.
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, GATES_FILE)


def _hub_error_cause(error: BaseException) -> Optional[BaseException]:
    """The Hub's own error behind `error` (snapshot_download re-raises HTTP failures as cache misses)."""
    while error is not None:
        if isinstance(error, (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError)):
            return error
        error = error.__cause__ or error.__context__
    return None


def describe_hub_error(what: str, repo_id: str, revision: Optional[str], error: BaseException) -> str:
    """One sentence naming `what` (e.g. "Expert 'math'") and why the Hub refused `repo_id` at `revision`."""
    cause = _hub_error_cause(error)
    if isinstance(cause, GatedRepoError):
        return (
            f"{what}: {repo_id!r} is a gated repository and this account has no access: accept its conditions on its "
            "Hub page and log in (`hf auth login` or HF_TOKEN)."
        )
    if isinstance(cause, RepositoryNotFoundError):
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if status == 401:
            return (
                f"{what}: {repo_id!r} is private or does not exist (401: not authenticated): log in (`hf auth login` "
                "or HF_TOKEN) with an account that can read it, or check the id."
            )
        return f"{what}: no repository {repo_id!r} on the Hub (404) and no local folder of that name."
    if isinstance(cause, RevisionNotFoundError):
        return f"{what}: revision {revision!r} does not exist in {repo_id!r} (no such branch, tag or commit)."
    if isinstance(error, LocalEntryNotFoundError):
        return f"{what}: {repo_id!r} is not in the local Hub cache and the Hub cannot be reached (offline): {error}"
    return f"{what}: could not download {repo_id!r} (revision {revision!r}) from the Hub: {error}"


def download_adapter(
    repo_id: str, revision: Optional[str], subfolder: Optional[str], what: str
) -> tuple[str, str]:
    """Download only a LoRA adapter's files (`ADAPTER_FILES`, under `subfolder` if given) from a Hub repository.

    Returns (the local folder holding them, the commit they came from). Raises `OSError` naming `what` when the
    repository, revision or adapter config cannot be had.
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=[prefix + f for f in ADAPTER_FILES])
    except (HfHubHTTPError, LocalEntryNotFoundError, EntryNotFoundError, ValueError) as error:
        raise OSError(describe_hub_error(what, repo_id, revision, error)) from error
    folder = os.path.join(snapshot, subfolder) if subfolder else snapshot
    commit = os.path.basename(os.path.normpath(snapshot))
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        where = f"{repo_id!r} at commit {commit[:12]}" + (f", subfolder {subfolder!r}," if subfolder else "")
        raise OSError(
            f"{what}: {where} has no {CONFIG_NAME}, so it is not a PEFT adapter"
            + ("" if subfolder else " (for a repository holding several adapters, give the expert's 'subfolder')")
            + "."
        )
    return folder, commit


def check_portable(config: GliderConfig) -> None:
    """Refuse to share a router-only adapter whose experts include local folders: nobody else could load it."""
    local = config.unportable_experts
    if local:
        raise ValueError(
            f"This router-only Glider adapter (save_expert_weights=False) routes among local expert folders {local}, "
            "which nobody loading it from the Hub has. Push the experts to the Hub and build from their ids, or "
            "build with GliderConfig(save_expert_weights=True) to ship their weights inside the adapter."
        )


#: The Hub repository (and extra tags) of the push in progress in this thread or task: the card that
#: `save_pretrained` writes during a push is written for it, once.
_PUSH_TARGET: ContextVar[Optional[tuple[str, Optional[list[str]]]]] = ContextVar("glider_push_target", default=None)


def _glider_configs(model: "PeftModel") -> list[GliderConfig]:
    return [config for config in model.peft_config.values() if isinstance(config, GliderConfig)]


def push_to_hub(
    model: "PeftModel",
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    **save_kwargs: Any,
) -> "CommitInfo":
    """Push a PEFT model holding Glider adapters to the Hub, with its Glider model card.

    What `model.push_to_hub(repo_id)` runs for a Glider model (same arguments as transformers'): it refuses
    router-only adapters that need local folders, keeps a card already in the repository (updating its Glider
    section and metadata), and uploads the adapter folder `save_pretrained` writes.
    """
    for config in _glider_configs(model):
        check_portable(config)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        try:  # the card the repository has, which save_pretrained updates instead of replacing
            hf_hub_download(repo_id, "README.md", revision=revision, token=token, local_dir=folder)
        except EntryNotFoundError:
            pass
        except RevisionNotFoundError:  # a new branch: it starts from the default branch's card, if any
            try:
                hf_hub_download(repo_id, "README.md", token=token, local_dir=folder)
            except EntryNotFoundError:
                pass
        target = _PUSH_TARGET.set((repo_id, tags))
        try:  # writes the card for this repository (see install_peft_model_hooks)
            model.save_pretrained(folder, **save_kwargs)
        finally:
            _PUSH_TARGET.reset(target)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload Glider adapter",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            ignore_patterns=[".cache/**"],
        )


def install_peft_model_hooks() -> None:
    """Make `PeftModel` write the Glider card on `save_pretrained` and push with it on `push_to_hub`.

    Written by hand because neither library has an extension point for it: PEFT writes a generic card for every
    method, and transformers' `push_to_hub` replaces the card `save_pretrained` wrote with the repository's (or a
    blank `library_name: transformers` one). Both methods are wrapped once; models without a Glider adapter take
    the original paths unchanged.
    """
    from peft import PeftModel

    if getattr(PeftModel, "_glider_hooks_installed", False):
        return
    original_card, original_push = PeftModel.create_or_update_model_card, PeftModel.push_to_hub

    @functools.wraps(original_card)
    def create_or_update_model_card(self: "PeftModel", output_dir: str) -> None:
        if not _glider_configs(self):
            return original_card(self, output_dir)
        from .card import write_model_card

        repo_id, tags = _PUSH_TARGET.get() or (None, None)
        write_model_card(self, output_dir, repo_id=repo_id, extra_tags=tags)

    @functools.wraps(original_push)
    def push(self: "PeftModel", repo_id: str, **kwargs: Any):
        if not _glider_configs(self):
            return original_push(self, repo_id, **kwargs)
        return push_to_hub(self, repo_id, **kwargs)

    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.push_to_hub = push
    PeftModel._glider_hooks_installed = True
