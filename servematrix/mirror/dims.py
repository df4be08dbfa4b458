"""The twin's widths: each config field the plan shrinks, under the invariants checks.py
verifies (KV heads that TP both splits and replicates, heads divisible by every TP, quantized
dims whole blocks/groups per rank, experts that still route)."""

from __future__ import annotations

import math
from typing import Any

from servematrix.mirror.layout import field_value, get_path, rules
from servematrix.mirror.schemes import evaluate


def tp_role(prefix: str) -> str:
    """The linear's role under TP by its last name (mirror-families.yaml tp_roles): column, kv, row,
    replicated, unplanned, or "unknown" for a name the table does not give (the mirror splits neither dim
    of one that is not column, kv or row)."""
    last = prefix.rsplit(".", 1)[-1]
    roles = rules()["tp_roles"]
    return next((r for r in ("column", "kv", "row", "replicated", "unplanned") if last in roles.get(r, [])),
                "unknown")


def _is_ffn(prefix: str) -> bool:
    return prefix.rsplit(".", 1)[-1] in rules()["tp_roles"]["ffn"]


def is_qkv(prefix: str) -> bool:
    """A fused q/k/v projection (mirror-families.yaml `tp_roles.qkv_sections`)."""
    return prefix.rsplit(".", 1)[-1] in rules()["tp_roles"].get("qkv_sections", [])


