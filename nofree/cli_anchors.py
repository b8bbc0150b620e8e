"""``nofree anchors``: build, index, import, extend and inspect ASIF anchor sets (each command a
thin shell over one library function)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from nofree.cli_options import ANCHOR_DIR, PAIRS, format_option, strict_option
from nofree.core import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER

#: pairs per shard of `anchors build`: nofree.anchors.build.shards.DEFAULT_SHARD_SIZE (tests/test_cli.py
#: checks they agree), written here so that `--help` imports none of the anchors code
DEFAULT_SHARD_SIZE = 256


@click.group()
def anchors() -> None:
    """Build, inspect and extend ASIF anchor sets."""


def _pairs_options(f):
    """The options choosing and encoding the pairs of `anchors build` and `anchors extend`."""
    f = click.option("--limit", type=click.IntRange(min=1), help="Use only the first N pairs.")(f)
    f = click.option("--split", help="Use only pairs of this split (e.g. train).")(f)
    f = click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)(f)
    f = click.option("--device", default="cpu", show_default=True, help="torch device.")(f)
    return f


@anchors.command("build")
@click.option("--pairs", required=True, type=PAIRS,
              help="Pairs: JSONL (image, captions), CSV (image,caption), an image folder with .txt "
                   "sidecars, or webdataset shards (.tar / .tar.gz: a shard, a folder of them, a "
                   "quoted pattern 'shards/{00000..00099}.tar', several joined by '::').")
@click.option("--image-encoder", default=DEFAULT_IMAGE_ENCODER, show_default=True,
              help="Image encoder spec (`nofree models`); a bare hub id means hf-vision:ID, a folder local:.")
@click.option("--text-encoder", default=DEFAULT_TEXT_ENCODER, show_default=True,
              help="Text encoder spec; a bare hub id means st:ID (sentence-transformers), a folder local:.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing set at --out.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: a pool of Ray encoder actors (GPU actors when the "
                   "cluster has GPUs; --device is then ignored).")
@click.option("--workers", type=click.IntRange(min=1), help="Ray: encoder actors (default: one per "
              "GPU, else one per CPU).")
@click.option("--ray-address", help="Ray: an existing cluster (e.g. ray://head:10001 or auto); "
              "default: start a local Ray for this command.")
@click.option("--index", "index_factory", metavar="FACTORY", help="Also add a faiss search index, "
              "e.g. 'IVF4096,PQ32' (see `nofree anchors index`).")
@click.option("--dedupe", is_flag=True, help="Skip repeated pairs (an image listed twice, a caption "
              "its image already has); without it they are reported and each becomes an anchor.")
@click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULT_SHARD_SIZE, show_default=True,
              help="Pairs per resumable shard written to OUT.partial (an interrupted build keeps its "
                   "finished shards; a resume needs the same value).")
@_pairs_options
@strict_option
def anchors_build(pairs, image_encoder, text_encoder, out, overwrite, engine, workers, ray_address,
                  index_factory, dedupe, shard_size, limit, split, batch_size, device, strict):
    """Encode pairs into an anchor set (resumes an interrupted build)."""
    from nofree.anchors.build import build_anchor_set

    built = build_anchor_set(pairs, image_encoder=image_encoder, text_encoder=text_encoder, out=out,
                             split=split, limit=limit, batch_size=batch_size, device=device,
                             overwrite=overwrite, engine=engine, workers=workers,
                             ray_address=ray_address, index=index_factory, dedupe=dedupe, strict=strict,
                             shard_size=shard_size)
    skipped = built.meta.get("skipped_images", [])
    click.echo(f"wrote {out}: {len(built)} anchors ({built.image_dim}-d image, {built.text_dim}-d text)"
               + (f", {len(skipped)} unreadable image(s) or sample(s) skipped" if skipped else ""))
    if index_factory:
        click.echo(_index_line(built.meta["index"]))


def _index_line(entry: dict) -> str:
    """One line describing an anchor set's index entry (see nofree.anchors.search.index)."""
    if entry.get("search") != "index":
        return f"index        {entry['factory']}: not built, exact search ({entry.get('reason', '')})"
    sides = "; ".join(f"{m} recall@{s['k']} {s['recall_at_k']:.3f} (" + (f"nprobe {s['nprobe']}, " if s["nprobe"]
                      else "") + f"refine {s.get('refine', 2)}, {s['bytes'] / 2**20:.1f} MiB)"
                      for m, s in entry["sides"].items())
    return f"index        {entry['factory']} (center={entry['center']}): {sides}"


@anchors.command("index")
@click.argument("anchor_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--factory", required=True, help="faiss index_factory string, e.g. 'IVF4096,PQ32', "
              "'IVF1024,Flat', 'HNSW32'.")
@click.option("--nprobe", type=click.IntRange(min=1), help="IVF lists visited per query "
              "(default: enough to scan ~16·k anchors, at least 16).")
@click.option("--refine", type=click.IntRange(min=1), default=2, show_default=True,
              help="Candidates per kept anchor, re-scored exactly (higher recall, slower).")
