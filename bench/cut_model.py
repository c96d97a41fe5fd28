"""A smaller copy of the default model for machines it cannot travel to whole.

The GPU machine receives at most 64 MiB with the checkout; SmolLM2-135M-Instruct's Q4_1 file is
94 MiB, and its 576-wide matrices rule out the K-quants. This keeps the first and the last layers
(by default 0-6 and 24-29: 13 of 30), its tokenizer, chat template and tied embedding, and
requantizes the embedding to Q4_0: 44 MiB. Its replies are poor, but its next-token
distributions are a language model's, so a grammar refuses its sampled tokens about as seldom as
the whole model's (8 refusals in 144 tokens of bench/isolation.py's json_schema request here),
unlike a random-weight model's, which a grammar refuses nearly every time.

    .venv/bin/python bench/cut_model.py .gpu/smollm2-cut.gguf
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.servers import default_model_file


def cut(source: Path, keep: list[int], out: Path) -> None:
    reader = gguf.GGUFReader(source)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    part = out.with_suffix(".part")
    writer = gguf.GGUFWriter(part, arch)
    for field in reader.fields.values():
        name, vtype = field.name, field.types[0]
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == f"{arch}.block_count":
            writer.add_uint32(name, len(keep))
        elif vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            values = ([bytes(field.parts[i]).decode("utf-8", "surrogateescape")
                       for i in field.data] if sub == gguf.GGUFValueType.STRING
                      else [field.parts[i].tolist()[0] for i in field.data])
            writer.add_key_value(name, values, vtype, sub_type=sub)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_key_value(name, bytes(field.parts[field.data[0]]).decode("utf-8"), vtype)
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith("blk."):
            layer = int(name.split(".")[1])
            if layer not in keep:
                continue
            name = f"blk.{keep.index(layer)}." + name.split(".", 2)[2]
        writer.add_tensor(name, tensor.data, raw_shape=tensor.data.shape,
                          raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = lc.LLAMA_FTYPE_MOSTLY_Q4_1, True, 2
    params.token_embedding_type = params.output_tensor_type = lc.GGML_TYPE_Q4_0
    if lc.llama_model_quantize(str(part).encode(), str(out).encode(), ctypes.byref(params)):
        raise SystemExit("llama_model_quantize failed")
    part.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, help="default: the default model's GGUF")
    parser.add_argument("--layers", default="0,1,2,3,4,5,6,24,25,26,27,28,29")
    args = parser.parse_args()
    cut(args.source or default_model_file(), [int(x) for x in args.layers.split(",")], args.out)
    print(f"{args.out}: {os.path.getsize(args.out) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
