"""Tiny deterministic models and synthetic data for tests and examples: no downloads, built from configs.

Everything here is fast on a CPU and offline. The hub backends are exercised by saving these
config-built models to a folder and loading them through the same code path a user's model
takes (``local:DIR``).
"""
from __future__ import annotations

from pathlib import Path

import torch

# --- tiny language models ---

#: Words the tiny LM tokenizer knows as whole tokens (everything else falls back to bytes).
TINY_WORDS = ("a", "the", "dog", "cat", "on", "in", "beach", "sofa", "red", "bus", "man",
              "riding", "with", "of", "is", "and", "picture", "photo", "an", "image")


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2's convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    shifted, extra = list(keep), 0
    for byte in range(256):
        if byte not in keep:
            keep.append(byte)
            shifted.append(256 + extra)
            extra += 1
    return [chr(code) for _, code in sorted(zip(keep, shifted))]


def make_tiny_tokenizer(directory: str | Path | None = None):
    """A byte-level BPE GPT-2 tokenizer with a ~300-token vocabulary, built offline.

    Merges spell a few common words (``TINY_WORDS``, with and without a leading space) as
    single tokens so tests can name them; ``<|endoftext|>`` is bos/eos/pad.
    """
    from transformers import GPT2Tokenizer

    alphabet = _byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        for piece in ("Ġ" + word, word):
            current = piece[0]
            for ch in piece[1:]:
                merged = current + ch
                if merged not in vocab:
                    merges.append((current, ch))
                    vocab[merged] = len(vocab)
                current = merged
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>",
                              bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                              pad_token="<|endoftext|>")
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def make_tiny_lm_dir(directory: str | Path, *, family: str = "gpt2", seed: int = 0,
                     hidden: int = 32, layers: int = 2) -> Path:
    """Save a randomly initialised tiny causal LM (``gpt2`` or ``llama``) and its tokenizer.

    Load it with ``nofree.load_lm(f"local:{directory}")``. Weights depend only on ``seed``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = make_tiny_tokenizer(directory)
    eos = tokenizer.eos_token_id
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=hidden, n_layer=layers,
                            n_head=2, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        model = GPT2LMHeadModel(config)
    elif family == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=128, bos_token_id=eos, eos_token_id=eos,
                             pad_token_id=eos, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"family must be 'gpt2' or 'llama', got {family!r}")
    model.save_pretrained(str(directory))
    return directory


def tiny_lm(directory: str | Path, *, family: str = "gpt2", seed: int = 0):
    """A loaded :class:`~nofree.lm.hf.HFLanguageModel` over a fresh tiny model in ``directory``."""
    from nofree.lm.hf import load_hf_lm

    make_tiny_lm_dir(directory, family=family, seed=seed)
    return load_hf_lm(directory, spec=f"local:{directory}")


# --- tiny encoders ---

from nofree.encoders.base import FrozenEncoder  # noqa: E402  (light: torch + nofree.core)

#: Words the tiny WordPiece vocabulary knows (anything else becomes ``[UNK]``).
TINY_ENCODER_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "is", "cat", "kitten", "dog", "sofa",
    "couch", "red", "blue", "bus", "car", "man", "woman", "riding", "sitting", "photo", "picture",
    "giraffe", "pizza", "table", "street", "beach", "two", "##s", "##ing")


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % (2**63))


def _image_grid(images, side: int = 8) -> torch.Tensor:
    """PIL images -> ``(n, 3, side, side)`` float32 in [-1, 1] (bilinear thumbnail)."""
    import numpy as np
    from PIL import Image

    thumbs = [np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BILINEAR),
                         dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(thumbs)).permute(0, 3, 1, 2) / 127.5 - 1.0


class TinyImageEncoder(FrozenEncoder):
    """A deterministic image encoder: an 8x8 RGB thumbnail through fixed random projections.

    ``encode`` -> ``(N, dim)`` (the whole thumbnail, 192 values, projected); ``encode_tokens`` ->
    ``(N, 16, dim)`` (the 4x4 grid of 2x2 cells, each projected). Weights depend only on
    ``seed``; images that look alike get nearby embeddings.
    """

    def __init__(self, dim: int = 16, seed: int = 0, *, device=None) -> None:
        from torch import nn

        gen = _seeded(seed)
        module = nn.ModuleDict({"pool": nn.Linear(192, dim), "cell": nn.Linear(12, dim)})
        with torch.no_grad():
            for layer in module.values():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen)
                                   / layer.in_features ** 0.5)
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=gen))
        device = torch.device("cpu" if device is None else device)
        super().__init__(spec=f"tiny:image-d{dim}-s{seed}", modality="image",
                         module=module.to(device), device=device, embed_dim=dim, token_dim=dim)

    def _embed(self, items):
        return self.module["pool"](_image_grid(items).to(self.device).flatten(1))

    def _tokens(self, items):
        grid = _image_grid(items).to(self.device)  # (n, 3, 8, 8)
        n = grid.shape[0]
        cells = grid.reshape(n, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, 16, 12)
        return self.module["cell"](cells), torch.ones(n, 16, dtype=torch.bool)


class TinyTextEncoder(FrozenEncoder):
    """A deterministic bag-of-words text encoder: each lower-cased word maps to a fixed random
    vector (seeded by a CRC32 of the word and ``seed``); a text is the sum of its words.

    ``encode`` -> ``(N, dim)``; ``encode_tokens`` -> ``(N, T, dim)``, one token per word, padded.
    Texts sharing words are near each other; an empty text is the single word ``<empty>``.
    """

    def __init__(self, dim: int = 8, seed: int = 0, *, device=None) -> None:
        device = torch.device("cpu" if device is None else device)
        super().__init__(spec=f"tiny:text-d{dim}-s{seed}", modality="text", module=None,
                         device=device, embed_dim=dim, token_dim=dim)
        self.seed = seed
        self._vectors: dict[str, torch.Tensor] = {}

    def word_vector(self, word: str) -> torch.Tensor:
        """``(dim,)`` the fixed vector of one word."""
        import zlib

        if word not in self._vectors:
            key = zlib.crc32(word.encode("utf-8")) * 1_000_003 + self.seed
            self._vectors[word] = torch.randn(self.embed_dim, generator=_seeded(key))
        return self._vectors[word]

    @staticmethod
    def words(text: str) -> list[str]:
        import re

        return re.findall(r"[a-z0-9]+", text.lower()) or ["<empty>"]

    def _tokens(self, items):
        rows = [torch.stack([self.word_vector(w) for w in self.words(t)]) for t in items]
        length = max(r.shape[0] for r in rows)
        tokens = torch.zeros(len(rows), length, self.embed_dim)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, :len(r)], mask[i, :len(r)] = r, True
        return tokens, mask

    def _embed(self, items):
        tokens, _ = self._tokens(items)
        return tokens.sum(1)


def make_tiny_bert_tokenizer(directory: str | Path):
    """A WordPiece (BERT) tokenizer over :data:`TINY_ENCODER_WORDS`, written to ``directory``."""
    from transformers import BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_ENCODER_WORDS])
                     + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(vocab))
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def make_tiny_hf_text(directory: str | Path, *, seed: int = 0, hidden: int = 16) -> Path:
    """Save a random tiny ``BertModel`` + WordPiece tokenizer; load with ``local:DIR`` or
    ``hf-text:DIR``. Weights depend only on ``seed``."""
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    tokenizer = make_tiny_bert_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(str(directory))
    return directory


def make_tiny_st(directory: str | Path, *, pooling: str = "cls", seed: int = 0,
                 hidden: int = 16) -> Path:
    """Save a tiny sentence-transformers model: the random ``BertModel`` of
    :func:`make_tiny_hf_text` + a ``pooling`` module ('cls', 'mean', 'max', 'lasttoken') +
    Normalize, listed in ``directory/modules.json``; load with ``st:DIR``."""
    import tempfile

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as scratch:
        bert = make_tiny_hf_text(Path(scratch) / "bert", seed=seed, hidden=hidden)
        transformer = Transformer(str(bert), max_seq_length=32)
        pool = Pooling(hidden, pooling_mode=pooling)
        SentenceTransformer(modules=[transformer, pool, Normalize()], device="cpu").save(str(directory))
    return directory


def make_tiny_hf_vision(directory: str | Path, *, arch: str = "vit", seed: int = 0,
                        hidden: int = 16) -> Path:
    """Save a random tiny vision model (``arch`` 'vit': ViTModel on 32x32 images, 8x8 patches;
    'resnet': a two-stage ResNetModel) with its image processor; load with ``local:DIR`` or
    ``hf-vision:DIR``."""
    from transformers import (ConvNextImageProcessor, ResNetConfig, ResNetModel, ViTConfig,
                              ViTImageProcessor, ViTModel)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if arch == "vit":
        model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=hidden,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=2 * hidden))
        processor = ViTImageProcessor(size={"height": 32, "width": 32})
    elif arch == "resnet":
        model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, hidden], depths=[1, 1],
                                         layer_type="basic"))
        processor = ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0)
    else:
        raise ValueError(f"arch must be 'vit' or 'resnet', got {arch!r}")
    model.save_pretrained(str(directory))
    processor.save_pretrained(str(directory))
    return directory


def make_tiny_hf_clip(directory: str | Path, *, seed: int = 0, hidden: int = 16,
                      projection_dim: int = 12) -> Path:
    """Save a random tiny ``CLIPModel`` (32x32 images, WordPiece text) with its tokenizer and
    image processor; load with ``local:DIR`` or ``hf-clip:DIR`` and a ``modality``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = Path(directory)
    tokenizer = make_tiny_bert_tokenizer(directory)
    torch.manual_seed(seed)
    layer = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                 num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=32,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id, **layer),
        vision_config=dict(image_size=32, patch_size=8, **layer), projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(str(directory))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(directory))
    return directory