@click.option("--recall-k", type=click.IntRange(min=1), help="k for the measured recall@k "
              "(default: ASIF's k = min(800, N)).")
def anchors_index(anchor_dir, factory, nprobe, refine, recall_k):
    """Add a faiss search index to an anchor set and measure its recall against exact search."""
    from nofree.anchors.search.index import add_index

    click.echo(_index_line(add_index(anchor_dir, factory, nprobe=nprobe, refine=refine, recall_k=recall_k)))


@anchors.command("import")
@click.option("--embeddings", required=True, type=click.Path(exists=True, path_type=Path),
              help="clip-retrieval output (img_emb/, text_emb/, metadata/) or parquet files with "
                   "image_embedding / text_embedding / caption columns.")
@click.option("--image-spec", required=True, help="The image encoder that made the image embeddings.")
@click.option("--text-spec", required=True, help="The text encoder that made the text embeddings.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing set at --out.")
@click.option("--index", "index_factory", metavar="FACTORY", help="Also add a faiss search index.")
def anchors_import(embeddings, image_spec, text_spec, out, overwrite, index_factory):
    """Import pre-computed embeddings (clip-retrieval, parquet) as an anchor set."""
    from nofree.anchors.build.import_embeddings import import_embeddings

    built = import_embeddings(embeddings, image_spec=image_spec, text_spec=text_spec, out=out,
                              overwrite=overwrite, index=index_factory)
    click.echo(f"wrote {out}: {len(built)} anchors ({built.image_dim}-d image, {built.text_dim}-d text)")


@anchors.command("extend")
@click.argument("anchor_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--pairs", required=True, type=PAIRS, help="Pairs to add (the forms anchors build takes).")
@click.option("--dedupe", is_flag=True, help="Skip repeated pairs (an image listed twice, a caption "
              "its image already has in the set or the pairs); without it they are reported and "
              "each becomes an anchor.")
@_pairs_options
def anchors_extend(anchor_dir, pairs, dedupe, limit, split, batch_size, device):
    """Add pairs to an existing anchor set, encoded with its own encoders."""
    from nofree.anchors.build import extend_anchor_set

    merged = extend_anchor_set(anchor_dir, pairs, split=split, limit=limit, batch_size=batch_size,
                               device=device, dedupe=dedupe)
    click.echo(f"extended {anchor_dir}: now {len(merged)} anchors")


@anchors.command("info")
@click.argument("anchor_dir", type=ANCHOR_DIR)
@format_option(help="table: the manifest summarised for reading ('text' is accepted too); json: the "
                    "manifest as indented JSON; jsonl: the manifest on one line.")
@click.option("--verify/--quick", default=True, show_default=True,
              help="--verify reads the whole set (sha256 of its files, every value finite); --quick "
                   "checks the manifest and the files' sizes only (for very large sets).")
def anchors_info(anchor_dir, fmt, verify):
    """Show an anchor set's manifest and check its files: encoders, counts, sources, skipped
    images, search index, checksums. ANCHOR_DIR: a folder or hf-hub:ORG/NAME[@REVISION]."""
    from nofree.anchors.anchor_set import AnchorSet, quick_check
    from nofree.hub import resolve_dir

    folder = resolve_dir(anchor_dir, what="anchor set")
    manifest, examples = quick_check(folder)  # the manifest as written (paths relative to the set)
    if verify:
        examples = AnchorSet.load(folder).captions[:3]
    if fmt != "table":
        click.echo(json.dumps(manifest, indent=2 if fmt == "json" else None))
        return
    click.echo(f"anchor set   {anchor_dir}  (format v{manifest['format_version']}, "
               f"nofree {manifest['nofree_version']})")
    click.echo(f"anchors      {manifest['n_anchors']}")
    click.echo(f"image side   {manifest['image_spec']}  ({manifest['image_dim']}-d)")
    click.echo(f"text side    {manifest['text_spec']}  ({manifest['text_dim']}-d)")
    for source in manifest.get("sources", []):
        click.echo(f"source       {source['pairs']}  split={source.get('split')}  "
                   f"{source['n_pairs']} pairs  sha256={source['pairs_sha256'][:12]}")
    skipped = manifest.get("skipped_images", [])
    click.echo(f"skipped      {len(skipped)} unreadable image(s)" + (f": {', '.join(skipped[:5])}"
                                                                     if skipped else ""))
    if manifest.get("image_root") is not None:
        click.echo(f"image root   {manifest['image_root']}  (image paths are relative to it, it to the set)")
    if manifest.get("index"):
        click.echo(_index_line(manifest["index"]))
    files = ", ".join(manifest.get("files", {}))
    click.echo("checksums    " + ("none recorded (a set from an older nofree; rebuild it to add them)"
                                  if not files else f"sha256 verified ({files})" if verify
                                  else f"sizes match ({files}; --verify also checks the sha256)"))
    for caption in examples:
        click.echo(f"e.g.         {caption}")
