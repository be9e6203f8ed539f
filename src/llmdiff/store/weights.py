"""Weight sets as dumps: every parameter one entry (part ``param``, module = its owner, path = its
leaf name, step 0), so weights are compared by the same engine as activations.

Sources: a ``.safetensors`` file or a folder of them (sharded, with ``model.safetensors.index.json``);
a ``.pt``/``.bin`` state dict (read with ``torch.load(weights_only=True)``); a GGUF file, dequantized
with the ``gguf`` package, Llama tensors renamed to Hugging Face names with the q/k row permutation
of llama.cpp's converter undone; an llmdiff dump (its ``param`` entries). int8 tensors with a
``<name>_scale`` (and optional ``<name>_offset``) sibling are dequantized: ``(w - offset) * scale``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmdiff.errors import DumpError
from llmdiff.store.formats.torchfile import load_object, tensors_in
from llmdiff.store.reader import Dump, ProcessDump
from llmdiff.store.schema import Entry, StepRecord

_GGUF_LLAMA = [
    (r"^token_embd\.(weight)$", r"model.embed_tokens.\1"),
    (r"^output_norm\.(weight)$", r"model.norm.\1"),
    (r"^output\.(weight)$", r"lm_head.\1"),
    (r"^blk\.(\d+)\.attn_q\.(weight|bias)$", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"^blk\.(\d+)\.attn_k\.(weight|bias)$", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"^blk\.(\d+)\.attn_v\.(weight|bias)$", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"^blk\.(\d+)\.attn_output\.(weight|bias)$", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"^blk\.(\d+)\.ffn_gate\.(weight)$", r"model.layers.\1.mlp.gate_proj.\2"),
    (r"^blk\.(\d+)\.ffn_up\.(weight)$", r"model.layers.\1.mlp.up_proj.\2"),
    (r"^blk\.(\d+)\.ffn_down\.(weight)$", r"model.layers.\1.mlp.down_proj.\2"),
    (r"^blk\.(\d+)\.attn_norm\.(weight)$", r"model.layers.\1.input_layernorm.\2"),
    (r"^blk\.(\d+)\.ffn_norm\.(weight)$", r"model.layers.\1.post_attention_layernorm.\2"),
]
GGUF_LLAMA_NAMES = [(re.compile(a), b) for a, b in _GGUF_LLAMA]
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8",
                       "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool"}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor (None when the map has no rule for it)."""
    for pattern, replacement in GGUF_LLAMA_NAMES:
        if pattern.match(gguf_name):
            return pattern.sub(replacement, gguf_name)
    return None


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (rotary pairs interleaved per head) back to Hugging Face's layout."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _entry(seq: int, name: str, shape: list[int], dtype: str, data: dict[str, str], note: str | None = None) -> Entry:
    module, _, leaf = name.rpartition(".")
    return Entry(seq=seq, rank=0, step=0, module=module, type="", call=0, part="param", path=leaf, shape=shape,
                 dtype=dtype, device="cpu", stats=None, data=data, note=note, process="weights")


def _dequantize_int8(entries: dict[str, Entry]) -> dict[str, Entry]:
    """Fold ``X`` (int8) + ``X_scale`` [+ ``X_offset``] into one float32 entry named ``X``."""
    out = dict(entries)
    for name, entry in entries.items():
        if entry.dtype != "int8" or f"{name}_scale" not in entries:
            continue
        out.pop(f"{name}_scale")
        out.pop(f"{name}_offset", None)
        entry.dtype, entry.note = "float32", "int8 dequantized: (w - offset) * scale"
        entry.data = {**(entry.data or {}), "dequant": name}
    return out


