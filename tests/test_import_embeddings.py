"""Importing pre-computed embeddings (clip-retrieval layout, parquet columns) as anchor sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from nofree.anchors.anchor_set import AnchorSet  # noqa: E402
from nofree.anchors.build.import_embeddings import import_embeddings  # noqa: E402
from nofree.cli import main  # noqa: E402
from nofree.core import DataError  # noqa: E402


def clip_retrieval_output(folder, parts=((0, 5), (1, 3)), seed=0):
    """clip-retrieval's layout: img_emb/img_emb_N.npy (float16), text_emb/, metadata/ parquet."""
    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for number, n in parts:
        image = rng.standard_normal((n, 6)).astype(np.float16)
        text = rng.standard_normal((n, 4)).astype(np.float16)
        captions = [f"caption {number}-{i}" for i in range(n)]
        np.save(folder / "img_emb" / f"img_emb_{number}.npy", image)
        np.save(folder / "text_emb" / f"text_emb_{number}.npy", text)
        pq.write_table(pa.table({"image_path": [f"/data/{number}/{i}.jpg" for i in range(n)],
                                 "caption": captions, "url": ["http://x"] * n}),
                       folder / "metadata" / f"metadata_{number}.parquet")
        rows += list(zip(image.astype(np.float32), text.astype(np.float32), captions))
    return rows


def unit(x):
    return torch.nn.functional.normalize(torch.as_tensor(np.stack(x)), dim=1)


def test_clip_retrieval_round_trip(tmp_path):
    rows = clip_retrieval_output(tmp_path / "emb", parts=((2, 3), (0, 5), (10, 2)))  # numeric order
    built = import_embeddings(tmp_path / "emb", image_spec="hf-clip:openai/clip-vit-base-patch32",
                              text_spec="hf-clip:openai/clip-vit-base-patch32", out=tmp_path / "set")
    loaded = AnchorSet.load(tmp_path / "set")
    order = sorted(range(len(rows)), key=lambda i: (int(rows[i][2].split()[1].split("-")[0]), i))
    torch.testing.assert_close(loaded.image, unit([rows[i][0] for i in order]))
    torch.testing.assert_close(loaded.text, unit([rows[i][1] for i in order]))
    assert loaded.captions == tuple(rows[i][2] for i in order) == built.captions
    assert loaded.images[0] == "/data/0/0.jpg" and loaded.image_spec == "hf-clip:openai/clip-vit-base-patch32"


def test_bad_rows_are_skipped_and_listed_and_mismatches_are_errors(tmp_path):
    clip_retrieval_output(tmp_path / "emb")
    image = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    image[2, 0] = np.nan
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", image)
    table = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_1.parquet")
    pq.write_table(table.set_column(1, "caption", pa.array(["ok", None, "  "])),
                   tmp_path / "emb" / "metadata" / "metadata_1.parquet")
    built = import_embeddings(tmp_path / "emb", image_spec="tiny:image-d6-s0", text_spec="tiny:text-d4-s0",
                              out=tmp_path / "set")
    assert len(built) == 8 - 3
    assert [s.rsplit(" ", 3)[-3:] for s in built.meta["skipped_images"]] == \
        [["0", "row", "2"], ["1", "row", "1"], ["1", "row", "2"]]
    np.save(tmp_path / "emb" / "text_emb" / "text_emb_1.npy", np.zeros((2, 4), np.float16))
    with pytest.raises(DataError, match="line up"):
        import_embeddings(tmp_path / "emb", image_spec="a:b", text_spec="a:c", out=tmp_path / "other")


def test_parquet_embedding_columns_via_the_cli(tmp_path):
    rng = np.random.default_rng(1)
    image, text = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    pq.write_table(pa.table({"image_embedding": list(image), "text_embedding": list(text),
                             "caption": [f"c{i}" for i in range(4)]}), tmp_path / "emb.parquet")
    result = CliRunner().invoke(main, ["anchors", "import", "--embeddings", str(tmp_path / "emb.parquet"),
                                       "--image-spec", "tiny:image-d5-s0", "--text-spec", "tiny:text-d3-s0",
                                       "--out", str(tmp_path / "set")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "4 anchors" in result.output
    loaded = AnchorSet.load(tmp_path / "set")
    torch.testing.assert_close(loaded.image, unit(list(image.astype(np.float32))))
    assert loaded.captions == ("c0", "c1", "c2", "c3") and loaded.images == ()
