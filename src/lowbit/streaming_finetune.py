"""-ft streamed: the end-to-end fine-tuning of train/tune.py (scales, codebooks and norms trained on
the KL to the float model, codes fixed) on a model whose blocks live in the resume state, one
decoder block in memory at a time.

    quantize_streaming(src, "w4g64-sym-rot-gptq-actorder-mse-ft", out)     # lowbit quantize --stream

tune.finetune drives the same loop as in memory; only its runner differs (`Streamed`):
  - the teacher: the float model (before any rotation) run block by block over the windows, each
    block read from the source, keeping the input of its output head (tune.Teacher);
  - what stays in memory: the trained numbers only: every linear's relative scale steps u (and a
    vector codebook), the norm weights and biases, their gradients and Adam's two moments, i.e.
    a few times (weights / group size) numbers; the codes stay in the state directory;
  - a training step: the batch's first-block input from the embedding; each block is built from
    the state (its codes decoded, the trained numbers put in), run, and dropped, its input kept
    (batch x seq x hidden per block); the head's KL and its backward; then each block again from
    the last, rebuilt and run on its kept input with gradients, and backpropagated with the
    gradient its output received. The same operations as autograd through the whole model, in
    the same order, so the same gradients, steps and bytes as in memory (tests);
  - the result: each block's fp16-rounded layers are written to the state's `tuned/` directory,
    the final KL is measured on them, and if it is below the start's the writer reads the tuned
    layers and the tuned norms (`_Stream.tuned`, `_Stream.overrides`) instead of the state's.
A killed run restarts the tuning from the state's finished blocks (the calibration is not redone).

Cost: every step builds each block twice (forward, then again for its backward), reading its
codes from the state; 1.5x the in-memory arithmetic.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lowbit.errors import LowbitError


def streamed_teacher(src, files, prefix: str, windows: torch.Tensor, batch_size: int, dtype) -> "object":
    """tune.teacher_of for a model read one block at a time from `files` (the float model): the
    same batches, the same block calls, the same head input."""
    from lowbit.arch import get_blocks, head_input, spec_for
    from lowbit.calibration.capture import capture_block_inputs, run_block
    from lowbit.calibration.paused import trim_heap
    from lowbit.export.common import empty_model, tie_by_config
    from lowbit.streaming import read_block, read_outside_blocks
    from lowbit.train.tune import Teacher
    model = empty_model(src, dtype)
    tie_by_config(model)
    arch = spec_for(model)
    _check_head(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    read_outside_blocks(model, files, prefix, dtype, str(src),
                        skip=lambda key: tied and key.rpartition(".")[0] == arch.lm_head)
    tie_by_config(model)
    blocks = get_blocks(model, arch)
    with torch.no_grad():
        acts = capture_block_inputs(model, blocks[0], windows, batch_size)
        for b, block in enumerate(blocks):
            read_block(model, files, f"{prefix}.{b}", block, dtype, str(src))
            acts = [run_block(block, a) for a in acts]
            block.to("meta")
            trim_heap()
        hidden = torch.cat([head_input(model, arch, a.hidden).float() for a in acts], 0)
    head = model.get_output_embeddings()
    return Teacher(hidden, head.weight.detach().float().clone(),
                   None if head.bias is None else head.bias.detach().float().clone())


def _check_head(model: nn.Module) -> None:
    """What teacher_of checks on the whole model, from the config: the logits are the head's output."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise LowbitError(f"finetune: the output head is {type(head).__name__}, expected an nn.Linear to distil through")
    if getattr(model.config, "final_logit_softcapping", None):
        raise LowbitError("finetune: the model's logits are soft-capped after the head; not distilled")


