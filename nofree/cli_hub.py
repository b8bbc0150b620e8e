"""``nofree push``: upload an anchor set or a trained adapter to the Hugging Face Hub with a model
card (:func:`nofree.sharing.push_artifact`); ``hf-hub:ORG/NAME`` loads it back anywhere a folder
is taken (:mod:`nofree.hub`)."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its "
              "visibility).")
@click.option("--revision", "--branch", "revision", default=None, metavar="BRANCH",
              help="Upload to this branch (created from the default branch if missing). [default: main]")
@click.option("--message", "commit_message", default=None, help="Commit message. [default: Upload nofree KIND]")
@click.option("--include-training-state", is_flag=True, help="Also upload an adapter run's optimizer state "
              "(training/optimizer.safetensors; only needed to resume its training).")
@click.option("--dry-run", is_flag=True, help="Print the files and the model card that would be uploaded; "
              "upload nothing.")
def push(folder, repo_id, private, revision, commit_message, include_training_state, dry_run):
    """Upload FOLDER (an anchor set or a trained adapter) to the hub model repository ORG/NAME.

    A model card (README.md: what it is, the encoder/LM specs, sizes, recorded quality, how to load
    it) is uploaded with it, never written into FOLDER. Load it back with hf-hub:ORG/NAME (e.g.
    --anchors hf-hub:ORG/NAME). Needs `hf auth login` or HF_TOKEN, and the network.
    """
    from nofree.sharing import human_size, push_artifact

    plan = push_artifact(folder, repo_id, private=private, revision=revision, dry_run=dry_run,
                         commit_message=commit_message, include_training_state=include_training_state)
    where = f"https://huggingface.co/{plan.repo_id}" + (f" (branch {plan.revision})" if plan.revision else "")
    files = [*plan.files, *([("README.md", len(plan.card.encode("utf-8")))] if plan.card is not None else [])]
    if not dry_run:
        click.echo(f"pushed {plan.kind} {folder} to {where}: {len(files)} files, {human_size(plan.total_bytes)}"
                   + (f"; {plan.commit_url}" if plan.commit_url else ""))
        return
    click.echo(f"dry run: would upload {plan.kind} {folder} to {where}"
               + (" (private)" if plan.private else "") + f": {len(files)} files, {human_size(plan.total_bytes)}")
    for name, size in files:
        click.echo(f"  {name}  ({human_size(size)})" + ("  [model card]" if name == "README.md" and plan.card else ""))
    click.echo("--- README.md (model card) ---" if plan.card is not None else
               "--- README.md: the folder's own, uploaded as it is ---")
    if plan.card is not None:
        click.echo(plan.card)
