"""Streaming quantization (lowbit.streaming): the bundled model's fp32 safetensors directory, or
its GGUF itself, read one tensor at a time, gives the same bytes as the in-memory path (load,
quantize, export); malformed safetensors headers and GGUF tensor tables are refused against the
file size before anything is allocated."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from lowbit import api
from lowbit.errors import LowbitError
from lowbit.models import load_model
from lowbit.models.shards import SafetensorsSource, read_header
from lowbit.streaming import quantize_streaming



def digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir())}


def _same_bytes(src, recipe, tmp_path, shard):
    s = quantize_streaming(src, recipe, tmp_path / "stream", max_shard_size=shard)
    lm = load_model(src)
    rep = api.quantize(lm.model, recipe, progress=False)
    m = api.export(lm, rep, tmp_path / "mem", "native", max_shard_size=shard)
    assert digests(s) == digests(m)
    return s


@pytest.mark.model
@pytest.mark.parametrize("symmetric", [False, True])
def test_stream_block0_same_bytes_as_in_memory(smollm2, tmp_path, symmetric):
    """Asymmetric and symmetric grids (a symmetric int grid stores its fixed zero point too:
    the planner once left it out, and every symmetric data-free stream failed)."""
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Recipe, Rule
    r = Recipe(name="b0", rules=[Rule(r"model\.layers\.0\.", int_scheme(4, 128, symmetric), "rtn")])
    out = _same_bytes(smollm2.path, r, tmp_path, "60MB")        # two shards and an index
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.model
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "awq", "gguf", "onnx"])
def test_stream_into_other_formats_same_bytes_as_in_memory(smollm2, tmp_path, fmt):
    """--stream --format F: streamed native, read back and written by F's writer: every file is
    byte-identical to load + quantize + export F (the manifest's per-layer method included), and
    neither the native spool nor the resume state is left beside the output."""
    from lowbit.cli import main
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Recipe, Rule
    r = Recipe(name="b0", rules=[Rule(r"model\.layers\.0\.", int_scheme(4, 64), "rtn")])   # 576 = 9 x 64
    r.save(tmp_path / "b0.json")
    out = tmp_path / ("cli.gguf" if fmt == "gguf" else "cli")
    assert main(["quantize", str(smollm2.path), "--recipe", str(tmp_path / "b0.json"), "--stream",
                 "--format", fmt, "--out", str(out)]) == 0
    lm = load_model(smollm2.path)
    rep = api.quantize(lm.model, r, progress=False)
    m = api.export(lm, rep, tmp_path / ("mem.gguf" if fmt == "gguf" else "mem"), fmt)
    left = ["b0.json", out.name, m.name]
    if fmt == "gguf":                     # one file (general.name from the source's directory) + sidecar
        assert out.read_bytes() == m.read_bytes()
        man, ref = (json.loads(Path(f"{p}.lowbit.json").read_text()) for p in (out, m))
        assert list(man.pop("files").values()) == list(ref.pop("files").values())   # keyed by file name
        assert man == ref
        left += [f"{out.name}.lowbit.json", f"{m.name}.lowbit.json"]
    else:
        assert digests(out) == digests(m)
        man = json.loads(next(p for p in out.iterdir() if p.name.endswith("manifest.json")).read_text())
    assert {row["method"] for row in man["layers"].values()} == {"rtn"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(left)


@pytest.mark.slow
@pytest.mark.model
def test_stream_whole_model_same_bytes_cli(smollm2, tmp_path):
    from lowbit.cli import main
    assert main(["quantize", str(smollm2.path), "--recipe", "w4g128-rtn", "--stream", "--out",
                 str(tmp_path / "cli")]) == 0
    lm = load_model(smollm2.path)
    rep = api.quantize(lm.model, "w4g128-rtn", progress=False)
    m = api.export(lm, rep, tmp_path / "mem", "native", max_shard_size="1GB")
    assert digests(tmp_path / "cli") == digests(m)


@pytest.mark.model
def test_stream_quantized_tied_lm_head_same_bytes(smollm2, tmp_path):
    """SmolLM2's lm_head is its embedding (the checkpoint holds the tensor once, as
    model.embed_tokens.weight): quantized by a rule of its own and streamed, it is read under the
    embedding's key (streaming.weight_key); it was looked for as lm_head.weight and refused."""
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Recipe, Rule
    r = Recipe(name="head", rules=[Rule(r"model\.layers\.0\.", int_scheme(4, 64)), Rule(r"^lm_head$", int_scheme(4, 64))],
               ignore=[])
    out = _same_bytes(smollm2.path, r, tmp_path, None)
    assert "lm_head" in json.loads((out / "lowbit.json").read_text())["layers"]


