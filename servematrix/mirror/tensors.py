"""The twin's tensors, planned: transformers' class's layout for the twin config (`base`), with the
source's quantized linears re-laid out for the twin's widths, its extra tensors added, its dtypes
applied. Two layouts come out: what forge(spec) writes (`forged`) and the finished twin after the
post-processing steps the forge cannot express (`twin`). What of them goes into the ForgeSpec
and the post-processing steps is spec_parts.py."""

from __future__ import annotations

from collections import Counter

from pydantic import ValidationError

from servematrix.config.quantize import BY_SCHEME, tag
from servematrix.mirror.layout import FLOAT_DTYPES, SourceLayout, TensorMeta, rules, split_name
from servematrix.mirror.plan_models import TORCH_DTYPE, NotMirrored, QuantTarget
from servematrix.mirror.schemes import NotWhole, infer_params, scheme_shapes

def canonical(name: str, layer_map: dict[int, int] | None = None) -> str:
    """The name with its decoder layer mapped onto the twin's and its expert index `*`."""
    layer, key = split_name(name)
    if layer is None:
        return key
    return key.replace("{L}", str(layer_map.get(layer, layer) if layer_map is not None else layer))


def canonical_dtypes(tensors: dict[str, TensorMeta], layer_map: dict[int, int] | None = None) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, meta in tensors.items():
        out.setdefault(canonical(name, layer_map), set()).add(meta.dtype)
    return out


class MappedSource:
    """The source's tensors under canonical names, its quantized linears under canonical prefixes."""

    def __init__(self, layout: SourceLayout, layer_map: dict[int, int], groups: dict[str, str]):
        self.dtypes: dict[str, set[str]] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self._counts: dict[str, Counter] = {}
        for name, meta in layout.tensors.items():
            c = canonical(name, layer_map)
            self.dtypes.setdefault(c, set()).add(meta.dtype)
            self._counts.setdefault(c, Counter())[meta.dtype] += 1
            self.shape.setdefault(c, meta.shape)
        votes: dict[str, Counter] = {}
        self.example: dict[str, str] = {}  # canonical prefix -> one source prefix
        for prefix, scheme in groups.items():
            cp = canonical(prefix + ".weight", layer_map)[: -len(".weight")]
            votes.setdefault(cp, Counter())[scheme] += 1
            self.example.setdefault(cp, prefix)
        self.groups = {cp: c.most_common(1)[0][0] for cp, c in votes.items()}
        self.mixed = sorted(cp for cp, c in votes.items() if len(c) > 1)

    def dtype(self, c: str) -> str:
        """The dtype of the name; where the layers/experts it stands for differ, the most common one
        (the names-and-dtypes invariant then reports the difference)."""
        return self._counts[c].most_common(1)[0][0]


def _index(names) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(canonical(n), []).append(n)
    return out


