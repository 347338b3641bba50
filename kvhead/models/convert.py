"""GGUF to bf16 Hugging Face folder.

vLLM and the reference runner both want plain safetensors, and the FlexiCache math is checked
against a dense bf16 model, so a quantized GGUF is unpacked once at pull time rather than being
served quantized. transformers reads the GGUF (weights and tokenizer, including the chat template
stored in its metadata); this module makes sure the result really is dense bf16 and that the chat
template survived the round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvhead.models.errors import ModelError

BF16_BYTES = 2


@dataclass(frozen=True)
class GgufInfo:
    """What the header of a GGUF file says, read without loading any weights."""

    architecture: str
    num_params: int
    chat_template: str | None

    @property
    def bf16_bytes(self) -> int:
        """Size of the weights once unpacked to bf16 (the safetensors file, give or take)."""
        return self.num_params * BF16_BYTES


def inspect_gguf(path: Path) -> GgufInfo:
    """Parse a GGUF header and check that every tensor's data lies inside the file.

    The reader memory-maps the file, so this is cheap; it is what turns a truncated download or a
    file of random bytes into a one-line error instead of a numpy traceback mid-conversion.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        if not reader.tensors or end > size:
            raise ValueError(f"tensor data ends at byte {end}, file has {size}")
        arch = reader.get_field("general.architecture")
        template = reader.get_field("tokenizer.chat_template")
        return GgufInfo(
            architecture=arch.contents() if arch is not None else "unknown",
            num_params=sum(int(t.n_elements) for t in reader.tensors),
            chat_template=template.contents() if template is not None else None,
        )
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise ModelError(f"{path} is not a valid GGUF file ({_one_line(err)})") from None


def convert_gguf(
    path: Path, out_dir: Path, info: GgufInfo, step: Callable[[str], None] = lambda _: None
) -> None:
    """Write ``path`` as a bf16 Hugging Face folder into the (existing, empty) ``out_dir``.

    ``step`` is called with a short label before each slow phase, for progress display.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(path.parent), path.name
    try:
        with _quiet_transformers():
            step("reading tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            step("dequantizing weights to bf16")
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                gguf_file=name,
                dtype=torch.bfloat16,
                quantization_config=GgufConfig(dequantize=True),
            )
    except (ValueError, OSError, RuntimeError, KeyError, NotImplementedError) as err:
        raise ModelError(f"cannot convert {path} ({info.architecture}): {_one_line(err)}") from None

    # A quantizer left attached would make save_pretrained refuse, or record a quantization
    # config that tells vLLM to expect GGUF blocks where there are plain bf16 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    not_bf16 = {str(p.dtype) for p in model.state_dict().values() if p.dtype != torch.bfloat16}
    if not_bf16:
        raise ModelError(f"conversion of {path} left tensors in {sorted(not_bf16)}, not bf16")

    # The GGUF tokenizer carries no length limit; the model's context is the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    step("saving safetensors")
    with _quiet_transformers():
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_chat_template(out_dir, info, path)


def _check_chat_template(out_dir: Path, info: GgufInfo, path: Path) -> None:
    """The GGUF's chat template must read back unchanged from the saved tokenizer files."""
    if info.chat_template is None:
        return
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(out_dir)).chat_template
    if saved != info.chat_template:
        raise ModelError(f"the chat template of {path} did not survive conversion")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own tqdm bars while ours shows the step, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _one_line(err: BaseException) -> str:
    """First line of an exception message, so CLI errors stay one line."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