def _rotated(method: str, **rotate):
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Recipe, Rule
    return Recipe(name=f"rot-{method}", rules=[Rule(r"model\.layers\.0\.", int_scheme(3, 64), method)],
                  transforms=[{"name": "rotate", "seed": 3, **rotate}],
                  calibration={"n_samples": 2, "seq_len": 64, "batch_size": 1})


@pytest.mark.slow
@pytest.mark.model
def test_stream_rotated_rtn_same_bytes_as_in_memory(smollm2, tmp_path):
    """A Hadamard rotation streamed (transforms/rotate.py RotatedSource: each block rotated as
    it is read, the embedding, final norm and the untied lm_head as rotate_model leaves them):
    the same bytes as rotate_model + quantize + export, config and manifest included."""
    out = _same_bytes(smollm2.path, _rotated("rtn"), tmp_path, "60MB")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    man = json.loads((out / "lowbit.json").read_text())
    assert any(n.startswith("transform rotate: seed=3") for n in man["notes"])


@pytest.mark.model
def test_stream_rotated_gptq_same_bytes_as_in_memory(smollm2, windows, tmp_path):
    r = _rotated("gptq")
    mem = _in_memory(smollm2.path, r, tmp_path / "mem", "60MB", windows)
    s = quantize_streaming(smollm2.path, r, tmp_path / "stream", max_shard_size="60MB", tokens=windows)
    assert digests(s) == digests(mem)


