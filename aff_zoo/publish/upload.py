"""Upload a checkpoint folder to the Hub: validated against the registry first, one commit."""
from pathlib import Path
from typing import Optional

from ..models.pretrained import _endpoint
from ..models.weights import Weights, get_weights
from ..utils import git_commit
from .folders import validate_folder


def publish_plan(folder, record: Weights, repo_id: Optional[str] = None):
    """``(repo_id, commit message, [CommitOperationAdd])``: exactly what ``publish`` sends."""
    from huggingface_hub import CommitOperationAdd
    folder = Path(folder)
    validate_folder(folder, record)
    files = sorted(p for p in folder.rglob('*') if p.is_file() and not any(s.startswith('.') for s in p.parts[
        len(folder.parts):]))
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    message = (f'{record.name}: weights sha256 {record.sha256[:12]}, top-1 {record.top1}; '
               f'aff_zoo code at git commit {git_commit()}')
    return repo_id or record.hf_hub_id, message, ops


def publish(folder, record: Optional[Weights] = None, repo_id: Optional[str] = None, endpoint: Optional[str] = None,
            private: bool = False, token: Optional[str] = None, dry_run: bool = False, log=print):
    """Validate ``folder`` against the registry, then ``create_repo(exist_ok=True)`` and one commit holding
    the plan's operations (what ``upload_folder`` does, with the listed files exactly). ``dry_run``: list
    the repo, the commit message and each operation's size and sha256, upload nothing."""
    folder = Path(folder)
    record = record or get_weights(folder.name)
    repo_id, message, ops = publish_plan(folder, record, repo_id)
    endpoint = endpoint or _endpoint()
    log(f'{"[dry-run] " if dry_run else ""}repo {repo_id} on {endpoint} ({"private" if private else "public"})')
    log(f'commit message: {message}')
    for op in ops:
        log(f'  add {op.path_in_repo:<24} {op.upload_info.size:>12} bytes  sha256 {op.upload_info.sha256.hex()}')
    if dry_run:
        log('[dry-run] nothing uploaded')
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations=ops, commit_message=message, repo_type='model')
    except HfHubHTTPError as e:
        status = getattr(getattr(e, 'response', None), 'status_code', None)
        hint = {401: 'the token is missing or invalid (HF_TOKEN, `hf auth login`, or --token)',
                403: f'the token may not write to {repo_id}',
                404: f'{endpoint} has no write API here (a read-only mirror?)',
                405: f'{endpoint} has no write API here (a read-only mirror?)'}.get(status, 'see the error above')
        raise RuntimeError(f'Publishing {folder} to {repo_id} on {endpoint} failed (HTTP {status}): {hint}.\n{e}') \
            from None
    log(f'published: {info.commit_url}')
    return info
