"""Human-readable listing of the filters, printed by ``imgpipe filters``."""

from __future__ import annotations

from imgpipe.filters.params import ParamInfo, infos
from imgpipe.filters.registry import REGISTRY


def format_filters_text() -> str:
    """Every filter with its cost class and doc, then each parameter's type, range and default."""
    blocks = []
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        lines = [f"{name}  [{spec.cost}]", f"    {spec.doc}"]
        params = infos(spec.params)
        width = max((len(info.name) for info in params), default=0)
        for info in params:
            lines.append(
                f"    {info.name:<{width}}  {info.type_name:<5}  {_accepts(info):<22}"
                f"  default {_default(info):<8}  {info.doc}"
            )
        if not params:
            lines.append("    (no parameters)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _accepts(info: ParamInfo) -> str:
    if info.choices:
        return "|".join(info.choices)
    if info.kind is bool:
        return "true|false"
    return f"{info.format(info.lo)}..{info.format(info.hi)}"


def _default(info: ParamInfo) -> str:
    return "-" if info.default is None else info.format(info.default)