#: open_clip ``model_cfg`` of :func:`make_tiny_open_clip` (32x32 images, 16-token context)
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def make_tiny_open_clip(directory: str | Path, *, seed: int = 0) -> Path:
    """Save a random tiny open_clip CLIP (``open_clip_config.json`` + safetensors weights); load
    with ``local:DIR`` or ``open_clip:local-dir:DIR`` and a ``modality``."""
    import json

    from open_clip.model import CLIP
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(**TINY_OPEN_CLIP_CFG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))
    config = {"model_cfg": TINY_OPEN_CLIP_CFG,
              "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return directory


# --- synthetic webdataset ---

_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 50),
            "black": (20, 20, 20), "white": (240, 240, 240), "purple": (140, 50, 170), "orange": (240, 140, 30)}
_SHAPES = ("circle", "square", "triangle", "stripe")


def synthetic_sample(i: int, size: int = 32):
    """Sample ``i`` of a synthetic image–caption set: a PIL image (a coloured shape on a coloured
    background) and its caption ("a red circle on a blue background"); deterministic in ``i``."""
    from PIL import Image, ImageDraw

    names = list(_COLOURS)
    fg, bg = names[i % len(names)], names[(i // len(names) + 1 + i % 3) % len(names)]
    if bg == fg:
        bg = names[(names.index(fg) + 3) % len(names)]
    shape = _SHAPES[(i // 7) % len(_SHAPES)]
    image = Image.new("RGB", (size, size), _COLOURS[bg])
    draw = ImageDraw.Draw(image)
    lo, hi = size // 5 + i % 3, size - size // 5 - (i // 3) % 3
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=_COLOURS[fg])
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=_COLOURS[fg])
    elif shape == "triangle":
        draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=_COLOURS[fg])
    else:
        draw.rectangle((0, lo, size, (lo + hi) // 2), fill=_COLOURS[fg])
    return image, f"a {fg} {shape} on a {bg} background, picture {i}"


def make_webdataset(folder: str | Path, n_samples: int, *, per_shard: int = 100, size: int = 32,
                     caption_in: str = "txt") -> list[Path]:
    """Write ``n_samples`` synthetic samples as img2dataset-style webdataset shards.

    ``folder/00000.tar``, ``00001.tar``, ...; each sample ``KEY.jpg`` + ``KEY.json`` (``key``,
    ``caption``, ``status``) and, when ``caption_in == "txt"``, ``KEY.txt``. Returns the shards.
    """
    import io
    import json
    import tarfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard_index, start in enumerate(range(0, n_samples, per_shard)):
        path = folder / f"{shard_index:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, n_samples)):
                image, caption = synthetic_sample(i, size)
                jpeg = io.BytesIO()
                image.save(jpeg, format="JPEG", quality=90)
                key = f"{shard_index:05d}{i:06d}"
                members = {"jpg": jpeg.getvalue(),
                           "json": json.dumps({"key": key, "caption": caption, "status": "success"}).encode()}
                if caption_in == "txt":
                    members["txt"] = caption.encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards
