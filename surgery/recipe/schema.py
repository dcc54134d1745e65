"""The recipe schema: pydantic v2 models, strict (unknown keys are errors)."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..ops import AnyOp


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(Strict):
    path: str = Field(description="local directory, hub id ORG/NAME, or builtin:NAME")
    revision: Optional[str] = Field(None, description="hub revision (branch, tag or commit) to pin")


class OutputSpec(Strict):
    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    shard_size: Union[str, int] = "5GB"
    format: Literal["hf", "mistral"] = "hf"

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v):
        from ..io.writer import parse_size

        try:
            n = parse_size(v)
        except ValueError:
            raise ValueError("must be a size like '5GB', '500MB' or a number of bytes") from None
        if n <= 0:
            raise ValueError("must be positive")
        return v


class VerifySpec(Strict):
    data: str = Field("builtin:python-license", description="builtin:python-license, a text file, a directory of .txt files, "
                      "a saved dataset, or random (seeded token ids, for a model without a tokenizer)")
    max_tokens: int = Field(2048, gt=1)
    tolerance: float = Field(1e-4, ge=0, description="approximate recipes: largest |relative loss change| (either way) and next-token KL / source loss accepted; exact ones are judged against measured rounding noise")
    per_op: bool = True
    prune_tolerance: Optional[float] = Field(None, ge=0, description="prune ops: largest relative loss increase accepted; "
                                             "unset: measured and set beside a random prune's, not judged")
    cache: bool = Field(True, description="keep the source's reference passes (its evaluation and noise floor) under "
                        "$SURGERY_CACHE (default ~/.cache/surgery/verify): a second run on the same source and data skips them")


class Recipe(Strict):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    source: Union[str, SourceSpec]
    test_source: Optional[str] = Field(None, description="small model `surgery check` runs this recipe on (e.g. builtin:tiny-llama)")
    test_overrides: list[str] = Field(default_factory=list,
                                      description="KEY=VALUE overrides `surgery check` applies to fit the test_source")
    output: Union[str, OutputSpec, None] = None
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    ops: list[AnyOp] = Field(default_factory=list)
    verify: VerifySpec = Field(default_factory=VerifySpec)

    @property
    def source_spec(self) -> SourceSpec:
        return self.source if isinstance(self.source, SourceSpec) else SourceSpec(path=self.source)

    @property
    def output_spec(self) -> Optional[OutputSpec]:
        if self.output is None:
            return None
        return self.output if isinstance(self.output, OutputSpec) else OutputSpec(path=self.output)


def json_schema() -> dict:
    """The JSON Schema editors use (`# yaml-language-server: $schema=...` in every recipe)."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "surgery recipe"
    props = schema.setdefault("properties", {})
    props["extends"] = {"type": "string", "description": "recipe name or path this one builds on; ops lists replace unless ops+ appends"}
    props["ops+"] = {"type": "array", "description": "ops appended to the extended recipe's ops"}
    props["vars"] = {"type": "object", "description": "values substituted for ${name} anywhere in the recipe"}
    return schema
