"""data/sweep-quants.yaml, typed: how each `--quant` name re-forges a twin (`quants`, read by
quant.py), which cells are served at `--depth serve` (`serve`, serve.py), and which failures stop at
a library this CPU install lacks (`gpu_only`). Read once through config/packaged.py, so a damaged
file stops at its line as user YAML does."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from servematrix.config import packaged
from servematrix.config.quantize import layer_pattern
from servematrix.config.fields import Regex
from servematrix.config.embedding_spec import EmbeddingSmoke
from servematrix.config.scenario import SmokePrompt
from servematrix.paths import data_file

FILE = data_file("sweep-quants.yaml")  # package data, so a wheel install carries it


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Family(_Strict):
    """A model_type whose twin this quantization lays out otherwise: `fp8_blocks` (the forge's own
    option) as the family's real checkpoints carry them; `ignore`, modules its published checkpoints
    keep unquantized and name as not converted (globs over module names, the forge's `ignore`: each
    written into the config as the twin's modules it matches, as those configs list them per layer);
    `tensors`, its own linears no shared glob names; or, `checkable: false`, no layout at all: its cells are "not checkable here" with `why`, never a
    verdict a real checkpoint would not get."""

    fp8_blocks: list[dict[str, Any]] = Field(default_factory=list)
    ignore: list[str] = Field(default_factory=list)
    # globs of the family's own decoder linears, quantized beside the shared list's (a native twin's names,
    # from vLLM's class, that no shared glob matches), as the family's published quantized checkpoints hold them
    tensors: list[str] = Field(default_factory=list)
    checkable: bool = True
    why: str


class Widen(_Strict):
    """The block (fp8: n x k) or group and pack (awq/gptq: pack values per int32 along n, group
    along k) of a real checkpoint: a twin too narrow for the layout is re-planned with every
    width whole multiples of these per TP rank (mirror/dims.py `align`)."""

    n: int = Field(gt=0)
    k: int = Field(gt=0)
    why: str
    # fused projections whose sections the widened plan does not align one by one: a twin with one
    # stays not checkable (its sections would straddle blocks, which no real checkpoint does). A fused
    # q/k/v the mirror knows (mirror-families.yaml tp_roles.qkv_sections) is aligned section by section
    unaligned: list[str] = Field(default_factory=list)

    def units(self) -> dict[str, int]:
        """mirror/dims.py's alignment units: outputs by n, inputs by k, a width that is both
        (the hidden size, a feed-forward width split either way) by both."""
        import math

        both = math.lcm(self.n, self.k)
        return {"all": both, "ffn": both, "kv_out": self.n, "attn_out": self.n, "attn_in": self.k}


class KvScale(_Strict):
    """One place a checkpoint's KV-cache scales may be: templates under the twin's layers (`{layer}`)."""

    k_scale: str = Field(pattern=r"^layers\.\{layer\}\.")
    v_scale: str = Field(pattern=r"^layers\.\{layer\}\.")


class KvScales(_Strict):
    """Where a twin's KV-cache scales go: the first of `formats` whose k_scale module a layer of the twin
    holds, under whatever prefix the twin's layers have (`model.`, `model.decoder.`, none for a bare
    encoder). The formats are those vLLM's weight_utils.maybe_remap_kv_scale_name maps."""

    formats: list[KvScale] = Field(min_length=1)

    def templates(self, names) -> dict[str, str] | None:
        """{k_scale, v_scale} for a twin whose tensors are `names`: the forge's kv_cache_scales
        templates (`{layer}` left to the forge), or None where no layer holds a format's module."""
        for f in self.formats:
            k_module = f.k_scale.rsplit(".", 1)[0]
            held = re.compile(r"(.*?)" + layer_pattern(k_module) + r"\.weight")
            prefix = next((m.group(1) for n in names if (m := held.fullmatch(n))), None)
            if prefix is not None and (not prefix or prefix.endswith(".")):
                return {"k_scale": prefix + f.k_scale, "v_scale": prefix + f.v_scale}
        return None

    def modules(self) -> str:
        """The modules a format needs, in words."""
        return " or ".join(f.k_scale.rsplit(".", 1)[0].replace("{layer}", "N") for f in self.formats)


class QuantRule(_Strict):
    description: str
    quantize: dict[str, Any]
    block_k: int | None = None  # fp8-block: the input block, the CPU kernel's only one
    blocks: list[int] = Field(default_factory=list)  # fp8-block: output blocks, tried in order
    groups: list[int] = Field(default_factory=list)  # awq / gptq: group sizes, tried in order
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # forged and served in (None: the twin's)
    # model_type -> the dtype it takes instead (one vLLM refuses `dtype` for)
    dtype_for: dict[str, Literal["float32", "bfloat16", "float16"]] = Field(default_factory=dict)
    kv_scales: KvScales | None = None
    widen: Widen | None = None  # a twin too narrow for every block/group: re-planned this wide
    families: dict[str, Family] = Field(default_factory=dict)
    # vLLM's own refusal of this layout on the CPU build (no kernel): such a cell is "not checkable here"
    cpu_refuses: list[str] = Field(default_factory=list)


class ServeRules(_Strict):
    prompt: SmokePrompt
    embedding: EmbeddingSmoke  # an embedding cell's request (its dimension is the twin's width, set per cell)
    request_timeout: float = Field(120.0, gt=0)
    quants: dict[str, str] = Field(default_factory=dict)  # --quant name -> why its cells stop at the load check
    model_types: dict[str, str] = Field(default_factory=dict)  # model_type -> why

    def unservable(self, model_type: str | None, quant: str, twin_reason: str | None) -> str | None:
        """Why a cell is not served (None: it is)."""
        return twin_reason or self.quants.get(quant) or self.model_types.get(model_type or "")


class DeclaredLimit(_Strict):
    """A layout vLLM itself declares an architecture does not support (an interface its class does
    not implement), recognised by the refusal's signature."""

    signature: Regex  # over the failure's signature
    why: str  # the reason a cell shows; `{arch}` becomes the architecture's name


class SweepRules(_Strict):
    quants: dict[str, QuantRule]
    serve: ServeRules
    # regular expressions over a failure's signature: a library the CPU install lacks (GPU-only
    # ones, torchvision), so the cell is "not checkable here", not a verdict on vLLM
    gpu_only: list[Regex] = Field(default_factory=list)
    # vLLM's own declared limits: such a cell is "not supported by vLLM", neither pass nor fail
    declared_limits: list[DeclaredLimit] = Field(default_factory=list)

    def declared(self, signature: str, arch: str) -> str | None:
        """Why vLLM declares the cell's layout unsupported for `arch` (None: it does not)."""
        hit = next((d for d in self.declared_limits if re.search(d.signature, signature)), None)
        return hit.why.replace("{arch}", arch) if hit else None


def load() -> SweepRules:
    return packaged.load(FILE, SweepRules)
