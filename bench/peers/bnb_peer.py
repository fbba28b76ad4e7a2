"""bitsandbytes + transformers + peft, as their users run them (CPU), for lowbit's bnb tests/bench.

Runs in bench/.venv-bnb (bench/setup_peers.sh bnb). Subcommands, each writing OUT/result.json
(versions, module classes, memory footprints, timings) and OUT/logits.safetensors ("logits":
float32 (batch, seq, vocab) for --ids, a safetensors file holding "ids" int64 (batch, seq)):

    load DIR                      from_pretrained(DIR): a bitsandbytes checkpoint (ours or theirs;
                                  transformers reads quantization_config from config.json)
    quantize SRC --quant nf4|fp4|int8 [--double-quant] [--save DIR]
                                  from_pretrained(SRC, quantization_config=BitsAndBytesConfig(...)):
                                  bitsandbytes' own load_in_4bit / load_in_8bit of a float HF dir,
                                  then save_pretrained(DIR) when asked
    peft BASE ADAPTER             PeftModel.from_pretrained(from_pretrained(BASE), ADAPTER)

result.json "footprint" is transformers' model.get_memory_footprint() (parameters + buffers; for
4-bit it omits the absmax constants in quant_state); "quant_state_bytes" adds those up
(absmax, nested_absmax, code tables), so footprint + quant_state_bytes is what is really held.
Exit 1 with {"error": ...} when the load falls back to float (no bitsandbytes layer) or the logits
are not finite.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _logits(model, ids_file):
    import torch
    from safetensors.torch import load_file
    ids = load_file(ids_file)["ids"]
    with torch.no_grad():
        lg = model(input_ids=ids, use_cache=False).logits.float()
    if not bool(torch.isfinite(lg).all()):
        raise SystemExit(_fail("non-finite logits"))
    return lg


def _quant_state_bytes(model) -> int:
    total = 0
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is None:
            continue
        ts = [qs.absmax, qs.code]
        if getattr(qs, "state2", None) is not None:
            ts += [qs.state2.absmax, qs.state2.code, qs.offset]
        total += sum(t.numel() * t.element_size() for t in ts if t is not None)
    return total


def _fail(msg: str) -> int:
    print(json.dumps({"error": msg}))
    return 1


def main() -> int:
    import torch
    import bitsandbytes as bnb
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["load", "quantize", "peft"])
    ap.add_argument("src")
    ap.add_argument("adapter", nargs="?")
    ap.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8"])
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--save", default=None)
    ap.add_argument("--ids", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    kw = {"dtype": torch.float32}
    if a.cmd == "quantize":
        kw["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if a.quant == "int8" else
                                     BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=a.quant,
                                                        bnb_4bit_use_double_quant=a.double_quant,
                                                        bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(a.src, **kw)
    load_s = time.perf_counter() - t0
    classes: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            classes[type(m).__name__] = classes.get(type(m).__name__, 0) + 1
    if a.cmd != "peft" and not classes and getattr(model.config, "quantization_config", None) is not None:
        return _fail("loaded with no bitsandbytes layer (float fallback)")
    res = {"torch": torch.__version__, "bitsandbytes": bnb.__version__, "transformers": transformers.__version__,
           "cmd": a.cmd, "classes": classes, "footprint": int(model.get_memory_footprint()),
           "quant_state_bytes": _quant_state_bytes(model), "load_seconds": round(load_s, 2)}
    if a.cmd == "peft":
        import peft
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, a.adapter)
        model.eval()
        res["peft"] = peft.__version__
        res["lora_modules"] = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    if a.save:                      # model and tokenizer, as a user saves a quantized model
        model.save_pretrained(a.save)
        transformers.AutoTokenizer.from_pretrained(a.src).save_pretrained(a.save)
        res["saved"] = a.save
    if a.ids:
        save_file({"logits": _logits(model, a.ids).contiguous()}, str(out / "logits.safetensors"))
    (out / "result.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