def qkv_sections(cfg: dict, tp: int) -> list[int] | None:
    """The output rows a rank holds of each section (q, k, v) of a fused q/k/v projection at `tp`,
    from the config's head fields, as vLLM's QKVParallelLinear loads them: q's heads split over
    the ranks, the KV heads split where TP divides them and one replicated per rank where they are
    fewer (kv_class). None where the config does not give them, or TP cannot split the heads."""
    _, heads = field_value(cfg, "heads")
    _, kv = field_value(cfg, "kv_heads")
    _, hd = field_value(cfg, "head_dim")
    _, hidden = field_value(cfg, "hidden")
    if not isinstance(heads, int) or heads <= 0 or heads % tp:
        return None
    kv = kv or heads
    hd = hd or (hidden // heads if isinstance(hidden, int) and hidden % heads == 0 else None)
    how = kv_class(kv, tp)
    if not hd or how == "invalid":
        return None
    per_rank = kv // tp if how == "split" else 1
    return [heads // tp * hd, per_rank * hd, per_rank * hd]


def _units(group_info: dict[str, dict], params: dict[str, dict[str, int]]) -> dict[str, int]:
    """The alignment unit each kind of linear needs (lcm over the quantized ones of that kind)."""
    units = {"all": 1, "ffn": 1, "attn_out": 1, "attn_in": 1, "kv_out": 1}
    for prefix, g in group_info.items():
        align = rules()["schemes"][g["scheme"]].get("align", {})
        p = params[g["scheme"]]
        u_out, u_in = evaluate(align.get("n", 1), p), evaluate(align.get("k", 1), p)
        units["all"] = math.lcm(units["all"], u_out, u_in)
        role = tp_role(prefix)
        if _is_ffn(prefix):
            units["ffn"] = math.lcm(units["ffn"], u_out if role == "column" else u_in)
        elif role == "kv":
            units["kv_out"] = math.lcm(units["kv_out"], u_out)
        elif role == "column":
            units["attn_out"] = math.lcm(units["attn_out"], u_out)
            if is_qkv(prefix):  # its k and v sections are the KV heads' rows, as a separate k_proj's
                units["kv_out"] = math.lcm(units["kv_out"], u_out)
        elif role == "row":
            units["attn_in"] = math.lcm(units["attn_in"], u_in)
    return units


# how the twin's KV heads meet the TP values (KV_RULE); the CLI's --kv-policy choices
KV_POLICIES = ("cover", "faithful", "replicate")


def kv_class(kv: int, tp: int) -> str:
    return "split" if kv % tp == 0 else "replicated" if tp % kv == 0 else "invalid"


KV_RULE = ("num_key_value_heads = the smallest k <= the source's that every TP divides or is a multiple of "
           "(vLLM's requirement), such that one TP > 1 splits the KV heads (k % tp == 0) and another "
           "replicates them (tp % k == 0, tp > k); where the TP values cannot do both, or kv_policy is "
           "'faithful', the smallest k that splits or replicates at every TP exactly as the source does; "
           "kv_policy 'replicate': the largest k <= the source's that every TP > 1 replicates (fewer KV "
           "heads than ranks, the path of vLLM's num_kv_head_replicas)")


def choose_kv(src_kv: int, tps: list[int], policy: str) -> int:
    big = [t for t in tps if t > 1]

    def valid(k: int) -> bool:
        return all(kv_class(k, t) != "invalid" for t in tps)

    if policy == "replicate":  # every TP > 1 holds more ranks than KV heads (1 divides every TP)
        return max(k for k in range(1, src_kv + 1) if all(t % k == 0 and t > k for t in big) or k == 1)
    if policy == "cover":
        for k in range(2, src_kv + 1):
            classes = {kv_class(k, t) for t in big}
            if valid(k) and {"split", "replicated"} <= classes:
                return k
    for k in range(1, src_kv + 1):
        if valid(k) and all(kv_class(k, t) == kv_class(src_kv, t) or (k == 1 and src_kv == 1) for t in big):
            return k
    return src_kv  # the source itself is invalid at some TP: kept, and the invariant says so


class _Dims:
    """config field -> (source, twin) for every width the plan changes."""

    def __init__(self, cfg: dict):
        self.cfg, self.changed = cfg, {}

    def key(self, key: str | None, value: Any) -> None:
        if key is not None and get_path(self.cfg, key) != value:
            self.changed[key] = (get_path(self.cfg, key), value)

    def role(self, role: str, value: Any) -> None:
        self.key(field_value(self.cfg, role)[0], value)


def choose_dims(cfg: dict, tps: list[int], group_info: dict, params: dict, kv_policy: str,
                align: dict[str, int] | None = None) -> tuple[dict[str, tuple[Any, Any]], str, list[str]]:
    """The twin's widths, (source, twin) per changed config field; the KV rule applied; notes.
    A width only ever shrinks: where the source's is already below the target it is kept (and if
    it is then misaligned, so is the source's, and the quantized-dims invariant says so). `align`
    adds units (the keys of _units) the twin's widths must also be whole multiples of per TP rank:
    a quantized layout the twin will be forged in though its source is not quantized (the sweep's
    quantized cells, widened to a real checkpoint's blocks)."""
    t = rules()["targets"]
    units = _units(group_info, params)
    for kind, unit in (align or {}).items():
        units[kind] = math.lcm(units[kind], unit)
    dims = _Dims(cfg)
    notes: list[str] = []
    # every feed-forward width is split over TP ranks: whole units per rank at every TP
    ffn = math.lcm(*[tp * math.lcm(t["ffn_unit"], units["ffn"]) for tp in tps])
    for key in rules()["fields"]["ffn"]:
        value = get_path(cfg, key)
        if isinstance(value, list):  # one width per layer (Gemma 3n): each shrinks alike, one
            widths = [min(v, ffn) for v in value]  # number where they are all equal (the class expands it)
            dims.key(key, widths[0] if len(set(widths)) == 1 else widths)
        elif value:
            dims.key(key, min(value, ffn))
    hidden_unit = math.lcm(t["hidden"], units["all"])  # hidden is every linear's in or out: aligned to all
    _, q_lora = field_value(cfg, "q_lora")
    if q_lora:
        dims.role("q_lora", min(q_lora, hidden_unit))
    rule = KV_RULE
    if field_value(cfg, "heads")[1]:
        if field_value(cfg, "mla")[1] is not None:
            rule = _mla_heads(cfg, tps, units, dims)
        else:
            notes += _gqa_heads(cfg, tps, units, dims, kv_policy)
    _, index_heads = field_value(cfg, "index_heads")
    if index_heads:
        dims.role("index_heads", min(index_heads, t["index_heads"]))
    _, hidden = field_value(cfg, "hidden")
    if field_value(cfg, "hidden")[0] not in dims.changed and hidden:
        # transformers' configs refuse a hidden_size the heads do not divide even where head_dim is
        # explicit (measured: SmolLM2's 3 KV heads give the twin 6 heads; 128 is refused)
        heads_key = field_value(cfg, "heads")[0]
        heads = dims.changed[heads_key][1] if heads_key in dims.changed else field_value(cfg, "heads")[1]
        dims.role("hidden", min(hidden, math.lcm(hidden_unit, heads or 1)))
    for role, keys in (rules()["fields"].get("copies") or {}).items():
        role_key, value = field_value(cfg, role)
        twin_value = dims.changed.get(role_key, (value, value))[1]
        for key in keys:
            own = get_path(cfg, key)
            if isinstance(own, int) and isinstance(value, int) and value and (own * twin_value) % value == 0:
                dims.key(key, own * twin_value // value)
    for key in rules()["fields"].get("vocab") or []:  # a second vocabulary (Gemma 3n's per-layer inputs): the twin's
        if isinstance(cfg.get(key), int):
            dims.key(key, min(cfg[key], t["vocab_size"]))
    _experts(cfg, tps, dims)
    notes += _ties(cfg, tps, dims)
    return dims.changed, rule, notes


def _ties(cfg: dict, tps: list[int], dims: _Dims) -> list[str]:
    """A count the family's class ties to other fields (`fields.ties`: field = a x b / c; Mamba-2's
    num_heads = hidden_size x expand / head_dim, which its configuration refuses otherwise), set
    from the twin's values of those fields where the result is a whole count every TP divides."""
    notes = []
    for key, (a, b, c, *when) in (rules()["fields"].get("ties") or {}).items():
        # c may be a number (Mamba-2's intermediate_size = hidden_size x expand / 1)
        src = {f: f if isinstance(f, int) else cfg.get(f) for f in (key, a, b, c)}
        twin = {f: f if isinstance(f, int) else dims.changed.get(f, (src[f], src[f]))[1] for f in (key, a, b, c)}
        if not all(isinstance(twin[f], int) and twin[f] > 0 for f in (a, b, c)) or not isinstance(src[key], int):
            continue
        # a tie marked `source` binds only where the source's own values keep it: a family may state
        # the product elsewhere (Falcon-H1's mamba_d_ssm), and then its count is free of the width
        if "source" in when and src[a] * src[b] != src[key] * src[c]:
            continue
        value, rest = divmod(twin[a] * twin[b], twin[c])
        if rest == 0 and value and all(value % tp == 0 for tp in tps):
            dims.key(key, value)
            notes.append(f"{key} = {a} x {b} / {c} = {value} (the family ties it to them)")
    return notes


def _mla_heads(cfg: dict, tps: list[int], units: dict[str, int], dims: _Dims) -> str:
    """MLA: the fewest heads every TP divides whose per-rank q_b / kv_b / o_proj widths are whole units."""
    _, heads = field_value(cfg, "heads")
    q = cfg.get("qk_nope_head_dim", 0) + cfg.get("qk_rope_head_dim", 0)
    kv = cfg.get("qk_nope_head_dim", 0) + cfg.get("v_head_dim", 0)
    o = cfg.get("v_head_dim", 0)

    def fits(h: int) -> bool:
        return all(h % tp == 0 and (h // tp * q) % units["attn_out"] == 0 and (h // tp * kv) % units["attn_out"] == 0
                   and (h // tp * o) % units["attn_in"] == 0 for tp in tps)

    h = next((h for h in range(1, 4097) if fits(h)), heads)
    if h > heads and all(heads % tp == 0 for tp in tps):
        h = heads  # never more heads than the source
    dims.role("heads", h)
    _, src_kv = field_value(cfg, "kv_heads")
    if src_kv:
        dims.role("kv_heads", max(1, h * src_kv // heads))
    return "MLA: the KV latent is replicated on every rank; num_key_value_heads follows the heads"


def _gqa_heads(cfg: dict, tps: list[int], units: dict[str, int], dims: _Dims, kv_policy: str) -> list[str]:
    t = rules()["targets"]
    _, heads = field_value(cfg, "heads")
    _, hidden = field_value(cfg, "hidden")
    src_kv = field_value(cfg, "kv_heads")[1] or heads
    # the family computes it as hidden_size / num_attention_heads (or vLLM does, whatever the class states)
    derived = not cfg.get("head_dim") or cfg.get("model_type") in (rules()["fields"].get("derived_head_dim") or [])
    hd_src = cfg.get("head_dim") or hidden // heads
    # vLLM's CPU attention takes head sizes in steps of 32 (and 80/96/112): a multiple of 32
    hd = hd_src if hd_src < t["min_head_dim"] else min(hd_src, t["head_dim"]) // 32 * 32
    if units["kv_out"] > 1 and hd % units["kv_out"]:  # one KV head per rank whole blocks, where the source's
        wider = min(hd_src, math.lcm(hd, units["kv_out"]))  # head is that wide (else the source's, if a size the
        hd = wider if wider % 32 == 0 else hd  # CPU kernels take: Phi-3's 96; phi-2's 80 keeps 64)
    kv = choose_kv(src_kv, tps, kv_policy)
    notes = []
    if hd % units["kv_out"]:  # the source's head is narrower than the unit (Phi-3's 96 rows, blocks of 128):
        whole = _kv_whole(src_kv, hd, tps, units["kv_out"])  # several KV heads a rank make whole units together
        if whole is not None and whole != kv:
            kv = whole
            rows = ", ".join(f"TP={t}: {kv // t * hd}" for t in tps)
            notes.append(f"{kv} KV heads: head_dim {hd} is not whole units of {units['kv_out']} rows, so every TP "
                         f"splits the KV heads and each rank's k/v rows ({rows}) are whole units, as real "
                         "checkpoints' are (none replicated: one head a rank would straddle)")

    def fits(h: int) -> bool:
        per_rank = all(h % tp == 0 and (h // tp * hd) % math.lcm(units["attn_out"], units["attn_in"]) == 0 for tp in tps)
        return per_rank and (not derived or (h * hd) % units["all"] == 0)

    g_min = 2 if heads > src_kv else 1  # GQA stays GQA, MHA stays MHA where TP allows
    h = next((kv * g for g in range(g_min, 257) if fits(kv * g)), kv * g_min)
    dims.role("heads", h)
    dims.role("kv_heads", kv)
    if derived:
        dims.role("hidden", h * hd)
        notes.append(f"head_dim is derived (hidden_size / num_attention_heads) in this family: hidden_size = {h} x {hd}")
    else:
        dims.role("head_dim", hd)
    for key in rules()["fields"]["scaled_with_head_dim"]:
        if cfg.get(key):
            dims.key(key, max(2, cfg[key] * hd // hd_src // 2 * 2))
    return notes


def _kv_whole(src_kv: int, hd: int, tps: list[int], unit: int) -> int | None:
    """The fewest KV heads, at most the source's, that every TP splits (a rank of a replicated KV head
    holds one head, `hd` rows, less than whole units) with each rank's `kv / tp x hd` rows whole
    `unit`s (Phi-3-mini: 32 KV heads of 96 rows are 1536 rows a rank at TP=2, 12 blocks of 128); None
    where the source has too few."""
    return next((k for k in range(1, src_kv + 1) if all(k % tp == 0 and (k // tp * hd) % unit == 0 for tp in tps)),
                None)


def _experts(cfg: dict, tps: list[int], dims: _Dims) -> None:
    """top_k 2, grouped routing kept grouped (2 groups, 1 chosen when the source excludes groups),
    the fewest experts that still route: > top_k, whole groups of >= 2, and a multiple of the
    largest TP where the source has that many (so --enable-expert-parallel splits them too)."""
    t = rules()["targets"]
    _, experts = field_value(cfg, "experts")
    if not experts:
        return
    _, top_k = field_value(cfg, "top_k")
    _, n_group = field_value(cfg, "n_group")
    _, topk_group = field_value(cfg, "topk_group")
    k = min(top_k or 1, t["top_k"])
    ng, tg = n_group, topk_group
    if n_group and n_group > 1:
        ng = min(n_group, t["n_group"])
        tg = 1 if (topk_group or n_group) < n_group else ng  # keep "some groups are excluded" if the source does
    per_ep = max(tps)

    def fits(e: int, ep: bool) -> bool:
        grouped = not ng or ng == 1 or (e % ng == 0 and e // ng >= 2 and k <= (tg or ng) * (e // ng))
        return e >= 2 * k and grouped and (not ep or e % per_ep == 0)

    e = next((e for ep in (True, False) for e in range(2, experts + 1) if fits(e, ep)), experts)
    dims.role("experts", e)
    dims.role("top_k", k)
    if ng is not None:
        dims.role("n_group", ng)
    if tg is not None:
        dims.role("topk_group", tg)
    _, shared = field_value(cfg, "shared_experts")
    if shared:
        dims.role("shared_experts", min(shared, t["shared_experts"]))