class Builder:
    """Starts from `base` (transformers' class for the twin config) and applies, in order: float
    weights for quantized linears the class does not build (MTP), the quantized layouts, the
    source's extra tensors, then drops and dtype casts, recording which of these the forge writes
    and which need post-processing."""

    def __init__(self, base: dict[str, TensorMeta], mapped: MappedSource, group_info: dict[str, dict],
                 params: dict[str, dict[str, int]], dtype: str, k_main: int, experts: int | None,
                 dim_map: dict[int, int], quant_method: str | None = None):
        self.base, self.mapped, self.group_info, self.params = base, mapped, group_info, params
        self.dtype, self.k_main, self.experts, self.dim_map = dtype, k_main, experts, dim_map
        self.twin: dict[str, TensorMeta] = dict(base)
        self.forged: dict[str, TensorMeta] = dict(base)
        self.targets: list[QuantTarget] = []
        self.extras: dict[str, TensorMeta] = {}  # forge extra_tensors
        self.added: list[str] = []  # post-processing adds (dtypes the forge's extras do not offer)
        self.casts: dict[str, tuple[str, str]] = {}
        self.dropped: list[str] = []
        self.target_prefixes: set[str] = set()
        self.not_mirrored: list[NotMirrored] = []
        self.quant_method = quant_method  # the source config's quant_method
        self.method: dict | None = None  # the one `quantize:` weight method the forge writes (one config)

    # -- steps --

    def run(self) -> None:
        self._dequantized_weights_the_class_lacks()
        self._quantize()
        self._extras()
        self._drops_and_casts()

    def _expand(self, c: str) -> list[str]:
        if ".experts.*." not in c:
            return [c]
        return [c.replace(".experts.*.", f".experts.{e}.") for e in range(self.experts or 0)]

    def _shape_for(self, name: str, c: str) -> tuple[int, ...] | None:
        """A tensor the class does not write: the shape of the same tensor in another twin layer
        (an MTP layer is a decoder layer), else the source's with each width mapped."""
        _, key = split_name(name)
        # only a per-layer name has a twin in another layer: a name outside the layer containers
        # skips the scan (it was one pass over the whole twin per such tensor: quadratic in them)
        if "{L}" in key:
            for other, meta in self.twin.items():
                if other != name and split_name(other)[1] == key:
                    return meta.shape
        shape = []
        for d in self.mapped.shape[c]:
            if d in self.dim_map:
                shape.append(self.dim_map[d])
            elif d <= 8:  # a count (scalar-like dims, a pair): kept
                shape.append(d)
            else:
                k = next((k for k in (2, 3, 4) if d % k == 0 and d // k in self.dim_map), None)
                if k is None:
                    return None
                shape.append(k * self.dim_map[d // k])
        return tuple(shape)

    def _dequantized_weights_the_class_lacks(self) -> None:
        # a quantized linear in a layer transformers' class does not build (MTP): its float weight
        # is an extra tensor first, then quantized like every other
        have = _index(self.twin)
        for cp in self.mapped.groups:
            if cp + ".weight" in have:
                continue
            example = self.group_info.get(self.mapped.example[cp])
            if example is None:
                continue
            solved = infer_params(example["scheme"], example["leaves"], self.params[example["scheme"]])
            for name in self._expand(cp + ".weight"):
                shape = self._shape_for(name, cp + ".weight")
                if shape is None and solved:
                    shape = tuple(self.dim_map.get(d, d) for d in solved[1])
                if shape is None:
                    self.not_mirrored.append(NotMirrored(what=name, reason="no twin width for its dims"))
                    continue
                meta = TensorMeta(dtype=self.dtype, shape=shape)
                self.twin[name] = self.forged[name] = self.extras[name] = meta

    def _quantize(self) -> None:
        have = _index(self.twin)
        for cp, scheme in sorted(self.mapped.groups.items()):
            example = self.group_info.get(self.mapped.example[cp])
            if example is None or scheme not in self.params:
                continue
            src_leaves = {leaf: TensorMeta(dtype=self.mapped.dtype(f"{cp}.{leaf}"), shape=self.mapped.shape[f"{cp}.{leaf}"])
                          for leaf in rules()["schemes"][scheme]["tensors"] if f"{cp}.{leaf}" in self.mapped.dtypes}
            solved = infer_params(scheme, example["leaves"], self.params[scheme])
            for name in have.get(cp + ".weight", []):
                self._quantize_one(name[: -len(".weight")], scheme, src_leaves, solved[1] if solved else None)

    def _quantize_one(self, prefix: str, scheme: str, src_leaves: dict[str, TensorMeta], source_dims) -> None:
        weight = self.twin[prefix + ".weight"]
        if len(weight.shape) != 2:
            self.not_mirrored.append(NotMirrored(what=prefix, reason=f"{scheme}: the class writes it {len(weight.shape)}-D"))
            return
        out, in_ = weight.shape
        p = self.params[scheme]
        try:
            shapes = scheme_shapes(scheme, out, in_, p, src_leaves, source_dims)
        except NotWhole as exc:
            self.not_mirrored.append(NotMirrored(what=prefix, reason=f"misaligned: [{out}, {in_}] under {scheme} "
                                                                     f"{p}: {exc} is not whole"))
            return
        leaves = {leaf: TensorMeta(dtype=src_leaves[leaf].dtype, shape=shape) for leaf, shape in shapes.items()}
        spec = rules()["schemes"][scheme]
        forge = (spec.get("forge") == "fp8_blocks" and out % p["block_n"] == 0 and in_ % p["block_k"] == 0
                 and leaves["weight"].dtype == "F8_E4M3" and leaves["weight_scale_inv"].dtype == "F32"
                 and set(leaves) == {"weight", "weight_scale_inv"})
        method = None if forge else self._forge_method(scheme, out, in_, leaves)
        forge = forge or method is not None
        values = {leaf: [out if v == "n" else in_ if v == "k" else int(v) for v in t["value"]]
                  for leaf, t in spec["tensors"].items() if leaf in leaves and "value" in t}
        self.twin.pop(prefix + ".weight")
        if method is not None:
            self.forged.pop(prefix + ".weight")
        self.target_prefixes.add(prefix)
        for leaf, meta in leaves.items():
            self.twin[f"{prefix}.{leaf}"] = meta
            if forge:
                self.forged[f"{prefix}.{leaf}"] = meta
        self.targets.append(QuantTarget(prefix=prefix, scheme=scheme, forge=forge, out=out, in_=in_, params=p,
                                        leaves=leaves, values=values, method=method))

    def _forge_method(self, scheme: str, out: int, in_: int, leaves: dict[str, TensorMeta]) -> dict | None:
        """The forge's `quantize:` method (as its dump, without `tensors`) that writes exactly these
        leaves for [out, in], or None: then the linear is post-processed. One method per twin."""
        method = method_for(scheme, self.params[scheme], leaves)
        if method is None or (self.quant_method and self.quant_method not in rules()["schemes"][scheme]["methods"]):
            return None
        want = {leaf: (m.dtype, m.shape) for leaf, m in leaves.items()}
        if method.misaligned(out, in_) or method.leaves(out, in_, TORCH_DTYPE[self.dtype]) != want:
            return None
        dump = method.model_dump(mode="json", exclude={"tensors"})
        if self.method is None:
            self.method = dump
        return dump if dump == self.method else None

    def _extras(self) -> None:
        have = _index(self.twin)
        for c in sorted(set(self.mapped.dtypes) - set(have)):
            dtype = self.mapped.dtype(c)
            for name in self._expand(c):
                shape = self._shape_for(name, c)
                if shape is None:
                    self.not_mirrored.append(NotMirrored(what=name, reason=f"no twin width for its dims "
                                                                           f"{list(self.mapped.shape[c])}"))
                    continue
                meta = TensorMeta(dtype=dtype, shape=shape)
                self.twin[name] = meta
                # the forge's extra_tensors write float32/bfloat16/float16, and int64 index buffers
                if dtype in TORCH_DTYPE or (dtype == "I64" and name.rpartition(".")[2] in rules()["index_leaves"]
                                            and len(shape) >= 1):
                    self.forged[name] = self.extras[name] = meta
                else:
                    self.added.append(name)

    def _drops_and_casts(self) -> None:
        for name in list(self.twin):
            c = canonical(name)
            if c not in self.mapped.dtypes:
                self.twin.pop(name)
                self.dropped.append(name)
                continue
            want = self.mapped.dtype(c)
            have = self.twin[name].dtype
            if want != have and name not in self.extras and not self._is_target_leaf(name):
                self.twin[name] = TensorMeta(dtype=want, shape=self.twin[name].shape)
                if want in FLOAT_DTYPES and have in FLOAT_DTYPES:
                    self.casts[name] = (have, want)
                else:
                    self.added.append(name)

    def _is_target_leaf(self, name: str) -> bool:
        return name.rpartition(".")[0] in self.target_prefixes


def method_for(scheme: str, params: dict[str, int], leaves: dict[str, TensorMeta]):
    """The quantize method of `scheme` whose parameters these (source-dtyped) leaves show, or None
    where none of its options writes them (a scale dtype or shape it does not offer)."""
    cls = BY_SCHEME.get(scheme)
    if cls is None:
        return None
    scalar = leaves.get("weight_scale_2", leaves.get("weight_scale"))
    kw = {"method": tag(cls)}
    if scheme == "fp8_block":
        kw["block"] = [params["block_n"], params["block_k"]]
    if scheme in ("fp8_tensor", "nvfp4") and "input_scale" not in leaves:
        kw["input_scale"] = None
    if scheme == "fp8_tensor":
        kw["scalars"] = {(): "0-d", (1,): "1-element"}.get(scalar.shape if scalar else None, "none")
    if scheme in ("awq", "gptq", "nvfp4"):
        kw["group_size"] = params["group"]
    if scheme in ("awq", "gptq"):
        kw.update(bits=32 // params["pack"], scales_dtype=TORCH_DTYPE.get(leaves["scales"].dtype, "none"))
    if scheme == "gptq":
        kw["g_idx"] = "g_idx" in leaves
    try:
        return cls(**kw)
    except ValidationError:
        return None


def compare(src: dict[str, set[str]], twin: dict[str, set[str]]) -> tuple[list[str], list[str], list[tuple[str, list, list]]]:
    """(only in the source, only in the twin, dtype differences) of two canonical name -> dtypes maps."""
    only_src = sorted(set(src) - set(twin))
    only_twin = sorted(set(twin) - set(src))
    dtypes = [(c, sorted(src[c]), sorted(twin[c])) for c in sorted(set(src) & set(twin)) if src[c] != twin[c]]
    return only_src, only_twin, dtypes

