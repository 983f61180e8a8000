"""llama.cpp baselines of the same weights: a GGUF model requantized to Q8_0 or Q4_0 with the `gguf` package, so
`lowbit eval` can put a lowbit scheme beside what llama.cpp would have made of the same float32 weights.

Every 2-D weight is dequantized to float32 and quantized again to the target type (what `llama-quantize` does with
a float source; with a quantized source the float32 is the dequantized weight, i.e. the reference lowbit measures
against). 1-D tensors (norms) are copied as they are. `keep` names tensors copied unchanged: by default the token
embedding, which in a tied model is also the output head that lowbit's schemes leave unquantized (their ignore
list holds `lm_head`), so both sides quantize the same tensors. All metadata (tokenizer, chat template) is copied;
`general.file_type` is set to the new type.
"""
from __future__ import annotations

import os

import numpy as np

BASELINE_TYPES = ("Q8_0", "Q4_0")
KEEP_DEFAULT = ("token_embd.weight",)


def requantize_gguf(src: str, dst: str, qtype: str, keep: tuple[str, ...] = KEEP_DEFAULT) -> dict:
    """Write `dst`: the GGUF file `src` with every 2-D weight not in `keep` requantized to `qtype` (Q8_0 or Q4_0).

    Returns {tensor name: type written}. Written to a temporary name and renamed, so `dst` is never half-written.
    """
    import gguf
    from gguf.quants import dequantize, quantize
    if qtype not in BASELINE_TYPES:
        raise ValueError(f"unsupported baseline type {qtype!r} (supported: {', '.join(BASELINE_TYPES)})")
    target = gguf.GGMLQuantizationType[qtype]
    file_type = gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tmp = f"{dst}.tmp{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    for f in reader.fields.values():
        # GGUF.* are the reader's virtual fields; the writer writes the architecture itself
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = int(file_type) if f.name == gguf.Keys.General.FILE_TYPE else f.contents()
        sub_type = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, value, f.types[0], sub_type=sub_type)
    written = {}
    for t in reader.tensors:
        if t.name in keep or len(t.shape) != 2:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            written[t.name] = t.tensor_type.name
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)  # [rows, cols]
        writer.add_tensor(t.name, quantize(w, target), raw_dtype=target)
        written[t.name] = qtype
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return written
