"""Fuzz targets: every reader lowbit has, each fed one mutated file inside an otherwise valid
output. The only allowed outcomes are success or LowbitError; anything else (another exception, a
hang past TIME_LIMIT_S, memory growth past MEM_LIMIT_MB) is a crash.

The valid base outputs come from a tiny real model (transformers' LlamaForCausalLM, 2 layers,
hidden 64, a 259-token byte-level BPE tokenizer), quantized by lowbit and written by lowbit's own
writers, so every reader sees the layout it was written for, mutated.

    target             mutated file                   reader
    gguf               model.gguf                     lowbit.models.load_model (GGUF path: gguf-py + transformers)
    gguf_tensors       model.gguf                     export.gguf.reader.read_tensors / gguf_metadata
    gguf_stream        model.gguf                     models.gguf_source.GGUFSource (streaming), every tensor read
    safetensors        native model.safetensors       export.native.read (hash check off)
    native_manifest    native lowbit.json             export.native.read
    imatrix            imatrix.gguf / imatrix.dat     calibration.imatrix.Imatrix.load
    recipe             recipe.json                    recipe.get_recipe
    gptq_config        GPTQ config.json               export.gptq.read (no lowbit manifest: a peer's file)
    ct_config          compressed-tensors config.json export.compressed_tensors.read (likewise)
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

TIME_LIMIT_S = 20
FOREIGN = ("lowbit_manifest.json",)   # GPTQ / compressed-tensors inputs as another tool wrote them
MEM_LIMIT_MB = 2048
WORDS = 259              # the tokenizer's size


def _tokenizer(dst: Path):
    """A byte-level BPE tokenizer (the kind GGUF's gpt2 vocabulary holds): 256 byte tokens + 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(sorted(byte_chars))}}
    tk = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(dst)
    return tok


def build_bases(root: Path) -> dict[str, Path]:
    """Write the valid outputs every target mutates. -> {name: path}."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit import api
    from lowbit.calibration.imatrix import Imatrix
    from lowbit.models import LoadedModel
    root = Path(root)
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=WORDS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(src)
    tok = _tokenizer(src)
    out = {}
    for fmt, recipe in (("native", "w4g16-rtn"), ("gptq", "w4g16-sym-rtn"), ("compressed-tensors", "w4g16-rtn"),
                        ("gguf", "q8_0")):
        m = copy.deepcopy(model)
        rep = api.quantize(m, recipe, progress=False)
        lm = LoadedModel(m, tok, src, str(src), None)
        path = root / ("model.gguf" if fmt == "gguf" else fmt)
        if not path.exists():
            api.export(lm, rep, path, fmt)
        out[fmt] = path
    im = Imatrix()
    im.add("blk.0.attn_q.weight", __import__("numpy").arange(32, dtype="float64"), 4)
    im.chunk_count = 1
    im.save(root / "imatrix.gguf")
    im.save(root / "imatrix.dat")
    get = __import__("lowbit.recipe", fromlist=["get_recipe"]).get_recipe
    get("w4g128-gptq-actorder").save(root / "recipe.json")
    return out


def _with_file(base: Path, rel: str, data: bytes, work: Path, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the directory `base` (hard links: cheap) with `rel` replaced by `data` and the
    files in `drop` removed."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(base, work, copy_function=_link)
    for d in drop:
        (work / d).unlink()
    (work / rel).unlink()
    (work / rel).write_bytes(data)
    return work


def _link(src, dst):
    import os
    os.link(src, dst)


def _file(work: Path, name: str, data: bytes) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    p = work / name
    p.write_bytes(data)
    return p


def run_target(name: str, data: bytes, root: Path, work: Path) -> None:
    """Feed `data` to target `name`; LowbitError and success return, anything else raises."""
    from lowbit.errors import LowbitError
    root, work = Path(root), Path(work)
    try:
        if name == "gguf":
            from lowbit.models import load_model
            load_model(_file(work, "m.gguf", data))
        elif name == "gguf_tensors":
            from lowbit.export.gguf.reader import gguf_metadata, read_tensors
            p = _file(work, "t.gguf", data)
            read_tensors(p)
            gguf_metadata(p)
        elif name == "gguf_stream":
            from transformers import AutoConfig

            from lowbit.models.gguf_source import GGUFSource
            src = GGUFSource(_file(work, "s.gguf", data), AutoConfig.from_pretrained(root / "src"))
            for k in src.keys():
                src.read(k)
        elif name == "safetensors":
            from lowbit.export import native
            native.read(_with_file(root / "native", "model.safetensors", data, work / "d"), verify_files=False)
        elif name == "native_manifest":
            from lowbit.export import native
            native.read(_with_file(root / "native", "lowbit.json", data, work / "d"), verify_files=False)
        elif name in ("imatrix", "imatrix_dat"):
            from lowbit.calibration.imatrix import Imatrix
            Imatrix.load(_file(work, "im.gguf" if name == "imatrix" else "im.dat", data))
        elif name == "recipe":
            from lowbit.recipe import get_recipe
            get_recipe(_file(work, "recipe.json", data))
        elif name == "gptq_config":
            from lowbit.export import gptq
            gptq.read(_with_file(root / "gptq", "config.json", data, work / "d", FOREIGN))
        elif name == "ct_config":
            from lowbit.export import compressed_tensors
            compressed_tensors.read(_with_file(root / "compressed-tensors", "config.json", data, work / "d",
                                               FOREIGN))
        else:
            raise KeyError(name)
    except LowbitError:
        return


SEED_FILES = {"gguf": "model.gguf", "gguf_tensors": "model.gguf", "gguf_stream": "model.gguf", "safetensors": "native/model.safetensors",
              "native_manifest": "native/lowbit.json", "imatrix": "imatrix.gguf", "imatrix_dat": "imatrix.dat",
              "recipe": "recipe.json", "gptq_config": "gptq/config.json",
              "ct_config": "compressed-tensors/config.json"}
TARGETS = tuple(SEED_FILES)


def seed(name: str, root: Path) -> bytes:
    return (Path(root) / SEED_FILES[name]).read_bytes()