@pytest.mark.model
def test_stream_refuses_what_it_cannot_stream(smollm2, tmp_path):
    with pytest.raises(LowbitError, match="--format bnb is not streamed"):
        quantize_streaming(smollm2.path, "w4g128-rtn", tmp_path / "o", format="bnb")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LowbitError, match="online_down"):
        quantize_streaming(smollm2.path, _rotated("rtn", online_down=True), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _gptq_blocks(blocks: str):
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Recipe, Rule
    return Recipe(name="gptq-" + blocks, rules=[Rule(rf"model\.layers\.[{blocks}]\.", int_scheme(4, 128), "gptq")],
                  calibration={"n_samples": 2, "seq_len": 64, "batch_size": 1})


def _in_memory(src, recipe, out, shard, tokens=None, **calib):
    lm = load_model(src)
    rep = api.quantize(lm.model, recipe, tokenizer=lm.tokenizer, tokens=tokens, progress=False,
                       calibration=calib or None)
    return api.export(lm, rep, out, "native", max_shard_size=shard)


@pytest.fixture(scope="module")
def windows(smollm2):
    """The recipe's calibration windows, drawn once (tokenizing the text is most of a small run)."""
    from lowbit.calibration import CalibrationConfig, calibration_tokens
    return calibration_tokens(smollm2.tokenizer, CalibrationConfig.from_dict(_gptq_blocks("0").calibration))


class Killed(Exception):
    pass


def _killed_after_block_1_then_resumed(src, recipe, out: Path, expect_fp_acts: bool = False, **kw):
    """A streamed run stopped (an exception from its log) once block 1's state is saved, then the
    same call again. -> (the state the stopped run left, the restart's log, its output)."""
    def die_after_first(msg):
        if msg.startswith("block 1/"):
            raise Killed
    with pytest.raises(Killed):
        quantize_streaming(src, recipe, out, log=die_after_first, **kw)
    state_dir = out.parent / f".{out.name}.resume"
    state = json.loads((state_dir / "state.json").read_text())
    if expect_fp_acts:
        assert (state_dir / state["fp_acts"]).is_file()
    logs = []
    return state, logs, quantize_streaming(src, recipe, out, log=logs.append, **kw)


@pytest.mark.model
def test_stream_gptq_same_bytes_as_in_memory_and_resumes(smollm2, windows, tmp_path):
    """GPTQ streamed one decoder block at a time (streaming_calibrated.py) writes the in-memory
    path's bytes, in several shards; a run that dies after its first block, restarted with the
    same arguments, resumes from the state (the second block only) and writes the same bytes."""
    r = _gptq_blocks("01")
    mem = _in_memory(smollm2.path, r, tmp_path / "mem", "60MB", windows)
    s = quantize_streaming(smollm2.path, r, tmp_path / "stream", max_shard_size="60MB", tokens=windows)
    assert digests(s) == digests(mem)
    assert len(list(Path(s).glob("model-*.safetensors"))) > 1
    assert not (tmp_path / ".stream.resume").exists()          # the state is dropped at the end
    state, logs, again = _killed_after_block_1_then_resumed(smollm2.path, r, tmp_path / "again",
                                                            max_shard_size="60MB", tokens=windows)
    assert state["blocks_done"] == 1
    assert any(m.startswith("resuming after block 1/2") for m in logs)
    assert not any(m.startswith("block 1/") for m in logs) and any(m.startswith("block 2/2") for m in logs)
    assert digests(again) == digests(mem)


def _signround_blocks(blocks: str):
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Recipe, Rule
    return Recipe(name="signround-" + blocks, rules=[Rule(rf"model\.layers\.[{blocks}]\.", int_scheme(3, 64),
                                                         "signround", {"iters": 6, "init": "gptq"})],
                  calibration={"n_samples": 2, "seq_len": 64, "batch_size": 1})


@pytest.mark.model
def test_stream_signround_same_bytes_as_in_memory_and_resumes(smollm2, windows, tmp_path):
    """SignRound (a block-level method: it carries the float model's block inputs beside the
    quantized path's) streamed block by block writes the in-memory path's bytes; killed after
    its first block, the restart takes both sets of hidden states from the state and writes the
    same bytes again."""
    r = _signround_blocks("01")
    mem = _in_memory(smollm2.path, r, tmp_path / "mem", None, windows)
    man = json.loads((mem / "lowbit.json").read_text())
    assert any("signround_loss_best" in row["info"] for row in man["layers"].values())
    state, logs, again = _killed_after_block_1_then_resumed(smollm2.path, r, tmp_path / "s", tokens=windows,
                                                            expect_fp_acts=True)
    assert state["blocks_done"] == 1 and state["fp_acts"] == "fpacts-0000.safetensors"
    assert any(m.startswith("resuming after block 1/2") for m in logs)
    assert not any(m.startswith("block 1/") for m in logs)
    assert digests(again) == digests(mem)


@pytest.mark.model
@pytest.mark.parametrize("preset", ["w8a8-static",
                                    pytest.param("w8a8-static-percentile-gptq", marks=pytest.mark.slow)])
def test_stream_static_input_activations_same_bytes_as_in_memory(smollm2, windows, tmp_path, preset):
    """Static input scales (W8A8) streamed: a second pass block by block through the quantized
    blocks (streaming_activations.py: re-quantized from the source for rtn, read from the resume
    state's spool for gptq) gives every layer the scale the whole-model pass gives it, the output
    head included (its input: the final norm of the last block's output; tied to the embedding
    here), so the manifests (which hold them) and every other file are the same bytes."""
    from lowbit.recipe import Recipe, Rule, get_recipe
    base = get_recipe(preset)
    r = Recipe(preset, [Rule(pattern, x.scheme, x.method, x.method_args, x.input_activations)
                        for x in base.rules for pattern in (r"model\.layers\.[01]\.", r"^lm_head$")],
               calibration={"n_samples": 2, "seq_len": 64, "batch_size": 1}, ignore=[])
    mem = _in_memory(smollm2.path, r, tmp_path / "mem", None, windows)
    s = quantize_streaming(smollm2.path, r, tmp_path / "stream", tokens=windows)
    rows = json.loads((s / "lowbit.json").read_text())["layers"]
    assert len(rows) == 15 and all(row["input_scale"] > 0 for row in rows.values()) and "lm_head" in rows
    assert digests(s) == digests(mem)


@pytest.mark.model
def test_stream_vq_codebooks_same_bytes_as_in_memory(smollm2, windows, tmp_path):
    """Vector codebooks (methods/vq.py, a calibrated method whose layers are codebook + indices)
    stream block by block into the native format: the in-memory path's bytes."""
    from lowbit.numerics.vq import vq_scheme
    from lowbit.recipe import Recipe, Rule
    r = Recipe(name="vq-01", rules=[Rule(r"model\.layers\.[01]\.", vq_scheme(2, 64), "vq", {"kmeans_iters": 3})],
               calibration=dict(_gptq_blocks("0").calibration))
    mem = _in_memory(smollm2.path, r, tmp_path / "mem", "60MB", windows)
    s = quantize_streaming(smollm2.path, r, tmp_path / "stream", max_shard_size="60MB", tokens=windows)
    assert digests(s) == digests(mem)
    man = json.loads((Path(s) / "lowbit.json").read_text())
    assert man["layers"]["model.layers.1.mlp.down_proj"]["method"] == "vq"


def _finetuned(rules, **ft):
    from lowbit.recipe import Recipe
    return Recipe(name="ft", rules=rules, calibration={"n_samples": 2, "seq_len": 64, "batch_size": 1},
                  finetune={"epochs": 2, "batch_size": 1, **ft}, ignore=[])


@pytest.mark.model
def test_stream_finetune_same_bytes_as_in_memory_and_resumes(smollm2, windows, tmp_path):
    """-ft streamed (streaming_finetune.py): the end-to-end fine-tuning runs one decoder block at a
    time (each block rebuilt from the state for its forward and again for its backward), and
    gives the in-memory run's steps, so its bytes; a run killed in the middle of the tuning
    restarts it from the state's finished blocks (no block calibrated again): the same bytes."""
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Rule
    r = _finetuned([Rule(r"model\.layers\.[01]\.", int_scheme(2, 64), "gptq")])
    mem = _in_memory(smollm2.path, r, tmp_path / "mem", None, windows)
    man = json.loads((mem / "lowbit.json").read_text())
    assert all(row["method"] == "gptq+ft" for row in man["layers"].values())     # kept: the KL went down
    assert any(n.startswith("finetune: KL on the 2 calibration windows") for n in man["notes"])

    def die_while_tuning(msg):
        if msg.startswith("finetune epoch 1/"):
            raise Killed
    with pytest.raises(Killed):
        quantize_streaming(smollm2.path, r, tmp_path / "s", tokens=windows, log=die_while_tuning)
    assert json.loads((tmp_path / ".s.resume" / "state.json").read_text())["blocks_done"] == 2
    logs = []
    s = quantize_streaming(smollm2.path, r, tmp_path / "s", tokens=windows, log=logs.append)
    assert not any(m.startswith("block ") for m in logs) and any(m.startswith("finetune epoch 2/2") for m in logs)
    assert digests(s) == digests(mem)


@pytest.mark.slow
@pytest.mark.model
def test_stream_finetune_after_data_free_rtn_same_bytes(smollm2, windows, tmp_path):
    """-ft after plain RTN, streamed: the block loop makes the state (the layers quantized as
    without calibration) and the manifest is the data-free path's (no calibration settings)."""
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Rule
    r = _finetuned([Rule(r"model\.layers\.[01]\.", int_scheme(3, 64))])
    mem = _in_memory(smollm2.path, r, tmp_path / "mem", None, windows)
    s = quantize_streaming(smollm2.path, r, tmp_path / "stream", tokens=windows)
    assert digests(s) == digests(mem)
    man = json.loads((s / "lowbit.json").read_text())
    assert man["calibration"] == {"n_samples": 2, "seq_len": 64}
    assert all(row["method"] == "rtn+ft" for row in man["layers"].values())


@pytest.mark.model
def test_stream_finetune_vq_and_tied_lm_head_same_bytes(smollm2, windows, tmp_path):
    """-ft streamed over vector codebooks (their codebooks trained too) and a GPTQ lm_head tied to
    the embedding (tuned outside the blocks, in memory): the in-memory bytes. Both failed before:
    the codebook gradient came from advanced indexing, whose backward accumulates in thread order
    (two in-memory runs differed), and a quantized tied lm_head was looked for in the checkpoint."""
    from lowbit.numerics.scheme import int_scheme
    from lowbit.numerics.vq import vq_scheme
    from lowbit.recipe import Rule
    r = _finetuned([Rule(r"model\.layers\.0\.", vq_scheme(2, 64), "vq", {"kmeans_iters": 3}),
                    Rule(r"^lm_head$", int_scheme(4, 64), "gptq")], lr=2e-4, norm_lr=2e-4)
    mem = _in_memory(smollm2.path, r, tmp_path / "mem", None, windows)
    man = json.loads((mem / "lowbit.json").read_text())
    assert man["layers"]["lm_head"]["method"] == "gptq+ft" and man["layers"]["model.layers.0.mlp.up_proj"]["method"] == "vq+ft"
    s = quantize_streaming(smollm2.path, r, tmp_path / "stream", tokens=windows)
    assert digests(s) == digests(mem)


@pytest.mark.model
def test_stream_finetune_then_static_input_scales_same_bytes(smollm2, windows, tmp_path):
    """-ft, then static input scales (W2A8 blocks 0-1, W4A8 on the tied lm_head): the activation
    pass runs on the tuned blocks, the tuned norms (the final one included) and the tuned head,
    as in memory. Blocks 2-29 have state files with no layer (the loop ran on for lm_head's
    inputs); the source's norms for them are the tuned ones too."""
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Rule, get_recipe
    ia = get_recipe("w8a8-static").rules[0].input_activations
    r = _finetuned([Rule(r"model\.layers\.[01]\.", int_scheme(2, 64), "gptq", {}, ia),
                    Rule(r"^lm_head$", int_scheme(4, 64), "gptq", {}, ia)], lr=2e-4, norm_lr=2e-4)
    mem = _in_memory(smollm2.path, r, tmp_path / "mem", None, windows)
    man = json.loads((mem / "lowbit.json").read_text())
    assert man["layers"]["lm_head"]["method"] == "gptq+ft" and man["layers"]["lm_head"]["input_scale"] > 0
    s = quantize_streaming(smollm2.path, r, tmp_path / "stream", tokens=windows)
    assert digests(s) == digests(mem)


@pytest.mark.slow
@pytest.mark.model
def test_stream_finetune_rotated_same_bytes(smollm2, windows, tmp_path):
    """-ft after a Hadamard rotation, streamed: the teacher is the float model before the rotation
    (as in memory), read block by block from the source; the student's blocks come rotated."""
    from lowbit.numerics.vq import vq_scheme
    from lowbit.recipe import Rule
    r = _finetuned([Rule(r"model\.layers\.0\.", vq_scheme(2, 64), "vq", {"kmeans_iters": 3})], lr=2e-4, norm_lr=2e-4)
    r.transforms = [{"name": "rotate", "seed": 3}]
    mem = _in_memory(smollm2.path, r, tmp_path / "mem", None, windows)
    s = quantize_streaming(smollm2.path, r, tmp_path / "stream", tokens=windows)
    assert digests(s) == digests(mem)


@pytest.mark.model
def test_stream_gptq_resume_refuses_changed_calibration(smollm2, tmp_path):
    r = _gptq_blocks("0")

    def die(msg):
        if msg.startswith("block 1/"):
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        quantize_streaming(smollm2.path, r, tmp_path / "o", log=die)
    with pytest.raises(LowbitError, match="calibration token windows"):
        quantize_streaming(smollm2.path, r, tmp_path / "o", calibration={"seed": 1})
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.model
def test_stream_gptq_whole_model_cli_same_bytes(smollm2, tmp_path):
    """The issue's setting: w4g128-gptq, 16 windows of 512 tokens, every block, through the CLI."""
    from lowbit.cli import main
    assert main(["quantize", str(smollm2.path), "--recipe", "w4g128-gptq", "--stream", "--samples", "16",
                 "--seq-len", "512", "--out", str(tmp_path / "cli")]) == 0
    mem = _in_memory(smollm2.path, "w4g128-gptq", tmp_path / "mem", "1GB", n_samples=16, seq_len=512)
    assert digests(tmp_path / "cli") == digests(mem)


def _st(tmp_path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return p


@pytest.mark.parametrize("header,data,match", [
    ({"w": {"dtype": "F16", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 8]}}, b"\0" * 8, "expected"),
    ({"w": {"dtype": "F16", "shape": [4], "data_offsets": [0, 1 << 40]}}, b"\0" * 8, "outside the data"),
    ({"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
    ({"w": {"dtype": "F16", "shape": [-4], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
    ({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
      "b": {"dtype": "F16", "shape": [2], "data_offsets": [4, 8]}}, b"\0" * 8, "overlap"),
])
def test_safetensors_header_checked_against_file(tmp_path, header, data, match):
    with pytest.raises(LowbitError, match=match):
        read_header(_st(tmp_path, header, data))


def test_safetensors_header_length_past_file(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 50) + b"{}")
    with pytest.raises(LowbitError, match="does not fit"):
        SafetensorsSource(tmp_path)


# --- a GGUF read tensor by tensor (models/gguf_source.py) ---------------------------------------

@pytest.mark.model
def test_gguf_source_decodes_every_tensor_as_the_fp32_copy(smollm2):
    """Every tensor GGUFSource reads from the bundled GGUF (pread + lowbit's decoders, q/k rows
    un-permuted) equals the fp32 copy load_model made of it with transformers' loader, exactly."""
    import torch
    from transformers import AutoConfig

    from lowbit.models import resolve_source
    from lowbit.models.gguf_source import GGUFSource, gguf_meta_dir
    meta, digest = gguf_meta_dir(resolve_source("smollm2-135m")[1])
    assert digest == smollm2.source_sha256
    assert not list(meta.glob("*.safetensors"))                 # config and tokenizer only
    src = GGUFSource(resolve_source("smollm2-135m")[1], AutoConfig.from_pretrained(meta))
    ref = SafetensorsSource(smollm2.path)
    assert src.keys() == ref.keys()                              # tied: no lm_head in either
    for k in ref.keys():
        assert src.shape(k) == ref.shape(k)
        assert torch.equal(src.read(k), ref.read(k).float()), k


@pytest.mark.model
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_stream_from_gguf_same_bytes_as_in_memory(windows, tmp_path, method):
    """quantize_streaming("smollm2-135m", ...) reads the GGUF itself, block by block (data-free
    and calibrated), and writes every byte the in-memory path writes from the same GGUF: the
    weights, config and tokenizer files, and the manifest (source name and the GGUF's sha256)."""
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Recipe, Rule
    r = _gptq_blocks("0") if method == "gptq" else Recipe(
        name="b0", rules=[Rule(r"model\.layers\.0\.", int_scheme(4, 128), "rtn")])
    s = quantize_streaming("smollm2-135m", r, tmp_path / "stream", max_shard_size="60MB",
                           tokens=windows if method == "gptq" else None)
    mem = _in_memory("smollm2-135m", r, tmp_path / "mem", "60MB", windows if method == "gptq" else None)
    assert digests(s) == digests(mem)
    man = json.loads((s / "lowbit.json").read_text())
    assert man["source"]["model"] == "smollm2-135m" and len(man["source"]["sha256"]) == 64


@pytest.mark.slow
@pytest.mark.model
def test_stream_from_gguf_into_gguf_same_bytes_cli(tmp_path):
    """`lowbit quantize smollm2-135m --stream --format gguf`: GGUF in, GGUF out, the float model
    never built: the same file as load + quantize + export gguf."""
    from lowbit.cli import main
    from lowbit.numerics.scheme import int_scheme
    from lowbit.recipe import Recipe, Rule
    r = Recipe(name="b0", rules=[Rule(r"model\.layers\.0\.", int_scheme(4, 32), "rtn")])     # Q4_0
    r.save(tmp_path / "b0.json")
    assert main(["quantize", "smollm2-135m", "--recipe", str(tmp_path / "b0.json"), "--stream",
                 "--format", "gguf", "--out", str(tmp_path / "cli.gguf")]) == 0
    lm = load_model("smollm2-135m")
    m = api.export(lm, api.quantize(lm.model, r, progress=False), tmp_path / "mem.gguf", "gguf")
    assert (tmp_path / "cli.gguf").read_bytes() == m.read_bytes()


@pytest.mark.model
@pytest.mark.parametrize("source", [pytest.param("gguf", marks=pytest.mark.slow), "hf",
                                    pytest.param("hf+imatrix", marks=pytest.mark.slow)])
def test_stream_ggml_mix_straight_into_gguf_same_bytes(smollm2, tmp_path, source):
    """A recipe of ggml types (q4_k_m) streams straight into a GGUF (streaming_gguf.py: each layer
    quantized from the source when the writer asks for it, spooled until the header is written):
    the file and its sidecar are the in-memory export's, from the GGUF itself or from an HF
    directory (whose tokenizer the header then carries)."""
    src = "smollm2-135m" if source == "gguf" else smollm2.path
    im = None
    if source.endswith("imatrix"):       # an importance matrix of a few windows, as llama-imatrix makes
        from lowbit.calibration import CalibrationConfig, calibration_tokens
        from lowbit.calibration.imatrix import collect_imatrix, imatrix_targets
        windows = calibration_tokens(smollm2.tokenizer, CalibrationConfig.from_dict({"n_samples": 2, "seq_len": 64}))
        im = collect_imatrix(smollm2.model, windows, imatrix_targets(smollm2.model), progress=False)
    s = quantize_streaming(src, "q4_k_m", tmp_path / "s.gguf", format="gguf", imatrix=im)
    lm = load_model(src)
    m = api.export(lm, api.quantize(lm.model, "q4_k_m", progress=False, imatrix=im), tmp_path / "m.gguf", "gguf")
    assert Path(s).read_bytes() == Path(m).read_bytes()
    man, ref = (json.loads(Path(f"{p}.lowbit.json").read_text()) for p in (s, m))
    assert list(man.pop("files").values()) == list(ref.pop("files").values())
    assert man == ref and bool(man["gguf"]["imatrix"]) == (im is not None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.lowbit.json", "s.gguf", "s.gguf.lowbit.json"]
    with pytest.raises(LowbitError, match="stream with --format gguf"):
        quantize_streaming(src, "q4_k_m", tmp_path / "native")


def _gptq_ggml_blocks():
    """GPTQ choosing ggml block codes on blocks 0-1 (Q4_0; Q4_K, which falls back to Q5_0 where
    its 256-weight block does not divide the 576 columns, as llama.cpp's does), llama.cpp's
    encoder (Q8_0) on the rest and the token embedding; the calibration of _gptq_blocks."""
    from lowbit.presets.gguf_mixes import ggml_scheme
    from lowbit.recipe import Recipe, Rule
    return Recipe(name="gptq-ggml-01", rules=[Rule(r"model\.layers\.0\.", ggml_scheme("Q4_0"), "gptq"),
                                              Rule(r"model\.layers\.1\.", ggml_scheme("Q4_K"), "gptq"),
                                              Rule(r".*", ggml_scheme("Q8_0"), "ggml")],
                  calibration=dict(_gptq_blocks("0").calibration))


@pytest.fixture(scope="module")
def gptq_ggml_in_memory(smollm2, windows, tmp_path_factory):
    """_gptq_ggml_blocks by load + api.quantize + export gguf: the bytes a stream must give."""
    lm = load_model(smollm2.path)
    rep = api.quantize(lm.model, _gptq_ggml_blocks(), tokens=windows, progress=False)
    return api.export(lm, rep, tmp_path_factory.mktemp("gptq-ggml") / "m.gguf", "gguf")


@pytest.mark.model
def test_stream_gptq_ggml_straight_into_gguf_same_bytes(smollm2, windows, gptq_ggml_in_memory, tmp_path):
    """A calibrated recipe of ggml types streams into a GGUF (streaming_gguf.py: the block loop
    of streaming_calibrated.py, the ggml blocks in its state, then the writer): the file and its
    sidecar are load + api.quantize + export's, and the state is gone at the end."""
    m = gptq_ggml_in_memory
    s = quantize_streaming(smollm2.path, _gptq_ggml_blocks(), tmp_path / "s.gguf", format="gguf", tokens=windows)
    assert Path(s).read_bytes() == Path(m).read_bytes()
    man, ref = (json.loads(Path(f"{p}.lowbit.json").read_text()) for p in (s, m))
    assert list(man.pop("files").values()) == list(ref.pop("files").values())
    assert man == ref and man["layers"]["model.layers.0.mlp.up_proj"]["method"] == "gptq"
    used = {v["used"] for k, v in man["gguf"]["tensors"].items() if k.startswith("blk.1.")}
    assert {"Q4_K", "Q5_0"} <= used     # down_proj's 1536 columns take Q4_K; 576 fall back to Q5_0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gguf", "s.gguf.lowbit.json"]


@pytest.mark.slow
@pytest.mark.model
def test_stream_gptq_ggml_into_gguf_resumes_same_bytes(smollm2, windows, gptq_ggml_in_memory, tmp_path):
    """Killed after block 1 and restarted with the same call, the GGUF stream resumes from the
    state (ggml blocks included: calibration/resume.py) and writes the in-memory path's bytes."""
    state, logs, again = _killed_after_block_1_then_resumed(smollm2.path, _gptq_ggml_blocks(), tmp_path / "a.gguf",
                                                            format="gguf", tokens=windows)
    assert state["blocks_done"] == 1
    assert any(m.startswith("resuming after block 1/") for m in logs)
    assert not any(m.startswith("block 1/") for m in logs)
    assert Path(again).read_bytes() == Path(gptq_ggml_in_memory).read_bytes()
    assert not (tmp_path / ".a.gguf.resume").exists()


@pytest.mark.model
def test_gguf_source_refuses_a_truncated_file(tmp_path):
    """A GGUF cut short: its tensor table points past the end; refused naming the file and the
    tensor before any tensor is read."""
    from transformers import AutoConfig

    from lowbit.models import resolve_source
    from lowbit.models.gguf_source import GGUFSource, gguf_meta_dir
    path = resolve_source("smollm2-135m")[1]
    meta, _ = gguf_meta_dir(path)
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as fh:
        cut.write_bytes(fh.read(path.stat().st_size // 2))
    with pytest.raises(LowbitError, match=r"cut\.gguf"):
        GGUFSource(cut, AutoConfig.from_pretrained(meta))


@pytest.mark.model
def test_gguf_source_refuses_tensors_the_config_does_not_expect():
    """The tensor table's shapes are checked against the model's config before anything is
    decoded (a shape decides how much memory a read takes): a config with another MLP width is
    refused naming the tensor and both shapes."""
    from transformers import AutoConfig

    from lowbit.models import resolve_source
    from lowbit.models.gguf_source import GGUFSource, gguf_meta_dir
    path = resolve_source("smollm2-135m")[1]
    config = AutoConfig.from_pretrained(gguf_meta_dir(path)[0])
    config.intermediate_size = 1024
    with pytest.raises(LowbitError, match=r"blk\.\d+\.ffn_\w+\.weight .*\((1536, 576|576, 1536)\).* expects \((1024, 576|576, 1024)\)"):
        GGUFSource(path, config)


@pytest.mark.model
def test_layer_by_layer_conversion_same_bytes_as_whole_model_export(smollm2, tmp_path):
    """native.read_for_export (what a streamed --format gptq / awq / compressed-tensors run
    converts with: every quantized layer read from disk when asked for, each layer's tensors
    built again when its shard is written) gives the bytes of api.export(api.load(dir)), here
    for every layer of the model and in several shards."""
    from lowbit.export import get_format
    from lowbit.export.native import read_for_export
    lm = load_model(smollm2.path)
    rep = api.quantize(lm.model, "w4g64-rtn", progress=False)          # 576 = 9 x 64: AWQ takes it
    native = api.export(lm, rep, tmp_path / "native", "native")
    del lm, rep
    whole = api.load(native)
    for fmt in ("gptq", "awq", "compressed-tensors"):
        ref = api.export(whole, None, tmp_path / f"ref-{fmt}", fmt, max_shard_size="40MB")
        qm = read_for_export(native)
        assert qm.lazy and not isinstance(qm.qweights, dict)
        out = get_format(fmt).write(qm, tmp_path / f"lazy-{fmt}", max_shard_size="40MB")
        assert len([p for p in out.iterdir() if p.suffix == ".safetensors"]) >= 3, fmt
        assert digests(out) == digests(ref), fmt