def _per_row(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if v.numel() == w.shape[0] and w.dim() > 1:
        return v.reshape(-1, *([1] * (w.dim() - 1)))
    return v


class _WeightSet:
    """Entries plus how to read each: the ``loader`` of the resulting Dump."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.format = path, fmt
        self.entries: dict[str, Entry] = {}
        self.names: set[str] = set()  # every tensor in the files, scales and offsets included
        self.raw: Callable[[str], torch.Tensor] = lambda name: torch.empty(0)

    def load(self, entry: Entry) -> torch.Tensor:
        assert entry.data is not None
        name = entry.data["key"]
        w = self.raw(name)
        if "dequant" in entry.data:
            scale = self.raw(f"{name}_scale").float()
            offset_name = f"{name}_offset"
            offset = self.raw(offset_name).float() if offset_name in self.names else torch.zeros(())
            w = (w.float() - _per_row(offset, w)) * _per_row(scale, w)
        return w

    def dump(self) -> Dump:
        entries = list(self.entries.values())
        for seq, entry in enumerate(entries):
            entry.seq = seq
        proc = ProcessDump(self.path, {"format": self.format}, entries, [StepRecord(0, 0, None, len(entries))])
        return Dump(self.path, {"format": self.format}, [proc], [], format="weights", loader=self.load)


def _safetensors(path: Path) -> _WeightSet:
    from safetensors import SafetensorError, safe_open

    files = [path] if path.is_file() else []
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({path / f for f in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
    ws = _WeightSet(path, "safetensors")
    handles: dict[str, Any] = {}
    where: dict[str, Path] = {}
    for file in files:
        try:
            handle = handles[str(file)] = safe_open(str(file), framework="pt")
        except (OSError, SafetensorError) as exc:
            raise DumpError(f"{file}: not a readable safetensors file ({exc})") from None
        for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            sl = handle.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
            where[key] = file
            ws.entries[key] = _entry(0, key, list(sl.get_shape()), dtype, {"file": file.name, "key": key})
    ws.names = set(ws.entries)
    ws.raw = lambda key: handles[str(where[key])].get_tensor(key)
    ws.entries = _dequantize_int8(ws.entries)
    return ws


def _state_dict(path: Path) -> _WeightSet:
    obj = load_object(path, mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = dict(tensors_in(obj))
    if not tensors:
        raise DumpError(f"{path}: holds no tensors")
    ws = _WeightSet(path, "torch")
    for key, t in tensors.items():
        ws.entries[key] = _entry(0, key, list(t.shape), str(t.dtype).removeprefix("torch."),
                                 {"file": path.name, "key": key})
    ws.names = set(ws.entries)
    ws.raw = lambda key: tensors[key]
    ws.entries = _dequantize_int8(ws.entries)
    return ws


def _gguf(path: Path) -> _WeightSet:
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise DumpError("reading GGUF needs the 'gguf' package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises plain ValueErrors and struct errors on bad files
        raise DumpError(f"{path}: not a readable GGUF file ({exc})") from None

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.parts[f.data[0]].tolist()

    arch = bytes(field("general.architecture") or []).decode() or "unknown"
    heads = (field(f"{arch}.attention.head_count") or [0])[0]
    kv_heads = (field(f"{arch}.attention.head_count_kv") or [heads])[0]
    tensors = {t.name: t for t in reader.tensors}
    ws = _WeightSet(path, "gguf")
    renamed: dict[str, str] = {}
    for t in reader.tensors:
        name = (hf_name(t.name) if arch == "llama" else None) or t.name
        renamed[name] = t.name
        shape = [int(d) for d in reversed(t.shape.tolist())]
        note = None if t.tensor_type.name in ("F32", "F16", "BF16") else f"{t.tensor_type.name} dequantized"
        ws.entries[name] = _entry(0, name, shape, "float32", {"file": path.name, "key": name}, note)

    def raw(name: str) -> torch.Tensor:
        t = tensors[renamed[name]]
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            w = unpermute(w, heads)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            w = unpermute(w, kv_heads)
        return w

    ws.names = set(ws.entries)
    ws.raw = raw
    return ws


def _from_dump(path: Path) -> Dump:
    from llmdiff.store.reader import open_dump

    dump = open_dump(path)
    for proc in dump.processes:
        proc.entries = [e for e in proc.entries if e.part == "param"]
    if not dump.entries:
        raise DumpError(f"{path}: this dump holds no weights (capture with weights=True)")
    return dump


def open_weights(path: str | Path) -> Dump:
    """Open a weight set (see the module docs) as a :class:`~llmdiff.store.reader.Dump` of ``param`` entries."""
    p = Path(path)
    if not p.exists():
        raise DumpError(f"{p}: no such file or folder")
    suffix = p.suffix.lower()
    if p.is_file() and suffix == ".gguf":
        return _gguf(p).dump()
    if p.is_file() and suffix == ".safetensors":
        return _safetensors(p).dump()
    if p.is_file() and suffix in (".pt", ".pth", ".bin"):
        return _state_dict(p).dump()
    if p.is_dir() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()):
        return _safetensors(p).dump()
    if p.is_dir():
        bins = sorted([*p.glob("pytorch_model*.bin"), *p.glob("*.pt"), *p.glob("*.pth")])
        if len(bins) == 1:
            return _state_dict(bins[0]).dump()
        return _from_dump(p)
    raise DumpError(f"{p}: not a weight file (.safetensors, .pt/.pth/.bin, .gguf) or folder")
