"""Check a compressed-tensors checkpoint with the compressed-tensors package itself (and
transformers), in llm-compressor's venv. Each subcommand prints one JSON object on stdout.

    P=bench/.venv-llmc/bin/python
    $P bench/ct_peer_check.py config DIR                  # QuantizationConfig.model_validate(config.json)
    $P bench/ct_peer_check.py dequant DIR OUT.safetensors # model-free decompression, float32
    $P bench/ct_peer_check.py logits DIR IDS.npy OUT.npy  # AutoModelForCausalLM.from_pretrained -> logits
    $P bench/ct_peer_check.py pack IN.safetensors OUT.safetensors   # pack_to_int32 of each tensor
    $P bench/ct_peer_check.py ragged                      # dequantize of a 576-column row at g128

dequant: compressed_tensors' CompressedTensorsDequantizer (each scheme's compressor class
`decompress`, the path its convert entrypoint uses), every quantized `<module>.weight` in float32;
modules holding a float `weight` and no `weight_scale` are passed as `ignore` (see dequant()).
logits: transformers' CompressedTensorsHfQuantizer load (dtype float32, CPU), then one forward.
pack: IN holds int8 signed codes named `<any>.b<bits>.d<dim>`; OUT the same names packed by
compressors/pack_quantized/helpers.py pack_to_int32(value, bits, packed_dim=dim).
lowbit's tests (tests/test_export_compressed_tensors.py) call this by subprocess; it imports
nothing from lowbit, so what it reports is the package's own reading of the files.
"""
from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path


def _versions() -> dict:
    out = {}
    for n in ("torch", "transformers", "compressed-tensors", "llmcompressor"):
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def config(d: str) -> dict:
    from compressed_tensors.quantization import QuantizationConfig
    q = json.loads((Path(d) / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(q)
    return {"ok": True, "format": qc.format, "groups": {k: {"targets": g.targets, "format": g.format}
                                                        for k, g in qc.config_groups.items()}}


def dequant(d: str, out: str) -> dict:
    import torch
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file, save_file
    tensors = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    quantized = {k.rpartition(".")[0] for k in tensors if k.endswith(".weight_scale")}
    # The dequantizer matches modules by name only, so a "Linear" target also claims every other
    # `<module>.weight` (the embedding) in the unpacked formats (int-/naive-/float-quantized) and
    # then misses its weight_scale. Modules with a plain weight and no scale are passed as ignored.
    plain = sorted({k.rpartition(".")[0] for k in tensors if k.endswith(".weight")} - quantized)
    deq = CompressedTensorsDequantizer(d, ignore=plain, dtype=torch.float32).validate(tensors)
    res = {f"{m}.weight": deq[f"{m}.weight"].float().contiguous() for m in sorted(quantized)}
    save_file(res, out)
    return {"ok": True, "n_tensors": len(res), "out": out}


def logits(d: str, ids: str, out: str) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, device_map="cpu").eval()
    n_q = sum(1 for _, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None)
    x = np.load(ids)
    with torch.no_grad():
        lg = model(input_ids=torch.as_tensor(x.reshape(1, -1) if x.ndim == 1 else x, dtype=torch.long)).logits
    np.save(out, lg.float().numpy())
    return {"ok": True, "quantized_modules": n_q, "shape": list(lg.shape),
            "finite": bool(torch.isfinite(lg).all())}


def pack(inp: str, out: str) -> dict:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file, save_file
    res = {}
    for k, v in load_file(inp).items():
        bits = int(k.split(".b")[-1].split(".d")[0])
        dim = int(k.split(".d")[-1])
        res[k] = pack_to_int32(v, bits, packed_dim=dim).contiguous()
    save_file(res, out)
    return {"ok": True, "n_tensors": len(res)}


def ragged() -> dict:
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    x_q = torch.zeros(4, 576, dtype=torch.int8)
    scale = torch.ones(4, 5, dtype=torch.float16)          # ceil(576 / 128) = 5 groups
    try:
        dequantize(x_q, scale, None, args)
    except Exception as e:
        return {"ok": True, "refused": True, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "refused": False}


def main() -> int:
    cmd, *rest = sys.argv[1:] or ["?"]
    fns = {"config": config, "dequant": dequant, "logits": logits, "pack": pack, "ragged": ragged}
    if cmd not in fns:
        print(json.dumps({"ok": False, "error": f"unknown subcommand {cmd!r}; expected {sorted(fns)}"}))
        return 2
    try:
        res = fns[cmd](*rest)
    except Exception as e:   # the package refused it: that is the finding, keep its words
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    res["versions"] = _versions()
    print(json.dumps(res))
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