class Streamed:
    """tune.finetune's runner for a streamed run (module docstring). run: what
    streaming_calibrated.calibrate_streamed returns; files: the student's tensors (rotated when
    the recipe rotates)."""

    def __init__(self, run, src, dtype):
        self.run, self.stream, self.model, self.src, self.dtype = run, run.stream, run.model, src, dtype
        self.files, self.prefix, self.arch, self.blocks = run.files, run.prefix, run.arch, run.blocks
        self.layers_of: dict[int | None, list[str]] = {}
        for name in sorted(self.stream.records, key=lambda n: run.order[n]):
            self.layers_of.setdefault(self.stream.records[name][2], []).append(name)
        self.phase = "tune"

    # -- what finetune() asks of a runner -------------------------------------------------------
    def begin(self) -> dict:
        from lowbit.nn.qlinear import set_submodule
        from lowbit.train.tune import _norm_params, _TunedLinear
        model, stream = self.model, self.stream
        # the embedding, the final norm, and a float lm_head untied from it (a quantized one is tuned)
        self.run.read_outside()
        head_name = self.arch.lm_head
        if head_name not in stream.records and model.get_output_embeddings().weight.is_meta:
            from lowbit.export.common import set_tensor
            set_tensor(model, f"{head_name}.weight", self.files.read(f"{head_name}.weight").to(self.dtype), str(self.src))
        for p in model.parameters():
            p.requires_grad_(False)
        self.meta_mods = {}                  # the skeleton's own (meta) modules, put back on release
        self.mods: dict[str, _TunedLinear] = {}
        self.persistent: dict[str, nn.Parameter] = {}   # norm weights and biases, by full name
        for b, names in self.layers_of.items():
            if b is None:                    # lm_head: tuned in place the whole time
                for name in names:
                    self.meta_mods[name] = model.get_submodule(name)
                    self.mods[name] = _TunedLinear(self.run.heads[name], self.meta_mods[name].bias)
                    set_submodule(model, name, self.mods[name])
                continue
            qws, floats = stream.block_layers(b), stream.block_floats(b)
            for name in names:
                if f"{name}.bias" in floats:
                    self.persistent[f"{name}.bias"] = nn.Parameter(floats[f"{name}.bias"].clone(), requires_grad=False)
                self.meta_mods[name] = model.get_submodule(name)
                self.mods[name] = _TunedLinear(qws[name], self.persistent.get(f"{name}.bias"))
                self.mods[name].detach_codes()
        if not self.mods:
            raise LowbitError("finetune: the model has no quantized linear (QuantLinear / VQLinear) to tune")
        self.mods = {n: self.mods[n] for n in sorted(self.mods, key=lambda n: self.run.order[n])}
        # every norm of every block (a block without state: from the source), named as the in-memory
        # run names them
        self.norm_keys = [key for key, _ in _norm_params(model, set(self.mods))]
        self.slots_of: dict[int, list] = {}  # block -> (key, owner module, leaf, its meta placeholder)
        for key in self.norm_keys:
            if key not in self.persistent:
                self.persistent[key] = self._initial(key)
            owner, _, leaf = key.rpartition(".")
            if owner not in self.mods and self._block_of(key) is not None:   # a tuned linear holds its bias
                mod = model.get_submodule(owner)
                self.slots_of.setdefault(self._block_of(key), []).append((key, mod, leaf, mod._parameters[leaf]))
        self._checked: set[int] = set()      # blocks whose source tensors were checked for NaN/inf
        # the first block with a trained number: gradients flow from its output on (none before)
        self._first_trained = min((b for b in self.layers_of if b is not None), default=len(self.blocks))
        return self.mods

    def norm_params(self, tuned: set[str]) -> list[tuple[str, nn.Parameter]]:
        """Asked only when the norms are trained (norm_lr > 0)."""
        in_blocks = [b for b in map(self._block_of, self.norm_keys) if b is not None]
        self._first_trained = min([self._first_trained] + in_blocks)
        return [(k, self.persistent[k]) for k in self.norm_keys]

    def loss(self, ids: torch.Tensor, log_p: torch.Tensor):
        from lowbit.calibration.capture import block_hidden, capture_block_inputs
        from lowbit.train.tune import kl_of_logits
        x = capture_block_inputs(self.model, self.blocks[0], ids, ids.shape[0])[0]
        kw, h, saved = x.kwargs, x.hidden, []
        first = self._first_trained
        for b in range(len(self.blocks)):
            block = self._build(b)
            saved.append(h)
            # each block's input needs a gradient where it would in the whole model's graph
            h = block_hidden(block(h, **kw)).detach().requires_grad_(b >= first)
            self._release(b)
        last = h
        loss = kl_of_logits(self._logits(last), log_p)

        def backward() -> None:
            loss.backward()
            g = last.grad
            for b in range(len(self.blocks) - 1, first - 1, -1):
                if g is None:
                    break
                block = self._build(b)
                inp = saved[b]
                with torch.enable_grad():
                    out = block_hidden(block(inp, **kw))
                torch.autograd.backward(out, g)
                g = inp.grad
                saved[b] = None
                self._release(b)
        return loss, backward

    def mean_kl(self, windows: torch.Tensor, teacher, bs: int) -> float:
        from lowbit.calibration.capture import capture_block_inputs, run_block
        from lowbit.train.tune import batches, kl_of_logits
        with torch.no_grad():
            acts = capture_block_inputs(self.model, self.blocks[0], windows, bs)
            for b in range(len(self.blocks)):
                block = self._build(b)
                acts = [run_block(block, a) for a in acts]
                self._release(b)
            tot = 0.0
            for idx, a in zip(batches(windows.shape[0], bs), acts):
                tot += float(kl_of_logits(self._logits(a.hidden), teacher.log_probs(idx))) * len(idx)
        return tot / windows.shape[0]

    def install_results(self, mods: dict) -> tuple[dict, bool]:
        """Each block's fp16-rounded layers written to the state's tuned/ directory (one block at
        a time); the next passes run on them."""
        from lowbit.calibration.resume import write_block
        from lowbit.nn.qlinear import make_quant_module, set_submodule
        from lowbit.train.tune import _finite
        ok = True
        where = self.stream.path / self.stream.TUNED
        where.mkdir(parents=True, exist_ok=True)
        methods = {n: self.stream.records[n][0]["method"] for n in mods}
        for b in range(len(self.blocks)):    # every block the state holds (some with no layer)
            if not (self.stream.path / f"block-{b:04d}.safetensors").is_file():
                continue
            qws, results = self.stream.block_layers(b, tuned=False), []
            for name in self.layers_of.get(b, []):
                mods[name].attach(qws[name])
                results.append((name, mods[name].result(), methods[name]))
                mods[name].detach_codes()
                ok = ok and _finite(results[-1][1])
            write_block(where / f"block-{b:04d}.safetensors", results)
            del qws, results
        self.heads = {}
        for name in self.layers_of.get(None, []):
            r = mods[name].result()
            ok = ok and _finite(r)
            self.heads[name] = r
            set_submodule(self.model, name, make_quant_module(r, mods[name].bias))
        self.phase = "results"
        return {n: None for n in mods}, ok

    def restore(self, mods: dict) -> None:
        from lowbit.nn.qlinear import make_quant_module, set_submodule
        self.phase = "tune"
        for name in self.layers_of.get(None, []):
            set_submodule(self.model, name, make_quant_module(self.run.heads[name], mods[name].bias))
        import shutil
        shutil.rmtree(self.stream.path / self.stream.TUNED, ignore_errors=True)

    def keep(self, results: dict, qweights) -> None:
        """The writer reads the tuned layers and norms from here on."""
        self.stream.tuned = True
        self.stream._cache.clear()
        self.stream.overrides.update({k: p.detach().clone() for k, p in self.persistent.items()})
        self.run.heads.update(self.heads)

    def end(self) -> None:
        from lowbit.nn.qlinear import set_submodule
        for name in self.layers_of.get(None, []):          # the skeleton as the writer expects it
            set_submodule(self.model, name, self.meta_mods[name])
        for p in self.persistent.values():
            p.requires_grad_(False)
        # what begin() read goes back to the meta device (the writer reads the source or the
        # overrides); the skeleton's own buffers (rotary frequencies) stay
        for mod in [self.model.get_input_embeddings(), self.model.get_output_embeddings(),
                    *(self.model.get_submodule(n) for n in self.arch.head)]:
            if mod is not None:
                mod.to("meta")
        self.stream._cache.clear()

    # -- blocks ------------------------------------------------------------------------------------
    def _block_of(self, key: str) -> int | None:
        from lowbit.streaming_calibrated import _block_index
        return _block_index(key, self.prefix)

    def _initial(self, key: str) -> nn.Parameter:
        """A norm tensor's starting value: the state's (block-level transforms rewrite norms), the
        source's for a block the loop never reached, the skeleton's own outside the blocks."""
        b = self._block_of(key)
        if b is None:
            return self.model.get_parameter(key)       # read by read_outside: stays in memory
        floats = self.stream.block_floats(b)
        t = floats[key] if key in floats else self.files.read(key).to(self.dtype)
        return nn.Parameter(t.clone(), requires_grad=False)

    def _build(self, b: int) -> nn.Module:
        """Block b runnable: its float tensors, its layers (the tuned modules, or the rounded
        results), the trained norms."""
        from lowbit.export.common import set_tensor
        from lowbit.nn.qlinear import make_quant_module, set_submodule
        from lowbit.streaming import read_block
        block, names = self.blocks[b], self.layers_of.get(b, [])
        floats, check = self.stream.block_floats(b), b not in self._checked   # NaN/inf: once per block
        if floats:
            for key, t in floats.items():
                if key.rpartition(".")[0] not in names and key not in self.persistent:
                    set_tensor(self.model, key, t, f"block {b}", check)
        else:                                 # a block no rule quantizes: the source's
            read_block(self.model, self.files, f"{self.prefix}.{b}", block, self.dtype, str(self.src), check)
        self._checked.add(b)
        for key, mod, leaf, _ in self.slots_of.get(b, []):
            mod._parameters[leaf] = self.persistent[key]
        if names:
            if self.phase == "results":
                qws = self.stream.block_layers(b, tuned=True)
                for name in names:
                    set_submodule(self.model, name, make_quant_module(qws[name], self.mods[name].bias))
            else:
                qws = self.stream.block_layers(b, tuned=False)
                for name in names:
                    self.mods[name].attach(qws[name])
                    set_submodule(self.model, name, self.mods[name])
        return block

    def _release(self, b: int) -> None:
        from lowbit.calibration.paused import trim_heap
        from lowbit.nn.qlinear import set_submodule
        for name in self.layers_of.get(b, []):
            self.mods[name].detach_codes()
            set_submodule(self.model, name, self.meta_mods[name])
        for _, mod, leaf, placeholder in self.slots_of.get(b, []):
            mod._parameters[leaf] = placeholder
        self.blocks[b].to("meta")
        trim_heap()

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        from lowbit.arch import head_input
        return self.model.get_output_embeddings()(head_input(self.model, self.arch, h))


def finetune_streamed(run, src, float_files, dtype, log) -> None:
    """recipe.finetune on a streamed run (streaming_calibrated.calibrate_streamed's `run`), its
    report updated as api.quantize's is."""
    from lowbit.api import _finetune
    from lowbit.train.tune import TuneConfig
    cfg = TuneConfig.from_dict(run.recipe.finetune)
    log("finetune: the float model's view of the windows, block by block")
    teacher = streamed_teacher(src, float_files, run.prefix, run.tokens, cfg.batch_size, dtype)
    _finetune(None, run.report, run.tokens, teacher, cfg, log, runner=Streamed(run, src, dtype),
              tuned=set(run.stream.records))
